"""The Hydra apps from the command line: runs, sweeps, W&B offline records, the SLURM launcher
config, and bad input as one line with a non-zero exit. Tiny synthetic data in the real format."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_learnable_fashion

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"))


def cli(module, *args, env=None, timeout=240):
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def tiny(data_dir, out, *extra):
    return [
        f"task.data_root={data_dir}",
        "task.width=16",
        "task.eval_size=128",
        "batch_size=32",
        f"out_dir={out}",
        "progress=false",
        *extra,
    ]


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_evaluate_logs_every_step_and_the_evaluations(data_dir, tmp_path):
    out = cli(
        "evaluate", *tiny(data_dir, tmp_path, "steps=5", "eval_interval=2", "optimizer=adamw")
    )
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "evaluate").iterdir()
    recs = records(run / "metrics.jsonl")
    assert [r["step"] for r in recs if "train_loss" in r] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in recs if "eval_loss" in r] == [2, 4, 5]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["optimizer"] == "adamw" and summary["width"] == 16
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert "final train loss" in out.stdout


@pytest.mark.slow
def test_multirun_sweeps_optimizers_and_widths(data_dir, tmp_path):
    args = tiny(data_dir, tmp_path, "steps=2", "eval_interval=0")
    args = [a for a in args if not a.startswith("task.width")]
    out = cli("evaluate", "-m", "optimizer=mulo,splo,muadam", "task.width=8,16", *args)
    assert out.returncode == 0, out.stderr
    summaries = [
        json.loads(p.read_text()) for p in tmp_path.glob("evaluate-multirun/*/*/summary.json")
    ]
    assert sorted((s["optimizer"], s["width"]) for s in summaries) == sorted(
        (o, w) for o in ("mulo", "splo", "muadam") for w in (8, 16)
    )


def wandb_records(path):
    """Records of an offline .wandb file: a LevelDB-style log (7-byte file header, 32 KiB
    blocks, records split into FULL/FIRST/MIDDLE/LAST fragments) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if length == 0 and kind == 0:
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def item_key(item):
    return item.key or ".".join(item.nested_key)


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_metrics_and_config(data_dir, tmp_path):
    out = cli("evaluate", *tiny(data_dir, tmp_path, "steps=4", "eval_interval=2", "logger=wandb"))
    assert out.returncode == 0, out.stderr
    (wandb_file,) = tmp_path.glob("evaluate/*/wandb/offline-run-*/run-*.wandb")
    recs = wandb_records(wandb_file)
    history = [
        {item_key(i): json.loads(i.value_json) for i in r.history.item}
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]
    assert [h["_step"] for h in history if "train_loss" in h] == [0, 1, 2, 3]
    assert any("eval_loss" in h for h in history)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert {"mulo", "mup", "width=16", "depth=3"} <= set(run.tags)
    assert run.run_group == "mlp-depth3-steps4"
    config = {item_key(u): json.loads(u.value_json) for u in run.config.update}
    assert config["optimizer"] == "mulo" and config["width"] == 16 and config["steps"] == 4


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="evaluate",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.timeout_min == 240


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer=adamz", "unknown optimizer 'adamz'"),
        ("task=resnet", "unknown task 'resnet'"),
        ("parametrization=ntk", "unknown parametrization 'ntk'"),
        ("optimizer=mulo,nope", "unknown optimizer 'nope'"),
        ("task.width=0", "width"),
        ("task.depth=0", "depth"),
        ("steps=0", "steps"),
        ("task.data_root=/nonexistent/mulo-data", "/nonexistent/mulo-data"),
        ("optimizer.meta_weights=/nonexistent.pt", "shipped name: mulo_m, splo_m"),
        ("out_dir=/proc/mulo-out", "not writable"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(data_dir, tmp_path, override, message):
    args = tiny(data_dir, tmp_path, "steps=2")
    key = override.split("=")[0]
    args = [a for a in args if a.split("=")[0] != key] + [override]
    if "," in override:
        args = ["-m", *args]
    out = cli("evaluate", *args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_width_transfer_writes_table_plot_and_runs(data_dir, tmp_path):
    out = cli(
        "width_transfer",
        f"task.data_root={data_dir}",
        "task.eval_size=128",
        "widths=[8,16]",
        "seeds=[0,1]",
        "steps=3",
        "batch_size=32",
        f"out_dir={tmp_path}",
        "progress=false",
        "~optimizers.splo",
        "~optimizers.muadam",
        "optimizers.adamw.lrs=[0.001,0.01]",
    )
    assert out.returncode == 0, out.stderr
    (run,) = (tmp_path / "width_transfer").iterdir()
    assert len(records(run / "runs.jsonl")) == (1 + 2) * 2 * 2
    table = (run / "results.md").read_text()
    assert "| 8 |" in table and "| 16 |" in table and "adamw loss" in table
    assert (run / "width_transfer.png").stat().st_size > 1000
    assert "Table:" in out.stdout


def test_best_lr_is_chosen_per_width_by_mean_final_loss():
    from experiments.width_transfer import best_lr_runs

    def r(width, lr, seed, loss):
        return {"entry": "adamw", "width": width, "lr": lr, "seed": seed, "final_train_loss": loss}

    runs = [r(8, 0.1, 0, 1.0), r(8, 0.1, 1, 3.0), r(8, 0.01, 0, 1.5), r(8, 0.01, 1, 1.6)]
    runs += [r(16, 0.1, 0, 0.5), r(16, 0.1, 1, 0.7), r(16, 0.01, 0, float("inf"))]
    runs += [r(16, 0.01, 1, 0.1)]
    best = best_lr_runs(runs)
    assert {x["lr"] for x in best[("adamw", 8)]} == {0.01}
    assert {x["lr"] for x in best[("adamw", 16)]} == {0.1}  # a diverged seed disqualifies


def test_plot_goes_log_y_when_means_span_decades_even_if_an_error_bar_crosses_zero(
    monkeypatch, tmp_path
):
    import matplotlib.pyplot as plt

    from experiments.width_transfer import plot

    def run(entry, loss):
        return {"entry": entry, "final_train_loss": loss}

    best = {  # an unstable entry whose mean - std < 0, beside a trained and an untrained one
        ("lo", 1000): [run("lo", 0.30), run("lo", 0.32)],
        ("lo", 10000): [run("lo", 0.08), run("lo", 0.09)],
        ("unstable", 1000): [run("unstable", 0.3), run("unstable", 0.4)],
        ("unstable", 10000): [run("unstable", 7.8), run("unstable", 0.2)],
        ("floor", 1000): [run("floor", 2.3), run("floor", 2.3)],
        ("floor", 10000): [run("floor", 2.3), run("floor", 2.3)],
    }
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(best, ["lo", "unstable", "floor"], [1000, 10000], tmp_path / "p.png", axis="steps")
    (ax,) = figures[0].axes
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.slow
def test_quick_main_job_writes_the_main_jobs_outputs(data_dir, tmp_path):
    """`width_transfer quick=true`: the README's quick form of the main job, on the real data
    when the system package is installed (as in CI), else on the tiny learnable set."""
    from mulo.data import SYSTEM_DIRS

    real = SYSTEM_DIRS["fashion_mnist"].is_dir()
    data = [] if real else [f"task.data_root={data_dir}"]
    out = cli("width_transfer", "quick=true", "progress=false", f"out_dir={tmp_path}", *data)
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = (tmp_path / "width_transfer").iterdir()
    assert {"results.md", "width_transfer.png", "runs.jsonl"} <= {p.name for p in run.iterdir()}
    runs = records(run / "runs.jsonl")
    assert len(runs) == 12 and {r["width"] for r in runs} == {32, 128}
    assert {r["entry"] for r in runs} == {"mulo", "splo", "muadam", "adamw"}
    table = (run / "results.md").read_text()
    assert "60 steps" in table and "| 128 |" in table
    # a key given on the command line wins over quick's value
    out = cli("width_transfer", "quick=true", "progress=false", "widths=[16]",
              "optimizers.muadam.lrs=[0.1]", f"out_dir={tmp_path / 'b'}", *data)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = (tmp_path / "b" / "width_transfer").iterdir()
    runs = records(run / "runs.jsonl")
    assert {r["width"] for r in runs} == {16}
    assert sorted({r["lr"] for r in runs if r["entry"] == "muadam"}) == [0.1]
