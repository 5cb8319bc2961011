"""The transfer study: learned optimizers vs per-point tuned baselines across width, depth,
horizon and task families, as a resumable sweep.

    python -m experiments.transfer_study                      # all studies (configs/study.yaml)
    python -m experiments.transfer_study studies=[depth] seeds=[0,1,2]
    python -m experiments.transfer_study studies=[width] device=cuda 'study.width.values=[8192]'

Every finished cell (study, axis value, optimizer entry, lr, seed) is appended to
``<out_dir>/cells.jsonl`` and skipped when the command runs again, so the study can be run in
pieces, interrupted and resumed, or split between machines: each cell records the device and
host it ran on. After each study it writes ``<study>.md`` (final train loss and held-out
metric, mean ± std over seeds, at each point's best lr) and ``<study>.png``.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments._cli import check_argv, one_line_errors
from experiments.evaluate import run_single
from experiments.width_transfer import best_lr_runs, plot, table


def cell_key(study: str, value, entry: str, lr, seed: int) -> str:
    return f"{study}|{value}|{entry}|{'default' if lr is None else f'{lr:g}'}|{seed}"


def load_cells(path: Path) -> dict[str, dict]:
    """Finished cells by key; a torn last line (a crash mid-write) is ignored."""
    cells = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            cells[record["key"]] = record
    return cells


def run_study(name: str, spec: dict, config: dict, out: Path, cells: dict[str, dict]) -> list:
    axis = spec["axis"]
    records = []
    for entry, opt in config["optimizers"].items():
        for value in spec["values"]:
            for lr in opt["lrs"]:
                for seed in config["seeds"]:
                    key = cell_key(name, value, entry, lr, seed)
                    if key not in cells:
                        cells[key] = _run_cell(key, name, spec, axis, value, entry, opt, lr,
                                               seed, config, out)  # fmt: skip
                    records.append(cells[key])
    return records


def _run_cell(key, name, spec, axis, value, entry, opt, lr, seed, config, out: Path) -> dict:
    task = dict(spec["task"])
    steps = spec.get("steps")
    if axis == "steps":
        steps = value
    else:
        task[axis] = value
    print(f"[{key}]", flush=True)
    summary = run_single(
        task, {**opt["optimizer"], "lr": lr}, parametrization=opt["parametrization"],
        steps=steps, batch_size=config["batch_size"], seed=seed, eval_interval=0,
        device=config["device"], out=out / "runs" / key.replace("|", "-"),
        logger_cfg={**config["logger"], "group": config["logger"].get("group") or f"study-{name}"},
        config={**config, "study": name}, progress=config["progress"],
    )  # fmt: skip
    record = {"key": key, "study": name, "entry": entry, **summary, "steps": steps,
              "device": config["device"], "host": platform.node()}  # fmt: skip
    with (out / "cells.jsonl").open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return record


@one_line_errors
def run(cfg: DictConfig) -> Path:
    config = OmegaConf.to_container(cfg, resolve=True)
    unknown = sorted(set(config["studies"]) - set(config["study"]))
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {sorted(config['study'])}")
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    cells = load_cells(out / "cells.jsonl")
    entries = list(config["optimizers"])
    for name in config["studies"]:
        spec = config["study"][name]
        records = run_study(name, spec, config, out, cells)
        axis = spec["axis"]
        metric = "eval_bpb" if spec["task"]["name"] == "transformer" else "eval_accuracy"
        best = best_lr_runs(records, axis=axis)
        md = table(best, entries, spec["values"], axis=axis, metric=metric)
        (out / f"{name}.md").write_text(f"Study {name} ({spec['task']['name']}):\n\n{md}\n")
        plot(best, entries, spec["values"], out / f"{name}.png", axis=axis, title=f"study: {name}")
        print(f"\n{name}:\n{md}\n")
    print(f"cells: {out / 'cells.jsonl'} ({len(cells)} finished); tables and plots in {out}")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="study")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_argv(sys.argv[1:], default_out_dir="experiments/results/transfer_study")
    main()
