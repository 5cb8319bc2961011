"""Low-precision models: the LO's state, decays, features and network run in float32 whatever
the parameter dtype, and the result is rounded back to bf16 / fp16 stochastically, so a bf16
model trains like its float32 twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mulo
import parametrizations as P
from mulo import functional as LF

LOW = [torch.bfloat16, torch.float16]


def teacher_task(seed: int = 0, n: int = 4096, features: int = 32):
    """A synthetic 10-class problem with 30% label noise and too many examples to memorise in
    300 steps: float32 ends near 1.28, far from 0, so a 1.5x bound means something (before
    the fix bf16 ended at 2.300 and fp16 at 2.303, from 2.303)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, 10, generator=g)).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.3
    y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=g)
    return x, y


def train(dtype, steps: int = 300, width: int = 256, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = P.mlp(32, width, 3, 10, parametrization="mup").to(dtype)
    opt = mulo.MuLO(model)
    x, y = teacher_task()
    x = x.to(dtype)
    first = None
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]).float(), y[idx])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x).float(), y).item()
    return first, final


@pytest.fixture(scope="module")
def float32_run():
    return train(torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_model_trains_like_float32(dtype, float32_run):
    """The case that failed: in bf16 `1 - beta` rounded to 0 for three decays and the state
    lived in bf16; the model barely trained (2.31 -> 2.12 while float32 reached 0.20)."""
    _, final32 = float32_run
    first, final = train(dtype)
    assert final32 < 0.6 * first  # the float32 run really learns (2.30 -> 1.28)
    assert final < 1.5 * final32, (final, final32)


@pytest.mark.parametrize("dtype", [*LOW, torch.float64], ids=str)
def test_state_is_float32_for_low_precision_and_float64_for_float64(dtype):
    model = P.mlp(8, 16, 2, 3).to(dtype)
    opt = mulo.MuLO(model)
    model(torch.randn(4, 8, dtype=dtype)).sum().backward()
    opt.step()
    want = LF.compute_dtype(dtype)
    for p in model.parameters():
        assert p.dtype == dtype
        state = opt.state[p]
        assert all(state[k].dtype == want for k in ("mv", "row", "col", "diag") if k in state)
    # torch.optim's load casts state to the param's dtype; the LO keeps its own
    again = mulo.MuLO(model)
    again.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert torch.equal(again.state[p]["mv"], opt.state[p]["mv"])
        assert again.state[p]["mv"].dtype == want


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_step_is_the_float32_step_rounded(dtype):
    """From the same values, the bf16 step keeps the float32 step's state bit for bit and
    lands on one of the two low-precision neighbours of its float32 result."""
    meta = LF.init_meta_params(generator=torch.Generator().manual_seed(1))
    meta = {k: v.unsqueeze(0) for k, v in meta.items()}
    torch.manual_seed(0)
    low = torch.randn(1, 48, 40).to(dtype)
    wide = low.float()
    grad = torch.randn(1, 48, 40).to(dtype)
    s_low, s_wide = LF.init_state(low), LF.init_state(wide)
    LF.lo_step_(meta, s_low, low, grad, scale=1.0, step_mult=0.01, rounding_seed=7)
    LF.lo_step_(meta, s_wide, wide, grad.float(), scale=1.0, step_mult=0.01)
    assert s_low.mv.dtype == torch.float32 and torch.equal(s_low.mv, s_wide.mv)
    nearest = wide.to(dtype)
    other = torch.nextafter(nearest, torch.where(wide > nearest.float(), 1e9, -1e9).to(dtype))
    assert ((low == nearest) | (low == other)).all()
    assert (low != nearest).any() and (low == nearest).any()  # really stochastic


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
    src = torch.full((200_000,), 1.0) + torch.linspace(0, 1, 200_000) * 3e-3
    dst = torch.empty(200_000, dtype=dtype)
    LF.stochastic_round_(dst, src, torch.Generator().manual_seed(0))
    down = src.to(dtype)
    up = torch.nextafter(
        down, torch.where(src > down.float(), float("inf"), -float("inf")).to(dtype)
    )
    assert ((dst == down) | (dst == up)).all()
    assert abs(dst.float().mean().item() - src.mean().item()) < 1e-5


def test_small_steps_accumulate_in_bfloat16():
    """1000 steps of 1e-4 on a bf16 1.0: round-to-nearest never moves (ulp 7.8e-3), stochastic
    rounding gets to ~1.1, as float32 does."""
    p = torch.ones(4096, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for _ in range(1000):
        LF.stochastic_round_(p, p.float() + 1e-4, g)
    assert abs(p.float().mean().item() - 1.1) < 0.01
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(10):
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
    assert (nearest == 1).all()


def test_low_precision_resume_is_bitwise_identical():
    torch.manual_seed(0)
    model = P.mlp(8, 16, 2, 3).to(torch.bfloat16)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    opt = mulo.MuLO(model)

    def step(m, o):
        o.zero_grad()
        m(x).float().square().mean().backward()
        o.step()

    step(model, opt)
    import copy

    twin = copy.deepcopy(model)
    twin_opt = mulo.MuLO(twin)
    twin_opt.load_state_dict(opt.state_dict())
    for _ in range(3):
        step(model, opt)
        step(twin, twin_opt)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )
