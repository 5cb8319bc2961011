"""Every app refuses bad overrides before any work, in one line on stderr with exit code 2:
unknown keys (with the closest valid one), values of the wrong type, non-finite or negative
numbers, devices this machine lacks, and sizes that cannot fit in memory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = ("evaluate", "width_transfer", "transfer_study", "meta_train", "coord_check")


def run_app(app: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{app}", f"out_dir={tmp_path}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


TYPO = {  # app -> (a typo of one of its keys, the key it should suggest)
    "evaluate": ("stesp=20", "steps"),
    "width_transfer": ("widhts=[64]", "widths"),
    "transfer_study": ("studeis=[width]", "studies"),
    "meta_train": ("meta.outer_stpes=3", "meta.outer_steps"),
    "coord_check": ("widhts=[64]", "widths"),
}


@pytest.mark.parametrize("app", APPS)
def test_unknown_key_names_the_closest_valid_one(app, tmp_path):
    typo, suggestion = TYPO[app]
    line = one_line_error(run_app(app, typo, tmp_path=tmp_path))
    assert f"unknown key {typo.split('=')[0]!r}" in line
    assert f"did you mean {suggestion}?" in line
    assert "+" + typo not in line  # Hydra's advice, the wrong fix for a typo
    assert list(tmp_path.iterdir()) == []  # nothing ran


CASES = [  # (app, overrides, words the line must contain)
    ("evaluate", ["task.width=10000000"], ["task.width=10000000", "GiB"]),
    ("evaluate", ["batch_size=100000000"], ["batch_size=100000000", "GiB"]),
    ("meta_train", ["meta.widths=[10000000]"], ["meta.widths", "GiB"]),
    ("meta_train", ["meta.eval_width=10000000"], ["meta.eval_width=10000000", "GiB"]),
    ("width_transfer", ["widths=[64,10000000]"], ["widths", "GiB"]),
    ("evaluate", ["device=cuda"], ["device=cuda", "no CUDA device"]),
    ("evaluate", ["device=bogus"], ["device='bogus'", "not a device"]),
    ("meta_train", ["meta.device=cuda"], ["meta.device=cuda"]),
    ("evaluate", ["eval_interval=-1"], ["eval_interval must be >= 0"]),
    ("evaluate", ["task.output_mult=nan"], ["task.output_mult", "finite"]),
    ("evaluate", ["seed=abc"], ["seed must be an integer", "'abc'"]),
    ("evaluate", ["-m", "task.width=64,abc"], ["task.width must be an integer", "'abc'"]),
    ("evaluate", ["progress=maybe"], ["progress must be true or false"]),
    ("coord_check", ["widths=[64,x]"], ["each entry of widths must be an integer"]),
]


@pytest.mark.parametrize(("app", "overrides", "words"), CASES, ids=lambda c: str(c))
def test_bad_override_is_one_line_and_exit_2(app, overrides, words, tmp_path):
    line = one_line_error(run_app(app, *overrides, tmp_path=tmp_path))
    for word in words:
        assert word in line, line
    assert list(tmp_path.iterdir()) == []


def test_memory_estimate_counts_the_real_network():
    """The estimate builds the task's network on the meta device: its parameter count is the
    real one, and it grows with the population and the batch as it should."""
    import parametrizations as P
    from mulo import tasks

    params, acts = tasks.memory_estimate("mlp", width=64, depth=3, batch_size=8, state_floats=1)
    real = sum(p.numel() for p in P.mlp(196, 64, 3, 10).parameters())
    assert params == 4 * real
    params2, acts2 = tasks.memory_estimate(
        "mlp", width=64, depth=3, batch_size=16, population=3, state_floats=1
    )
    assert params2 == 3 * params and acts2 == 6 * acts
    cnn, _ = tasks.memory_estimate("cnn", width=8, depth=2, batch_size=1, state_floats=1)
    assert cnn == 4 * sum(p.numel() for p in P.cnn(1, 8, 2, 10, 14).parameters())
