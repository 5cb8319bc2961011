"""Meta-training v2 and the task mix: horizons told to the LO, weight-rescaling augmentation,
the weighted task mix, and a v2 run that resumes exactly."""

import copy
import math

import pytest
import torch
from helpers import write_learnable_fashion

from mulo import functional as LF
from mulo.meta import (
    InnerProblem,
    MetaConfig,
    MetaTrainer,
    QuadraticTask,
    init_particles,
    load_checkpoint,
    save_checkpoint,
    unroll_,
)
from mulo.meta.estimators import flatten_meta, num_meta, rescaled, unflatten_meta

pytestmark = pytest.mark.usefixtures("one_thread")
V2 = "small_fc_lopt_v2"


def quad_problem(**kw):
    task = QuadraticTask(noise=0.1, init_std=0.5, dtype=torch.float32)
    args = dict(pairs=8, truncation=5, min_length=10, max_length=40, max_offset=5, seed=3)
    return InnerProblem(task, architecture=V2, **{**args, **kw})


def v2_theta():
    return flatten_meta(LF.init_meta_params(architecture=V2, generator=torch.Generator()))


def test_v2_flat_vector_round_trips():
    meta = LF.init_meta_params(architecture=V2, generator=torch.Generator().manual_seed(1))
    flat = flatten_meta(meta)
    assert flat.shape == (num_meta(V2),) == (32 * 41 + 32 + 32 * 32 + 32 + 64 + 2 + 7 + 3,)
    back = unflatten_meta(flat, V2)
    assert all(torch.equal(back[k], meta[k]) for k in meta)


def test_pes_tells_each_run_its_length_or_nothing():
    prob = quad_problem(unknown_horizon=0.5)
    span = prob.truncation * torch.ceil((prob.length - prob.offset) / prob.truncation)
    horizon = next(iter(prob.states.values())).horizon
    per_pair = horizon[0::2]
    assert torch.equal(horizon[0::2], horizon[1::2])  # antithetic partners share it
    known = per_pair > 0
    assert 0 < known.sum() < prob.pairs  # both modes occur
    assert torch.equal(per_pair[known], span[known].float())
    theta = v2_theta()
    for _ in range(12):  # runs end and restart: their new horizons follow their new lengths
        prob.rows(theta)
    span = prob.truncation * torch.ceil((prob.length - prob.offset) / prob.truncation)
    per_pair = next(iter(prob.states.values())).horizon[0::2]
    known = per_pair > 0
    assert prob.runs_finished > 0 and torch.equal(per_pair[known], span[known].float())


def test_unknown_horizon_zero_tells_every_run():
    prob = quad_problem(unknown_horizon=0.0)
    assert (next(iter(prob.states.values())).horizon > 0).all()


def test_v1_problems_draw_no_horizons():
    task = QuadraticTask()
    prob = InnerProblem(task, pairs=2, truncation=2, min_length=4, max_length=8, max_offset=1)
    assert next(iter(prob.states.values())).horizon is None


def test_augmentation_reparametrises_the_task():
    """With factors s, the model runs on s * p and the LO sees the chain-rule gradient s * g:
    an unroll of the augmented task equals the plain task on rescaled parameters, to first order
    in the LO's step (checked exactly on the gradients of one step)."""
    task = QuadraticTask(noise=0.0, init_std=1.0, dtype=torch.float64)
    params, _ = init_particles(task, [0, 1], copies=1)
    factors = torch.tensor([[10.0, 0.1], [1e-3, 1e3]], dtype=torch.float64)
    x, _ = task.make_batcher(0).sample_population(2, 4)
    _, plain = task.grads(rescaled(params, factors, list(task.scales)), x, None)
    seen = {}

    class Spy(QuadraticTask):
        def grads(self, p, x, y=None):
            seen["p"] = p
            return super().grads(p, x, y)

    spy = Spy(noise=0.0, init_std=1.0, dtype=torch.float64)
    meta = LF.init_meta_params(population=2, architecture=V2, dtype=torch.float64)
    states = {k: LF.init_state(v) for k, v in params.items()}
    before = copy.deepcopy(params)
    unroll_(spy, meta, params, states, 1, lambda: (x, None), factors=factors)
    for k, name in enumerate(before):
        s = factors[:, k].reshape(-1, *[1] * (before[name].dim() - 1))
        torch.testing.assert_close(seen["p"][name], before[name] * s)
        # the LO's first m update saw s * g (m = (1 - beta) * g_seen)
        w = 1 - LF.decays(meta["theta"])[:, 0].reshape(-1, *[1] * (before[name].dim() - 1))
        torch.testing.assert_close(states[name].m[:, 0], w * plain[name] * s)


def test_augmentation_factors_are_log_uniform_per_pair_and_tensor_and_resume():
    prob = quad_problem(augment=(1e-3, 1e3))
    f = prob.factors
    assert f.shape == (8, 2) and (f >= 1e-3).all() and (f <= 1e3).all()
    assert f.log().std() > 1.0  # spread over decades, not near 1
    theta = v2_theta()
    prob.rows(theta)
    saved = copy.deepcopy(prob.state_dict())
    after = prob.rows(theta)[0]
    other = quad_problem(augment=(1e-3, 1e3))
    other.load_state_dict(saved)
    assert torch.equal(other.factors, prob.factors) or prob.runs_finished
    assert torch.equal(other.rows(theta)[0], after)


def test_task_mix_config_is_checked():
    cfg = MetaConfig(tasks=[{"name": "cnn", "width": 8}, {"name": "mlp", "width": 16, "weight": 2}])
    assert [t["name"] for t in cfg.task_specs()] == ["cnn", "mlp"]
    assert cfg.task_specs()[0]["depth"] == cfg.depth and cfg.task_specs()[1]["weight"] == 2.0
    assert [t["width"] for t in MetaConfig(widths=[8, 16]).task_specs()] == [8, 16]
    for bad, match in [
        ({"name": "rnn", "width": 8}, "unknown meta-training task"),
        ({"name": "mlp"}, "needs name and width"),
        ({"name": "mlp", "width": 8, "colour": 1}, "needs name and width"),
        ({"name": "mlp", "width": 8, "weight": 0}, "weight must be > 0"),
        ({"name": "mlp", "width": 0}, "width must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            MetaConfig(tasks=[bad])
    with pytest.raises(ValueError, match="architecture"):
        MetaConfig(architecture="big_lopt")
    with pytest.raises(ValueError, match="augment"):
        MetaConfig(augment=[10.0, 1.0])


def test_old_checkpoints_keep_their_fingerprint():
    """v1 runs written before the mix existed resume: default new fields are not fingerprinted."""
    fp = MetaConfig().fingerprint()
    assert not set(MetaConfig.NEW_DEFAULTS) & set(fp)
    assert "architecture" in MetaConfig(architecture=V2).fingerprint()


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"), n_train=256, n_test=64)


def mix_config(fashion, **kw):
    values = dict(
        kind="mu", architecture=V2, pairs=2, truncation=3, min_length=4, max_length=12,
        max_offset=2, batch_size=16, outer_steps=4, warmup=1, checkpoint_every=0,
        data_root=str(fashion), image_pool=4,
        tasks=[{"name": "mlp", "width": 8, "weight": 3.0}, {"name": "cnn", "width": 4, "depth": 1}],
    )  # fmt: skip
    values.update(kw)
    return MetaConfig(**values)


def test_task_mix_estimate_is_the_weighted_mean(fashion):
    trainer = MetaTrainer(mix_config(fashion))
    assert trainer.task_keys() == ["w8", "cnn_w4"]
    twin = copy.deepcopy(trainer)
    grad, stats = trainer.estimate()
    theta = twin.theta.detach()
    per_task = [p.rows(theta)[0][:, : trainer.num_meta].sum(0) / 2 for p in twin.problems]
    expected = (3 * per_task[0] + per_task[1]) / 4
    torch.testing.assert_close(grad.double(), expected.to(grad.device).double())
    assert set(stats) >= {"meta_loss/w8", "meta_loss/cnn_w4", "meta_loss"}


def test_v2_mix_run_resumes_bitwise(fashion, tmp_path):
    straight = MetaTrainer(mix_config(fashion, augment=[0.1, 10.0]))
    for _ in range(4):
        straight.step()
    first = MetaTrainer(mix_config(fashion, augment=[0.1, 10.0]))
    for _ in range(2):
        first.step()
    path = save_checkpoint(tmp_path / "v2.ckpt", first)
    resumed = MetaTrainer(mix_config(fashion, augment=[0.1, 10.0]))
    load_checkpoint(path, resumed)
    for _ in range(2):
        resumed.step()
    assert torch.equal(resumed.theta, straight.theta)
    assert math.isfinite(straight.evaluate(width=8, steps=5, seeds=1)["meta_loss"])
