"""Meta-training of the learned optimizer: PES / ES estimators, the outer loop, checkpoints,
and torch.distributed scaling (docs/math.md §3).

    from mulo.meta import MetaConfig, MetaTrainer, run_meta_training
    trainer = MetaTrainer(MetaConfig(kind="mu", widths=[32], outer_steps=500))
    run_meta_training(trainer, "meta.ckpt", log=print)   # resumes if meta.ckpt exists
"""

from mulo.meta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mulo.meta.distributed import init_distributed, pair_range
from mulo.meta.estimators import (
    NUM_META,
    InnerProblem,
    InnerTask,
    MLPTask,
    QuadraticTask,
    antithetic,
    clip_meta_loss,
    flatten_meta,
    init_particles,
    num_meta,
    rescaled,
    sample_lengths,
    unflatten_meta,
    unroll_,
)
from mulo.meta.inner_tasks import ModulePopulation, ModuleTask
from mulo.meta.outer import MetaConfig, MetaTrainer, WarmupCosine, run_meta_training

__all__ = [
    "NUM_META",
    "CheckpointError",
    "InnerProblem",
    "InnerTask",
    "MLPTask",
    "MetaConfig",
    "MetaTrainer",
    "ModulePopulation",
    "ModuleTask",
    "QuadraticTask",
    "WarmupCosine",
    "antithetic",
    "clip_meta_loss",
    "flatten_meta",
    "init_distributed",
    "init_particles",
    "load_checkpoint",
    "num_meta",
    "pair_range",
    "rescaled",
    "run_meta_training",
    "sample_lengths",
    "save_checkpoint",
    "unflatten_meta",
    "unroll_",
]
