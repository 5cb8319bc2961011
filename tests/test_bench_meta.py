"""experiments.bench_meta's ``--experiment``: it times the experiment's own meta-training
config (task mix, architecture), and an unknown name is one line and exit code 2."""

from __future__ import annotations

import pytest

from experiments import bench_meta


def test_experiment_config_is_the_experiments_own_mix_without_checkpoints():
    config = bench_meta.experiment_config("mulo_v2")
    assert config.architecture == "small_fc_lopt_v2"
    assert [(t["name"], t["width"]) for t in config.task_specs()] == [
        ("mlp", 32),
        ("mlp", 64),
        ("cnn", 16),
    ]
    assert config.max_length == 2000 and config.kind == "mu"
    assert config.checkpoint_every == 0 and config.eval_every == 0
    assert bench_meta.experiment_config("splo_v2").kind == "sp"


def test_unknown_experiment_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_meta.main(["--experiment", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown experiment 'nope'") and "\n" not in err


def test_experiment_with_flags_it_would_ignore_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_meta.main(["--experiment", "mulo_v2", "--widths", "64"])
    assert exc.value.code == 2
    assert "drop --widths" in capsys.readouterr().err
