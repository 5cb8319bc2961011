"""VeLO / μVeLO (mulo.velo, mulo.velo_optim) against a plain reference written here from the
formulas (docs/math.md §5): features, the LSTM, the mixed MLP and the step; population vs single
particle; and the drop-in optimizer's contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mulo
import parametrizations as P
from mulo import velo as V
from mulo.functional import factored_dims

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(6, 4), (4, 6), (5,), (3, 2, 2, 2), ()]
SCALES = [1.0, 0.25, 1.0, 0.1, 1.0]
T = 12.0


# -- the plain reference: one particle, float64, loops where the formula reads as a loop -------


def cla(x):
    return 0.5 * torch.log(1e-8 + (10 * x).abs()).clamp(-5, 5)


def ref_decays(horizon):
    top = math.log10(max(horizon, 1.0))
    return [math.exp(-1 / 10 ** (1 + (top - 1) * j / 9)) for j in range(10)]


def ref_loss_update(L, loss, horizon):
    d = ref_decays(horizon)
    k = L["count"]
    if k == 0:
        cap = abs(loss)
    else:
        cap = 2 * abs(max(L["means"][j] / (1 - d[j] ** (k + 1)) for j in range(10)))
    loss = min(loss, cap)
    for j in range(10):
        L["means"][j] = d[j] * L["means"][j] + (1 - d[j]) * loss
        L["mins"][j] = min(L["mins"][j], L["means"][j] / (1 - d[j] ** (k + 1)))
    L["count"] = k + 1


def ref_loss_features(L, horizon):
    d = ref_decays(horizon)
    k = L["count"]
    cm = [L["means"][j] / (1 - d[j] ** k) for j in range(10)]
    out = []
    for j in range(9):
        denom = max(1e-8, cm[j + 1] - L["mins"][j])
        out.append(min(1.0, max(-1.0, (cm[j] - L["mins"][j]) / denom - 1)))
    return torch.tensor(out, dtype=torch.float64)


def ref_tensor_features(p, st, lf, t, horizon):
    s = 1 / math.sqrt(max(1e-9, float((p * p).mean())))
    m, rms = st["m"] * s, st["rms"] * s
    frac = t / horizon
    prog = [math.tanh(10 * (frac - tau)) for tau in (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)]
    rank = sum(1 for n in p.shape if n > 1)
    one_hot = [1.0 if r == rank else 0.0 for r in range(5)]
    var_m = [float(((m[i] - m[i].mean()) ** 2).mean()) for i in range(3)]
    var_rms = float(((rms - rms.mean()) ** 2).mean())
    head = torch.tensor(prog, dtype=torch.float64)
    rest = torch.tensor([float(rms.mean())], dtype=torch.float64)
    return torch.cat(
        [
            head,
            lf,
            cla(rest),
            torch.tensor(one_hot, dtype=torch.float64),
            cla(torch.tensor(var_m, dtype=torch.float64)),
            cla(torch.tensor([var_rms], dtype=torch.float64)),
        ]
    )


def ref_lstm(meta, xs, hs, cs):
    pooled = torch.stack([torch.relu(x @ meta["pool_w"] + meta["pool_b"]) for x in xs]).amax(0)
    out = []
    for x, h, c in zip(xs, hs, cs, strict=True):
        z = (
            torch.cat([x @ meta["in_w"] + meta["in_b"] + pooled, h]) @ meta["lstm_w"]
            + meta["lstm_b"]
        )
        i, g, f, o = z.chunk(4)
        c = torch.sigmoid(f + 1) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        mix = h @ meta["mix_w"] + meta["mix_b"]
        lr_mult = float(h @ meta["lr_w"] + meta["lr_b"])
        out.append((mix, lr_mult, h, c))
    return out


def ref_param_step(meta, mix, lr_mult, p, g, st, scale, step_mult):
    """Moments, the 30 element inputs, the mixed MLP element by element, the new p."""
    shape = p.shape
    betas_m, betas_f = (0.9, 0.99, 0.999), (0.9, 0.99, 0.999)
    for i in range(3):
        st["m"][i] = betas_m[i] * st["m"][i] + (1 - betas_m[i]) * g
    st["rms"][0] = 0.999 * st["rms"][0] + 0.001 * g * g
    dims = factored_dims(tuple(shape))
    m, rms = st["m"], st["rms"][0]
    feats = [g, g.clamp(-0.1, 0.1), p, *m, rms]
    r = 1 / torch.sqrt(rms + 1e-6)
    feats += [m[i] * r for i in range(3)] + [r]
    if dims is None:
        for i in range(3):
            st["diag"][i] = betas_f[i] * st["diag"][i] + (1 - betas_f[i]) * (g * g + 1e-30)
        v = st["diag"]
        fac = [g / torch.sqrt((v[i] + 1e-9).clamp(min=1e-9)) for i in range(3)]
        tail = [*v, *v, *(1 / torch.sqrt(v + 1e-8)), *(1 / torch.sqrt(v + 1e-8))]
        tail += [m[i] / torch.sqrt(v[i]) for i in range(3)]
    else:
        d0, d1 = dims
        fac, rows, cols, both = [], [], [], []
        for i in range(3):
            st["row"][i] = betas_f[i] * st["row"][i] + (1 - betas_f[i]) * (g * g + 1e-30).mean(
                d0, keepdim=True
            )
            st["col"][i] = betas_f[i] * st["col"][i] + (1 - betas_f[i]) * (g * g + 1e-30).mean(
                d1, keepdim=True
            )
            row, col = st["row"][i], st["col"][i]
            mean_row = row.mean(d1, keepdim=True)
            fac.append(
                g
                / torch.sqrt((row / mean_row + 1e-9).clamp(min=1e-9))
                / torch.sqrt(col.clamp(min=1e-9))
            )
            rows.append(row.expand(shape))
            cols.append(col.expand(shape))
            norm_row = row / (mean_row + 1e-9)
            both.append(
                m[i] / torch.sqrt(norm_row.clamp(min=1e-9)) / torch.sqrt(col.clamp(min=1e-9))
            )
        tail = [*rows, *cols, *(1 / torch.sqrt(x + 1e-8) for x in rows)]
        tail += [*(1 / torch.sqrt(x + 1e-8) for x in cols), *both]
    feats = feats[:11] + fac + [g * r] + tail
    assert len(feats) == 30
    feats = [f / math.sqrt(1e-5 + float((f * f).mean())) for f in feats]
    k = mix.shape[0]
    w = {
        n: 100.0 / k * sum(mix[j] * meta[n][j] for j in range(k))
        for n in ("w0", "b0", "w1", "b1", "w2", "b2")
    }
    new = p.clone().reshape(-1)
    flat = [f.reshape(-1) for f in feats]
    for e in range(new.numel()):
        x = torch.stack([f[e] for f in flat])
        h = torch.relu(x @ w["w0"] + w["b0"])
        h = torch.relu(h @ w["w1"] + w["b1"])
        d, a = h @ w["w2"] + w["b2"]
        new[e] -= lr_mult * scale * step_mult * float(d) * math.exp(0.001 * float(a))
    return new.reshape(shape)


def ref_run(meta, params, grads, losses, step_mult):
    """Every step of one particle: returns the params and states after each step."""
    params = [p.clone() for p in params]
    states = []
    for p in params:
        dims = factored_dims(tuple(p.shape or (1,)))
        st = {
            "m": torch.zeros(3, *(p.shape or (1,)), dtype=torch.float64),
            "rms": torch.zeros(1, *(p.shape or (1,)), dtype=torch.float64),
            "h": meta["h0"].clone(),
            "c": meta["c0"].clone(),
        }
        shape = tuple(p.shape or (1,))
        if dims is None:
            st["diag"] = torch.zeros(3, *shape, dtype=torch.float64)
        else:
            st["row"] = torch.zeros(
                3, *[1 if i == dims[0] else n for i, n in enumerate(shape)], dtype=torch.float64
            )
            st["col"] = torch.zeros(
                3, *[1 if i == dims[1] else n for i, n in enumerate(shape)], dtype=torch.float64
            )
        states.append(st)
    L = {"means": [0.0] * 10, "mins": [1e12] * 10, "count": 0}
    history = []
    for t, (gs, loss) in enumerate(zip(grads, losses, strict=True)):
        ref_loss_update(L, loss, T)
        lf = ref_loss_features(L, T)
        ps = [p.reshape(p.shape or (1,)) for p in params]
        gs = [g.reshape(g.shape or (1,)).clamp(-1000, 1000) for g in gs]
        xs = [ref_tensor_features(p, st, lf, t, T) for p, st in zip(ps, states, strict=True)]
        outs = ref_lstm(meta, xs, [s["h"] for s in states], [s["c"] for s in states])
        for i, ((mix, lr_mult, h, c), st) in enumerate(zip(outs, states, strict=True)):
            st["h"], st["c"] = h, c
            new = ref_param_step(meta, mix, lr_mult, ps[i], gs[i], st, SCALES[i], step_mult)
            params[i] = new.reshape(params[i].shape)
        history.append(([p.clone() for p in params], copy.deepcopy(states), copy.deepcopy(L)))
    return history


def case(population=2, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    meta = V.init_meta_params(population, gen, hidden=8, bank=3)
    meta = {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).double() for k, v in meta.items()}
    params = [torch.randn(population, *s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [
        [
            torch.randn(population, *s, generator=gen, dtype=torch.float64) * 10.0 ** (k - 1)
            for s in SHAPES
        ]
        for k in range(steps)
    ]
    losses = [
        torch.tensor([2.3 - 0.4 * k + 0.1 * i for i in range(population)]) for k in range(steps)
    ]
    return meta, params, grads, losses


def run_impl(meta, params, grads, losses, step_mult=V.STEP_MULT_MU):
    params = [p.clone() for p in params]
    states = [V.init_tensor_state(p, T, meta) for p in params]
    loss_state = V.init_loss_state(params[0].shape[0])
    for gs, loss in zip(grads, losses, strict=True):
        V.velo_step_(meta, states, loss_state, params, gs, loss, SCALES, step_mult)
    return params, states, loss_state


def test_step_matches_the_plain_reference():
    meta, params, grads, losses = case()
    got, states, loss_state = run_impl(meta, params, grads, losses)
    for i in range(2):
        meta_i = {k: v[i] for k, v in meta.items()}
        ref = ref_run(
            meta_i,
            [p[i] for p in params],
            [[g[i] for g in gs] for gs in grads],
            [float(loss[i]) for loss in losses],
            V.STEP_MULT_MU,
        )
        ref_params, ref_states, ref_loss = ref[-1]
        for j, (a, b) in enumerate(zip(got, ref_params, strict=True)):
            torch.testing.assert_close(
                a[i].reshape(b.shape), b, rtol=1e-9, atol=1e-12, msg=f"tensor {j}"
            )
            assert not torch.equal(a[i].reshape(b.shape), params[j][i].reshape(b.shape))  # it moved
        for st, rst in zip(states, ref_states, strict=True):
            for key in ("m", "rms", "h", "c", "row", "col", "diag"):
                if key in rst:
                    torch.testing.assert_close(
                        getattr(st, key)[i].reshape(rst[key].shape), rst[key], rtol=1e-9, atol=1e-15
                    )
        torch.testing.assert_close(
            loss_state.means[i], torch.tensor(ref_loss["means"], dtype=torch.float64)
        )


def test_population_equals_each_particle_alone():
    meta, params, grads, losses = case(population=3)
    together, _, _ = run_impl(meta, params, grads, losses)
    for i in range(3):
        alone, _, _ = run_impl(
            {k: v[i : i + 1] for k, v in meta.items()},
            [p[i : i + 1] for p in params],
            [[g[i : i + 1] for g in gs] for gs in grads],
            [loss[i : i + 1] for loss in losses],
        )
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a[i : i + 1], b, rtol=1e-12, atol=1e-14)


def test_loss_features_track_progress_and_spikes_are_capped():
    L = V.init_loss_state(1)
    horizon = torch.tensor([100.0])
    assert torch.equal(V.loss_features(L, horizon), torch.zeros(1, 9, dtype=torch.float64))
    for k in range(30):
        V.update_loss_(L, torch.tensor([2.0 * 0.9**k]), horizon)
    falling = V.loss_features(L, horizon)
    assert (falling.abs() <= 1).all()
    before = L.means.clone()
    V.update_loss_(L, torch.tensor([1e6]), horizon)  # a spike counts as twice the largest EMA
    assert (L.means <= before.amax() * 2).all()
    V.update_loss_(L, torch.tensor([float("nan")]), horizon)
    assert torch.isfinite(L.means).all()


# -- the drop-in optimizer -------------------------------------------------------------------


def model(seed=0):
    torch.manual_seed(seed)
    return P.mlp(12, 16, 2, 4, parametrization="mup")


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=gen), torch.randint(0, 4, (16,), generator=gen)


def closure_for(net, opt, seed=0):
    x, y = batch(seed)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def test_closure_and_loss_keyword_step_the_same():
    a, b = model(), model()
    oa = mulo.MuVeLO(a, meta_weights="meta-init", total_steps=20)
    ob = mulo.MuVeLO(b, meta_weights="meta-init", total_steps=20)
    for k in range(3):
        returned = oa.step(closure_for(a, oa, k))
        loss = closure_for(b, ob, k)()
        assert ob.step(loss=loss.item()) is None
        assert returned.item() == pytest.approx(loss.item())
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_round_trip_continues_bit_for_bit():
    net = model()
    opt = mulo.VeLO(net, meta_weights="meta-init", total_steps=20)
    for k in range(3):
        opt.step(closure_for(net, opt, k))
    twin = copy.deepcopy(net)
    twin_opt = mulo.VeLO(twin, meta_weights="meta-init", total_steps=20)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in range(3, 5):
        opt.step(closure_for(net, opt, k))
        twin_opt.step(closure_for(twin, twin_opt, k))
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert copy.deepcopy(opt)._loss_state.count.item() == 5


def test_mu_scales_hidden_matrices_and_sp_does_not():
    net = model()
    mu = mulo.MuVeLO(net, meta_weights="meta-init", total_steps=5)
    sp = mulo.VeLO(net, meta_weights="meta-init", total_steps=5)
    hidden = net.hidden1.weight
    assert mu.state[hidden]["scale"] == pytest.approx(1 / 16)
    assert sp.state[hidden]["scale"] == 1.0
    assert mu.step_mult == V.STEP_MULT_MU and sp.step_mult == V.STEP_MULT_SP


def test_nan_gradients_and_lr_zero_never_move_a_parameter_badly():
    net = model()
    opt = mulo.MuVeLO(net, meta_weights="meta-init", total_steps=10)
    closure_for(net, opt)()
    net.hidden1.weight.grad[0, 0] = float("nan")
    opt.step(loss=float("inf"))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    frozen = mulo.MuVeLO(net, meta_weights="meta-init", total_steps=10, lr=0.0)
    before = [p.clone() for p in net.parameters()]
    frozen.step(closure_for(net, frozen))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"meta_weights": "meta-init"}, "total_steps"),
        ({"total_steps": 5}, "no meta-trained VeLO"),
        ({"total_steps": 5, "meta_weights": {"w0": torch.zeros(1)}}, "keys mismatch"),
    ],
)
def test_bad_construction_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mulo.MuVeLO(model(), **kwargs)


def test_step_without_a_loss_is_one_clear_error():
    net = model()
    opt = mulo.MuVeLO(net, meta_weights="meta-init", total_steps=5)
    closure_for(net, opt)()
    with pytest.raises(ValueError, match="training loss"):
        opt.step()


def test_velo_weight_files_round_trip_and_stay_with_their_architecture(tmp_path):
    meta = {k: v[0] for k, v in V.init_meta_params(1, torch.Generator().manual_seed(3)).items()}
    path = tmp_path / "velo.pt"
    mulo.save_meta_weights(path, meta, {"name": "test-velo"})
    loaded, provenance = mulo.load_meta_weights(path)
    assert provenance["name"] == "test-velo"
    assert all(torch.equal(loaded[k], meta[k]) for k in meta)
    a, b = model(), model()
    oa = mulo.MuVeLO(a, meta_weights=path, total_steps=5)
    ob = mulo.MuVeLO(b, meta_weights=meta, total_steps=5)
    oa.step(closure_for(a, oa))
    ob.step(closure_for(b, ob))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="VeLO weights: use mulo.MuVeLO"):
        mulo.MuLO(model(), meta_weights=path)
    with pytest.raises(ValueError, match="small_fc_lopt weights"):
        mulo.MuVeLO(model(), meta_weights="mulo_m", total_steps=5)


@pytest.mark.parametrize("name", ["muvelo", "velo"])
def test_experiments_build_velo_by_name_and_the_loop_hands_it_the_loss(name, tmp_path):
    from helpers import write_learnable_fashion

    from experiments.evaluate import build_run, natural_parametrization
    from mulo.train import train

    data = write_learnable_fashion(tmp_path)
    cfg = {"name": name, "meta_weights": "meta-init", "total_steps": "auto"}
    parametrization = natural_parametrization({"name": name, "parametrization": None}) or "mup"
    task, opt, scheduler = build_run(
        {"name": "mlp", "width": 8, "depth": 2, "data_root": str(data), "eval_size": 16}, cfg,
        parametrization=parametrization, steps=4, batch_size=8, seed=0, device="cpu",
    )  # fmt: skip
    assert type(opt) is (mulo.MuVeLO if name == "muvelo" else mulo.VeLO)
    assert opt.total_steps == 4
    summary = train(task, opt, scheduler, steps=4, progress=False)
    assert summary["steps_done"] == 4 and opt._loss_state.count.item() == 4
