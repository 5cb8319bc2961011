"""Coordinate check: does the typical activation size of each layer stay put as width grows?

Under a correct μP every layer's mean |activation| after a few optimizer steps is roughly
width-independent; under SP with Adam the logits grow ~linearly with width. This is the check
that the parametrization layer is right (Yang et al. 2021, Tensor Programs V, §D). CPU-only by
design, unlike `mup.coord_check.get_coord_data`, which defaults to CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .roles import EMBEDDINGS, WEIGHTED

Batch = tuple[Tensor, Tensor]
_RECORDED = (*WEIGHTED, *EMBEDDINGS)


def _first_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def coord_check(
    make_model: Callable[[int], nn.Module],
    widths: Iterable[int],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    batches: Callable[[int], Batch] | Batch,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int = 3,
    seed: int = 0,
    layers: Iterable[str] | None = None,
) -> list[dict]:
    """Mean |output| of each layer at the forward of steps 0..`steps` (step 0: before any update).

    `batches` is either a fixed ``(x, y)`` or ``step -> (x, y)``; it should not depend on width.
    `layers` restricts recording to these module names; by default every Linear/Conv/Bilinear/
    Embedding (including `Readout`) is recorded. The seed is reset before building each width so
    the runs are comparable. Returns records ``{"width", "step", "layer", "mean_abs"}``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    records: list[dict] = []
    for width in widths:
        torch.manual_seed(seed)
        model = make_model(width)
        model.train()
        optimizer = make_optimizer(model)
        for step, layer, value in _run(model, optimizer, batches, loss_fn, steps, layers):
            records.append({"width": width, "step": step, "layer": layer, "mean_abs": value})
    return records


def _run(model, optimizer, batches, loss_fn, steps, layers) -> list[tuple[int, str, float]]:
    """Train one model for `steps` updates, recording hooked outputs at every forward."""
    wanted = None if layers is None else set(layers)
    seen: list[tuple[int, str, float]] = []
    step = 0

    def hook(name: str):
        def record(_module, _inputs, output):
            out = _first_tensor(output)
            if out is not None:
                seen.append((step, name, out.detach().abs().mean().item()))

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if (name in wanted if wanted is not None else isinstance(module, _RECORDED))
    ]
    try:
        if wanted is not None and len(handles) != len(wanted):
            found = {n for n, _ in model.named_modules()}
            raise ValueError(f"layers not found in the model: {sorted(wanted - found)}")
        for step in range(steps + 1):  # noqa: B007 (read by the hooks)
            x, y = batches(step) if callable(batches) else batches
            loss = loss_fn(model(x), y)
            if step < steps:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def coord_table(records: Iterable[dict], step: int) -> dict[str, dict[int, float]]:
    """``{layer: {width: mean_abs}}`` at one step, for assertions and printing."""
    table: dict[str, dict[int, float]] = {}
    for r in records:
        if r["step"] == step:
            table.setdefault(r["layer"], {})[r["width"]] = r["mean_abs"]
    return table


def plot_coord_check(records: list[dict], path: str | None = None, title: str = ""):
    """One panel per step: mean |activation| vs width (log-log), a line per layer.

    Flat lines mean the parametrization is right. Returns the figure; saves it if `path` is given.
    """
    import matplotlib.pyplot as plt

    steps = sorted({r["step"] for r in records})
    all_widths = sorted({r["width"] for r in records})
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3), squeeze=False)
    for ax, step in zip(axes[0], steps, strict=True):
        for layer, by_width in coord_table(records, step).items():
            widths = sorted(by_width)
            ax.plot(widths, [by_width[w] for w in widths], marker="o", label=layer)
        ax.set(xscale="log", yscale="log", xlabel="width", title=f"step {step}")
        ax.set_xticks(all_widths, [str(w) for w in all_widths], minor=False)
        ax.set_xticks([], minor=True)
    axes[0][0].set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
