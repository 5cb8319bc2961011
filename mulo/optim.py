"""MuLO and SPLO: small_fc_lopt as drop-in ``torch.optim.Optimizer`` subclasses.

The classes are thin shells: each step hands every parameter, as a population of one, to
``mulo.functional.lo_step_`` (small same-shape tensors together, as one population, to
``lo_step_many_``). The per-tensor update scale s_W comes from ``parametrizations``
once, when the optimizer is built, and is kept as a plain float in the parameter's state.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

import parametrizations
from mulo import functional as LF
from mulo.meta_weights import check_meta_params, default_meta_weights, load_meta_weights
from parametrizations.roles import as_role

MetaWeights = str | Path | dict[str, Tensor] | None
#: tensors up to this many elements may be stepped together (``foreach``); larger ones gain
#: nothing from it (their step is compute-bound) and would be copied into the stacked batch
FOREACH_MAX_NUMEL = 1 << 16


def closure_loss(closure) -> Tensor | None:
    """torch.optim's closure contract: re-evaluate the loss with grad enabled (a ``step`` runs
    under ``no_grad``), or None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class LearnedOptimizer(torch.optim.Optimizer):
    """small_fc_lopt behind the ``torch.optim`` contract.

    Args:
        params: an ``nn.Module`` (roles and s_W are inferred from it) or an iterable of
            tensors / param groups (then each tensor's s_W comes from its mup ``infshape``).
        meta_weights: a shipped name, a ``.pt`` path, a dict of meta-parameters, or None for
            this class's default.
        lr: multiplies every step (1.0 is the meta-trained step); schedulers may change it.
        weight_decay: decoupled, ``p <- p - lr * weight_decay * p`` before the learned step.
        roles: per-name role overrides when ``params`` is a module, e.g. ``{"pos": "input"}``.
        chunk_size: elements per chunk of the fused step (bounds the extra memory).
        foreach: step the small tensors (at most ``FOREACH_MAX_NUMEL`` elements, float32 or
            float64) that share shape, s_W, lr and weight decay in one call each, as a
            population (as torch.optim's ``foreach``): the same result, less per-tensor
            overhead on models with many small tensors (transformers). False: one by one.
        total_steps: the run's length T, for LOs that read training progress (v2: progress
            inputs and its warmup + cosine schedule over T). Without it v2 runs in its
            "horizon unknown" mode (50-step warmup, then no schedule; meta-trained on a quarter
            of its runs so). v1 has no notion of T and ignores it.
    """

    parametrization: str = "mup"
    step_mult: float = LF.STEP_MULT_MU

    def __init__(
        self,
        params: nn.Module | Iterable,
        meta_weights: MetaWeights = None,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        roles: dict[str, str] | None = None,
        chunk_size: int = LF.DEFAULT_CHUNK_SIZE,
        total_steps: int | None = None,
        foreach: bool = True,
    ):
        if not (lr >= 0 and weight_decay >= 0):  # also rejects NaN
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if total_steps is not None and not (isinstance(total_steps, int) and total_steps >= 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}")
        self.total_steps = total_steps
        self._parametrization = parametrizations.get(self.parametrization)
        # s_W of every module parameter, frozen ones too (progressive unfreezing adds them
        # later); keyed by the tensor itself so that deepcopy and pickle carry it over.
        self._module_scales: dict[Tensor, float] = {}
        if isinstance(params, nn.Module):
            scales = self._parametrization.update_scales(params, overrides=roles)
            self._module_scales = {p: scales[n] for n, p in params.named_parameters()}
            params = [p for p in params.parameters() if p.requires_grad]
        elif roles is not None:
            raise ValueError("roles= needs the model: pass the nn.Module, not its parameters")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.meta, self.provenance = self._load_meta(meta_weights)
        self.chunk_size = chunk_size
        self.foreach = bool(foreach)
        self._meta_cache: dict[tuple, tuple] = {}

    def _load_meta(self, meta_weights: MetaWeights) -> tuple[dict[str, Tensor], dict]:
        meta, provenance = _resolve_meta(meta_weights, self.parametrization)
        if "theta" not in meta:
            raise ValueError(f"{meta_weights} holds VeLO weights: use mulo.MuVeLO / mulo.VeLO")
        return meta, provenance

    def add_param_group(self, param_group: dict) -> None:
        """Also records each new tensor's s_W: from an explicit ``"role"`` key of the group
        (``input``, ``hidden``, ``output``/``readout``, ``vector``), else from the module the
        optimizer was built with (frozen parameters included), else from the tensor itself
        (vectors: 1; matrices: their mup ``infshape``)."""
        role = param_group.get("role")
        if role is not None:
            role = as_role(role, "the param group")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if role is not None:
                scale = self._parametrization.role_scale(role, p)
            elif p in self._module_scales:
                scale = self._module_scales[p]
            else:
                scale = self._parametrization.tensor_scale(p)
            self.state[p]["scale"] = float(scale)

    _PICKLED = ("meta", "provenance", "total_steps", "chunk_size", "foreach", "_module_scales",
                "_parametrization")  # fmt: skip

    def __getstate__(self) -> dict:
        # torch.optim pickles only defaults/state/param_groups (not the hooks, nor the step
        # wrapper an LR scheduler installs); an LO also needs its meta-weights and settings.
        # The device/dtype cache is rebuilt on the first step.
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._PICKLED}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("foreach", True)  # a copy pickled before foreach existed
        self._meta_cache = {}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load, checked against this model: every saved accumulator must have
        the shape this parameter needs (else one ``ValueError``), and s_W always comes from
        the current model, never from the file (a state saved at another width or under
        another parametrization carries the wrong one)."""
        scales = {p: self.state[p]["scale"] for g in self.param_groups for p in g["params"]}
        saved = state_dict.get("state", {})
        super().load_state_dict(state_dict)
        for i, (p, scale) in enumerate(scales.items()):
            state = self.state[p]
            state["scale"] = scale
            # torch.optim casts state to the param's dtype (a bf16 model's float32 LO state
            # would come back rounded) and shares tensors that need no cast with the source
            # (two optimizers would then step one counter): copy them as they were saved
            for key in (*_STATE_KEYS, "step"):
                value = saved.get(i, {}).get(key)
                if torch.is_tensor(value):
                    dtype = torch.float32 if key == "step" else LF.compute_dtype(p.dtype)
                    state[key] = value.to(device=p.device, dtype=dtype, copy=True)
            if "mv" in state:
                _check_loaded_state(state, p, i)

    def _meta_for(self, p: Tensor) -> LF.Prepared:
        # one entry per device and dtype, valid while ``opt.meta`` holds the same tensors at the
        # same versions: replaced or edited in place, it is prepared again
        key = (p.device, LF.compute_dtype(p.dtype))
        sources = tuple(self.meta.values())
        versions = tuple(v._version for v in sources)
        cached = self._meta_cache.get(key)
        fresh = (
            cached is not None
            and cached[1] == versions
            and len(cached[0]) == len(sources)
            and all(a is b for a, b in zip(cached[0], sources, strict=True))
        )
        if not fresh:
            prepared = LF.prepare(
                {k: v.to(device=key[0], dtype=key[1]).unsqueeze(0) for k, v in self.meta.items()}
            )
            cached = self._meta_cache[key] = (sources, versions, prepared)
        return cached[2]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        tensors = [(group, p) for group in self.param_groups for p in group["params"]]
        together: dict[tuple, list] = {}
        members: dict[tuple, set[int]] = {}
        for index, (group, p) in enumerate(tensors):
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if "mv" not in state:
                lo_state = LF.init_state(p.unsqueeze(0), self._horizon()).to_dict()
                # torch.optim keeps "step" in its own dtype on load_state_dict (others are
                # cast to the param's): the counter must not round in bf16.
                state.update(lo_state, step=lo_state.pop("t"))
            key = self._foreach_key(group, p, state)
            if key is not None and id(p) in members.setdefault(key, set()):
                key = None  # listed twice: its second step must follow the first, not share it
            if key is not None:
                members[key].add(id(p))
            together.setdefault(key or ("alone", index), []).append((index, group, p, state))
        for batch in together.values():
            if len(batch) == 1:
                self._step_one(*batch[0])
                continue
            _, group, _, state = batch[0]
            LF.lo_step_many_(
                self._meta_for(batch[0][2]),
                [self._lo_state(st) for *_, st in batch],
                [p.unsqueeze(0) for _, _, p, _ in batch],
                [p.grad.unsqueeze(0) for _, _, p, _ in batch],
                scale=state["scale"], step_mult=self.step_mult, lr=group["lr"],
                chunk_size=self.chunk_size, weight_decay=group["weight_decay"],
            )  # fmt: skip
        return loss

    def _step_one(self, index: int, group: dict, p: Tensor, state: dict) -> None:
        LF.lo_step_(
            self._meta_for(p),
            self._lo_state(state),
            p.unsqueeze(0),
            p.grad.unsqueeze(0),
            scale=state["scale"],
            step_mult=self.step_mult,
            lr=group["lr"],
            chunk_size=self.chunk_size,
            weight_decay=group["weight_decay"],
            # bf16/fp16 round stochastically, seeded by (step, tensor): a resumed run
            # rounds exactly as the original would have
            rounding_seed=_rounding_seed(p, state["step"], index),
        )

    @staticmethod
    def _lo_state(state: dict) -> LF.LOState:
        # views of the optimizer's state tensors: the step updates them in place
        return LF.LOState.from_dict({**state, "t": state["step"]})

    def _foreach_key(self, group: dict, p: Tensor, state: dict) -> tuple | None:
        """Small full-precision tensors that share everything but their values are stepped in
        one call (``functional.lo_step_many_``); None: this tensor steps alone."""
        small = p.numel() <= FOREACH_MAX_NUMEL and LF.compute_dtype(p.dtype) == p.dtype
        if not (self.foreach and small):
            return None
        return (tuple(p.shape), p.dtype, p.device, state["scale"], float(group["lr"]),
                float(group["weight_decay"]), "horizon" in state)  # fmt: skip

    def _horizon(self) -> float | None:
        if self.total_steps is None or not LF.architecture(self.meta).normalised:
            return None
        return float(self.total_steps)


class MuLO(LearnedOptimizer):
    """μLO: small_fc_lopt with μP update scales (s_W = 1/fan_in for hidden weights)."""

    parametrization = "mup"
    step_mult = LF.STEP_MULT_MU


class SPLO(LearnedOptimizer):
    """SP-LO: small_fc_lopt with s_W = 1 for every tensor."""

    parametrization = "sp"
    step_mult = LF.STEP_MULT_SP


def _resolve_meta(meta_weights: MetaWeights, parametrization: str):
    if meta_weights is None:
        return default_meta_weights(parametrization)
    if isinstance(meta_weights, dict):
        check_meta_params(meta_weights, "meta_weights")
        return {k: v.detach().float().clone() for k, v in meta_weights.items()}, {
            "name": "in-memory"
        }
    return load_meta_weights(meta_weights)


_STATE_KEYS = ("mv", "row", "col", "diag", "horizon")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _rounding_seed(p: Tensor, step: Tensor, index: int) -> int:
    return int(step.item()) * 1_000_003 + index if p.dtype in _LOW_PRECISION else 0


def _check_loaded_state(state: dict, p: Tensor, index: int) -> None:
    expected = LF.init_state(p.unsqueeze(0))
    for key in ("mv", "row", "col", "diag"):
        want, have = getattr(expected, key), state.get(key)
        shape = [None if x is None else tuple(x.shape) for x in (want, have)]
        if shape[0] != shape[1]:
            raise ValueError(
                f"optimizer state does not fit this model: parameter {index} (shape "
                f"{tuple(p.shape)}) needs {key!r} of shape {shape[0]}, the state has {shape[1]}"
            )
