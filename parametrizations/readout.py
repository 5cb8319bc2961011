"""A readout layer whose μP multiplier is a plain float fixed at construction.

mup's `MuReadout` divides by `weight.infshape.width_mult()` at every forward, so it breaks as soon
as the attribute is lost (`torch.func.functional_call`, `copy.deepcopy`, `load_state_dict(assign=
True)`, FSDP2), and it scales only the input, not the bias. `Readout` computes
``(W x + b) * multiplier`` with ``multiplier = output_mult / width`` (width absolute, base width 1),
so it needs no side information. It subclasses `MuReadout` only so that mup recognises it as the
readout (`mup.set_base_shapes` asserts that every infinite-to-finite Linear is one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mup.layer import MuReadout


class Readout(MuReadout):
    """Output layer ``(W x + b) * multiplier``; an SP parametrization sets ``multiplier = 1.0``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        output_mult: float = 1.0,
        width: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, output_mult=float(output_mult))
        self.width = int(in_features if width is None else width)
        if self.width <= 0:
            raise ValueError(f"Readout width must be positive, got {self.width}")
        self.multiplier = float(output_mult) / self.width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.multiplier

    def _rescale_parameters(self) -> None:
        """No-op: the multiplier is absolute, so `mup.set_base_shapes` must not rescale W or b."""

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, output_mult={self.output_mult}, width={self.width}, "
            f"multiplier={self.multiplier:g}"
        )
