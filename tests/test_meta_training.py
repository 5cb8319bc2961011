"""The outer loop: meta-training lowers the meta-loss on fresh inner runs; checkpoints resume
on the same trajectory (in process, and after SIGKILL); bad checkpoints are one-line errors."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mulo.meta import (
    CheckpointError,
    MetaConfig,
    MetaTrainer,
    MLPTask,
    QuadraticTask,
    WarmupCosine,
    load_checkpoint,
    run_meta_training,
    save_checkpoint,
)
from mulo.meta.checkpoint import prev_path

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n_train=1024, n_test=256, features=24, classes=10, seed=0):
    """Gaussian clusters: learnable by a small MLP within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, features, generator=g)

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return means[y] + 1.5 * torch.randn(n, features, generator=g), y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return xtr, ytr, xte, yte


DATA = synthetic()


def factory(kind):
    return lambda width: MLPTask(width, 3, kind, *DATA, num_classes=10, batch_size=32)


def tiny_config(**overrides):
    values = dict(
        kind="mu", widths=[16], pairs=4, truncation=10, min_length=20, max_length=60,
        max_offset=10, batch_size=32, outer_steps=40, lr_max=3e-2, lr_min=1e-2, warmup=3,
        eval_width=32, eval_steps=20, eval_seeds=2, checkpoint_every=2,
    )  # fmt: skip
    values.update(overrides)
    return MetaConfig(**values)


def make_trainer(**overrides):
    cfg = tiny_config(**overrides)
    return MetaTrainer(cfg, factory(cfg.kind))


def test_meta_training_lowers_the_meta_loss_on_fresh_inner_runs():
    trainer = make_trainer()
    fresh = dict(width=16, steps=40, seeds=8)  # held-out init and batch seeds
    before = trainer.evaluate(**fresh)
    records = [trainer.step() for _ in range(trainer.config.outer_steps)]
    after = trainer.evaluate(**fresh)
    assert all(math.isfinite(r["meta_loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert after["meta_loss"] < before["meta_loss"] - 0.1, (before, after)
    assert after["final_train_loss"] < before["final_train_loss"] - 0.2, (before, after)
    # the held-out wider task is logged beside the meta-loss
    wide = trainer.evaluate()
    assert wide["width"] == 32 and 0 <= wide["test_accuracy"] <= 1
    assert math.isfinite(wide["meta_loss"])


def test_several_widths_average_their_estimates():
    trainer = make_trainer(widths=[8, 16], outer_steps=2)
    record = trainer.step()
    assert set(record) >= {"meta_loss/w8", "meta_loss/w16", "meta_loss", "grad_norm", "lr"}
    mean = (record["meta_loss/w8"] + record["meta_loss/w16"]) / 2
    assert record["meta_loss"] == pytest.approx(mean)


def test_schedule_and_update_clipping():
    f = WarmupCosine(warmup=4, total=14, floor=0.25)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.625) and f(14) == pytest.approx(0.25) and f(99) == 0.25
    trainer = make_trainer(clip=1e-3, warmup=0, lr_max=0.5, lr_min=0.5, outer_steps=3)
    before = trainer.theta.detach().clone()
    record = trainer.step()
    assert record["update_clipped"] and record["lr"] == 0.5
    assert float((trainer.theta.detach() - before).norm()) == pytest.approx(1e-3, rel=1e-4)


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="LO kind"):
        tiny_config(kind="adam")
    with pytest.raises(ValueError, match="estimator"):
        tiny_config(estimator="reinforce")
    with pytest.raises(ValueError, match="max_length"):
        tiny_config(min_length=50, max_length=20)
    with pytest.raises(ValueError, match="unknown meta-training config keys"):
        MetaConfig.from_dict({"widths": [16], "pair": 3})
    assert MetaConfig.from_dict({"widths": (16, 32), "kind": "sp"}).widths == [16, 32]


@pytest.mark.parametrize("estimator", ["pes", "es"])
def test_resume_in_process_is_bitwise_exact(tmp_path, estimator):
    overrides = dict(widths=[8, 16], estimator=estimator, outer_steps=6, min_length=20,
                     max_length=30, max_offset=5)  # fmt: skip
    if estimator == "es":  # full unrolls every step: keep them short
        overrides.update(widths=[8], min_length=10, max_length=20)
    straight = make_trainer(**overrides)
    for _ in range(6):
        straight.step()
    if estimator == "pes":
        assert sum(p.runs_finished for p in straight.problems) > 0  # restarts were exercised

    first = make_trainer(**overrides)
    for _ in range(3):
        first.step()
    path = save_checkpoint(tmp_path / "meta.ckpt", first, extra={"note": "half-way"})
    del first
    resumed = make_trainer(**overrides)
    assert load_checkpoint(path, resumed) == {"note": "half-way"}
    assert resumed.outer_step == 3
    for _ in range(3):
        resumed.step()
    assert torch.equal(resumed.theta, straight.theta)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    for a, b in zip(resumed.problems, straight.problems, strict=True):
        assert torch.equal(a.xi, b.xi) and torch.equal(a.counter, b.counter)
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


DRIVER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_meta_training import make_trainer
from mulo.meta import run_meta_training
ckpt, out = sys.argv[1], sys.argv[2]
trainer = make_trainer(outer_steps=6, checkpoint_every=2, widths=[16], eval_every=3)

def log(record):
    print("step", record.get("step", record.get("at_step")), flush=True)
    time.sleep(0.1)  # widen the window in which the test kills the process

run_meta_training(trainer, ckpt, log=log)
torch.save(trainer.theta.detach(), out)
"""


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _driver(tmp_path, name):
    cmd = [sys.executable, "-c", DRIVER.format(tests=str(TESTS)), str(tmp_path / f"{name}.ckpt")]
    return [*cmd, str(tmp_path / f"{name}.theta")]


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_meta_parameters(tmp_path):
    straight = subprocess.run(
        _driver(tmp_path, "a"), capture_output=True, text=True, timeout=120, env=ONE_THREAD
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    expected = torch.load(tmp_path / "a.theta")

    cmd = _driver(tmp_path, "b")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD
    )
    ckpt = tmp_path / "b.ckpt"
    try:
        for line in proc.stdout:  # kill after the checkpoint of step 2, during step 3 or 4
            if line.strip() in ("step 3", "step 4") and ckpt.exists():
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists() and not (tmp_path / "b.theta").exists()
    killed_at = torch.load(ckpt, weights_only=True)["state"]["outer_step"]
    assert 2 <= killed_at < 6

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = again.stdout.split("\n")
    assert lines[:2] == [f"step {killed_at}", f"step {killed_at + 1}"]  # resumed, not restarted
    assert torch.equal(torch.load(tmp_path / "b.theta"), expected)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.set_flush_denormal(True)
    trainer = MetaTrainer(tiny_config(outer_steps=4), lambda w: QuadraticTask(batch_size=2))
    trainer.step()
    path = tmp_path_factory.mktemp("ckpt") / "meta.ckpt"
    save_checkpoint(path, trainer)
    trainer.step()
    save_checkpoint(path, trainer)  # the first one becomes meta.ckpt.prev
    return path


def quad_trainer(**overrides):
    config = tiny_config(**{"outer_steps": 4, **overrides})
    return MetaTrainer(config, lambda w: QuadraticTask(batch_size=2))


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_checkpoint_keeps_the_previous_one(saved):
    assert prev_path(saved).is_file()
    trainer = quad_trainer()
    load_checkpoint(prev_path(saved), trainer)
    assert trainer.outer_step == 1
    load_checkpoint(saved, trainer)
    assert trainer.outer_step == 2
    assert not list(saved.parent.glob("*.tmp"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"not a checkpoint at all",
        lambda raw: raw[: len(raw) // 2],  # a torn write
        lambda raw: b"",
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_corrupt_checkpoint_is_a_one_line_error(saved, tmp_path, damage):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(damage(saved.read_bytes()))
    trainer = quad_trainer()
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(bad, trainer)
    assert "corrupt" in one_line(excinfo)
    assert trainer.outer_step == 0


def test_wrong_format_or_version_is_an_error(saved, tmp_path):
    payload = torch.load(saved, weights_only=True)
    torch.save({**payload, "version": 99}, tmp_path / "v99.ckpt")
    with pytest.raises(CheckpointError, match="version 99") as excinfo:
        load_checkpoint(tmp_path / "v99.ckpt", quad_trainer())
    one_line(excinfo)
    torch.save({"format": "something-else"}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a mulo meta-training checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt", quad_trainer())
    with pytest.raises(CheckpointError, match="no meta-training checkpoint"):
        load_checkpoint(tmp_path / "missing.ckpt", quad_trainer())


@pytest.mark.parametrize(
    "overrides, field",
    [({"pairs": 3}, "pairs"), ({"kind": "sp"}, "kind"), ({"estimator": "es"}, "estimator"),
     ({"sigma": 0.02}, "sigma"), ({"widths": [16, 32]}, "widths")],
)  # fmt: skip
def test_fingerprint_mismatch_names_the_field(saved, overrides, field):
    with pytest.raises(CheckpointError, match=f"{field} = ") as excinfo:
        load_checkpoint(saved, quad_trainer(**overrides))
    assert "different configuration" in one_line(excinfo)


def test_resume_ignores_non_trajectory_settings(saved):
    trainer = quad_trainer(eval_every=7, checkpoint_every=9, chunk_size=1024)
    load_checkpoint(saved, trainer)
    assert trainer.outer_step == 2


def test_a_run_can_be_extended_with_more_outer_steps(tmp_path):
    short = quad_trainer(outer_steps=2, warmup=1)
    run_meta_training(short, tmp_path / "run.ckpt")
    longer = quad_trainer(outer_steps=4, warmup=1)
    run_meta_training(longer, tmp_path / "run.ckpt", steps=1)
    assert longer.outer_step == 3
    cfg = longer.config
    schedule = WarmupCosine(cfg.warmup, 4, cfg.lr_min / cfg.lr_max)  # stretched to 4 steps
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr_max * schedule(3))
    assert longer.scheduler.get_last_lr()[0] == longer.optimizer.param_groups[0]["lr"]


def test_run_meta_training_resumes_and_checkpoints(tmp_path):
    path = tmp_path / "run.ckpt"
    records = []
    trainer = quad_trainer(checkpoint_every=2, eval_every=0)
    run_meta_training(trainer, path, log=records.append, steps=3)
    assert trainer.outer_step == 3 and path.is_file()
    assert torch.load(path, weights_only=True)["state"]["outer_step"] == 3  # end of the call
    fresh = quad_trainer(checkpoint_every=2, eval_every=0)
    last = run_meta_training(fresh, path, log=records.append)
    assert records[3] == {"resumed_from": str(path), "at_step": 3}
    assert fresh.outer_step == 4 and last["step"] == 4


def test_meta_trained_weights_drive_the_drop_in_optimizer_like_the_functional_path():
    """What evaluation measures is what a user gets: ``MuLO(model, meta_weights=
    trainer.meta_params())`` takes the same steps as the population path."""
    import mulo
    from mulo.meta import init_particles, unroll_

    trainer = make_trainer(outer_steps=2)
    trainer.step()
    task = trainer.tasks[0]
    params, states = init_particles(task, [7], copies=1)
    model = task.template.module(0, params)
    batcher = task.make_batcher(1)
    batches = [batcher.sample_population(1, 32) for _ in range(5)]
    it = iter(batches)
    meta = {k: v[None] for k, v in trainer.meta_params().items()}
    losses = unroll_(task, meta, params, states, 5, lambda: next(it))
    opt = mulo.MuLO(model, meta_weights=trainer.meta_params())
    for (x, y), expected in zip(batches, losses[:, 0], strict=True):
        loss = torch.nn.functional.cross_entropy(model(x[0]), y[0])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.allclose(p, params[name][0], atol=1e-5), name
