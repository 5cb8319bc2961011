"""Fault and misuse cases of the drop-in optimizer, each compared with what torch.optim does.

Copies must step like the original; a huge but finite gradient must not poison the state; empty
parameters are skipped; a loaded state never brings its own s_W; parameter groups can be added
for frozen layers, bare vectors and by explicit role.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mulo
import parametrizations as P
from mulo import functional as LF

IN, OUT = 12, 5


def meta(seed: int = 1):
    return LF.init_meta_params(generator=torch.Generator().manual_seed(seed))


def mlp(width: int = 16, depth: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return P.mlp(IN, width, depth, OUT, parametrization="mup")


def data(seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, IN, generator=g), torch.randint(0, OUT, (32,), generator=g)


def step(model, opt, batch):
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def state_is_finite(opt) -> bool:
    return all(
        torch.isfinite(v).all()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )


# --- 1. copies ---------------------------------------------------------------------------------


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def _torch_saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("cls", [mulo.MuLO, mulo.SPLO])
@pytest.mark.parametrize("transport", [copy.deepcopy, _pickled, _torch_saved])
def test_copies_step_like_the_original(cls, transport):
    model = mlp()
    opt = cls(model, meta_weights=meta(), total_steps=50)
    batch = data()
    step(model, opt, batch)
    model2, opt2 = transport((model, opt))
    assert opt2.provenance == opt.provenance and opt2.total_steps == 50
    assert all(torch.equal(opt.meta[k], opt2.meta[k]) for k in opt.meta)
    for _ in range(2):
        step(model, opt, batch)
        step(model2, opt2, batch)
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(model2), strict=True))
    # the copy remembers roles of the model it was copied with (frozen layers included)
    assert set(opt2._module_scales) == set(model2.parameters())


# --- 2. a huge finite gradient entry -----------------------------------------------------------


@pytest.mark.parametrize("cls", [mulo.MuLO, mulo.SPLO])
@pytest.mark.parametrize("huge", [1e30, -3e38])
def test_huge_finite_gradient_keeps_the_state_finite(cls, huge):
    """AdamW loses the element forever (v = inf); the LO's per-tensor features used to turn the
    whole tensor's state NaN, dropping every later step of it."""
    model = mlp()
    opt = cls(model, meta_weights=meta())
    batch = data()
    step(model, opt, batch)
    opt.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    model.hidden1.weight.grad[0, 0] = huge
    model.hidden1.bias.grad[0] = huge
    opt.step()
    assert state_is_finite(opt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before = params(model)
    step(model, opt, batch)
    assert state_is_finite(opt)
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(b, p), "a later normal step must move every tensor"


def test_huge_gradient_is_clamped_not_zeroed():
    """The clamp keeps the sign and a huge magnitude: it is the gradient, just representable."""
    g = torch.tensor([[1.0, 1e30, -1e30, float("nan")]])
    out = LF._sanitize(g)
    assert torch.equal(out, torch.tensor([[1.0, 1e16, -1e16, 0.0]]))
    assert torch.isfinite(out.square()).all()
    small = torch.randn(3, 4)
    assert LF._sanitize(small) is small  # the common case copies nothing


# --- 3. empty parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0,), (0, 4), (4, 0), (2, 0, 3, 3)])
def test_zero_element_parameters_are_skipped(shape):
    empty = nn.Parameter(torch.zeros(shape))
    full = nn.Parameter(torch.randn(4, 4))
    opt = mulo.SPLO([empty, full], meta_weights=meta())
    reference = torch.optim.AdamW([nn.Parameter(torch.zeros(shape))])
    for _ in range(2):
        (full.square().sum() + empty.sum()).backward()
        before = full.detach().clone()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(before, full)
    assert empty.shape == shape
    reference.param_groups[0]["params"][0].grad = torch.zeros(shape)
    reference.step()  # AdamW accepts it too


def test_functional_step_of_an_empty_tensor_counts_the_step():
    p, g = torch.zeros(3, 0, 5), torch.zeros(3, 0, 5)
    state = LF.init_state(p)
    LF.lo_step_(meta(), state, p, g, scale=1.0, step_mult=LF.STEP_MULT_SP)
    assert state.t.tolist() == [1.0, 1.0, 1.0]


# --- 4. load_state_dict ------------------------------------------------------------------------


def test_loaded_state_keeps_the_current_models_scales():
    """An SP-LO state loaded into μLO: s_W comes from the μLO model (1/fan_in for hidden)."""
    model = mlp(16)
    sp = mulo.SPLO(model, meta_weights=meta())
    step(model, sp, data())
    mu = mulo.MuLO(model, meta_weights=meta())
    want = {n: mu.state[p]["scale"] for n, p in model.named_parameters()}
    mu.load_state_dict(sp.state_dict())
    got = {n: mu.state[p]["scale"] for n, p in model.named_parameters()}
    assert got == want and got["hidden1.weight"] == 1 / 16
    assert torch.equal(mu.state[model.hidden1.weight]["mv"], sp.state[model.hidden1.weight]["mv"])
    step(model, mu, data())  # and it steps


def test_state_from_another_width_is_one_clear_error():
    narrow, wide = mlp(16), mlp(64)
    opt16 = mulo.MuLO(narrow, meta_weights=meta())
    step(narrow, opt16, data())
    opt64 = mulo.MuLO(wide, meta_weights=meta())
    with pytest.raises(ValueError) as e:
        opt64.load_state_dict(opt16.state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "does not fit this model" in msg and "'mv'" in msg


def test_state_saved_before_any_step_loads():
    model = mlp()
    opt = mulo.MuLO(model, meta_weights=meta())
    opt.load_state_dict(mulo.MuLO(model, meta_weights=meta()).state_dict())
    step(model, opt, data())


# --- 5. add_param_group ------------------------------------------------------------------------


def test_progressive_unfreezing_uses_the_models_roles():
    model = mlp(32)
    for p in model.hidden1.parameters():
        p.requires_grad_(False)
    opt = mulo.MuLO(model, meta_weights=meta())
    assert model.hidden1.weight not in opt.state
    for p in model.hidden1.parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(model.hidden1.parameters())})
    assert opt.state[model.hidden1.weight]["scale"] == 1 / 32
    assert opt.state[model.hidden1.bias]["scale"] == 1.0
    before = model.hidden1.weight.detach().clone()
    step(model, opt, data())
    assert not torch.equal(before, model.hidden1.weight)


def test_bare_vector_gets_scale_one_without_infshape():
    model = mlp()
    opt = mulo.MuLO(model, meta_weights=meta())
    gain = nn.Parameter(torch.ones(OUT))
    opt.add_param_group({"params": [gain]})
    assert opt.state[gain]["scale"] == 1.0


@pytest.mark.parametrize(("role", "scale"), [("hidden", 1 / 8), ("readout", 1.0), ("input", 1.0)])
def test_explicit_role_in_the_group(role, scale):
    model = mlp()
    opt = mulo.MuLO(model, meta_weights=meta())
    extra = nn.Parameter(torch.randn(8, 8))
    opt.add_param_group({"params": [extra], "role": role})
    assert opt.state[extra]["scale"] == scale


def test_bare_matrix_without_role_or_infshape_still_says_how_to_fix_it():
    opt = mulo.MuLO(mlp(), meta_weights=meta())
    with pytest.raises(P.ParametrizationError, match="infshape"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(8, 8))]})


def test_unknown_role_in_the_group_is_one_line():
    opt = mulo.MuLO(mlp(), meta_weights=meta())
    with pytest.raises(P.ParametrizationError) as e:
        opt.add_param_group({"params": [nn.Parameter(torch.randn(8, 8))], "role": "middle"})
    assert "\n" not in str(e.value) and "valid roles" in str(e.value)
