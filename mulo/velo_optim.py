"""MuVeLO and VeLO: the VeLO architecture (``mulo.velo``) behind the ``torch.optim`` contract.

Thin shells, as ``MuLO`` / ``SPLO``: roles and s_W come from the model once (the same
bookkeeping, inherited from ``LearnedOptimizer``); each ``step`` hands every tensor with a
gradient, as a population of one, to ``mulo.velo.velo_step_`` in one call (VeLO's per-tensor
LSTM pools over the whole model). VeLO reads the training loss and the fraction of training
done, so it needs ``total_steps`` and a loss at every step: ``step(closure)`` or
``step(loss=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from mulo import velo as V
from mulo.meta_weights import META_INIT, check_meta_params, load_meta_weights
from mulo.optim import LearnedOptimizer, MetaWeights, closure_loss


class VeLOOptimizer(LearnedOptimizer):
    """VeLO (SP: s_W = 1). See :class:`MuVeLO` for the arguments."""

    parametrization = "sp"
    step_mult = V.STEP_MULT_SP
    reads_loss = True  # the training loop passes step(loss=...) (mulo.train.train)
    _PICKLED = (*LearnedOptimizer._PICKLED, "_loss_state")

    def __init__(
        self,
        params: nn.Module | Iterable,
        meta_weights: MetaWeights = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        roles: dict[str, str] | None = None,
        total_steps: int | None = None,
    ):
        if total_steps is None:
            raise ValueError(
                f"{type(self).__name__} reads the fraction of training done: pass "
                "total_steps=T (the run's length in steps)"
            )
        super().__init__(params, meta_weights, lr, weight_decay, roles, total_steps=total_steps)
        self._loss_state: V.LossState | None = None

    def _load_meta(self, meta_weights: MetaWeights) -> tuple[dict[str, Tensor], dict]:
        if meta_weights is None:
            raise ValueError(
                "no meta-trained VeLO weights ship with mulo yet: pass meta_weights= (a file, "
                f"or a dict from mulo.velo.init_meta_params or meta-training), or {META_INIT!r} "
                "for the untrained initialisation"
            )
        if str(meta_weights) == META_INIT:
            meta = V.init_meta_params(1, torch.Generator().manual_seed(0))
            return {k: v[0] for k, v in meta.items()}, {"name": META_INIT}
        if isinstance(meta_weights, dict):
            check_meta_params(meta_weights, "meta_weights", "velo")
            meta = {k: v.detach().float().clone() for k, v in meta_weights.items()}
            return meta, {"name": "in-memory"}
        meta, provenance = load_meta_weights(meta_weights)
        if not V.is_velo(meta):
            raise ValueError(
                f"{meta_weights} holds small_fc_lopt weights: use mulo.MuLO / mulo.SPLO for them"
            )
        return meta, provenance

    @torch.no_grad()
    def step(self, closure=None, loss: float | Tensor | None = None):
        """One step of every tensor with a gradient. VeLO reads this step's training loss: from
        ``closure`` (re-evaluated, as torch.optim) or ``loss`` (e.g. ``loss.item()``)."""
        value = closure_loss(closure)
        if value is None and loss is None:
            raise ValueError(
                f"{type(self).__name__}.step needs the training loss: step(closure) or "
                "step(loss=loss.item())"
            )
        current = torch.as_tensor(value if value is not None else loss).detach().double()
        work = [(g, p) for g in self.param_groups for p in g["params"]]
        work = [(g, p) for g, p in work if p.grad is not None and p.numel() > 0]
        if not work:
            return value
        device = work[0][1].device
        for _, p in work:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if "m" not in state:
                init = V.init_tensor_state(p.unsqueeze(0), float(self.total_steps), self.meta)
                state.update(init.to_dict())
        if self._loss_state is None:
            self._loss_state = V.init_loss_state(1, device)
        V.velo_step_(
            {k: v.to(device).unsqueeze(0) for k, v in self.meta.items()},
            [V.TensorState.from_dict(self.state[p]) for _, p in work],
            self._loss_state,
            [p.unsqueeze(0) for _, p in work],
            [p.grad.unsqueeze(0) for _, p in work],
            current.reshape(1).to(device),
            scales=[self.state[p]["scale"] for _, p in work],
            step_mult=self.step_mult,
            lrs=[float(g["lr"]) for g, _ in work],
            weight_decays=[float(g["weight_decay"]) for g, _ in work],
        )
        return value

    def state_dict(self) -> dict:
        out = super().state_dict()
        if self._loss_state is not None:
            out["velo_loss"] = {k: v.clone() for k, v in self._loss_state.to_dict().items()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load; the state is copied as saved (no cast, no sharing with the
        source) and s_W comes from the current model."""
        scales = {p: self.state[p]["scale"] for g in self.param_groups for p in g["params"]}
        saved = state_dict.get("state", {})
        torch.optim.Optimizer.load_state_dict(self, state_dict)
        for i, (p, scale) in enumerate(scales.items()):
            self.state[p]["scale"] = scale
            for key, value in saved.get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(p.device).clone()
        loss = state_dict.get("velo_loss")
        self._loss_state = None if loss is None else V.LossState.from_dict(
            {k: v.clone() for k, v in loss.items()}
        )  # fmt: skip


class MuVeLO(VeLOOptimizer):
    """μVeLO: VeLO with μP update scales (s_W = 1/fan_in for hidden weights), no parameter-
    scale multiplier and step_mult 0.01, as in the μLO paper.

    Args:
        params: an ``nn.Module`` (roles and s_W are inferred from it) or tensors / groups.
        meta_weights: a dict of VeLO meta-parameters, or ``"meta-init"`` (untrained).
        lr: multiplies every step; weight_decay: decoupled; roles: per-name role overrides.
        total_steps: the run's length T (required: VeLO reads t/T and sizes its loss EMAs by T).
    """

    parametrization = "mup"
    step_mult = V.STEP_MULT_MU
