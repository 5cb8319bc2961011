"""The one interface every parametrization implements.

A parametrization turns the role table (`roles.py`) into three things: the init rewrite, the
readout multiplier, and the per-tensor learned-optimizer update scale s_W (docs/math.md §2).
Subclasses state only their policy; the shared machinery lives here so μP and SP cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .init import init_by_role_
from .roles import Role, infer_roles

Overrides = Mapping[str, Role | str] | None


class Parametrization:
    """Roles, init, output multiplier and s_W for any `nn.Module`."""

    name: str = ""
    #: μP zero-initialises the readout weight; SP gives it N(0, 1/fan_in) like every matrix.
    zero_output: bool = False
    #: Whether init and s_W depend on roles; if not, unclassifiable parameters are no error.
    needs_roles: bool = True

    def roles(self, model: nn.Module, overrides: Overrides = None) -> dict[str, Role]:
        """Role of each parameter, keyed like `model.named_parameters()`; overrides by name."""
        return infer_roles(model, overrides)

    def update_scales(self, model: nn.Module, overrides: Overrides = None) -> dict[str, float]:
        """s_W per parameter name, as plain floats so they survive any state round trip."""
        roles = infer_roles(model, overrides, strict=self.needs_roles)
        return {n: self.role_scale(roles.get(n), p) for n, p in model.named_parameters()}

    def role_scale(self, role: Role | None, param: torch.Tensor) -> float:
        """s_W for one tensor of a given role."""
        raise NotImplementedError

    def tensor_scale(self, param: torch.Tensor) -> float:
        """s_W for a bare tensor (no module to infer from), e.g. from `model.parameters()`."""
        raise NotImplementedError

    def output_multiplier(self, width: int, output_mult: float = 1.0) -> float:
        """The readout's forward multiplier for a model of this (absolute) width."""
        raise NotImplementedError

    def attention_scale(self, head_dim: int) -> float:
        """Factor on the attention logits q·k for heads of size `head_dim`."""
        raise NotImplementedError

    def init_(
        self, model: nn.Module, overrides: Overrides = None, bias_std: float = 0.0
    ) -> nn.Module:
        """Rewrite the init in place per the role table and reset `Readout` multipliers."""
        if bias_std < 0:
            raise ValueError(f"bias_std must be >= 0, got {bias_std}")
        return init_by_role_(
            model,
            infer_roles(model, overrides, strict=self.needs_roles),
            zero_output=self.zero_output,
            bias_std=bias_std,
            readout_multiplier=self.output_multiplier,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
