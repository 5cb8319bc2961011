"""The inner training loop shared by every experiment: train, evaluate, report.

Kept free of configuration and logging backends: it takes a task, an optimizer, an optional
LR scheduler and a ``log(record)`` callable, and returns a summary dict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm


def train(
    task,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    steps: int,
    eval_interval: int = 0,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict:
    """Run ``steps`` optimizer steps on ``task``; evaluate every ``eval_interval`` steps and at
    the end. The train loss of a step is the minibatch loss before that step's update.

    A non-finite loss ends the run early as diverged (a learned optimizer far outside its
    meta-training distribution can do that); the summary says so instead of raising.
    ``on_step(steps_done, model)`` runs after every update (e.g. to record the trajectory).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    log = log or (lambda record: None)
    model = task.model
    model.train()
    losses: list[float] = []
    diverged = False
    last_eval: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        x, y = task.sample()
        loss = task.loss(model(x), y)
        value = loss.item()
        if not math.isfinite(value):
            diverged = True
            log({"step": step, "train_loss": value, "diverged": True})
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if getattr(optimizer, "reads_loss", False):  # VeLO: the loss is one of its inputs
            optimizer.step(loss=value)
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(value)
        if on_step is not None:
            on_step(len(losses), model)
        log({"step": step, "train_loss": value, "lr": optimizer.param_groups[0]["lr"]})
        if eval_interval and (step + 1) % eval_interval == 0 and step + 1 < steps:
            last_eval = _evaluate(task, step + 1, log)
            bar.set_postfix(loss=f"{value:.3f}", eval=f"{last_eval['eval_loss']:.3f}")
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    bar.close()
    if not diverged:
        last_eval = _evaluate(task, len(losses), log)
    tail = losses[-max(1, len(losses) // 10) :] if losses else [float("nan")]
    return {
        "steps_done": len(losses),
        "diverged": diverged,
        # final train loss: mean over the last 10% of steps, so one noisy batch does not decide
        "final_train_loss": float("inf") if diverged else sum(tail) / len(tail),
        "initial_train_loss": losses[0] if losses else float("nan"),
        **last_eval,
        "seconds": time.perf_counter() - start,
    }


def _evaluate(task, step: int, log) -> dict[str, float]:
    metrics = {f"eval_{k}": v for k, v in task.evaluate().items()}
    log({"step": step, **metrics})
    return metrics
