"""Meta-gradient estimators (docs/math.md §3): truncated PES and antithetic ES, population-batched.

Vocabulary. θ is the flat vector of the LO's meta-parameters (the 2,409 floats of
``functional.init_meta_params`` in ``META_SHAPES`` order; :func:`flatten_meta` /
:func:`unflatten_meta`). An :class:`InnerProblem` is one task slot (a model at one width with
its data) trained by N antithetic *pairs* of particles: particle ``2i`` uses θ + σε_i and
particle ``2i + 1`` uses θ − σε_i. All 2N particles are one population: the task computes
all losses and gradients in one batched pass, and ``functional.lo_step_`` steps each
parameter tensor of all particles in one call, with per-particle meta-parameters and step
counters. No Python loop runs over particles.

What the two members of a pair share: ε_i, the inner init (one seed per pair), the inner
length and offset, and every minibatch. Different pairs see different minibatches (one
``[N, B, ...]`` draw per inner step, repeated to ``[2N, B, ...]``) and different inits.

Truncated PES (Vicol et al. 2021), as implemented by :meth:`InnerProblem.pes_rows`:

* a pair's inner run has length T ~ LogUniform[min_length, max_length] (rounded) and a random
  offset o ~ U{0, ..., max_offset − 1}: the run's step counter *starts at o* (its parameters
  and LO state are fresh, the LO's own time ``t`` starts at 0), so the run ends sooner and
  pairs fall out of lockstep. Runs only end at truncation boundaries: a run ends after the
  first truncation that brings its counter to ≥ T, i.e. it lasts K·ceil((T − o)/K) steps.
  This keeps every truncation exactly K steps for every particle, so the population stays
  one batch with no masking;
* each truncation draws a fresh ε for every pair and adds it to the pair's accumulator
  *before* use: ``ξ_i ← ξ_i + ε_i``, so ξ_i holds the ε of this truncation and of all
  earlier truncations of the current run (docs/math.md writes ξ_i + ε_i with ξ_i holding only the
  earlier ones: the same quantity);
* the truncation loss of a particle is the mean of its K pre-update minibatch losses,
  clipped to [0, loss_cap] (1.5·ln(classes)), NaN/Inf → loss_cap (:func:`clip_meta_loss`);
* the estimate is ĝ = mean_i (L⁺_i − L⁻_i)·ξ_i / (2σ);
* when a pair's run ends, after its last truncation's estimate, it restarts: new init seed,
  new T and offset, fresh parameters and LO state, ξ_i = 0.

Antithetic ES (:meth:`InnerProblem.es_rows`): every estimate runs fresh inner runs (new init
seeds, one ε per pair) for one T ~ LogUniform[min_length, max_length] shared by all pairs
(so the unroll stays one batch), L = clipped mean loss over the whole unroll, and
ĝ = mean_i (L⁺_i − L⁻_i)·ε_i / (2σ).

The estimators return *rows*: one row per pair, ``[(L⁺−L⁻)·ξ/(2σ), L⁺, L⁻]``, zero for pairs
another rank simulates (see ``mulo.meta.distributed``); ĝ is the column-sum of the first D
columns over pairs, divided by N.

Every random number comes from an explicit seeded ``torch.Generator`` held by the problem (and
the data sampler's own generator), never from the global RNG, so ``state_dict`` /
``load_state_dict`` resume a run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

import parametrizations as P
from mulo import data as D
from mulo import functional as LF
from mulo.meta.distributed import all_gather_objects, pair_range
from mulo.tasks import MLPPopulation, build_task

META_NAMES = tuple(LF.META_SHAPES)
META_SIZES = tuple(math.prod(s) for s in LF.META_SHAPES.values())
NUM_META = sum(META_SIZES)  # 2,409 for small_fc_lopt v1; num_meta(arch) for any architecture
KINDS = {"mu": "mup", "mup": "mup", "μ": "mup", "sp": "sp"}
SEED_SPACE = 2**31 - 1


def normalise_kind(kind: str) -> str:
    """``"mu"`` (μLO: μP model, s_W from μP, step_mult 0.01) or ``"sp"`` (SP-LO)."""
    key = str(kind).strip().lower()
    if key not in KINDS:
        raise ValueError(f"unknown LO kind {kind!r}; choose 'mu' (μLO) or 'sp' (SP-LO)")
    return "mu" if KINDS[key] == "mup" else "sp"


# ---------------------------------------------------------------------------------------------
# Meta-parameters as one vector


def num_meta(architecture=LF.V1) -> int:
    """D, the length of the flat meta-parameter vector of an architecture (name or object)."""
    return sum(math.prod(s) for s in LF.architecture(architecture).meta_shapes.values())


def flatten_meta(meta: dict[str, Tensor]) -> Tensor:
    """``{name: [*lead, *shape]}`` -> ``[*lead, D]`` in the architecture's shape order."""
    parts = []
    for name, shape in LF.architecture(meta).meta_shapes.items():
        t = meta[name]
        lead = t.shape[: t.dim() - len(shape)]
        parts.append(t.reshape(*lead, math.prod(shape)))
    return torch.cat(parts, dim=-1)


def unflatten_meta(theta: Tensor, architecture=LF.V1) -> dict[str, Tensor]:
    """``[*lead, D]`` -> ``{name: [*lead, *shape]}`` (contiguous copies when ``lead`` is set)."""
    shapes = LF.architecture(architecture).meta_shapes
    d = num_meta(architecture)
    if theta.shape[-1] != d:
        raise ValueError(f"expected {d} meta-parameters, got a vector of {theta.shape[-1]}")
    lead = theta.shape[:-1]
    sizes = [math.prod(s) for s in shapes.values()]
    out = {}
    for (name, shape), part in zip(shapes.items(), theta.split(sizes, dim=-1), strict=True):
        out[name] = part.reshape(*lead, *shape).contiguous()
    return out


def antithetic(theta: Tensor, eps: Tensor, sigma: float) -> Tensor:
    """``[2n, D]`` particle meta-vectors: row 2i = θ + σε_i, row 2i+1 = θ − σε_i."""
    plus, minus = theta + sigma * eps, theta - sigma * eps
    return torch.stack([plus, minus], dim=1).reshape(-1, theta.shape[-1])


def clip_meta_loss(loss: Tensor, cap: float) -> Tensor:
    """Clip to [0, cap]; NaN and ±Inf become ``cap`` (a diverged run costs the maximum)."""
    capped = torch.full_like(loss, cap)
    return torch.where(torch.isfinite(loss), loss.clamp(0.0, cap), capped)


def sample_lengths(n: int, low: int, high: int, generator: torch.Generator) -> Tensor:
    """``n`` inner lengths ~ LogUniform[low, high], rounded, as int64 in [low, high]."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    return t.round().long().clamp_(low, high)


def draw_seeds(n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, SEED_SPACE, (n,), generator=generator, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Inner tasks


class InnerTask(Protocol):
    """What the estimators need from a task slot (see :class:`MLPTask`, :class:`QuadraticTask`).

    ``scales`` (s_W per parameter name), ``step_mult``, ``loss_cap``, ``batch_size``, ``dtype``;
    ``init_params(seed) -> {name: [1, ...]}``; ``grads(params, x, y) -> (loss [P], grads)`` on
    population-stacked params; ``make_batcher(seed)``: an object with
    ``sample_population(n, batch_size, shared=False)``, ``state_dict``, ``load_state_dict``;
    ``evaluate(params) -> dict`` of ``[P]`` held-out metrics; ``describe() -> dict``.
    """

    scales: dict[str, float]
    step_mult: float
    loss_cap: float
    batch_size: int
    dtype: torch.dtype
    device: torch.device

    def init_params(self, seed: int) -> dict[str, Tensor]: ...

    def grads(self, params, x, y) -> tuple[Tensor, dict[str, Tensor]]: ...

    def make_batcher(self, seed: int): ...

    def evaluate(self, params) -> dict[str, Tensor]: ...

    def describe(self) -> dict: ...


class MLPTask:
    """A ``P.mlp(in, width, depth, classes)`` task slot under μP (kind "mu") or SP (kind "sp").

    ``x_train`` [N, ...] (flattened to features) / ``y_train`` [N] are the training set,
    ``x_test`` / ``y_test`` the held-out examples. :meth:`from_dataset` loads them through
    ``mulo.tasks.build_task`` (Fashion-MNIST pooled to 14×14 by default).
    """

    def __init__(
        self,
        width: int,
        depth: int,
        kind: str,
        x_train: Tensor,
        y_train: Tensor,
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        num_classes: int | None = None,
        batch_size: int = 128,
        dataset: str = "tensors",
        device: str | torch.device = "cpu",
    ):
        self.kind = normalise_kind(kind)
        self.parametrization = KINDS[self.kind]
        self.step_mult = LF.STEP_MULT_MU if self.kind == "mu" else LF.STEP_MULT_SP
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.x_train = x_train.reshape(len(x_train), -1).float().to(self.device)
        self.y_train = y_train.long().to(self.device)
        if x_test is None:
            x_test, y_test = self.x_train[:0], self.y_train[:0]
        self.x_test = x_test.reshape(len(x_test), self.x_train.shape[1]).float().to(self.device)
        self.y_test = y_test.long().to(self.device)
        self.num_classes = int(num_classes or int(self.y_train.max()) + 1)
        self.width, self.depth, self.batch_size = int(width), int(depth), int(batch_size)
        self.dataset = dataset
        self.in_features = self.x_train.shape[1]
        self.template = self._population(1, seed=0)
        module = self.template.module(0)
        self.scales = P.get(self.parametrization).update_scales(module)
        self.loss_cap = 1.5 * math.log(self.num_classes)

    @classmethod
    def from_dataset(
        cls,
        width: int,
        depth: int,
        kind: str,
        dataset: str = "fashion_mnist",
        data_root=None,
        image_pool: int = 2,
        batch_size: int = 128,
        device: str | torch.device = "cpu",
    ) -> MLPTask:
        task = build_task(
            "mlp",
            width=width,
            depth=depth,
            parametrization=KINDS[normalise_kind(kind)],
            batch_size=batch_size,
            dataset=dataset,
            data_root=data_root,
            image_pool=image_pool,
            device=device,
        )
        return cls(
            width, depth, kind, task.batcher.x, task.batcher.y, task.eval_x, task.eval_y,
            task.num_classes, batch_size, dataset=task.dataset, device=device,
        )  # fmt: skip

    def _population(self, population: int, seed: int) -> MLPPopulation:
        return MLPPopulation(
            population,
            in_features=self.in_features,
            width=self.width,
            depth=self.depth,
            out_features=self.num_classes,
            parametrization=self.parametrization,
            seed=seed,
            device=self.device,
        )

    def init_params(self, seed: int) -> dict[str, Tensor]:
        return self._population(1, seed=int(seed)).params

    def grads(self, params, x, y):
        return self.template.grads(params, x, y)

    def loss(self, params, x, y) -> Tensor:
        return self.template.loss(params, x, y)

    def make_batcher(self, seed: int) -> D.TensorBatcher:
        return D.TensorBatcher(self.x_train, self.y_train, seed=int(seed), device=self.device)

    @torch.no_grad()
    def evaluate(self, params, chunk: int = 1000) -> dict[str, Tensor]:
        """Held-out ``{"test_loss", "test_accuracy"}`` per particle ``[P]``."""
        if len(self.x_test) == 0:
            return {}
        pop = params["input.weight"].shape[0]
        loss = torch.zeros(pop, dtype=torch.float64, device=self.device)
        correct = torch.zeros(pop, dtype=torch.float64, device=self.device)
        for start in range(0, len(self.x_test), chunk):
            x, y = self.x_test[start : start + chunk], self.y_test[start : start + chunk]
            loss += self.template.loss(params, x, y).double() * len(x)
            correct += self.template.accuracy(params, x, y).double() * len(x)
        n = len(self.x_test)
        return {"test_loss": loss / n, "test_accuracy": correct / n}

    def describe(self) -> dict:
        return {
            "task": "mlp",
            "kind": self.kind,
            "width": self.width,
            "depth": self.depth,
            "in_features": self.in_features,
            "num_classes": self.num_classes,
            "train_size": len(self.x_train),
            "batch_size": self.batch_size,
            "dataset": self.dataset,
        }


class _GaussianTargets:
    """Seeded targets ``x = target + noise·N(0, 1)`` for :class:`QuadraticTask`."""

    def __init__(self, target: Tensor, noise: float, seed: int):
        self.target, self.noise = target, float(noise)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample_population(self, population: int, batch_size: int, shared: bool = False):
        n = 1 if shared else population
        z = torch.randn(n, batch_size, len(self.target), generator=self.generator)
        x = self.target + self.noise * z.to(self.target.dtype)
        x = x.expand(population, -1, -1) if shared else x
        return x, torch.zeros(population, batch_size, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


class QuadraticTask:
    """A tiny smooth task for tests and estimator studies: f(p) = ½·mean_b ‖p − x_b‖², with
    ``p`` a dict of tensors (default ``w`` [3, 4] and ``b`` [4], so both the factored and the
    diagonal LO paths run) and ``x_b`` = a fixed target + ``noise``·N(0, 1).

    With ``init_std = 0`` and ``noise = 0`` every inner run is the same deterministic function
    of the meta-parameters, so its gradient can be checked by finite differences.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]] | None = None,
        noise: float = 0.0,
        init_std: float = 0.0,
        batch_size: int = 4,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        step_mult: float = LF.STEP_MULT_MU,
        loss_cap: float = 1e3,
    ):
        self.shapes = dict(shapes or {"w": (3, 4), "b": (4,)})
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.noise, self.init_std = float(noise), float(init_std)
        self.batch_size, self.seed, self.dtype = int(batch_size), int(seed), dtype
        self.device = torch.device("cpu")
        self.step_mult, self.loss_cap = float(step_mult), float(loss_cap)
        self.scales = {name: 1.0 for name in self.shapes}
        gen = torch.Generator().manual_seed(self.seed)
        self.target = torch.randn(sum(self.sizes), generator=gen, dtype=torch.float64).to(dtype)

    def init_params(self, seed: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(int(seed))
        out = {}
        for name, shape in self.shapes.items():
            z = torch.randn(1, *shape, generator=gen, dtype=torch.float64).to(self.dtype)
            out[name] = self.init_std * z
        return out

    def _flat(self, params) -> Tensor:
        return torch.cat([params[n].flatten(1) for n in self.shapes], dim=1)

    def loss(self, params, x, y=None) -> Tensor:
        diff = self._flat(params).unsqueeze(1) - x
        return 0.5 * diff.square().sum(-1).mean(-1)

    def grads(self, params, x, y=None):
        flat = self._flat(params)
        loss = 0.5 * (flat.unsqueeze(1) - x).square().sum(-1).mean(-1)
        g = flat - x.mean(1)
        parts = g.split(self.sizes, dim=1)
        grads = {
            n: part.reshape(-1, *s) for (n, s), part in zip(self.shapes.items(), parts, strict=True)
        }
        return loss, grads

    def make_batcher(self, seed: int) -> _GaussianTargets:
        return _GaussianTargets(self.target, self.noise, seed)

    def evaluate(self, params) -> dict[str, Tensor]:
        return {"test_loss": 0.5 * (self._flat(params) - self.target).square().sum(-1)}

    def describe(self) -> dict:
        return {
            "task": "quadratic",
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "noise": self.noise,
            "init_std": self.init_std,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------------------------
# The batched inner loop


def init_particles(
    task: InnerTask, seeds: list[int], copies: int = 2, horizon: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, LF.LOState]]:
    """Params ``[copies·len(seeds), ...]`` (``copies`` consecutive particles per seed share its
    init) and fresh LO states; ``horizon`` [len(seeds)]: each seed's run length T for the
    LO's state (v2; 0 = unknown), None for none."""
    inits = [task.init_params(s) for s in seeds]
    params = {
        name: torch.cat([p[name] for p in inits]).repeat_interleave(copies, dim=0).contiguous()
        for name in inits[0]
    }
    if horizon is not None:
        horizon = horizon.float().repeat_interleave(copies).to(task.device)
    return params, {name: LF.init_state(p, horizon) for name, p in params.items()}


def rescaled(
    tensors: dict[str, Tensor], factors: Tensor | None, names: list[str]
) -> dict[str, Tensor]:
    """Weight-rescaling augmentation: tensor ``names[k]`` times ``factors[:, k]`` (``factors``
    [P, len(names)], None for none), so the LO trains a reparametrised task."""
    if factors is None:
        return tensors
    column = {name: k for k, name in enumerate(names)}
    return {
        name: t * factors[:, column[name]].to(t).reshape(-1, *[1] * (t.dim() - 1))
        for name, t in tensors.items()
    }


def unroll_(
    task: InnerTask,
    meta_pop: dict[str, Tensor],
    params: dict[str, Tensor],
    states: dict[str, LF.LOState],
    steps: int,
    draw: Callable[[], tuple[Tensor, Tensor]],
    chunk_size: int = LF.DEFAULT_CHUNK_SIZE,
    factors: Tensor | None = None,
) -> Tensor:
    """Train the population ``steps`` steps with the LO, in place; return the pre-update
    minibatch losses ``[steps, P]``. ``meta_pop`` holds per-particle meta-parameters
    ``[P, ...]``; ``draw()`` gives each step's batch ``(x [P, B, ...], y [P, B, ...])``.
    ``factors`` [P, tensors] (columns in ``task.scales`` order): weight-rescaling augmentation
    (:func:`rescaled`): the model
    runs on ``factor * p`` and the LO sees ``p`` and the chain-rule gradient ``factor * grad``."""
    losses = []
    names = list(task.scales)
    meta_pop = LF.prepare(meta_pop)  # shared by every tensor and step of this unroll
    for _ in range(steps):
        x, y = draw()
        loss, grads = task.grads(rescaled(params, factors, names), x, y)
        grads = rescaled(grads, factors, names)
        with torch.no_grad():
            for name, p in params.items():
                LF.lo_step_(
                    meta_pop, states[name], p, grads[name], task.scales[name], task.step_mult,
                    chunk_size=chunk_size,
                )  # fmt: skip
        losses.append(loss.detach())
    if not losses:
        pop = next(iter(params.values())).shape[0]
        return torch.zeros(0, pop)
    return torch.stack(losses)


def _reset_slots_(params, states, slots: Tensor, init: dict[str, Tensor]) -> None:
    """Overwrite particles ``slots`` with ``init`` (``[len(slots), ...]``) and zero their state."""
    for name, p in params.items():
        p[slots] = init[name].to(p.dtype)
        st = states[name]
        for field in ("mv", "row", "col", "diag", "t", "horizon"):
            t = getattr(st, field)
            if t is not None:
                t[slots] = 0


# ---------------------------------------------------------------------------------------------
# One task slot with its population of pairs


class InnerProblem:
    """N antithetic pairs on one task, their inner runs and PES accumulators.

    State that is global (every rank holds all of it, identical): the generator, the data
    sampler, per-pair step counters, lengths, offsets, init seeds, ξ [N, D] and the current
    ε [N, D]. State that is local: the particles (params, LO states) of this rank's pairs
    ``[lo, hi)``; :meth:`state_dict` gathers them so a checkpoint holds the whole population.
    """

    def __init__(
        self,
        task: InnerTask,
        *,
        pairs: int = 8,
        sigma: float = 0.01,
        truncation: int = 50,
        min_length: int = 100,
        max_length: int = 1000,
        max_offset: int = 50,
        seed: int = 0,
        estimator: str = "pes",
        chunk_size: int = LF.DEFAULT_CHUNK_SIZE,
        rank: int = 0,
        world_size: int = 1,
        architecture: str = "small_fc_lopt",
        unknown_horizon: float = 0.25,
        augment: tuple[float, float] | None = None,
    ):
        if estimator not in ("pes", "es"):
            raise ValueError(f"unknown estimator {estimator!r}; choose 'pes' or 'es'")
        self.task = task
        self.arch = LF.architecture(architecture)
        self.num_meta = num_meta(self.arch)
        # v2 reads the run length T: known for a fraction 1 - unknown_horizon of the runs
        self.unknown_horizon = float(unknown_horizon)
        self.augment = None if augment is None else (float(augment[0]), float(augment[1]))
        self.pairs, self.sigma, self.truncation = int(pairs), float(sigma), int(truncation)
        self.min_length, self.max_length = int(min_length), int(max_length)
        self.max_offset, self.estimator = int(max_offset), estimator
        self.chunk_size = int(chunk_size)
        self.rank, self.world_size = rank, world_size
        self.lo, self.hi = pair_range(self.pairs, rank, world_size)
        self.dtype = task.dtype
        self.generator = torch.Generator().manual_seed(int(seed))
        self.batcher = task.make_batcher(int(draw_seeds(1, self.generator)))
        n, z = self.pairs, dict(dtype=torch.int64)
        self.counter, self.length = torch.zeros(n, **z), torch.zeros(n, **z)
        self.offset, self.init_seed = torch.zeros(n, **z), torch.zeros(n, **z)
        # the estimator's own arithmetic is float64 whatever the task's dtype
        self.xi = torch.zeros(n, self.num_meta, dtype=torch.float64)
        self.eps = torch.zeros(n, self.num_meta, dtype=torch.float64)
        self.factors: Tensor | None = None  # [N, tensors] augmentation factors, per pair
        self.truncations = 0
        self.runs_finished = 0
        self.params: dict[str, Tensor] = {}
        self.states: dict[str, LF.LOState] = {}
        if estimator == "pes":
            self._restart(torch.arange(n))

    @property
    def local_pairs(self) -> int:
        return self.hi - self.lo

    # -- randomness shared by all ranks ----------------------------------------------------

    def _draw_eps(self) -> Tensor:
        eps = torch.randn(self.pairs, self.num_meta, generator=self.generator, dtype=torch.float32)
        return eps.double()

    def _draw_batch(self) -> tuple[Tensor, Tensor]:
        """One batch per pair for all N pairs (every rank draws all), this rank's pairs
        repeated so both members of a pair see the same batch."""
        x, y = self.batcher.sample_population(self.pairs, self.task.batch_size, shared=False)
        x, y = x[self.lo : self.hi], y[self.lo : self.hi]
        return x.repeat_interleave(2, dim=0), y.repeat_interleave(2, dim=0)

    def _restart(self, idx: Tensor) -> None:
        """New inner runs for pairs ``idx``: init seeds, lengths, offsets (drawn for all of
        them on every rank), counter = offset, ξ = 0, fresh particles for the local ones."""
        m = len(idx)
        seeds = draw_seeds(m, self.generator)
        lengths = sample_lengths(m, self.min_length, self.max_length, self.generator)
        offsets = torch.randint(0, max(self.max_offset, 1), (m,), generator=self.generator)
        self.init_seed[idx], self.length[idx] = seeds, lengths
        self.offset[idx], self.counter[idx] = offsets, offsets
        self.xi[idx] = 0
        # a run lasts K * ceil((T - o) / K) steps of the LO's own clock: its horizon
        span = self.truncation * torch.ceil((lengths - offsets).clamp(min=1) / self.truncation)
        horizon = self._draw_horizons(span.long())
        self._draw_factors(idx)
        local = [
            (k, int(i), int(s))
            for k, (i, s) in enumerate(zip(idx, seeds, strict=True))
            if self.lo <= i < self.hi
        ]
        if not local:
            return
        seeds_local = [s for _, _, s in local]
        h_local = None if horizon is None else horizon[[k for k, _, _ in local]]
        if not self.params:  # first start: build the whole local population
            self.params, self.states = init_particles(self.task, seeds_local, horizon=h_local)
            return
        init, _ = init_particles(self.task, seeds_local)
        slots = torch.tensor([2 * (i - self.lo) + j for _, i, _ in local for j in (0, 1)])
        _reset_slots_(self.params, self.states, slots, init)
        if h_local is not None:
            for st in self.states.values():
                st.horizon[slots] = h_local.float().repeat_interleave(2).to(st.horizon.device)

    def _draw_horizons(self, lengths: Tensor) -> Tensor | None:
        """v2: the horizon each new run tells the LO (its length, or 0 = unknown with
        probability ``unknown_horizon``); None for v1 (which draws nothing, so its random
        streams are unchanged)."""
        if not self.arch.normalised:
            return None
        unknown = torch.rand(len(lengths), generator=self.generator) < self.unknown_horizon
        return torch.where(unknown, torch.zeros_like(lengths), lengths)

    def _draw_factors(self, idx: Tensor) -> None:
        """New augmentation factors for pairs ``idx``: per tensor, log-uniform in ``augment``."""
        if self.augment is None:
            return
        if self.factors is None:
            self.factors = torch.ones(self.pairs, len(self.task.scales), dtype=torch.float64)
        lo, hi = math.log(self.augment[0]), math.log(self.augment[1])
        u = torch.rand(
            len(idx), self.factors.shape[1], generator=self.generator, dtype=torch.float64
        )
        self.factors[idx] = torch.exp(lo + u * (hi - lo))

    def _local_factors(self) -> Tensor | None:
        if self.factors is None:
            return None
        return self.factors[self.lo : self.hi].repeat_interleave(2, dim=0).to(self.task.device)

    # -- estimators -------------------------------------------------------------------------

    def rows(self, theta: Tensor) -> tuple[Tensor, dict]:
        """This problem's estimator rows ``[N, D + 2]`` for meta-parameters ``theta`` [D]."""
        return self.pes_rows(theta) if self.estimator == "pes" else self.es_rows(theta)

    def _row_block(self, eps_or_xi: Tensor, losses: Tensor) -> Tensor:
        d = self.num_meta
        rows = torch.zeros(self.pairs, d + 2, dtype=torch.float64)
        if self.local_pairs:
            # float64 sums of float32 losses are exact, so the mean does not depend on how
            # many particles share the tensor (float32 reductions vectorise by width)
            loss = clip_meta_loss(losses.double().mean(0), self.task.loss_cap).cpu()
            plus, minus = loss[0::2], loss[1::2]
            block = rows[self.lo : self.hi]
            block[:, :d] = ((plus - minus) / (2 * self.sigma)).unsqueeze(1) * eps_or_xi
            block[:, d], block[:, d + 1] = plus, minus
        return rows

    def _run(self, theta, eps, params, states, steps) -> Tensor:
        if not self.local_pairs:
            for _ in range(steps):  # keep the data stream in step with the other ranks
                self._draw_batch()
            return torch.zeros(steps, 0)
        pop = antithetic(theta.detach().double().cpu(), eps[self.lo : self.hi], self.sigma)
        meta_pop = unflatten_meta(pop.to(self.task.device, self.dtype), self.arch)
        return unroll_(
            self.task, meta_pop, params, states, steps, self._draw_batch, self.chunk_size,
            factors=self._local_factors(),
        )  # fmt: skip

    def pes_rows(self, theta: Tensor) -> tuple[Tensor, dict]:
        """One truncation of K steps of every pair's persistent inner run (PES)."""
        eps = self._draw_eps()
        self.eps = eps
        self.xi += eps  # ξ includes this truncation's ε (see the module docstring)
        losses = self._run(theta, eps, self.params, self.states, self.truncation)
        rows = self._row_block(self.xi[self.lo : self.hi], losses)
        self.counter += self.truncation
        self.truncations += 1
        ended = torch.nonzero(self.counter >= self.length).flatten()
        self.runs_finished += len(ended)
        if len(ended):
            self._restart(ended)
        return rows, {"runs_finished": len(ended)}

    def es_rows(self, theta: Tensor) -> tuple[Tensor, dict]:
        """Fresh full unrolls of one shared length T ~ LogUniform[min, max] (antithetic ES)."""
        length = int(sample_lengths(1, self.min_length, self.max_length, self.generator))
        seeds = draw_seeds(self.pairs, self.generator)
        eps = self._draw_eps()
        self.eps = eps
        horizon = self._draw_horizons(torch.full((self.pairs,), length))
        self._draw_factors(torch.arange(self.pairs))
        params, states = {}, {}
        if self.local_pairs:
            local = slice(self.lo, self.hi)
            h_local = None if horizon is None else horizon[local]
            params, states = init_particles(self.task, seeds[local].tolist(), horizon=h_local)
        losses = self._run(theta, eps, params, states, length)
        self.truncations += 1
        return self._row_block(eps[self.lo : self.hi], losses), {"length": length}

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly; particle tensors cover all N pairs (gathered
        from every rank: in a distributed run, every rank must call this)."""
        local = {
            "params": {k: v.cpu() for k, v in self.params.items()},
            "states": {
                k: {f: t.cpu() for f, t in s.to_dict().items()} for k, s in self.states.items()
            },
        }
        blocks = [b for b in all_gather_objects(local) if b["params"]]
        if blocks:
            params = {k: torch.cat([b["params"][k] for b in blocks]) for k in blocks[0]["params"]}
            states = {
                k: {
                    f: torch.cat([b["states"][k][f] for b in blocks])
                    for f in blocks[0]["states"][k]
                }
                for k in blocks[0]["states"]
            }
        else:
            params, states = {}, {}
        return {
            "generator": self.generator.get_state(),
            "batcher": self.batcher.state_dict(),
            "counter": self.counter.clone(),
            "length": self.length.clone(),
            "offset": self.offset.clone(),
            "init_seed": self.init_seed.clone(),
            "xi": self.xi.clone(),
            "eps": self.eps.clone(),
            **({} if self.factors is None else {"factors": self.factors.clone()}),
            "truncations": self.truncations,
            "runs_finished": self.runs_finished,
            "params": params,
            "states": states,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (taking this rank's block of the particles)."""
        for key in ("counter", "length", "offset", "init_seed"):
            _check_shape(state[key], (self.pairs,), key)
        for key in ("xi", "eps"):
            _check_shape(state[key], (self.pairs, self.num_meta), key)
        new_params, new_states = {}, {}
        if self.estimator == "pes":
            names = set(self.params) if self.params else set(state["params"])
            if set(state["params"]) != names:
                raise ValueError(
                    f"particle tensors {sorted(state['params'])} do not match {sorted(names)}"
                )
            a, b = 2 * self.lo, 2 * self.hi
            for name, full in state["params"].items():
                if full.shape[0] != 2 * self.pairs:
                    raise ValueError(
                        f"particles of {name}: {full.shape[0]} in the checkpoint, "
                        f"{2 * self.pairs} expected"
                    )
                if name in self.params and full.shape[1:] != self.params[name].shape[1:]:
                    raise ValueError(
                        f"particles of {name}: shape {tuple(full.shape[1:])} in the checkpoint, "
                        f"{tuple(self.params[name].shape[1:])} expected"
                    )
                new_params[name] = full[a:b].to(self.task.device, self.dtype).clone()
                fields = {
                    f: t[a:b].to(self.task.device).clone() for f, t in state["states"][name].items()
                }
                new_states[name] = LF.LOState.from_dict(fields)
        self.generator.set_state(state["generator"])
        self.batcher.load_state_dict(state["batcher"])
        self.counter, self.length = state["counter"].clone(), state["length"].clone()
        self.offset, self.init_seed = state["offset"].clone(), state["init_seed"].clone()
        self.xi, self.eps = state["xi"].double().clone(), state["eps"].double().clone()
        factors = state.get("factors")
        self.factors = None if factors is None else factors.double().clone()
        self.truncations = int(state["truncations"])
        self.runs_finished = int(state["runs_finished"])
        if self.estimator == "pes" and self.local_pairs:
            self.params, self.states = new_params, new_states


def _check_shape(t, shape: tuple[int, ...], what: str) -> None:
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{what}: shape {got} in the checkpoint, {shape} expected")
