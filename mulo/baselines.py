"""Hand-designed baselines and learning-rate schedules behind one interface (docs/math.md §4).

``build_optimizer(name, model, ...)`` returns a ``torch.optim.Optimizer`` for any of
:data:`OPTIMIZER_NAMES`; ``build_schedule(optimizer, name, steps=...)`` returns a
``torch.optim.lr_scheduler.LRScheduler`` for any of :data:`SCHEDULE_NAMES`.

=========  ====================================================================  ==========
name       what it is                                                            default lr
=========  ====================================================================  ==========
mulo       ``mulo.MuLO``: the learned optimizer with μP scales s_W               1.0
splo       ``mulo.SPLO``: the learned optimizer with s_W = 1                     1.0
sgd        ``torch.optim.SGD`` with Nesterov momentum (L2 decay, coupled)        0.1
adamw      ``torch.optim.AdamW``, one lr for every tensor                        1e-3
muadam     ``torch.optim.AdamW`` with per-tensor lr ``lr * s_W`` (μAdam)         1e-3
muon       ``torch.optim.Muon`` on hidden matrices + ``AdamW`` on the rest       0.02
prodigy    ``prodigyopt.Prodigy`` (lr multiplies its estimated step size)        1.0
agd        :class:`AGD`, automatic gradient descent (re-initialises the model)   1.0
naggs      :class:`NAGGS`, NAG-GS (lr is the discretisation step α)              0.1
graft      :class:`Graft`: ``magnitude``'s step size, ``direction``'s direction  M's (1e-3)
muvelo     ``mulo.MuVeLO``: VeLO with μP scales (needs ``total_steps``)         1.0
velo       ``mulo.VeLO``: VeLO, s_W = 1 (needs ``total_steps``)                  1.0
=========  ====================================================================  ==========

AGD multiplies its automatic step by ``lr`` (1.0: the paper's, nothing to tune). NAG-GS's
``lr`` is the paper's α, which enters its update non-linearly (not a step multiplier). graft's
``lr`` and schedule are those of its magnitude optimizer M (default adamw, hence 1e-3).

For mulo/splo/muvelo/velo ``lr`` is the multiplier on the meta-trained step, so 1.0 is the step
the optimizer was meta-trained with, and a schedule or a batch-size rule scales that multiplier.

μAdam and the meaning of its lr: the per-tensor scale is the one μLO uses (docs/math.md §2, absolute
fan-in, base width 1): hidden matrices get ``lr * base_width / fan_in``, every other tensor
``lr``. With the default ``base_width=1``, ``lr`` is "the Adam lr of a hidden matrix at width 1",
so good values are far larger than AdamW's (about ``adamw_lr * width`` at the width where the two
coincide); an lr grid for μAdam must span that range. Pass ``base_width=W`` to make ``lr`` the
Adam lr of a width-W network instead (μAdam equals AdamW at width W). Weight decay follows
``mup.MuAdam``: a hidden group's decay is multiplied by ``fan_in / base_width`` so the per-step
decay ``lr_group * wd_group`` is the same for every tensor and every width.

Under SP (``parametrization="sp"``) every s_W is 1, so μAdam is AdamW.

Libraries used: torch (SGD, AdamW, Muon, LambdaLR), ``prodigyopt``, and ``parametrizations``
(roles and s_W). Written by hand here, because no maintained library provides them:
:class:`CombinedOptimizer` (stepping Muon and AdamW as one ``Optimizer``), the small
piecewise lr-factor function behind the schedules, and three optimizers from papers whose
authors' code is not a maintained package that takes our models: :class:`AGD` (the authors'
version rejects biases and takes no roles), :class:`NAGGS` (installable only from its
repository, and its PyTorch class never advances γ; see the class) and :class:`Graft`.
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from prodigyopt import Prodigy
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

import parametrizations as P
from mulo.optim import SPLO, MuLO, closure_loss
from mulo.velo_optim import MuVeLO
from mulo.velo_optim import VeLOOptimizer as VeLO

OPTIMIZER_NAMES = (
    "mulo", "splo", "sgd", "adamw", "muadam", "muon", "prodigy", "agd", "naggs", "graft",
    "muvelo", "velo",
)  # fmt: skip
SCHEDULE_NAMES = ("constant", "cosine", "wsd")
LR_SCALING_RULES = ("none", "linear", "sqrt")

#: lr used when ``build_optimizer(..., lr=None)``.
DEFAULT_LR = {
    "mulo": 1.0,
    "splo": 1.0,
    "sgd": 0.1,
    "adamw": 1e-3,
    "muadam": 1e-3,
    "muon": 0.02,
    "prodigy": 1.0,
    "agd": 1.0,  # a multiplier on AGD's automatic step; 1.0 is the paper's (no tuning)
    "naggs": 0.1,
    "muvelo": 1.0,
    "velo": 1.0,
    # graft's lr is its magnitude optimizer's, so its default is the magnitude's default; this
    # entry is that of the default magnitude (adamw)
    "graft": 1e-3,
}
#: momentum used when ``build_optimizer(..., momentum=None)``; the optimizers not listed
#: have no momentum hyperparameter of that name (Adam-type ones use ``betas``).
DEFAULT_MOMENTUM = {"sgd": 0.9, "muon": 0.95}
#: Muon's AdamW part runs at ``lr * MUON_ADAMW_LR_RATIO``: 1e-3 beside Muon's default 0.02, and
#: scaled along with it when ``lr`` (or a batch-size rule, or a schedule) changes Muon's lr.
MUON_ADAMW_LR_RATIO = 1e-3 / 0.02


def _one_of(kind: str, value: Any, names: Iterable[str]) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in names:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(names)}")
    return key


def _number(name: str, value: Any, *, strict: bool) -> float:
    """A finite float that is > 0 (strict) or >= 0; NaN and non-numbers are rejected."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not ((x > 0 if strict else x >= 0) and math.isfinite(x)):
        bound = "a positive finite number" if strict else "a finite number >= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return x


def _positive(name: str, value: Any) -> float:
    return _number(name, value, strict=True)


def _non_negative(name: str, value: Any) -> float:
    return _number(name, value, strict=False)


def _integer(name: str, value: Any, minimum: int) -> int:
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return operator.index(value)


def scaled_lr(
    lr: float, batch_size: int | None, base_batch_size: int | None, rule: str = "none"
) -> float:
    """``lr`` tuned at ``base_batch_size``, moved to ``batch_size`` by a scaling rule.

    ``"none"``: ``lr`` (batch sizes are not needed); ``"linear"``: ``lr * batch / base`` (the
    usual rule for SGD); ``"sqrt"``: ``lr * sqrt(batch / base)`` (the usual rule for Adam-type
    optimizers). ``"linear"`` and ``"sqrt"`` need both batch sizes as positive integers.
    """
    rule = _one_of("lr scaling rule", rule, LR_SCALING_RULES)
    lr = _positive("lr", lr)
    if rule == "none":
        return lr
    if batch_size is None or base_batch_size is None:
        raise ValueError(
            f"lr scaling rule {rule!r} needs both batch_size and base_batch_size, got "
            f"{batch_size!r} and {base_batch_size!r}"
        )
    ratio = _integer("batch_size", batch_size, 1) / _integer("base_batch_size", base_batch_size, 1)
    return lr * ratio if rule == "linear" else lr * math.sqrt(ratio)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped, zeroed and saved as one.

    Written by hand: neither torch nor a maintained library we depend on provides one (torch's
    ``Muon`` docs step a Muon and an AdamW side by side). It is a real ``torch.optim.Optimizer``,
    so ``LambdaLR`` and every other LR scheduler accept it; ``param_groups`` is the concatenation
    of the inner optimizers' groups (the same dict objects, so a scheduler writing ``group["lr"]``
    drives the inner optimizers), ``state`` a read-only merged view of their states.

    Add a group with ``add_param_group(group, index=i)`` (which inner optimizer gets it), never
    on ``self.optimizers[i]`` directly, so ``param_groups`` stays in step.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise ValueError(
                    f"CombinedOptimizer combines torch.optim.Optimizer instances, got "
                    f"{type(opt).__name__}"
                )
        self.optimizers = optimizers
        self._building = True
        # Optimizer.__init__ registers the inner groups (same dicts), sets up the hooks and
        # rejects a parameter that two inner optimizers share.
        super().__init__([g for opt in optimizers for g in opt.param_groups], defaults={})
        self._building = False

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    @state.setter
    def state(self, value) -> None:
        # Optimizer.__init__ assigns an empty state; the real state lives in the inner optimizers.
        pass

    def _sync_groups(self) -> None:
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def add_param_group(self, param_group: dict, index: int | None = None) -> None:
        if self._building:
            super().add_param_group(param_group)
            return
        if index is None or not 0 <= index < len(self.optimizers):
            raise ValueError(
                f"CombinedOptimizer.add_param_group needs index= in [0, {len(self.optimizers)}) "
                "naming the inner optimizer that gets the group"
            )
        ours = {p for g in self.param_groups for p in g["params"]}
        new = param_group["params"]
        new = [new] if isinstance(new, torch.Tensor) else list(new)
        if any(p in ours for p in new):
            raise ValueError("some parameters appear in more than one parameter group")
        self.optimizers[index].add_param_group(param_group)
        self._sync_groups()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers") if isinstance(state_dict, Mapping) else None
        if not isinstance(inner, list | tuple) or len(inner) != len(self.optimizers):
            got = len(inner) if isinstance(inner, list | tuple) else "no"
            raise ValueError(
                f"state_dict is not from a CombinedOptimizer of {len(self.optimizers)} "
                f"optimizers (found {got} inner states)"
            )
        for opt, sd in zip(self.optimizers, inner, strict=True):
            opt.load_state_dict(sd)
        self._sync_groups()  # Optimizer.load_state_dict replaces the group dicts

    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "optimizers": self.optimizers, "_building": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._sync_groups()

    def __repr__(self) -> str:
        inner = "\n".join("  " + repr(opt).replace("\n", "\n  ") for opt in self.optimizers)
        return f"{type(self).__name__}(\n{inner}\n)"


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no parameters with requires_grad=True")
    return named


def _mu_adam_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    parametrization: str,
    roles: Mapping[str, str] | None,
    base_width: float,
) -> list[dict]:
    """μAdam groups: ``lr * s_W`` (base width rescaled) and mup.MuAdam's weight-decay rule."""
    groups = P.mu_adam_param_groups(model, lr, parametrization, overrides=roles)
    param = P.get(parametrization)
    if base_width != 1 and isinstance(param, P.MuP):
        role_of = param.roles(model, roles)
        hidden = {id(p) for n, p in model.named_parameters() if role_of.get(n) is P.Role.HIDDEN}
        regrouped: dict[float, dict] = {}
        for group in groups:
            for p in group["params"]:
                g_lr = group["lr"] * base_width if id(p) in hidden else group["lr"]
                regrouped.setdefault(g_lr, {"params": [], "lr": g_lr})["params"].append(p)
        groups = list(regrouped.values())
    for group in groups:  # keep lr_group * wd_group = lr * wd, as mup.MuAdam does
        group["weight_decay"] = weight_decay * lr / group["lr"]
    return groups


def _build_muon(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float,
    betas: tuple[float, float],
    parametrization: str,
    roles: Mapping[str, str] | None,
) -> CombinedOptimizer:
    """torch.optim.Muon on the hidden matrices, AdamW on every other trainable tensor.

    torch.optim.Muon takes only 2-D matrices, so a hidden weight with more dimensions (a conv
    kernel) goes to AdamW as well.
    """
    role_of = P.get(parametrization).roles(model, roles)
    matrices, rest = [], []
    for name, p in _trainable(model):
        (matrices if role_of.get(name) is P.Role.HIDDEN and p.dim() == 2 else rest).append(p)
    parts: list[torch.optim.Optimizer] = []
    if matrices:
        parts.append(
            torch.optim.Muon(
                matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True
            )
        )
    else:
        warnings.warn(
            f"{type(model).__name__} has no hidden 2-D weight matrix, so 'muon' is AdamW only",
            stacklevel=3,
        )
    if rest:
        parts.append(
            torch.optim.AdamW(
                rest, lr=lr * MUON_ADAMW_LR_RATIO, betas=betas, weight_decay=weight_decay
            )
        )
    return CombinedOptimizer(parts)


# -- AGD ----------------------------------------------------------------------------------------


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors (norms and ratios must not round), else their own."""
    return torch.promote_types(p.dtype, torch.float32)


def _agd_dims(p: torch.Tensor, embedding: bool) -> tuple[int, int]:
    """(d_out, d_in) of a layer: a weight maps ``prod(shape[1:])`` inputs (a conv's fan-in) to
    ``shape[0]`` outputs; an embedding table ``(num_embeddings, dim)`` maps the other way."""
    rows, cols = p.shape[0], math.prod(p.shape[1:])
    return (cols, rows) if embedding else (rows, cols)


def _agd_scale(p: torch.Tensor, embedding: bool) -> float:
    d_out, d_in = _agd_dims(p, embedding)
    return math.sqrt(d_out / d_in)


def agd_layers(
    model: nn.Module, roles: Mapping[str, str] | None = None
) -> tuple[list[tuple[str, nn.Parameter, bool]], list[str]]:
    """The layers AGD trains, ``[(name, weight, is_embedding)]`` in ``named_parameters`` order,
    and the names of the trainable vectors it leaves alone.

    A layer is a trainable parameter whose role (``parametrizations.infer_roles``, with the
    ``roles`` overrides) is input, hidden or output; its ``(d_out, d_in)`` is ``(shape[0],
    prod(shape[1:]))`` (an embedding table's the reverse). Vectors (biases, norm gains) are not
    layers: AGD's derivation is for a bias-free network of matrices. One-line ``ValueError`` for
    a parameter whose role cannot be inferred and for a model without a weight matrix.
    """
    from parametrizations.roles import EMBEDDINGS

    role_of = P.infer_roles(model, roles)
    layers, vectors = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = role_of[name]
        if role is P.Role.VECTOR:
            vectors.append(name)
            continue
        if p.dim() < 2:
            raise ValueError(
                f"agd: '{name}' has role {role} but shape {tuple(p.shape)}; AGD's layers are "
                "weight matrices (give it the role 'vector')"
            )
        module_name, _, attr = name.rpartition(".")
        embedding = isinstance(model.get_submodule(module_name), EMBEDDINGS) and attr == "weight"
        layers.append((name, p, embedding))
    if not layers:
        raise ValueError(
            f"agd: {type(model).__name__} has no trainable weight matrix (a parameter of role "
            "input, hidden or output) for AGD to train"
        )
    return layers, vectors


@torch.no_grad()
def agd_init_(
    model: nn.Module,
    roles: Mapping[str, str] | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """AGD's initialisation, in place: every layer of :func:`agd_layers` becomes a random
    semi-orthogonal matrix (``torch.nn.init.orthogonal_`` of the ``d_out x d_in`` matrix, a conv
    kernel flattened to ``shape[0] x fan_in``) times ``sqrt(d_out / d_in)``, so every layer has
    all singular values ``sqrt(d_out / d_in)``, the assumption AGD's step size is derived under
    (Bernstein et al. 2023, §3). Vectors are left as they are. Drawn on the CPU from
    ``generator`` (None: torch's global RNG), so a seed gives the same init on every device.
    Returns ``model``.
    """
    for _, p, embedding in agd_layers(model, roles)[0]:
        w = torch.empty(p.shape[0], math.prod(p.shape[1:]), dtype=_compute_dtype(p))
        torch.nn.init.orthogonal_(w, generator=generator)
        p.copy_(w.mul_(_agd_scale(p, embedding)).view(p.shape))
    return model


class AGD(torch.optim.Optimizer):
    """Automatic gradient descent (Bernstein, Mingard, Huang, Azizan & Yue 2023, "Automatic
    Gradient Descent: Deep Learning without Hyperparameters", arXiv 2304.05187, Algorithm 1).

    For the L layers W_k (``d_k x d_{k-1}``) of the optimizer, with ``s_k = sqrt(d_k /
    d_{k-1})``, each step computes the gradient summary and the automatic step size

        G = (1/L) Σ_k s_k ‖∇W_k‖_F,        η = log((1 + sqrt(1 + 4G)) / 2),

    and updates every layer by ``W_k <- W_k - lr * (η/L) * s_k * ∇W_k / ‖∇W_k‖_F``. ``lr``
    multiplies η: 1.0 is the paper's step, and there is nothing to tune. The step assumes the
    paper's init (:func:`agd_init_`), which ``build_optimizer("agd", model)`` applies.

    Args:
        params: an ``nn.Module`` (the layers are :func:`agd_layers`: weights of role input,
            hidden or output, in ``named_parameters`` order; its trainable vectors go to a
            group with ``"vector": True``) or an iterable of tensors / param groups (every
            tensor at least 2-D, except in a ``"vector": True`` group; a group with
            ``"embedding": True`` holds embedding tables, whose ``d_in`` is ``shape[0]``).
        lr: the multiplier on η (>= 0).
        roles: per-name role overrides when ``params`` is a module.

    Choices where the paper is silent:

    - vectors (biases, LayerNorm gains) are left untouched, with a warning naming them: AGD is
      derived for bias-free networks (the authors' code raises on a bias). They sit in a
      ``"vector": True`` group, so ``zero_grad`` clears their gradients, but never move and do
      not count in L. Under SP the tasks' biases start at 0, so an SP model trains exactly as
      the bias-free network of the paper; pass a bias-free model to have no vectors at all;
    - a conv kernel is one layer with ``d_{k-1} = fan_in = prod(shape[1:])`` and its whole
      Frobenius norm (the authors' code normalises each kernel position separately);
    - L counts every tensor of the layer groups, whether or not it has a gradient this step; a
      tensor without a gradient, or with a zero one, adds 0 to G and does not move.

    The optimizer keeps no state (AGD has no momentum), so its ``state_dict`` is the groups.
    """

    def __init__(
        self,
        params: nn.Module | Iterable,
        lr: float = 1.0,
        roles: Mapping[str, str] | None = None,
    ):
        if not (isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"agd lr must be a finite number >= 0, got {lr!r}")
        if isinstance(params, nn.Module):
            layers, vectors = agd_layers(params, roles)
            if vectors:
                warnings.warn(
                    f"agd leaves {len(vectors)} vector parameter(s) untouched (biases, norm "
                    f"gains: the paper's AGD has none), e.g. '{vectors[0]}'",
                    stacklevel=2,
                )
            groups = [
                {"params": [p for _, p, e in layers if e == embedding], "embedding": embedding}
                for embedding in (False, True)
            ]
            named = dict(params.named_parameters())
            groups.append({"params": [named[n] for n in vectors], "vector": True})
            params = [g for g in groups if g["params"]]
        elif roles is not None:
            raise ValueError("agd: roles= needs the model: pass the nn.Module, not its parameters")
        super().__init__(params, dict(lr=lr, embedding=False, vector=False))

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's, refusing a tensor that is not a weight matrix outside a ``"vector":
        True`` group (one-line ValueError)."""
        super().add_param_group(param_group)
        if self.param_groups[-1]["vector"]:
            return
        for i, p in enumerate(self.param_groups[-1]["params"]):
            if p.dim() < 2:
                self.param_groups.pop()
                raise ValueError(
                    f"agd trains weight matrices only; tensor {i} of the new param group has "
                    f"shape {tuple(p.shape)} (leave vectors out of AGD's groups)"
                )

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        layer_groups = [g for g in self.param_groups if not g["vector"]]
        depth = sum(len(g["params"]) for g in layer_groups)
        live = []
        for group in layer_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AGD does not support sparse gradients")
                norm = torch.linalg.vector_norm(p.grad, dtype=_compute_dtype(p))
                live.append((group, p, _agd_scale(p, group["embedding"]), norm))
        if not live:
            return loss
        device = live[0][3].device
        summary = sum(scale * norm.to(device) for _, _, scale, norm in live) / depth
        eta = torch.log((1 + torch.sqrt(1 + 4 * summary)) / 2)
        for group, p, scale, norm in live:
            factor = -group["lr"] * scale / depth * eta.to(norm.device) / norm
            factor = torch.where(norm > 0, factor, torch.zeros_like(factor))
            p.add_((p.grad.to(factor.dtype) * factor).to(p.dtype))
        return loss


# -- NAG-GS -------------------------------------------------------------------------------------


class NAGGS(torch.optim.Optimizer):
    """NAG-GS (Leplat, Merkulov, Katrutsa, Bershatsky, Tsymboi & Oseledets, "NAG-GS:
    Semi-Implicit, Accelerated and Robust Stochastic Optimizer", arXiv 2209.14937, Algorithm 1).

    The accelerated (NAG) flow of the paper's §2,

        x' = v - x,        γ v' = μ (x - v) - ∇f(x),        γ' = μ - γ,

    discretised with step α by the Gauss–Seidel splitting (the lower-triangular part implicit),
    one gradient per iteration, taken at the new x:

        x_{k+1} = (x_k + α v_k) / (1 + α)
        γ_{k+1} = (γ_k + α μ) / (1 + α)
        v_{k+1} = (γ_{k+1} v_k + α μ x_{k+1} - α ∇f(x_{k+1})) / (γ_{k+1} + α μ)

    with ``v_0 = x_0``. ``lr`` is α, ``mu`` μ (> 0) and ``gamma`` γ_0 (> 0; γ_k -> μ, and with
    γ_0 = μ, the default, γ stays constant). The parameter holds x, the state v and γ.

    A training loop has the gradient at the current parameters only, so one ``step()`` is the
    end of iteration k and the start of k+1: with the gradient at ``x_{k+1}`` it updates γ and
    v, then moves the parameter to ``x_{k+2}``. As ``v_0 = x_0`` makes ``x_1 = x_0``, the first
    step's gradient is the algorithm's first; none is wasted. Under a schedule, ``x_{k+2}``
    takes the α of step k.

    ``weight_decay`` is coupled (``∇f + wd * x``): NAG-GS run on the L2-regularised loss.

    Equations read from the paper and the authors' code (github.com/skolai/nag-gs: the Optax
    ``scale_by_nag_gs`` and the notebook's Algorithm 1); nothing is copied. Their PyTorch
    ``NAGGS`` computes the new γ but never stores it, so it runs with γ fixed at γ_0 (their
    NAG4); this class advances γ as the algorithm does.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.1,
        mu: float = 1.0,
        gamma: float = 1.0,
        weight_decay: float = 0.0,
    ):
        for name, value, strict in (("lr", lr, False), ("mu", mu, True), ("gamma", gamma, True),
                                    ("weight_decay", weight_decay, False)):  # fmt: skip
            _number(f"naggs {name}", value, strict=strict)
        super().__init__(params, dict(lr=lr, mu=mu, gamma=gamma, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            alpha, mu, wd = group["lr"], group["mu"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NAGGS does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["v"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["gamma"] = float(group["gamma"])
                grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                gamma = (state["gamma"] + alpha * mu) / (1 + alpha)
                norm = gamma + alpha * mu
                v = state["v"].mul_(gamma / norm)
                v.add_(p, alpha=alpha * mu / norm).add_(grad, alpha=-alpha / norm)
                p.add_(v, alpha=alpha).div_(1 + alpha)
                state["gamma"] = gamma
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load, but v is copied: torch shares a saved tensor that needs no cast,
        and two optimizers loaded from one dict would then step one v."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            if torch.is_tensor(state.get("v")):
                state["v"] = state["v"].clone()


# -- learning-rate grafting ---------------------------------------------------------------------


class Graft(torch.optim.Optimizer):
    """Learning-rate grafting M#D (Agarwal, Anil, Hazan, Koren & Zhang 2020, "Disentangling
    Adaptive Gradient Methods from Learning Rates", arXiv 2002.11803, Algorithm 1).

    Two optimizers over the same parameters, each keeping its own state, propose an update
    from the same gradient: Δ_M from ``magnitude``, Δ_D from ``direction``. Per tensor the step
    taken is ``‖Δ_M‖_F * Δ_D / ‖Δ_D‖_F``: D's direction at M's step size (so a schedule or
    tuning of M's lr carries over to D). A tensor with ``‖Δ_D‖ = 0`` (D proposes nothing, e.g.
    AGD on a bias) does not move; with M and D the same optimizer the step is exactly M's.

    How: each step snapshots the parameters and gradients, steps M, reads Δ_M = p - p_before
    and its norms, restores parameters and gradients, steps D, reads Δ_D, and writes the
    grafted step. The two inner optimizers therefore run unmodified (any ``torch.optim``
    optimizer, the learned ones included) and each one's state advances exactly as if it were
    stepped alone at the grafted iterates. The cost is two optimizer steps and two copies of the
    parameters and one of the gradients during a step.

    ``param_groups`` are the magnitude's (the same dicts), so ``lr`` and a schedule drive M's
    step size; D's lr only scales Δ_D, which is normalised away (for the optimizers whose update
    is linear in lr; NAG-GS's α is not, so as a direction it keeps its own lr). ``state`` is a
    read-only view ``{p: {"magnitude": ..., "direction": ...}}``; ``state_dict`` holds both
    inner states. ``add_param_group`` adds the group to M and its tensors to D (D's defaults).
    """

    def __init__(self, magnitude: torch.optim.Optimizer, direction: torch.optim.Optimizer):
        for role, opt in (("magnitude", magnitude), ("direction", direction)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise ValueError(
                    f"Graft's {role} must be a torch.optim.Optimizer, got {type(opt).__name__}"
                )
        if magnitude is direction:
            raise ValueError(
                "Graft needs two optimizer instances (each keeps its own state); for M = D "
                "build the optimizer twice"
            )
        self.magnitude, self.direction = magnitude, direction
        self._building = True
        super().__init__(list(magnitude.param_groups), defaults={})
        self._building = False

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return self.magnitude.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        # Optimizer.__init__ assigns an empty list; the groups live in the magnitude optimizer.
        pass

    @property
    def state(self) -> dict:  # type: ignore[override]
        inner = (("magnitude", self.magnitude), ("direction", self.direction))
        out = {}
        for p in self._params():
            s = {role: opt.state[p] for role, opt in inner if p in opt.state}
            if s:
                out[p] = s
        return out

    @state.setter
    def state(self, value) -> None:
        pass

    def _params(self) -> list[torch.Tensor]:
        """Every tensor of either optimizer, once, the magnitude's first."""
        seen: dict[int, torch.Tensor] = {}
        for opt in (self.magnitude, self.direction):
            for group in opt.param_groups:
                for p in group["params"]:
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def add_param_group(
        self, param_group: dict, index: int | None = None, direction_index: int | None = None
    ) -> None:
        """Adds the group to M and its tensors to D (D's defaults). ``index`` /
        ``direction_index``: which inner optimizer of a combined M / D (``muon``: 0 Muon, 1
        AdamW) gets the group."""
        if self._building:  # Optimizer.__init__ registering the magnitude's own groups
            return
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for opt, group, at in ((self.magnitude, {**param_group, "params": params}, index),
                               (self.direction, {"params": params}, direction_index)):  # fmt: skip
            if at is None:
                opt.add_param_group(group)
            else:
                opt.add_param_group(group, index=at)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        params = self._params()
        before = [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.detach().clone() for p in params]

        self.magnitude.step()
        m_norms = []
        for p, b, g in zip(params, before, grads, strict=True):
            m_norms.append(torch.linalg.vector_norm(p.to(_compute_dtype(p)) - b))
            p.copy_(b)
            if g is not None:  # the direction must see the gradient the magnitude saw
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)

        self.direction.step()
        for p, b, m_norm in zip(params, before, m_norms, strict=True):
            d = p.to(m_norm.dtype) - b
            d_norm = torch.linalg.vector_norm(d)
            factor = torch.where(d_norm > 0, m_norm / d_norm, torch.zeros_like(d_norm))
            grafted = (b.to(d.dtype) + d * factor).to(p.dtype)
            # a factor of exactly 1 keeps D's result as it is (M = D steps exactly as M)
            p.copy_(torch.where(factor == 1, p, grafted))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.magnitude.zero_grad(set_to_none=set_to_none)
        self.direction.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"magnitude": self.magnitude.state_dict(), "direction": self.direction.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not (isinstance(state_dict, Mapping) and {"magnitude", "direction"} <= set(state_dict)):
            raise ValueError(
                "state_dict is not from a Graft optimizer (no 'magnitude' and 'direction' states)"
            )
        self.magnitude.load_state_dict(state_dict["magnitude"])
        self.direction.load_state_dict(state_dict["direction"])

    def __getstate__(self) -> dict[str, Any]:
        return {
            "defaults": self.defaults,
            "magnitude": self.magnitude,
            "direction": self.direction,
            "_building": False,
        }

    def __repr__(self) -> str:
        inner = (("magnitude", self.magnitude), ("direction", self.direction))
        parts = [f"  {role}: " + repr(opt).replace("\n", "\n  ") for role, opt in inner]
        return f"{type(self).__name__}(\n" + "\n".join(parts) + "\n)"


#: build_optimizer arguments that describe the run rather than one optimizer: graft gives them
#: to both of its optimizers (every other argument configures the magnitude only).
_GRAFT_SHARED = ("parametrization", "roles", "batch_size", "total_steps", "seed")
_GRAFT_OWN = ("magnitude", "direction", "magnitude_kwargs", "direction_kwargs")


def _build_graft(model: nn.Module, args: dict[str, Any]) -> Graft:
    """Graft of two :func:`build_optimizer` optimizers; ``args`` are build_optimizer's."""
    allowed = [n for n in OPTIMIZER_NAMES if n != "graft"]
    names = {
        role: _one_of(f"graft {role}", args[role], allowed) for role in ("magnitude", "direction")
    }
    accepted = set(inspect.signature(build_optimizer).parameters) - {"name", "model", *_GRAFT_OWN}
    shared = {k: args[k] for k in _GRAFT_SHARED}
    own = {k: v for k, v in args.items() if k in accepted and k not in _GRAFT_SHARED}
    built = {}
    for role in ("magnitude", "direction"):
        extra = args[f"{role}_kwargs"] or {}
        if not isinstance(extra, Mapping):
            raise ValueError(f"graft {role}_kwargs must be a mapping, got {type(extra).__name__}")
        unknown = sorted(set(extra) - accepted)
        if unknown:
            raise ValueError(
                f"graft {role}_kwargs: unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"choose from: {', '.join(sorted(accepted))}"
            )
        kwargs = {**shared, **(own if role == "magnitude" else {}), **extra}
        built[role] = build_optimizer(names[role], model, **kwargs)
    return Graft(built["magnitude"], built["direction"])


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float | None = None,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    parametrization: str = "mup",
    meta_weights=None,
    batch_size: int | None = None,
    base_batch_size: int | None = None,
    lr_scaling: str = "none",
    base_width: float = 1,
    roles: Mapping[str, str] | None = None,
    total_steps: int | None = None,
    seed: int | None = None,
    mu: float = 1.0,
    gamma: float = 1.0,
    magnitude: str = "adamw",
    direction: str = "mulo",
    magnitude_kwargs: Mapping[str, Any] | None = None,
    direction_kwargs: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """One of :data:`OPTIMIZER_NAMES` over ``model``'s trainable parameters.

    Args:
        name: which optimizer (see the module docstring's table).
        model: the optimizee; roles (μAdam, Muon, μLO) are inferred from it.
        lr: peak learning rate (the multiplier on the learned step for mulo/splo); None is
            :data:`DEFAULT_LR` for ``name``. For muon it is Muon's lr; its AdamW part runs at
            ``lr * MUON_ADAMW_LR_RATIO``. For muadam see the module docstring.
        weight_decay: decoupled (``p *= 1 - lr * wd``) for every optimizer except sgd, whose
            ``torch.optim.SGD`` adds ``wd * p`` to the gradient, and naggs, which does the
            same; agd refuses one (> 0).
        momentum: sgd's Nesterov momentum and Muon's momentum; None is
            :data:`DEFAULT_MOMENTUM` (0.9 for sgd, 0.95 for muon). Ignored by the others.
        betas: Adam betas for adamw, muadam, prodigy and muon's AdamW part.
        parametrization: "mup" or "sp": the s_W of muadam and the roles muon splits by. sgd,
            adamw and prodigy do not use it; mulo is always μP and splo always SP.
        meta_weights: learned optimizers only: a shipped name, a ``.pt`` path or a dict (None:
            default; VeLO has none yet).
        batch_size, base_batch_size, lr_scaling: ``lr`` is tuned at ``base_batch_size``; the
            rule ("none", "linear", "sqrt"; see :func:`scaled_lr`) moves it to ``batch_size``.
            It applies to every optimizer (for mulo/splo it scales the step multiplier).
        base_width: muadam only: hidden matrices get ``lr * base_width / fan_in``. Default 1
            (docs/math.md §2's absolute fan-in).
        roles: per-name role overrides (``{"pos": "input"}``) for models whose roles cannot be
            inferred; used by mulo, splo, muadam and muon.
        total_steps: learned optimizers only: the run length for LOs that read training progress
            (small_fc_lopt_v2); None: not told. Ignored by the others.
        seed: agd only: seeds its re-initialisation (None: torch's global RNG).
        mu, gamma: naggs only: NAG-GS's μ and γ_0 (both > 0; see :class:`NAGGS`).
        magnitude, direction: graft only: the two optimizers (any name here but graft; default
            AdamW's step size in μLO's direction). ``lr``, ``weight_decay``, ``momentum``,
            ``betas``, ``meta_weights``, ``lr_scaling``, ``base_batch_size``, ``base_width``,
            ``mu`` and ``gamma`` configure the magnitude; ``parametrization``, ``roles``,
            ``batch_size``, ``total_steps`` and ``seed`` go to both; the direction otherwise
            runs at its defaults (its lr is normalised away).
        magnitude_kwargs, direction_kwargs: graft only: more build_optimizer arguments for one
            of the two (over those above), e.g. ``direction_kwargs={"meta_weights": "..."}``.

    Building ``"agd"`` re-initialises ``model`` (:func:`agd_init_`, seeded by ``seed``), as the
    paper requires; so does a graft with an agd part. AGD takes no weight decay.
    """
    name = _one_of("optimizer", name, OPTIMIZER_NAMES)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _trainable(model)
    if name == "graft":  # locals(): the arguments as given; each part validates its own
        return _build_graft(model, locals())
    base_lr = DEFAULT_LR[name] if lr is None else _positive("lr", lr)
    lr = scaled_lr(base_lr, batch_size, base_batch_size, lr_scaling)
    weight_decay = _non_negative("weight_decay", weight_decay)
    base_width = _positive("base_width", base_width)
    P.get(parametrization)  # reject an unknown name for every optimizer, not only some
    if momentum is None:
        momentum = DEFAULT_MOMENTUM.get(name, 0.0)
    elif not (isinstance(momentum, int | float) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        b1 = b2 = math.nan
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    betas = (b1, b2)
    mu, gamma = _positive("mu", mu), _positive("gamma", gamma)
    if seed is not None:
        seed = _integer("seed", seed, 0)

    if name in ("mulo", "splo", "muvelo", "velo"):
        cls = {"mulo": MuLO, "splo": SPLO, "muvelo": MuVeLO, "velo": VeLO}[name]
        return cls(
            model, meta_weights=meta_weights, lr=lr, weight_decay=weight_decay, roles=roles,
            total_steps=total_steps,
        )  # fmt: skip
    params = [p for _, p in _trainable(model)]
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "muadam":
        groups = _mu_adam_groups(model, lr, weight_decay, parametrization, roles, base_width)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "muon":
        return _build_muon(model, lr, weight_decay, momentum, betas, parametrization, roles)
    if name == "prodigy":
        return Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "naggs":
        return NAGGS(params, lr=lr, mu=mu, gamma=gamma, weight_decay=weight_decay)
    if weight_decay:
        raise ValueError("agd has no weight decay (the paper's update has none); use 0")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    agd_init_(model, roles, generator)
    return AGD(model, lr=lr, roles=roles)


class LRFactor:
    """The schedule's lr multiplier at step ``t`` (0-based: the lr the (t+1)-th update uses).

    Written by hand as a small pure function for ``LambdaLR``, not as a chain of torch's
    ``LinearLR``/``CosineAnnealingLR``: ``CosineAnnealingLR``'s floor ``eta_min`` is one absolute
    lr for all groups, while μAdam and Muon have groups at different lrs that must each decay to
    ``final_lr_frac`` of their own peak. A callable object (not a lambda) so the scheduler's
    ``state_dict`` saves it.

    - warmup ``W``: ``(t + 1) / W`` for ``t < W`` (no zero-lr step; the peak at ``t = W - 1``);
    - constant: 1 after warmup;
    - cosine: the k-th step after warmup (k = 1..L, L = steps - W) has progress ``p = k / L`` and
      factor ``f + (1 - f) * (1 + cos(pi * p)) / 2``, so the last step runs at ``f``;
    - wsd: 1 until the last ``D = round(cooldown * steps)`` steps, whose k-th (k = 1..D) has
      factor ``1 - (1 - f) * k / D``, so the last step runs at ``f``;
    - past the last step the factor stays at its last value.
    """

    def __init__(self, kind: str, steps: int, warmup: int, decay_steps: int, final: float):
        self.kind, self.steps, self.warmup = kind, steps, warmup
        self.decay_steps, self.final = decay_steps, final

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        start = self.steps - self.decay_steps
        if self.kind == "constant" or self.decay_steps == 0 or t < start:
            return 1.0
        p = min(t - start + 1, self.decay_steps) / self.decay_steps
        if self.kind == "cosine":
            return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * p))
        return 1 - (1 - self.final) * p

    def __repr__(self) -> str:
        return (
            f"LRFactor({self.kind!r}, steps={self.steps}, warmup={self.warmup}, "
            f"decay_steps={self.decay_steps}, final={self.final})"
        )


def build_schedule(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    steps: int,
    warmup: int = 0,
    cooldown: float = 0.2,
    final_lr_frac: float = 0.0,
) -> LRScheduler:
    """A ``LambdaLR`` over every param group; call ``.step()`` after each ``optimizer.step()``.

    Args:
        name: "constant", "cosine" (linear warmup, then cosine to ``final_lr_frac``) or "wsd"
            (warmup-stable-decay: warmup, constant, then linear decay to ``final_lr_frac``).
        steps: the run's number of optimizer steps.
        warmup: linear-warmup steps, in ``[0, steps)``.
        cooldown: wsd only: the fraction of ``steps`` (rounded) spent decaying, in [0, 1]; the
            decay may not overlap the warmup.
        final_lr_frac: cosine/wsd: the last step's lr as a fraction of each group's peak lr.

    The factor per step is :class:`LRFactor`. Each group's peak is its lr when the scheduler is
    built, so μAdam's and Muon's per-group lrs keep their ratios throughout.
    """
    name = _one_of("schedule", name, SCHEDULE_NAMES)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    steps = _integer("steps", steps, 1)
    warmup = _integer("warmup", warmup, 0)
    if warmup >= steps:
        raise ValueError(f"warmup must be < steps, got warmup={warmup} and steps={steps}")
    cooldown = _non_negative("cooldown", cooldown)
    if cooldown > 1:
        raise ValueError(f"cooldown must be a fraction in [0, 1], got {cooldown!r}")
    final = _non_negative("final_lr_frac", final_lr_frac)
    if final > 1:
        raise ValueError(f"final_lr_frac must be in [0, 1], got {final_lr_frac!r}")
    decay_steps = 0
    if name == "cosine":
        decay_steps = steps - warmup
    elif name == "wsd":
        decay_steps = round(cooldown * steps)
        if warmup + decay_steps > steps:
            raise ValueError(
                f"wsd warmup ({warmup}) and cooldown ({decay_steps} = {cooldown} * {steps} "
                f"steps) overlap; lower one of them"
            )
    return LambdaLR(optimizer, LRFactor(name, steps, warmup, decay_steps, final))
