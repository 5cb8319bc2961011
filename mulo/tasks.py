"""Tasks: a model family x a dataset x a loss, buildable at any width/depth under μP or SP.

    task = build_task("mlp", width=256, depth=3, parametrization="mup", seed=0)
    x, y = task.sample()                          # one seeded train batch on the task's device
    loss = task.loss(task.model(x), y)            # mean cross-entropy
    task.evaluate()                               # {"loss": ..., "accuracy": ...} on held-out data

Families (`TASK_NAMES`):
- ``mlp``: Fashion-MNIST (or MNIST / CIFAR-10) average-pooled by ``image_pool`` (28x28 -> 14x14),
  flattened, normalised with train statistics; ``P.mlp(196, width, depth, 10)`` (depth = number
  of hidden layers, 3 in the μLO paper).
- ``cnn``: the same images kept as ``[N, C, H, W]``; ``P.cnn`` with width = channels.
- ``transformer``: byte-level language modelling (vocab 256) of a text corpus (the Debian
  ``fortunes`` files by default) with ``P.transformer_lm``; evaluation reports bits per byte.

For meta-training, :class:`MLPPopulation` holds P independently initialised copies of the MLP as
stacked ``[P, ...]`` tensors and computes all P losses (and gradients) in one batched computation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import parametrizations as P
from mulo import data as D
from parametrizations.builders import check_positive

TASK_NAMES = ("mlp", "cnn", "transformer")
IMAGE_DATASETS = ("fashion_mnist", "mnist", "cifar10")
TEXT_DATASETS = ("text",)
EVAL_BATCH = 1000  # held-out examples per forward (fewer for text: see _eval_batch)
EVAL_TOKENS = 65536  # cap on tokens per held-out forward for the transformer

# (dataset, root, pool) -> preprocessed ((x_train, y_train), (x_test, y_test)); text: bytes dict.
_DATA_CACHE: dict[tuple, object] = {}


def clear_data_cache() -> None:
    """Forget the datasets loaded by earlier `build_task` calls (they are kept for sweeps).

    The key is (dataset, data_root, pool): with ``data_root=None`` a change of the lookup
    environment variables between calls is not noticed until this is called.
    """
    _DATA_CACHE.clear()


# ---------------------------------------------------------------------------------------------
# Data


def _image_data(dataset: str, root, pool: int) -> tuple[tuple[Tensor, Tensor], tuple]:
    """Loaded + pooled + normalised images ``[N, C, H, W]`` (float32), cached per key."""
    key = (dataset, None if root is None else str(Path(root).expanduser()), pool)
    if key not in _DATA_CACHE:
        raw = D.load_images(dataset, root=root)
        (xtr, ytr), (xte, yte) = D.prepare_images(raw, pool=pool, flatten=False)
        if xtr.dim() == 3:  # grey [N, H, W] -> [N, 1, H, W]
            xtr, xte = xtr.unsqueeze(1), xte.unsqueeze(1)
        _DATA_CACHE[key] = ((xtr.contiguous(), ytr), (xte.contiguous(), yte))
    return _DATA_CACHE[key]


def _text_data(root) -> dict[str, Tensor]:
    path = D.default_text_corpus() if root is None else Path(root).expanduser()
    key = ("text", str(path), None)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = D.load_text_bytes(path)
    return _DATA_CACHE[key]


def _canonical_dataset(task: str, dataset: str | None) -> str:
    valid = TEXT_DATASETS if task == "transformer" else IMAGE_DATASETS
    if dataset is None:
        return valid[0]
    key = str(dataset).strip().lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "fortunes": "text"}.get(key, key)
    if key not in valid:
        raise ValueError(
            f"unknown dataset {dataset!r} for task {task!r}; valid: {', '.join(valid)}"
        )
    return key


# ---------------------------------------------------------------------------------------------
# The task


@dataclass
class Task:
    """A model with its data and loss. Build with :func:`build_task`.

    ``batcher`` draws the seeded train batches (``mulo.data.TensorBatcher`` / ``TextBatcher``:
    ``state_dict`` / ``load_state_dict`` resume the stream); ``eval_x`` / ``eval_y`` are the fixed
    held-out examples. ``kind`` is ``"image"`` or ``"text"``.
    """

    name: str
    model: nn.Module
    parametrization: str
    batcher: D.TensorBatcher | D.TextBatcher = field(repr=False)
    eval_x: Tensor = field(repr=False)
    eval_y: Tensor = field(repr=False)
    batch_size: int = 128
    width: int = 0
    depth: int = 0
    seed: int = 0
    dataset: str = ""
    kind: str = "image"
    num_classes: int = 10
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def loss(self, model_output: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over all predictions (tokens too: ``[B, L, V]`` vs ``[B, L]``)."""
        return F.cross_entropy(
            model_output.reshape(-1, model_output.shape[-1]), targets.reshape(-1)
        )

    def sample(self) -> tuple[Tensor, Tensor]:
        """One train batch ``(x, y)`` of ``batch_size`` from the seeded in-memory sampler."""
        return self.batcher.sample(self.batch_size)

    def sample_population(self, population: int, shared: bool = True) -> tuple[Tensor, Tensor]:
        """Batches for `population` models, ``[P, B, ...]`` (see ``sample_population`` in data)."""
        return self.batcher.sample_population(population, self.batch_size, shared=shared)

    def train_loss(self, model: nn.Module | None = None) -> Tensor:
        """Loss of `model` (default: the task's) on a fresh ``self.sample()`` batch."""
        model = self.model if model is None else model
        x, y = self.sample()
        return self.loss(model(x), y)

    def _eval_batch(self) -> int:
        if self.kind == "text":
            return max(1, min(EVAL_BATCH, EVAL_TOKENS // self.eval_x.shape[-1]))
        return EVAL_BATCH

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None, max_batches: int | None = None) -> dict:
        """Held-out ``{"loss", "accuracy"}`` (images) or ``{"loss", "bpb"}`` (text, bits per
        byte = loss / ln 2), averaged over examples (tokens). Deterministic: a fixed subset of
        the test split, no grad, eval mode (the previous train/eval mode is restored)."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        try:
            total, correct, count = 0.0, 0, 0
            step = self._eval_batch()
            for i, start in enumerate(range(0, len(self.eval_x), step)):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = self.eval_x[start : start + step], self.eval_y[start : start + step]
                out = model(x)
                out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
                total += F.cross_entropy(out.float(), y, reduction="sum").item()
                correct += (out.argmax(-1) == y).sum().item()
                count += y.numel()
        finally:
            model.train(was_training)
        loss = total / max(count, 1)
        if self.kind == "text":
            return {"loss": loss, "bpb": loss / math.log(2)}
        return {"loss": loss, "accuracy": correct / max(count, 1)}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def population(self, population: int, seed: int | None = None) -> MLPPopulation:
        """`population` independently initialised copies of this MLP task's model, stacked
        (seeds ``seed, seed + 1, ...``; default the task's seed)."""
        if self.name != "mlp":
            raise ValueError(
                f"population batching is implemented for the mlp task, not {self.name!r}"
            )
        readout = self.model.readout
        return MLPPopulation(
            population,
            in_features=self.model.input.in_features,
            width=self.width,
            depth=self.depth,
            out_features=self.num_classes,
            parametrization=self.parametrization,
            seed=self.seed if seed is None else seed,
            output_mult=readout.output_mult,
            device=self.device,
        )


def build_task(
    name: str,
    *,
    width: int,
    depth: int,
    parametrization: str = "mup",
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dataset: str | None = None,
    data_root=None,
    image_pool: int = 2,
    context: int = 64,
    eval_size: int = 2000,
    output_mult: float = 1.0,
) -> Task:
    """Build a task by name (`TASK_NAMES`) at this width/depth under μP (``"mup"``) or SP.

    `seed` seeds the model init and the train-batch sampler (same seed, same run). `dataset`:
    ``fashion_mnist`` (default), ``mnist`` or ``cifar10`` for the image tasks (CIFAR-10 needs
    `data_root` or ``$CIFAR10_DIR``), ``text`` for the transformer. `data_root` is the dataset
    directory (images) or a text file/directory (transformer; default: the ``fortunes`` corpus).
    `image_pool` average-pools images (2: 28x28 -> 14x14). The held-out set is the first
    `eval_size` examples of the test split (for text: `eval_size` non-overlapping windows of
    `context` bytes). Loaded datasets are cached in memory across calls.
    """
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASK_NAMES)}")
    check_positive(
        width=width, depth=depth, batch_size=batch_size, eval_size=eval_size, image_pool=image_pool
    )
    if name == "transformer":
        check_positive(context=context)
    scheme = P.get(parametrization).name  # validates the name early, before any data is read
    dataset = _canonical_dataset(name, dataset)
    device = torch.device(device)

    if name == "transformer":
        text = _text_data(data_root)
        test = text["test"]
        n_windows = min(eval_size, (len(test) - 1) // context)
        if n_windows < 1:
            raise ValueError(
                f"the text test split has {len(test)} bytes, fewer than context + 1 = "
                f"{context + 1}; use a larger corpus or a smaller context"
            )
        starts = torch.arange(n_windows) * context
        windows = test[starts.unsqueeze(1) + torch.arange(context + 1)].long()
        eval_x, eval_y = windows[:, :-1], windows[:, 1:]
        batcher = D.TextBatcher(text["train"], context, seed=seed, device=device)
        num_classes = 256
        builder = functools.partial(_model, name, width, depth, scheme, output_mult, context)
    else:
        (xtr, ytr), (xte, yte) = _image_data(dataset, data_root, image_pool)
        num_classes = 10  # Fashion-MNIST, MNIST and CIFAR-10 alike
        builder = functools.partial(
            _model, name, width, depth, scheme, output_mult, tuple(xtr.shape[1:])
        )
        if name == "mlp":
            xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
        eval_x, eval_y = xte[:eval_size], yte[:eval_size]
        batcher = D.TensorBatcher(xtr, ytr, seed=seed, device=device)

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = builder()
    return Task(
        name=name,
        model=model.to(device),
        parametrization=scheme,
        batcher=batcher,
        eval_x=eval_x.to(device),
        eval_y=eval_y.to(device),
        batch_size=batch_size,
        width=width,
        depth=depth,
        seed=seed,
        dataset=dataset,
        kind="text" if name == "transformer" else "image",
        num_classes=num_classes,
        device=device,
    )


def _model(name: str, width: int, depth: int, scheme: str, output_mult: float, shape):
    """The task's network; ``shape``: an image's (channels, height, width) or the context."""
    if name == "transformer":
        return P.transformer_lm(
            256, width, depth, context=shape, parametrization=scheme, output_mult=output_mult
        )
    if name == "mlp":
        features = math.prod(shape)
        return P.mlp(features, width, depth, 10, parametrization=scheme, output_mult=output_mult)
    return P.cnn(shape[0], width, depth, 10, shape[-1], scheme, output_mult=output_mult)


# image (channels, side) per dataset, before pooling
IMAGE_SHAPES = {"fashion_mnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32)}


def memory_estimate(
    name: str,
    *,
    width: int,
    depth: int,
    batch_size: int,
    population: int = 1,
    dataset: str | None = None,
    image_pool: int = 2,
    context: int = 64,
    state_floats: int = 8,
    **_: object,
) -> tuple[int, int]:
    """(parameter bytes, activation bytes) of training ``population`` copies of this task,
    without allocating it: the parameter count of the real network (built on the meta
    device), each with ``state_floats`` float32s in all (weights, gradient, optimizer state),
    and a coarse bound on the activations kept for the backward pass. For refusing a size
    that cannot fit before anything is allocated; not a profile."""
    if name == "transformer":
        shape = context
    else:
        channels, side = IMAGE_SHAPES.get(_canonical_dataset(name, dataset), (3, 32))
        shape = (channels, side // image_pool, side // image_pool)
    with torch.device("meta"):
        model = _model(name, width, depth, "sp", 1.0, shape)
    params = sum(p.numel() for p in model.parameters())
    if name == "mlp":
        per_example = width * (depth + 1)
    elif name == "cnn":
        per_example = width * shape[1] * shape[2] * (depth + 1)
    else:  # per token: the residual stream, attention and the 4x MLP, per layer
        per_example = context * (width * 12 + context) * depth
    # x3: pre-activations, activations and their gradients
    return 4 * params * state_floats * population, 4 * 3 * per_example * batch_size * population


# ---------------------------------------------------------------------------------------------
# Population-batched MLP (meta-training)


def stack_params(models: list[nn.Module]) -> dict[str, Tensor]:
    """``{name: [P, ...]}`` stacked from models of identical structure (detached copies)."""
    if not models:
        raise ValueError("need at least one model to stack")
    named = [dict(m.named_parameters()) for m in models]
    return {n: torch.stack([d[n].detach() for d in named]) for n in named[0]}


class MLPPopulation:
    """P independently initialised copies of ``P.mlp(in_features, width, depth, out_features)``.

    ``params`` maps the nn.Module's parameter names (``input.weight``, ``hidden1.bias``, ...,
    ``readout.weight``) to stacked ``[P, ...]`` tensors; copy ``i`` is the init of the module
    built after ``torch.manual_seed(seed + i)``. The methods take a params dict of that form
    (not necessarily ``self.params``), so an optimizer can step it functionally:

    - :meth:`logits` ``(params, x) -> [P, B, out]``, with x ``[P, B, in]`` or shared ``[B, in]``;
    - :meth:`loss` ``(params, x, y) -> [P]`` per-copy mean cross-entropy, one batched pass
      (bmm/baddbmm per layer; the μP readout multiplier is a plain float from the Readout);
    - :meth:`grads` ``(params, x, y) -> (loss [P], {name: [P, ...]})`` by autograd on the
      summed loss (copies are independent, so each copy's slice is its own gradient);
    - :meth:`accuracy` ``(params, x, y) -> [P]``.
    """

    def __init__(
        self,
        population: int,
        in_features: int,
        width: int,
        depth: int,
        out_features: int,
        parametrization: str = "mup",
        seed: int = 0,
        output_mult: float = 1.0,
        device: str | torch.device = "cpu",
    ):
        check_positive(population=population)
        models = []
        with torch.random.fork_rng(devices=[]):
            for i in range(population):
                torch.manual_seed(seed + i)
                models.append(
                    P.mlp(
                        in_features,
                        width,
                        depth,
                        out_features,
                        parametrization=parametrization,
                        output_mult=output_mult,
                    )
                )
        self.population, self.in_features, self.width, self.depth = (
            population,
            in_features,
            width,
            depth,
        )
        self.out_features = out_features
        self.parametrization = P.get(parametrization).name
        self.output_mult = float(output_mult)
        self.multiplier = float(models[0].readout.multiplier)
        self.layers = ["input", *(f"hidden{i}" for i in range(1, depth)), "readout"]
        self.params = {k: v.to(device) for k, v in stack_params(models).items()}

    def module(self, index: int, params: dict[str, Tensor] | None = None) -> nn.Sequential:
        """Copy `index` as an ordinary ``P.mlp`` module (parameters copied, not shared)."""
        params = self.params if params is None else params
        model = P.mlp(
            self.in_features,
            self.width,
            self.depth,
            self.out_features,
            parametrization=self.parametrization,
            output_mult=self.output_mult,
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name][index])
        return model.to(params["input.weight"].device)

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``[P, B, out]`` logits; x is ``[P, B, in]`` or ``[B, in]`` (one batch for all)."""
        w0 = params["input.weight"]
        h = x.expand(w0.shape[0], *x.shape) if x.dim() == 2 else x  # a view: no copy
        for i, layer in enumerate(self.layers):
            w, b = params[f"{layer}.weight"], params.get(f"{layer}.bias")
            if b is None:
                h = torch.bmm(h, w.transpose(1, 2))
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h * self.multiplier

    def loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Per-copy mean cross-entropy ``[P]``; y is ``[P, B]`` or shared ``[B]``."""
        out = self.logits(params, x)
        n_p, n_b, n_c = out.shape
        y = y.expand(n_p, n_b) if y.dim() == 1 else y
        per = F.cross_entropy(out.reshape(-1, n_c), y.reshape(-1), reduction="none")
        return per.view(n_p, n_b).mean(1)

    def grads(
        self, params: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss [P], grads {name: [P, ...]})``: backward of the summed per-copy losses."""
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            loss = self.loss(leaves, x, y)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return loss.detach(), dict(zip(leaves, grads, strict=True))

    @torch.no_grad()
    def accuracy(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Per-copy fraction of correct argmax predictions ``[P]``."""
        pred = self.logits(params, x).argmax(-1)
        return (pred == (y.expand_as(pred) if y.dim() == 1 else y)).float().mean(1)
