"""MuLO / SPLO as drop-in ``torch.optim.Optimizer`` subclasses (docs/math.md §1.5, §2).

Every optimizer here gets explicit meta-weights (seeded meta-initialisation with seed 1, whose
network output is not zero, so steps really move parameters); the default-weights path and its
warning are tested in ``test_meta_weights.py``.
"""

from __future__ import annotations

import copy
import io

import mup
import pytest
import torch
import torch.nn.functional as F
from mup.layer import MuReadout
from torch import nn

import mulo
import parametrizations as P
from mulo import functional as LF

IN, OUT = 12, 5


def meta(seed: int = 1) -> dict[str, torch.Tensor]:
    return LF.init_meta_params(generator=torch.Generator().manual_seed(seed))


def zero_net_meta() -> dict[str, torch.Tensor]:
    """Meta-params whose network output is exactly zero, so the learned step is exactly 0."""
    m = meta()
    m["w3"].zero_()
    m["b3"].zero_()
    return m


def mlp(width: int = 16, depth: int = 3, parametrization: str = "mup", seed: int = 0):
    torch.manual_seed(seed)
    return P.mlp(IN, width, depth, OUT, parametrization=parametrization)


def batch(dtype=torch.float32, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, IN, generator=g)
    y = torch.randint(0, OUT, (32,), generator=g)
    return x.to(dtype), y


def loss_of(model, data):
    x, y = data
    return F.cross_entropy(model(x), y)


def backward(model, data):
    for p in model.parameters():
        p.grad = None
    loss = loss_of(model, data)
    loss.backward()
    return loss


def train(model, opt, data, steps: int):
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, data).backward()
        opt.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def scales(opt, model) -> dict[str, float]:
    return {n: opt.state[p]["scale"] for n, p in model.named_parameters()}


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# --- roles and s_W ----------------------------------------------------------------------------


@pytest.mark.parametrize("width", [16, 32])
def test_mulo_infers_scales_from_module(width):
    model = mlp(width)
    opt = mulo.MuLO(model, meta_weights=meta())
    s = scales(opt, model)
    assert s == {
        "input.weight": 1.0,
        "input.bias": 1.0,
        "hidden1.weight": 1 / width,
        "hidden1.bias": 1.0,
        "hidden2.weight": 1 / width,
        "hidden2.bias": 1.0,
        "readout.weight": 1.0,
        "readout.bias": 1.0,
    }
    assert all(type(v) is float for v in s.values())
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())


def test_splo_scale_is_one_everywhere():
    model = mlp(16)
    opt = mulo.SPLO(model, meta_weights=meta())
    assert set(scales(opt, model).values()) == {1.0}
    sp_model = mlp(16, parametrization="sp")
    assert set(scales(mulo.SPLO(sp_model, meta_weights=meta()), sp_model).values()) == {1.0}


def test_roles_override_changes_scale():
    model = mlp(16)
    opt = mulo.MuLO(
        model, meta_weights=meta(), roles={"hidden1.weight": "input", "input.weight": "hidden"}
    )
    s = scales(opt, model)
    assert s["hidden1.weight"] == 1.0
    assert s["input.weight"] == 1 / IN
    assert s["hidden2.weight"] == 1 / 16  # untouched by the override


def test_scale_multiplies_the_step():
    """The stored s_W is the one applied: a hidden weight moves 1/fan_in as far as the same
    weight overridden to input-like, all else equal (float64 so deltas are exact to ~1e-12)."""
    base = mlp(16).double()
    data = batch(torch.float64)
    deltas = []
    for roles in (None, {"hidden1.weight": "input"}):
        model = copy.deepcopy(base)
        opt = mulo.MuLO(model, meta_weights=meta(), roles=roles)
        before = model.hidden1.weight.detach().clone()
        backward(model, data)
        opt.step()
        deltas.append(model.hidden1.weight.detach() - before)
    assert deltas[1].abs().max() > 0
    torch.testing.assert_close(deltas[0], deltas[1] / 16, rtol=1e-5, atol=0)
    # SP-LO and μLO differ in step_mult (0.001 vs 0.01) for a scale-1 tensor.
    model_mu, model_sp = copy.deepcopy(base), copy.deepcopy(base)
    steps = []
    for model, cls in ((model_mu, mulo.MuLO), (model_sp, mulo.SPLO)):
        opt = cls(model, meta_weights=meta())
        before = model.input.weight.detach().clone()
        backward(model, data)
        opt.step()
        steps.append(model.input.weight.detach() - before)
    torch.testing.assert_close(
        steps[1], steps[0] * (LF.STEP_MULT_SP / LF.STEP_MULT_MU), rtol=1e-5, atol=0
    )


def test_mulo_from_parameters_with_infshape_mlp():
    model = mlp(32)
    mup.set_base_shapes(model, P.mlp(IN, 8, 3, OUT), rescale_params=False)
    opt = mulo.MuLO(model.parameters(), meta_weights=meta())
    by_module = scales(mulo.MuLO(model, meta_weights=meta()), model)
    assert scales(opt, model) == by_module
    assert by_module["hidden1.weight"] == 1 / 32 and by_module["input.weight"] == 1.0


def _plain(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), MuReadout(width, OUT)
    )


def test_mulo_from_parameters_with_infshape_plain_linears():
    torch.manual_seed(0)
    model = mup.set_base_shapes(_plain(48), _plain(8))
    opt = mulo.MuLO(model.parameters(), meta_weights=meta())
    assert scales(opt, model) == {
        "0.weight": 1.0,
        "0.bias": 1.0,
        "2.weight": 1 / 48,
        "2.bias": 1.0,
        "4.weight": 1.0,
        "4.bias": 1.0,
    }
    data = batch()
    before = snapshot(model)
    backward(model, data)
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_mulo_from_parameters_without_infshape_raises():
    model = mlp(16)
    with pytest.raises(P.ParametrizationError) as e:
        mulo.MuLO(model.parameters(), meta_weights=meta())
    msg = one_line(e)
    assert "module" in msg and "MuLO(model)" in msg


def test_splo_from_parameters_without_infshape():
    model = mlp(16)
    opt = mulo.SPLO(model.parameters(), meta_weights=meta())
    assert set(scales(opt, model).values()) == {1.0}
    before = snapshot(model)
    backward(model, batch())
    opt.step()
    assert not torch.equal(before["hidden1.weight"], model.hidden1.weight)


def test_roles_with_parameters_is_an_error():
    model = mlp(16)
    with pytest.raises(ValueError):
        mulo.SPLO(model.parameters(), meta_weights=meta(), roles={"hidden1.weight": "input"})


class WithPosEmbed(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.pos_embed = nn.Parameter(0.1 * torch.randn(4, d))
        self.fc = nn.Linear(IN, d)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, OUT)

    def forward(self, x):  # x: [B, 4, IN]
        h = torch.relu(self.fc(x) + self.pos_embed)
        return self.out(torch.relu(self.mid(h))).mean(1)


def test_unclassifiable_parameter_error_names_it_and_override_fixes_it():
    torch.manual_seed(0)
    model = WithPosEmbed()
    with pytest.raises(P.ParametrizationError) as e:
        mulo.MuLO(model, meta_weights=meta())
    assert "pos_embed" in one_line(e)
    opt = mulo.MuLO(model, meta_weights=meta(), roles={"pos_embed": "input"})
    s = scales(opt, model)
    assert s["pos_embed"] == 1.0 and s["mid.weight"] == 1 / 16 and s["fc.weight"] == 1.0
    x, y = torch.randn(8, 4, IN), torch.randint(0, OUT, (8,))
    before = model.pos_embed.detach().clone()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(before, model.pos_embed)
    # SP needs no roles, so it must not reject the model.
    assert set(scales(mulo.SPLO(model, meta_weights=meta()), model).values()) == {1.0}


# --- the torch.optim contract -----------------------------------------------------------------


def test_step_closure_returns_loss():
    model = mlp(16)
    opt = mulo.MuLO(model, meta_weights=meta())
    data = batch()
    before = snapshot(model)
    seen = []

    def closure():
        opt.zero_grad()
        loss = loss_of(model, data)
        loss.backward()  # step() is no_grad; the closure must run with grad enabled
        seen.append(loss)
        return loss

    out = opt.step(closure)
    assert len(seen) == 1 and out is seen[0]
    assert not torch.equal(before["hidden1.weight"], model.hidden1.weight)
    assert opt.step() is None  # no closure: None, and it reuses the grads left in place


def test_zero_grad():
    model = mlp(16)
    opt = mulo.MuLO(model, meta_weights=meta())
    backward(model, batch())
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_params_without_grad_are_skipped_and_untouched():
    model = mlp(16)
    opt = mulo.MuLO(model, meta_weights=meta())
    backward(model, batch())
    model.hidden1.weight.grad = None
    model.readout.bias.grad = None
    before = snapshot(model)
    opt.step()
    for n, p in model.named_parameters():
        if n in ("hidden1.weight", "readout.bias"):
            assert torch.equal(before[n], p), n
            assert set(opt.state[p]) == {"scale"}, n  # no accumulators were created
        else:
            assert not torch.equal(before[n], p), n
            assert _counter(opt.state[p]) == 1


def test_frozen_parameters_are_not_optimised():
    model = mlp(16)
    model.input.weight.requires_grad_(False)
    opt = mulo.MuLO(model, meta_weights=meta())
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p is not model.input.weight for p in params)
    assert len(params) == len(list(model.parameters())) - 1
    before = model.input.weight.clone()
    train(model, opt, batch(), 2)
    assert torch.equal(before, model.input.weight)


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = mulo.SPLO(emb, meta_weights=meta())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_add_param_group():
    """A param group added later (e.g. unfreezing) gets its s_W like a constructor tensor."""
    model = mlp(16)
    extra = nn.Linear(OUT, OUT)
    opt = mulo.SPLO(model, meta_weights=meta())
    opt.add_param_group({"params": extra.parameters(), "lr": 0.5})
    before = extra.weight.detach().clone()
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(extra(model(x)), y).backward()
    opt.step()
    assert opt.state[extra.weight]["scale"] == 1.0
    assert not torch.equal(before, extra.weight)


# --- state_dict round trip --------------------------------------------------------------------


@pytest.mark.parametrize("cls", [mulo.MuLO, mulo.SPLO])
@pytest.mark.parametrize("transport", ["deepcopy", "torch.save"])
def test_resume_is_bitwise_identical(cls, transport):
    n_steps, k = 6, 3
    data = batch()
    model = mlp(16)
    init = copy.deepcopy(model.state_dict())
    opt = cls(model, meta_weights=meta())
    train(model, opt, data, n_steps)
    final = snapshot(model)
    assert any(not torch.equal(final[n], init[n]) for n in final)

    model = mlp(16)
    opt = cls(model, meta_weights=meta())
    train(model, opt, data, k)
    if transport == "deepcopy":
        model_sd, opt_sd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    else:
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        loaded = torch.load(buf)  # default weights_only=True: the state must be plain data
        model_sd, opt_sd = loaded["model"], loaded["opt"]
    del model, opt

    fresh = mlp(16, seed=99)
    fresh.load_state_dict(model_sd)
    fresh_opt = cls(fresh, meta_weights=meta())
    fresh_opt.load_state_dict(opt_sd)
    ref = mlp(16)
    assert scales(fresh_opt, fresh) == scales(cls(ref, meta_weights=meta()), ref)
    train(fresh, fresh_opt, data, n_steps - k)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, final[n]), n


# --- lr, schedulers, weight decay -------------------------------------------------------------


def _first_step_delta(base, lr, **kw):
    model = copy.deepcopy(base)
    opt = mulo.MuLO(model, meta_weights=meta(), lr=lr, **kw)
    before = snapshot(model)
    backward(model, batch(torch.float64))
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_lr_multiplies_the_step():
    base = mlp(16).double()  # float64: p + delta - p recovers delta to ~1e-12 relative
    full = _first_step_delta(base, 1.0)
    half = _first_step_delta(base, 0.5)
    zero = _first_step_delta(base, 0.0)
    for n in full:
        assert full[n].abs().max() > 0, n
        torch.testing.assert_close(half[n], 0.5 * full[n], rtol=1e-5, atol=1e-15)
        assert not zero[n].any(), n


def test_per_group_lr():
    model = mlp(16)
    mup.set_base_shapes(model, P.mlp(IN, 8, 3, OUT), rescale_params=False)
    groups = [
        {"params": [model.hidden1.weight, model.hidden1.bias], "lr": 0.0},
        {"params": [p for n, p in model.named_parameters() if not n.startswith("hidden1")]},
    ]
    opt = mulo.MuLO(groups, meta_weights=meta(), lr=1.0)
    assert opt.state[model.hidden1.weight]["scale"] == 1 / 16
    before = snapshot(model)
    train(model, opt, batch(), 2)
    assert torch.equal(before["hidden1.weight"], model.hidden1.weight)
    assert torch.equal(before["hidden1.bias"], model.hidden1.bias)
    assert not torch.equal(before["hidden2.weight"], model.hidden2.weight)


@pytest.mark.parametrize(
    "make, factor",
    [
        (lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.5**epoch), 0.5),
        (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.1), 0.1),
    ],
    ids=["LambdaLR", "StepLR"],
)
def test_lr_scheduler_shrinks_the_step(make, factor):
    base = mlp(16).double()
    data = batch(torch.float64)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt_a = mulo.MuLO(a, meta_weights=meta())
    opt_b = mulo.MuLO(b, meta_weights=meta())
    sched = make(opt_a)
    train(a, opt_a, data, 1)
    train(b, opt_b, data, 1)
    sched.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(factor)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    before = snapshot(a)
    train(a, opt_a, data, 1)
    train(b, opt_b, data, 1)
    for n, pa in a.named_parameters():
        pb = dict(b.named_parameters())[n]
        full = pb.detach() - before[n]
        assert full.abs().max() > 0, n
        torch.testing.assert_close(pa.detach() - before[n], factor * full, rtol=1e-5, atol=1e-15)


@pytest.mark.parametrize("cls", [mulo.MuLO, mulo.SPLO])
def test_weight_decay_is_decoupled_with_zero_step(cls):
    lr, wd = 0.5, 0.1
    model = mlp(16)
    before = snapshot(model)
    opt = cls(model, meta_weights=zero_net_meta(), lr=lr, weight_decay=wd)
    train(model, opt, batch(), 1)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n] * (1 - lr * wd)), n
    # the same meta-params without decay leave every parameter exactly where it was
    model = mlp(16)
    train(model, cls(model, meta_weights=zero_net_meta(), lr=lr), batch(), 1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_weight_decay_comes_before_the_learned_step():
    """opt(wd) from p with gradient g == opt(wd=0) from p*(1-lr*wd) with the same g: the LO
    features read the decayed parameter."""
    lr, wd = 0.5, 0.2
    base = mlp(16)
    backward(base, batch())
    grads = {n: p.grad.clone() for n, p in base.named_parameters()}
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1 - lr * wd)
    opt_a = mulo.MuLO(a, meta_weights=meta(), lr=lr, weight_decay=wd)
    opt_b = mulo.MuLO(b, meta_weights=meta(), lr=lr)
    for model in (a, b):
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
    opt_a.step()
    opt_b.step()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
        assert not torch.equal(pa, base.get_parameter(n) * (1 - lr * wd)), n


# --- robustness: non-finite gradients, dtypes, ranks, memory -----------------------------------


def _run_with_grads(base, grads_per_step):
    model = copy.deepcopy(base)
    opt = mulo.MuLO(model, meta_weights=meta())
    for grads in grads_per_step:
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
    return model, opt


def test_non_finite_gradient_entries_are_zeroed():
    base = mlp(16)
    backward(base, batch())
    clean = {n: p.grad.clone() for n, p in base.named_parameters()}
    bad = {n: g.clone() for n, g in clean.items()}
    bad["hidden1.weight"][0, 0] = float("nan")
    bad["hidden1.weight"][1, 2] = float("inf")
    bad["hidden1.weight"][3, 3] = float("-inf")
    bad["hidden1.bias"][0] = float("nan")
    bad["hidden1.bias"][1] = float("inf")
    bad["hidden1.bias"][2] = float("-inf")
    zeroed = {n: torch.where(torch.isfinite(g), g, torch.zeros_like(g)) for n, g in bad.items()}
    backward(base, batch(seed=7))
    second = {n: p.grad.clone() for n, p in base.named_parameters()}

    got, opt = _run_with_grads(base, [bad, second])
    want, _ = _run_with_grads(base, [zeroed, second])
    for (n, p), q in zip(got.named_parameters(), want.parameters(), strict=True):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q), n
        assert all(torch.isfinite(t).all() for t in opt.state[p].values() if torch.is_tensor(t))
    assert torch.isnan(bad["hidden1.weight"][0, 0])  # the caller's gradient is not rewritten


def test_all_nan_gradient():
    base = mlp(16)
    backward(base, batch())
    grads = {n: p.grad.clone() for n, p in base.named_parameters()}
    nan = {n: g.clone() for n, g in grads.items()}
    nan["hidden2.weight"].fill_(float("nan"))
    nan["input.bias"].fill_(float("inf"))
    zero = {n: g.clone() for n, g in grads.items()}
    zero["hidden2.weight"].zero_()
    zero["input.bias"].zero_()
    got, _ = _run_with_grads(base, [nan, grads])
    want, _ = _run_with_grads(base, [zero, grads])
    for (n, p), q in zip(got.named_parameters(), want.parameters(), strict=True):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q), n


def test_float64_parameters_and_state():
    base = mlp(16)
    m64 = copy.deepcopy(base).double()
    opt = mulo.MuLO(m64, meta_weights=meta())
    train(m64, opt, batch(torch.float64), 2)
    m32 = copy.deepcopy(base)
    train(m32, mulo.MuLO(m32, meta_weights=meta()), batch(), 2)
    for (n, p64), p0, p32 in zip(
        m64.named_parameters(), base.parameters(), m32.parameters(), strict=True
    ):
        assert p64.dtype is torch.float64
        # the accumulators follow the parameter dtype (the step counter may be an integer)
        acc = [t for k, t in opt.state[p64].items() if torch.is_tensor(t) and k not in COUNTERS]
        assert acc and all(t.dtype is torch.float64 for t in acc), n
        d64, d32 = p64.detach() - p0.double(), (p32.detach() - p0).double()
        assert d64.abs().max() > 0, n
        torch.testing.assert_close(d64, d32, rtol=0, atol=5e-3 * d64.abs().max().item())


COUNTERS = ("t", "step")


def _counter(state) -> float:
    return next(state[k] for k in COUNTERS if k in state).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_step_counter_keeps_counting_in_low_precision(dtype):
    """The time features read t up to 1e5 steps: the counter must not stall where bf16 (256)
    or fp16 (2048) stop representing consecutive integers, not even after a state_dict trip."""
    p = nn.Parameter(torch.randn(4, 3).to(dtype))
    opt = mulo.SPLO([p], meta_weights=meta())
    p.grad = torch.randn(4, 3).to(dtype)
    opt.step()
    assert _counter(opt.state[p]) == 1
    next(opt.state[p][k] for k in COUNTERS if k in opt.state[p]).fill_(2048)
    opt.step()
    assert _counter(opt.state[p]) == 2049
    fresh = mulo.SPLO([p], meta_weights=meta())
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    fresh.step()
    assert _counter(fresh.state[p]) == 2050
    assert torch.isfinite(p).all()


class Mixed(nn.Module):
    """A rank-4 conv, a rank-2 linear, a rank-1 bias and a rank-0 gain."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 32)
        self.head = nn.Linear(32, OUT)
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc(h))) * self.gain


@pytest.mark.parametrize("cls", [mulo.SPLO, mulo.MuLO])
def test_rank_0_and_rank_4_parameters(cls):
    torch.manual_seed(0)
    model = Mixed()
    opt = cls(model, meta_weights=meta())
    if cls is mulo.MuLO:
        assert scales(opt, model)["fc.weight"] == 1 / 64 and scales(opt, model)["gain"] == 1.0
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, OUT, (8,))
    before = snapshot(model)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():
        assert p.shape == before[n].shape, n
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, before[n]), n
    assert model.gain.dim() == 0 and _counter(opt.state[model.gain]) == 3


def test_state_is_o_of_elements_not_39_times():
    torch.manual_seed(0)
    model = Mixed()
    opt = mulo.SPLO(model, meta_weights=meta())
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, OUT, (8,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n, p in model.named_parameters():
        tensors = [t for t in opt.state[p].values() if torch.is_tensor(t)]
        assert tensors, n
        assert all(t.numel() <= 4 * p.numel() + 64 for t in tensors), n
        assert sum(t.numel() for t in tensors) <= 7 * p.numel() + 64, n
    # nothing element-sized hides elsewhere in the state dict either
    total = sum(
        t.numel()
        for s in opt.state_dict()["state"].values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    assert total <= 7 * sum(p.numel() for p in model.parameters()) + 64 * 5


def test_chunk_size_does_not_change_the_result():
    base = mlp(24).double()
    data = batch(torch.float64)
    results = []
    for chunk in (1, 7, 100, LF.DEFAULT_CHUNK_SIZE):
        model = copy.deepcopy(base)
        train(model, mulo.MuLO(model, meta_weights=meta(), chunk_size=chunk), data, 2)
        results.append(model)
    for other in results[:-1]:
        for p, q in zip(other.parameters(), results[-1].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# --- constructor validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": -0.1}, {"weight_decay": -1e-4}, {"chunk_size": 0}, {"chunk_size": -5}],
    ids=["lr", "weight_decay", "chunk_size0", "chunk_size_neg"],
)
@pytest.mark.parametrize("cls", [mulo.MuLO, mulo.SPLO])
def test_bad_constructor_arguments(cls, kwargs):
    with pytest.raises(ValueError):
        cls(mlp(8), meta_weights=meta(), **kwargs)
