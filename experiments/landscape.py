"""Loss-landscape projections of models trained by μLO, SP-LO and AdamW (same task, seed, steps).

    python -m experiments.landscape                              # configs/landscape.yaml
    python -m experiments.landscape task.width=256 steps=2000 plane_points=31

Each optimizer trains the task once, recording the weights every ``snapshot_every`` steps. The
train loss (on ``loss_examples`` fixed training examples) is then measured

- 1-D: along the straight line from the initial to the final weights (alpha = 0 is the init,
  1 the final weights), and along a filter-normalised random direction through the final
  weights (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets");
- 2-D: on the plane through the final weights spanned by two filter-normalised random
  directions, and on the plane of the top two PCA directions of the trajectory, with the
  trajectory projected onto it.

Filter normalisation: each row of a weight (an output unit, or a conv filter) of the random
direction is rescaled to the norm of that row of the final weights; vectors (biases, norm
gains) get a zero direction, as in Li et al. The PCA directions are unit vectors of the
flattened weights (their axes are in weight-space distance). Writes ``landscape.json`` (every
grid's values, and each tensor's distance from init to final), ``landscape_1d.png``,
``landscape_random_2d.png`` and ``landscape_pca_2d.png``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from experiments._cli import check_argv, one_line_errors
from experiments.evaluate import build_run, memory_needs
from mulo.train import train


def flat(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def filter_normalised(model: torch.nn.Module, generator: torch.Generator) -> Tensor:
    """A random direction with each weight row's norm equal to that row's norm in ``model``."""
    parts = []
    for p in model.parameters():
        if p.dim() < 2:
            parts.append(torch.zeros(p.numel()))
            continue
        w = p.detach().reshape(p.shape[0], -1)
        d = torch.randn(w.shape, generator=generator)
        d *= w.norm(dim=1, keepdim=True) / d.norm(dim=1, keepdim=True).clamp(min=1e-12)
        parts.append(d.reshape(-1))
    return torch.cat(parts)


def pca_directions(snapshots: Tensor, final: Tensor) -> tuple[Tensor, list[float]]:
    """The top two principal directions [2, D] of the trajectory around the final weights,
    and the share of its variance each explains."""
    centred = snapshots - final
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    share = (s**2 / (s**2).sum().clamp(min=1e-30)).tolist()
    return vh[:2], share[:2]


class LossProbe:
    """The train loss of the model at flat weight vectors, on fixed examples."""

    def __init__(self, task, examples: int, bar: tqdm):
        state = task.batcher.state_dict()
        self.x, self.y = task.batcher.sample(examples)
        task.batcher.load_state_dict(state)  # probing must not change the training stream
        self.task, self.bar = task, bar
        self.model = task.model

    @torch.no_grad()
    def __call__(self, weights: Tensor) -> float:
        torch.nn.utils.vector_to_parameters(weights, self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        loss = self.task.loss(self.model(self.x), self.y).item()
        self.model.train(was_training)
        self.bar.update()
        return loss if math.isfinite(loss) else float("nan")


def line(probe: LossProbe, origin: Tensor, direction: Tensor, alphas: list[float]) -> list:
    return [probe(origin + a * direction) for a in alphas]


def plane(probe: LossProbe, origin: Tensor, d1: Tensor, d2: Tensor, xs, ys) -> list[list]:
    """Loss grid [len(ys)][len(xs)] at origin + x d1 + y d2."""
    return [[probe(origin + x * d1 + y * d2) for x in xs] for y in ys]


def grid(low: float, high: float, n: int) -> list[float]:
    return torch.linspace(low, high, n).tolist()


def train_and_probe(entry: str, spec: dict, config: dict, bar: tqdm) -> dict:
    task, optimizer, scheduler = build_run(
        config["task"], spec["optimizer"], parametrization=spec["parametrization"],
        steps=config["steps"], batch_size=config["batch_size"], seed=config["seed"],
        device="cpu",
    )  # fmt: skip
    init = flat(task.model)
    snapshots = [init]

    def record(step: int, model) -> None:
        if step % config["snapshot_every"] == 0:
            snapshots.append(flat(model))

    summary = train(
        task, optimizer, scheduler, steps=config["steps"], progress=config["progress"],
        desc=f"train {entry}", on_step=record,
    )  # fmt: skip
    if summary["diverged"]:
        raise ValueError(f"{entry} diverged at step {summary['steps_done']}; nothing to project")
    final = flat(task.model)
    sizes = [(n, p.numel()) for n, p in task.model.named_parameters()]
    moved = torch.split(final - init, [k for _, k in sizes])
    distance = {n: d.norm().item() for (n, _), d in zip(sizes, moved, strict=True)}
    probe = LossProbe(task, config["loss_examples"], bar)
    gen = torch.Generator().manual_seed(config["direction_seed"])
    d1, d2 = filter_normalised(task.model, gen), filter_normalised(task.model, gen)
    span, n_line, n_plane = config["span"], config["line_points"], config["plane_points"]
    alphas = grid(*config["interpolation"], n_line)
    betas = grid(-span, span, n_line)
    xs = ys = grid(-span, span, n_plane)
    out = {
        "final_train_loss": summary["final_train_loss"],
        # ||final - init|| per tensor: where in the model the trajectory's length goes
        "distance": distance,
        "eval": {k: v for k, v in summary.items() if k.startswith("eval_")},
        "interpolation": {"alpha": alphas, "loss": line(probe, init, final - init, alphas)},
        "random_line": {"alpha": betas, "loss": line(probe, final, d1, betas)},
        "random_plane": {"x": xs, "y": ys, "loss": plane(probe, final, d1, d2, xs, ys)},
    }
    trajectory = torch.stack(snapshots)
    pcs, share = pca_directions(trajectory, final)
    coords = (trajectory - final) @ pcs.T  # [snapshots, 2]
    lo, hi = coords.min(0).values, coords.max(0).values
    margin = 0.25 * (hi - lo).clamp(min=1e-6)
    px = grid(float(lo[0] - margin[0]), float(hi[0] + margin[0]), n_plane)
    py = grid(float(lo[1] - margin[1]), float(hi[1] + margin[1]), n_plane)
    out["pca_plane"] = {
        "x": px, "y": py, "loss": plane(probe, final, pcs[0], pcs[1], px, py),
        "trajectory": coords.tolist(), "explained_variance": share,
        "snapshot_steps": [0, *range(config["snapshot_every"], config["steps"] + 1,
                                     config["snapshot_every"])],
    }  # fmt: skip
    torch.nn.utils.vector_to_parameters(final, task.model.parameters())
    return out


def plots(results: dict, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    paths = [out / f"landscape_{k}.png" for k in ("1d", "random_2d", "pca_2d")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        r = results[name]
        axes[0].plot(r["interpolation"]["alpha"], r["interpolation"]["loss"], label=name)
        axes[1].plot(r["random_line"]["alpha"], r["random_line"]["loss"], label=name)
    axes[0].set(xlabel="alpha (0: init, 1: final)", ylabel="train loss", yscale="log",
                title="init -> final")  # fmt: skip
    axes[1].set(xlabel="filter-normalised step from the final weights", ylabel="train loss",
                yscale="log", title="random direction")  # fmt: skip
    for ax in axes:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    for key, path in (("random_plane", paths[1]), ("pca_plane", paths[2])):
        fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            g = results[name][key]
            z = np.log10(np.clip(np.array(g["loss"], dtype=float), 1e-6, None))
            cs = ax.contourf(g["x"], g["y"], z, levels=20, cmap="viridis")
            fig.colorbar(cs, ax=ax, label="log10 train loss")
            ax.plot(0, 0, "r*", markersize=10)
            if "trajectory" in g:
                t = np.array(g["trajectory"])
                ax.plot(t[:, 0], t[:, 1], "w.-", markersize=3, linewidth=1)
                ev = g["explained_variance"]
                ax.set(xlabel=f"PC1 ({ev[0]:.0%})", ylabel=f"PC2 ({ev[1]:.0%})")
            else:
                ax.set(xlabel="direction 1", ylabel="direction 2")
            ax.set_title(f"{name}: final loss {results[name]['final_train_loss']:.3f}")
        fig.suptitle(f"{title}: {'trajectory PCA plane' if 'pca' in key else 'random plane'}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return paths


def check(config: dict) -> None:
    for key in ("steps", "snapshot_every", "loss_examples"):
        if not (isinstance(config[key], int) and config[key] >= 1):
            raise ValueError(f"{key} must be a positive integer, got {config[key]!r}")
    if config["steps"] // config["snapshot_every"] < 2:
        raise ValueError("the PCA plane needs >= 2 snapshots: lower snapshot_every or add steps")
    for key in ("line_points", "plane_points"):
        if not (isinstance(config[key], int) and config[key] >= 2):
            raise ValueError(f"{key} must be an integer >= 2, got {config[key]!r}")
    if not config["optimizers"]:
        raise ValueError("optimizers must name at least one entry")
    low, high = config["interpolation"]
    if not low < high:
        raise ValueError(f"interpolation must be [low, high] with low < high, got {[low, high]}")


@one_line_errors
def run(cfg: DictConfig) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    check(config)
    out = Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    per_model = 2 * config["line_points"] + 2 * config["plane_points"] ** 2
    total = per_model * len(config["optimizers"])
    bar = tqdm(total=total, desc="loss evaluations", disable=not config["progress"])
    results = {e: train_and_probe(e, s, config, bar) for e, s in config["optimizers"].items()}
    bar.close()
    task = config["task"]
    title = (f"{task['name']} width {task['width']} depth {task['depth']}, "
             f"{config['steps']} steps, seed {config['seed']}")  # fmt: skip
    record = {"config": config, "title": title, "results": results}
    (out / "landscape.json").write_text(json.dumps(record) + "\n")
    paths = plots(results, out, title)
    for name, r in results.items():
        print(f"{name}: final train loss {r['final_train_loss']:.4f}; PCA plane explains "
              f"{sum(r['pca_plane']['explained_variance']):.0%} of the trajectory")  # fmt: skip
    print(f"wrote {out / 'landscape.json'} and {', '.join(p.name for p in paths)}")
    return record


@hydra.main(version_base="1.3", config_path="../configs", config_name="landscape")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    check_argv(
        sys.argv[1:], default_out_dir="experiments/results/landscape", config_name="landscape",
        memory=memory_needs,
    )  # fmt: skip
    main()
