"""The transfer study: learned optimizers vs per-point tuned baselines across width, depth,
horizon and task families, as a resumable sweep.

    python -m experiments.transfer_study                      # all studies (configs/study.yaml)
    python -m experiments.transfer_study studies=[depth] seeds=[0,1,2]
    python -m experiments.transfer_study studies=[width] device=cuda 'study.width.values=[8192]'

Every finished cell (task, steps, optimizer entry, lr, seed, and for a learned optimizer a hash
of its meta-weights) is appended to ``<out_dir>/cells.jsonl`` and skipped when the command runs
again, so the study can be run in pieces, interrupted and resumed, or split between machines:
each cell records the device and host it ran on. A cell shared by two studies (the width
study's 256 is the depth study's depth 3) runs once. An entry with an lr grid is tuned per point
on the first ``tune_seeds`` seeds; its best lr then runs on every seed. After each study it
writes ``<study>.md`` (final train loss and held-out metric, mean ± std over seeds, at each
point's best lr) and ``<study>.png``. A study may set its own ``batch_size``, lr grids
(``lrs: {entry: [...]}``) where the defaults do not suit its task, the ``entries`` it runs
(default: all of ``optimizers``) and its own ``seeds``.

``shard=K/N`` runs only the cells whose identity hashes to K mod N, so N processes share the
study without running a cell twice (each appends to the same ``cells.jsonl``), e.g. one
one-thread process per core:

    OMP_NUM_THREADS=1 python -m experiments.transfer_study shard=0/2 &
    OMP_NUM_THREADS=1 python -m experiments.transfer_study shard=1/2; wait

A tuned entry's winner is known only once its whole grid has run, so repeat the pair until no
cell is left; a shard writes no tables, the plain command (or ``run_missing=false``) does.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import mulo.meta_weights as MW
from experiments._cli import check_argv, one_line_errors
from experiments.evaluate import run_single
from experiments.width_transfer import best_lr_runs, mean_final_loss, plot, table
from mulo import SPLO, MuLO

AXES = ("width", "depth", "steps")  # what a study varies (the records carry these fields)


def cell_key(study: str, value, entry: str, lr, seed: int) -> str:
    return f"{study}|{value}|{entry}|{'default' if lr is None else f'{lr:g}'}|{seed}"


def cell_identity(task: dict, steps: int, entry: str, opt: dict, lr, seed: int, batch: int) -> str:
    """What a cell computes, independent of which study asked for it: the width study's 256 cell
    is the depth study's depth-3 cell and the horizon study's 1000-step cell, run once.
    Spellings that compute the same thing match: lr 1 and 1.0, an explicit ``null``, the
    meta-weights by name or by path (their content hash counts), the images' directory."""
    if task["name"] != "transformer":
        task = {k: v for k, v in task.items() if k != "data_root"}  # where, not what
    optimizer = {k: v for k, v in opt["optimizer"].items() if v is not None}
    optimizer.pop("meta_weights", None)
    what = {"task": task, "steps": steps, "entry": entry, "optimizer": optimizer,
            "parametrization": opt["parametrization"], "lr": None if lr is None else float(lr),
            "seed": seed, "batch": batch,
            "meta_weights": meta_weights_digest(opt["optimizer"])}  # fmt: skip
    return json.dumps(what, sort_keys=True, default=str)


def _digest_of(name: str, parametrization: str) -> str:
    if name == "default":
        return MW.digest(MW.default_meta_weights(parametrization)[0])
    return MW.digest(MW.load_meta_weights(name)[0])


def meta_weights_digest(optimizer: dict) -> str | None:
    """For a learned-optimizer entry, a hash of the meta-weights it loads: a cell run with
    other weights (e.g. before new ones shipped) is not reused. A graft entry hashes those of
    its learned parts (the top-level meta_weights are the magnitude's)."""
    if optimizer["name"] == "graft":
        parts = {
            "magnitude": {"name": optimizer.get("magnitude", "adamw"),
                          "meta_weights": optimizer.get("meta_weights"),
                          **(optimizer.get("magnitude_kwargs") or {})},
            "direction": {"name": optimizer.get("direction", "mulo"),
                          **(optimizer.get("direction_kwargs") or {})},
        }  # fmt: skip
        digests = {role: meta_weights_digest(part) for role, part in parts.items()}
        return ",".join(f"{r}={d}" for r, d in digests.items() if d is not None) or None
    cls = {"mulo": MuLO, "splo": SPLO}.get(optimizer["name"])
    if cls is None:
        return None
    return _digest_of(str(optimizer.get("meta_weights") or "default"), cls.parametrization)


def load_cells(path: Path) -> dict[str, dict]:
    """Finished cells by identity; a torn last line (a crash mid-write) is cut off, so the next
    record starts on a line of its own."""
    cells = {}
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            path.write_text(text)
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            cells[record["identity"]] = record
    return cells


def run_study(name: str, spec: dict, config: dict, out: Path, cells: dict[str, dict]) -> list:
    """Run (or find) every cell of one study; return the records its table reports.

    An entry with an lr grid is tuned per axis value: the grid runs on the first `tune_seeds`
    seeds, the lr with the lowest mean final train loss wins, and the remaining seeds run at
    that lr only. The returned records are, per (entry, value), all seeds at the chosen lr.
    With ``run_missing: false`` nothing runs: a point whose cells are not all finished is left
    out (its table cell reads "not run yet").
    """
    seeds = study_seeds(spec, config)
    tune_seeds = seeds[: max(1, config["tune_seeds"])]
    records = []
    for value in spec["values"]:  # value-major: a partial run leaves whole rows of the table
        for entry in study_entries(spec, config):
            opt = config["optimizers"][entry]

            def cell(lr, seed, value=value, entry=entry, opt=opt):
                return _cell(name, spec, value, entry, opt, lr, seed, config, out, cells)

            lrs = study_lrs(spec, entry, opt)
            lr = lrs[0]
            if len(lrs) > 1:
                grid = {lr: [cell(lr, seed) for seed in tune_seeds] for lr in lrs}
                if any(None in runs for runs in grid.values()):
                    continue  # run_missing=false and the grid is not finished: no winner yet
                lr = min(grid, key=lambda lr: mean_final_loss(grid[lr]))
            runs = [cell(lr, seed) for seed in seeds]
            if None not in runs:  # a point is reported with all its seeds or not at all
                records += runs
    return records


def _cell(name, spec, value, entry, opt, lr, seed, config, out: Path, cells) -> dict | None:
    axis, task, steps = spec["axis"], dict(spec["task"]), spec.get("steps")
    if axis == "steps":
        steps = value
    else:
        task[axis] = value
    batch_size = study_batch_size(spec, config)
    identity = cell_identity(task, steps, entry, opt, lr, seed, batch_size)
    if identity in cells:
        return {**cells[identity], axis: value}
    if not config.get("run_missing", True) or not in_shard(identity, config.get("shard")):
        return None
    key = cell_key(name, value, entry, lr, seed)
    print(f"[{key}]", flush=True)
    # the directory is this computation's: another lr spelling or new meta-weights get their own
    tag = hashlib.sha1(identity.encode()).hexdigest()[:8]
    run_out = out / "runs" / f"{key.replace('|', '-')}-{tag}"
    shutil.rmtree(run_out, ignore_errors=True)  # a cell restarted after a crash starts clean
    summary = run_single(
        task, {**opt["optimizer"], "lr": lr}, parametrization=opt["parametrization"],
        steps=steps, batch_size=batch_size, seed=seed, eval_interval=0,
        device=config["device"], out=run_out,
        logger_cfg={**config["logger"], "group": config["logger"].get("group") or f"study-{name}"},
        config={**config, "study": name}, progress=config["progress"],
    )  # fmt: skip
    record = {"key": key, "identity": identity, "study": name, "entry": entry, **summary,
              "steps": steps, "device": config["device"], "host": platform.node()}  # fmt: skip
    with (out / "cells.jsonl").open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    cells[identity] = record
    return {**record, axis: value}


def parse_shard(shard) -> tuple[int, int] | None:
    """``"K/N"`` -> (K, N) with 0 <= K < N; None (or "") -> None."""
    if shard in (None, ""):
        return None
    parts = str(shard).split("/")
    try:
        k, n = (int(p) for p in parts)
    except ValueError:
        k, n = -1, 0
    if len(parts) != 2 or not 0 <= k < n:
        raise ValueError(f"shard must be K/N with 0 <= K < N (e.g. 0/2), got {shard!r}")
    return k, n


def in_shard(identity: str, shard) -> bool:
    """Whether this process runs the cell ``identity`` (a stable hash, the same on every host)."""
    parsed = parse_shard(shard)
    if parsed is None:
        return True
    k, n = parsed
    return int(hashlib.sha1(identity.encode()).hexdigest(), 16) % n == k


def study_batch_size(spec: dict, config: dict) -> int:
    """A study may set its own batch size (e.g. a transformer too slow at the global one)."""
    return spec.get("batch_size") or config["batch_size"]


def study_seeds(spec: dict, config: dict) -> list[int]:
    """A study may run fewer (or other) seeds than the rest, e.g. where its cells are costly."""
    return list(spec.get("seeds") or config["seeds"])


def study_entries(spec: dict, config: dict) -> list[str]:
    """The optimizer entries a study runs: its own ``entries`` list (e.g. an entry that only the
    horizon study needs), else every entry of ``optimizers``."""
    return list(spec.get("entries") or config["optimizers"])


def study_lrs(spec: dict, entry: str, opt: dict) -> list:
    """An entry's lr grid: the study's own (``lrs: {entry: [...]}``) or the entry's default."""
    return (spec.get("lrs") or {}).get(entry) or opt["lrs"]


def describe(name: str, spec: dict, config: dict) -> str:
    task = {k: v for k, v in spec["task"].items() if k not in ("data_root", "eval_size")}
    fixed = "" if spec["axis"] == "steps" else f", {spec['steps']} steps"
    tuned = study_seeds(spec, config)[: max(1, config["tune_seeds"])]
    batch = study_batch_size(spec, config)
    own = spec.get("lrs") or {}
    own_grids = "".join(f" {e} lr grid here: {lrs}." for e, lrs in own.items())
    return (
        f"Study {name}: {spec['axis']} in {spec['values']}; task {task}{fixed}, batch {batch}, "
        f"seeds {study_seeds(spec, config)}. Loss = final train loss (mean of the "
        f"last 10% of steps), mean ± std over seeds; the second column is held-out. Entries "
        f"with an lr grid report the lr with the lowest mean final train loss on seeds {tuned}, "
        f"then rerun at that lr on every seed.{own_grids} Meta-weights: "
        f"{weights_used(config, study_entries(spec, config))}."
    )


def weights_used(config: dict, entries: list[str] | None = None) -> str:
    """Which learned optimizer each LO entry ran: its provenance name and content hash."""
    used = []
    for entry in entries or config["optimizers"]:
        opt = config["optimizers"][entry]
        cls = {"mulo": MuLO, "splo": SPLO}.get(opt["optimizer"]["name"])
        if cls is not None:
            name = opt["optimizer"].get("meta_weights")
            meta, provenance = (
                MW.load_meta_weights(name) if name else MW.default_meta_weights(cls.parametrization)
            )
            steps = provenance.get("outer_steps")
            trained = f", {steps} outer steps" if steps else ""
            used.append(f"{entry} = {provenance.get('name', name)}{trained} ({MW.digest(meta)})")
    return "; ".join(used) or "none"


def by_point(best: dict) -> list:
    """The table's (entry, value) points in order, each with its runs."""
    return sorted(best.items(), key=lambda kv: kv[0])


def edge_notes(best: dict, spec: dict, config: dict) -> list[str]:
    """Tuned points whose best lr sits on the edge of the grid (the grid may be too narrow)."""
    notes, axis = [], spec["axis"]
    for (entry, value), rs in by_point(best):
        lrs = study_lrs(spec, entry, config["optimizers"][entry])
        if len(lrs) < 2:
            continue
        if all(r["diverged"] for r in rs):
            notes.append(f"{entry} at {axis}={value}: every lr of the grid diverged")
        elif rs[0]["lr"] in (min(lrs), max(lrs)):
            notes.append(f"{entry} at {axis}={value}: best lr {rs[0]['lr']:g} is a grid edge")
    return notes


def no_progress_notes(best: dict, axis: str, tolerance: float = 0.01) -> list[str]:
    """Points whose mean final train loss is not below their mean initial loss: a run that blew
    up without reaching inf/NaN (the table marks only those diverged) or one that never trained.
    """
    notes, flat = [], {}
    for (entry, value), rs in by_point(best):
        final = mean_final_loss(rs)
        initial = [r.get("initial_train_loss") for r in rs]
        if final == float("inf") or None in initial:
            continue
        start = sum(initial) / len(initial)
        if final > start * (1 + tolerance):
            notes.append(
                f"{entry} at {axis}={value}: ends above its initial loss "
                f"(mean final loss {final:.4g}, initial {start:.4g})"
            )
        elif final >= start * (1 - tolerance):
            flat.setdefault(entry, []).append(str(value))
    notes += [
        f"{entry} does not train at {axis}={', '.join(values)} (mean final loss within "
        f"{tolerance:.0%} of the initial loss)"
        for entry, values in flat.items()
    ]
    return notes


@one_line_errors
def run(cfg: DictConfig) -> Path:
    config = OmegaConf.to_container(cfg, resolve=True)
    unknown = sorted(set(config["studies"]) - set(config["study"]))
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {sorted(config['study'])}")
    if not config["seeds"] or not config["optimizers"]:
        raise ValueError("seeds and optimizers must each name at least one value")
    shard = parse_shard(config.get("shard"))
    for name in config["studies"]:
        axis = config["study"][name]["axis"]
        if axis not in AXES:
            raise ValueError(f"study {name}: axis must be one of {', '.join(AXES)}, got {axis!r}")
        spec = config["study"][name]
        strays = sorted(set(spec.get("lrs") or {}) - set(config["optimizers"]))
        if strays:
            raise ValueError(f"study {name}: lrs for unknown entries {strays}")
        strays = sorted(set(spec.get("entries") or []) - set(config["optimizers"]))
        if strays:
            raise ValueError(f"study {name}: entries {strays} are not in optimizers")
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    cells = load_cells(out / "cells.jsonl")
    for name in config["studies"]:
        spec = config["study"][name]
        entries = study_entries(spec, config)
        records = run_study(name, spec, config, out, cells)
        if shard is not None:  # another shard's cells are missing here: no partial tables
            continue
        axis = spec["axis"]
        metric = "eval_bpb" if spec["task"]["name"] == "transformer" else "eval_accuracy"
        best = best_lr_runs(records, axis=axis)
        md = table(best, entries, spec["values"], axis=axis, metric=metric)
        notes = edge_notes(best, spec, config) + no_progress_notes(best, axis)
        notes = "".join(f"- {n}\n" for n in notes)
        (out / f"{name}.md").write_text(f"{describe(name, spec, config)}\n\n{md}\n\n{notes}")
        plot(best, entries, spec["values"], out / f"{name}.png", axis=axis, title=f"study: {name}")
        print(f"\n{name}:\n{md}\n")
    print(f"cells: {out / 'cells.jsonl'} ({len(cells)} finished); tables and plots in {out}")
    if shard is not None:
        print(
            f"shard {shard[0]}/{shard[1]}: ran only its own cells and wrote no tables; "
            "run_missing=false (or the plain command, once no cell is left) writes them"
        )
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="study")  # or --config-name
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_argv(
        sys.argv[1:], default_out_dir="experiments/results/transfer_study", config_name="study"
    )
    main()
