"""In-place init rewrite from a role table (docs/math.md §2).

Absolute fan-in (base width 1) everywhere, so the result does not depend on a base model and must
not be rescaled again: call ``mup.set_base_shapes(..., rescale_params=False)`` on models built here,
and never re-run ``torch.nn.init`` afterwards (both silently undo μP).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .readout import Readout
from .roles import (
    EMBEDDINGS,
    KNOWN_LAYERS,
    NORMS,
    Role,
    fan_in,
    is_readout,
    owners,
    tied_readouts,
)


def _weight_std(module: nn.Module, param: torch.Tensor) -> float:
    # An embedding consumes a one-hot vector: its fan-in is 1, so its rows get std 1.
    return 1.0 if isinstance(module, EMBEDDINGS) else 1.0 / math.sqrt(fan_in(param))


def _is_bias(attr: str) -> bool:
    return attr == "bias" or attr.endswith("_bias")


@torch.no_grad()
def init_by_role_(
    model: nn.Module,
    roles: dict[str, Role],
    *,
    zero_output: bool,
    bias_std: float = 0.0,
    readout_multiplier: Callable[[int, float], float] | None = None,
) -> nn.Module:
    """Rewrite parameters in place.

    - norm layers: gains 1, offsets 0 (detected by module type, so they never count as biases);
    - input/hidden weights N(0, 1/fan_in); output weights zeros if `zero_output`, else the same;
    - biases N(0, bias_std²) (zeros when bias_std is 0), except that `zero_output` zeros the
      readout bias too, as mup's ``MuReadout(readout_zero_init=True)`` does: its contribution is
      scaled by output_mult/width, so a random one would only add a width-dependent offset;
    - other vector-like tensors, input-like or unclassified (absent from `roles`) tensors of
      unknown module types (e.g. a position embedding) keep the module's own init: their fan-in
      is not knowable from the shape.

    - a matrix tied to a plain ``nn.Linear`` readout keeps the model's own init, with a
      warning: as an embedding (std 1) without the readout's 1/width multiplier its logits
      would grow like sqrt(width) (a nanoGPT model's initial loss went from 4.2 to 58).

    `readout_multiplier(width, output_mult) -> float` resets each `Readout`'s cached multiplier.
    """
    unscaled = tied_readouts(model)
    for name, (module, attr) in owners(model).items():
        param, role = getattr(module, attr), roles.get(name)  # None: unclassified, left as is
        if name in unscaled:
            warnings.warn(
                f"'{name}' is tied to the readout '{unscaled[name]}', a plain nn.Linear with no "
                "μP output multiplier: left at the model's own init; make the readout a "
                "P.Readout (or mup.MuSharedReadout) for μP's 1/width logits",
                stacklevel=3,
            )
        elif isinstance(module, NORMS):
            param.fill_(1.0 if attr == "weight" else 0.0)
        elif role is Role.VECTOR:
            if _is_bias(attr):
                zero = bias_std == 0 or (zero_output and is_readout(module))
                param.zero_() if zero else param.normal_(0.0, bias_std)
        elif role is Role.OUTPUT and zero_output:
            param.zero_()
        elif role is Role.HIDDEN or role is Role.OUTPUT or isinstance(module, KNOWN_LAYERS):
            param.normal_(0.0, _weight_std(module, param))
    if readout_multiplier is not None:
        for module in model.modules():
            if isinstance(module, Readout):
                module.multiplier = float(readout_multiplier(module.width, module.output_mult))
    return model
