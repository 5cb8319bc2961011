"""small_fc_lopt_v2 against a plain reference: features, step, time inputs and schedule; the
``total_steps`` contract of the drop-in optimizer; its state_dict round trip; and the factored
statistics of a rank-4 conv kernel (v1 and v2 share them)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_functional_reference import make_case, ref_dims, ref_particle

import mulo
import parametrizations as P
from mulo import functional as LF

pytestmark = pytest.mark.usefixtures("one_thread")

V2 = "small_fc_lopt_v2"
RAW_TAUS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3)
POINTS = (0.1, 0.25, 0.5, 0.75, 0.9)
SHAPES = [(10,), (7, 5), (5, 7), (6, 4, 3, 3), (4, 6, 3)]
TS = [0.0, 40.0, 5000.0]
HORIZONS = [0.0, 100.0, 8000.0]  # unknown, known, known and longer than t


def ref_time_inputs(t: float, horizon: float) -> list[float]:
    raw = [math.tanh(min(t, 1000.0) / tau - 1.0) for tau in RAW_TAUS]
    if horizon <= 0:
        return raw + [0.0] * len(POINTS) + [0.0]
    frac = min(t / horizon, 1.0)
    return raw + [math.tanh(10 * (frac - tau)) for tau in POINTS] + [1.0]


def ref_schedule(t: float, horizon: float) -> float:
    if horizon <= 0:
        return min(1.0, (t + 1) / 50)
    warm = min(1.0, (t + 1) / max(1.0, 0.05 * horizon))
    return warm * 0.5 * (1 + math.cos(math.pi * min(t / horizon, 1.0)))


def v2_case(shape, seed=0):
    """make_case's state and tensors, v2 meta-parameters perturbed like its v1 ones."""
    meta1, state, param, grad = make_case(shape, TS, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    meta = LF.init_meta_params(population=3, architecture=V2, generator=gen)
    for k, v in meta.items():
        meta[k] = (v + 0.1 * torch.randn(v.shape, generator=gen)).contiguous()
    meta["theta"] = meta1["theta"].clone()
    state.horizon = torch.tensor(HORIZONS)
    return meta, state, param, grad


def ref_v2(meta, state, param, grad, i, scale, lr=1.0):
    """(features [41, *S], new param [*S]) of particle i, float64, from the v1 reference's 28
    normalised channels and the v2 rules written out literally."""
    shape = tuple(param.shape[1:]) or (1,)
    meta_i = {k: v[i].double() for k, v in meta.items()}
    v1_meta = {**meta_i, "w1": meta_i["w1"][:, :39]}  # the v1 reference's network is unused
    st = {k: (v[i].double() if v is not None else None) for k, v in state_snapshot(state).items()}
    p, g = param[i].double().reshape(shape), grad[i].double().reshape(shape)
    feats, _, _, _ = ref_particle(v1_meta, st, p, g)
    t, horizon = float(state.t[i]), float(state.horizon[i])
    times = torch.tensor(ref_time_inputs(t, horizon), dtype=torch.float64)
    f = torch.cat([feats[:28], times.reshape(-1, *[1] * len(shape)).expand(-1, *shape)])
    x = f.reshape(41, -1)
    h1 = torch.relu(meta_i["w1"] @ x + meta_i["b1"][:, None])
    h2 = torch.relu(meta_i["w2"] @ h1 + meta_i["b2"][:, None])
    out = meta_i["w3"] @ h2 + meta_i["b3"][:, None]
    d, a = out[0], out[1]
    u = d * torch.exp(torch.clamp(0.1 * a, max=3.0))
    group = 0 if len(shape) < 2 else (2 if scale < 1 else 1)
    size = math.exp(float(meta_i["log_lr"][group])) * ref_schedule(t, horizon)
    new = p.reshape(-1) - lr * scale * size * u / torch.sqrt((d * d).mean() + 1e-12)
    return f, new.reshape(param.shape[1:])


def state_snapshot(state):
    return {
        "m": state.m.clone(), "v": state.v.clone(), "row": _c(state.row), "col": _c(state.col),
        "diag": _c(state.diag), "t": state.t.clone(),
    }  # fmt: skip


def _c(x):
    return None if x is None else x.clone()


@pytest.mark.parametrize("shape", SHAPES)
def test_v2_features_match_the_plain_reference(shape):
    meta, state, param, grad = v2_case(shape)
    feats = LF.features(meta, state, param, grad)
    assert feats.shape == (3, 41, *shape)
    for i in range(3):
        ref, _ = ref_v2(meta, state, param, grad, i, scale=1.0)
        torch.testing.assert_close(feats[i].double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1 / 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_v2_step_matches_the_plain_reference(shape, scale, use_kernel, monkeypatch):
    monkeypatch.setattr(LF, "USE_KERNEL", use_kernel)
    meta, state, param, grad = v2_case(shape, seed=1)
    expected = [ref_v2(meta, state, param, grad, i, scale=scale, lr=0.7)[1] for i in range(3)]
    p = param.clone()
    LF.lo_step_(meta, state, p, grad, scale=scale, step_mult=123.0, lr=0.7)  # v2 ignores it
    for i in range(3):
        torch.testing.assert_close(p[i].double(), expected[i], rtol=1e-4, atol=1e-5)
    assert torch.equal(state.t, torch.tensor(TS) + 1)


def test_time_inputs_never_leave_the_meta_training_range():
    """Any run length maps onto inputs that a run of <= 2000 steps (meta-training's longest)
    produces: the raw-time part saturates at t = 1000, the progress part reads only t / T."""
    long_t, long_T = torch.tensor([1e4, 1e6, 5e4]), torch.tensor([2e4, 2e6, 0.0])
    short_t, short_T = torch.tensor([1000.0, 1000.0, 1500.0]), torch.tensor([2000.0, 2000.0, 0.0])
    long, short = LF.time_inputs(LF.V2, long_t, long_T), LF.time_inputs(LF.V2, short_t, short_T)
    assert torch.equal(long, short)
    for t, T in [(0.0, 0.0), (7.0, 10.0), (3e5, 1e5)]:
        got = LF.time_inputs(LF.V2, torch.tensor([t]), torch.tensor([T]))[0].double()
        torch.testing.assert_close(got, torch.tensor(ref_time_inputs(t, T), dtype=torch.float64))


def test_schedule_warms_up_and_anneals_to_zero_at_the_horizon():
    t = torch.tensor([0.0, 4.0, 500.0, 999.0, 5000.0, 10.0, 1e6])
    T = torch.tensor([1000.0, 1000.0, 1000.0, 1000.0, 1000.0, 0.0, 0.0])
    got = LF.schedule(t, T)
    expected = [ref_schedule(float(a), float(b)) for a, b in zip(t, T, strict=True)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert got[3] < 1e-4 and got[4] == 0  # at and past T
    assert got[6] == 1.0  # unknown horizon: no decay


def _model(seed=0):
    torch.manual_seed(seed)
    model = P.mlp(12, width=32, depth=2, out_features=4)
    P.get("mup").init_(model)
    return model


def _train(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


V2_META = LF.init_meta_params(architecture=V2)


def test_total_steps_sets_the_horizon_and_changes_the_steps():
    with_t, without = _model(), _model()
    opt_t = mulo.MuLO(with_t, meta_weights=V2_META, total_steps=40)
    opt = mulo.MuLO(without, meta_weights=V2_META)
    _train(opt_t, with_t, 3)
    _train(opt, without, 3)
    state_t = opt_t.state[next(with_t.parameters())]
    assert torch.equal(state_t["horizon"], torch.tensor([40.0]))
    assert "horizon" not in opt.state[next(without.parameters())]  # unknown: warmup, no decay
    pairs = zip(with_t.parameters(), without.parameters(), strict=True)
    assert all(not torch.equal(a, b) for a, b in pairs)


def test_without_total_steps_v2_is_its_horizon_unknown_mode():
    model = _model()
    functional = copy.deepcopy(model)
    opt = mulo.MuLO(model, meta_weights=V2_META)
    _train(opt, model, 1)
    scales = P.get("mup").update_scales(functional)
    # the batch of _train's first step: x then y from one generator
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    loss = torch.nn.functional.cross_entropy(functional(x), y)
    loss.backward()
    meta = {k: v.unsqueeze(0) for k, v in V2_META.items()}
    with torch.no_grad():
        for name, p in functional.named_parameters():
            state = LF.init_state(p.unsqueeze(0), horizon=0.0)
            LF.lo_step_(meta, state, p.unsqueeze(0), p.grad.unsqueeze(0), scales[name], 0.01)
    for a, b in zip(model.parameters(), functional.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_v1_ignores_total_steps():
    a, b = _model(), _model()
    _train(mulo.MuLO(a, total_steps=10), a, 3)
    _train(mulo.MuLO(b), b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("bad", [0, -5, 2.5, "100"])
def test_bad_total_steps_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="total_steps"):
        mulo.MuLO(_model(), meta_weights=V2_META, total_steps=bad)


def test_v2_state_dict_round_trip_resumes_bit_identically():
    straight = _model()
    opt = mulo.MuLO(straight, meta_weights=V2_META, total_steps=20)
    _train(opt, straight, 5)
    saved_model, saved_opt = copy.deepcopy(straight.state_dict()), copy.deepcopy(opt.state_dict())
    _train(opt, straight, 5, seed=1)

    resumed = _model(seed=3)
    resumed.load_state_dict(saved_model)
    opt2 = mulo.MuLO(resumed, meta_weights=V2_META, total_steps=20)
    opt2.load_state_dict(saved_opt)
    _train(opt2, resumed, 5, seed=1)
    assert all(
        torch.equal(x, y) for x, y in zip(straight.parameters(), resumed.parameters(), strict=True)
    )


def test_v2_meta_init_trains_a_model():
    model = _model()
    opt = mulo.MuLO(model, meta_weights=V2_META, total_steps=200)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 12, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    first = None
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("arch", ["small_fc_lopt", V2])
def test_factored_statistics_of_a_rank4_conv_kernel(arch, use_kernel, monkeypatch):
    """Row / col accumulators of a [out, in, kh, kw] kernel are the means of g^2 over its two
    largest dims (not dropped, not flattened), and the factored channels use them."""
    monkeypatch.setattr(LF, "USE_KERNEL", use_kernel)
    shape = (16, 8, 3, 3)
    gen = torch.Generator().manual_seed(0)
    meta = LF.init_meta_params(population=1, architecture=arch, generator=gen)
    p = torch.randn(1, *shape, generator=gen)
    # a gradient whose scale varies along every dim, so a dropped or misplaced mean shows
    ramp = [torch.linspace(0.5, 2.0, s).reshape([-1 if i == k else 1 for i in range(4)])
            for k, s in enumerate(shape)]  # fmt: skip
    g = torch.randn(1, *shape, generator=gen) * ramp[0] * ramp[1] * ramp[2] * ramp[3]
    state = LF.init_state(p)
    d0, d1 = ref_dims(shape)
    assert (d0, d1) == (0, 1)
    feats = LF.features(meta, state, p, g)
    LF.lo_step_(meta, state, p.clone(), g, scale=1 / 72, step_mult=0.01)
    g2 = g[0].double() ** 2 + 1e-30
    w = 1 - LF.decays(meta["theta"][0]).double()
    for k in range(3):
        row = w[4 + k] * g2.mean(dim=d0, keepdim=True)
        col = w[4 + k] * g2.mean(dim=d1, keepdim=True)
        torch.testing.assert_close(state.row[0, k].double(), row, rtol=1e-5, atol=0)
        torch.testing.assert_close(state.col[0, k].double(), col, rtol=1e-5, atol=0)
        assert row.shape == (1, 8, 3, 3) and col.shape == (16, 1, 3, 3)
        fac = torch.rsqrt(row / row.mean(dim=d1, keepdim=True)) * torch.rsqrt(col)
        fac_g = g[0].double() * fac
        expected = fac_g / torch.sqrt(1e-5 + (fac_g**2).mean())
        torch.testing.assert_close(feats[0, 10 + k].double(), expected, rtol=1e-4, atol=1e-5)


def test_build_optimizer_passes_total_steps_to_the_learned_optimizers():
    from mulo import baselines

    opt = baselines.build_optimizer("mulo", _model(), meta_weights=V2_META, total_steps=50)
    assert opt.total_steps == 50
    assert baselines.build_optimizer("splo", _model(), total_steps=7).total_steps == 7


def test_decays_are_clamped_at_zero_so_accumulators_stay_bounded():
    """μLO v2's first meta-training run drove 1 - beta of one decay to 38.9 (beta = -37.9):
    the EMA then overshoots and grows geometrically. beta is clamped to [0, 1]."""
    theta = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.0])
    beta = LF.decays(theta)
    assert beta[5].item() == 0.0 and torch.equal(beta[:5], LF.decays(torch.zeros(7))[:5])
    assert torch.equal(LF.decays(torch.full((7,), 100.0)), torch.zeros(7))  # exp overflow
    meta = LF.init_meta_params(generator=torch.Generator().manual_seed(0))
    meta["theta"] = theta
    meta = {k: v.unsqueeze(0) for k, v in meta.items()}
    p = torch.randn(1, 24, 20)
    state = LF.init_state(p)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        grad = torch.randn(1, 24, 20, generator=g)
        LF.lo_step_(meta, state, p, grad, scale=1.0, step_mult=0.01)
    for acc in (state.mv, state.row, state.col):
        assert torch.isfinite(acc).all() and acc.abs().max() < 100
