"""Diagnostic: do small_fc_lopt's fixed epsilons keep its features the same across width?

    python -m experiments.feature_regimes                       # widths 32 256 2048, 200 steps
    python -m experiments.feature_regimes --widths 64 1024 --steps 500

small_fc_lopt reads ``m * rsqrt(v + 1e-6)`` and ``rsqrt(v + 1e-6)`` (docs/math.md §1.3), and its
factored channels clamp the row / column statistics of g² at 1e-9. Where v is far below 1e-6,
the "Adam" channel is just momentum times 1000 and ``rsqrt(v + 1e-6)`` is a constant; below the
clamp a factored channel stops tracking its statistic. Under μP a hidden weight's gradient
shrinks like 1/width, so the share of elements in these regimes can grow with width: then the
learned optimizer sees other features on a wide model than it was meta-trained on, which μP's
zero-shot transfer assumes it does not.

For each width this trains the 3-hidden-layer μP MLP (Fashion-MNIST 14x14, batch 128) with
μAdam (the study's tuned lr 0.03, base width 64) for ``--steps`` steps and prints, per weight
matrix, the median sqrt(v) (bias-corrected Adam second moment, decay 0.999), the fraction of
elements with v < 1e-6, and the fractions of rows / columns whose mean g² (this step's gradient)
is below the 1e-9 clamp.
"""

from __future__ import annotations

import argparse
import time

import torch

from mulo import baselines, tasks

V_EPS = 1e-6  # small_fc_lopt: rsqrt(v + 1e-6)
STAT_CLAMP = 1e-9  # small_fc_lopt: rsqrt(max(row or col statistic, 1e-9))


def share(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


def regimes(width: int, steps: int, lr: float = 0.03, data_root=None, seed: int = 0) -> list:
    """Rows (tensor, median sqrt(v), frac v < 1e-6, frac rows < 1e-9, frac cols < 1e-9)."""
    task = tasks.build_task(
        "mlp", width=width, depth=3, parametrization="mup", batch_size=128, seed=seed,
        data_root=data_root,
    )  # fmt: skip
    opt = baselines.build_optimizer("muadam", task.model, lr=lr, base_width=64)
    for _ in range(steps):
        loss = task.train_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows = []
    for name, p in task.model.named_parameters():
        if p.dim() < 2:
            continue
        state = opt.state[p]
        v = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        g2 = p.grad.square()
        # Linear weights are [out, in]: rows are the out dim, columns the in dim
        row, col = g2.mean(1), g2.mean(0)

        rows.append((
            name.removesuffix(".weight"), v.sqrt().median().item(), share(v < V_EPS),
            share(row < STAT_CLAMP), share(col < STAT_CLAMP),
        ))  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 256, 2048])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args(argv)
    if min(*args.widths, args.steps) < 1:
        ap.error("--widths and --steps must be >= 1")
    torch.set_flush_denormal(True)
    print(f"# μAdam lr 0.03, {args.steps} steps, seed 0 | {time.strftime('%Y-%m-%d %H:%M')}")
    print("| width | tensor | median sqrt(v) | v < 1e-6 | rows < 1e-9 | cols < 1e-9 |")
    print("|---:|---|---:|---:|---:|---:|")
    for width in args.widths:
        for name, med, frac_v, frac_row, frac_col in regimes(
            width, args.steps, data_root=args.data_root
        ):
            print(
                f"| {width} | {name} | {med:.1e} | {frac_v:.2f} | {frac_row:.2f} | {frac_col:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
