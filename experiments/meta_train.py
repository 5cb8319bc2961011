"""Meta-train small_fc_lopt with PES (or ES): resumable, and scalable with torchrun.

    python -m experiments.meta_train experiment=mulo_s            # μLO, one width
    python -m experiments.meta_train experiment=splo_m logger=wandb
    torchrun --nproc_per_node=2 -m experiments.meta_train experiment=mulo_m
    python -m experiments.meta_train experiment=mulo_s meta.outer_steps=50 out_dir=/tmp/quick

Everything goes to ``<out_dir>/meta_train/<experiment>/``, a directory fixed by the experiment
name so that re-running the same command after a crash (kill -9 included) resumes from the last
checkpoint on the same trajectory:
- ``checkpoint.pt`` (+ ``checkpoint.pt.prev``) every ``meta.checkpoint_every`` outer steps;
- ``metrics.jsonl``: meta-loss, gradient and update norms, lr, seconds per outer step, and every
  ``meta.eval_every`` steps the held-out evaluation on a wider fresh MLP (``eval/...``);
- ``meta_weights.pt`` (refreshed at every checkpoint and at the end): the current learned
  optimizer with its provenance, loadable with
  ``mulo.MuLO(model, meta_weights=".../meta_weights.pt")``;
- ``snapshots/meta_weights_<step>.pt``: the weights of every held-out evaluation, kept.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from experiments._cli import blame, check_argv, one_line_errors, run_dir
from mulo import tasks
from mulo.loggers import JsonlLogger, Loggers, WandbLogger
from mulo.meta import MetaConfig, MetaTrainer, run_meta_training
from mulo.meta.checkpoint import check_resumable, saved_step
from mulo.meta.distributed import init_distributed, shutdown
from mulo.meta_weights import save_meta_weights


def project_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def export(trainer: MetaTrainer, path: Path, name: str, meta_loss: float | None) -> None:
    """The current meta-parameters as a mulo meta-weights file with provenance."""
    save_meta_weights(
        path,
        trainer.meta_params(),
        {
            "name": name,
            "config": trainer.config.to_dict(),
            "outer_steps": trainer.outer_step,
            "final_meta_loss": meta_loss,
            "commit": project_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
    )


def export_during_run(trainer: MetaTrainer, path: Path, name: str, record: dict) -> None:
    """:func:`export` for the snapshots taken while training: a file that cannot be written
    (a full disk, weights outside the checked range) is a warning, never the end of the run;
    the checkpoint, which is what resumes it, is written independently."""
    try:
        export(trainer, path, name, record["meta_loss"])
    except (OSError, ValueError) as e:
        print(f"warning: step {record['step']}: could not write {path}: {e}", file=sys.stderr)


@one_line_errors
def run(cfg: DictConfig) -> None:
    config = OmegaConf.to_container(cfg, resolve=True)
    meta = MetaConfig.from_dict(config["meta"])
    rank, world_size = init_distributed()
    out = run_dir()
    checkpoint = out / "checkpoint.pt"
    if config["fresh"] and rank == 0 and checkpoint.exists():
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(out), aside)
        out.mkdir(parents=True)
        print(f"fresh=true: moved the previous run to {aside}")
    trainer = MetaTrainer(meta)
    check_resumable(checkpoint)
    if checkpoint.exists() and (done := saved_step(checkpoint, trainer)) >= meta.outer_steps:
        # re-running a finished run must not rewrite its weights, metrics or W&B run
        print(f"{config['name']}: already finished ({done} of {meta.outer_steps} outer steps); "
              f"{out} left untouched (raise meta.outer_steps to continue)")  # fmt: skip
        shutdown()
        return
    log = Loggers()
    if rank == 0:
        log = Loggers(JsonlLogger(out / "metrics.jsonl"), _wandb(config, meta, out))
    bar = tqdm(
        total=meta.outer_steps,
        desc=f"meta-train {config['name']}",
        disable=rank != 0 or not config["progress"],
        dynamic_ncols=True,
    )
    last: dict = {}

    def on_record(record: dict) -> None:
        if "resumed_from" in record:
            log.rewind(record["at_step"])  # the redone steps must not appear twice
            bar.update(record["at_step"] - bar.n)
        log.log(record)
        if "meta_loss" in record:
            last.update(record)
            bar.set_postfix(meta_loss=f"{record['meta_loss']:.3f}", s=f"{record['seconds']:.1f}")
            if meta.checkpoint_every and record["step"] % meta.checkpoint_every == 0:
                # a loadable snapshot beside each checkpoint, so a long run's weights can be
                # committed (and tried) while it progresses
                export_during_run(trainer, out / "meta_weights.pt", config["name"], record)
            if any(key.startswith("eval/") for key in record):
                # the weights each held-out evaluation measured, kept (15 kB each): the best
                # of a run is not always its last
                path = out / "snapshots" / f"meta_weights_{record['step']:05d}.pt"
                export_during_run(trainer, path, config["name"], record)
            bar.update(record["step"] - bar.n)

    run_meta_training(trainer, str(checkpoint), log=on_record)
    bar.close()
    if rank == 0:
        export(trainer, out / "meta_weights.pt", config["name"], last.get("meta_loss"))
        log.close({"outer_steps": trainer.outer_step, "final_meta_loss": last.get("meta_loss")})
        print(
            f"{config['name']}: {trainer.outer_step} outer steps on {world_size} process(es), "
            f"meta-loss {last.get('meta_loss', float('nan')):.4f}\n"
            f"checkpoint: {checkpoint}\nmeta-weights: {out / 'meta_weights.pt'}"
        )
    shutdown()


def _wandb(config: dict, meta: MetaConfig, out: Path):
    logger_cfg = config["logger"]
    if logger_cfg.get("name") != "wandb":
        return None
    return WandbLogger(
        config=config,
        project=logger_cfg.get("project", "mulo"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group") or "meta_train",
        tags=[config["name"], meta.kind, meta.estimator, *map(str, meta.widths)],
        name=config["name"],
        directory=out,
        mode=logger_cfg.get("mode"),
    )


def memory_needs(config: dict) -> list[tuple[str, int]]:
    """Every inner population at once, and the evaluation model (see experiments._cli)."""
    meta = config["meta"]
    data = {"dataset": meta["dataset"], "image_pool": meta["image_pool"]}
    population = 2 * meta["pairs"]
    needs = []
    for width in meta["widths"] if not meta.get("tasks") else []:
        estimate = tasks.memory_estimate(
            "mlp", width=width, depth=meta["depth"], batch_size=meta["batch_size"],
            population=population, **data,
        )  # fmt: skip
        needs.append(blame("meta.widths", "meta.batch_size", estimate))
    for task in meta.get("tasks") or []:
        spec = {"depth": meta["depth"], "batch_size": meta["batch_size"], **task}
        needs.append(blame("meta.tasks", "meta.tasks", tasks.memory_estimate(
            **spec, population=population, **data)))  # fmt: skip
    if meta["eval_width"]:
        estimate = tasks.memory_estimate(
            "mlp", width=meta["eval_width"], depth=meta["depth"], batch_size=meta["batch_size"],
            **data,
        )  # fmt: skip
        needs.append(blame("meta.eval_width", "meta.batch_size", estimate))
    return needs


@hydra.main(version_base="1.3", config_path="../configs", config_name="meta_train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_argv(sys.argv[1:], config_name="meta_train", memory=memory_needs)
    main()
