"""Two processes (gloo, CPU) split the antithetic pairs and all-reduce the rows: the estimate,
the meta-parameters after outer steps and the checkpointed state equal the single-process
run with the same seed."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks

from mulo.meta import MetaConfig, MetaTrainer, MLPTask, load_checkpoint, pair_range

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


# Rank 0 first computes the single-process reference (world of one, no process group), then
# both ranks join the group and repeat the same computation with the pairs split.
DRIVER = """
import os, sys, torch
from mulo.meta import MetaConfig, MetaTrainer, MLPTask, init_distributed, save_checkpoint
from mulo.meta.distributed import shutdown

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
y = torch.randint(0, 4, (256,), generator=g)
x = torch.randn(256, 12, generator=g) + y[:, None].float()
factory = lambda w: MLPTask(w, 3, "mu", x, y, batch_size=16)

def config(estimator):
    return MetaConfig(widths=[8, 16], pairs=5, truncation=5, min_length=10, max_length=15,
                      max_offset=3, batch_size=16, outer_steps=10, warmup=2, lr_max=1e-2,
                      estimator=estimator, seed=3)

def run(rank, world, tag):
    result = {}
    for estimator in ("pes", "es"):
        a = MetaTrainer(config(estimator), factory, rank=rank, world_size=world)
        result[estimator + "/estimate"] = a.estimate()[0]
        b = MetaTrainer(config(estimator), factory, rank=rank, world_size=world)
        for _ in range(3):
            b.step()
        result[estimator + "/theta"] = b.theta.detach().clone()
        if estimator == "pes":
            save_checkpoint(out + "." + tag + ".ckpt", b)
            result["restarts"] = sum(p.runs_finished for p in b.problems)
    return result

rank = int(os.environ["RANK"])
if rank == 0:
    reference = run(0, 1, "single")
rank, world = init_distributed(backend="gloo", init_method=os.environ["TEST_INIT_METHOD"])
assert world == 2
result = run(rank, world, "multi")
if rank == 0:
    torch.save({"single": reference, "multi": result}, out)
shutdown()
"""


def test_pair_blocks_cover_every_pair_once():
    for pairs in (1, 5, 8):
        for world in (1, 2, 3):
            blocks = [pair_range(pairs, r, world) for r in range(world)]
            covered = [i for lo, hi in blocks for i in range(lo, hi)]
            assert covered == list(range(pairs))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path):
    out = tmp_path / "result.pt"
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "TEST_INIT_METHOD": f"file://{tmp_path / 'rendezvous'}",
        "OMP_NUM_THREADS": "1",  # two processes on a small machine; same math in both
    }
    for code, err in run_ranks(DRIVER, [out], env):
        assert code == 0, err[-3000:]
    result = torch.load(out, weights_only=True)
    single, multi = result["single"], result["multi"]
    assert single["restarts"] > 0 and multi["restarts"] == single["restarts"]
    for key in ("pes/estimate", "es/estimate", "pes/theta", "es/theta"):
        assert single[key].abs().sum() > 0
        # A pair's row is computed by one rank and all-reduced against zeros (exact), then the
        # rows are summed in the single-process order. So the result is bitwise the same as
        # long as each particle's math does not depend on the population size (true of
        # torch's CPU kernels; the truncation mean is taken in float64 to make sure).
        assert torch.equal(multi[key], single[key]), key

    # the 2-process checkpoint holds the whole population and resumes in one process
    ckpt = torch.load(f"{out}.multi.ckpt", weights_only=True)["state"]
    ref = torch.load(f"{out}.single.ckpt", weights_only=True)["state"]
    for got, want in zip(ckpt["problems"], ref["problems"], strict=True):
        assert torch.equal(got["counter"], want["counter"]) and torch.equal(got["xi"], want["xi"])
        for name, tensor in want["params"].items():
            assert got["params"][name].shape == tensor.shape
            assert torch.equal(got["params"][name], tensor)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (256,), generator=g)
    x = torch.randn(256, 12, generator=g) + y[:, None].float()
    cfg = MetaConfig(
        widths=[8, 16], pairs=5, truncation=5, min_length=10, max_length=15, max_offset=3,
        batch_size=16, outer_steps=10, warmup=2, lr_max=1e-2, estimator="pes", seed=3,
    )  # fmt: skip
    trainer = MetaTrainer(cfg, lambda w: MLPTask(w, 3, "mu", x, y, batch_size=16))
    load_checkpoint(f"{out}.multi.ckpt", trainer)
    assert trainer.outer_step == 3
    assert trainer.step()["step"] == 4
