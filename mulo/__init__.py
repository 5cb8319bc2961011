"""mulo: μP-aware learned optimizers for PyTorch.

``mulo.MuLO(model)`` is μLO (roles and 1/fan_in scales inferred from the model);
``mulo.SPLO(model)`` is SP-LO (the same network without μP scales).
``mulo.MuVeLO(model, total_steps=T)`` / ``mulo.VeLO(...)``: the VeLO architecture, μP / SP.
"""

from mulo import functional
from mulo.meta_weights import (
    MetaWeightsError,
    available,
    load_meta_weights,
    save_meta_weights,
)
from mulo.optim import SPLO, LearnedOptimizer, MuLO
from mulo.velo_optim import MuVeLO
from mulo.velo_optim import VeLOOptimizer as VeLO

__all__ = [
    "MuLO",
    "MuVeLO",
    "VeLO",
    "SPLO",
    "LearnedOptimizer",
    "MetaWeightsError",
    "available",
    "functional",
    "load_meta_weights",
    "save_meta_weights",
]
__version__ = "0.1.0"
