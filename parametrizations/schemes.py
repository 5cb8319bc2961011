"""The two parametrizations, μP and SP, and lookup by name."""

from __future__ import annotations

import math
import unicodedata

import torch

from .base import Parametrization
from .roles import ParametrizationError, Role, fan_in


def _check_width(width: int) -> None:
    if width <= 0:
        raise ValueError(f"width must be a positive integer, got {width}")


def _check_head_dim(head_dim: int) -> None:
    if head_dim <= 0:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim}")


class MuP(Parametrization):
    """μP with absolute fan-in (base width 1), as in μLO: s_W = 1/fan_in for hidden matrices."""

    name = "mup"
    zero_output = True

    def role_scale(self, role: Role | None, param: torch.Tensor) -> float:
        # an empty matrix (fan_in 0) is never stepped: any scale will do
        return 1.0 / fan_in(param) if role is Role.HIDDEN and fan_in(param) > 0 else 1.0

    def tensor_scale(self, param: torch.Tensor) -> float:
        infshape = getattr(param, "infshape", None)
        if param.dim() < 2:  # a vector is never a hidden matrix: s_W = 1, infshape or not
            return 1.0
        if infshape is None:
            raise ParametrizationError(
                f"a tensor of shape {tuple(param.shape)} has no `infshape`, so its μP role is "
                "unknown (a shape cannot tell an input matrix from a hidden one); pass the "
                "module instead (e.g. MuLO(model)), call mup.set_base_shapes(model, base) "
                "before passing model.parameters(), or use SPLO for a model not built under μP"
            )
        return 1.0 / fan_in(param) if infshape.ninf() >= 2 and fan_in(param) > 0 else 1.0

    def output_multiplier(self, width: int, output_mult: float = 1.0) -> float:
        _check_width(width)
        return float(output_mult) / width

    def attention_scale(self, head_dim: int) -> float:
        """1/d_head (not 1/sqrt(d_head)): q and k become correlated during training, so their
        dot product grows like d_head, not sqrt(d_head) (Tensor Programs V, §4)."""
        _check_head_dim(head_dim)
        return 1.0 / head_dim


class SP(Parametrization):
    """Standard parametrization: 1/sqrt(fan_in) init, no multipliers, s_W = 1 for every tensor."""

    name = "sp"
    needs_roles = False

    def role_scale(self, role: Role | None, param: torch.Tensor) -> float:
        return 1.0

    def tensor_scale(self, param: torch.Tensor) -> float:
        return 1.0

    def output_multiplier(self, width: int, output_mult: float = 1.0) -> float:
        _check_width(width)
        return 1.0

    def attention_scale(self, head_dim: int) -> float:
        _check_head_dim(head_dim)
        return 1.0 / math.sqrt(head_dim)


_REGISTRY: dict[str, type[Parametrization]] = {"mup": MuP, "mu": MuP, "μp": MuP, "sp": SP}


def get(name: str | Parametrization) -> Parametrization:
    """Parametrization by name ("mup", aliases "mu"/"μp", or "sp"); instances pass through."""
    if isinstance(name, Parametrization):
        return name
    key = unicodedata.normalize("NFKC", str(name)).strip().lower()  # micro sign µ -> μ
    cls = _REGISTRY.get(key)
    if cls is None:
        raise ParametrizationError(
            f"unknown parametrization {name!r}; valid names: {', '.join(_REGISTRY)}"
        )
    return cls()
