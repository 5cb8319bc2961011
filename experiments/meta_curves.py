"""Meta-training curves of finished or running meta-training runs, side by side.

    python -m experiments.meta_curves experiments/results/meta_train/mulo_m \
        experiments/results/meta_train/splo_m --out experiments/results/meta_train

Reads each run directory's metrics.jsonl and writes meta_curves.png (meta-loss, smoothed over
`--window` outer steps, with the held-out evaluations marked) and meta_curves.md (per run: outer
steps, wall time, the smoothed final meta-loss and every held-out evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run}")
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if "resumed_from" in record:  # steps after the checkpoint are redone from here on
            at = record.get("at_step", record.get("step"))  # older files: "step"
            records = {s: r for s, r in records.items() if s <= at}
        elif "meta_loss" in record:
            records[record["step"]] = record
    return [records[s] for s in sorted(records)]


def smooth(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def summary(name: str, records: list[dict], window: int) -> str:
    losses = [r["meta_loss"] for r in records]
    hours = sum(r.get("seconds", 0.0) for r in records) / 3600
    lines = [
        f"**{name}**: {len(records)} outer steps, {hours:.2f} h of outer steps, meta-loss "
        f"(mean of the last {window}) {statistics.fmean(losses[-window:]):.4f}, first "
        f"{window}: {statistics.fmean(losses[:window]):.4f}.",
        "",
        "| outer step | eval width | eval steps | final train loss | test loss | test acc |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "eval/width" in r:
            lines.append(
                f"| {r['step']} | {r['eval/width']} | {r['eval/steps']} | "
                f"{r['eval/final_train_loss']:.4f} | {r['eval/test_loss']:.4f} | "
                f"{r['eval/test_accuracy']:.4f} |"
            )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, records in runs.items():
        steps = [r["step"] for r in records]
        (line,) = ax.plot(steps, smooth([r["meta_loss"] for r in records], window), label=name)
        evals = [r for r in records if "eval/width" in r]
        ax.plot([r["step"] for r in evals], [r["eval/final_train_loss"] for r in evals],
                "o", color=line.get_color(), label=f"{name}: eval final train loss")  # fmt: skip
    ax.set(xlabel="outer step", ylabel=f"meta-loss (mean of {window})", title="meta-training")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="meta-training run directories")
    parser.add_argument("--out", type=Path, default=Path("."), help="where to write the outputs")
    parser.add_argument("--window", type=int, default=20, help="smoothing window (outer steps)")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be >= 1")
    try:
        runs = {run.name: read_metrics(run) for run in args.runs}
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    empty = [name for name, records in runs.items() if not records]
    if empty:
        parser.exit(2, f"error: no outer steps logged yet in {', '.join(empty)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    md = "\n\n".join(summary(name, records, args.window) for name, records in runs.items())
    (args.out / "meta_curves.md").write_text(md + "\n")
    plot(runs, args.out / "meta_curves.png", args.window)
    print(md + f"\n\nplot: {args.out / 'meta_curves.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
