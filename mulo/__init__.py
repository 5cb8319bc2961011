"""mulo: μP-aware learned optimizers for PyTorch.

``mulo.MuLO(model)`` is μLO (roles and 1/fan_in scales inferred from the model);
``mulo.SPLO(model)`` is SP-LO (the same network without μP scales).
"""

from mulo import functional
from mulo.meta_weights import (
    MetaWeightsError,
    available,
    load_meta_weights,
    save_meta_weights,
)
from mulo.optim import SPLO, LearnedOptimizer, MuLO

__all__ = [
    "MuLO",
    "SPLO",
    "LearnedOptimizer",
    "MetaWeightsError",
    "available",
    "functional",
    "load_meta_weights",
    "save_meta_weights",
]
__version__ = "0.1.0"
