"""experiments.meta_curves: meta-training curves and evaluations from run directories."""

import json

import pytest

from experiments import meta_curves


def write_run(path, steps, crashed_at=None, resumed_from=None, caught_up=True):
    """A run's metrics.jsonl as meta_train writes it: after a crash at `crashed_at` it resumes
    from the checkpoint at `resumed_from` (a marker line) and redoes the steps after it."""
    path.mkdir(parents=True)

    def record(step, loss):
        r = {"step": step, "meta_loss": loss, "seconds": 36.0}
        if step == steps:
            r |= {"eval/width": 64, "eval/steps": 5, "eval/final_train_loss": 0.5,
                  "eval/test_loss": 0.6, "eval/test_accuracy": 0.8}  # fmt: skip
        return json.dumps(r)

    last = steps if crashed_at is None else crashed_at
    lines = [record(s, 1.0) for s in range(1, last + 1)]
    if crashed_at is not None:
        lines.append(json.dumps({"step": resumed_from, "resumed_from": "checkpoint.pt"}))
        redo_to = steps if caught_up else crashed_at - 2
        lines += [record(s, 2.0) for s in range(resumed_from + 1, redo_to + 1)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": ')  # torn last line
    return path


def test_curves_table_and_plot(tmp_path):
    a = write_run(tmp_path / "mulo_m", 100, crashed_at=60, resumed_from=50)
    b = write_run(tmp_path / "splo_m", 40)
    meta_curves.main([str(a), str(b), "--out", str(tmp_path / "out"), "--window", "10"])
    md = (tmp_path / "out" / "meta_curves.md").read_text()
    # steps 51-60 were redone after the resume: counted once, and their new losses win
    assert "**mulo_m**: 100 outer steps, 1.00 h" in md and "last 10) 2.0000" in md
    assert "**splo_m**: 40 outer steps" in md and "last 10) 1.0000" in md
    assert "| 100 | 64 | 5 | 0.5000 | 0.6000 | 0.8000 |" in md
    assert (tmp_path / "out" / "meta_curves.png").stat().st_size > 1000


def test_a_resume_still_catching_up_drops_the_old_steps(tmp_path):
    run = write_run(tmp_path / "run", 100, crashed_at=60, resumed_from=50, caught_up=False)
    records = meta_curves.read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 59))  # not the stale 59, 60
    assert {r["meta_loss"] for r in records[50:]} == {2.0}


def test_missing_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        meta_curves.main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: no metrics.jsonl in")


def test_jsonl_rewind_replays_old_resume_markers(tmp_path):
    """A file from before the rule (steps repeated after a "step"-keyed marker) is cleaned by
    the next resume: each step once, markers keep their step as ``at_step``."""
    from mulo.loggers import JsonlLogger

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "meta_loss": 1.0} for s in (1, 2, 3)]
    lines += [{"step": 2, "resumed_from": "c.pt"}, {"step": 3, "meta_loss": 2.0}]
    lines += [{"step": 4, "meta_loss": 2.0}, {"step": 5, "meta_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "me')
    log = JsonlLogger(path)
    log.rewind(4)
    log.log({"step": 5, "meta_loss": 3.0})
    log.close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r.get("step"), r.get("meta_loss")) for r in recs if "step" in r] == [
        (1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 3.0)
    ]  # fmt: skip
    assert [r for r in recs if "resumed_from" in r] == [{"resumed_from": "c.pt", "at_step": 2}]
    assert [r["step"] for r in meta_curves.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
