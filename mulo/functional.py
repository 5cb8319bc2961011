"""small_fc_lopt as math on population-stacked tensors (SPEC §1).

This is the only place the learned-optimizer update lives. Every tensor carries a leading
population dimension P (P = 1 inside the drop-in optimizer, P = number of ES particles in
meta-training), so one call steps the same parameter of many particles at once.

Like ``torch.optim``'s functional forms, ``lo_step_`` updates parameters and state in place:
that is what keeps memory bounded. The step works in chunks of about ``chunk_size`` elements
and never builds the elements x 39 feature matrix. Three exact rewrites make it cheap:

* the 28 normalised channels are divided by per-tensor constants, so the normalisation is
  folded into the columns of the first layer (statistics come from a first pass);
* the 11 time features are the same for every element, so they fold into the first bias;
* for rank >= 2 the row / column statistics (12 channels) are constant along one dim, so their
  first-layer contribution is computed once per row / column and broadcast-added.

What remains per element is a 16-channel (rank >= 2) or 28-channel (rank < 2) input to
Linear(->32) -> ReLU -> Linear(32->32) -> ReLU -> Linear(32->2), done as batched matmuls.
``features`` builds the literal 39 features (for tests and inspection) from the same pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mulo import kernel

HIDDEN = 32
NUM_FEATURES = 39
NUM_NORMALISED = 28
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
# theta order: three momentum decays, one second-moment decay, three factored decays
DECAY_INIT = (0.9, 0.99, 0.999, 0.999, 0.9, 0.99, 0.999)
EXP_MULT = 0.001
STEP_MULT_MU = 0.01
STEP_MULT_SP = 0.001
DEFAULT_CHUNK_SIZE = 1 << 16  # ~5 MB of buffers: L3-resident; ATen splits ops this size
USE_KERNEL = True  # the fused C kernel for one float32 particle on CPU (mulo/kernel.py)
META_SHAPES = {
    "w1": (HIDDEN, NUM_FEATURES),
    "b1": (HIDDEN,),
    "w2": (HIDDEN, HIDDEN),
    "b2": (HIDDEN,),
    "w3": (2, HIDDEN),
    "b3": (2,),
    "theta": (len(DECAY_INIT),),
}

# Where each per-element channel of the chunk buffer sits among the 28 normalised features.
MATRIX_ELEMENT_CHANNELS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 25, 26, 27)
MATRIX_ROW_CHANNELS = (13, 14, 15, 19, 20, 21)  # row_j, rsqrt(row_j + 1e-8)
MATRIX_COL_CHANNELS = (16, 17, 18, 22, 23, 24)  # col_j, rsqrt(col_j + 1e-8)
VECTOR_ELEMENT_CHANNELS = tuple(range(NUM_NORMALISED))


def init_meta_params(
    population: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The meta-initialisation: truncated-normal weights (std 1/sqrt(fan_in), cut at 2 std),
    zero biases, theta = 0 (the initial decays). With ``population`` each particle gets its
    own draw and a leading dimension."""
    lead = () if population is None else (population,)
    meta = {}
    for name, shape in META_SHAPES.items():
        t = torch.zeros(*lead, *shape, dtype=dtype)
        if name.startswith("w"):
            std = 1.0 / math.sqrt(shape[-1])
            torch.nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=generator)
        meta[name] = t
    return meta


def num_meta_params() -> int:
    return sum(math.prod(s) for s in META_SHAPES.values())


def decays(theta: Tensor) -> Tensor:
    """beta = 1 - (1 - beta0) * exp(10 theta), elementwise over the last dim of ``theta``."""
    beta0 = torch.tensor(DECAY_INIT, dtype=theta.dtype, device=theta.device)
    return 1 - (1 - beta0) * torch.exp(10 * theta)


def time_features(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """tanh(t / tau - 1) for each tau: [P] -> [P, 11] (computed in float32 or better)."""
    t = t.double() if t.dtype == torch.float64 else t.float()
    taus = torch.tensor(TIME_SCALES, dtype=t.dtype, device=t.device)
    return torch.tanh(t[:, None] / taus - 1).to(dtype or t.dtype)


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(d0, d1): the largest and second-largest dims (stable order), None below rank 2."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: shape[i])
    return order[-1], order[-2]


@dataclass
class LOState:
    """Per-tensor optimizer state, population-first.

    ``mv`` stacks the three momenta and the second moment as [P, 4, *S] so one copy moves all
    four into the feature buffer. Rank >= 2 tensors keep ``row`` / ``col`` (keepdim shapes),
    rank < 2 tensors keep ``diag``. ``t`` is the per-particle step counter.
    """

    mv: Tensor
    t: Tensor
    row: Tensor | None = None
    col: Tensor | None = None
    diag: Tensor | None = None

    @property
    def m(self) -> Tensor:
        return self.mv[:, :3]

    @property
    def v(self) -> Tensor:
        return self.mv[:, 3]

    def clone(self) -> LOState:
        return LOState(
            **{f.name: _maybe(getattr(self, f.name), Tensor.clone) for f in fields(self)}
        )

    def to_dict(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, d: dict[str, Tensor]) -> LOState:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


def _maybe(x, fn):
    return None if x is None else fn(x)


def _at_least_1d(x: Tensor) -> Tensor:
    """Population-stacked scalars [P] are treated as shape [P, 1]."""
    return x.unsqueeze(1) if x.dim() == 1 else x


def init_state(param: Tensor) -> LOState:
    """Zero accumulators for a population-stacked parameter [P, *S]."""
    p = _at_least_1d(param)
    pop, shape = p.shape[0], tuple(p.shape[1:])
    z = dict(dtype=p.dtype, device=p.device)
    # the step counter stays float32 whatever the param dtype: bf16 stops counting at 256
    t = torch.zeros(pop, dtype=torch.float32, device=p.device)
    state = LOState(mv=torch.zeros(pop, 4, *shape, **z), t=t)
    dims = factored_dims(shape)
    if dims is None:
        state.diag = torch.zeros(pop, 3, *shape, **z)
    else:
        d0, d1 = dims
        state.row = torch.zeros(pop, 3, *_reduced(shape, d0), **z)
        state.col = torch.zeros(pop, 3, *_reduced(shape, d1), **z)
    return state


def _reduced(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return tuple(1 if i == dim else s for i, s in enumerate(shape))


def _rsqrt_clamped(x: Tensor) -> Tensor:
    return torch.rsqrt(torch.clamp(x, min=1e-9))


def _rms_inverse(sum_sq: Tensor, count: int) -> Tensor:
    return torch.rsqrt(1e-5 + sum_sq / count)


def _sanitize(grad: Tensor) -> Tensor:
    # One reduction decides; the copy happens only when something is non-finite.
    # Non-finite entries become 0 (not nan_to_num's +-3.4e38, whose square overflows v).
    if bool(torch.isfinite(grad.sum())):
        return grad
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def _bcast(w: Tensor, ndim: int) -> Tensor:
    """[P, k] -> [P, k, 1, ..., 1] with ``ndim`` trailing singleton dims."""
    return w.reshape(*w.shape, *([1] * ndim))


class _Plan:
    """Everything one step of one tensor needs that does not change between chunks."""

    def __init__(self, meta: dict[str, Tensor], state: LOState, p: Tensor, g: Tensor, chunk: int):
        self.shape = tuple(p.shape[1:])
        self.pop = p.shape[0]
        self.numel = math.prod(self.shape)
        nd = len(self.shape)
        one_minus_beta = 1 - decays(meta["theta"])  # [P, 7]
        self.w_m = _bcast(one_minus_beta[:, 0:3], nd)
        self.w_v = _bcast(one_minus_beta[:, 3], nd)
        self.w_f = _bcast(one_minus_beta[:, 4:7], nd)
        self.dims = factored_dims(self.shape)
        self.channels = VECTOR_ELEMENT_CHANNELS if self.dims is None else MATRIX_ELEMENT_CHANNELS
        self.chunk_dim, self.chunks = _chunk_plan(self.shape, chunk)
        if self.dims is not None:
            self.rf, self.cf = self._update_factored_(state, g)

    def _update_factored_(self, state: LOState, g: Tensor) -> tuple[Tensor, Tensor]:
        """Adafactor row/col accumulators (no element-sized temporaries) and their factors."""
        d0, d1 = self.dims
        for acc, dim in ((state.row, d0), (state.col, d1)):
            n = self.shape[dim]
            stat = torch.linalg.vector_norm(g, dim=1 + dim, keepdim=True).square_().div_(n)
            acc.lerp_(stat.add_(1e-30).unsqueeze(1), self.w_f)
        row_mean = state.row.mean(dim=2 + d1, keepdim=True)
        return _rsqrt_clamped(state.row / row_mean), _rsqrt_clamped(state.col)

    def slices(self, start: int, length: int):
        return _Slicer(self.chunk_dim, start, length)


@dataclass
class _Slicer:
    dim: int
    start: int
    length: int

    def __call__(self, x: Tensor, lead: int) -> Tensor:
        """Narrow ``x`` (with ``lead`` leading dims before the tensor's own) along the chunk dim,
        unless it is broadcast along it."""
        d = lead + self.dim
        return x if x.shape[d] == 1 else x.narrow(d, self.start, self.length)


def _chunk_plan(shape: tuple[int, ...], chunk: int) -> tuple[int, list[tuple[int, int]]]:
    """Split along dim 0, or along the largest dim if a slice of dim 0 would exceed ``chunk``."""
    numel = math.prod(shape)
    dim = 0 if numel // shape[0] <= chunk else max(range(len(shape)), key=lambda i: shape[i])
    per = max(1, chunk // (numel // shape[dim]))
    return dim, [(s, min(per, shape[dim] - s)) for s in range(0, shape[dim], per)]


def _update_elementwise_(plan: _Plan, mv: Tensor, diag: Tensor | None, g: Tensor) -> None:
    mv[:, :3].lerp_(g.unsqueeze(1), plan.w_m)
    g2 = g * g
    mv[:, 3].lerp_(g2, plan.w_v)
    if diag is not None:
        diag.lerp_(g2.add_(1e-30).unsqueeze(1), plan.w_f)


def _element_channels_(out: Tensor, g: Tensor, p: Tensor, mv: Tensor, factors) -> None:
    """Write the per-element channels of one chunk into ``out`` [P, K, *C] (un-normalised).

    ``factors`` is (row factor, col factor) for rank >= 2 (K = 16, order
    MATRIX_ELEMENT_CHANNELS) or the diag accumulator for rank < 2 (K = 28, SPEC order).
    """
    m = mv[:, :3]
    out[:, 0].copy_(g)
    out[:, 1].copy_(p)
    out[:, 2:6].copy_(mv)
    rsv = out[:, 9]
    torch.add(mv[:, 3], 1e-6, out=rsv).rsqrt_()
    torch.mul(m, rsv.unsqueeze(1), out=out[:, 6:9])
    if isinstance(factors, tuple):
        rf, cf = factors
        both = out[:, 13:16]
        torch.mul(rf, cf, out=both)
        torch.mul(both, g.unsqueeze(1), out=out[:, 10:13])
        both.mul_(m)
    else:
        diag = factors
        torch.add(diag, 1e-9, out=out[:, 10:13]).rsqrt_().mul_(g.unsqueeze(1))
        out[:, 13:16].copy_(diag)
        out[:, 16:19].copy_(diag)
        torch.add(diag, 1e-8, out=out[:, 19:22]).rsqrt_()
        out[:, 22:25].copy_(out[:, 19:22])
        torch.add(diag, 1e-6, out=out[:, 25:28]).rsqrt_().mul_(m)


def _broadcast_channels(acc: Tensor) -> Tensor:
    """Row or col channels [P, 6, *S_reduced]: the accumulator and rsqrt(acc + 1e-8)."""
    return torch.cat([acc, torch.rsqrt(acc + 1e-8)], dim=1)


def _chunk_views(plan: _Plan, state: LOState, p: Tensor, g: Tensor, start: int, length: int):
    cut = plan.slices(start, length)
    factors = cut(state.diag, 2) if plan.dims is None else (cut(plan.rf, 2), cut(plan.cf, 2))
    return cut(p, 1), cut(g, 1), cut(state.mv, 2), factors


def _accumulate_and_measure_(plan: _Plan, state: LOState, p: Tensor, g: Tensor) -> Tensor:
    """First pass: update m, v (and diag) chunk by chunk; return per-channel sums of squares
    [P, K] of the per-element channels, as read after the update."""
    k = len(plan.channels)
    sum_sq = torch.zeros(plan.pop, k, dtype=p.dtype, device=p.device)
    workspace = None
    for start, length in plan.chunks:
        pc, gc, mvc, factors = _chunk_views(plan, state, p, g, start, length)
        _update_elementwise_(plan, mvc, factors if plan.dims is None else None, gc)
        buf, workspace = _buffer(workspace, plan.pop, k, pc.shape[1:], p)
        _element_channels_(buf, gc, pc, mvc, factors)
        sum_sq += torch.linalg.vector_norm(buf.flatten(2), dim=2).square_()
    return sum_sq


def _buffer(workspace: Tensor | None, pop: int, k: int, chunk_shape, like: Tensor):
    n = pop * k * math.prod(chunk_shape)
    if workspace is None or workspace.numel() < n:
        workspace = torch.empty(n, dtype=like.dtype, device=like.device)
    return workspace[:n].view(pop, k, *chunk_shape), workspace


def features(meta: dict[str, Tensor], state: LOState, param: Tensor, grad: Tensor) -> Tensor:
    """The literal 39 normalised features [P, 39, *S] the network reads at this step.

    Does not mutate ``state``: it reads the accumulators as they would be after this gradient.
    For tests and inspection; the step itself never materialises this tensor.
    """
    state = state.clone()
    p, g = _at_least_1d(param), _at_least_1d(_sanitize(grad))
    plan = _Plan(meta, state, p, g, chunk=p[0].numel())  # one chunk: the whole tensor
    _accumulate_and_measure_(plan, state, p, g)
    pc, gc, mvc, factors = _chunk_views(plan, state, p, g, 0, plan.shape[plan.chunk_dim])
    elem = torch.empty(plan.pop, len(plan.channels), *plan.shape, dtype=p.dtype, device=p.device)
    _element_channels_(elem, gc, pc, mvc, factors)
    out = torch.empty(plan.pop, NUM_NORMALISED, *plan.shape, dtype=p.dtype, device=p.device)
    out[:, list(plan.channels)] = elem
    if plan.dims is not None:
        full = (plan.pop, 6, *plan.shape)
        out[:, list(MATRIX_ROW_CHANNELS)] = _broadcast_channels(state.row).expand(full)
        out[:, list(MATRIX_COL_CHANNELS)] = _broadcast_channels(state.col).expand(full)
    mean_sq = out.square().flatten(2).mean(dim=2)
    out = out * _bcast(torch.rsqrt(1e-5 + mean_sq), len(plan.shape))
    tf = _bcast(time_features(state.t, p.dtype), len(plan.shape)).expand(plan.pop, -1, *plan.shape)
    return torch.cat([out, tf], dim=1)


def _first_layer(meta: dict[str, Tensor], plan: _Plan, state: LOState, sum_sq: Tensor):
    """Fold normalisation, time features and broadcast channels into the first layer.

    Returns the [P, 32, K] weight applied to the per-element channels and the list of
    tensors, hidden dim last, whose sum is the rest of the first layer's pre-activation
    (each broadcastable to [P, *S, 32]).
    """
    w1 = meta["w1"]
    nd = len(plan.shape)
    w_elem = w1[:, :, list(plan.channels)] * _rms_inverse(sum_sq, plan.numel)[:, None, :]
    bias = meta["b1"] + torch.einsum(
        "phf,pf->ph", w1[:, :, NUM_NORMALISED:], time_features(state.t, w1.dtype)
    )
    terms = [bias.reshape(plan.pop, *([1] * nd), HIDDEN)]
    if plan.dims is not None:
        for acc, idx in ((state.row, MATRIX_ROW_CHANNELS), (state.col, MATRIX_COL_CHANNELS)):
            ch = _broadcast_channels(acc)  # [P, 6, *S_reduced]; uniform broadcast keeps the mean
            inv = _rms_inverse(ch.square().flatten(2).sum(2), ch[0, 0].numel())
            w = w1[:, :, list(idx)] * inv[:, None, :]
            terms.append(torch.einsum("phc,pc...->p...h", w, ch))
        terms = [terms[0] + terms[1], terms[2]]
    return w_elem.contiguous(), terms


def _kernel_terms(terms: list[Tensor], cshape: tuple[int, ...]) -> tuple[Tensor, Tensor, int]:
    """The first layer's broadcast terms of one chunk as the kernel takes them: a [R, 32] term
    indexed by the chunk's dim-0 index and a [32, C] term (transposed) indexed by the flattened
    rest (R, C = 1 when constant). A term varying along both (some rank > 2 shapes) is summed in
    full into the row term, with one element per row."""
    ncols = math.prod(cshape[1:])
    rows, cols, full = [], [], []
    for t in terms:
        if all(s == 1 for s in t.shape[2:-1]):
            rows.append(t.reshape(-1, HIDDEN))
        elif t.shape[1] == 1:
            cols.append(t.expand(1, 1, *cshape[1:], HIDDEN).reshape(ncols, HIDDEN))
        else:
            full.append(t)
    if full:
        whole = sum(t.expand(1, *cshape, HIDDEN) for t in terms)
        return whole.reshape(-1, HIDDEN).contiguous(), terms[0].new_zeros(HIDDEN, 1), 1
    row = sum(rows) if rows else terms[0].new_zeros(1, HIDDEN)
    col = sum(cols) if cols else terms[0].new_zeros(1, HIDDEN)
    return row.contiguous(), col.t().contiguous(), ncols


def lo_step_(
    meta: dict[str, Tensor],
    state: LOState,
    param: Tensor,
    grad: Tensor,
    scale: float,
    step_mult: float,
    lr: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """One small_fc_lopt step for a population-stacked tensor, in place.

    ``p <- p - lr * scale * step_mult * d * exp(0.001 a)`` with (d, a) the network's outputs;
    ``scale`` is the per-tensor s_W (1/fan_in for μP hidden weights, else 1).
    """
    p, g = _at_least_1d(param), _at_least_1d(_sanitize(grad))
    plan = _Plan(meta, state, p, g, chunk_size)
    sum_sq = _accumulate_and_measure_(plan, state, p, g)
    w_elem, terms = _first_layer(meta, plan, state, sum_sq)
    w2_t, b2 = meta["w2"].transpose(1, 2), meta["b2"].unsqueeze(1)
    w3_t, b3 = meta["w3"].transpose(1, 2), meta["b3"].unsqueeze(1)
    alpha = -lr * scale * step_mult
    k, pop = len(plan.channels), plan.pop
    fused = USE_KERNEL and kernel.usable(p) and plan.chunk_dim == 0 and p.is_contiguous()
    fused = fused and kernel.load() is not None
    x_space, h1_space = None, None
    for start, length in plan.chunks:
        cut = plan.slices(start, length)
        pc, gc, mvc, factors = _chunk_views(plan, state, p, g, start, length)
        cshape = pc.shape[1:]
        n = math.prod(cshape)
        # channels are built channel-major: contiguous writes, one row per channel
        x, x_space = _buffer(x_space, pop, k, cshape, p)
        _element_channels_(x, gc, pc, mvc, factors)
        chunk_terms = [cut(t, 1) for t in terms]
        if fused:
            row, col, ncols = _kernel_terms(chunk_terms, cshape)
            kernel.net_update_(
                x.view(k, n), row, col, ncols, w_elem[0], meta["w2"][0], meta["b2"][0],
                meta["w3"][0], meta["b3"][0], pc.view(n), alpha,
            )  # fmt: skip
            continue
        h1, h1_space = _buffer(h1_space, pop, n, (HIDDEN,), p)  # element-major [P, n, 32]
        h1_shaped = h1.view(pop, *cshape, HIDDEN)
        if len(chunk_terms) == 1:
            h1_shaped.copy_(chunk_terms[0].expand_as(h1_shaped))
        else:
            torch.add(*chunk_terms, out=h1_shaped)
        h1.baddbmm_(x.view(pop, k, n).transpose(1, 2), w_elem.transpose(1, 2)).relu_()
        h2 = torch.baddbmm(b2, h1, w2_t).relu_()
        out = torch.baddbmm(b3, h2, w3_t)  # [P, n, 2]
        direction, magnitude = out[..., 0], out[..., 1]
        step = magnitude.mul_(EXP_MULT).exp_().mul_(direction)
        step.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        pc.add_(step.view(pc.shape), alpha=alpha)
    state.t += 1
