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
=========  ====================================================================  ==========

For mulo/splo ``lr`` is the multiplier on the meta-trained step, so 1.0 is the step the
optimizer was meta-trained with, and a schedule or a batch-size rule scales that multiplier.

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
:class:`CombinedOptimizer` (stepping Muon and AdamW as one ``Optimizer``) and the small
piecewise lr-factor function behind the schedules.
"""

from __future__ import annotations

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
from mulo.optim import SPLO, MuLO

OPTIMIZER_NAMES = ("mulo", "splo", "sgd", "adamw", "muadam", "muon", "prodigy")
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
) -> torch.optim.Optimizer:
    """One of :data:`OPTIMIZER_NAMES` over ``model``'s trainable parameters.

    Args:
        name: which optimizer (see the module docstring's table).
        model: the optimizee; roles (μAdam, Muon, μLO) are inferred from it.
        lr: peak learning rate (the multiplier on the learned step for mulo/splo); None is
            :data:`DEFAULT_LR` for ``name``. For muon it is Muon's lr; its AdamW part runs at
            ``lr * MUON_ADAMW_LR_RATIO``. For muadam see the module docstring.
        weight_decay: decoupled (``p *= 1 - lr * wd``) for every optimizer except sgd, whose
            ``torch.optim.SGD`` adds ``wd * p`` to the gradient.
        momentum: sgd's Nesterov momentum and Muon's momentum; None is
            :data:`DEFAULT_MOMENTUM` (0.9 for sgd, 0.95 for muon). Ignored by the others.
        betas: Adam betas for adamw, muadam, prodigy and muon's AdamW part.
        parametrization: "mup" or "sp": the s_W of muadam and the roles muon splits by. sgd,
            adamw and prodigy do not use it; mulo is always μP and splo always SP.
        meta_weights: mulo/splo only: a shipped name, a ``.pt`` path or a dict (None: default).
        batch_size, base_batch_size, lr_scaling: ``lr`` is tuned at ``base_batch_size``; the
            rule ("none", "linear", "sqrt"; see :func:`scaled_lr`) moves it to ``batch_size``.
            It applies to every optimizer (for mulo/splo it scales the step multiplier).
        base_width: muadam only: hidden matrices get ``lr * base_width / fan_in``. Default 1
            (docs/math.md §2's absolute fan-in).
        roles: per-name role overrides (``{"pos": "input"}``) for models whose roles cannot be
            inferred; used by mulo, splo, muadam and muon.
        total_steps: mulo/splo only: the run length for LOs that read training progress
            (small_fc_lopt_v2); None: not told. Ignored by the others.
    """
    name = _one_of("optimizer", name, OPTIMIZER_NAMES)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _trainable(model)
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

    if name in ("mulo", "splo"):
        cls = MuLO if name == "mulo" else SPLO
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
    return Prodigy(params, lr=lr, betas=betas, weight_decay=weight_decay)


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
