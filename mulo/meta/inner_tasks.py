"""Population-batched inner tasks for any ``nn.Module``: the CNN and transformer LM (and the MLP)
as meta-training task slots (docs/math.md §3).

:class:`ModulePopulation` holds P independently initialised copies of a module as stacked
``{name: [P, *shape]}`` tensors (names from ``module.named_parameters()``) and computes all P
losses and gradients in one batched computation: ``torch.func.vmap`` over
``torch.func.functional_call`` of one template module. :class:`ModuleTask` wraps it as an
:class:`~mulo.meta.estimators.InnerTask` (the protocol of ``MLPTask``)::

    task = ModuleTask.from_name("cnn", width=32, depth=3, kind="mu")  # Fashion-MNIST 14x14
    params = task.init_params(seed=0)            # {name: [1, ...]}, as build_task(seed=0) builds
    x, y = task.make_batcher(0).sample_population(16, task.batch_size, shared=False)
    loss, grads = task.grads(params_for_16, x, y)                  # [16], {name: [16, ...]}

Why this is exact. ``functional_call`` runs the template's own ``forward`` with the given
tensors in place of its parameters, so everything that is not a parameter stays as built: the
μP readout multiplier (``parametrizations.Readout`` caches ``output_mult / width`` as a plain
float) and the attention scale (``CausalSelfAttention.scale``, a float) apply to every particle.
Buffers, if any, are the template's and are shared by all particles (modules that update
buffers in the forward, e.g. BatchNorm in train mode, are not supported; nor is dropout, since
vmap refuses random ops by default).

Attention. ``F.scaled_dot_product_attention`` on CPU dispatches to a flash kernel that has no
vmap batching rule, so functorch runs it once per particle inside the otherwise batched
computation (its "performance drop" warning is silenced here). That measured as fast as or
faster than the MATH backend, whose matmul/softmax decomposition does vmap natively but runs
the q·k products as thousands of tiny d_head-deep matmuls; ``sdpa_math=True`` selects it.

CPU speed (2-core AMD EPYC VM, 1 thread, P = 16, seconds per ``grads`` call, best of 4-7; the
machine was shared with other jobs, so ±30%): MLP width 64 ~0.008 (hand-batched ``MLPTask``
~0.007), CNN width 16 ~0.33, CNN width 32 ~1.1-1.4, transformer width 32 / 64 (depth 2, context
64, batch 32) ~0.9 / ~0.9-1.5. That is about as fast as a plain loop over 16 modules, not
faster: at these sizes each particle's ops are already large, and the cost is memory traffic
(fresh multi-10-MB activations page-fault on this VM). ``chunk_size`` (vmap's: that many
particles at a time, same result) cuts the peak activation size: ``chunk_size=4`` took the CNN
at width 32 to ~0.7 s and the transformer at width 64 to ~0.8 s, and changed nothing for the
CNN at width 16 or the transformer at width 32. The default stays unchunked (one batched
computation, what a GPU wants).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import parametrizations as P
from mulo import data as D
from mulo import functional as LF
from mulo.meta.estimators import KINDS, normalise_kind
from mulo.tasks import EVAL_TOKENS, TASK_NAMES, build_task

GRAD_METHODS = ("autograd", "vmap_grad")
# held-out evaluation: at most this many (particle, example) pairs per forward for images; text
# uses mulo.tasks.EVAL_TOKENS (particle, token) pairs per forward
EVAL_EXAMPLES = 4096
EVAL_IMAGES, EVAL_WINDOWS = 2000, 256  # default held-out sizes of ModuleTask.from_name
_SDPA_FALLBACK = (
    "There is a performance drop because we have not yet implemented the batching rule for "
    "aten::_scaled_dot_product"
)


def build_module(builder: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``builder()`` after ``torch.manual_seed(seed)``, without touching the caller's RNG (as
    ``mulo.tasks.build_task`` seeds its model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return builder()


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over all predictions (``[B, V]`` vs ``[B]``, ``[B, L, V]`` vs
    ``[B, L]``), as ``mulo.tasks.Task.loss``."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class ModulePopulation:
    """P independently initialised copies of ``builder()``, stacked.

    ``params`` maps ``named_parameters()`` names to ``[P, *shape]`` tensors; copy ``i`` is the
    module built after ``torch.manual_seed(seed + i)`` (the global RNG is left as it was). The
    methods take any params dict of that form (any P), so an optimizer can step it
    functionally; inputs are per particle, ``x [P, B, ...]`` / ``y [P, B, ...]``, or one batch
    for all with ``shared=True`` (``x [B, ...]`` / ``y [B, ...]``):

    - :meth:`logits` ``-> [P, B, ..., out]``;
    - :meth:`loss` ``-> [P]`` per-copy mean cross-entropy over all predictions;
    - :meth:`grads` ``-> (loss [P] detached, {name: [P, *shape]})``;
    - :meth:`metrics` ``-> (loss [P], accuracy [P])`` from one forward, no grad.

    ``grad_method``: ``"vmap_grad"`` (default) is ``vmap(grad_and_value(loss))``;
    ``"autograd"`` runs the vmapped forward and one ``torch.autograd.grad`` of the summed
    losses (the copies are independent, so each slice of the gradient is that copy's own).
    Same numbers. On CPU (1 thread, P = 16) neither won consistently within the noise of a
    shared machine: vmap-of-grad was ahead for the transformer at width 32 in 3 of 4 runs
    (~0.9 vs ~1.0-1.2 s), the CNN and the width-64 transformer went either way, the MLP at
    width 64 was ~8 vs ~10 ms. ``"autograd"`` keeps the cross-entropy outside the vmap;
    ``"vmap_grad"`` runs it inside, as a Python decomposition (its first call imports sympy).
    ``chunk_size`` is vmap's (see the module docstring);
    ``sdpa_math`` runs attention under the MATH SDPA backend.
    """

    def __init__(
        self,
        builder: Callable[[], nn.Module],
        population: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
        grad_method: str = "vmap_grad",
        chunk_size: int | None = None,
        sdpa_math: bool = False,
    ):
        if int(population) < 1:
            raise ValueError(f"population must be a positive integer, got {population!r}")
        if grad_method not in GRAD_METHODS:
            raise ValueError(f"unknown grad_method {grad_method!r}; choose {GRAD_METHODS}")
        self.builder, self.population, self.seed = builder, int(population), int(seed)
        self.device = torch.device(device)
        self.grad_method, self.chunk_size = grad_method, chunk_size
        self.sdpa_math = bool(sdpa_math)
        models = [build_module(builder, self.seed + i) for i in range(self.population)]
        self.template = models[0].to(self.device)
        self.names = [n for n, _ in self.template.named_parameters()]
        self.buffers = {n: b for n, b in self.template.named_buffers()}
        named = [dict(m.named_parameters()) for m in models]
        self.params = {
            n: torch.stack([d[n].detach() for d in named]).to(self.device) for n in self.names
        }

    # -- the per-particle function and its vmaps ------------------------------------------

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.template, (params, self.buffers), (x,), strict=True)

    def _loss_one(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return _cross_entropy(self._forward(params, x), y)

    @contextlib.contextmanager
    def _context(self):
        with warnings.catch_warnings():
            # vmap runs the CPU flash-attention kernel once per particle (no batching rule)
            warnings.filterwarnings("ignore", message=_SDPA_FALLBACK, category=UserWarning)
            if self.sdpa_math:
                with sdpa_kernel(SDPBackend.MATH):
                    yield
            else:
                yield

    def _in_dims(self, shared: bool) -> tuple:
        return (0, None, None) if shared else (0, 0, 0)

    def _check(self, params: dict[str, Tensor]) -> None:
        if set(params) != set(self.names):
            missing = sorted(set(self.names) - set(params))
            extra = sorted(set(params) - set(self.names))
            raise ValueError(f"params do not match the module: missing {missing}, extra {extra}")

    def logits(self, params: dict[str, Tensor], x: Tensor, shared: bool = False) -> Tensor:
        """Model outputs ``[P, B, ..., out]`` for all copies in one vmapped forward."""
        self._check(params)
        in_dims = (0, None) if shared else (0, 0)
        with self._context():
            return vmap(self._forward, in_dims=in_dims, chunk_size=self.chunk_size)(params, x)

    def loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor, shared: bool = False) -> Tensor:
        """Per-copy mean cross-entropy ``[P]`` (differentiable). The cross-entropy runs outside
        the vmap on the ``[P, ...]`` logits: under vmap it has no batching rule and runs as a
        Python decomposition."""
        out = self.logits(params, x, shared=shared)
        pop = out.shape[0]
        y = y.expand(pop, *y.shape) if shared else y
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        return per.view(pop, -1).mean(1)

    def grads(
        self, params: dict[str, Tensor], x: Tensor, y: Tensor, shared: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss [P] detached, {name: grad [P, *shape]})`` in one batched computation (also
        under an outer ``torch.no_grad``)."""
        self._check(params)
        with torch.enable_grad(), self._context():
            if self.grad_method == "vmap_grad":
                fn = vmap(
                    grad_and_value(self._loss_one),
                    in_dims=self._in_dims(shared),
                    chunk_size=self.chunk_size,
                )
                grads, loss = fn({k: v.detach() for k, v in params.items()}, x, y)
                return loss.detach(), {n: grads[n] for n in params}
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss = self.loss(leaves, x, y, shared=shared)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return loss.detach(), dict(zip(leaves, grads, strict=True))

    @torch.no_grad()
    def metrics(
        self, params: dict[str, Tensor], x: Tensor, y: Tensor, shared: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(mean cross-entropy [P], accuracy [P])`` over all predictions, one forward."""
        out = self.logits(params, x, shared=shared)
        pop = out.shape[0]
        y = y.expand(pop, *y.shape) if shared else y
        flat = out.reshape(pop, -1, out.shape[-1])
        targets = y.reshape(pop, -1)
        per = F.cross_entropy(flat.reshape(-1, flat.shape[-1]).float(), targets.reshape(-1),
                              reduction="none")  # fmt: skip
        loss = per.view(pop, -1).mean(1)
        accuracy = (flat.argmax(-1) == targets).float().mean(1)
        return loss, accuracy

    @torch.no_grad()
    def accuracy(
        self, params: dict[str, Tensor], x: Tensor, y: Tensor, shared: bool = False
    ) -> Tensor:
        return self.metrics(params, x, y, shared=shared)[1]

    def module(self, index: int, params: dict[str, Tensor] | None = None) -> nn.Module:
        """Copy ``index`` as an ordinary module (parameters copied, not shared)."""
        params = self.params if params is None else params
        model = build_module(self.builder, 0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name][index])
        return model.to(self.device)


# ---------------------------------------------------------------------------------------------
# The inner task


def _family_builder(name: str, task, width: int, depth: int, context: int, output_mult: float):
    """The zero-arg builder ``mulo.tasks.build_task`` uses for ``name`` (mirrored here; the
    tests check that the inits agree with ``build_task(..., seed=s).model``)."""
    scheme = task.parametrization
    if name == "transformer":
        return functools.partial(
            P.transformer_lm, 256, width, depth, context=context, parametrization=scheme,
            output_mult=output_mult,
        )  # fmt: skip
    x = task.batcher.x
    if name == "mlp":
        return functools.partial(
            P.mlp, x.shape[1], width, depth, task.num_classes, parametrization=scheme,
            output_mult=output_mult,
        )  # fmt: skip
    return functools.partial(
        P.cnn, x.shape[1], width, depth, task.num_classes, x.shape[-1], scheme,
        output_mult=output_mult,
    )  # fmt: skip


class ModuleTask:
    """An inner task slot (the ``InnerTask`` protocol of ``mulo.meta.estimators``) for any
    module family: ``builder()`` builds one model (already initialised under the
    parametrization of ``kind``: "mu" = μP, "sp" = SP).

    ``train`` is ``(x_train [N, ...], y_train [N])`` for classification (batches from
    ``mulo.data.TensorBatcher``) or a 1-D byte/token stream for language modelling with
    ``context`` (``mulo.data.TextBatcher``: x, y ``[B, context]``). ``x_test`` / ``y_test`` are
    the held-out examples of :meth:`evaluate`. Use :meth:`from_name` for the ``mulo.tasks``
    families.
    """

    def __init__(
        self,
        builder: Callable[[], nn.Module],
        kind: str,
        train: tuple[Tensor, Tensor] | Tensor,
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        *,
        num_classes: int,
        batch_size: int = 128,
        context: int | None = None,
        name: str = "module",
        width: int = 0,
        depth: int = 0,
        dataset: str = "tensors",
        device: str | torch.device = "cpu",
        grad_method: str = "vmap_grad",
        chunk_size: int | None = None,
        info: dict | None = None,
    ):
        self.kind = normalise_kind(kind)
        self.parametrization = KINDS[self.kind]
        self.step_mult = LF.STEP_MULT_MU if self.kind == "mu" else LF.STEP_MULT_SP
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.builder, self.name = builder, str(name)
        self.width, self.depth, self.batch_size = int(width), int(depth), int(batch_size)
        self.dataset, self.info = dataset, dict(info or {})
        self.num_classes = int(num_classes)
        if isinstance(train, Tensor):
            if context is None:
                raise ValueError("a token stream as train data needs a context length")
            self.text, self.context = train.to(self.device), int(context)
            self.x_train = self.y_train = None
            self.train_size = len(self.text)
        else:
            x_train, y_train = train
            self.text, self.context = None, None if context is None else int(context)
            self.x_train, self.y_train = x_train.to(self.device), y_train.to(self.device)
            self.train_size = len(self.x_train)
        if x_test is None:
            x_test = torch.zeros(0, *(self.x_train.shape[1:] if self.text is None else ()))
            y_test = torch.zeros(0, dtype=torch.long)
        self.x_test, self.y_test = x_test.to(self.device), y_test.long().to(self.device)
        self.template = ModulePopulation(
            builder, 1, seed=0, device=self.device, grad_method=grad_method, chunk_size=chunk_size
        )
        module = self.template.template
        for name_, p in module.named_parameters():
            if p.dtype != self.dtype:
                raise ValueError(f"parameter {name_} is {p.dtype}, expected {self.dtype}")
        self.scales = P.get(self.parametrization).update_scales(module)
        self.loss_cap = 1.5 * math.log(self.num_classes)

    @classmethod
    def from_name(
        cls,
        name: str,
        width: int,
        depth: int,
        kind: str,
        *,
        dataset: str | None = None,
        data_root=None,
        image_pool: int = 2,
        batch_size: int = 128,
        context: int = 64,
        eval_size: int | None = None,
        output_mult: float = 1.0,
        device: str | torch.device = "cpu",
        grad_method: str = "vmap_grad",
        chunk_size: int | None = None,
    ) -> ModuleTask:
        """A ``mulo.tasks`` family (``"mlp"``, ``"cnn"``, ``"transformer"``): data, held-out set
        and model exactly as ``build_task(name, ..., parametrization=μP or SP)`` builds them.

        ``eval_size``: held-out examples (text: windows of ``context`` bytes); default 2000
        images as ``build_task``, but 256 windows (16k tokens at context 64) for the LM, whose
        2000-window evaluation of 16 particles takes about half a minute on one CPU core."""
        if eval_size is None:
            eval_size = EVAL_WINDOWS if name == "transformer" else EVAL_IMAGES
        if name not in TASK_NAMES:
            raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}")
        task = build_task(
            name, width=width, depth=depth, parametrization=KINDS[normalise_kind(kind)],
            batch_size=batch_size, seed=0, device=device, dataset=dataset, data_root=data_root,
            image_pool=image_pool, context=context, eval_size=eval_size, output_mult=output_mult,
        )  # fmt: skip
        builder = _family_builder(name, task, width, depth, context, output_mult)
        if name == "transformer":
            train, info = task.batcher.data, {"context": context}
        else:
            train, info = (task.batcher.x, task.batcher.y), {"image_pool": image_pool}
        info["eval_size"] = len(task.eval_y)
        return cls(
            builder, kind, train, task.eval_x, task.eval_y, num_classes=task.num_classes,
            batch_size=batch_size, context=context if name == "transformer" else None,
            name=name, width=width, depth=depth, dataset=task.dataset, device=device,
            grad_method=grad_method, chunk_size=chunk_size, info=info,
        )  # fmt: skip

    # -- InnerTask ----------------------------------------------------------------------------

    def init_params(self, seed: int) -> dict[str, Tensor]:
        """``{name: [1, ...]}``: the init of ``builder()`` after ``torch.manual_seed(seed)``
        (the caller's RNG is untouched)."""
        model = build_module(self.builder, seed)
        return {n: p.detach().unsqueeze(0).to(self.device) for n, p in model.named_parameters()}

    def grads(self, params, x, y):
        return self.template.grads(params, x, y)

    def loss(self, params, x, y) -> Tensor:
        return self.template.loss(params, x, y)

    def make_batcher(self, seed: int) -> D.TensorBatcher | D.TextBatcher:
        if self.text is not None:
            return D.TextBatcher(self.text, self.context, seed=int(seed), device=self.device)
        return D.TensorBatcher(self.x_train, self.y_train, seed=int(seed), device=self.device)

    def _eval_chunk(self, population: int) -> int:
        if self.text is not None:
            return max(1, EVAL_TOKENS // (population * max(1, self.x_test.shape[-1])))
        return max(1, EVAL_EXAMPLES // population)

    @torch.no_grad()
    def evaluate(self, params, chunk: int | None = None) -> dict[str, Tensor]:
        """Held-out ``{"test_loss", "test_accuracy"}`` per particle ``[P]`` (float64), averaged
        over predictions (tokens for the LM, which also reports ``test_bpb``); eval mode, no
        grad, ``chunk`` held-out examples per forward (default: a memory budget)."""
        if len(self.x_test) == 0:
            return {}
        pop = next(iter(params.values())).shape[0]
        chunk = int(chunk or self._eval_chunk(pop))
        loss = torch.zeros(pop, dtype=torch.float64, device=self.device)
        correct = torch.zeros(pop, dtype=torch.float64, device=self.device)
        module = self.template.template
        was_training = module.training
        module.eval()
        try:
            for start in range(0, len(self.x_test), chunk):
                x, y = self.x_test[start : start + chunk], self.y_test[start : start + chunk]
                chunk_loss, chunk_acc = self.template.metrics(params, x, y, shared=True)
                loss += chunk_loss.double() * y.numel()
                correct += chunk_acc.double() * y.numel()
        finally:
            module.train(was_training)
        n = self.y_test.numel()
        out = {"test_loss": loss / n, "test_accuracy": correct / n}
        if self.text is not None:
            out["test_bpb"] = out["test_loss"] / math.log(2)
        return out

    def describe(self) -> dict:
        return {
            "task": self.name,
            "kind": self.kind,
            "width": self.width,
            "depth": self.depth,
            "num_classes": self.num_classes,
            "train_size": self.train_size,
            "batch_size": self.batch_size,
            "dataset": self.dataset,
            "num_params": sum(math.prod(p.shape[1:]) for p in self.template.params.values()),
            **self.info,
        }
