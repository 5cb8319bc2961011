"""Width transfer: learned optimizers vs per-width tuned baselines across MLP widths.

    python -m experiments.width_transfer                      # the README's main job (CPU)
    python -m experiments.width_transfer quick=true           # the same pipeline in ~1 min
    python -m experiments.width_transfer widths=[128,1024,4096] seeds=[0,1,2] device=cuda
    python -m experiments.width_transfer logger=wandb         # every run in one W&B group

For every width x optimizer x lr (grid) x seed it trains the MLP task (experiments.evaluate's
run_single), then writes to the run directory: runs.jsonl (every run's summary), results.md (final
train loss and test accuracy per width and optimizer, mean ± std over seeds, at each width's best
lr) and width_transfer.png (final train loss vs width).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments._cli import blame, check_argv, one_line_errors, run_dir
from experiments.evaluate import run_single
from mulo import tasks


def sweep(config: dict, out: Path) -> list[dict]:
    """Every (optimizer, width, lr, seed) run, in the order a reader would check them."""
    runs = []
    logger_cfg = dict(config["logger"])
    if logger_cfg.get("name") == "wandb" and not logger_cfg.get("group"):
        logger_cfg["group"] = f"width_transfer-{time.strftime('%Y%m%d-%H%M%S')}"
    plan = [
        (key, spec, width, lr, seed)
        for key, spec in config["optimizers"].items()
        for width in config["widths"]
        for lr in spec["lrs"]
        for seed in config["seeds"]
    ]
    for i, (key, spec, width, lr, seed) in enumerate(plan, 1):
        opt_cfg = {**spec["optimizer"], "lr": lr}
        task_cfg = {**config["task"], "width": width}
        lr_tag = "default" if lr is None else f"{lr:g}"
        print(f"[{i}/{len(plan)}] {key} width={width} lr={lr_tag} seed={seed}", flush=True)
        summary = run_single(
            task_cfg, opt_cfg, parametrization=spec["parametrization"], steps=config["steps"],
            batch_size=config["batch_size"], seed=seed, eval_interval=config["eval_interval"],
            device=config["device"], out=out / "runs" / f"{key}-w{width}-lr{lr_tag}-s{seed}",
            logger_cfg=logger_cfg, config={**config, "entry": key}, progress=config["progress"],
        )  # fmt: skip
        runs.append({"entry": key, **summary})
        with (out / "runs.jsonl").open("a") as f:
            f.write(json.dumps(runs[-1], default=str) + "\n")
    return runs


def best_lr_runs(runs: list[dict], axis: str = "width") -> dict[tuple[str, int], list[dict]]:
    """For each (entry, value of ``axis``): the seeds' runs at the lr with the lowest mean final
    train loss (a diverged seed counts as infinite, so it disqualifies its lr)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["entry"], r[axis], r["lr"]), []).append(r)
    best: dict[tuple[str, int], list[dict]] = {}
    for (entry, value, _lr), rs in groups.items():
        current = best.get((entry, value))
        if current is None or mean_final_loss(rs) < mean_final_loss(current):
            best[(entry, value)] = rs
    return best


def mean_final_loss(runs: list[dict]) -> float:
    """The lr-selection score: mean final train loss, a diverged (NaN/inf) run counting as inf."""
    return statistics.fmean(_finite(r["final_train_loss"]) for r in runs)


def _finite(x: float) -> float:
    return x if x == x and x != float("inf") else float("inf")


def _mean_std(values: list[float]) -> str:
    if any(v == float("inf") for v in values):
        return "diverged"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.4f} ± {s:.4f}"


def table(
    best: dict, entries: list[str], values: list[int], axis: str = "width",
    metric: str = "eval_accuracy",
) -> str:  # fmt: skip
    label = {"eval_accuracy": "acc", "eval_bpb": "bpb"}.get(metric, metric)
    lines = [
        f"| {axis} | " + " | ".join(f"{e} loss | {e} {label}" for e in entries) + " |",
        "|---:|" + "---:|---:|" * len(entries),
    ]
    for w in values:
        cells = []
        for e in entries:
            rs = best.get((e, w))
            if rs is None:  # a study built from finished cells only (run_missing=false)
                cells += ["not run yet", "—"]
                continue
            loss = _mean_std([_finite(r["final_train_loss"]) for r in rs])
            accs = [r.get(metric, float("nan")) for r in rs]
            acc = "—" if loss == "diverged" else _mean_std(accs)
            lr = rs[0]["lr"]
            cells += [loss + ("" if lr is None else f" (lr {lr:g})"), acc]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    best: dict,
    entries: list[str],
    values: list[int],
    path: Path,
    axis: str = "width",
    title: str = "Width transfer (MLP, 3 hidden layers)",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    means = []
    for e in entries:
        xs, ms, ss = [], [], []
        for w in values:
            vals = [_finite(r["final_train_loss"]) for r in best.get((e, w), [])]
            if vals and all(v < float("inf") for v in vals):
                xs.append(w)
                ms.append(statistics.fmean(vals))
                ss.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=e)
        means += ms
    ax.set_xscale("log", base=10 if axis == "steps" else 2)
    if means and min(means) > 0 and max(means) / min(means) > 3:  # e.g. an untrained floor
        ax.set_yscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel(f"final train loss (best lr per {axis})")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# quick=true: every stage and output of the main job at a fraction of its cost (2 widths, 1
# seed, 60 steps, 2 lrs per tuned baseline); a key given on the command line still wins
QUICK = {
    "widths": [32, 128],
    "seeds": [0],
    "steps": 60,
    "task.eval_size": 500,
    "optimizers.muadam.lrs": [0.1, 0.3],
    "optimizers.adamw.lrs": [3e-3, 1e-2],
}


def apply_quick(config: dict, given: set[str]) -> None:
    for key, value in QUICK.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if key not in given and isinstance(node, dict) and leaf in node:
            node[leaf] = value


@one_line_errors
def run(cfg: DictConfig) -> Path:
    config = OmegaConf.to_container(cfg, resolve=True)
    if config["quick"]:
        apply_quick(config, _given_keys())
    if not config["widths"] or not config["seeds"] or not config["optimizers"]:
        raise ValueError("widths, seeds and optimizers must each name at least one value")
    out = run_dir()
    started = time.perf_counter()
    runs = sweep(config, out)
    entries, widths = list(config["optimizers"]), list(config["widths"])
    best = best_lr_runs(runs)
    md = table(best, entries, widths)
    header = (
        f"Width transfer on {config['task']['name']} ({config['task']['dataset']}), depth "
        f"{config['task']['depth']}, {config['steps']} steps, batch {config['batch_size']}, "
        f"seeds {config['seeds']}; final train loss = mean of the last 10% of steps, acc = "
        f"held-out accuracy; tuned entries report each width's best lr.\n\n"
    )
    (out / "results.md").write_text(header + md + "\n")
    plot(best, entries, widths, out / "width_transfer.png")
    minutes = (time.perf_counter() - started) / 60
    print(f"\n{header}{md}\n")
    print(
        f"Compared {', '.join(entries)} at widths {widths} ({len(runs)} runs, {minutes:.1f} min)."
        f"\nTable: {out / 'results.md'}\nPlot:  {out / 'width_transfer.png'}"
        f"\nRuns:  {out / 'runs.jsonl'}"
    )
    return out


def _given_keys() -> set[str]:
    from hydra.core.hydra_config import HydraConfig

    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def memory_needs(config: dict) -> list[tuple[str, int]]:
    """The widest run of the sweep, for the up-front check (see experiments._cli)."""
    task = {**config["task"], "width": max(config["widths"])}
    estimate = tasks.memory_estimate(**task, batch_size=config["batch_size"])
    return [blame("widths", "batch_size", estimate)]


@hydra.main(version_base="1.3", config_path="../configs", config_name="width_transfer")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_argv(sys.argv[1:], config_name="width_transfer", memory=memory_needs)
    main()
