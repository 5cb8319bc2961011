"""Hand-designed baselines, learning-rate schedules and batch-size lr rules (mulo.baselines)."""

from __future__ import annotations

import copy
import io
import math

import prodigyopt
import pytest
import torch
import torch.nn.functional as F

import mulo
import parametrizations as P
from mulo import baselines as B

PARAMETRIZATIONS = ("mup", "sp")
HAND_DESIGNED = ("sgd", "adamw", "muadam", "muon", "prodigy")
# lrs that train the tiny MLP below in 30 steps, per (optimizer, parametrization); μP's
# zero-initialised readout with its 1/width multiplier starts slower under sgd, adamw and muon
GOOD_LR = {
    ("sgd", "mup"): 1.0,
    ("sgd", "sp"): 0.5,
    ("adamw", "mup"): 3e-2,
    ("adamw", "sp"): 1e-2,
    ("muon", "mup"): 0.2,
    ("muon", "sp"): 0.1,
    ("muadam", "mup"): 0.1,
    ("muadam", "sp"): 0.1,
    ("prodigy", "mup"): 1.0,
    ("prodigy", "sp"): 1.0,
}
HIDDEN = ("hidden1.weight", "hidden2.weight")


def mlp(parametrization: str = "mup", seed: int = 0):
    torch.manual_seed(seed)
    return P.mlp(8, 16, 3, 4, parametrization=parametrization)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def meta():
    return mulo.functional.init_meta_params(generator=torch.Generator().manual_seed(1))


def train(model, opt, steps: int, sched=None, data=None) -> float:
    x, y = data or batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def lr_of(opt, param) -> float:
    (group,) = [g for g in opt.param_groups if any(p is param for p in g["params"])]
    return group["lr"]


# -- every optimizer builds and trains ---------------------------------------------------------


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("name", HAND_DESIGNED)
def test_hand_designed_baselines_lower_the_loss(name, parametrization):
    model = mlp(parametrization)
    lr = GOOD_LR[name, parametrization]
    opt = B.build_optimizer(name, model, lr=lr, parametrization=parametrization)
    assert isinstance(opt, torch.optim.Optimizer)
    before = train(model, opt, 0)
    after = train(model, opt, 30)
    assert after < 0.9 * before


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("name", ["mulo", "splo"])
def test_learned_optimizers_build_and_step(name, parametrization):
    model = mlp(parametrization)
    opt = B.build_optimizer(name, model, meta_weights=meta(), parametrization=parametrization)
    assert isinstance(opt, mulo.MuLO if name == "mulo" else mulo.SPLO)
    assert all(g["lr"] == 1.0 for g in opt.param_groups)
    start = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 3)
    assert any(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_prodigy_comes_from_prodigyopt():
    opt = B.build_optimizer("prodigy", mlp(), weight_decay=0.01)
    assert isinstance(opt, prodigyopt.Prodigy)
    assert opt.param_groups[0]["lr"] == 1.0 and opt.param_groups[0]["weight_decay"] == 0.01


def lo_kwargs(name: str) -> dict:
    """The learned optimizers' own arguments: small_fc_lopt weights, or VeLO's (it has none
    shipped) and the run length T it requires."""
    if name in ("muvelo", "velo"):
        return {"meta_weights": "meta-init", "total_steps": 5}
    return {"meta_weights": meta()}


def test_default_lrs_and_momenta():
    for name in B.OPTIMIZER_NAMES:
        opt = B.build_optimizer(name, mlp(), **lo_kwargs(name))
        assert opt.param_groups[0]["lr"] == B.DEFAULT_LR[name], name
    sgd = B.build_optimizer("sgd", mlp())
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"]
    muon = B.build_optimizer("muon", mlp())
    assert muon.optimizers[0].param_groups[0]["momentum"] == 0.95
    assert muon.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3)
    assert not B.build_optimizer("sgd", mlp(), momentum=0.0).param_groups[0]["nesterov"]


# -- μAdam --------------------------------------------------------------------------------------


def test_muadam_lr_is_lr_over_fan_in_for_hidden_weights_only():
    model = mlp("mup")
    opt = B.build_optimizer("muadam", model, lr=0.1, weight_decay=1e-2)
    assert isinstance(opt, torch.optim.AdamW)
    for name, p in model.named_parameters():
        expected = 0.1 / 16 if name in HIDDEN else 0.1
        assert lr_of(opt, p) == pytest.approx(expected), name
    for g in opt.param_groups:  # mup.MuAdam's rule: the per-step decay lr * wd is width-free
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.1 * 1e-2)
    sp = B.build_optimizer("muadam", mlp("sp"), lr=0.1, parametrization="sp")
    assert [g["lr"] for g in sp.param_groups] == [0.1]


def test_muadam_base_width_rescales_hidden_weights():
    model = mlp("mup")
    opt = B.build_optimizer("muadam", model, lr=0.1, base_width=4)
    for name, p in model.named_parameters():
        assert lr_of(opt, p) == pytest.approx(0.1 * 4 / 16 if name in HIDDEN else 0.1), name
    at_width = B.build_optimizer("muadam", model, lr=0.1, base_width=16)
    assert [g["lr"] for g in at_width.param_groups] == [pytest.approx(0.1)]


# -- Muon + AdamW -------------------------------------------------------------------------------


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_muon_gets_exactly_the_hidden_matrices(parametrization):
    model = mlp(parametrization)
    opt = B.build_optimizer("muon", model, lr=0.04, parametrization=parametrization)
    assert isinstance(opt, B.CombinedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    muon, adamw = opt.optimizers
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    named = dict(model.named_parameters())
    ids = lambda o: {id(p) for g in o.param_groups for p in g["params"]}  # noqa: E731
    assert ids(muon) == {id(named[n]) for n in HIDDEN}
    assert ids(adamw) == {id(p) for n, p in named.items() if n not in HIDDEN}
    assert muon.param_groups[0]["lr"] == 0.04
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.04 * B.MUON_ADAMW_LR_RATIO)
    assert opt.param_groups == muon.param_groups + adamw.param_groups
    assert all(
        a is b
        for a, b in zip(opt.param_groups, muon.param_groups + adamw.param_groups, strict=True)
    )


def test_muon_roles_overrides_move_a_matrix_to_adamw():
    model = mlp()
    opt = B.build_optimizer("muon", model, roles={"hidden2.weight": "input"})
    assert [p for g in opt.optimizers[0].param_groups for p in g["params"]] == [
        model.hidden1.weight
    ]


def test_muon_without_hidden_matrices_is_adamw_with_a_warning():
    model = P.mlp(8, 16, 1, 4)
    with pytest.warns(UserWarning, match="no hidden 2-D weight"):
        opt = B.build_optimizer("muon", model)
    assert [type(o) for o in opt.optimizers] == [torch.optim.AdamW]


def test_combined_state_dict_round_trip_continues_identically():
    """k steps, save, load into a fresh model/optimizer/schedule, k more == 2k uninterrupted."""
    k = 4

    def fresh(model):
        opt = B.build_optimizer("muon", model, lr=0.05, weight_decay=0.01)
        return opt, B.build_schedule(opt, "cosine", steps=3 * k, warmup=2, final_lr_frac=0.1)

    ref_model = mlp()
    ref_opt, ref_sched = fresh(ref_model)
    train(ref_model, ref_opt, 2 * k, ref_sched)

    model = mlp()
    opt, sched = fresh(model)
    train(model, opt, k, sched)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    resumed = mlp(seed=123)  # different init, overwritten by the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2, sched2 = fresh(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert len(opt2.state) == len(list(model.parameters()))
    train(resumed, opt2, k, sched2)
    for a, b in zip(ref_model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def test_combined_optimizer_contract():
    model = mlp()
    opt = B.build_optimizer("muon", model)
    x, y = batch()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    assert set(map(id, opt.state)) == {id(p) for p in model.parameters()}
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "lr": 0.5}, index=1)
    assert opt.param_groups[-1]["params"] == [extra] and opt.param_groups[-1]["lr"] == 0.5
    with pytest.raises(ValueError, match="index="):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="more than one"):
        opt.add_param_group({"params": [extra]}, index=0)
    with pytest.raises(ValueError, match="more than one"):
        B.CombinedOptimizer([torch.optim.SGD([extra], lr=1), torch.optim.SGD([extra], lr=1)])
    with pytest.raises(ValueError, match="2 optimizers"):
        opt.load_state_dict({"optimizers": []})
    clone = copy.deepcopy(opt)
    assert len(clone.param_groups) == len(opt.param_groups)
    assert clone.param_groups[0] is clone.optimizers[0].param_groups[0]
    assert "Muon" in repr(opt) and "AdamW" in repr(opt)


# -- schedules ----------------------------------------------------------------------------------


def lrs(name: str, steps: int, opt=None, **kwargs) -> list[float]:
    """The lr each of the `steps` updates uses (0.1 peak), read as a training loop would."""
    opt = opt or torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = B.build_schedule(opt, name, steps=steps, **kwargs)
    out = []
    for _ in range(steps + 2):  # two past the end: the lr stays at its last value
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_schedule_with_warmup():
    got = lrs("constant", 10, warmup=4)
    assert got[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert got[4:] == pytest.approx([0.1] * 8)
    assert lrs("constant", 5) == pytest.approx([0.1] * 7)


def test_cosine_schedule_closed_form():
    steps, warmup, final = 24, 4, 0.1
    got = lrs("cosine", steps, warmup=warmup, final_lr_frac=final)
    assert got[:warmup] == pytest.approx([0.1 * (t + 1) / warmup for t in range(warmup)])
    for t in range(warmup, steps):
        p = (t - warmup + 1) / (steps - warmup)
        assert got[t] == pytest.approx(
            0.1 * (final + (1 - final) * (1 + math.cos(math.pi * p)) / 2)
        )
    midpoint = warmup - 1 + (steps - warmup) // 2  # progress exactly 1/2
    assert got[midpoint] == pytest.approx(0.1 * (1 + final) / 2)
    assert got[steps - 1] == pytest.approx(0.1 * final) and got[steps:] == pytest.approx([0.01] * 2)
    assert all(a >= b for a, b in zip(got[warmup - 1 :], got[warmup:], strict=False))


def test_wsd_schedule_plateau_then_linear_cooldown():
    steps, warmup = 20, 2
    got = lrs("wsd", steps, warmup=warmup, cooldown=0.25, final_lr_frac=0.2)
    assert got[:2] == pytest.approx([0.05, 0.1])
    assert got[2:15] == pytest.approx([0.1] * 13)  # stable until the last 5 steps
    assert got[15:20] == pytest.approx([0.1 * (1 - 0.8 * k / 5) for k in range(1, 6)])
    assert got[19] == pytest.approx(0.02) and got[20:] == pytest.approx([0.02] * 2)
    assert lrs("wsd", 10, cooldown=0.0) == pytest.approx([0.1] * 12)
    assert lrs("wsd", 10, cooldown=1.0)[9] == 0.0


def test_schedules_keep_group_ratios_for_muadam_and_muon():
    model = mlp()
    opt = B.build_optimizer("muadam", model, lr=0.1)
    peaks = [g["lr"] for g in opt.param_groups]
    sched = B.build_schedule(opt, "cosine", steps=10, final_lr_frac=0.5)
    for _ in range(10):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * p for p in peaks])
    muon = B.build_optimizer("muon", model, lr=0.02)
    sched = B.build_schedule(muon, "wsd", steps=4, cooldown=0.5)
    muon.step()
    sched.step()
    assert muon.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.02)
    muon.step()
    sched.step()
    assert muon.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)
    assert muon.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.01 * B.MUON_ADAMW_LR_RATIO)


# -- batch-size lr scaling ----------------------------------------------------------------------


def test_scaled_lr_rules():
    assert B.scaled_lr(0.1, 512, 128, "linear") == pytest.approx(0.4)
    assert B.scaled_lr(0.1, 512, 128, "sqrt") == pytest.approx(0.2)
    assert B.scaled_lr(0.1, 32, 128, "sqrt") == pytest.approx(0.05)
    assert B.scaled_lr(0.1, None, None, "none") == 0.1
    assert B.scaled_lr(0.1, 512, 128) == 0.1


@pytest.mark.parametrize("name", B.OPTIMIZER_NAMES)
def test_lr_scaling_applies_to_every_optimizer(name):
    opt = B.build_optimizer(
        name, mlp(), **lo_kwargs(name), batch_size=256, base_batch_size=64, lr_scaling="sqrt"
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(2 * B.DEFAULT_LR[name])
    if name == "muon":
        assert opt.param_groups[-1]["lr"] == pytest.approx(2 * 0.02 * B.MUON_ADAMW_LR_RATIO)


# -- bad inputs ---------------------------------------------------------------------------------

BAD_OPTIMIZER_ARGS = [
    dict(name="adam"),
    dict(name="adamw", lr=0),
    dict(name="adamw", lr=-1e-3),
    dict(name="adamw", lr=float("nan")),
    dict(name="sgd", weight_decay=-1),
    dict(name="sgd", momentum=1.0),
    dict(name="adamw", betas=(0.9, 1.0)),
    dict(name="adamw", betas=0.9),
    dict(name="muadam", parametrization="ntk"),
    dict(name="muadam", base_width=0),
    dict(name="adamw", lr_scaling="cubic"),
    dict(name="adamw", lr_scaling="linear"),
    dict(name="adamw", lr_scaling="sqrt", batch_size=64),
    dict(name="adamw", lr_scaling="linear", batch_size=0, base_batch_size=64),
    dict(name="muon", roles={"nope.weight": "input"}),
]


@pytest.mark.parametrize("kwargs", BAD_OPTIMIZER_ARGS, ids=repr)
def test_bad_optimizer_arguments_raise_one_line_value_errors(kwargs):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError) as err:
        B.build_optimizer(kwargs.pop("name"), mlp(), **kwargs)
    assert "\n" not in str(err.value) and str(err.value)


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; choose one of: mulo, splo"):
        B.build_optimizer("adam", mlp())
    frozen = mlp()
    frozen.requires_grad_(False)
    for model in (frozen, [torch.nn.Parameter(torch.zeros(2))]):
        with pytest.raises(ValueError):
            B.build_optimizer("adamw", model)


BAD_SCHEDULE_ARGS = [
    dict(name="linear", steps=10),
    dict(name="cosine", steps=0),
    dict(name="cosine", steps=2.5),
    dict(name="cosine", steps=10, warmup=-1),
    dict(name="cosine", steps=10, warmup=10),
    dict(name="wsd", steps=10, cooldown=1.5),
    dict(name="wsd", steps=10, cooldown=-0.1),
    dict(name="wsd", steps=10, warmup=5, cooldown=0.6),
    dict(name="cosine", steps=10, final_lr_frac=-0.5),
    dict(name="cosine", steps=10, final_lr_frac=2.0),
]


@pytest.mark.parametrize("kwargs", BAD_SCHEDULE_ARGS, ids=repr)
def test_bad_schedule_arguments_raise_one_line_value_errors(kwargs):
    kwargs = dict(kwargs)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError) as err:
        B.build_schedule(opt, kwargs.pop("name"), **kwargs)
    assert "\n" not in str(err.value) and str(err.value)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        B.build_schedule(object(), "constant", steps=3)


@pytest.mark.parametrize(
    "args",
    [(0.0, 2, 1, "linear"), (0.1, 2, 1, "square"), (0.1, 2, None, "sqrt"), (0.1, 2, -1, "sqrt")],
)
def test_bad_scaled_lr_arguments(args):
    with pytest.raises(ValueError) as err:
        B.scaled_lr(*args)
    assert "\n" not in str(err.value)
