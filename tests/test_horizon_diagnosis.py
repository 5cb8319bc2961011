"""experiments.horizon_diagnosis: the --quick path on tiny synthetic Fashion-MNIST files."""

import json

import pytest
import torch
from helpers import write_learnable_fashion

from experiments import horizon_diagnosis as HD
from mulo import MuLO, tasks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"), n_train=256, n_test=64)


@pytest.fixture
def quiet_torch():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)  # run_one turned it on; leave later tests as found


def test_quick_writes_jsonl_md_png_and_clamp_bounds_the_counter(data_dir, tmp_path, quiet_torch):
    steps, clamp = 24, 5
    HD.main(
        ["--quick", "--steps", str(steps), "--width", "8", "--batch-size", "16",
         "--eval-size", "32", "--data-root", str(data_dir), "--variants", "plain", "clamp",
         "rescale+cosine", "--clamp-at", str(clamp), "--rescale-to", "6", "--log-every", "10",
         "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    for name in ("step_rms.png", "step_rms_per_lr.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 1000
    runs = {r["variant"]: r for r in map(json.loads, (tmp_path / "runs.jsonl").open())}
    assert set(runs) == {"plain", "clamp", "rescale+cosine"}
    md = (tmp_path / "horizon_diagnosis.md").read_text()
    assert "| clamp | 0 |" in md and "thread(s)" in md and "AdamW" in md
    # the clamp keeps every counter <= clamp; plain counts every step
    assert runs["clamp"]["state_t_max"] == clamp and runs["clamp"]["feature_t_max"] == clamp
    assert runs["plain"]["state_t_max"] == steps and runs["plain"]["feature_t_max"] == steps - 1
    # rescale: the features saw t * 6 / steps, at most (steps - 1) * 6 / steps
    assert runs["rescale+cosine"]["feature_t_max"] == pytest.approx((steps - 1) * 6 / steps)
    c = runs["plain"]["curves"]
    assert c["step"] == [0, 1, 2, 4, 8, 10, 16, 20, steps - 1]
    assert set(c["rms"]) == set(runs["plain"]["roles"]) and all(
        len(v) == len(c["step"]) and min(v) > 0 for v in c["rms"].values()
    )
    lr = runs["rescale+cosine"]["curves"]["lr"]
    assert lr[-1] == 0 and max(lr) == 1  # warmup to 1, cosine to 0
    assert runs["plain"]["final_train_loss"] < runs["plain"]["initial_train_loss"]
    # a second call finds the finished runs and skips them
    before = (tmp_path / "runs.jsonl").read_text()
    HD.main(["--quick", "--steps", str(steps), "--width", "8", "--batch-size", "16",
             "--eval-size", "32", "--data-root", str(data_dir), "--variants", "plain", "clamp",
             "--clamp-at", str(clamp), "--log-every", "10", "--out", str(tmp_path),
             "--no-progress"])  # fmt: skip
    assert (tmp_path / "runs.jsonl").read_text() == before


def test_clamp_hook_keeps_state_step_at_most_the_clamp_after_every_step(data_dir, quiet_torch):
    task = tasks.build_task(
        "mlp", width=8, depth=2, batch_size=16, data_root=data_dir, eval_size=32, seed=0
    )
    opt = MuLO(task.model)
    clock = HD.TimeControl(opt, steps=12, clamp_at=3, rescale_to=None)
    for t in range(12):
        x, y = task.sample()
        opt.zero_grad()
        task.loss(task.model(x), y).backward()
        opt.step()
        counters = [s["step"] for s in opt.state.values()]
        assert len(counters) == len(list(task.model.parameters()))
        assert all(float(c.max()) == min(t + 1, 3) for c in counters)
    assert clock.feature_t_max == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variants", "plain", "warp"], "unknown variant 'warp'"),
        (["--variants", "clamp+rescale"], "alternatives"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--seeds", "a"], "--seeds must be integers"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        HD.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
