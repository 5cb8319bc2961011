"""Hand-designed baselines under the same per-tensor scale s_W as the learned optimizer."""

from __future__ import annotations

from torch import nn

from .base import Overrides, Parametrization
from .schemes import get


def mu_adam_param_groups(
    model: nn.Module,
    lr: float,
    parametrization: str | Parametrization = "mup",
    overrides: Overrides = None,
) -> list[dict]:
    """Adam param groups with ``lr * s_W`` per tensor (μAdam with absolute fan-in).

    Under μP this divides the hidden-matrix learning rate by fan_in, the same s_W the μLO update
    uses, so μAdam and μLO are compared on equal footing; under SP it is one group at `lr`.
    One group per distinct scale keeps the optimizer's group count independent of depth.
    """
    scales = get(parametrization).update_scales(model, overrides)
    groups: dict[float, dict] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            s = scales[name]
            groups.setdefault(s, {"params": [], "lr": lr * s})["params"].append(param)
    return list(groups.values())
