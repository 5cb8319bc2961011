"""Benchmark: the meta-training outer step, fused population path vs the unfused one.

    python -m experiments.bench_meta                      # widths 32 64 128, 2 outer steps each
    python -m experiments.bench_meta --widths 64 --steps 3 --architecture small_fc_lopt_v2
    python -m experiments.bench_meta --populations 1 8 16 # also: inner steps/s by population
    python -m experiments.bench_meta --experiment mulo_v2  # an experiment's own task mix

One outer step is what meta-training repeats: 8 antithetic pairs (16 particles) of a 196 -> w ->
w -> w -> 10 μP MLP (Fashion-MNIST, batch 128) trained K = 50 inner steps by the LO (PES), then
the AdamW update of the meta-parameters (``--experiment`` times that experiment's own
configuration instead, e.g. ``mulo_v2``: its task mix of MLPs and a CNN, v2 architecture).
"unfused" runs every LO step through batched matmuls
(``functional.USE_KERNEL = False``: the PyTorch path, and meta-training's only path before the
kernel took populations); "fused" through the C kernel (mulo/kernels/lo_net.c), which builds the
features and runs the network of every particle in registers. Both paths start from the same
trainer state, and the table prints the largest difference of the two meta-gradient estimates
relative to its norm: the paths compute the same thing.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch

import parametrizations as P
from experiments._cli import CONFIG_DIR
from mulo import functional as LF
from mulo.meta.outer import MetaConfig, MetaTrainer
from mulo.tasks import MLPPopulation


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def outer_step_seconds(trainer: MetaTrainer, fused: bool, steps: int) -> tuple[float, torch.Tensor]:
    """Mean seconds per outer step on a copy of ``trainer``, and the first step's estimate."""
    trainer = copy.deepcopy(trainer)
    old = LF.USE_KERNEL
    LF.USE_KERNEL = fused
    try:
        estimate = copy.deepcopy(trainer).estimate()[0]
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        return (time.perf_counter() - start) / steps, estimate
    finally:
        LF.USE_KERNEL = old


def experiment_config(name: str) -> MetaConfig:
    """The meta-training config of ``experiments.meta_train experiment=<name>``, without its
    checkpoints and held-out evaluations."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    configs = CONFIG_DIR
    if not (configs / "experiment" / f"{name}.yaml").exists():
        names = sorted(p.stem for p in (configs / "experiment").glob("*.yaml"))
        print(f"error: unknown experiment {name!r}; valid: {', '.join(names)}", file=sys.stderr)
        raise SystemExit(2)
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("meta_train", overrides=[f"experiment={name}"])
    meta = OmegaConf.to_container(cfg.meta, resolve=True)
    return MetaConfig.from_dict({**meta, "checkpoint_every": 0, "eval_every": 0})


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
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--steps", type=int, default=2, help="timed outer steps per path and width")
    ap.add_argument("--architecture", default="small_fc_lopt", choices=list(LF.ARCHITECTURES))
    ap.add_argument("--populations", type=int, nargs="*", default=[])
    ap.add_argument("--inner-steps", type=int, default=50)
    ap.add_argument("--experiment", help="time this meta_train experiment's config instead")
    args = ap.parse_args(argv)
    if min(*args.widths, args.steps, args.inner_steps, *args.populations) < 1:
        ap.error("--widths, --steps, --inner-steps and --populations must be >= 1")
    torch.set_flush_denormal(True)
    if args.experiment:
        defaults = ap.parse_args([])
        ignored = [f"--{k.replace('_', '-')}" for k in ("widths", "architecture", "populations",
                   "inner_steps") if getattr(args, k) != getattr(defaults, k)]  # fmt: skip
        if ignored:
            ap.error(f"--experiment sets the configuration itself; drop {', '.join(ignored)}")
        return bench_experiment(args.experiment, args.steps)
    print(
        f"# {platform.node()} | {_cpu_model()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | {args.architecture} | 8 pairs, K = 50, batch 128 | "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    print("| width | unfused s/outer step | fused s/outer step | speedup | max estimate diff |")
    print("|---:|---:|---:|---:|---:|")
    for width in args.widths:
        config = MetaConfig(
            kind="mu", widths=[width], architecture=args.architecture, checkpoint_every=0
        )
        trainer = MetaTrainer(config)
        trainer.step()  # warm-up: allocator, kernel build, data
        unfused, g_unfused = outer_step_seconds(trainer, False, args.steps)
        fused, g_fused = outer_step_seconds(trainer, True, args.steps)
        diff = float((g_fused - g_unfused).abs().max() / g_unfused.norm().clamp(min=1e-30))
        print(f"| {width} | {unfused:.2f} | {fused:.2f} | {unfused / fused:.2f}x | {diff:.1e} |")
    if args.populations:
        print("\n| population | inner steps/s | particle-steps/s |")
        print("|---:|---:|---:|")
        for n in args.populations:
            seconds = unroll(n, args.widths[0], args.inner_steps, 128)
            rate = args.inner_steps / seconds
            print(f"| {n} | {rate:.1f} | {n * rate:.1f} |")
    return 0


def bench_experiment(name: str, steps: int) -> int:
    config = experiment_config(name)
    mix = ", ".join(f"{t['name']} w{t['width']}" for t in config.task_specs())
    print(
        f"# {platform.node()} | {_cpu_model()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | experiment {name}: {config.architecture}, {mix}, "
        f"{config.pairs} pairs, K = {config.truncation} | {time.strftime('%Y-%m-%d %H:%M')}"
    )
    trainer = MetaTrainer(config)
    trainer.step()  # warm-up
    unfused, g_unfused = outer_step_seconds(trainer, False, steps)
    fused, g_fused = outer_step_seconds(trainer, True, steps)
    diff = float((g_fused - g_unfused).abs().max() / g_unfused.norm().clamp(min=1e-30))
    print(
        "| experiment | unfused s/outer step | fused s/outer step | speedup | max estimate diff |"
    )
    print("|---|---:|---:|---:|---:|")
    print(f"| {name} | {unfused:.2f} | {fused:.2f} | {unfused / fused:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
