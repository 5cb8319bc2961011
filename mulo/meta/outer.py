"""The outer loop: AdamW on the LO's meta-parameters from PES/ES estimates (docs/math.md §3).

    cfg = MetaConfig(kind="mu", widths=[32], outer_steps=500)
    trainer = MetaTrainer(cfg)
    for _ in range(cfg.outer_steps):
        record = trainer.step()          # {"step", "meta_loss", "grad_norm", "lr", ...}
    trainer.evaluate(width=512)          # a fresh wider MLP trained by the current LO
    mulo.save_meta_weights("lo.pt", trainer.meta_params())

or, resumable from a checkpoint file: ``run_meta_training(trainer, "ckpt.pt", log=print)``.

One step: every inner problem (one per width, μLO_M style) returns its estimator rows, the rows
of all problems are summed over ranks in one ``all_reduce``, each problem's estimate is the mean
over its pairs, and the update direction is the mean over problems. AdamW (β 0.9/0.999,
decoupled weight decay) with linear warmup to ``lr_max`` then cosine decay to ``lr_min``
computes the step; the step itself (θ_new − θ_old, weight decay included) is rescaled to global
norm ``clip`` when longer (update clipping, not gradient clipping).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mulo import functional as LF
from mulo.meta import distributed as dist_utils
from mulo.meta.estimators import (
    InnerProblem,
    InnerTask,
    MLPTask,
    clip_meta_loss,
    draw_seeds,
    flatten_meta,
    init_particles,
    normalise_kind,
    num_meta,
    unflatten_meta,
    unroll_,
)
from mulo.meta.inner_tasks import ModuleTask
from mulo.meta_weights import check_meta_params, load_meta_weights

EVAL_SEED_BASE = 1_000_003  # held-out inits and batch streams: far from the training seeds


@dataclass
class MetaConfig:
    """Meta-training configuration (the Hydra ``meta`` config maps onto it field by field).

    ``kind`` "mu" (μLO) or "sp" (SP-LO); ``widths``: one inner problem per width, estimates
    averaged (μLO_M); ``pairs``: antithetic pairs per problem; ``truncation``: PES unroll K;
    inner lengths ~ LogUniform[``min_length``, ``max_length``], offsets in [0, ``max_offset``).
    ``eval_*``: the held-out evaluation (a fresh ``eval_width`` MLP, ``eval_seeds`` held-out
    inits, ``eval_steps`` steps) run every ``eval_every`` outer steps by
    :func:`run_meta_training` (0: never); ``checkpoint_every`` likewise.

    ``architecture``: ``small_fc_lopt`` (v1) or ``small_fc_lopt_v2``. ``tasks``: the task mix,
    one inner problem per entry ``{name: mlp|cnn|transformer, width, depth, weight, batch_size,
    context}`` (missing keys: ``depth``, ``batch_size`` from here, weight 1, context 64); the
    update direction is the weight-averaged estimate. Empty: one MLP per entry of ``widths``.
    ``unknown_horizon`` (v2): the fraction of inner runs whose length the LO is not told.
    ``augment``: ``[low, high]`` for weight-rescaling augmentation (each tensor of each inner
    run reparametrised by a log-uniform factor in that range), or None.
    ``outer_optimizer``: what updates θ from the estimate: ``adamw`` (default), ``self`` (the
    learned optimizer being meta-trained, at its current θ: it trains itself), or meta-weights
    (a shipped name or a file: a fixed learned optimizer). A learned outer optimizer runs as
    MuLO (``kind: mu``) or SPLO (``kind: sp``) with s_W = 1 on every meta-tensor, its lr
    following the same warmup + cosine factor as AdamW's (from 1 down to lr_min / lr_max).
    """

    kind: str = "mu"
    widths: list[int] = field(default_factory=lambda: [32])
    architecture: str = "small_fc_lopt"
    tasks: list[dict] = field(default_factory=list)
    unknown_horizon: float = 0.25
    augment: list[float] | None = None
    outer_optimizer: str = "adamw"
    depth: int = 3
    pairs: int = 8
    sigma: float = 0.01
    truncation: int = 50
    min_length: int = 100
    max_length: int = 1000
    max_offset: int = 50
    batch_size: int = 128
    outer_steps: int = 1000
    lr_max: float = 3e-3
    lr_min: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    clip: float = 1.0
    estimator: str = "pes"
    seed: int = 0
    # elements per particle per chunk of the LO step; the population's buffers are 2N times
    # that, so it is smaller than the single-model default (4096 was fastest at widths 32-128)
    chunk_size: int = 4096
    dataset: str = "fashion_mnist"
    data_root: str | None = None
    image_pool: int = 2
    device: str = "cpu"
    eval_width: int = 256
    eval_steps: int = 1000
    eval_seeds: int = 2
    eval_every: int = 0
    checkpoint_every: int = 50

    # Fields a checkpoint resumes across: they do not change the trajectory, except
    # ``outer_steps``: a longer run continues from the checkpoint with the cosine decay
    # stretched to the new length (from the next step on).
    NON_TRAJECTORY = (
        "outer_steps",
        "chunk_size",
        "data_root",
        "device",
        "eval_width",
        "eval_steps",
        "eval_seeds",
        "eval_every",
        "checkpoint_every",
    )

    # Fields added after v1: a checkpoint written before them matches while they keep these
    NEW_DEFAULTS = {
        "architecture": "small_fc_lopt",
        "tasks": [],
        "unknown_horizon": 0.25,
        "augment": None,
        "outer_optimizer": "adamw",
    }
    TASK_KEYS = ("name", "width", "depth", "weight", "batch_size", "context")

    def __post_init__(self):
        self.kind = normalise_kind(self.kind)
        self.architecture = LF.architecture(self.architecture).name
        if isinstance(self.widths, (int, str)):
            self.widths = [self.widths]
        self.widths = [int(w) for w in self.widths]
        self.tasks = [self._task_entry(t) for t in (self.tasks or [])]
        if not 0 <= float(self.unknown_horizon) <= 1:
            raise ValueError(f"unknown_horizon must be in [0, 1], got {self.unknown_horizon!r}")
        if self.augment is not None:
            aug = [float(a) for a in self.augment]
            if len(aug) != 2 or not (0 < aug[0] <= aug[1] < math.inf):
                raise ValueError(f"augment must be [low, high] with 0 < low <= high, got {aug}")
            self.augment = aug
        if not (isinstance(self.outer_optimizer, str) and self.outer_optimizer.strip()):
            raise ValueError(
                "outer_optimizer must be adamw, self, or a meta-weights name or file, got "
                f"{self.outer_optimizer!r}"
            )
        if self.estimator not in ("pes", "es"):
            raise ValueError(f"unknown estimator {self.estimator!r}; choose 'pes' or 'es'")
        positive = dict(
            depth=self.depth, pairs=self.pairs, truncation=self.truncation,
            min_length=self.min_length, batch_size=self.batch_size, image_pool=self.image_pool,
            chunk_size=self.chunk_size, eval_seeds=self.eval_seeds,
        )  # fmt: skip
        if not self.widths:
            raise ValueError("widths must list at least one width")
        for w in self.widths:
            positive[f"width {w}"] = w
        for key, value in positive.items():
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("outer_steps", "warmup", "max_offset", "eval_width", "eval_steps"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        for key in ("eval_every", "checkpoint_every"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if self.max_length < self.min_length:
            raise ValueError(
                f"max_length ({self.max_length}) must be >= min_length ({self.min_length})"
            )
        if not (self.sigma > 0 and self.lr_max > 0 and self.lr_min >= 0 and self.clip > 0):
            raise ValueError("sigma, lr_max and clip must be > 0 and lr_min >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def _task_entry(self, entry) -> dict:
        entry = dict(entry)
        unknown = sorted(set(entry) - set(self.TASK_KEYS))
        if unknown or "name" not in entry or "width" not in entry:
            raise ValueError(
                f"a meta-training task needs name and width (keys: {', '.join(self.TASK_KEYS)}); "
                f"got {entry}"
            )
        if entry["name"] not in ("mlp", "cnn", "transformer"):
            raise ValueError(
                f"unknown meta-training task {entry['name']!r}; valid: mlp, cnn, transformer"
            )
        out = {
            "name": str(entry["name"]),
            "width": int(entry["width"]),
            "depth": int(entry.get("depth", self.depth)),
            "weight": float(entry.get("weight", 1.0)),
            "batch_size": int(entry.get("batch_size", self.batch_size)),
        }
        if out["name"] == "transformer":
            out["context"] = int(entry.get("context", 64))
        for key in ("width", "depth", "batch_size"):
            if out[key] < 1:
                raise ValueError(f"task {out['name']}: {key} must be >= 1, got {out[key]}")
        if not out["weight"] > 0:
            raise ValueError(f"task {out['name']}: weight must be > 0, got {out['weight']}")
        return out

    def task_specs(self) -> list[dict]:
        """One entry per inner problem: ``tasks``, or an MLP per width."""
        if self.tasks:
            return list(self.tasks)
        return [
            {"name": "mlp", "width": w, "depth": self.depth, "weight": 1.0,
             "batch_size": self.batch_size}
            for w in self.widths
        ]  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> MetaConfig:
        """Build from a mapping (e.g. a Hydra/OmegaConf node); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown meta-training config keys {unknown}; valid: {', '.join(sorted(names))}"
            )

        def plain(k, v):
            if k in ("widths", "augment") and v is not None:
                return list(v)
            if k == "tasks":
                return [dict(t) for t in (v or [])]
            return v

        return cls(**{k: plain(k, v) for k, v in values.items()})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fingerprint(self) -> dict:
        """The fields a checkpoint must agree on to continue the run."""
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in self.NON_TRAJECTORY
            and not (k in self.NEW_DEFAULTS and v == self.NEW_DEFAULTS[k])
        }


class WarmupCosine:
    """LambdaLR factor: linear warmup to 1 over ``warmup`` steps, then cosine to ``floor``
    (= lr_min / lr_max) at ``total`` steps (a callable object, so LambdaLR can save it)."""

    def __init__(self, warmup: int, total: int, floor: float):
        self.warmup, self.total, self.floor = int(warmup), int(total), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _derived_seed(seed: int, index: int) -> int:
    """A reproducible seed for sub-stream ``index`` (inner problem ``index``) of a run."""
    return int(draw_seeds(index + 1, torch.Generator().manual_seed(int(seed)))[-1])


class MetaTrainer:
    """Meta-trains the small_fc_lopt meta-parameters θ (flat [2409]) on one or more widths.

    Args:
        config: the :class:`MetaConfig`.
        task_factory: ``width -> InnerTask``; default: :meth:`MLPTask.from_dataset` with the
            config's depth, kind, dataset and batch size. Called for every training width
            and (lazily) for ``eval_width``.
        meta_init: starting meta-parameters (a dict, or a meta-weights file / shipped name);
            default the meta-initialisation seeded with ``config.seed``.
        rank, world_size: default: from the initialised process group, else (0, 1).
    """

    def __init__(
        self,
        config: MetaConfig,
        task_factory: Callable[[int], InnerTask] | None = None,
        *,
        meta_init: dict[str, Tensor] | str | Path | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        torch.set_flush_denormal(True)  # decaying accumulators turn denormal: 10x slower without
        self.config = cfg = config
        if rank is None:
            rank, world_size = dist_utils.world()
        self.rank, self.world_size = int(rank), int(world_size or 1)
        self.device = torch.device(cfg.device)
        self._factory = task_factory
        self.specs = cfg.task_specs()
        self.tasks = [self._make_task(spec) for spec in self.specs]
        self.arch = LF.architecture(cfg.architecture)
        self.num_meta = num_meta(self.arch)
        self._eval_tasks: dict[int, InnerTask] = {}
        self.problems = [
            InnerProblem(
                task,
                pairs=cfg.pairs,
                sigma=cfg.sigma,
                truncation=cfg.truncation,
                min_length=cfg.min_length,
                max_length=cfg.max_length,
                max_offset=cfg.max_offset,
                seed=_derived_seed(cfg.seed, i),
                estimator=cfg.estimator,
                chunk_size=cfg.chunk_size,
                rank=self.rank,
                world_size=self.world_size,
                architecture=cfg.architecture,
                unknown_horizon=cfg.unknown_horizon,
                augment=cfg.augment,
            )
            for i, task in enumerate(self.tasks)
        ]
        if meta_init is None:
            meta_init = LF.init_meta_params(
                generator=torch.Generator().manual_seed(cfg.seed),
                architecture=cfg.architecture,
                kind=cfg.kind,
            )
        elif not isinstance(meta_init, dict):  # a meta-weights file or shipped name
            meta_init, _ = load_meta_weights(meta_init)
        check_meta_params(meta_init, "meta_init", self.arch.name)
        theta = flatten_meta({k: v.detach().float() for k, v in meta_init.items()})
        self.theta = torch.nn.Parameter(theta.to(self.device).clone())
        self._outer_params: list[torch.nn.Parameter] | None = None
        self.optimizer = self._outer_optimizer(meta_init)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule())
        self.outer_step = 0

    def _outer_optimizer(self, meta_init: dict[str, Tensor]) -> torch.optim.Optimizer:
        """AdamW on θ, or a learned optimizer over θ's meta-tensors (one parameter each, so
        each gets its own per-tensor normalisation), kept in ``_outer_params``."""
        cfg = self.config
        if cfg.outer_optimizer == "adamw":
            return torch.optim.AdamW(
                [self.theta], lr=cfg.lr_max, betas=(0.9, 0.999), weight_decay=cfg.weight_decay
            )
        from mulo.optim import SPLO, MuLO  # mulo.optim imports mulo.meta_weights, not this

        weights = dict(meta_init) if cfg.outer_optimizer == "self" else cfg.outer_optimizer
        self._outer_params = [  # in θ's (flatten) order
            torch.nn.Parameter(v.clone())
            for v in unflatten_meta(self.theta.detach(), self.arch).values()
        ]
        cls = MuLO if cfg.kind == "mu" else SPLO
        groups = [{"params": self._outer_params, "role": "input"}]  # s_W = 1 for each
        return cls(groups, meta_weights=weights, lr=1.0, total_steps=max(1, cfg.outer_steps))

    def _lo_outer_step(self, grad: Tensor) -> None:
        """θ <- the learned outer optimizer's step from the estimate ``grad``."""
        meta = unflatten_meta(self.theta.detach(), self.arch)
        if self.config.outer_optimizer == "self":  # the LO being trained, at its current θ
            self.optimizer.meta = {k: v.detach().cpu().clone() for k, v in meta.items()}
        for p, value, g in zip(
            self._outer_params, meta.values(), unflatten_meta(grad, self.arch).values(),
            strict=True,
        ):  # fmt: skip
            p.data.copy_(value)
            p.grad = g.to(p)
        self.optimizer.step()
        with torch.no_grad():
            self.theta.copy_(torch.cat([p.detach().reshape(-1) for p in self._outer_params]))
        for p in self._outer_params:
            p.grad = None

    def _schedule(self) -> WarmupCosine:
        cfg = self.config
        return WarmupCosine(cfg.warmup, cfg.outer_steps, cfg.lr_min / cfg.lr_max)

    def _make_task(self, spec: dict) -> InnerTask:
        """The inner task of one task-mix entry (the ``task_factory``, if given, builds MLPs
        from a width)."""
        cfg = self.config
        if self._factory is not None:
            return self._factory(spec["width"])
        if spec["name"] == "mlp":
            return MLPTask.from_dataset(
                spec["width"], spec["depth"], cfg.kind, dataset=cfg.dataset,
                data_root=cfg.data_root, image_pool=cfg.image_pool,
                batch_size=spec["batch_size"], device=cfg.device,
            )  # fmt: skip
        image = spec["name"] == "cnn"
        return ModuleTask.from_name(
            spec["name"], spec["width"], spec["depth"], cfg.kind,
            dataset=cfg.dataset if image else None, data_root=cfg.data_root if image else None,
            image_pool=cfg.image_pool, batch_size=spec["batch_size"],
            context=spec.get("context", 64), device=cfg.device,
        )  # fmt: skip

    # -- the estimate and the step ----------------------------------------------------------

    def meta_params(self) -> dict[str, Tensor]:
        """The current meta-parameters as the dict ``MuLO/SPLO(meta_weights=...)`` takes."""
        meta = unflatten_meta(self.theta.detach(), self.arch)
        return {k: v.detach().cpu().clone() for k, v in meta.items()}

    def estimate(self) -> tuple[Tensor, dict]:
        """The averaged meta-gradient estimate [D] at the current θ (advances the inner runs)
        and per-problem statistics. Collective in a distributed run."""
        theta = self.theta.detach()
        blocks, infos = [], []
        for problem in self.problems:
            rows, info = problem.rows(theta)
            blocks.append(rows.to(torch.float64))
            infos.append(info)
        # [tasks, N, D + 2] on the trainer's device (nccl reduces CUDA tensors only)
        rows = dist_utils.all_reduce_sum_(torch.stack(blocks).to(self.device))
        d = self.num_meta
        per_task = rows[:, :, :d].sum(1) / self.config.pairs
        weights = torch.tensor([s["weight"] for s in self.specs], dtype=per_task.dtype)
        weights = (weights / weights.sum()).to(per_task.device)
        grad = (weights[:, None] * per_task).sum(0)
        stats: dict = {}
        losses = rows[:, :, d:].mean(dim=(1, 2))  # mean of L+ and L- over pairs
        keys = self.task_keys()
        for key, loss, info in zip(keys, losses.tolist(), infos, strict=True):
            stats[f"meta_loss/{key}"] = loss
            for k, v in info.items():
                stats[f"{k}/{key}"] = v
        stats["meta_loss"] = float(losses.mean())
        return grad.to(self.theta.dtype), stats

    def step(self) -> dict:
        """One outer step; returns the record to log."""
        start = time.perf_counter()
        grad, stats = self.estimate()
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).to(self.theta.device)
        lr = self.optimizer.param_groups[0]["lr"]
        old = self.theta.detach().clone()
        if self._outer_params is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.theta.grad = grad
            self.optimizer.step()
        else:
            self._lo_outer_step(grad)
        with torch.no_grad():
            delta = self.theta - old
            norm = float(torch.linalg.vector_norm(delta))
            if norm > self.config.clip:
                self.theta.copy_(old + delta * (self.config.clip / norm))
        self.theta.grad = None
        self.scheduler.step()
        self.outer_step += 1
        return {
            "step": self.outer_step,
            **stats,
            "grad_norm": float(torch.linalg.vector_norm(grad)),
            "update_norm": min(norm, self.config.clip),
            "update_clipped": norm > self.config.clip,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }

    def task_keys(self) -> list[str]:
        """Log names of the inner problems: ``w<width>`` (``w<width>_<i>`` if repeated)."""
        keys = []
        for i, task in enumerate(self.tasks):
            describe = task.describe()
            name = describe.get("task", "task")
            key = f"w{describe['width']}" if "width" in describe else name
            key = key if name in ("mlp", "task") else f"{name}_{key}"
            keys.append(key if key not in keys else f"{key}_{i}")
        return keys

    # -- evaluation ---------------------------------------------------------------------------

    def eval_task(self, width: int) -> InnerTask:
        if width not in self._eval_tasks:
            cfg = self.config
            spec = {"name": "mlp", "width": width, "depth": cfg.depth, "batch_size": cfg.batch_size}
            self._eval_tasks[width] = self._make_task(spec)
        return self._eval_tasks[width]

    @torch.no_grad()
    def evaluate(
        self,
        width: int | None = None,
        steps: int | None = None,
        seeds: int | Sequence[int] | None = None,
        task: InnerTask | None = None,
    ) -> dict:
        """Train fresh models with the current LO (no perturbation) and report the means over
        ``seeds`` (held-out init/batch seeds; an int n means n held-out seeds).

        Returns ``meta_loss`` (clipped mean pre-update train loss over the run: the
        meta-objective on fresh runs), ``final_train_loss`` (mean of the last 10% of steps,
        inf if diverged), ``diverged`` (fraction of runs with a non-finite loss) and the task's
        held-out metrics (``test_loss``, ``test_accuracy``). Uses its own generators, so it
        never disturbs the training streams.
        """
        cfg = self.config
        width = cfg.eval_width if width is None else int(width)
        steps = cfg.eval_steps if steps is None else int(steps)
        if seeds is None:
            seeds = cfg.eval_seeds
        if isinstance(seeds, int):
            seeds = [EVAL_SEED_BASE + i for i in range(seeds)]
        task = task or self.eval_task(width)
        seeds = [int(s) for s in seeds]
        pop = len(seeds)
        # all seeds as one population (each its own init and batches; P = 1 uses the kernel)
        meta = {k: v.to(task.device, task.dtype) for k, v in self.meta_params().items()}
        meta = {k: v.expand(pop, *v.shape).contiguous() for k, v in meta.items()}
        # v2 is told the run length, as a user passing total_steps would
        horizon = torch.full((pop,), steps) if self.arch.normalised else None
        params, states = init_particles(task, seeds, copies=1, horizon=horizon)
        batcher = task.make_batcher(seeds[0] + EVAL_SEED_BASE)
        draw = lambda: batcher.sample_population(pop, task.batch_size, shared=False)  # noqa: E731
        losses = unroll_(task, meta, params, states, steps, draw, cfg.chunk_size).double().cpu()
        finite = torch.isfinite(losses).all(0)
        tail = losses[-max(1, steps // 10) :].mean(0) if steps else losses.sum(0)
        out = {
            "meta_loss": clip_meta_loss(losses.mean(0), task.loss_cap).mean().item(),
            "final_train_loss": torch.where(finite, tail, math.inf).mean().item(),
            "diverged": (~finite).double().mean().item(),
        }
        out.update({k: v.double().mean().item() for k, v in task.evaluate(params).items()})
        return {"width": width, "steps": steps, "seeds": pop, **out}

    # -- state --------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        return {
            **self.config.fingerprint(),
            "num_meta_params": self.num_meta,
            "tasks": [t.describe() for t in self.tasks],
        }

    def state_dict(self) -> dict:
        """θ, AdamW + schedule state, every problem's full state (all ranks must call it)."""
        return {
            "outer_step": self.outer_step,
            "theta": self.theta.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "problems": [p.state_dict() for p in self.problems],
        }

    def load_state_dict(self, state: dict) -> None:
        theta = state["theta"]
        if not isinstance(theta, Tensor) or tuple(theta.shape) != (self.num_meta,):
            raise ValueError(f"theta must be a [{self.num_meta}] tensor")
        if len(state["problems"]) != len(self.problems):
            raise ValueError(
                f"{len(state['problems'])} inner problems in the checkpoint, "
                f"{len(self.problems)} configured"
            )
        for problem, sub in zip(self.problems, state["problems"], strict=True):
            problem.load_state_dict(sub)
        with torch.no_grad():
            self.theta.copy_(theta.to(self.theta.device, self.theta.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # LambdaLR restored the saved schedule's fields; the configured run length wins (the
        # same values, hence the same learning rates, unless outer_steps was changed)
        schedule = self.scheduler.lr_lambdas[0]
        schedule.__dict__.update(self._schedule().__dict__)
        step = self.scheduler.last_epoch
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.outer_step = int(state["outer_step"])


def run_meta_training(
    trainer: MetaTrainer,
    checkpoint: str | None = None,
    *,
    log: Callable[[dict], None] | None = None,
    steps: int | None = None,
) -> dict | None:
    """Run until ``config.outer_steps`` (or ``steps`` more), resumable.

    With ``checkpoint``: if the file exists the run continues from it (a corrupt or mismatched
    file raises ``CheckpointError``; it never restarts silently), and it is rewritten every
    ``config.checkpoint_every`` steps and at the end. Every ``config.eval_every`` steps the
    record gets ``eval/...`` entries from :meth:`MetaTrainer.evaluate` (rank 0 only). ``log``
    is called with each step's record on rank 0. Returns the last record.
    """
    from mulo.meta.checkpoint import check_resumable, load_checkpoint, save_checkpoint

    cfg = trainer.config
    log = log or (lambda record: None)
    if checkpoint is not None:
        check_resumable(checkpoint)
        if Path(checkpoint).exists():
            load_checkpoint(checkpoint, trainer)
            if trainer.rank == 0:
                # no "step" key: the records of steps <= at_step are already in the log
                log({"resumed_from": str(checkpoint), "at_step": trainer.outer_step})
    end = cfg.outer_steps if steps is None else min(cfg.outer_steps, trainer.outer_step + steps)
    record = None
    while trainer.outer_step < end:
        record = trainer.step()
        n = trainer.outer_step
        if cfg.eval_every and cfg.eval_width and n % cfg.eval_every == 0 and trainer.rank == 0:
            record.update({f"eval/{k}": v for k, v in trainer.evaluate().items()})
        if trainer.rank == 0:
            log(record)
        if checkpoint is not None and (
            (cfg.checkpoint_every and n % cfg.checkpoint_every == 0) or n == end
        ):
            save_checkpoint(checkpoint, trainer)
    return record
