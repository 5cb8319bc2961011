"""PES and antithetic ES against finite differences of the same unrolled objective, and the
bookkeeping of pairs: shared batches and inits, ξ resets, inner lengths, loss clipping."""

import math

import pytest
import torch
import torch.nn.functional as F

from mulo import functional as LF
from mulo.meta import (
    NUM_META,
    InnerProblem,
    MLPTask,
    QuadraticTask,
    antithetic,
    clip_meta_loss,
    flatten_meta,
    init_particles,
    sample_lengths,
    unflatten_meta,
    unroll_,
)

K, TRUNCS = 4, 3  # truncation length and truncations per inner run in the gradient checks
T = K * TRUNCS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _flush_denormals():
    torch.set_flush_denormal(True)  # as MetaTrainer does


@pytest.fixture(scope="module")
def theta():
    meta = LF.init_meta_params(generator=torch.Generator().manual_seed(0))
    return flatten_meta(meta).double()


@pytest.fixture(scope="module")
def quad():
    # deterministic: zero init, no data noise -> every inner run is the same function of θ
    return QuadraticTask(noise=0.0, init_std=0.0, dtype=torch.float64)


def unrolled_objective(task, thetas, steps):
    """Mean pre-update loss over ``steps`` inner steps for each row of ``thetas`` [P, D]."""
    pop = thetas.shape[0]
    params, states = init_particles(task, [0], copies=pop)
    batcher = task.make_batcher(0)
    draw = lambda: batcher.sample_population(pop, task.batch_size, shared=True)  # noqa: E731
    return unroll_(task, unflatten_meta(thetas), params, states, steps, draw).mean(0)


def fd_gradient(task, theta, steps, h=1e-4):
    """Central finite differences along all D coordinates: one batched unroll of 2D particles."""
    eye = torch.eye(NUM_META, dtype=theta.dtype)
    values = unrolled_objective(task, torch.cat([theta + h * eye, theta - h * eye]), steps)
    return (values[:NUM_META] - values[NUM_META:]) / (2 * h)


@pytest.fixture(scope="module")
def fd_grads(quad, theta):
    torch.set_flush_denormal(True)
    return {"full": fd_gradient(quad, theta, T), "first": fd_gradient(quad, theta, K)}


def problem(task, estimator, pairs, sigma=0.01, seed=1, **kw):
    kw = {"truncation": K, "min_length": T, "max_length": T, "max_offset": 0, **kw}
    return InnerProblem(task, pairs=pairs, sigma=sigma, estimator=estimator, seed=seed, **kw)


def estimate(prob, theta):
    rows, _ = prob.rows(theta)
    return rows[:, :NUM_META].sum(0) / prob.pairs, rows


def test_flatten_roundtrip_and_antithetic_layout():
    meta = LF.init_meta_params(population=3, generator=torch.Generator().manual_seed(1))
    flat = flatten_meta(meta)
    assert flat.shape == (3, NUM_META) == (3, 2409)
    back = unflatten_meta(flat)
    assert all(torch.equal(back[k], meta[k]) for k in meta)
    theta, eps = torch.randn(NUM_META), torch.randn(2, NUM_META)
    pop = antithetic(theta, eps, 0.1)
    assert torch.equal(pop[0], theta + 0.1 * eps[0]) and torch.equal(pop[1], theta - 0.1 * eps[0])
    assert torch.equal(pop[3], theta - 0.1 * eps[1])


@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_estimate_matches_finite_differences_with_common_noise(quad, theta, fd_grads, estimator):
    """With its own ε, the antithetic estimate is mean_i (g·ε_i) ε_i up to O(σ) effects: this
    checks the whole formula (pairing, sign, 1/(2σ), ξ) against the FD gradient g of the same
    unrolled objective (ES: the full unroll; PES's first truncation: the first K steps)."""
    prob = problem(quad, estimator, pairs=16, sigma=1e-3, seed=3)
    g_hat, _ = estimate(prob, theta)
    g = fd_grads["full" if estimator == "es" else "first"]
    predicted = ((prob.eps @ g).unsqueeze(1) * prob.eps).mean(0)
    assert (g_hat - predicted).norm() / predicted.norm() < 0.03


def test_es_and_pes_agree_in_direction_with_the_gradient(quad, theta, fd_grads):
    """Many pairs: ES over the full unroll and PES summed over the truncations of one inner run
    (divided by their number) both estimate the gradient of the full-unroll mean loss."""
    g = fd_grads["full"]
    pairs = 1024
    es, _ = estimate(problem(quad, "es", pairs), theta)
    pes_prob = problem(quad, "pes", pairs)
    pes = sum(estimate(pes_prob, theta)[0] for _ in range(TRUNCS)) / TRUNCS
    assert pes_prob.runs_finished == pairs  # exactly one inner run per pair was consumed
    # noise of an antithetic estimate with N pairs in D dims: cosine ~ sqrt(N / (N + D)) = 0.55
    for g_hat in (es, pes):
        assert F.cosine_similarity(g_hat, g, dim=0) > 0.4
        # the component along g is unbiased (checks the scale, not just the direction)
        assert 0.8 < float(g_hat @ g / (g @ g)) < 1.25
    assert F.cosine_similarity(es, pes, dim=0) > 0.15  # two independent noisy estimates


def test_pes_accumulator_resets_when_a_run_ends(quad, theta):
    prob = problem(quad, "pes", pairs=3, truncation=5, min_length=12, max_length=12, seed=5)
    total = torch.zeros(3, NUM_META, dtype=torch.float64)
    for _ in range(2):  # runs of 12 steps: truncations at counter 5, 10, then 15 >= 12 ends
        rows, _ = prob.rows(theta)
        total += prob.eps
        assert torch.equal(prob.xi, total)
        assert prob.runs_finished == 0
        plus_minus = (rows[:, NUM_META] - rows[:, NUM_META + 1]) / (2 * prob.sigma)
        assert torch.allclose(rows[:, :NUM_META], plus_minus.unsqueeze(1) * total)
    seeds_before = prob.init_seed.clone()
    rows, _ = prob.rows(theta)
    total += prob.eps
    # this truncation's estimate still used the run's whole ξ, then the run restarted
    plus_minus = (rows[:, NUM_META] - rows[:, NUM_META + 1]) / (2 * prob.sigma)
    assert torch.allclose(rows[:, :NUM_META], plus_minus.unsqueeze(1) * total)
    assert prob.runs_finished == 3
    assert torch.count_nonzero(prob.xi) == 0
    assert torch.equal(prob.counter, torch.zeros(3, dtype=torch.long))
    assert not torch.equal(prob.init_seed, seeds_before)
    assert all(float(s.t.abs().sum()) == 0 for s in prob.states.values())  # fresh LO state
    prob.rows(theta)
    assert torch.equal(prob.xi, prob.eps)  # the new run's accumulator starts from its first ε


def test_offsets_shorten_runs_and_desynchronise_pairs(quad):
    prob = problem(
        quad, "pes", pairs=64, truncation=10, min_length=40, max_length=40, max_offset=10
    )
    assert torch.equal(prob.counter, prob.offset)
    assert int(prob.offset.min()) >= 0 and int(prob.offset.max()) < 10
    assert len(prob.offset.unique()) > 5


def test_inner_lengths_are_log_uniform():
    lengths = sample_lengths(20000, 100, 1000, torch.Generator().manual_seed(0))
    assert lengths.dtype == torch.long
    assert int(lengths.min()) >= 100 and int(lengths.max()) <= 1000
    # uniform in log: each of 10 equal log-bins holds ~10%
    bins = ((lengths.double().log() - math.log(100)) / (math.log(10) / 10)).floor().clamp(max=9)
    counts = torch.bincount(bins.long(), minlength=10).double() / len(lengths)
    assert counts.min() > 0.085 and counts.max() < 0.115
    assert 290 < float(lengths.double().median()) < 345  # median of LogUniform[100, 1000]: 316


def test_meta_loss_clipping():
    cap = 1.5 * math.log(10)
    loss = torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0, 0.5, 10.0])
    expected = torch.tensor([cap, cap, cap, 0.0, 0.5, cap])
    assert torch.allclose(clip_meta_loss(loss, cap), expected)


def test_a_diverging_inner_run_costs_the_cap_and_stays_finite(theta):
    class NaNTask(QuadraticTask):
        def grads(self, params, x, y=None):
            loss, grads = super().grads(params, x, y)
            loss = loss.clone()
            loss[0::2] = float("nan")  # every + particle "diverges"
            return loss, grads

    task = NaNTask(loss_cap=5.0)
    prob = problem(task, "pes", pairs=4)
    rows, _ = prob.rows(theta)
    assert torch.isfinite(rows).all()
    assert torch.equal(rows[:, NUM_META], torch.full((4,), 5.0, dtype=torch.float64))
    assert all(torch.isfinite(p).all() for p in prob.params.values())


def synthetic(n=256, features=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.randn(n, features, generator=g) + y.unsqueeze(1).float(), y


def test_antithetic_partners_share_batches_and_init(theta):
    x, y = synthetic()
    task = MLPTask(8, 3, "mu", x, y, batch_size=16)
    prob = InnerProblem(task, pairs=3, truncation=2, min_length=4, max_length=8, max_offset=2)
    # the init: both members of pair i hold the init of its seed; pairs differ
    for i in range(3):
        init = task.init_params(int(prob.init_seed[i]))
        for name, p in prob.params.items():
            assert torch.equal(p[2 * i], init[name][0]) and torch.equal(p[2 * i + 1], init[name][0])
    assert not torch.equal(prob.params["input.weight"][0], prob.params["input.weight"][2])
    seen = []
    draw = prob._draw_batch
    prob._draw_batch = lambda: seen.append(draw()) or seen[-1]
    prob.rows(theta.float())
    assert len(seen) == 2
    for xb, yb in seen:
        assert xb.shape == (6, 16, 12)
        for i in range(3):
            assert torch.equal(xb[2 * i], xb[2 * i + 1]) and torch.equal(yb[2 * i], yb[2 * i + 1])
        assert not torch.equal(xb[0], xb[2])
    # different meta-parameters, so after the truncation the partners have moved apart
    w = prob.params["hidden1.weight"]
    assert not torch.equal(w[0], w[1])
    assert torch.isfinite(w).all()
