"""experiments.feature_regimes: per-tensor shares of elements in small_fc_lopt's epsilon regimes."""

from __future__ import annotations

import pytest
from helpers import write_learnable_fashion

from experiments import feature_regimes as FR

pytestmark = pytest.mark.usefixtures("one_thread")


def test_regimes_are_fractions_per_weight_matrix_and_the_table_prints(tmp_path, capsys):
    root = write_learnable_fashion(tmp_path / "fashion")
    rows = FR.regimes(8, steps=3, data_root=root)
    assert [r[0] for r in rows] == ["input", "hidden1", "hidden2", "readout"]
    for _, median, *shares in rows:
        assert median > 0 and all(0.0 <= s <= 1.0 for s in shares)
    assert FR.main(["--widths", "8", "--steps", "2", "--data-root", str(root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("| width | tensor") and len(table) == 3 + 4


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exc:
        FR.main(["--widths", "0"])
    assert exc.value.code == 2
