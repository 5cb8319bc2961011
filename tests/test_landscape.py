"""experiments.landscape: filter-normalised directions, the trajectory's PCA plane, the loss
probes, and one tiny run from the command line (JSON grids, PNGs, bad input)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_learnable_fashion
from test_experiments import cli

from experiments import landscape as L
from mulo import tasks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"))


def test_filter_normalised_rows_match_the_weights_and_vectors_are_zero():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Conv2d(4, 3, 2))
    d = L.filter_normalised(model, torch.Generator().manual_seed(1))
    start = 0
    for p in model.parameters():
        part = d[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
        if p.dim() < 2:
            assert torch.count_nonzero(part) == 0
            continue
        rows, want = part.reshape(p.shape[0], -1), p.detach().reshape(p.shape[0], -1)
        torch.testing.assert_close(rows.norm(dim=1), want.norm(dim=1))
        assert not torch.allclose(rows, want)  # a random direction, not the weights
    assert start == d.numel()


def test_pca_plane_holds_a_planar_trajectory():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(50, 2, generator=gen)).Q.T  # two orthonormal [50]
    final = torch.randn(50, generator=gen)
    coefficients = torch.randn(12, 2, generator=gen) * torch.tensor([5.0, 1.0])
    trajectory = final + coefficients @ basis
    pcs, share = L.pca_directions(trajectory, final)
    projected = (trajectory - final) @ pcs.T @ pcs
    torch.testing.assert_close(projected, trajectory - final, atol=1e-4, rtol=1e-4)
    assert share[0] > share[1] and sum(share) == pytest.approx(1.0, abs=1e-5)


def test_probes_read_the_loss_at_the_given_weights(data_dir):
    task = tasks.build_task("mlp", width=8, depth=2, data_root=data_dir, eval_size=16)
    bar = L.tqdm(disable=True)
    probe = L.LossProbe(task, 64, bar)
    init = L.flat(task.model)
    with torch.no_grad():
        direct = task.loss(task.model(probe.x), probe.y).item()
    other = init + 0.5 * torch.randn(init.shape)
    assert probe(init) == pytest.approx(direct)
    line = L.line(probe, init, other - init, [0.0, 1.0])
    assert line[0] == pytest.approx(direct) and line[1] == pytest.approx(probe(other))
    assert line[1] != pytest.approx(direct)
    grid = L.plane(probe, init, other - init, torch.zeros_like(init), [0.0, 1.0], [-1.0, 0.0, 1.0])
    assert len(grid) == 3 and all(row == pytest.approx(line) for row in grid)


def test_probing_does_not_change_the_training_stream(data_dir):
    a = tasks.build_task("mlp", width=8, depth=2, data_root=data_dir, eval_size=16)
    b = tasks.build_task("mlp", width=8, depth=2, data_root=data_dir, eval_size=16)
    L.LossProbe(a, 64, L.tqdm(disable=True))
    assert torch.equal(a.sample()[0], b.sample()[0])


@pytest.mark.slow
def test_landscape_cli_writes_grids_and_figures(data_dir, tmp_path):
    out = tmp_path / "ls"
    args = [f"task.data_root={data_dir}", "task.width=16", "task.eval_size=64", "batch_size=32",
            f"out_dir={out}", "progress=false", "steps=30", "snapshot_every=10",
            "line_points=5", "plane_points=3", "loss_examples=64",
            "optimizers.adamw.optimizer.schedule.warmup=5"]  # fmt: skip
    result = cli("landscape", *args)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "landscape.json").read_text())
    assert set(record["results"]) == {"mulo", "splo", "adamw"}
    for r in record["results"].values():
        assert len(r["interpolation"]["loss"]) == 5
        assert len(r["distance"]) == 8 and all(d > 0 for d in r["distance"].values())
        plane = r["random_plane"]["loss"]
        assert len(plane) == 3 and all(len(row) == 3 for row in plane)
        # the grids' centres and the random line's middle are all the final weights
        assert plane[1][1] == pytest.approx(r["random_line"]["loss"][2])
        assert len(r["pca_plane"]["trajectory"]) == 4  # init + steps 10, 20, 30
        assert r["pca_plane"]["trajectory"][-1] == pytest.approx([0.0, 0.0], abs=1e-5)
    for name in ("1d", "random_2d", "pca_2d"):
        assert (out / f"landscape_{name}.png").stat().st_size > 1000
    bad = cli("landscape", *args, "snapshot_every=20")
    assert bad.returncode == 2 and "snapshots" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
