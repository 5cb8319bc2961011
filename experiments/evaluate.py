"""Train one task with one optimizer, evaluate it and log it: the unit every study is made of.

    python -m experiments.evaluate task=mlp task.width=256 optimizer=muadam optimizer.lr=0.1
    python -m experiments.evaluate -m optimizer=mulo,splo,muadam task.width=64,256
    python -m experiments.evaluate logger=wandb     # offline unless a W&B API key is set

Writes metrics.jsonl (per-step train loss, periodic held-out metrics) and summary.json to the
Hydra run directory, and mirrors both to W&B with logger=wandb.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from experiments._cli import CONFIG_DIR, blame, check_argv, one_line_errors, run_dir
from mulo import baselines, tasks
from mulo.loggers import JsonlLogger, Loggers, WandbLogger
from mulo.train import train


def build_run(
    task_cfg: dict,
    optimizer_cfg: dict,
    *,
    parametrization: str,
    steps: int,
    batch_size: int,
    seed: int,
    device: str,
):
    """(task, optimizer, scheduler) of one run from plain config dicts."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    torch.set_flush_denormal(True)  # decaying accumulators otherwise turn denormal and slow
    task_kw = {k: v for k, v in task_cfg.items() if k != "name"}
    task = tasks.build_task(
        task_cfg["name"], **task_kw, parametrization=parametrization, batch_size=batch_size,
        seed=seed, device=device,
    )  # fmt: skip
    opt_kw = {
        k: v for k, v in optimizer_cfg.items() if k not in ("name", "schedule", "parametrization")
    }
    opt_kw = _resolve_auto_steps(opt_kw, steps)
    optimizer = baselines.build_optimizer(
        optimizer_cfg["name"], task.model, parametrization=parametrization, batch_size=batch_size,
        seed=seed, **opt_kw,
    )  # fmt: skip
    schedule = dict(optimizer_cfg.get("schedule") or {"name": "constant"})
    scheduler = baselines.build_schedule(optimizer, schedule.pop("name"), steps=steps, **schedule)
    return task, optimizer, scheduler


def _resolve_auto_steps(kwargs: dict, steps: int) -> dict:
    """``total_steps: auto`` (a learned optimizer told this run's length) -> ``steps``, also in a
    graft's ``magnitude_kwargs`` / ``direction_kwargs``; the config itself is not changed."""
    out = {k: _resolve_auto_steps(v, steps) if k.endswith("_kwargs") and isinstance(v, dict)
           else v for k, v in kwargs.items()}  # fmt: skip
    if out.get("total_steps") == "auto":
        out["total_steps"] = steps
    return out


def run_single(
    task_cfg: dict,
    optimizer_cfg: dict,
    *,
    parametrization: str,
    steps: int,
    batch_size: int,
    seed: int,
    eval_interval: int,
    device: str,
    out: Path,
    logger_cfg: dict | None = None,
    config: dict | None = None,
    progress: bool = True,
) -> dict:
    """Build the task and the optimizer from plain config dicts, train, log, summarise."""
    task, optimizer, scheduler = build_run(
        task_cfg, optimizer_cfg, parametrization=parametrization, steps=steps,
        batch_size=batch_size, seed=seed, device=device,
    )  # fmt: skip
    identity = {
        "task": task_cfg["name"],
        "optimizer": optimizer_cfg["name"],
        "parametrization": parametrization,
        "width": task_cfg["width"],
        "depth": task_cfg["depth"],
        "seed": seed,
        "lr": optimizer_cfg.get("lr"),  # None: the optimizer's default
    }
    out.mkdir(parents=True, exist_ok=True)
    log = Loggers(JsonlLogger(out / "metrics.jsonl"), _wandb(logger_cfg, identity, config, out))
    name = f"{identity['optimizer']}/{parametrization} w={identity['width']} seed={seed}"
    summary = train(
        task, optimizer, scheduler, steps=steps, eval_interval=eval_interval, log=log.log,
        progress=progress, desc=name,
    )  # fmt: skip
    summary = {**identity, "num_params": task.num_params, **summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log.close(summary)
    return summary


def _wandb(logger_cfg: dict | None, identity: dict, config: dict | None, out: Path):
    if not logger_cfg or logger_cfg.get("name") != "wandb":
        return None
    group = logger_cfg.get("group") or (
        f"{identity['task']}-depth{identity['depth']}"
        + (f"-steps{config['steps']}" if config and "steps" in config else "")
    )
    tags = [
        identity["optimizer"],
        identity["parametrization"],
        f"width={identity['width']}",
        f"depth={identity['depth']}",
        identity["task"],
        *logger_cfg.get("tags", []),
    ]
    return WandbLogger(
        config={**(config or {}), **identity},
        project=logger_cfg.get("project", "mulo"),
        entity=logger_cfg.get("entity"),
        group=group,
        tags=tags,
        name=f"{identity['optimizer']}-{identity['parametrization']}-w{identity['width']}"
        f"-d{identity['depth']}-s{identity['seed']}",
        directory=out,
        mode=logger_cfg.get("mode"),
    )


def natural_parametrization(optimizer: dict) -> str:
    """The model's parametrization under ``parametrization=auto``: the optimizer config's own.
    graft's is null: its magnitude optimizer's (from configs/optimizer/<magnitude>.yaml), as
    the magnitude sets the step size, so ``optimizer.magnitude=mulo`` alone gives a μP model."""
    choice = optimizer.get("parametrization", "mup")
    if choice is None and optimizer.get("name") == "graft":
        path = CONFIG_DIR / "optimizer" / f"{optimizer.get('magnitude')}.yaml"
        choice = OmegaConf.load(path).get("parametrization") if path.is_file() else None
    return choice or "mup"


@one_line_errors
def run(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    parametrization = config["parametrization"]["name"]
    if parametrization == "auto":
        parametrization = natural_parametrization(config["optimizer"])
        config["parametrization"]["name"] = parametrization
    summary = run_single(
        config["task"],
        config["optimizer"],
        parametrization=parametrization,
        steps=config["steps"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        eval_interval=config["eval_interval"],
        device=config["device"],
        out=run_dir(),
        logger_cfg=config["logger"],
        config=config,
        progress=config["progress"],
    )
    metric = "eval_accuracy" if "eval_accuracy" in summary else "eval_bpb"
    print(
        f"{summary['optimizer']}/{summary['parametrization']} {summary['task']} "
        f"width={summary['width']} depth={summary['depth']}: final train loss "
        f"{summary['final_train_loss']:.4f}, {metric} {summary.get(metric, float('nan')):.4f}"
        f"{' (diverged)' if summary['diverged'] else ''} -> {run_dir()}"
    )
    return summary


def memory_needs(config: dict) -> list[tuple[str, int]]:
    """What a run of this config allocates, for the up-front check (see experiments._cli)."""
    estimate = tasks.memory_estimate(**config["task"], batch_size=config["batch_size"])
    return [blame("task.width", "batch_size", estimate)]


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_argv(sys.argv[1:], config_name="evaluate", memory=memory_needs)
    main()
