"""Self-training (``meta.outer_optimizer``): the outer loop updated by a learned optimizer, the
one being meta-trained (``self``) or a fixed one, instead of AdamW; resumable like AdamW."""

from __future__ import annotations

import pytest
import torch
from test_meta_training import make_trainer

import mulo
from mulo.meta import MetaConfig, load_checkpoint, save_checkpoint
from mulo.meta.estimators import unflatten_meta

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(widths=[8], outer_steps=4, min_length=20, max_length=30, max_offset=5)


def test_the_default_stays_adamw_and_old_checkpoints_still_match():
    cfg = MetaConfig()
    assert cfg.outer_optimizer == "adamw"
    assert "outer_optimizer" not in cfg.fingerprint()  # a checkpoint from before still resumes
    assert "outer_optimizer" in MetaConfig(outer_optimizer="self").fingerprint()


@pytest.mark.parametrize("outer", ["self", "mulo_m"])
def test_a_learned_outer_optimizer_moves_theta_differently_from_adamw(outer):
    adamw, learned = make_trainer(**SMALL), make_trainer(**SMALL, outer_optimizer=outer)
    assert torch.equal(adamw.theta, learned.theta)
    start = learned.theta.detach().clone()
    record = learned.step()
    adamw.step()
    assert isinstance(learned.optimizer, mulo.MuLO)  # kind mu
    assert not torch.equal(learned.theta, start)
    assert not torch.allclose(learned.theta, adamw.theta)
    assert record["update_norm"] <= learned.config.clip + 1e-6
    # each meta-tensor is its own parameter of the outer LO, in θ's order
    meta = unflatten_meta(learned.theta.detach(), learned.arch)
    for p, value in zip(learned._outer_params, meta.values(), strict=True):
        assert torch.equal(p.detach(), value)


def test_self_reads_the_current_theta_each_step():
    trainer = make_trainer(**SMALL, outer_optimizer="self")
    trainer.step()
    trainer.step()
    meta = unflatten_meta(trainer.theta.detach(), trainer.arch)
    used = trainer.optimizer.meta
    # the LO that made the last step is θ from before that step, not the initial θ
    assert not all(torch.equal(used[k], v) for k, v in meta.items())
    first = make_trainer(**SMALL, outer_optimizer="self")
    init = unflatten_meta(first.theta.detach(), first.arch)
    assert not all(torch.equal(used[k], init[k]) for k in init)


def test_resume_with_a_learned_outer_optimizer_is_bitwise_exact(tmp_path):
    straight = make_trainer(**SMALL, outer_optimizer="self")
    for _ in range(4):
        straight.step()
    first = make_trainer(**SMALL, outer_optimizer="self")
    for _ in range(2):
        first.step()
    path = save_checkpoint(tmp_path / "meta.ckpt", first)
    resumed = make_trainer(**SMALL, outer_optimizer="self")
    load_checkpoint(path, resumed)
    for _ in range(2):
        resumed.step()
    assert torch.equal(resumed.theta, straight.theta)


@pytest.mark.parametrize("bad", ["", "no-such-weights"])
def test_an_unknown_outer_optimizer_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="outer_optimizer|unknown meta-weights"):
        make_trainer(**SMALL, outer_optimizer=bad)
