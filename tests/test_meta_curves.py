"""experiments.meta_curves: meta-training curves and evaluations from run directories."""

import json

import pytest

from experiments import meta_curves


def write_run(path, steps, resumed_at=None):
    path.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "meta_loss": 3.0 - step / steps, "seconds": 36.0}
        if step == steps:
            record |= {"eval/width": 64, "eval/steps": 5, "eval/final_train_loss": 0.5,
                       "eval/test_loss": 0.6, "eval/test_accuracy": 0.8}  # fmt: skip
        lines.append(json.dumps(record))
        if step == resumed_at:  # a resume logs a marker and rewrites the later steps
            lines += [json.dumps({"step": step, "resumed_from": "checkpoint.pt"})]
            lines += [json.dumps({"step": step + 1, "meta_loss": 99.0})]
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": ')  # torn last line
    return path


def test_curves_table_and_plot(tmp_path, capsys):
    a = write_run(tmp_path / "mulo_m", 100, resumed_at=50)
    b = write_run(tmp_path / "splo_m", 40)
    meta_curves.main([str(a), str(b), "--out", str(tmp_path / "out"), "--window", "10"])
    md = (tmp_path / "out" / "meta_curves.md").read_text()
    assert "**mulo_m**: 100 outer steps, 1.00 h" in md  # the rewritten step 51 replaced 99.0
    assert "**splo_m**: 40 outer steps" in md
    assert "| 100 | 64 | 5 | 0.5000 | 0.6000 | 0.8000 |" in md
    assert (tmp_path / "out" / "meta_curves.png").stat().st_size > 1000


def test_missing_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        meta_curves.main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no metrics.jsonl in")
