"""Roles, init, multipliers and s_W of the μP / SP layer (docs/math.md §2)."""

import copy

import mup
import pytest
import torch
from torch import nn

import parametrizations as P

R = P.Role


class Tiny(nn.Module):
    """Embedding + LayerNorm + Linears, with the MHA registered last so its out_proj (a Linear) is
    the last Linear in registration order and must still not become the readout."""

    def __init__(self, d=16, vocab=40):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, vocab)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, tokens):
        h = self.norm(self.embed(tokens))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h + self.proj(torch.relu(self.ff(h))))


class WithPosEmbed(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, d))
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        return self.out(self.fc(x + self.pos_embed))


class WithMatrix(nn.Module):
    """A custom width x width matrix: ambiguous without infshape, hidden with it."""

    def __init__(self, w):
        super().__init__()
        self.inp = nn.Linear(8, w)
        self.mat = nn.Parameter(torch.randn(w, w) / w**0.5)
        self.out = P.Readout(w, 3)

    def forward(self, x):
        return self.out(self.inp(x) @ self.mat)


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# --- roles -------------------------------------------------------------------------------------


def test_roles_of_mlp_builder():
    model = P.mlp(12, 32, 3, 5)
    roles = P.get("mup").roles(model)
    assert list(roles) == [n for n, _ in model.named_parameters()]
    assert roles["input.weight"] is R.INPUT
    assert roles["hidden1.weight"] is roles["hidden2.weight"] is R.HIDDEN
    assert roles["readout.weight"] is R.OUTPUT
    assert all(roles[n] is R.VECTOR for n in roles if n.endswith("bias"))
    assert P.get("sp").roles(model) == roles  # roles belong to the model, not the scheme


def test_roles_of_hand_written_model():
    roles = P.get("mup").roles(Tiny())
    assert roles == {
        "embed.weight": R.INPUT,
        "norm.weight": R.VECTOR,
        "norm.bias": R.VECTOR,
        "ff.weight": R.HIDDEN,  # an embedding came first, so the first Linear is hidden
        "ff.bias": R.VECTOR,
        "proj.weight": R.HIDDEN,
        "proj.bias": R.VECTOR,
        "head.weight": R.OUTPUT,
        "head.bias": R.VECTOR,
        "attn.in_proj_weight": R.HIDDEN,
        "attn.in_proj_bias": R.VECTOR,
        "attn.out_proj.weight": R.HIDDEN,
        "attn.out_proj.bias": R.VECTOR,
    }


def test_plain_linears_and_single_linear():
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    assert P.get("mup").roles(seq) == {
        "0.weight": R.INPUT,
        "0.bias": R.VECTOR,
        "2.weight": R.HIDDEN,
        "2.bias": R.VECTOR,
        "3.weight": R.OUTPUT,
        "3.bias": R.VECTOR,
    }
    assert P.get("mup").roles(nn.Linear(4, 2))["weight"] is R.OUTPUT  # readout wins


def test_override_by_name():
    model = P.mlp(12, 32, 2, 5)
    roles = P.get("mup").roles(model, overrides={"hidden1.weight": "input", "input.bias": R.HIDDEN})
    assert roles["hidden1.weight"] is R.INPUT and roles["input.bias"] is R.HIDDEN
    assert P.get("mup").update_scales(model, {"hidden1.weight": "input"})["hidden1.weight"] == 1.0


def test_unknown_override_name_and_role():
    model = P.mlp(12, 32, 2, 5)
    with pytest.raises(P.ParametrizationError) as e:
        P.get("mup").roles(model, overrides={"hiden1.weight": "hidden"})
    assert "hiden1.weight" in one_line_error(e)
    with pytest.raises(P.ParametrizationError) as e:
        P.get("mup").roles(model, overrides={"hidden1.weight": "middle"})
    assert "middle" in one_line_error(e) and "hidden" in one_line_error(e)


def test_unclassifiable_parameter_error_and_override():
    model = WithPosEmbed()
    with pytest.raises(P.ParametrizationError) as e:
        P.get("mup").roles(model)
    msg = one_line_error(e)
    assert "'pos_embed'" in msg and "(1, 4, 16)" in msg and "overrides={'pos_embed':" in msg
    assert isinstance(e.value, ValueError)
    roles = P.get("mup").roles(model, overrides={"pos_embed": "input"})
    assert roles["pos_embed"] is R.INPUT and roles["fc.weight"] is R.INPUT
    P.get("mup").init_(model, overrides={"pos_embed": "input"})
    assert torch.all(model.pos_embed == 0)  # unknown input-like tensors keep their own init
    # SP treats every tensor alike, so it needs no roles and no overrides.
    assert set(P.get("sp").update_scales(model).values()) == {1.0}
    P.get("sp").init_(model)


def test_roles_from_infshape_agree_with_inference():
    model, base = P.mlp(12, 64, 3, 5), P.mlp(12, 8, 3, 5)
    inferred = P.get("mup").roles(model)
    mup.set_base_shapes(model, base, rescale_params=False)  # Readout passes mup's readout assert
    assert P.get("mup").roles(model) == inferred
    assert P.get("mup").update_scales(model)["hidden1.weight"] == 1 / 64


def test_infshape_classifies_custom_matrix():
    model = WithMatrix(32)
    with pytest.raises(P.ParametrizationError, match="'mat'"):
        P.get("mup").roles(model)
    mup.set_base_shapes(model, WithMatrix(4), rescale_params=False)
    roles = P.get("mup").roles(model)
    assert roles["mat"] is R.HIDDEN and roles["inp.weight"] is R.INPUT
    assert roles["out.weight"] is R.OUTPUT
    assert P.get("mup").update_scales(model)["mat"] == 1 / 32


# --- s_W ---------------------------------------------------------------------------------------


def test_update_scales():
    model = P.mlp(12, 48, 3, 5)
    s = P.get("mup").update_scales(model)
    assert all(type(v) is float for v in s.values())
    assert s["hidden1.weight"] == s["hidden2.weight"] == 1 / 48
    assert {n: v for n, v in s.items() if "hidden" not in n or n.endswith("bias")} == {
        n: 1.0 for n in s if "hidden" not in n or n.endswith("bias")
    }
    assert set(P.get("sp").update_scales(model).values()) == {1.0}
    tiny = P.get("mup").update_scales(Tiny(d=16))
    assert tiny["proj.weight"] == 1 / 64 and tiny["attn.in_proj_weight"] == 1 / 16
    assert tiny["embed.weight"] == tiny["head.weight"] == 1.0


def test_tensor_scale():
    model = P.mlp(12, 64, 3, 5)
    with pytest.raises(P.ParametrizationError) as e:
        P.get("mup").tensor_scale(model.hidden1.weight)
    msg = one_line_error(e)
    assert "MuLO(model)" in msg and "set_base_shapes" in msg
    assert P.get("sp").tensor_scale(model.hidden1.weight) == 1.0
    mup.set_base_shapes(model, P.mlp(12, 8, 3, 5), rescale_params=False)
    mu = P.get("mup")
    assert mu.tensor_scale(model.hidden1.weight) == 1 / 64
    for p in (model.input.weight, model.readout.weight, model.hidden1.bias):
        assert mu.tensor_scale(p) == 1.0
    by_name = mu.update_scales(model)
    assert all(mu.tensor_scale(p) == by_name[n] for n, p in model.named_parameters())


# --- init --------------------------------------------------------------------------------------


def test_mup_init_statistics():
    torch.manual_seed(0)
    model = P.mlp(32, 1024, 2, 10)
    assert abs(model.hidden1.weight.std().item() * 32 - 1) < 0.05
    assert abs(model.input.weight.std().item() * 32**0.5 - 1) < 0.05
    assert abs(model.hidden1.bias.std().item() - 1) < 0.1  # μLO MLP tasks: biases N(0, 1)
    assert torch.all(model.readout.weight == 0) and torch.all(model.readout.bias == 0)
    assert model.readout.multiplier == 1 / 1024


def test_sp_init_statistics():
    torch.manual_seed(0)
    model = P.mlp(32, 1024, 2, 10, parametrization="sp")
    assert abs(model.hidden1.weight.std().item() * 32 - 1) < 0.05
    assert abs(model.readout.weight.std().item() * 32 - 1) < 0.05  # not zero under SP
    assert all(torch.all(m.bias == 0) for m in (model.input, model.hidden1, model.readout))
    assert model.readout.multiplier == 1.0
    assert P.mlp(32, 64, 2, 10, parametrization="sp", bias_std=0.5).input.bias.abs().sum() > 0


def test_init_norms_and_embeddings():
    torch.manual_seed(0)
    model = P.get("mup").init_(Tiny(d=256, vocab=64), bias_std=1.0)
    assert torch.all(model.norm.weight == 1) and torch.all(model.norm.bias == 0)
    assert abs(model.embed.weight.std().item() - 1) < 0.05  # one-hot input: fan-in 1
    assert abs(model.proj.weight.std().item() * 1024**0.5 - 1) < 0.05
    assert torch.all(model.head.weight == 0)  # a plain last Linear is the readout too
    assert abs(model.ff.bias.std().item() - 1) < 0.1


# --- readout -----------------------------------------------------------------------------------


def test_readout_multiplier_survives_copies():
    torch.manual_seed(0)
    model = P.mlp(6, 16, 2, 3, output_mult=2.0)
    with torch.no_grad():
        model.readout.weight.normal_()  # make the readout non-trivial
        model.readout.bias.normal_()
    ro = model.readout
    assert type(ro.multiplier) is float and ro.multiplier == 2.0 / 16
    assert "output_mult=2.0" in repr(ro) and "width=16" in repr(ro)
    x = torch.randn(5, 6)
    expected = model(x)
    torch.testing.assert_close(ro(model[:-1](x)), (model[:-1](x) @ ro.weight.T + ro.bias) / 8)

    torch.testing.assert_close(copy.deepcopy(model)(x), expected, rtol=0, atol=0)
    fresh = P.mlp(6, 16, 2, 3, output_mult=2.0)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assigned = P.mlp(6, 16, 2, 3, output_mult=2.0)
    assigned.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    torch.testing.assert_close(assigned(x), expected, rtol=0, atol=0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = torch.func.functional_call(fresh, params, (x,))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_readout_defaults_and_parametrization_multipliers():
    assert P.Readout(32, 4).multiplier == 1 / 32
    assert P.Readout(32, 4, output_mult=3.0, width=8).multiplier == 3 / 8
    assert isinstance(P.Readout(32, 4), nn.Linear)
    assert P.get("mup").output_multiplier(128, 2.0) == 2 / 128
    assert P.get("sp").output_multiplier(128, 2.0) == 1.0


# --- lookup and validation ---------------------------------------------------------------------


def test_get():
    assert isinstance(P.get("mup"), P.MuP) and P.get("mup").name == "mup"
    assert isinstance(P.get("μP"), P.MuP) and isinstance(P.get("mu"), P.MuP)
    assert isinstance(P.get("SP"), P.SP) and P.get("sp").name == "sp"
    with pytest.raises(P.ParametrizationError) as e:
        P.get("ntk")
    msg = one_line_error(e)
    assert "'ntk'" in msg and "mup" in msg and "sp" in msg


@pytest.mark.parametrize("width, depth", [(0, 3), (-4, 3), (16, 0)])
def test_mlp_rejects_bad_sizes(width, depth):
    with pytest.raises(ValueError) as e:
        P.mlp(4, width, depth, 2)
    assert ("width" if width <= 0 else "depth") in one_line_error(e)


def test_mlp_shape_and_depth():
    model = P.mlp(7, 16, 3, 4)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 7), (16, 16), (16, 16), (4, 16)]
    assert model(torch.randn(2, 7)).shape == (2, 4)


def test_mu_adam_param_groups():
    model = P.mlp(12, 64, 3, 5)
    groups = P.mu_adam_param_groups(model, lr=0.1)
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == pytest.approx([0.1 / 64, 0.1])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["lr"] for g in P.mu_adam_param_groups(model, 0.1, "sp")] == [0.1]
    torch.optim.Adam(groups)
