"""experiments.meta_train from the command line: runs, resumes with the same command, exports
loadable meta-weights with provenance, runs under torchrun, and rejects bad input in one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_learnable_fashion

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "meta.widths=[8]",
    "meta.pairs=2",
    "meta.truncation=5",
    "meta.min_length=10",
    "meta.max_length=20",
    "meta.max_offset=3",
    "meta.batch_size=16",
    "meta.warmup=1",
    "meta.eval_every=2",
    "meta.eval_width=16",
    "meta.eval_steps=5",
    "meta.eval_seeds=1",
    "meta.checkpoint_every=1",
    "progress=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"))


def meta_train(*args, launcher=(sys.executable, "-m")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*launcher, "experiments.meta_train", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.slow
def test_runs_resumes_with_the_same_command_and_exports_weights(data_dir, tmp_path):
    args = [f"meta.data_root={data_dir}", f"out_dir={tmp_path}", *TINY]
    first = meta_train("experiment=mulo_s", "meta.outer_steps=2", *args)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "meta_train" / "mulo_s"
    assert [r["step"] for r in records(run / "metrics.jsonl") if "meta_loss" in r] == [1, 2]
    assert any("eval/final_loss" in r or any(k.startswith("eval/") for k in r)
               for r in records(run / "metrics.jsonl"))  # fmt: skip

    again = meta_train("experiment=mulo_s", "meta.outer_steps=4", *args)
    assert again.returncode == 0, again.stderr
    recs = records(run / "metrics.jsonl")
    assert any(r.get("resumed_from") for r in recs)
    assert [r["step"] for r in recs if "meta_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "step" in r] == [1, 2, 3, 4]  # each step once

    import mulo
    import parametrizations as P

    meta, provenance = mulo.load_meta_weights(run / "meta_weights.pt")
    assert provenance["outer_steps"] == 4 and provenance["config"]["kind"] == "mu"
    # every held-out evaluation (eval_every=2) keeps the weights it measured
    snapshots = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snapshots == ["meta_weights_00002.pt", "meta_weights_00004.pt"]
    _, at_2 = mulo.load_meta_weights(run / "snapshots" / "meta_weights_00002.pt")
    assert at_2["outer_steps"] == 2
    assert provenance["name"] == "mulo_s" and len(provenance["commit"]) >= 7
    model = P.mlp(12, 16, 2, 3)
    opt = mulo.MuLO(model, meta_weights=run / "meta_weights.pt")
    model(torch.randn(4, 12)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_runs_under_torchrun_with_two_processes(data_dir, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    args = [f"meta.data_root={data_dir}", f"out_dir={tmp_path}", *TINY, "meta.eval_every=0"]
    out = meta_train(
        "experiment=splo_s",
        "meta.outer_steps=2",
        *args,
        launcher=(torchrun, "--standalone", "--nproc_per_node=2", "-m"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    recs = records(tmp_path / "meta_train" / "splo_s" / "metrics.jsonl")
    assert [r["step"] for r in recs if "meta_loss" in r] == [1, 2]  # rank 0 logs once
    assert "2 process(es)" in out.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("experiment=mulo_xl", "unknown experiment 'mulo_xl'"),
        ("meta.estimator=reinforce", "estimator"),
        ("meta.pairs=0", "pairs"),
        ("meta.widths=[]", "width"),
    ],
)
def test_bad_input_is_one_line(tmp_path, override, message):
    out = meta_train(f"out_dir={tmp_path}", "meta.outer_steps=1", *TINY, override)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_corrupt_checkpoint_is_an_error_not_a_silent_restart(data_dir, tmp_path):
    run = tmp_path / "meta_train" / "mulo_s"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    out = meta_train("meta.outer_steps=1", f"meta.data_root={data_dir}", f"out_dir={tmp_path}",
                     *TINY)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "checkpoint" in out.stderr
    assert (run / "checkpoint.pt").read_bytes() == b"not a checkpoint"


@pytest.mark.slow
def test_resume_after_a_crash_logs_each_step_once(data_dir, tmp_path):
    """Records written after the last checkpoint (then a kill) are redone on resume: the file
    keeps the redone ones only, so readers (meta_curves, W&B replays) see each step once."""
    args = [f"meta.data_root={data_dir}", f"out_dir={tmp_path}", *TINY]
    first = meta_train("experiment=mulo_s", "meta.outer_steps=2", *args)
    assert first.returncode == 0, first.stderr
    metrics = tmp_path / "meta_train" / "mulo_s" / "metrics.jsonl"
    with metrics.open("a") as f:  # what a run killed during step 4 leaves behind
        f.write(json.dumps({"step": 3, "meta_loss": -1.0}) + "\n" + '{"step": 4, "meta_lo')
    again = meta_train("experiment=mulo_s", "meta.outer_steps=4", *args)
    assert again.returncode == 0, again.stderr
    recs = records(metrics)
    steps = [r["step"] for r in recs if "step" in r]
    assert steps == [1, 2, 3, 4]
    assert all(r["meta_loss"] != -1.0 for r in recs if "meta_loss" in r)
    assert [r["at_step"] for r in recs if "resumed_from" in r] == [2]


@pytest.mark.slow
def test_orphaned_prev_checkpoint_is_never_overwritten(data_dir, tmp_path):
    """checkpoint.pt gone, checkpoint.pt.prev present: restarting from step 1 would later
    overwrite .prev, the only good copy. One line naming both ways out, exit 2."""
    args = [f"meta.data_root={data_dir}", f"out_dir={tmp_path}", *TINY]
    first = meta_train("experiment=mulo_s", "meta.outer_steps=2", *args)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "meta_train" / "mulo_s"
    prev = run / "checkpoint.pt.prev"
    assert prev.is_file()
    (run / "checkpoint.pt").unlink()
    kept = prev.read_bytes()
    again = meta_train("experiment=mulo_s", "meta.outer_steps=4", *args)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.pt.prev" in lines[0] and "fresh=true" in lines[0]
    assert "mv " in lines[0]
    assert prev.read_bytes() == kept and not (run / "checkpoint.pt").exists()


@pytest.mark.slow
def test_rerunning_a_finished_run_leaves_it_untouched(data_dir, tmp_path):
    args = [f"meta.data_root={data_dir}", f"out_dir={tmp_path}", *TINY]
    first = meta_train("experiment=mulo_s", "meta.outer_steps=2", *args)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "meta_train" / "mulo_s"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = meta_train("experiment=mulo_s", "meta.outer_steps=2", *args)
    assert again.returncode == 0, again.stderr
    assert "already finished (2 of 2 outer steps)" in again.stdout
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    import mulo

    _, provenance = mulo.load_meta_weights(run / "meta_weights.pt")
    assert provenance["final_meta_loss"] is not None
