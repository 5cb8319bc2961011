"""Every app refuses bad overrides before any work, in one line on stderr with exit code 2:
unknown keys (with the closest valid one), values of the wrong type, non-finite or negative
numbers, devices this machine lacks, and sizes that cannot fit in memory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_concurrently

ROOT = Path(__file__).resolve().parents[1]
APPS = ("evaluate", "width_transfer", "transfer_study", "meta_train", "coord_check")


def command(app: str, *args: str, out: Path) -> list[str]:
    return [sys.executable, "-m", f"experiments.{app}", f"out_dir={out}", *args]


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


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every case of this file, run once and side by side: {case id: (result, its out_dir)}."""
    cases = {f"typo-{app}": (app, [TYPO[app][0]]) for app in APPS}
    cases |= {case_id(c): c[:2] for c in CASES}
    outs = {key: tmp_path_factory.mktemp("out") for key in cases}
    commands = [command(app, *args, out=outs[key]) for key, (app, args) in cases.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run_concurrently(commands, cwd=ROOT, env=env)
    return {key: (result, outs[key]) for key, result in zip(cases, done, strict=True)}


@pytest.mark.parametrize("app", APPS)
def test_unknown_key_names_the_closest_valid_one(app, results):
    typo, suggestion = TYPO[app]
    result, out = results[f"typo-{app}"]
    line = one_line_error(result)
    assert f"unknown key {typo.split('=')[0]!r}" in line
    assert f"did you mean {suggestion}?" in line
    assert "+" + typo not in line  # Hydra's advice, the wrong fix for a typo
    assert list(out.iterdir()) == []  # nothing ran


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


def case_id(case) -> str:
    return f"{case[0]}:{' '.join(case[1])}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_override_is_one_line_and_exit_2(case, results):
    result, out = results[case_id(case)]
    line = one_line_error(result)
    for word in case[2]:
        assert word in line, line
    assert list(out.iterdir()) == []


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


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("meta_train", ["name=probe", "meta.lr_max=1e-3", "experiment=mulo_v2"]),
        ("evaluate", ["-m", "optimizer=mulo,adamw", "task.width=8,16", "+extra=1"]),
        ("study", ["studies=[width]", "study.width.values=[8,16]"]),
    ],
)
def test_valid_overrides_pass_the_check(config, overrides):
    """Keys whose default only resolves inside Hydra (name: ${hydra:...}), sweeps and new
    keys are not errors."""
    from experiments._cli import check_overrides

    check_overrides(overrides, config)
