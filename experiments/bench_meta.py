"""Benchmark: meta-training inner steps per second, batched population vs sequential particles.

    python -m experiments.bench_meta                   # width 32, populations 1, 8, 16
    python -m experiments.bench_meta --width 64 --steps 30

An inner step is what meta-training repeats: the population's forward/backward on one batch
(tasks.MLPPopulation, 196 -> w -> w -> w -> 10 μP MLP, batch 128) and one functional LO step
per parameter tensor for all particles at once (functional.lo_step_ with per-particle
meta-parameters). "x16 speedup" compares one batched population of 16 with 16 sequential
single-particle unrolls of the same length, timed in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import parametrizations as P
from mulo import functional as LF
from mulo.tasks import MLPPopulation


def unroll(population: int, width: int, steps: int, batch: int, seed: int = 0) -> float:
    """Seconds for ``steps`` inner steps of a ``population``-particle MLP trained by the LO."""
    gen = torch.Generator().manual_seed(seed)
    pop = MLPPopulation(population, 196, width, 3, 10, parametrization="mup", seed=seed)
    params = {k: v.clone() for k, v in pop.params.items()}
    scales = P.get("mup").update_scales(pop.module(0))
    meta = LF.init_meta_params(population=population, generator=gen)
    states = {k: LF.init_state(v) for k, v in params.items()}
    x = torch.randn(batch, 196, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    start = time.perf_counter()
    for _ in range(steps):
        _, grads = pop.grads(params, x, y)
        with torch.no_grad():
            for name, p in params.items():
                LF.lo_step_(meta, states[name], p, grads[name], scales[name], LF.STEP_MULT_MU)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--populations", type=int, nargs="+", default=[1, 8, 16])
    args = ap.parse_args(argv)
    if min(args.width, args.steps, args.batch, *args.populations) < 1:
        ap.error("--width, --steps, --batch and --populations must be >= 1")
    torch.set_flush_denormal(True)
    print(
        f"# {platform.node()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"width {args.width} | batch {args.batch} | {args.steps} steps | "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    unroll(2, args.width, 3, args.batch)  # warm-up: allocator, kernels
    print("| population | inner steps/s | particle-steps/s |")
    print("|---:|---:|---:|")
    for n in args.populations:
        seconds = unroll(n, args.width, args.steps, args.batch)
        print(f"| {n} | {args.steps / seconds:.1f} | {n * args.steps / seconds:.1f} |")
    batched = unroll(16, args.width, args.steps, args.batch)
    sequential = sum(unroll(1, args.width, args.steps, args.batch, seed=i) for i in range(16))
    print(
        f"\nbatched population of 16: {batched:.2f} s; 16 sequential single-particle unrolls: "
        f"{sequential:.2f} s; speedup {sequential / batched:.1f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
