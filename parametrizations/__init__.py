"""μP vs SP for any `nn.Module`: parameter roles, init, readout multiplier, per-tensor scale s_W.

Knows nothing about learned optimizers; `mulo` asks it for roles and scales (docs/math.md §2)::

    import parametrizations as P
    model = P.mlp(784, width=1024, depth=3, out_features=10, parametrization="mup")
    scales = P.get("mup").update_scales(model)   # {"hidden1.weight": 1/1024, ...}
"""

from .base import Parametrization
from .builders import BUILDERS, TransformerLM, build, cnn, mlp, transformer_lm
from .coord_check import coord_check, coord_table, plot_coord_check
from .optim import mu_adam_param_groups
from .readout import Readout
from .roles import ParametrizationError, Role, fan_in, infer_roles
from .schemes import SP, MuP, get

__all__ = [
    "BUILDERS",
    "MuP",
    "Parametrization",
    "ParametrizationError",
    "Readout",
    "Role",
    "SP",
    "TransformerLM",
    "build",
    "cnn",
    "coord_check",
    "coord_table",
    "fan_in",
    "get",
    "infer_roles",
    "mlp",
    "mu_adam_param_groups",
    "plot_coord_check",
    "transformer_lm",
]
