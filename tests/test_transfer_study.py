"""experiments.transfer_study: a resumable sweep whose finished cells are kept and skipped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_learnable_fashion

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"))


def study(out, data_dir, *extra):
    task = f"{{name: mlp, depth: 2, data_root: {data_dir}, eval_size: 64}}"
    args = [
        f"out_dir={out}",
        "studies=[width,horizon]",
        "seeds=[0]",
        "batch_size=16",
        f"study.width={{axis: width, values: [8, 16], steps: 3, task: {task}}}",
        f"study.horizon={{axis: steps, values: [3, 4], task: {{name: mlp, width: 8, depth: 2, "
        f"data_root: {data_dir}, eval_size: 64}}}}",
        "~optimizers.splo",
        "~optimizers.muadam",
        "optimizers.adamw.lrs=[0.001,0.01]",
        "optimizers.adamw.optimizer.schedule.warmup=0",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.transfer_study", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def cells(out):
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_study_runs_then_skips_finished_cells_and_extends(data_dir, tmp_path):
    first = study(tmp_path, data_dir)
    assert first.returncode == 0, first.stderr
    # entries: mulo, mulo_init (1 lr each) + adamw (2 lrs) = 4 runs per point; the horizon
    # study's 3-step point is the width study's width-8 cell, so it is reused, not re-run
    assert len(cells(tmp_path)) == 4 * 2 + 4
    for name in ("width", "horizon"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert "| 8 |" in (tmp_path / "width.md").read_text()
    horizon_md = (tmp_path / "horizon.md").read_text()
    assert "| 3 |" in horizon_md and "| 4 |" in horizon_md and "seeds [0]" in horizon_md
    horizon = [c for c in cells(tmp_path) if c["study"] == "horizon"]
    assert sorted({c["steps_done"] for c in horizon}) == [4]
    assert {c["device"] for c in horizon} == {"cpu"}

    again = study(tmp_path, data_dir, "optimizers.adamw.lrs=[1e-3,0.01]")  # same lrs, respelled
    assert again.returncode == 0, again.stderr
    assert len(cells(tmp_path)) == 12 and "|" not in again.stdout.split("width:")[0]  # no re-runs

    more = study(tmp_path, data_dir, "seeds=[0,1]")
    assert more.returncode == 0, more.stderr
    assert "|0]" not in more.stdout  # seed-0 cells were not re-run
    # seed 1 runs each entry once per point: adamw only at the lr seed 0 chose
    assert len(cells(tmp_path)) == 12 + 3 * 3
    for width in (8, 16):
        grid = {c["lr"]: c["final_train_loss"] for c in cells(tmp_path)
                if c["entry"] == "adamw" and c["width"] == width and c["seed"] == 0
                and c["study"] == "width"}  # fmt: skip
        chosen = [c["lr"] for c in cells(tmp_path)
                  if c["entry"] == "adamw" and c["width"] == width and c["seed"] == 1
                  and c["study"] == "width"]  # fmt: skip
        assert chosen == [min(grid, key=grid.get)]
        row = next(line for line in (tmp_path / "width.md").read_text().splitlines()
                   if line.startswith(f"| {width} |"))  # fmt: skip
        assert f"(lr {chosen[0]:g})" in row


def test_unknown_study_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.transfer_study", f"out_dir={tmp_path}",
         "studies=[widht]"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown studies ['widht']")


def test_a_study_may_set_its_own_batch_size(monkeypatch, tmp_path):
    from experiments import transfer_study as ts

    seen = []

    def fake_run_single(task, optimizer, **kw):
        seen.append(kw["batch_size"])
        return {"final_train_loss": 1.0, "diverged": False}

    monkeypatch.setattr(ts, "run_single", fake_run_single)
    config = {"batch_size": 128, "device": "cpu", "logger": {}, "progress": False}
    opt = {"optimizer": {"name": "adamw"}, "parametrization": "sp", "lrs": [1e-3]}
    task = {"name": "transformer", "depth": 1}
    own = {"axis": "width", "steps": 2, "batch_size": 8, "task": task}
    ts._cell("lm", own, 16, "adamw", opt, 1e-3, 0, config, tmp_path, cells := {})
    ts._cell("lm", {**own, "batch_size": None}, 16, "adamw", opt, 1e-3, 0, config, tmp_path, cells)
    assert seen == [8, 128]  # a second cell: the batch size is part of what a cell computes
    assert sorted(json.loads(i)["batch"] for i in cells) == [8, 128]


def test_a_study_may_set_its_own_lr_grid(monkeypatch, tmp_path):
    from experiments import transfer_study as ts

    losses = {1e-3: 2.0, 1e-2: 1.0, 1e-1: 0.5}  # the study's own grid holds the best lr
    monkeypatch.setattr(
        ts, "run_single",
        lambda task, optimizer, **kw: {"lr": optimizer["lr"], "seed": kw["seed"],
                                       "diverged": False,
                                       "final_train_loss": losses[optimizer["lr"]]},
    )  # fmt: skip
    config = {"batch_size": 4, "device": "cpu", "logger": {}, "progress": False,
              "seeds": [0, 1], "tune_seeds": 1,
              "optimizers": {"adamw": {"optimizer": {"name": "adamw"}, "parametrization": "sp",
                                       "lrs": [1e-3, 1e-2]}}}  # fmt: skip
    spec = {"axis": "width", "values": [8], "steps": 2, "task": {"name": "mlp", "depth": 1},
            "lrs": {"adamw": [1e-2, 1e-1]}}  # fmt: skip
    records = ts.run_study("s", spec, config, tmp_path, {})
    assert [(r["lr"], r["seed"]) for r in records] == [(1e-1, 0), (1e-1, 1)]
    best = ts.best_lr_runs(records)
    assert ts.edge_notes(best, spec, config) == ["adamw at width=8: best lr 0.1 is a grid edge"]
    assert "adamw lr grid here: [0.01, 0.1]" in ts.describe("s", spec, {**config, "optimizers": {}})


def test_run_missing_false_reports_finished_points_and_runs_nothing(monkeypatch, tmp_path):
    from experiments import transfer_study as ts
    from experiments.width_transfer import best_lr_runs, table

    monkeypatch.setattr(
        ts, "run_single",
        lambda task, optimizer, **kw: {"lr": optimizer["lr"], "seed": kw["seed"],
                                       "diverged": False, "final_train_loss": 1.0,
                                       "eval_accuracy": 0.5},
    )  # fmt: skip
    config = {"batch_size": 4, "device": "cpu", "logger": {}, "progress": False,
              "seeds": [0, 1], "tune_seeds": 1,
              "optimizers": {"adamw": {"optimizer": {"name": "adamw"}, "parametrization": "sp",
                                       "lrs": [1e-3, 1e-2]}}}  # fmt: skip
    spec = {"axis": "width", "values": [8, 16], "steps": 2, "task": {"name": "mlp", "depth": 1}}
    cells = {}
    ts.run_study("s", spec, config, tmp_path, cells)
    assert len(cells) == 2 * 3  # per width: 2 grid points on seed 0, the winner on seed 1
    # width 16 loses its second seed: without run_missing it would run again
    del cells[next(i for i, r in cells.items() if r["key"] == "s|16|adamw|0.001|1")]
    monkeypatch.setattr(ts, "run_single", lambda *a, **k: pytest.fail("ran a cell"))
    records = ts.run_study("s", spec, {**config, "run_missing": False}, tmp_path, cells)
    assert sorted({r["width"] for r in records}) == [8]
    md = table(best_lr_runs(records), ["adamw"], [8, 16])
    assert md.splitlines()[-1] == "| 16 | not run yet | — |"


def test_a_point_that_ends_above_its_initial_loss_is_noted():
    from experiments import transfer_study as ts

    def runs(*pairs):
        return [{"initial_train_loss": a, "final_train_loss": b} for a, b in pairs]

    best = {
        ("mulo", 8): runs((2.3, 0.4), (2.3, 0.5)),
        ("mulo_init", 8): runs((2.3, 30.0), (2.3, 14.0)),  # finite, so not "diverged"
        ("splo", 8): runs((2.3, float("nan")), (2.3, 0.5)),  # the table says diverged
        ("zero", 8): runs((2.3026, 2.3031), (2.3026, 2.3027)),
        ("zero", 16): runs((2.3026, 2.3026)),
    }
    assert ts.no_progress_notes(best, "width") == [
        "mulo_init at width=8: ends above its initial loss (mean final loss 22, initial 2.3)",
        "zero does not train at width=8, 16 (mean final loss within 1% of the initial loss)",
    ]


def test_lrs_for_an_unknown_entry_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.transfer_study", f"out_dir={tmp_path}",
         "studies=[cnn]", "++study.cnn.lrs={adamm: [0.1]}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("error: study cnn: lrs for unknown entries ['adamm']")


def test_a_study_may_run_only_its_own_entries(monkeypatch, tmp_path):
    from experiments import transfer_study as ts

    ran = []

    def fake_run_single(task, optimizer, **kw):
        ran.append(optimizer["name"])
        return {"final_train_loss": 1.0, "diverged": False}

    monkeypatch.setattr(ts, "run_single", fake_run_single)
    entry = {"parametrization": "sp", "lrs": [None]}
    config = {"batch_size": 4, "device": "cpu", "logger": {}, "progress": False,
              "seeds": [0], "tune_seeds": 1,
              "optimizers": {"adamw": {**entry, "optimizer": {"name": "adamw"}},
                             "sgd": {**entry, "optimizer": {"name": "sgd"}}}}  # fmt: skip
    spec = {"axis": "width", "values": [8], "steps": 2, "task": {"name": "mlp", "depth": 1}}
    ts.run_study("s", {**spec, "entries": ["sgd"]}, config, tmp_path, {})
    assert ran == ["sgd"]
    ts.run_study("s", spec, config, tmp_path, {})
    assert ran == ["sgd", "adamw", "sgd"]


def test_entries_not_in_optimizers_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.transfer_study", f"out_dir={tmp_path}",
         "studies=[cnn]", "++study.cnn.entries=[mulo,adamm]"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("error: study cnn: entries ['adamm'] are not in optimizers")


def test_a_study_may_run_its_own_seeds(monkeypatch, tmp_path):
    from experiments import transfer_study as ts

    seeds = []
    monkeypatch.setattr(ts, "run_single", lambda task, optimizer, **kw: seeds.append(kw["seed"])
                        or {"final_train_loss": 1.0, "diverged": False})  # fmt: skip
    config = {"batch_size": 4, "device": "cpu", "logger": {}, "progress": False,
              "seeds": [0, 1, 2], "tune_seeds": 1,
              "optimizers": {"sgd": {"parametrization": "sp", "lrs": [None],
                                     "optimizer": {"name": "sgd"}}}}  # fmt: skip
    spec = {"axis": "width", "values": [8], "steps": 2, "task": {"name": "mlp", "depth": 1}}
    assert len(ts.run_study("s", {**spec, "seeds": [5]}, config, tmp_path, {})) == 1
    assert seeds == [5]
    assert "seeds [5]" in ts.describe("s", {**spec, "seeds": [5]}, config)


def test_shards_split_the_cells_and_together_run_each_once(monkeypatch, tmp_path):
    from experiments import transfer_study as ts

    ran = []
    monkeypatch.setattr(
        ts, "run_single",
        lambda task, optimizer, **kw: ran.append((task["width"], optimizer["lr"], kw["seed"]))
        or {"lr": optimizer["lr"], "seed": kw["seed"], "diverged": False,
            "final_train_loss": 1.0 / (1 + optimizer["lr"])},
    )  # fmt: skip
    config = {"batch_size": 4, "device": "cpu", "logger": {}, "progress": False,
              "seeds": [0, 1], "tune_seeds": 1,
              "optimizers": {"adamw": {"optimizer": {"name": "adamw"}, "parametrization": "sp",
                                       "lrs": [1e-3, 1e-2, 1e-1]}}}  # fmt: skip
    spec = {"axis": "width", "values": [8, 16, 32, 64], "steps": 2,
            "task": {"name": "mlp", "depth": 1}}  # fmt: skip
    alone = []
    for shard in ("0/2", "1/2"):
        ran.clear()
        ts.run_study("s", spec, {**config, "shard": shard}, tmp_path, {})
        alone.append(set(ran))
    assert alone[0] and alone[1] and not alone[0] & alone[1]  # disjoint, both non-empty
    # passes of both shards over one shared set of cells until nothing is left run every cell
    # of the unsharded study exactly once
    cells, passes = {}, []
    for _ in range(3):
        ran.clear()
        for shard in ("0/2", "1/2"):
            ts.run_study("s", spec, {**config, "shard": shard}, tmp_path, cells)
        passes.append(list(ran))
    everything = [cell for p in passes for cell in p]
    assert len(everything) == len(set(everything)) == 4 * (3 + 1)  # grid on seed 0, winner seed 1
    assert passes[-1] == []
    records = ts.run_study("s", spec, config, tmp_path, cells)
    assert len(records) == 4 * 2 and {r["lr"] for r in records} == {1e-1}


@pytest.mark.parametrize("bad", ["2/2", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_is_one_line(bad):
    from experiments import transfer_study as ts

    with pytest.raises(ValueError, match="shard must be K/N"):
        ts.parse_shard(bad)
