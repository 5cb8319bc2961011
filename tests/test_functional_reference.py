"""Independent plain reference for the small_fc_lopt math (docs/math.md §1) vs
``mulo.functional``.

The reference below follows docs/math.md §1 literally, in float64, one particle at a time, with
explicit per-decay loops and whole-tensor torch ops (no chunking, no fusing).  It deliberately
shares no code with ``mulo``; only the public API of ``mulo.functional`` is called.

Interpretation choices (decided by the lead, see the test brief):
  * time features read the step counter t *before* this step increments it;
  * d0 / d1 come from a stable ascending argsort of the shape: d0 = order[-1], d1 = order[-2];
  * the row statistic is the mean over d0 (keepdim), the col statistic the mean over d1;
  * g2 = g**2 + 1e-30 for row/col and diag;
  * theta order: [m 0.9, m 0.99, m 0.999, v 0.999, f 0.9, f 0.99, f 0.999];
  * a rank-0 parameter is treated as shape [1];
  * for rank < 2 the row/col channels (13-24) all use the diag accumulator.
"""

from __future__ import annotations

import math

import pytest
import torch

LF = pytest.importorskip("mulo.functional")

N_FEATURES = 39
HIDDEN = 32
BETA0 = (0.9, 0.99, 0.999, 0.999, 0.9, 0.99, 0.999)
TAUS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
EXP_MULT = 0.001

SHAPES = [
    (),  # rank 0 -> treated as [1]
    (1,),
    (10,),
    (7, 5),  # dim 0 largest
    (5, 7),  # dim 1 largest
    (4, 4),  # equal dims: stable argsort -> d0 = 1, d1 = 0
    (4, 6, 3),
    (6, 4, 3, 3),  # conv-like
    (3, 5, 5, 2),  # tie between the two largest dims: d0 = 2, d1 = 1
]
# Step counters per particle (P = 3), covering t = 0, 1, 7, 300, 5e4.
T_SETS = [(0.0, 1.0, 7.0), (300.0, 5e4, 1.0)]
# Per-particle gradient magnitudes: exercises the per-particle normalisation.
GRAD_SCALES = (1.0, 0.05, 20.0)


# --------------------------------------------------------------------------------------------
# Plain float64 reference (docs/math.md §1)
# --------------------------------------------------------------------------------------------


def ref_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """rsqrt(x) = 1 / sqrt(max(x, 1e-9))."""
    return 1.0 / torch.sqrt(torch.clamp(x, min=1e-9))


def ref_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    order = torch.argsort(torch.tensor(shape), stable=True).tolist()
    return order[-1], order[-2]


def ref_betas(theta: torch.Tensor) -> list[float]:
    theta = [float(th) for th in theta]
    assert len(theta) == len(BETA0)
    return [1.0 - (1.0 - b0) * math.exp(10.0 * th) for b0, th in zip(BETA0, theta, strict=True)]


def ref_particle(meta: dict, st: dict, p: torch.Tensor, g: torch.Tensor):
    """One particle, float64.

    meta: w1 [32,39], b1 [32], w2 [32,32], b2 [32], w3 [2,32], b3 [2], theta [7].
    st: m [3,*S], v [*S], row/col [3,*S keepdim] or diag [3,*S], t (float).
    p, g: [*S] with S of rank >= 1 (rank 0 already reshaped to [1]).
    Returns (features [39,*S], d [*S], a [*S], new_state dict).
    """
    shape = tuple(p.shape)
    rank = len(shape)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    betas = ref_betas(meta["theta"])
    beta_m, beta_v, beta_f = betas[0:3], betas[3], betas[4:7]

    # --- accumulators (updated with the current gradient before features are read) ---
    m_new = []
    for j in range(3):
        m_new.append(beta_m[j] * st["m"][j] + (1.0 - beta_m[j]) * g)
    v_new = beta_v * st["v"] + (1.0 - beta_v) * g * g
    g2 = g * g + 1e-30

    fac_g, row_b, col_b, rs_row, rs_col, m_fac = [], [], [], [], [], []
    new_state = {"m": torch.stack(m_new), "v": v_new, "t": st["t"] + 1.0}
    if rank >= 2:
        d0, d1 = ref_dims(shape)
        rows, cols = [], []
        for j in range(3):
            row = beta_f[j] * st["row"][j] + (1.0 - beta_f[j]) * g2.mean(dim=d0, keepdim=True)
            col = beta_f[j] * st["col"][j] + (1.0 - beta_f[j]) * g2.mean(dim=d1, keepdim=True)
            rows.append(row)
            cols.append(col)
            row_factor = ref_rsqrt(row / row.mean(dim=d1, keepdim=True))
            col_factor = ref_rsqrt(col)
            fac_g.append(g * row_factor * col_factor)
            row_b.append(row.expand(shape))
            col_b.append(col.expand(shape))
            rs_row.append((1.0 / torch.sqrt(row + 1e-8)).expand(shape))
            rs_col.append((1.0 / torch.sqrt(col + 1e-8)).expand(shape))
            m_fac.append(m_new[j] * row_factor * col_factor)
        new_state["row"] = torch.stack(rows)
        new_state["col"] = torch.stack(cols)
    else:
        diags = []
        for j in range(3):
            diag = beta_f[j] * st["diag"][j] + (1.0 - beta_f[j]) * g2
            diags.append(diag)
            fac_g.append(g * ref_rsqrt(diag + 1e-9))
            row_b.append(diag)
            col_b.append(diag)
            rs_row.append(1.0 / torch.sqrt(diag + 1e-8))
            rs_col.append(1.0 / torch.sqrt(diag + 1e-8))
            m_fac.append(m_new[j] * (1.0 / torch.sqrt(diag + 1e-6)))
        new_state["diag"] = torch.stack(diags)

    rs_v = 1.0 / torch.sqrt(v_new + 1e-6)
    raw = [g, p, *m_new, v_new, *[m_new[j] * rs_v for j in range(3)], rs_v]
    raw += fac_g + row_b + col_b + rs_row + rs_col + m_fac
    assert len(raw) == 28
    feats = []
    for x in raw:
        feats.append(x / torch.sqrt(1e-5 + (x * x).mean()))
    t = float(st["t"])
    for tau in TAUS:
        feats.append(torch.full(shape, math.tanh(t / tau - 1.0), dtype=torch.float64))
    f = torch.stack(feats)  # [39, *S]

    # --- network, applied to every element ---
    x = f.reshape(N_FEATURES, -1)  # [39, N]
    h1 = torch.relu(meta["w1"] @ x + meta["b1"][:, None])
    h2 = torch.relu(meta["w2"] @ h1 + meta["b2"][:, None])
    out = meta["w3"] @ h2 + meta["b3"][:, None]
    d = out[0].reshape(shape)
    a = out[1].reshape(shape)
    return f, d, a, new_state


def ref_population(meta, state_snapshot, param, grad, *, lr, scale, step_mult):
    """Reference for every particle: (feats [P,39,*S'], new_param [P,*S], list of states)."""
    pop = param.shape[0]
    shape = tuple(param.shape[1:])
    eff = shape if len(shape) > 0 else (1,)
    feats, new_params, states = [], [], []
    for i in range(pop):
        meta_i = {k: v[i].double() for k, v in meta.items()}
        st_i = {k: (v[i].double() if v is not None else None) for k, v in state_snapshot.items()}
        p_i = param[i].double().reshape(eff)
        g_i = grad[i].double().reshape(eff)
        f, d, a, new_st = ref_particle(meta_i, st_i, p_i, g_i)
        new_p = p_i - lr * scale * step_mult * d * torch.exp(EXP_MULT * a)
        feats.append(f)
        new_params.append(new_p.reshape(shape))
        states.append(new_st)
    return torch.stack(feats), torch.stack(new_params), states


# --------------------------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------------------------


def expected_state_shapes(pop: int, shape: tuple[int, ...]) -> dict:
    eff = shape if len(shape) > 0 else (1,)
    out = {"m": (pop, 3, *eff), "v": (pop, *eff), "t": (pop,)}
    if len(shape) >= 2:
        d0, d1 = ref_dims(shape)
        row = list(shape)
        row[d0] = 1
        col = list(shape)
        col[d1] = 1
        out.update(row=(pop, 3, *row), col=(pop, 3, *col), diag=None)
    else:
        out.update(row=None, col=None, diag=(pop, 3, *eff))
    return out


def snapshot(state) -> dict:
    out = {}
    for k in ("m", "v", "row", "col", "diag", "t"):
        v = getattr(state, k)
        out[k] = None if v is None else v.detach().clone()
    return out


def make_meta(pop: int, seed: int) -> dict:
    """init_meta_params, then perturbed so that every particle differs and theta != 0."""
    gen = torch.Generator().manual_seed(seed)
    meta = LF.init_meta_params(population=pop, generator=torch.Generator().manual_seed(0))
    out = {}
    for k, v in meta.items():
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float64)
        if k == "theta":
            # Keep |theta| < ln(10)/10 so that every beta stays inside (0, 1).
            new = (0.1 * noise).clamp(-0.2, 0.2)
        elif k.startswith("w"):
            fan_in = v.shape[-1]
            new = v.double() + 0.3 * noise / math.sqrt(fan_in)
        else:
            new = 0.5 * noise
        out[k] = new.to(v.dtype).contiguous()
    return out


def make_case(shape, ts, seed=0, pop=3, grad_scales=GRAD_SCALES):
    gen = torch.Generator().manual_seed(1000 + seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32)

    def rand_pos(*s):
        return 0.05 + 1.45 * torch.rand(*s, generator=gen, dtype=torch.float32)

    meta = make_meta(pop, seed)
    param = randn(pop, *shape)
    gs = torch.tensor(grad_scales[:pop], dtype=torch.float32).reshape(pop, *([1] * len(shape)))
    grad = randn(pop, *shape) * gs
    state = LF.init_state(param)
    gs_state = gs.reshape(pop, *([1] * max(len(shape), 1)))
    state.m.copy_(0.5 * randn(*state.m.shape) * gs_state.unsqueeze(1))
    state.v.copy_(rand_pos(*state.v.shape) * gs_state**2)
    for name in ("row", "col", "diag"):
        acc = getattr(state, name)
        if acc is not None:
            acc.copy_(rand_pos(*acc.shape) * gs_state.unsqueeze(1) ** 2)
    state.t.copy_(torch.tensor(ts[:pop], dtype=state.t.dtype))
    return meta, state, param, grad


# --------------------------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------------------------


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max())


def check_close(name, actual, expected, rtol=1e-4, atol_rel=1e-5):
    actual = actual.double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    atol = atol_rel * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{name}: max abs err {max_err(actual, expected):.3e}\n{m}",
    )


def check_features(feats, ref_feats, rtol=1e-4, atol=1e-5):
    assert tuple(feats.shape) == tuple(ref_feats.shape), f"{feats.shape} vs {ref_feats.shape}"
    assert torch.isfinite(feats).all()
    bad = []
    for i in range(feats.shape[0]):
        for c in range(N_FEATURES):
            a = feats[i, c].double()
            e = ref_feats[i, c]
            tol = atol + rtol * e.abs()
            if not ((a - e).abs() <= tol).all():
                bad.append(f"particle {i} channel {c}: max abs err {max_err(a, e):.3e}")
    assert not bad, "feature mismatch:\n" + "\n".join(bad)


def check_state(state, ref_states, t_old):
    pop = len(ref_states)
    for name in ("m", "v", "row", "col", "diag"):
        if ref_states[0].get(name) is None:
            assert getattr(state, name) is None, name
            continue
        actual = getattr(state, name)
        assert actual.shape[0] == pop, name
        for i, s in enumerate(ref_states):
            # per particle: the particles have very different gradient magnitudes
            check_close(f"particle {i} state.{name}", actual[i], s[name], rtol=1e-5, atol_rel=1e-6)
    torch.testing.assert_close(state.t.double(), t_old.double() + 1.0)
    assert state.t.shape == (pop,)


def check_param(new_param, old_param, ref_new):
    """Compares the parameter change (p_new - p_old) in float64, so the test stays sharp."""
    assert new_param.shape == ref_new.shape
    assert torch.isfinite(new_param).all()
    delta = new_param.double() - old_param.double()
    ref_delta = ref_new - old_param.double()
    ulp = 4 * torch.finfo(torch.float32).eps * float(old_param.abs().max())
    atol = ulp + 1e-5 * float(ref_delta.abs().max())
    torch.testing.assert_close(
        delta,
        ref_delta,
        rtol=1e-4,
        atol=atol,
        msg=lambda m: f"param update: max abs err {max_err(delta, ref_delta):.3e}\n{m}",
    )


STEP_KW = {"lr": 2.0, "scale": 0.5, "step_mult": 0.1}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_reference_self_checks():
    """Sanity checks of the reference itself (independent of the core)."""
    assert ref_dims((7, 5)) == (0, 1)
    assert ref_dims((5, 7)) == (1, 0)
    assert ref_dims((4, 4)) == (1, 0)
    assert ref_dims((6, 4, 3, 3)) == (0, 1)
    assert ref_dims((3, 5, 5, 2)) == (2, 1)
    b = ref_betas(torch.zeros(7))
    assert b == pytest.approx(list(BETA0))


def test_init_meta_params():
    pop = 3
    meta = LF.init_meta_params(population=pop, generator=torch.Generator().manual_seed(0))
    shapes = {
        "w1": (pop, HIDDEN, N_FEATURES),
        "b1": (pop, HIDDEN),
        "w2": (pop, HIDDEN, HIDDEN),
        "b2": (pop, HIDDEN),
        "w3": (pop, 2, HIDDEN),
        "b3": (pop, 2),
        "theta": (pop, 7),
    }
    assert set(meta) == set(shapes)
    for k, s in shapes.items():
        assert tuple(meta[k].shape) == s, k
        assert torch.isfinite(meta[k]).all(), k
    assert sum(v[0].numel() for v in meta.values()) == 2409
    for k in ("b1", "b2", "b3", "theta"):
        assert (meta[k] == 0).all(), k
    for k in ("w1", "w2", "w3"):
        fan_in = meta[k].shape[-1]
        w = meta[k].double() * math.sqrt(fan_in)
        # truncated at +-2 std (allow for a variance-corrected truncated normal, 2/0.88)
        assert w.abs().max() <= 2.3, k
        assert 0.7 <= float(w.std()) <= 1.1, k
    again = LF.init_meta_params(population=pop, generator=torch.Generator().manual_seed(0))
    for k in meta:
        torch.testing.assert_close(meta[k], again[k], rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_init_state(shape):
    pop = 3
    param = torch.randn(pop, *shape)
    state = LF.init_state(param)
    exp = expected_state_shapes(pop, shape)
    for name, s in exp.items():
        v = getattr(state, name)
        if s is None:
            assert v is None, name
        else:
            assert tuple(v.shape) == s, f"{name}: {tuple(v.shape)} vs {s}"
            assert (v == 0).all(), name


@pytest.mark.parametrize("ts", T_SETS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_features_match_reference(shape, ts):
    meta, state, param, grad = make_case(shape, ts, seed=len(shape))
    before = snapshot(state)
    param0, grad0 = param.clone(), grad.clone()
    feats = LF.features(meta, state, param, grad)
    ref_feats, _, _ = ref_population(meta, before, param, grad, **STEP_KW)
    check_features(feats, ref_feats)
    # features() must not mutate anything
    after = snapshot(state)
    for k, v in before.items():
        if v is not None:
            assert torch.equal(v, after[k]), f"features() mutated state.{k}"
    assert torch.equal(param, param0) and torch.equal(grad, grad0)


@pytest.mark.parametrize("ts", T_SETS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lo_step_matches_reference(shape, ts):
    meta, state, param, grad = make_case(shape, ts, seed=10 + len(shape))
    before = snapshot(state)
    param0 = param.clone()
    _, ref_new, ref_states = ref_population(meta, before, param, grad, **STEP_KW)
    LF.lo_step_(meta, state, param, grad, **STEP_KW)
    check_param(param, param0, ref_new)
    check_state(state, ref_states, before["t"])


@pytest.mark.parametrize("shape", [(), (10,), (7, 5), (6, 4, 3, 3)], ids=str)
def test_lo_step_realistic_multipliers(shape):
    """Realistic (small) multipliers scale=0.01, step_mult=0.01, lr=1.0."""
    meta, state, param, grad = make_case(shape, (3.0, 0.0, 42.0), seed=20)
    before = snapshot(state)
    param0 = param.clone()
    kw = {"lr": 1.0, "scale": 0.01, "step_mult": 0.01}
    _, ref_new, ref_states = ref_population(meta, before, param, grad, **kw)
    LF.lo_step_(meta, state, param, grad, **kw)
    check_param(param, param0, ref_new)
    check_state(state, ref_states, before["t"])


@pytest.mark.parametrize("shape", [(10,), (5, 7), (6, 4, 3, 3)], ids=str)
def test_two_consecutive_steps(shape):
    meta, state, param, grad = make_case(shape, (0.0, 1.0, 299.0), seed=30)
    gen = torch.Generator().manual_seed(31)
    grad2 = torch.randn(grad.shape, generator=gen)
    ref_param = param.clone()
    ref_snap = snapshot(state)
    for g in (grad, grad2):
        _, ref_new, ref_states = ref_population(meta, ref_snap, ref_param, g, **STEP_KW)
        ref_snap = {k: torch.stack([s[k] for s in ref_states]) for k in ref_states[0]}
        for k in ("row", "col", "diag"):
            ref_snap.setdefault(k, None)
        ref_param = ref_new.float()
        LF.lo_step_(meta, state, param, g, **STEP_KW)
    check_close("param after 2 steps", param, ref_new, rtol=1e-4, atol_rel=1e-5)
    check_state(state, ref_states, ref_snap["t"] - 1.0)
    torch.testing.assert_close(state.t, torch.tensor([2.0, 3.0, 301.0], dtype=state.t.dtype))


@pytest.mark.parametrize("chunk_size", [8, 7], ids=str)
@pytest.mark.parametrize("shape", [(10,), (7, 5), (4, 4), (6, 4, 3, 3), (3, 5, 5, 2)], ids=str)
def test_chunking_does_not_change_math(shape, chunk_size):
    meta, state_a, param_a, grad = make_case(shape, (7.0, 300.0, 5e4), seed=40)
    before = snapshot(state_a)
    param0 = param_a.clone()
    _, state_b, param_b, _ = make_case(shape, (7.0, 300.0, 5e4), seed=40)

    LF.lo_step_(meta, state_a, param_a, grad, chunk_size=chunk_size, **STEP_KW)
    LF.lo_step_(meta, state_b, param_b, grad, chunk_size=1 << 30, **STEP_KW)

    # small chunks vs one big chunk
    torch.testing.assert_close(param_a, param_b, rtol=1e-6, atol=1e-6)
    for name in ("m", "v", "row", "col", "diag", "t"):
        a, b = getattr(state_a, name), getattr(state_b, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    # and both against the reference
    _, ref_new, ref_states = ref_population(meta, before, param0, grad, **STEP_KW)
    check_param(param_a, param0, ref_new)
    check_state(state_a, ref_states, before["t"])


@pytest.mark.parametrize("shape", [(), (10,), (7, 5), (4, 4), (6, 4, 3, 3)], ids=str)
def test_nonfinite_gradients_are_zeroed(shape):
    meta, state, param, grad = make_case(shape, (1.0, 7.0, 300.0), seed=50)
    bad = grad.clone().reshape(grad.shape[0], -1)
    n = bad.shape[1]
    # particle 0: NaN; particle 1: +Inf and -Inf; particle 2: all three (where room)
    bad[0, 0] = float("nan")
    bad[1, n - 1] = float("inf")
    bad[1, 0] = float("-inf")
    bad[2, n // 2] = float("nan")
    bad[2, 0] = float("inf")
    bad[2, n - 1] = float("-inf")
    bad = bad.reshape(grad.shape)
    clean = torch.where(torch.isfinite(bad), bad, torch.zeros_like(bad))

    before = snapshot(state)
    param0 = param.clone()
    ref_feats, ref_new, ref_states = ref_population(meta, before, param0, clean, **STEP_KW)
    # the reference itself must zero the entries too
    ref_feats2, ref_new2, _ = ref_population(meta, before, param0, bad, **STEP_KW)
    torch.testing.assert_close(ref_new, ref_new2, rtol=0, atol=0)

    feats = LF.features(meta, state, param, bad)
    check_features(feats, ref_feats)
    LF.lo_step_(meta, state, param, bad, chunk_size=8, **STEP_KW)
    assert torch.isfinite(param).all()
    check_param(param, param0, ref_new)
    for name in ("m", "v", "row", "col", "diag"):
        v = getattr(state, name)
        if v is not None:
            assert torch.isfinite(v).all(), name
    check_state(state, ref_states, before["t"])


@pytest.mark.parametrize("shape", [(), (10,), (5, 7), (6, 4, 3, 3)], ids=str)
def test_population_independence(shape):
    meta, state, param, grad = make_case(shape, (0.0, 7.0, 5e4), seed=60)
    feats = LF.features(meta, state, param, grad)
    param_pop = param.clone()
    state_snap = snapshot(state)
    LF.lo_step_(meta, state, param_pop, grad, **STEP_KW)
    for i in range(param.shape[0]):
        meta_i = {k: v[i : i + 1].clone() for k, v in meta.items()}
        param_i = param[i : i + 1].clone()
        state_i = LF.init_state(param_i)
        for name, v in state_snap.items():
            if v is not None:
                getattr(state_i, name).copy_(v[i : i + 1])
        feats_i = LF.features(meta_i, state_i, param_i, grad[i : i + 1].clone())
        torch.testing.assert_close(feats_i, feats[i : i + 1], rtol=1e-6, atol=1e-6)
        LF.lo_step_(meta_i, state_i, param_i, grad[i : i + 1].clone(), **STEP_KW)
        torch.testing.assert_close(param_i, param_pop[i : i + 1], rtol=1e-6, atol=1e-6)
        for name in ("m", "v", "row", "col", "diag", "t"):
            a = getattr(state_i, name)
            if a is not None:
                torch.testing.assert_close(a, getattr(state, name)[i : i + 1], msg=name)
