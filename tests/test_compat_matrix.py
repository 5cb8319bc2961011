"""Compatibility matrix of the drop-in optimizers ``mulo.MuLO`` / ``mulo.SPLO``.

One test per situation a ``torch.optim`` user meets (tied weights, frozen and grad-less
parameters, param groups, LR schedulers, odd layouts and shapes, grad clipping, GradScaler,
DDP, ``torch.compile``, ``repr``). Each either works, checked against ``torch.optim.AdamW``
in the same situation where that makes sense, or is one clear one-line error. Every optimizer
gets explicit meta-weights (the seeded meta-initialisation, whose steps really move
parameters). Copies (deepcopy, pickle, torch.save) are covered in ``test_reliability_optim.py``.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import socket
import sys
import warnings
from pathlib import Path

import mup
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import run_ranks
from torch import nn

import mulo
import parametrizations as P
from mulo import functional as LF

IN, WIDTH, OUT = 12, 16, 5
LOS = [mulo.MuLO, mulo.SPLO]
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def meta(seed: int = 1) -> dict[str, torch.Tensor]:
    return LF.init_meta_params(generator=torch.Generator().manual_seed(seed))


def mlp(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return P.mlp(IN, WIDTH, 3, OUT, parametrization="mup").to(dtype)


def batch(seed: int = 123, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, IN, generator=g, dtype=dtype), torch.randint(0, OUT, (32,), generator=g)


def backward(model, data, scale: float = 1.0):
    loss = F.cross_entropy(model(data[0]), data[1])
    (loss * scale).backward()
    return loss


def train_step(model, opt, data):
    opt.zero_grad()
    backward(model, data)
    opt.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def counter(opt, p) -> float:
    """The step counter of one parameter (0 before its first step), LO or AdamW."""
    step = opt.state[p].get("step")
    return 0.0 if step is None else float(step.reshape(()).item())


def state_copy(opt) -> dict:
    return {
        p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for p in a:
        if a[p].keys() != b[p].keys():
            return False
        for k, v in a[p].items():
            w = b[p][k]
            same = torch.equal(v, w) if torch.is_tensor(v) else v == w
            if not same:
                return False
    return True


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def lo(cls, params, **kw):
    return cls(params, meta_weights=meta(), **kw)


# --- 1. tied weights and duplicated parameters ---------------------------------------------------


class TiedLM(nn.Module):
    """An embedding and a readout sharing one weight (as in weight-tied language models)."""

    def __init__(self, vocab: int = 10, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.readout = nn.Linear(dim, vocab, bias=False)
        self.readout.weight = self.emb.weight

    def forward(self, tokens):
        return self.readout(torch.relu(self.hidden(self.emb(tokens))))


@pytest.mark.parametrize("cls", LOS)
def test_tied_weights_are_stepped_once_per_step(cls):
    """torch dedups a shared Parameter in ``model.parameters()``; the LO holds it once and gives
    it one step per ``step()`` with the summed gradient of both uses, like AdamW."""
    torch.manual_seed(0)
    model = TiedLM()
    shared = model.emb.weight
    opt = lo(cls, model)
    adamw = torch.optim.AdamW(copy.deepcopy(model).parameters())
    assert len(opt.param_groups[0]["params"]) == len(adamw.param_groups[0]["params"]) == 3
    # the reference: the same LO on a standalone copy of the shared tensor, fed the same grads
    twin = nn.Parameter(shared.detach().clone())
    role = {"role": "input"} if cls is mulo.MuLO else {}
    ref = lo(cls, [{"params": [twin], **role}])
    assert ref.state[twin]["scale"] == opt.state[shared]["scale"]
    tokens = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    for step in range(1, 4):
        opt.zero_grad()
        F.cross_entropy(model(tokens), tokens).backward()
        twin.grad = shared.grad.clone()
        before = shared.detach().clone()
        opt.step()
        ref.step()
        assert not torch.equal(before, shared)
        assert torch.equal(twin, shared)  # one step, not two
        assert counter(opt, shared) == step
    assert model.readout.weight is model.emb.weight  # still tied


def _duplicated(cls):
    """A params list that names one tensor twice, and that tensor."""
    model = mlp()
    if cls is mulo.MuLO:  # MuLO needs infshapes to accept bare tensors
        mup.set_base_shapes(model, P.mlp(IN, 8, 3, OUT), rescale_params=False)
    params = list(model.parameters())
    return model, params + [model.hidden1.weight], model.hidden1.weight


@pytest.mark.parametrize("cls", LOS)
def test_parameter_listed_twice_warns_like_adamw(cls):
    """torch.optim warns (UserWarning, "duplicate parameters") and keeps both entries, so AdamW
    steps the tensor twice per ``step()``; the LO does exactly the same."""
    model_a, params_a, dup_a = _duplicated(torch.optim.AdamW)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        adamw = torch.optim.AdamW(params_a, foreach=False)
    model, params, dup = _duplicated(cls)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = lo(cls, params)
    for m, o in ((model_a, adamw), (model, opt)):
        train_step(m, o, batch())
    assert counter(opt, dup) == counter(adamw, dup_a) == 2
    assert counter(opt, model.hidden2.weight) == counter(adamw, model_a.hidden2.weight) == 1


@pytest.mark.parametrize("cls", LOS)
def test_parameter_in_two_groups_is_adamws_value_error(cls):
    model = mlp()
    groups = [{"params": [model.input.bias]}, {"params": [model.input.bias]}]
    with pytest.raises(ValueError, match="more than one parameter group") as adamw_error:
        torch.optim.AdamW(groups)
    with pytest.raises(ValueError, match="more than one parameter group") as error:
        lo(cls, groups)
    assert one_line(error) == one_line(adamw_error)


# --- 2. frozen parameters and missing grads ------------------------------------------------------


@pytest.mark.parametrize("cls", LOS)
def test_requires_grad_false_params_are_untouched(cls):
    """Frozen tensors in the params list (as ``AdamW(model.parameters())`` gets them) never
    move and never get accumulators; the others move."""
    model = mlp()
    if cls is mulo.MuLO:
        mup.set_base_shapes(model, P.mlp(IN, 8, 3, OUT), rescale_params=False)
    model.hidden1.requires_grad_(False)
    twin = copy.deepcopy(model)
    opt, adamw = lo(cls, list(model.parameters())), torch.optim.AdamW(twin.parameters())
    before = snapshot(model)
    for _ in range(2):
        train_step(model, opt, batch())
        train_step(twin, adamw, batch())
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        frozen = n.startswith("hidden1.")
        assert torch.equal(p, before[n]) == frozen, n
        assert torch.equal(q, before[n]) == frozen, n
        assert counter(opt, p) == counter(adamw, q) == (0 if frozen else 2), n
        if frozen:
            assert "mv" not in opt.state[p] and not adamw.state[q], n


@pytest.mark.parametrize("cls", LOS)
def test_params_whose_grad_is_none_on_some_steps(cls):
    """A tensor without ``.grad`` on a step keeps its value and its step counter on that step
    (AdamW does the same) and moves on the others."""
    model, twin = mlp(), mlp()
    opt, adamw = lo(cls, model), torch.optim.AdamW(twin.parameters())
    skip_on = {1, 3}
    for step in range(5):
        for m, o in ((model, opt), (twin, adamw)):
            o.zero_grad()
            backward(m, batch(seed=step))
            if step in skip_on:
                m.hidden2.weight.grad = None
        before = model.hidden2.weight.detach().clone()
        counts = counter(opt, model.hidden2.weight), counter(adamw, twin.hidden2.weight)
        opt.step()
        adamw.step()
        after = counter(opt, model.hidden2.weight), counter(adamw, twin.hidden2.weight)
        moved = not torch.equal(before, model.hidden2.weight)
        assert moved == (step not in skip_on), step
        assert after[0] == after[1] == counts[0] + (step not in skip_on), step
        assert counter(opt, model.hidden1.weight) == step + 1


# --- 3. zero_grad(set_to_none=False) -------------------------------------------------------------


@pytest.mark.parametrize("cls", LOS)
def test_zero_grad_set_to_none_false(cls):
    """Zeroed (not None) grads accumulate the next backward exactly, so training matches the
    ``set_to_none=True`` run bitwise; a step on all-zero grads is still a step (counter +1,
    like AdamW), unlike a step without grads."""
    a, b = mlp(), mlp()
    opt_a, opt_b = lo(cls, a), lo(cls, b)
    for step in range(3):
        opt_a.zero_grad(set_to_none=False)
        if step > 0:
            assert all(p.grad is not None and not p.grad.any() for p in a.parameters())
        opt_b.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in b.parameters())
        backward(a, batch(seed=step))
        backward(b, batch(seed=step))
        opt_a.step()
        opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    twin = mlp()
    adamw = torch.optim.AdamW(twin.parameters())
    for _ in range(3):
        train_step(twin, adamw, batch())
    opt_a.zero_grad(set_to_none=False)
    adamw.zero_grad(set_to_none=False)
    opt_a.step()
    adamw.step()
    assert counter(opt_a, a.input.weight) == counter(adamw, twin.input.weight) == 4


# --- 4. param groups ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LOS)
def test_param_groups_with_different_lr(cls):
    """Each group's lr multiplies its own step (float64, so deltas are exact to ~1e-12)."""
    lrs = {"input.": 1.0, "hidden1.": 0.5, "hidden2.": 0.25, "readout.": 0.0}
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    if cls is mulo.MuLO:  # bare tensors in groups: MuLO reads their infshapes
        mup.set_base_shapes(a, P.mlp(IN, 8, 3, OUT), rescale_params=False)
    groups = [
        {"params": [p for n, p in a.named_parameters() if n.startswith(k)], "lr": lr}
        for k, lr in lrs.items()
    ]
    opt_a = lo(cls, groups)
    assert [g["lr"] for g in opt_a.param_groups] == list(lrs.values())
    opt_b = lo(cls, b)
    before = snapshot(a)
    train_step(a, opt_a, batch(dtype=torch.float64))
    train_step(b, opt_b, batch(dtype=torch.float64))
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        lr = next(v for k, v in lrs.items() if n.startswith(k))
        full = q.detach() - before[n]
        assert full.abs().max() > 0, n
        if lr == 0:
            assert torch.equal(p, before[n]), n
        torch.testing.assert_close(p.detach() - before[n], lr * full, rtol=1e-5, atol=1e-15)


@pytest.mark.parametrize("cls", LOS)
def test_add_param_group_mid_run(cls):
    """Progressive unfreezing: the new group's tensors start stepping once added (their own
    counter from 0, like AdamW); adding them leaves the old state bitwise intact."""
    model, twin = mlp(), mlp()
    for m in (model, twin):
        m.readout.requires_grad_(False)
    opt, adamw = lo(cls, model), torch.optim.AdamW(p for p in twin.parameters() if p.requires_grad)
    for step in range(2):
        train_step(model, opt, batch(seed=step))
        train_step(twin, adamw, batch(seed=step))
    old = state_copy(opt)
    readout_before = snapshot(model.readout)
    for m, o in ((model, opt), (twin, adamw)):
        m.readout.requires_grad_(True)
        o.add_param_group({"params": list(m.readout.parameters()), "lr": 0.5})
    assert states_equal({p: opt.state[p] for p in old}, old)
    assert opt.state[model.readout.weight]["scale"] == 1.0  # from the module: the readout
    hidden_before = model.hidden1.weight.detach().clone()
    for step in range(2, 4):
        train_step(model, opt, batch(seed=step))
        train_step(twin, adamw, batch(seed=step))
    for n, p in model.readout.named_parameters():
        assert not torch.equal(p, readout_before[n]), n
    assert not torch.equal(hidden_before, model.hidden1.weight)
    pairs = list(zip(model.parameters(), twin.parameters(), strict=True))
    for p, q in pairs:
        assert counter(opt, p) == counter(adamw, q)
    assert counter(opt, model.readout.weight) == 2 and counter(opt, model.input.weight) == 4


# --- 5. LR schedulers -----------------------------------------------------------------------


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(
        o, lambda e: [1, 0.5, 0.25, 0][min(e, 3)]
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("cls", LOS)
def test_lr_scheduler_changes_lr_and_the_step(cls, name):
    """The scheduler writes ``param_groups[i]["lr"]`` exactly as it does for AdamW, and each step
    is that lr times the step of an lr = 1 copy in the same state (lr 0: no change, wd = 0)."""
    model = mlp(dtype=torch.float64)
    opt = lo(cls, model)
    adamw = torch.optim.AdamW(mlp().parameters(), lr=1.0)
    sched, sched_adamw = SCHEDULERS[name](opt), SCHEDULERS[name](adamw)
    data = batch(dtype=torch.float64)
    lrs = []
    for _ in range(4):
        lr = opt.param_groups[0]["lr"]
        assert lr == adamw.param_groups[0]["lr"]
        lrs.append(lr)
        # (not deepcopy: with a scheduler attached, a copy's step() steps the original, see
        # test_copy_of_an_lo_with_a_scheduler_attached below)
        ref_model = copy.deepcopy(model)
        ref = lo(cls, ref_model)
        ref.load_state_dict(opt.state_dict())
        ref.param_groups[0]["lr"] = 1.0
        before = snapshot(model)
        train_step(model, opt, data)
        train_step(ref_model, ref, data)
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
            full = q.detach() - before[n]
            assert full.abs().max() > 0, n
            if lr == 0:
                assert torch.equal(p, before[n]), n
            torch.testing.assert_close(p.detach() - before[n], lr * full, rtol=1e-5, atol=1e-15)
        adamw.step()  # no grads: only the lr schedule is compared
        sched.step()
        sched_adamw.step()
    assert len(set(lrs)) > 1 and lrs[0] == 1.0


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("transport", [copy.deepcopy, _pickled], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("cls", LOS)
def test_copy_of_an_lo_with_a_scheduler_attached_steps_itself(cls, transport):
    for make in (lambda m: torch.optim.AdamW(m.parameters()), lambda m: lo(cls, m)):
        model = mlp()
        opt = make(model)
        torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        train_step(model, opt, batch())
        model2, opt2 = transport((model, opt))
        before, before2 = snapshot(model), snapshot(model2)
        train_step(model2, opt2, batch(seed=1))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        assert all(not torch.equal(p, before2[n]) for n, p in model2.named_parameters())


@pytest.mark.parametrize("cls", LOS)
def test_one_cycle_lr_without_momentum_cycling(cls):
    """``cycle_momentum=False``: the lr follows the same one-cycle curve as for AdamW."""
    model = mlp()
    opt, adamw = lo(cls, model), torch.optim.AdamW(mlp().parameters())
    scheds = [
        torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=6, cycle_momentum=False)
        for o in (opt, adamw)
    ]
    lrs = []
    for step in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        assert lrs[-1] == adamw.param_groups[0]["lr"]
        before = snapshot(model)
        train_step(model, opt, batch(seed=step))
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
        adamw.step()
        for sched in scheds:
            sched.step()
    assert 0.9 < max(lrs) <= 1.0 and min(lrs) < 0.1


@pytest.mark.parametrize("cls", LOS)
def test_one_cycle_lr_with_momentum_cycling_is_a_clear_error(cls):
    """OneCycleLR cycles momentum by default (``cycle_momentum=True``), which needs a
    ``momentum`` or ``betas`` entry in every param group. A learned optimizer has neither (its
    momentum decays are meta-learned, not hyperparameters), so torch's own one-line ValueError
    is the answer, at construction, before any step; AdamW (betas) accepts the same call.
    Use ``OneCycleLR(opt, ..., cycle_momentum=False)``."""
    torch.optim.lr_scheduler.OneCycleLR(torch.optim.AdamW(mlp().parameters()), 1.0, 6)
    opt = lo(cls, mlp())
    with pytest.raises(ValueError, match="momentum") as error:
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=6)
    assert "cycle_momentum" in one_line(error)
    assert all("momentum" not in g and "betas" not in g for g in opt.param_groups)


# --- 6. memory layouts ----------------------------------------------------------------------


def test_non_contiguous_and_channels_last_params_match_contiguous_copies():
    """A transposed matrix and a channels_last conv weight step like contiguous copies of
    themselves (they take the torch path, the copies the fused kernel: equal to 1e-6 relative)
    and keep their strides / memory format; so does AdamW."""
    torch.manual_seed(0)
    mat, conv = torch.randn(8, 6), torch.randn(4, 3, 3, 3)
    strided = [nn.Parameter(mat.clone().t()), nn.Parameter(conv.clone())]
    strided[1].data = strided[1].data.to(memory_format=torch.channels_last)
    plain = [nn.Parameter(mat.clone().t().contiguous()), nn.Parameter(conv.clone())]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    assert strided[1].is_contiguous(memory_format=torch.channels_last)
    strides = [p.stride() for p in strided]
    adamw_params = [nn.Parameter(p.detach().clone()) for p in strided]
    adamw_params[1].data = adamw_params[1].data.to(memory_format=torch.channels_last)
    opt, ref = lo(mulo.SPLO, strided), lo(mulo.SPLO, plain)
    adamw = torch.optim.AdamW(adamw_params)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    img = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    for _ in range(4):
        for params, o in ((strided, opt), (plain, ref), (adamw_params, adamw)):
            o.zero_grad()
            loss = (x @ params[0]).sin().sum() + F.conv2d(img, params[1]).square().mean()
            loss.backward()
        before = [p.detach().clone() for p in strided]
        opt.step()
        ref.step()
        adamw.step()
        for p, q, b in zip(strided, plain, before, strict=True):
            assert (p - b).abs().max() > 1e-4  # a real step
            assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-6
    assert [p.stride() for p in strided] == strides == [p.stride() for p in adamw_params]
    assert strided[1].is_contiguous(memory_format=torch.channels_last)


# --- 7. 0-dim and empty parameters ------------------------------------------------------------


class GainAndEmpty(nn.Module):
    """A 0-dim gain and a zero-output side layer (weight (0, 8), bias (0,)) beside a real MLP."""

    def __init__(self, empty_fan_in: bool = False):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.hid = nn.Linear(8, 8)
        with warnings.catch_warnings():  # "Initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore", UserWarning)
            self.side = nn.Linear(0, 8) if empty_fan_in else nn.Linear(8, 0)
        self.readout = nn.Linear(8, 3)
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        h = torch.relu(self.hid(torch.relu(self.inp(x))))
        side = self.side(h[:, :0]) if self.side.in_features == 0 else self.side(h)
        return self.readout(h + side.sum(1, keepdim=True)) * self.gain


def test_zero_dim_and_empty_params_splo():
    """Bare tensors: the 0-dim one moves, the empty ones stay empty; AdamW accepts all of them."""
    shapes = [(), (0,), (0, 4), (4, 0), (2, 0, 3, 3)]
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    adamw_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt, adamw = lo(mulo.SPLO, params), torch.optim.AdamW(adamw_params)
    for _ in range(3):
        for ps, o in ((params, opt), (adamw_params, adamw)):
            o.zero_grad()
            sum((p.sin() if p.dim() == 0 else p).sum() for p in ps).backward()
        before = params[0].detach().clone()
        opt.step()
        adamw.step()
        assert params[0].shape == () and not torch.equal(before, params[0])
    assert [tuple(p.shape) for p in params] == shapes
    assert counter(opt, params[0]) == 3


@pytest.mark.parametrize("cls", LOS)
def test_zero_dim_and_empty_params_in_a_module(cls):
    torch.manual_seed(0)
    model = GainAndEmpty()
    opt = lo(cls, model)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    before = snapshot(model)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert model.gain.shape == () and not torch.equal(before["gain"], model.gain)
    assert model.side.weight.shape == (0, 8) and model.side.bias.shape == (0,)
    assert counter(opt, model.gain) == 2


def test_mulo_accepts_an_empty_hidden_matrix_with_fan_in_zero():
    torch.manual_seed(0)
    model = GainAndEmpty(empty_fan_in=True)
    mulo.SPLO(model, meta_weights=meta())
    torch.optim.AdamW(model.parameters())
    opt = mulo.MuLO(model, meta_weights=meta())
    opt.zero_grad()
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    assert model.side.weight.shape == (8, 0)


# --- 8. gradient clipping -------------------------------------------------------------------


@pytest.mark.parametrize("cls", LOS)
def test_clip_grad_norm_before_step(cls):
    """``clip_grad_norm_`` rescales .grad in place; the step equals a step on grads scaled by
    hand with the same factor (max_norm / (norm + 1e-6), as torch computes it)."""
    a, b = mlp(), mlp()
    opt_a, opt_b = lo(cls, a), lo(cls, b)
    max_norm = 0.01
    for step in range(2):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            backward(m, batch(seed=step))
        total = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm)
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in b.parameters()])
        )
        assert torch.equal(norm, total) and total > max_norm  # clipping is active
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in b.parameters():
            p.grad.mul_(coef)
        opt_a.step()
        opt_b.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


# --- 9. GradScaler --------------------------------------------------------------------------


def _grad_scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0**10)
    except (AttributeError, RuntimeError, TypeError) as error:
        try:
            return torch.cpu.amp.GradScaler(init_scale=2.0**10)
        except (AttributeError, RuntimeError, TypeError):
            pytest.skip(f"GradScaler is not usable on CPU in torch {torch.__version__}: {error}")


@pytest.mark.parametrize("cls", LOS)
def test_grad_scaler_skips_inf_steps_and_unscales_normal_ones(cls):
    """``scaler.step(opt)`` unscales the grads (a power-of-2 scale: exactly) and steps, or, when
    a grad holds inf, skips ``opt.step()``: params and every LO state tensor, the step counter
    included, stay bitwise unchanged. AdamW under the same scaler skips the same step."""
    model, plain = mlp(), mlp()
    twin = mlp()
    opt, opt_plain = lo(cls, model), lo(cls, plain)
    adamw = torch.optim.AdamW(twin.parameters())
    scaler, scaler_adamw = _grad_scaler(), _grad_scaler()
    if not scaler.is_enabled():
        pytest.skip("GradScaler('cpu') is disabled in this torch build")
    for step in range(4):
        poisoned = step == 2
        for m, o, s in ((model, opt, scaler), (twin, adamw, scaler_adamw)):
            o.zero_grad()
            s.scale(F.cross_entropy(m(batch(seed=step)[0]), batch(seed=step)[1])).backward()
            if poisoned:
                m.hidden1.weight.grad[0, 0] = float("inf")
        before, state, adamw_count = (
            snapshot(model),
            state_copy(opt),
            counter(adamw, twin.readout.weight),
        )
        scaler.step(opt)
        scaler.update()
        scaler_adamw.step(adamw)
        scaler_adamw.update()
        if poisoned:
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
            assert states_equal(opt.state, state)
            assert counter(adamw, twin.readout.weight) == adamw_count
            assert scaler.get_scale() == 2.0**9
            continue
        opt_plain.zero_grad()
        backward(plain, batch(seed=step))
        opt_plain.step()
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
        pairs = zip(model.parameters(), plain.parameters(), strict=True)
        assert all(torch.equal(p, q) for p, q in pairs)
    assert counter(opt, model.readout.weight) == counter(adamw, twin.readout.weight) == 3


# --- 10. DistributedDataParallel --------------------------------------------------------------


DDP_DRIVER = """
import os, sys, torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
import mulo, parametrizations as P
from mulo import functional as LF

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
torch.manual_seed(0)
model = P.mlp(12, 16, 3, 5, parametrization="mup")
init = {n: p.detach().clone() for n, p in model.named_parameters()}
ddp = DistributedDataParallel(model)
meta = LF.init_meta_params(generator=torch.Generator().manual_seed(1))
opt = mulo.MuLO(model, meta_weights=meta)  # the module (roles), not the DDP wrapper
g = torch.Generator().manual_seed(100 + rank)  # different data per rank
losses = []
for _ in range(20):
    x, y = torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)
    opt.zero_grad()
    loss = F.cross_entropy(ddp(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
params = {n: p.detach().clone() for n, p in model.named_parameters()}
torch.save({"init": init, "params": params, "losses": losses}, sys.argv[1] + f".{rank}.pt")
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_two_gloo_ranks_stay_bitwise_equal(tmp_path):
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    for code, err in run_ranks(DDP_DRIVER, [out], env, cwd=REPO):
        assert code == 0, err[-3000:]
    r0, r1 = (torch.load(f"{out}.{r}.pt", weights_only=True) for r in range(2))
    assert r0["losses"] != r1["losses"]  # the ranks really saw different data
    for n, p in r0["params"].items():
        assert not torch.equal(p, r0["init"][n]), n  # trained
        assert torch.equal(p, r1["params"][n]), n  # and in sync, bit for bit


# --- 11. torch.compile --------------------------------------------------------------------------


def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile is missing"
    if not torch._dynamo.is_dynamo_supported():
        return f"dynamo is not supported on Python {sys.version.split()[0]}"
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler and none is on PATH"
    return None


@pytest.mark.slow
def test_torch_compile_model_trains_like_eager():
    """``MuLO`` is built from the original module (roles need it); ``torch.compile(model)``
    shares its parameters, so 3 compiled steps equal 3 eager steps to 1e-5."""
    reason = _compile_unavailable()
    if reason is not None:
        pytest.skip(reason)
    compiled_src, eager = mlp(), mlp()
    compiled = torch.compile(compiled_src)
    opt_c, opt_e = lo(mulo.MuLO, compiled_src), lo(mulo.MuLO, eager)
    held = [p for g in opt_c.param_groups for p in g["params"]]
    assert all(p is q for p, q in zip(held, compiled.parameters(), strict=True))
    before = snapshot(eager)
    try:
        for step in range(3):
            train_step(compiled, opt_c, batch(seed=step))
            train_step(eager, opt_e, batch(seed=step))
    finally:
        torch._dynamo.reset()
    for (n, p), q in zip(compiled_src.named_parameters(), eager.parameters(), strict=True):
        assert not torch.equal(q, before[n]), n
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


# --- 12. repr ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LOS)
def test_repr_names_the_class_and_groups(cls):
    model = mlp()
    opt = lo(cls, model, lr=0.5, weight_decay=0.01)
    text = repr(opt)
    assert text.startswith(f"{cls.__name__} (")
    assert "Parameter Group 0" in text and "lr: 0.5" in text and "weight_decay: 0.01" in text
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": 0.1})
    assert "Parameter Group 1" in repr(opt)
    assert repr(torch.optim.AdamW(model.parameters())).startswith("AdamW (")
