"""experiments.coord_check: mean |pre-activation| per layer across widths for LO-trained models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_learnable_fashion

ROOT = Path(__file__).resolve().parents[1]


def coord(out, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.coord_check", f"out_dir={out}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.mark.slow
def test_coord_check_writes_records_table_and_plot(data_dir, tmp_path):
    done = coord(tmp_path, "widths=[8,32]", "steps=2", "batch_size=16",
                 f"task.data_root={data_dir}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    # 2 entries x 2 widths x 3 forwards (steps 0..2) x 4 layers (input, hidden1, hidden2, readout)
    assert len(records) == 2 * 2 * 3 * 4
    assert {r["entry"] for r in records} == {"mulo", "splo"}
    md = (tmp_path / "coord_check.md").read_text()
    assert md.count("| readout |") == 2 and "32 / 8" in md
    assert (tmp_path / "coord_check.png").stat().st_size > 1000


def test_coord_check_bad_width_is_one_line(tmp_path):
    done = coord(tmp_path, "widths=[0]")
    assert done.returncode == 2
    assert done.stderr.startswith("error: width must be a positive integer")
