"""small_fc_lopt (v1, docs/math.md §1) and small_fc_lopt_v2 as math on population-stacked tensors.

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
Linear(->32) -> ReLU -> Linear(32->32) -> ReLU -> Linear(32->2). On CPU, matrix-like float32
tensors go to the fused C kernel (mulo/kernel.py: features and network in registers, all
particles in one call); everything else runs as batched matmuls here, chunk by chunk.
``features`` builds the literal features (for tests and inspection) from the same pieces.
v2 (:data:`V2`) differs only in its time inputs (:func:`time_inputs`) and in how the output
becomes a step (:func:`schedule`, the RMS normalisation and learned step sizes in ``lo_step_``).
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
USE_KERNEL = True  # the fused C kernel for float32 matrix-like tensors on CPU (mulo/kernel.py)
META_SHAPES = {
    "w1": (HIDDEN, NUM_FEATURES),
    "b1": (HIDDEN,),
    "w2": (HIDDEN, HIDDEN),
    "b2": (HIDDEN,),
    "w3": (2, HIDDEN),
    "b3": (2,),
    "theta": (len(DECAY_INIT),),
}

# small_fc_lopt_v2 (horizon-robust): the raw-time inputs are clamped to the meta-training
# range, training-progress inputs come from an optional horizon T (total steps), and the step is
# RMS-normalised per tensor, then scaled by a learned per-group step size, a warmup + cosine
# schedule over T (warmup only when T is unknown) and s_W.
V2_TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3)
V2_TIME_CLAMP = 1000.0  # raw-time inputs read min(t, 1000): never outside meta-training's range
V2_PROGRESS_POINTS = (0.1, 0.25, 0.5, 0.75, 0.9)  # tanh(10 (t/T - tau)), plus a "T known" flag
V2_WARMUP_FRACTION = 0.05  # of T; with T unknown, V2_WARMUP_STEPS
V2_WARMUP_STEPS = 50
V2_EXP_MULT = 0.1  # the magnitude output a scales the step by exp(min(0.1 a, 3))
V2_EXP_CAP = 3.0
V2_NORM_EPS = 1e-12
# initial per-group step sizes exp(log_lr): (vector-like, matrix with s_W = 1, hidden matrix)
# (the learned step has RMS 1): 0.3x a first guess from tuned (μ)AdamW lrs; a 300-step sweep of
# the μ meta-init over x1, x0.3, x0.1 at widths 64, 256, 1024 found x0.3 best at every width
V2_STEP_INIT = {"mu": (0.01, 0.01, 0.6), "sp": (1e-3, 1e-3, 1e-3)}
NUM_FEATURES_V2 = NUM_NORMALISED + len(V2_TIME_SCALES) + len(V2_PROGRESS_POINTS) + 1  # 41
META_SHAPES_V2 = {**META_SHAPES, "w1": (HIDDEN, NUM_FEATURES_V2), "log_lr": (3,)}


@dataclass(frozen=True)
class Architecture:
    """What tells small_fc_lopt v1 and v2 apart (the feature channels and the network are
    shared): the meta-parameter shapes, the time inputs and how the output becomes a step."""

    name: str
    meta_shapes: dict
    normalised: bool  # v2: RMS-normalised step x exp(log_lr) x schedule
    exp_mult: float
    exp_cap: float

    @property
    def num_features(self) -> int:
        return self.meta_shapes["w1"][1]


V1 = Architecture("small_fc_lopt", META_SHAPES, False, EXP_MULT, math.inf)
V2 = Architecture("small_fc_lopt_v2", META_SHAPES_V2, True, V2_EXP_MULT, V2_EXP_CAP)
ARCHITECTURES = {a.name: a for a in (V1, V2)}


def architecture(name_or_meta) -> Architecture:
    """The architecture by name, or the one a meta-parameter dict belongs to (v2 has log_lr)."""
    if isinstance(name_or_meta, dict):
        return V2 if "log_lr" in name_or_meta else V1
    if isinstance(name_or_meta, Architecture):
        return name_or_meta
    if name_or_meta not in ARCHITECTURES:
        valid = ", ".join(ARCHITECTURES)
        raise ValueError(f"unknown learned-optimizer architecture {name_or_meta!r}; valid: {valid}")
    return ARCHITECTURES[name_or_meta]


_architecture = architecture  # for functions whose ``architecture`` argument shadows it


# Where each per-element channel of the chunk buffer sits among the 28 normalised features.
MATRIX_ELEMENT_CHANNELS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 25, 26, 27)
MATRIX_ROW_CHANNELS = (13, 14, 15, 19, 20, 21)  # row_j, rsqrt(row_j + 1e-8)
MATRIX_COL_CHANNELS = (16, 17, 18, 22, 23, 24)  # col_j, rsqrt(col_j + 1e-8)
VECTOR_ELEMENT_CHANNELS = tuple(range(NUM_NORMALISED))


def init_meta_params(
    population: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    architecture: str = "small_fc_lopt",
    kind: str = "mu",
) -> dict[str, Tensor]:
    """The meta-initialisation: truncated-normal weights (std 1/sqrt(fan_in), cut at 2 std),
    zero biases, theta = 0 (the initial decays); v2's log_lr from V2_STEP_INIT[kind] ("mu" or
    "sp"). With ``population`` each particle gets its own draw and a leading dimension."""
    arch = _architecture(architecture)
    lead = () if population is None else (population,)
    meta = {}
    for name, shape in arch.meta_shapes.items():
        t = torch.zeros(*lead, *shape, dtype=dtype)
        if name.startswith("w"):
            std = 1.0 / math.sqrt(shape[-1])
            torch.nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=generator)
        elif name == "log_lr":
            t += torch.tensor(V2_STEP_INIT[kind], dtype=torch.float64).log().to(dtype)
        meta[name] = t
    if arch.normalised:
        _start_as_adam_(meta)
    return meta


ADAM_CHANNEL = 6  # m (beta 0.9) * rsqrt(v + 1e-6) among the normalised channels


def _start_as_adam_(meta: dict[str, Tensor]) -> None:
    """v2's meta-initialisation starts from a rule that trains: hidden units 0 and 1 carry
    relu(x) and relu(-x) of the Adam-direction channel x through both layers, and the direction
    output reads their difference, so d = x: RMS-normalised Adam (no bias correction needed:
    the normalisation removes it). The other units start as random features that d does not
    read yet; meta-training can grow them."""
    w1, w2, w3 = meta["w1"], meta["w2"], meta["w3"]
    w1[..., 0:2, :] = 0
    w1[..., 0, ADAM_CHANNEL], w1[..., 1, ADAM_CHANNEL] = 1.0, -1.0
    w2[..., 0:2, :] = 0
    w2[..., 0, 0], w2[..., 0, 1], w2[..., 1, 0], w2[..., 1, 1] = 1.0, -1.0, -1.0, 1.0
    w3[..., 0, :] = 0
    w3[..., 0, 0], w3[..., 0, 1] = 1.0, -1.0


def num_meta_params(architecture: str = "small_fc_lopt") -> int:
    return sum(math.prod(s) for s in _architecture(architecture).meta_shapes.values())


def decays(theta: Tensor) -> Tensor:
    """beta = max(0, 1 - (1 - beta0) * exp(10 theta)), elementwise over the last dim of
    ``theta``. Below 0 an EMA overshoots and grows without bound: μLO v2's meta-training
    drove one decay to beta = -38 by outer step 660 and collapsed (docs/math.md §1.2)."""
    beta0 = torch.tensor(DECAY_INIT, dtype=theta.dtype, device=theta.device)
    return (1 - (1 - beta0) * torch.exp(10 * theta)).clamp(min=0)


def time_features(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """v1: tanh(t / tau - 1) for each tau: [P] -> [P, 11] (computed in float32 or better)."""
    t = t.double() if t.dtype == torch.float64 else t.float()
    taus = torch.tensor(TIME_SCALES, dtype=t.dtype, device=t.device)
    return torch.tanh(t[:, None] / taus - 1).to(dtype or t.dtype)


def _known(t: Tensor, horizon: Tensor | None) -> tuple[Tensor, Tensor]:
    """(horizon as t's dtype, 1.0 where it is known (> 0) else 0.0), both [P]."""
    if horizon is None:
        horizon = torch.zeros_like(t)
    horizon = horizon.to(t.dtype)
    return horizon, (horizon > 0).to(t.dtype)


def progress(t: Tensor, horizon: Tensor | None) -> Tensor:
    """t / T clamped to [0, 1] where the horizon T is known, else 0: [P]."""
    horizon, known = _known(t, horizon)
    return torch.where(known > 0, (t / horizon.clamp(min=1)).clamp(0, 1), torch.zeros_like(t))


def time_inputs(arch: Architecture, t: Tensor, horizon: Tensor | None = None, dtype=None) -> Tensor:
    """The un-normalised time inputs [P, n_time] of ``arch`` at step counts ``t`` [P].

    v1: the 11 tanh(t / tau - 1). v2: tanh(min(t, 1000) / tau - 1) for 7 tau <= 1000, then
    tanh(10 (t/T - tau)) for tau in V2_PROGRESS_POINTS and a flag 1, or zeros and flag 0 when T
    is unknown (``horizon`` None or <= 0): every input stays in its meta-training range at any t.
    """
    if arch is V1:
        return time_features(t, dtype)
    t = t.double() if t.dtype == torch.float64 else t.float()
    taus = torch.tensor(V2_TIME_SCALES, dtype=t.dtype, device=t.device)
    raw = torch.tanh(t.clamp(max=V2_TIME_CLAMP)[:, None] / taus - 1)
    _, known = _known(t, horizon)
    points = torch.tensor(V2_PROGRESS_POINTS, dtype=t.dtype, device=t.device)
    prog = torch.tanh(10 * (progress(t, horizon)[:, None] - points)) * known[:, None]
    return torch.cat([raw, prog, known[:, None]], dim=1).to(dtype or t.dtype)


def schedule(t: Tensor, horizon: Tensor | None = None) -> Tensor:
    """v2's step multiplier [P]: linear warmup over 5% of T then cosine to 0 at T; with T
    unknown, warmup over 50 steps then 1."""
    t = t.double()
    horizon, known = _known(t, horizon)
    warm_len = torch.where(
        known > 0, (V2_WARMUP_FRACTION * horizon).clamp(min=1), torch.full_like(t, V2_WARMUP_STEPS)
    )
    warm = ((t + 1) / warm_len).clamp(max=1)
    cosine = 0.5 * (1 + torch.cos(math.pi * progress(t, horizon)))
    return warm * torch.where(known > 0, cosine, torch.ones_like(t))


class Prepared:
    """What a step derives from the meta-parameters alone, computed once for every tensor and
    step that uses them: the decays, the first layer's column blocks, the network laid out for
    the kernel and v2's step sizes; and, memoised for the last step counters seen, the time
    inputs folded into the first bias and v2's schedule. Every tensor of a model is at the same
    step (in the optimizer and in meta-training), so one memo entry serves them all; on small
    tensors this per-tensor work used to cost more than the network itself.

    ``prepare(meta)`` builds one; ``lo_step_`` takes it wherever it takes ``meta``. The
    meta-parameters must not change in place while it is in use (prepare them again).
    """

    def __init__(self, meta: dict[str, Tensor], dtype: torch.dtype | None = None):
        if dtype is not None and meta["w1"].dtype != dtype:
            meta = {k: v.to(dtype) for k, v in meta.items()}
        self.meta = meta
        self.arch = architecture(meta)
        self.dtype = meta["w1"].dtype
        one_minus_beta = 1 - decays(meta["theta"])  # [P, 7]
        self.w_moments = one_minus_beta[:, 0:4].contiguous()  # m0..2, v: the kernel's layout
        self.w_factored = one_minus_beta[:, 4:7]
        w1 = meta["w1"]
        self.w1_matrix = w1[:, :, list(MATRIX_ELEMENT_CHANNELS)]
        self.w1_vector = w1[:, :, list(VECTOR_ELEMENT_CHANNELS)]
        self.w1_row = w1[:, :, list(MATRIX_ROW_CHANNELS)]
        self.w1_col = w1[:, :, list(MATRIX_COL_CHANNELS)]
        self.w1_time = w1[:, :, NUM_NORMALISED:]
        self.net = tuple(meta[k].contiguous() for k in ("w2", "b2", "w3", "b3"))
        self.step_sizes = torch.exp(meta["log_lr"].double()) if self.arch.normalised else None
        self._memo: tuple | None = None

    def timed(self, t: Tensor, horizon: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(first-layer bias with the time inputs folded in [P, 32], v2's schedule [P] float64
        or None for v1) at step counters ``t`` [P] and run lengths ``horizon``."""
        memo = self._memo
        if memo is not None and _same(memo[0], t) and _same(memo[1], horizon):
            return memo[2], memo[3]
        times = time_inputs(self.arch, t, horizon, self.dtype)
        bias = self.meta["b1"] + torch.einsum("phf,pf->ph", self.w1_time, times)
        sched = None
        if self.arch.normalised:
            sched = schedule(t.to(self.step_sizes.device), horizon).to(self.step_sizes.device)
        self._memo = (t.clone(), _maybe(horizon, Tensor.clone), bias, sched)
        return bias, sched


def prepare(meta: dict[str, Tensor] | Prepared, dtype: torch.dtype | None = None) -> Prepared:
    """``meta`` as a :class:`Prepared` (in ``dtype`` if given); a Prepared one passes through."""
    if isinstance(meta, Prepared):
        return meta if dtype is None or meta.dtype == dtype else Prepared(meta.meta, dtype)
    return Prepared(meta, dtype)


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)


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
    rank < 2 tensors keep ``diag``. ``t`` is the per-particle step counter; ``horizon`` (v2
    only, optional) the per-particle run length T, 0 where unknown.
    """

    mv: Tensor
    t: Tensor
    row: Tensor | None = None
    col: Tensor | None = None
    diag: Tensor | None = None
    horizon: Tensor | None = None

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the LO's state and math use for parameters of ``dtype``: float64 stays
    float64, everything else (float32, bfloat16, float16) is float32. In bf16 ``1 - beta``
    rounds to 0 for the slow decays, so the accumulators would never move."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def init_state(param: Tensor, horizon: float | Tensor | None = None) -> LOState:
    """Zero accumulators for a population-stacked parameter [P, *S], in
    ``compute_dtype(param.dtype)``; ``horizon`` (v2): the run's total steps T (a number, or
    [P] per particle; 0 or None: unknown)."""
    p = _at_least_1d(param)
    pop, shape = p.shape[0], tuple(p.shape[1:])
    z = dict(dtype=compute_dtype(p.dtype), device=p.device)
    # the step counter stays float32 whatever the param dtype: bf16 stops counting at 256
    t = torch.zeros(pop, dtype=torch.float32, device=p.device)
    state = LOState(mv=torch.zeros(pop, 4, *shape, **z), t=t)
    if horizon is not None:
        state.horizon = (
            torch.as_tensor(horizon, dtype=torch.float32).to(p.device).expand(pop).clone()
        )
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


# |g| above this is clamped: g^2 (and the accumulators built from it) must stay finite. Sums of
# squares of the channels may still overflow; they then weight that channel 0, never NaN.
_GRAD_LIMIT = {torch.float32: 1e16, torch.bfloat16: 1e16, torch.float64: 1e150}


def _sanitize(grad: Tensor) -> Tensor:
    # One reduction decides; the copy happens only when something is non-finite or huge.
    # Non-finite entries become 0 (not nan_to_num's +-3.4e38, whose square overflows v).
    limit = _GRAD_LIMIT.get(grad.dtype)
    if limit is None:
        if bool(torch.isfinite(grad.sum())):
            return grad
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if grad.numel() == 0:
        return grad
    low, high = torch.aminmax(grad)
    if bool((low >= -limit) & (high <= limit)):  # False for NaN
        return grad
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).clamp_(-limit, limit)


def _bcast(w: Tensor, ndim: int) -> Tensor:
    """[P, k] -> [P, k, 1, ..., 1] with ``ndim`` trailing singleton dims."""
    return w.reshape(*w.shape, *([1] * ndim))


class _Plan:
    """Everything one step of one tensor needs that does not change between chunks."""

    def __init__(self, prep: Prepared, state: LOState, p: Tensor, g: Tensor, chunk: int):
        self.shape = tuple(p.shape[1:])
        self.pop = p.shape[0]
        self.numel = math.prod(self.shape)
        nd = len(self.shape)
        self.w_moments = prep.w_moments  # [P, 4]: 1 - beta of m0..2, v (the kernel's layout)
        self.w_m = _bcast(prep.w_moments[:, 0:3], nd)
        self.w_v = _bcast(prep.w_moments[:, 3], nd)
        self.w_f = _bcast(prep.w_factored, nd)
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
    MATRIX_ELEMENT_CHANNELS) or the diag accumulator for rank < 2 (K = 28, docs/math.md order).
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


def features(
    meta: dict[str, Tensor] | Prepared, state: LOState, param: Tensor, grad: Tensor
) -> Tensor:
    """The literal features [P, F, *S] the network reads at this step: the 28 normalised
    channels, then the architecture's time inputs (F = 39 for v1, 41 for v2).

    Does not mutate ``state``: it reads the accumulators as they would be after this gradient.
    For tests and inspection; the step itself never materialises this tensor.
    """
    state = state.clone()
    prep = prepare(meta)
    p, g = _at_least_1d(param), _at_least_1d(_sanitize(grad))
    plan = _Plan(prep, state, p, g, chunk=p[0].numel())  # one chunk: the whole tensor
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
    times = time_inputs(prep.arch, state.t, state.horizon, p.dtype)
    tf = _bcast(times, len(plan.shape)).expand(plan.pop, -1, *plan.shape)
    return torch.cat([out, tf], dim=1)


def _first_layer(prep: Prepared, plan: _Plan, state: LOState, sum_sq: Tensor):
    """Fold normalisation, time features and broadcast channels into the first layer.

    Returns the [P, 32, K] weight applied to the per-element channels and the list of
    tensors, hidden dim last, whose sum is the rest of the first layer's pre-activation
    (each broadcastable to [P, *S, 32]).
    """
    nd = len(plan.shape)
    w1_elem = prep.w1_vector if plan.dims is None else prep.w1_matrix
    w_elem = w1_elem * _rms_inverse(sum_sq, plan.numel)[:, None, :]
    bias, _ = prep.timed(state.t, state.horizon)
    terms = [bias.reshape(plan.pop, *([1] * nd), HIDDEN)]
    if plan.dims is not None:
        for acc, w1_part in ((state.row, prep.w1_row), (state.col, prep.w1_col)):
            ch = _broadcast_channels(acc)  # [P, 6, *S_reduced]; uniform broadcast keeps the mean
            flat = ch.flatten(2)
            inv = _rms_inverse(flat.square().sum(2), flat.shape[2])
            # [P, n_reduced, 6] @ [P, 6, 32]: this statistic's part of every row's / column's
            # pre-activation
            part = torch.bmm(flat.transpose(1, 2), (w1_part * inv[:, None, :]).transpose(1, 2))
            terms.append(part.view(plan.pop, *ch.shape[2:], HIDDEN))
        terms = [terms[0] + terms[1], terms[2]]
    return w_elem.contiguous(), terms


def _step_sizes(prep: Prepared, state: LOState, plan: _Plan, scale, step_mult, lr):
    """The per-tensor factor of the step: a float (v1: -lr * s_W * step_mult, the same for
    every particle) or [P] float32 (v2: -lr * s_W * exp(log_lr[group]) * schedule(t, T), with
    group 0 for rank < 2, 2 for hidden (s_W < 1) and 1 for other matrices)."""
    if not prep.arch.normalised:
        return -lr * scale * step_mult
    group = 0 if plan.dims is None else (2 if scale < 1 else 1)
    _, sched = prep.timed(state.t, state.horizon)
    return (-lr * scale * prep.step_sizes[:, group] * sched).float()


def _apply_normalised_(p: Tensor, raw: Tensor, dsq: Tensor, alpha: Tensor, numel: int) -> None:
    """v2: p += alpha * raw / rms(d), per particle (dsq: sum of d^2 over the finite steps)."""
    inv_rms = torch.rsqrt(dsq / numel + V2_NORM_EPS).to(p.device, p.dtype)
    factor = alpha.to(p.device, p.dtype) * inv_rms
    p.addcmul_(raw.view(p.shape), factor.view(-1, *[1] * (p.dim() - 1)))  # any layout


def _fused_step_(prep: Prepared, plan: _Plan, state: LOState, p, g, alpha, geo) -> None:
    """The whole step of a matrix-like tensor in the C kernel: two passes over the elements,
    no element-sized temporaries (v2 adds one: the raw step, normalised before it is applied)."""
    pop = plan.pop
    d0, _ = plan.dims
    # f0 / t0 belong to the statistic reduced over dim 0 (state.row when d0 == 0)
    f0, f1 = (plan.rf, plan.cf) if d0 == 0 else (plan.cf, plan.rf)
    f0, f1 = (f.reshape(pop, 3, -1).contiguous() for f in (f0, f1))
    sums = kernel.accumulate_(geo, g, p, state.mv, plan.w_moments, f0, f1)
    w_elem, terms = _first_layer(prep, plan, state, sums.to(p.dtype))
    t0, t1 = terms if d0 == 0 else terms[::-1]
    t0 = t0.reshape(pop, -1, HIDDEN).transpose(1, 2).contiguous()  # [P, 32, n0]: see lo_net.c
    t1 = t1.reshape(pop, -1, HIDDEN).contiguous()
    arch = prep.arch
    raw = torch.empty(pop, plan.numel, dtype=p.dtype) if arch.normalised else None
    scalar = not isinstance(alpha, Tensor)
    alpha_p = torch.full((pop,), alpha, dtype=torch.float32) if scalar else alpha.contiguous()
    dsq = kernel.step_(
        geo, g, p, state.mv, f0, f1, w_elem, t0, t1, *prep.net,
        exp_mult=arch.exp_mult, exp_cap=arch.exp_cap, alpha=alpha_p, out=raw,
    )  # fmt: skip
    if raw is not None:
        _apply_normalised_(p, raw, dsq, alpha_p, plan.numel)


def _torch_step_(prep: Prepared, plan: _Plan, state: LOState, p, g, alpha) -> None:
    """The PyTorch path (and the reference for the kernel), chunk by chunk: any shape, dtype
    and device."""
    arch = prep.arch
    sum_sq = _accumulate_and_measure_(plan, state, p, g)
    w_elem, terms = _first_layer(prep, plan, state, sum_sq)
    w2, b2, w3, b3 = prep.net
    w2_t, b2, w3_t, b3 = w2.transpose(1, 2), b2.unsqueeze(1), w3.transpose(1, 2), b3.unsqueeze(1)
    k, pop = len(plan.channels), plan.pop
    x_space, h1_space = None, None
    raw = torch.empty_like(p) if arch.normalised else None
    dsq = torch.zeros(pop, dtype=torch.float64, device=p.device) if arch.normalised else None
    for start, length in plan.chunks:
        cut = plan.slices(start, length)
        pc, gc, mvc, factors = _chunk_views(plan, state, p, g, start, length)
        cshape = pc.shape[1:]
        n = math.prod(cshape)
        # channels are built channel-major: contiguous writes, one row per channel
        x, x_space = _buffer(x_space, pop, k, cshape, p)
        _element_channels_(x, gc, pc, mvc, factors)
        chunk_terms = [cut(t, 1) for t in terms]
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
        if arch.normalised:
            step = magnitude.mul_(arch.exp_mult).clamp_(max=arch.exp_cap).exp_().mul_(direction)
            finite = torch.isfinite(step)
            dsq += torch.where(finite, direction, 0).double().square().sum(1)
            step.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
            cut(raw, 1).copy_(step.view(pc.shape))
            continue
        step = magnitude.mul_(EXP_MULT).exp_().mul_(direction)
        step.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        pc.add_(step.view(pc.shape), alpha=alpha)
    if raw is not None:
        _apply_normalised_(p, raw, dsq, alpha, plan.numel)


def lo_step_(
    meta: dict[str, Tensor] | Prepared,
    state: LOState,
    param: Tensor,
    grad: Tensor,
    scale: float,
    step_mult: float,
    lr: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    weight_decay: float = 0.0,
    rounding_seed: int = 0,
) -> None:
    """One small_fc_lopt step (v1 or v2, from ``meta``'s keys) for a population-stacked
    tensor, in place. ``scale`` is the per-tensor s_W (1/fan_in for μP hidden weights, else 1).
    ``meta``: the meta-parameters [P, ...], or :func:`prepare` of them (faster when they step
    many tensors: what depends on them alone is then computed once).

    v1: ``p <- p - lr * scale * step_mult * d * exp(0.001 a)`` with (d, a) the network's outputs.
    v2: ``p <- p - lr * scale * exp(log_lr[group]) * schedule(t, T) * u / rms(d)`` with
    ``u = d * exp(min(0.1 a, 3))`` (``step_mult`` is not used: v2 learns its step sizes).
    ``weight_decay`` is decoupled: ``p <- p * (1 - lr * weight_decay)`` before the learned step.

    bfloat16 / float16 parameters are stepped in float32 (state, features, network, update)
    and the result is rounded back stochastically (seeded by ``rounding_seed``): a step below
    half a bf16 ulp, typical of μP hidden weights, would otherwise round away every time.
    """
    work = compute_dtype(param.dtype)
    if param.numel() == 0:  # nothing to update; the counter still counts the step
        state.t += 1
        return
    wide = param if work == param.dtype else param.to(work)
    if weight_decay != 0:
        wide.mul_(1 - lr * weight_decay)
    _step_(meta, state, wide, grad.to(work), scale, step_mult, lr, chunk_size)
    if wide is param:
        return
    stochastic_round_(param, wide, torch.Generator(param.device).manual_seed(rounding_seed))


def lo_step_many_(
    meta: dict[str, Tensor] | Prepared,
    states: list[LOState],
    params: list[Tensor],
    grads: list[Tensor],
    scale: float,
    step_mult: float,
    lr: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    weight_decay: float = 0.0,
) -> None:
    """:func:`lo_step_` for several tensors of one shape and one dtype at once, in place.

    Each population-stacked tensor [P_i, *S] (with its state) becomes a block of particles of
    one stacked population, stepped by one :func:`lo_step_` under the shared ``meta`` [1, ...],
    and is written back. Every per-tensor quantity of the step (feature normalisation, the
    factored statistics, v2's rms(d), the step counter and the horizon) is per particle, so
    this equals one :func:`lo_step_` per tensor (tested to float tolerance); what it saves is the
    per-call overhead that dominates small tensors. Not for bf16 / fp16 parameters, whose
    stochastic rounding is seeded per tensor: step those one by one.
    """
    if not params:
        return
    if isinstance(meta, Prepared):
        meta = meta.meta
    first = params[0]
    if any(p.shape[1:] != first.shape[1:] or p.dtype != first.dtype for p in params):
        raise ValueError("lo_step_many_ needs tensors of one shape and one dtype")
    if compute_dtype(first.dtype) != first.dtype:
        raise ValueError(f"lo_step_many_ does not take {first.dtype} (step it with lo_step_)")
    if any(v.shape[0] != 1 for v in meta.values()):
        raise ValueError("lo_step_many_ shares one set of meta-parameters: meta must be [1, ...]")
    if len({s.horizon is None for s in states}) > 1:
        raise ValueError("lo_step_many_ needs the horizon known for all the tensors or for none")
    stacked = LOState(**{
        f.name: None if getattr(states[0], f.name) is None
        else torch.cat([getattr(st, f.name) for st in states])
        for f in fields(LOState)
    })  # fmt: skip
    p, g = torch.cat(params), torch.cat(grads)
    pop = p.shape[0]
    shared = {k: v.expand(pop, *v.shape[1:]) for k, v in meta.items()}
    lo_step_(shared, stacked, p, g, scale, step_mult, lr, chunk_size, weight_decay)
    start = 0
    for param, state in zip(params, states, strict=True):
        n = param.shape[0]
        param.copy_(p[start : start + n])
        for f in fields(LOState):
            dst = getattr(state, f.name)
            if dst is not None:
                dst.copy_(getattr(stacked, f.name)[start : start + n])
        start += n


def _step_(meta, state: LOState, param, grad, scale, step_mult, lr, chunk_size) -> None:
    prep = prepare(meta, param.dtype)
    p, g = _at_least_1d(param), _at_least_1d(_sanitize(grad))
    plan = _Plan(prep, state, p, g, chunk_size)
    alpha = _step_sizes(prep, state, plan, scale, step_mult, lr)
    geo = kernel.geometry(plan.shape, plan.dims) if USE_KERNEL else None
    if geo is not None and kernel.usable(p, state.mv) and kernel.load() is not None:
        _fused_step_(prep, plan, state, p, g.contiguous(), alpha, geo)
    else:
        _torch_step_(prep, plan, state, p, g, alpha)
    state.t += 1


def stochastic_round_(dst: Tensor, src: Tensor, generator: torch.Generator | None = None):
    """``dst <- src`` rounded to ``dst``'s dtype up or down at random, with the probability
    that makes the rounding unbiased (E[dst] = src), so small steps accumulate on average."""
    nearest = src.to(dst.dtype)
    residual = src - nearest.to(src.dtype)
    toward = torch.where(residual > 0, math.inf, -math.inf).to(dst.dtype)
    neighbour = torch.nextafter(nearest, toward)
    gap = neighbour.to(src.dtype) - nearest.to(src.dtype)
    prob = torch.where(gap != 0, residual / gap, 0.0)
    draw = torch.rand(src.shape, generator=generator, device=src.device, dtype=src.dtype)
    dst.copy_(torch.where(draw < prob, neighbour, nearest))
