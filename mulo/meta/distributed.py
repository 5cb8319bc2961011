"""Meta-training over several processes with ``torch.distributed`` (torchrun, SLURM, ...).

Every rank holds the same meta-parameters and draws the same random numbers (perturbations,
inner lengths, init seeds, data indices) from the same seeded generators, so all ranks agree
on everything global. Each rank *simulates* only its own contiguous block of antithetic
pairs of every inner problem (:func:`pair_range`). A pair's contribution to the estimate is
written into its own row of a zero ``[pairs, ...]`` matrix; one ``all_reduce(SUM)`` of that
matrix gives every rank every row (adding zeros is exact), and the rows are then summed in
the same order as in a single process. So the estimate does not depend on the world size,
up to how the batched model/LO math rounds for a different population size.

    torchrun --nproc-per-node 2 -m experiments.meta_train ...   # gloo on CPU, nccl on GPU

Without an initialised process group everything here is a no-op for a world of one.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None, init_method: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` or ``init_method``); return (rank, world_size).

    A world of one (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) initialises nothing. The backend
    defaults to nccl when CUDA is available, else gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if dist.is_initialized():
        return world()
    rank = int(os.environ["RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group(
        backend, init_method=init_method or "env://", rank=rank, world_size=size
    )
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pair_range(pairs: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous block [lo, hi) of ``pairs`` that ``rank`` simulates (sizes differ by at
    most one; a rank may get none when there are fewer pairs than ranks)."""
    base, extra = divmod(pairs, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a world of one)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a world of one)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
