"""Coordinate check of models trained by learned optimizers: does each layer's typical
pre-activation stay put as width grows?

    python -m experiments.coord_check                                # μLO vs SP-LO, widths 64..2048
    python -m experiments.coord_check 'widths=[256,4096]' steps=20 device=cuda

For every optimizer entry and width it builds the task's model (same seed and batches at every
width), takes `steps` optimizer steps and records the mean |output| of every Linear/Conv layer,
i.e. its pre-activation, at each forward (parametrizations.coord_check). It writes
records.jsonl, coord_check.md (mean over steps 1..`steps` per layer and width, and the ratio
widest / narrowest) and coord_check.png (one panel per entry) to `out_dir`.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import parametrizations as P
from experiments._cli import check_argv, one_line_errors
from mulo import baselines, tasks
from parametrizations.builders import check_positive


def check_entry(entry: dict, config: dict) -> list[dict]:
    """Coordinate-check records of one optimizer entry across ``config["widths"]``."""
    task_kw = {k: v for k, v in config["task"].items() if k != "name"}

    def build(width: int):
        return tasks.build_task(
            config["task"]["name"], **task_kw, width=width, seed=config["seed"],
            parametrization=entry["parametrization"], batch_size=config["batch_size"],
            device=config["device"],
        )  # fmt: skip

    first = build(config["widths"][0])
    batches = [first.sample() for _ in range(config["steps"] + 1)]  # the same data at every width
    opt = {k: v for k, v in entry["optimizer"].items() if k not in ("name", "schedule")}
    return P.coord_check(
        lambda width: build(width).model,
        config["widths"],
        lambda model: baselines.build_optimizer(
            entry["optimizer"]["name"],
            model,
            parametrization=entry["parametrization"],
            batch_size=config["batch_size"],
            **opt,
        ),  # fmt: skip
        lambda step: batches[step],
        first.loss,
        steps=config["steps"],
        seed=config["seed"],
    )


def mean_over_steps(records: list[dict]) -> dict[str, dict[int, float]]:
    """``{layer: {width: mean |pre-activation| over steps 1..T}}`` (step 0 is the init)."""
    values: dict[str, dict[int, list[float]]] = {}
    for r in records:
        if r["step"] > 0:
            values.setdefault(r["layer"], {}).setdefault(r["width"], []).append(r["mean_abs"])
    return {
        layer: {w: statistics.fmean(v) for w, v in by_width.items()}
        for layer, by_width in values.items()
    }


def table(means: dict[str, dict[int, float]], widths: list[int]) -> str:
    lo, hi = min(widths), max(widths)
    lines = [
        "| layer | " + " | ".join(str(w) for w in widths) + f" | {hi} / {lo} |",
        "|---|" + "---:|" * (len(widths) + 1),
    ]
    for layer, by_width in means.items():
        row = " | ".join(f"{by_width[w]:.4g}" for w in widths)
        lines.append(f"| {layer} | {row} | {by_width[hi] / by_width[lo]:.2f}x |")
    return "\n".join(lines)


def plot(all_means: dict[str, dict], widths: list[int], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_means), figsize=(4.2 * len(all_means), 3.4), sharey=True)
    axes = [axes] if len(all_means) == 1 else list(axes)
    for ax, (entry, means) in zip(axes, all_means.items(), strict=True):
        for layer, by_width in means.items():
            ax.plot(widths, [by_width[w] for w in widths], marker="o", label=layer)
        ax.set(xscale="log", yscale="log", xlabel="width", title=entry)
        ax.set_xticks(widths, [str(w) for w in widths], minor=False)
        ax.set_xticks([], minor=True)
    axes[0].set_ylabel(f"mean |pre-activation|, steps 1-{steps}")
    axes[-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@one_line_errors
def run(cfg: DictConfig) -> Path:
    config = OmegaConf.to_container(cfg, resolve=True)
    widths = config["widths"]
    if not widths or not config["optimizers"]:
        raise ValueError("widths and optimizers must each name at least one value")
    for width in widths:
        check_positive(steps=config["steps"], width=width)
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    all_means, sections, records = {}, [], []
    for name, entry in config["optimizers"].items():
        recs = check_entry(entry, config)
        records += [{"entry": name, **r} for r in recs]
        all_means[name] = mean_over_steps(recs)
        sections.append(f"**{name}** ({entry['parametrization']}):\n\n"
                        f"{table(all_means[name], widths)}")  # fmt: skip
    with (out / "records.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    header = (
        f"Coordinate check: mean |pre-activation| of each layer, averaged over steps 1-"
        f"{config['steps']}, task {config['task']}, batch {config['batch_size']}, seed "
        f"{config['seed']}; the same batches at every width."
    )
    md = header + "\n\n" + "\n\n".join(sections) + "\n"
    (out / "coord_check.md").write_text(md)
    plot(all_means, widths, out / "coord_check.png", config["steps"])
    print(md + f"\nrecords: {out / 'records.jsonl'}; plot: {out / 'coord_check.png'}")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="coord_check")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_argv(
        sys.argv[1:], default_out_dir="experiments/results/coord_check", config_name="coord_check"
    )
    main()
