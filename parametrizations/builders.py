"""Model families buildable at any width/depth under any parametrization.

Every builder constructs its modules with a `Readout` as the output layer and then hands the model
to the parametrization's `init_` exactly once (re-running `torch.nn.init` afterwards would undo μP).
Register new families in `BUILDERS` so configs can name them.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from .base import Parametrization
from .readout import Readout
from .schemes import MuP, get


def _positive(**sizes: int) -> None:
    for key, value in sizes.items():
        try:
            ok = operator.index(value) > 0
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def finish(
    model: nn.Module, parametrization: str | Parametrization, bias_std: float | None
) -> nn.Module:
    """Apply the parametrization's init; biases default to N(0, 1) under μP (μLO tasks), else 0."""
    param = get(parametrization)
    if bias_std is None:
        bias_std = 1.0 if isinstance(param, MuP) else 0.0
    return param.init_(model, bias_std=bias_std)


def mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    parametrization: str | Parametrization = "mup",
    bias: bool = True,
    output_mult: float = 1.0,
    bias_std: float | None = None,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """MLP with `depth` hidden layers: input Linear, depth-1 hidden Linears, Readout.

    Modules are named ``input, act1, hidden1, act2, ..., readout``: parameter names say the role.
    """
    _positive(in_features=in_features, width=width, depth=depth, out_features=out_features)
    layers: list[tuple[str, nn.Module]] = [("input", nn.Linear(in_features, width, bias=bias))]
    layers.append(("act1", activation()))
    for i in range(1, depth):
        layers.append((f"hidden{i}", nn.Linear(width, width, bias=bias)))
        layers.append((f"act{i + 1}", activation()))
    layers.append(("readout", Readout(width, out_features, bias=bias, output_mult=output_mult)))
    return finish(nn.Sequential(OrderedDict(layers)), parametrization, bias_std)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp}


def build(family: str, **kwargs) -> nn.Module:
    """Build a registered model family by name, e.g. ``build("mlp", in_features=..., ...)``."""
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(BUILDERS)}")
    return BUILDERS[family](**kwargs)
