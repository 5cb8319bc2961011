"""VeLO (Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers by Scaling Up",
arXiv 2211.09760) as pure functions on population-stacked tensors, and its μP form (μVeLO).

Two networks. A per-tensor LSTM reads 28 summaries of each tensor (training progress t/T, the
training loss's trend, the spread of its momenta and second moment, its rank) and outputs, per
tensor, the mixing weights of a bank of K small per-parameter MLPs and a step multiplier.
The LSTM's input layer max-pools over every tensor of the model, so a step takes the whole
model at once (:func:`velo_step_`), unlike small_fc_lopt's per-tensor step. The mixed MLP
(30 -> 4 -> 4 -> 2) reads 30 per-element features (gradient, parameter, 3 momenta, the second
moment, Adafactor row/column statistics), each normalised by its RMS over the tensor, and
outputs a direction d and a magnitude a: ``p <- p - lr * s_W * step_mult * lr_mult * d *
exp(exp_mult * a)``.

μVeLO follows the μLO paper's VeLO configs: no parameter-scale multiplier (VeLO multiplies the
step by RMS(p), which would give a μP hidden matrix 1/fan_in^1.5 instead of μP's 1/fan_in), the
μP update scale s_W (1/fan_in for hidden matrices) and step_mult 0.01; SP-VeLO has s_W = 1 and
step_mult 0.001. Every particle (leading dim P) has its own meta-parameters and state.

Where we differ from the reference implementation (learned_optimization, hyper_v2.py), on
purpose: the second-moment spread feature is the variance of the RMS accumulator itself (the
reference subtracts the momenta's mean, broadcasting 1 channel to 3), so the LSTM reads 28
inputs, not 30; the third MLP output, unused there, is not built. Defaults are sized for CPU
meta-training (LSTM 32, bank of 16 MLPs) rather than VeLO's 512 / 256. docs/math.md §5 has the
formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mulo.functional import _at_least_1d, _reduced, _sanitize, factored_dims

LSTM_HIDDEN = 32
BANK = 16
MLP_HIDDEN = 4
NUM_TENSOR_FEATURES = 28
NUM_PARAM_FEATURES = 30
MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAY = 0.999
FACTORED_DECAYS = (0.9, 0.99, 0.999)
PROGRESS_POINTS = (0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1)
LOSS_EMAS = 10
MIX_MULT = 100.0  # the bank is mixed as MIX_MULT * mean_k(c_k * theta_k), as in VeLO
EXP_MULT = 0.001
STEP_MULT_MU = 0.01
STEP_MULT_SP = 0.001
GRAD_CLIP = 1000.0
MAX_RANK = 5  # rank one-hot width; rank >= 5 reads all zeros


def meta_shapes(hidden: int = LSTM_HIDDEN, bank: int = BANK) -> dict[str, tuple[int, ...]]:
    f, h, k, m = NUM_TENSOR_FEATURES, hidden, bank, MLP_HIDDEN
    return {
        "pool_w": (f, h), "pool_b": (h,),          # max-pooled over tensors
        "in_w": (f, h), "in_b": (h,),              # the per-tensor input
        "lstm_w": (2 * h, 4 * h), "lstm_b": (4 * h,),
        "h0": (h,), "c0": (h,),
        "mix_w": (h, k), "mix_b": (k,),            # controls: the bank's mixing weights
        "lr_w": (h,), "lr_b": (),                  # the per-tensor step multiplier
        "w0": (k, NUM_PARAM_FEATURES, m), "b0": (k, m),
        "w1": (k, m, m), "b1": (k, m),
        "w2": (k, m, 2), "b2": (k, 2),
    }  # fmt: skip


def is_velo(meta: dict[str, Tensor]) -> bool:
    return "lstm_w" in meta


def init_meta_params(
    population: int = 1, generator: torch.Generator | None = None, hidden: int = LSTM_HIDDEN,
    bank: int = BANK,
) -> dict[str, Tensor]:  # fmt: skip
    """Weights ~ N(0, 1/fan_in) (truncated at 2 std), biases and the LSTM's initial state 0."""
    meta = {}
    for name, shape in meta_shapes(hidden, bank).items():
        full = (population, *shape)
        if name.startswith(("w", "pool_w", "in_w", "lstm_w", "mix_w")) or name == "lr_w":
            fan_in = shape[-2] if len(shape) >= 2 else shape[0]
            w = torch.empty(full)
            torch.nn.init.trunc_normal_(w, std=1.0, a=-2.0, b=2.0, generator=generator)
            meta[name] = w / math.sqrt(fan_in)
        else:
            meta[name] = torch.zeros(full)
    return meta


@dataclass
class TensorState:
    """One tensor's VeLO state, population-first: momenta [P, 3, *S], second moment
    [P, 1, *S], Adafactor ``row`` / ``col`` [P, 3, *reduced] (rank >= 2) or ``diag``
    [P, 3, *S], the LSTM's ``h`` / ``c`` [P, H], the step counter and run length T [P]."""

    m: Tensor
    rms: Tensor
    h: Tensor
    c: Tensor
    t: Tensor
    horizon: Tensor
    row: Tensor | None = None
    col: Tensor | None = None
    diag: Tensor | None = None

    def to_dict(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> TensorState:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass
class LossState:
    """The training loss's EMAs at 10 half-lives (log-spaced from 10 steps to T), their running
    minimum and the count of losses seen, per particle: [P, 10], [P, 10], [P]."""

    means: Tensor
    mins: Tensor
    count: Tensor

    def to_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> LossState:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def init_tensor_state(
    param: Tensor, horizon: float | Tensor, meta: dict[str, Tensor]
) -> TensorState:
    p = _at_least_1d(param)
    pop, shape = p.shape[0], tuple(p.shape[1:])
    z = dict(dtype=torch.float64 if p.dtype == torch.float64 else torch.float32, device=p.device)
    state = TensorState(
        m=torch.zeros(pop, 3, *shape, **z), rms=torch.zeros(pop, 1, *shape, **z),
        h=meta["h0"].to(**z).expand(pop, -1).clone(), c=meta["c0"].to(**z).expand(pop, -1).clone(),
        t=torch.zeros(pop, dtype=torch.float32, device=p.device),
        horizon=torch.as_tensor(horizon, dtype=torch.float32).to(p.device).expand(pop).clone(),
    )  # fmt: skip
    dims = factored_dims(shape)
    if dims is None:
        state.diag = torch.zeros(pop, 3, *shape, **z)
    else:
        state.row = torch.zeros(pop, 3, *_reduced(shape, dims[0]), **z)
        state.col = torch.zeros(pop, 3, *_reduced(shape, dims[1]), **z)
    return state


def init_loss_state(population: int, device=None) -> LossState:
    z = dict(dtype=torch.float64, device=device)
    return LossState(
        means=torch.zeros(population, LOSS_EMAS, **z),
        mins=torch.full((population, LOSS_EMAS), 1e12, **z),
        count=torch.zeros(population, **z),
    )


def _loss_decays(horizon: Tensor) -> Tensor:
    """[P, 10]: exp(-1 / half-life), half-lives log-spaced from 10 to T steps."""
    top = torch.log10(horizon.double().clamp(min=1.0))
    frac = torch.linspace(0, 1, LOSS_EMAS, dtype=torch.float64, device=horizon.device)
    halflife = 10 ** (1 + (top[:, None] - 1) * frac)
    return torch.exp(-1 / halflife)


def update_loss_(state: LossState, loss: Tensor, horizon: Tensor) -> None:
    """One training loss [P] into the EMAs. A loss above twice the largest bias-corrected EMA
    is capped there (one spike must not dominate); a non-finite one counts as that cap."""
    d = _loss_decays(horizon)
    loss = loss.double().to(state.means.device)
    k = state.count[:, None]
    corrected = state.means / (1 - d ** (k + 1))
    cap = torch.where(state.count > 0, corrected.amax(1).abs() * 2, loss.abs())
    loss = torch.where(torch.isfinite(loss), torch.minimum(loss, cap), cap)
    state.means.mul_(d).add_((1 - d) * loss[:, None])
    state.mins.copy_(torch.minimum(state.mins, state.means / (1 - d ** (k + 1))))
    state.count += 1


def loss_features(state: LossState, horizon: Tensor) -> Tensor:
    """[P, 9] in [-1, 1]: each EMA's distance above the running minimum relative to the next
    slower EMA's (0 before the first loss)."""
    d = _loss_decays(horizon)
    k = state.count[:, None].clamp(min=1)
    cm = state.means / (1 - d**k)
    rel = (cm[:, :-1] - state.mins[:, :-1]) / (cm[:, 1:] - state.mins[:, :-1]).clamp(min=1e-8)
    feats = (rel - 1).clamp(-1, 1)
    return torch.where(state.count[:, None] > 0, feats, torch.zeros_like(feats))


def _cla(x: Tensor) -> Tensor:
    return 0.5 * torch.log(1e-8 + (10 * x).abs()).clamp(-5, 5)


def _over_tensor(x: Tensor, lead: int) -> Tensor:
    """Mean over every dim after the first ``lead`` ones."""
    return x.flatten(lead).mean(lead)


def _mean_keep(x: Tensor, lead: int) -> Tensor:
    return x.mean(dim=tuple(range(lead, x.dim())), keepdim=True)


def tensor_features(p: Tensor, state: TensorState, loss_feats: Tensor) -> Tensor:
    """[P, 28] for one tensor [P, *S], from the weights before this step and the momenta and
    second moment after the previous one: training progress (9), loss trend (9), the second
    moment's mean (1), the rank one-hot (5), the momenta's spread (3), the second moment's (1)."""
    pop = p.shape[0]
    s = torch.rsqrt(_over_tensor(p * p, 1).clamp(min=1e-9)).to(state.m.dtype)
    bc = s.reshape(pop, 1, *[1] * (p.dim() - 1))
    m, rms = state.m * bc, state.rms * bc
    frac = (state.t.double() / state.horizon.double().clamp(min=1)).to(p.dtype)
    points = torch.tensor(PROGRESS_POINTS, dtype=p.dtype, device=p.device)
    progress = torch.tanh(10 * (frac[:, None] - points))
    rank = sum(1 for n in p.shape[1:] if n > 1)
    one_hot = torch.zeros(pop, MAX_RANK, dtype=p.dtype, device=p.device)
    if rank < MAX_RANK:
        one_hot[:, rank] = 1
    var_m = _over_tensor((m - _mean_keep(m, 2)) ** 2, 2)
    var_rms = _over_tensor((rms - _mean_keep(rms, 2)) ** 2, 2)
    mean_rms = _over_tensor(rms, 2)
    parts = [progress, loss_feats.to(p.dtype), _cla(mean_rms).to(p.dtype), one_hot,
             _cla(var_m).to(p.dtype), _cla(var_rms).to(p.dtype)]  # fmt: skip
    return torch.cat(parts, dim=1)


def tensor_network(meta: dict[str, Tensor], x: Tensor, h: Tensor, c: Tensor):
    """The LSTM over tensors: x [P, N, 28], state h, c [P, N, H] -> (mixing weights [P, N, K],
    step multipliers [P, N], new h, new c). The pooled term (max over the N tensors) is how each
    tensor sees the rest of the model."""
    pooled = torch.relu(x @ meta["pool_w"] + meta["pool_b"][:, None]).amax(1, keepdim=True)
    inp = x @ meta["in_w"] + meta["in_b"][:, None] + pooled
    gates = torch.cat([inp, h], dim=2) @ meta["lstm_w"] + meta["lstm_b"][:, None]
    i, g, f, o = gates.chunk(4, dim=2)
    c = torch.sigmoid(f + 1) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    mix = h @ meta["mix_w"] + meta["mix_b"][:, None]
    lr_mult = (h * meta["lr_w"][:, None]).sum(2) + meta["lr_b"][:, None]
    return mix, lr_mult, h, c


def _update_accumulators_(state: TensorState, g: Tensor) -> Tensor:
    """m, rms and the Adafactor statistics after gradient g [P, *S]; returns the factored
    (Adafactor-normalised) gradient [P, 3, *S]."""
    nd = g.dim() - 1
    tail = [1] * nd
    beta_m = torch.tensor(MOMENTUM_DECAYS, dtype=g.dtype, device=g.device).reshape(1, 3, *tail)
    beta_f = torch.tensor(FACTORED_DECAYS, dtype=g.dtype, device=g.device).reshape(1, 3, *tail)
    state.m.lerp_(g.unsqueeze(1).expand_as(state.m), 1 - beta_m)
    g2 = (g * g).unsqueeze(1)
    state.rms.lerp_(g2, 1 - RMS_DECAY)
    dims = factored_dims(tuple(g.shape[1:]))
    if dims is None:
        state.diag.lerp_((g2 + 1e-30).expand_as(state.diag), 1 - beta_f)
        return g.unsqueeze(1) * torch.rsqrt((state.diag + 1e-9).clamp(min=1e-9))
    d0, d1 = dims
    state.row.lerp_((g2 + 1e-30).mean(2 + d0, keepdim=True).expand_as(state.row), 1 - beta_f)
    state.col.lerp_((g2 + 1e-30).mean(2 + d1, keepdim=True).expand_as(state.col), 1 - beta_f)
    row_norm = state.row / state.row.mean(2 + d1, keepdim=True)
    return (g.unsqueeze(1) * torch.rsqrt((row_norm + 1e-9).clamp(min=1e-9))
            * torch.rsqrt(state.col.clamp(min=1e-9)))  # fmt: skip


def param_features(p: Tensor, g: Tensor, state: TensorState, fac_g: Tensor) -> Tensor:
    """[P, 30, *S]: the per-element inputs, each channel divided by its RMS over the tensor."""
    m, rms = state.m, state.rms
    r = torch.rsqrt(rms + 1e-6)
    gu = g.unsqueeze(1)
    if state.diag is None:
        d0, d1 = factored_dims(tuple(p.shape[1:]))
        row = state.row.expand_as(m)
        col = state.col.expand_as(m)
        row_norm = state.row / (state.row.mean(2 + d1, keepdim=True) + 1e-9)
        both = m * torch.rsqrt(row_norm.clamp(min=1e-9)) * torch.rsqrt(state.col.clamp(min=1e-9))
        tail = [row, col, torch.rsqrt(row + 1e-8), torch.rsqrt(col + 1e-8), both]
    else:
        v = state.diag
        tail = [v, v, torch.rsqrt(v + 1e-8), torch.rsqrt(v + 1e-8), m * torch.rsqrt(v)]
    parts = [gu, gu.clamp(-0.1, 0.1), p.unsqueeze(1).to(m.dtype), m, rms, m * r, r, fac_g, gu * r,
             *tail]  # fmt: skip
    x = torch.cat(parts, dim=1)
    mean_sq = x.flatten(2).square().mean(2)
    return x * torch.rsqrt(1e-5 + mean_sq).reshape(*mean_sq.shape, *[1] * (p.dim() - 1))


def param_network(meta: dict[str, Tensor], mix: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The bank mixed by ``mix`` [P, K] (one tensor's controls) applied to x [P, 30, *S]:
    (d, a), each [P, *S]."""
    k = mix.shape[1]

    def mixed(name: str) -> Tensor:
        return MIX_MULT / k * torch.einsum("pk,pk...->p...", mix, meta[name])

    pop, shape = x.shape[0], x.shape[2:]
    h = x.flatten(2).transpose(1, 2)  # [P, n, 30]
    h = torch.relu(h @ mixed("w0") + mixed("b0")[:, None])
    h = torch.relu(h @ mixed("w1") + mixed("b1")[:, None])
    out = h @ mixed("w2") + mixed("b2")[:, None]  # [P, n, 2]
    return out[..., 0].reshape(pop, *shape), out[..., 1].reshape(pop, *shape)


def velo_step_(
    meta: dict[str, Tensor],
    states: list[TensorState],
    loss_state: LossState,
    params: list[Tensor],
    grads: list[Tensor],
    loss: Tensor,
    scales: list[float],
    step_mult: float,
    lrs: list[float] | float = 1.0,
    weight_decays: list[float] | float = 0.0,
) -> None:
    """One VeLO step of a whole model, in place: every tensor [P, *S_i] with its state, s_W, lr
    and weight decay (a number: the same for all), and the model's training loss [P] at this
    step. The order: the loss into its EMAs; the LSTM over the tensors (weights before the
    step, moments after the previous one); the moments; the mixed MLP per element;
    ``p <- p * (1 - lr * wd) - lr * s_W * step_mult * lr_mult * d * exp(0.001 a)``. A
    non-finite step entry is dropped, so it never reaches a parameter."""
    if not params:
        return
    horizon = states[0].horizon
    update_loss_(loss_state, loss, horizon)
    lf = loss_features(loss_state, horizon)
    ps = [_at_least_1d(p) for p in params]
    gs = [_at_least_1d(_sanitize(g)).clamp(-GRAD_CLIP, GRAD_CLIP) for g in grads]
    work = states[0].m.dtype
    x = torch.stack(
        [tensor_features(p.to(work), s, lf) for p, s in zip(ps, states, strict=True)], 1
    )
    h = torch.stack([s.h for s in states], 1)
    c = torch.stack([s.c for s in states], 1)
    meta = {k: v.to(work) for k, v in meta.items()}
    mix, lr_mult, h, c = tensor_network(meta, x.to(work), h, c)
    n = len(ps)
    lrs = [lrs] * n if isinstance(lrs, (int, float)) else lrs
    wds = [weight_decays] * n if isinstance(weight_decays, (int, float)) else weight_decays
    for i, (p, g, state, scale) in enumerate(zip(ps, gs, states, scales, strict=True)):
        lr, weight_decay = lrs[i], wds[i]
        state.h.copy_(h[:, i])
        state.c.copy_(c[:, i])
        g = g.to(work)
        fac_g = _update_accumulators_(state, g)
        d, a = param_network(meta, mix[:, i], param_features(p.to(work), g, state, fac_g))
        factor = (lr_mult[:, i] * (scale * step_mult * lr)).reshape(-1, *[1] * (p.dim() - 1))
        step = (factor * d * torch.exp(EXP_MULT * a)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        p.sub_(step.to(p.dtype))
        state.t += 1
