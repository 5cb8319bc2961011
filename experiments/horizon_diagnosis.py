"""Horizon diagnosis: does a time or schedule fix alone close the shipped μLO's 10k-step gap?

    python -m experiments.horizon_diagnosis                   # 10,000 steps, width 256, seed 0
    python -m experiments.horizon_diagnosis --quick           # a tiny run that checks every path
    python -m experiments.horizon_diagnosis --seeds 1 2 --variants plain rescale+cosine

The shipped μLO v1 (``mulo_m``) was meta-trained on runs of <= ~1000 steps; its only notion of
time is the 11 features tanh(t / tau - 1), fed by the step counter ``opt.state[p]["step"]``
(in ``mulo.functional`` the counter feeds ``time_features`` and nothing else: no bias
correction, no schedule). This trains the transfer study's horizon cell (μP MLP, Fashion-MNIST
14x14, batch 128, 3 hidden layers; ``mulo.train.train``, final train loss = mean of the last
10% of the minibatch losses) under variants that change only what the optimizer is fed, never
the library:

- ``plain``: as shipped (constant lr 1.0);
- ``clamp``: after every step each tensor's counter is clamped to <= ``--clamp-at`` (1000), so
  the time features stay where they were at the end of meta-training;
- ``rescale``: before every step the counter is set to t * ``--rescale-to`` / steps (the true
  count is kept here), so the whole run is seen as a 1000-step run;
- ``cosine``: linear warmup over ``--warmup-frac`` (5%) of the steps to 1.0, then cosine to 0,
  on every group's lr (which multiplies the learned step): ``mulo.baselines.build_schedule``;
- any ``+`` combination, e.g. ``clamp+cosine``, ``rescale+cosine``.

Every ``--log-every`` (50) steps (and at steps 1, 2, 4, ..., 32 for the log axis, and the
last) it records the per-tensor step RMS ||p_after - p_before|| / sqrt(numel) and the train
loss. Writes to ``--out``: ``runs.jsonl`` (one record per variant x seed: summary and curves;
a finished run is skipped when the command runs again, ``--force`` reruns it,
``--report-only`` runs nothing), ``horizon_diagnosis.md`` (table, with the transfer study's
10k-step references read from its ``cells.jsonl``), ``step_rms.png`` (one panel per variant),
``step_rms_per_lr.png`` (the same divided by the lr multiplier: the learned step itself)
and ``loss.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import parametrizations as P
from experiments._cli import fail
from mulo import MuLO, baselines, kernel, tasks
from mulo import functional as LF
from mulo import meta_weights as MW
from mulo.train import train

PARTS = ("clamp", "rescale", "cosine")
VARIANTS = ("plain", "clamp", "rescale", "cosine", "clamp+cosine", "rescale+cosine")
META_HORIZON = 1000  # the meta-training horizon of mulo_m (<= ~1000 inner steps)
EARLY_STEPS = (1, 2, 4, 8, 16, 32)  # extra probe points (0-based step index) for the log axis
STUDY_CELLS = Path(__file__).resolve().parents[1] / "experiments/results/transfer_study/cells.jsonl"
# the transfer study's horizon table, quoted when its cells.jsonl is not at hand
QUOTED = {"adamw": (0.0828, 0.0005, 0.003), "mulo": (0.2636, 0.0066, None)}
QUOTED_SOURCE = "experiments/results/transfer_study/horizon.md (10,000 steps, seeds 0-2)"
ROLE_COLORS = {"input": "tab:blue", "hidden": "tab:orange", "output": "tab:green"}
QUICK = dict(steps=120, width=32, eval_size=200)


# ---------------------------------------------------------------------------------------------
# Variants and the hooks that implement them


def parse_variant(name: str) -> frozenset[str]:
    """``"clamp+cosine"`` -> {"clamp", "cosine"}; ``"plain"`` -> {}."""
    name = name.strip()
    if name == "plain":
        return frozenset()
    parts = name.split("+")
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown variant {name!r}; use plain or a '+' combination of {', '.join(PARTS)}"
        )
    if {"clamp", "rescale"} <= set(parts):
        raise ValueError(f"variant {name!r}: clamp and rescale are alternatives, pick one")
    return frozenset(parts)


class TimeControl:
    """What the time features see, changed through the optimizer state only.

    ``clamp_at``: after every step each tensor's counter is clamped to <= clamp_at.
    ``rescale_to``: before every step the counter is set to ``t * rescale_to / steps``, t the
    true number of steps taken so far (kept here). ``feature_t_max`` is the largest counter any
    step read; ``state_t_max`` the largest left in the state after a step (and its hooks).
    """

    def __init__(self, opt: MuLO, steps: int, clamp_at: float | None, rescale_to: float | None):
        self.opt, self.steps = opt, steps
        self.clamp_at, self.rescale_to = clamp_at, rescale_to
        self.t = 0
        self.feature_t_max = 0.0
        self.state_t_max = 0.0
        self._handles = [
            opt.register_step_pre_hook(self._before),
            opt.register_step_post_hook(self._after),
        ]

    def _counters(self):
        return [s["step"] for s in self.opt.state.values() if "step" in s]

    def _before(self, opt, args, kwargs):
        counters = self._counters()
        if self.rescale_to is not None:
            for c in counters:
                c.fill_(self.t * self.rescale_to / self.steps)
        if counters:  # none before the first step: the state is created inside it (at 0)
            self.feature_t_max = max(self.feature_t_max, max(float(c.max()) for c in counters))

    def _after(self, opt, args, kwargs):
        self.t += 1
        counters = self._counters()
        if self.clamp_at is not None:
            for c in counters:
                c.clamp_(max=self.clamp_at)
        self.state_t_max = max(self.state_t_max, max(float(c.max()) for c in counters))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class StepProbe:
    """Per-tensor step RMS ||p_after - p_before|| / sqrt(numel) at the probed steps."""

    def __init__(self, opt: torch.optim.Optimizer, model: torch.nn.Module, every: int, steps: int):
        self.opt, self.every, self.last = opt, every, steps - 1
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.t = 0
        self.before: list[torch.Tensor] | None = None
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.rms: dict[str, list[float]] = {n: [] for n, _ in self.named}
        self._handles = [
            opt.register_step_pre_hook(self._pre),
            opt.register_step_post_hook(self._post),
        ]

    def probed(self, t: int) -> bool:
        return t % self.every == 0 or t in EARLY_STEPS or t == self.last

    def _pre(self, opt, args, kwargs):
        if self.probed(self.t):
            self.before = [p.detach().clone() for _, p in self.named]

    def _post(self, opt, args, kwargs):
        if self.before is not None:
            for (name, p), b in zip(self.named, self.before, strict=True):
                d = (p.detach() - b).double()
                self.rms[name].append(float(d.norm() / math.sqrt(d.numel())))
            self.steps.append(self.t)
            self.lrs.append(float(opt.param_groups[0]["lr"]))  # the lr this step used
            self.before = None
        self.t += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# One run


def run_one(variant: str, seed: int, cfg: dict, progress: bool = True) -> dict:
    """Train the horizon cell with μLO v1 under one variant; return its record."""
    parts = parse_variant(variant)
    steps = cfg["steps"]
    torch.set_flush_denormal(True)  # as experiments.evaluate: decaying accumulators go denormal
    task = tasks.build_task(
        "mlp", width=cfg["width"], depth=cfg["depth"], parametrization="mup", seed=seed,
        batch_size=cfg["batch_size"], dataset="fashion_mnist", data_root=cfg["data_root"],
        eval_size=cfg["eval_size"],
    )  # fmt: skip
    opt = MuLO(task.model)  # the shipped v1, constant lr 1.0
    warmup = round(cfg["warmup_frac"] * steps) if "cosine" in parts else 0
    scheduler = (
        baselines.build_schedule(opt, "cosine", steps=steps, warmup=warmup)
        if "cosine" in parts
        else None
    )
    clock = TimeControl(
        opt, steps,
        clamp_at=cfg["clamp_at"] if "clamp" in parts else None,
        rescale_to=cfg["rescale_to"] if "rescale" in parts else None,
    )  # fmt: skip
    probe = StepProbe(opt, task.model, cfg["log_every"], steps)
    losses: list[float] = []

    def log(record: dict) -> None:
        if "train_loss" in record and not record.get("diverged"):
            losses.append(record["train_loss"])

    summary = train(
        task, opt, scheduler, steps=steps, eval_interval=0, log=log, progress=progress,
        desc=f"{variant} s{seed}",
    )  # fmt: skip
    clock.remove()
    probe.remove()
    roles = {n: r.value for n, r in P.get("mup").roles(task.model).items()}
    return {
        "variant": variant,
        "seed": seed,
        "identity": identity(variant, seed, cfg),
        **{k: cfg[k] for k in ("steps", "width", "depth", "batch_size", "eval_size")},
        "clamp_at": clock.clamp_at,
        "rescale_to": clock.rescale_to,
        "warmup": warmup,
        **summary,
        "feature_t_max": clock.feature_t_max,
        "state_t_max": clock.state_t_max,
        "roles": roles,
        "curves": curves(probe, losses),
        "host": platform.node(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def curves(probe: StepProbe, losses: list[float]) -> dict:
    """The probed steps' step RMS and lr, with the train loss at that step and its mean over
    the steps since the previous probe (the per-batch loss alone is noisy)."""
    out = {"step": [], "lr": [], "train_loss": [], "train_loss_mean": [], "rms": {}}
    keep = [i for i, t in enumerate(probe.steps) if t < len(losses)]
    prev = -1
    for i in keep:
        t = probe.steps[i]
        window = losses[prev + 1 : t + 1]
        out["step"].append(t)
        out["lr"].append(probe.lrs[i])
        out["train_loss"].append(losses[t])
        out["train_loss_mean"].append(sum(window) / len(window))
        prev = t
    out["rms"] = {n: [v[i] for i in keep] for n, v in probe.rms.items()}
    return out


def identity(variant: str, seed: int, cfg: dict) -> str:
    parts = parse_variant(variant)
    what = {
        "variant": "+".join(sorted(parts)) or "plain", "seed": seed,
        **{k: cfg[k] for k in ("steps", "width", "depth", "batch_size", "eval_size")},
        "data_root": None if cfg["data_root"] is None else str(cfg["data_root"]),
        "clamp_at": cfg["clamp_at"] if "clamp" in parts else None,
        "rescale_to": cfg["rescale_to"] if "rescale" in parts else None,
        "warmup_frac": cfg["warmup_frac"] if "cosine" in parts else None,
        "log_every": cfg["log_every"], "meta_weights": meta_digest(),
    }  # fmt: skip
    return json.dumps(what, sort_keys=True)


def meta_digest() -> str:
    return MW.digest(MW.default_meta_weights("mup")[0])


# ---------------------------------------------------------------------------------------------
# Provenance


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def library_provenance() -> str:
    """Which code ran: the git commit of the checkout (if any, and whether the library files
    differ from it) and a hash of the files that make the step."""
    root = Path(LF.__file__).resolve().parents[1]
    files = ["mulo/functional.py", "mulo/optim.py", "mulo/kernel.py", "mulo/kernels/lo_net.c"]
    h = hashlib.sha1()
    for f in files:
        h.update((root / f).read_bytes())
    fused = LF.USE_KERNEL and kernel.load() is not None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *files], cwd=root, capture_output=True,
            text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        git = f"git {commit}" + (" + uncommitted library edits" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        git = "not a git checkout"
    step = "fused C kernel" if fused else "PyTorch path"
    return f"library {root} ({git}; step code sha1 {h.hexdigest()[:10]}; {step})"


# ---------------------------------------------------------------------------------------------
# Records, references, table


def load_runs(path: Path) -> list[dict]:
    """Finished runs; a torn last line (a crash mid-write) is cut off."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    runs = []
    for line in text.splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def study_references(path: Path, steps: int, width: int, depth: int) -> tuple[dict, str]:
    """The transfer study's horizon cells at these settings: {entry: (mean, std, lr, n)} for
    mulo (v1 plain), adamw and muadam at the lr its sweep chose (lowest seed-0 loss)."""
    cells = [
        c for c in load_runs(path) if c.get("study") == "horizon" and c.get("steps") == steps
        and c.get("width") == width and c.get("depth") == depth
    ]  # fmt: skip
    refs = {}
    for entry in ("mulo", "adamw", "muadam"):
        by_lr: dict = {}
        for c in cells:
            if c.get("entry") == entry:
                by_lr.setdefault(c.get("lr"), []).append(c)
        if not by_lr:
            continue
        tune = min(min(c["seed"] for c in rs) for rs in by_lr.values())
        scored = {
            lr: [c["final_train_loss"] for c in rs if c["seed"] == tune] for lr, rs in by_lr.items()
        }
        lr = min((lr for lr in scored if scored[lr]), key=lambda lr: statistics.fmean(scored[lr]))
        values = [c["final_train_loss"] for c in by_lr[lr]]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        refs[entry] = (statistics.fmean(values), std, lr, len(values))
    if "mulo" in refs and "adamw" in refs:
        return refs, f"{path} (study horizon, {steps} steps, width {width})"
    quoted = {k: (*v, 3) for k, v in QUOTED.items()}
    return quoted, QUOTED_SOURCE + " (quoted: the cells were not found)"


def _mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    if any(not math.isfinite(v) for v in values):
        return "diverged"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def rms_at(run: dict, name: str, t: int) -> float:
    """The learned step of tensor ``name`` near step ``t``: step RMS / lr multiplier, averaged
    over the last 5 probes up to ``t`` with a nonzero lr (smooths the per-batch noise)."""
    c = run["curves"]
    idx = [i for i, s in enumerate(c["step"]) if s <= t and c["lr"][i] > 0]
    if not idx:
        return float("nan")
    vals = [c["rms"][name][i] / c["lr"][i] for i in idx[-5:]]
    return sum(vals) / len(vals)


def table(runs: list[dict], variants: list[str], refs: dict, ref_source: str, cfg: dict) -> str:
    steps = cfg["steps"]
    rows = [
        "| variant | seeds | final train loss | eval loss | eval acc | gap closed | "
        "hidden1.w step RMS/lr t≈1k → end | lr at end | max t fed to the time features | s / run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    plain = {r["seed"]: r["final_train_loss"] for r in by_variant.get("plain", [])}
    adamw = refs.get("adamw", (float("nan"),))[0]
    for v, rs in by_variant.items():
        if not rs:
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        final = [r["final_train_loss"] for r in rs]
        # plain on the same seeds where it ran them, else every plain seed, else the study's
        same = [plain[r["seed"]] for r in rs if r["seed"] in plain]
        same = same if len(same) == len(rs) else list(plain.values())
        plain_ref = statistics.fmean(same) if same else refs.get("mulo", (float("nan"),))[0]
        closed = "-"
        if steps == 10000 and all(math.isfinite(x) for x in final) and plain_ref > adamw:
            closed = f"{(plain_ref - statistics.fmean(final)) / (plain_ref - adamw):+.0%}"
        end = rs[0]["curves"]["step"][-1] if rs[0]["curves"]["step"] else steps
        k = min(META_HORIZON, steps // 10)
        r1k = statistics.fmean(rms_at(r, "hidden1.weight", k) for r in rs)
        rend = statistics.fmean(rms_at(r, "hidden1.weight", end) for r in rs)
        lr_end = rs[0]["curves"]["lr"][-1] if rs[0]["curves"]["lr"] else float("nan")
        rows.append(
            f"| {v} | {','.join(str(r['seed']) for r in rs)} | {_mean_std(final)} | "
            f"{_mean_std([r.get('eval_loss', float('nan')) for r in rs])} | "
            f"{_mean_std([r.get('eval_accuracy', float('nan')) for r in rs])} | {closed} | "
            f"{r1k:.2e} → {rend:.2e} | {lr_end:.2g} | "
            f"{max(r['feature_t_max'] for r in rs):.4g} | "
            f"{statistics.fmean(r['seconds'] for r in rs):.0f} |"
        )
    ref_rows = []
    for entry, label in (("mulo", "μLO v1 plain (study)"), ("adamw", "AdamW + cosine (study)"),
                         ("muadam", "μAdam + cosine (study)")):  # fmt: skip
        if entry in refs:
            mean, std, lr, n = refs[entry]
            lr_txt = "" if lr is None else f", lr {lr:g}"
            ref_rows.append(
                f"| {label}{lr_txt} | {n} seeds | {mean:.4f} ± {std:.4f} | | | | | | | |"
            )
    note = (
        f"References ({ref_source}); they are {'this' if steps == 10000 else 'NOT this'} "
        f"run's horizon."
    )
    return "\n".join(rows + ref_rows) + "\n\n" + note


def tensor_table(runs: list[dict], variants: list[str], steps: int) -> str:
    """Per tensor: the learned step (step RMS / lr) of plain at t ~ 100, 1k and the end, and for
    every variant the ratio end / 1k (> 1: the step grows past the meta-training horizon)."""
    by_variant = {
        v: min((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        for v in variants
        if any(r["variant"] == v for r in runs)
    }
    if not by_variant:
        return ""
    first = next(iter(by_variant.values()))
    k = min(META_HORIZON, steps // 10)
    base = "plain" if "plain" in by_variant else next(iter(by_variant))
    cols = [f"{base} t≈{k // 10}", f"{base} t≈{k}", f"{base} end"]
    cols += [f"{v} end/{k}" for v in by_variant]
    rows = [
        "| tensor | role | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for name, role in first["roles"].items():
        b = by_variant[base]
        vals = [rms_at(b, name, k // 10), rms_at(b, name, k), rms_at(b, name, steps)]
        cells = [f"{x:.2e}" for x in vals]
        cells += [f"{rms_at(r, name, steps) / rms_at(r, name, k):.2f}" for r in by_variant.values()]
        rows.append(f"| {name} | {role} | " + " | ".join(cells) + " |")
    return (
        f"Learned step per tensor, step RMS / lr multiplier (seed {first['seed']}; each value "
        f"the mean of the last 5 probes up to t with a nonzero lr):\n\n" + "\n".join(rows)
    )


def header(cfg: dict, provenance: str, runs: list[dict]) -> str:
    finished = sorted(r["finished"] for r in runs if r.get("finished"))
    where = sorted({f"{r['host']} ({r['cpu']}), {r['threads']} thread(s)" for r in runs})
    ran = (
        f"- Runs finished {finished[0]} to {finished[-1]} on {'; '.join(where)}."
        if finished
        else "- No runs yet."
    )
    return "\n".join(
        [
            "# Horizon diagnosis: μLO v1 (mulo_m) at a long horizon, time/schedule fixes only",
            "",
            ran,
            f"- Report built {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {platform.node()} "
            f"({cpu_model()}), torch {torch.__version__}, {torch.get_num_threads()} thread(s).",
            f"- Code: {provenance}; meta-weights {meta_digest()}"
            + (f"; {cfg['note']}" if cfg.get("note") else "")
            + ".",
            f"- Task: the transfer study's horizon cell: μP MLP width {cfg['width']}, "
            f"{cfg['depth']} hidden layers, Fashion-MNIST 14x14, batch {cfg['batch_size']}, "
            f"{cfg['steps']} steps; final train loss = mean of the last 10% of the per-step "
            f"minibatch losses; eval = first {cfg['eval_size']} test images.",
            f"- Variants: clamp = counter clamped to <= {cfg['clamp_at']:g} after every step; "
            f"rescale = counter set to t·{cfg['rescale_to']:g}/{cfg['steps']} before every step; "
            f"cosine = lr warmup over {cfg['warmup_frac']:.0%} of the steps to 1.0, then "
            f"cosine to 0 (mulo.baselines.build_schedule).",
            "- gap closed = (plain − variant) / (plain − AdamW), plain from this table on the "
            "variant's seeds, AdamW from the study (10k steps only). Step RMS = ‖Δp‖/√numel; "
            "the table divides it by the lr multiplier (the learned step itself) and averages "
            "the last 5 probes (every 50 steps) up to t.",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Plots


def _import_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step_rms(
    runs: list[dict], variants: list[str], path: Path, mark: float, per_lr: bool = False
):
    plt = _import_pyplot()
    shown = [v for v in variants if any(r["variant"] == v for r in runs)]
    if not shown:
        return
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False,
                             sharex=True, sharey=True)  # fmt: skip
    for ax, v in zip(axes.flat, shown, strict=False):
        run = min((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        c = run["curves"]
        x = [s + 1 for s in c["step"]]
        seen: dict[str, int] = {}
        for name, ys in c["rms"].items():
            role = run["roles"].get(name, "vector")
            if per_lr:
                ys = [y / lr if lr > 0 else float("nan") for y, lr in zip(ys, c["lr"], strict=True)]
            k = seen[role] = seen.get(role, -1) + 1
            if role == "vector":
                style = dict(color="0.5", lw=0.8, ls=(":", "-.", "--", (0, (1, 3)))[k % 4])
            else:
                style = dict(color=ROLE_COLORS.get(role, "k"), lw=1.2, ls=("-", "--")[k % 2])
            ax.plot(x, ys, label=f"{name} ({role})", **style)
        ax.axvline(mark, color="r", lw=0.8, alpha=0.5)
        ax.set(xscale="log", yscale="log", title=f"{v} (seed {run['seed']})")
        ax.grid(alpha=0.3, which="both")
    spare = list(axes.flat[len(shown) :])
    for ax in spare:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step t")
    for ax in axes[:, 0]:
        ax.set_ylabel("step RMS / lr multiplier" if per_lr else "step RMS ‖Δp‖/√numel")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if spare:  # the legend in an empty panel, clear of the curves
        spare[0].legend(handles, labels, fontsize=8, loc="center", title="tensor (role)")
    else:
        axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    what = "learned step (Δp / lr multiplier)" if per_lr else "per-tensor step RMS"
    fig.suptitle(f"μLO v1 {what}; red line: t = {mark:g} (the clamp / rescale target)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(
    runs: list[dict], variants: list[str], refs: dict, path: Path, steps: int, mark: float
):
    plt = _import_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, v in enumerate(variants):
        rs = [r for r in runs if r["variant"] == v]
        if not rs:
            continue
        run = min(rs, key=lambda r: r["seed"])
        c = run["curves"]
        x = [s + 1 for s in c["step"]]
        for ax in axes:
            ax.plot(x, c["train_loss_mean"], color=f"C{i}", lw=1.1,
                    label=f"{v}: {run['final_train_loss']:.3f}")  # fmt: skip
    for entry, color, label in (("adamw", "k", "AdamW+cosine (study)"),
                                ("mulo", "0.5", "μLO v1 plain (study)")):  # fmt: skip
        if entry in refs and steps == 10000:
            for ax in axes:
                ax.axhline(refs[entry][0], color=color, ls="--", lw=0.8,
                           label=f"{label}: {refs[entry][0]:.3f}")  # fmt: skip
    axes[0].set(xscale="log", yscale="log", xlabel="step t", ylabel="train loss (50-step mean)")
    axes[1].set(yscale="log", xlabel="step t", xlim=(min(steps, mark) // 2, steps + 1))
    tail = [
        y
        for r in runs
        for t, y in zip(r["curves"]["step"], r["curves"]["train_loss_mean"], strict=True)
        if t >= min(steps, mark) // 2
    ] or [1.0]
    shown = [refs[e][0] for e in ("adamw", "mulo") if e in refs and steps == 10000]
    axes[1].set_ylim(min(tail + shown) * 0.85, max(tail) * 1.1)
    for ax in axes:
        ax.axvline(mark, color="r", lw=0.8, alpha=0.5)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, title="final train loss (seed 0)", title_fontsize=7)
    fig.suptitle("μLO v1 train loss vs step (left: log-log; right: the long tail)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as the Hydra apps
        fail(message)


def _list(text: str, cast=str) -> list:
    return [cast(x) for x in text.replace(",", " ").split()]


def parse_args(argv: list[str] | None) -> dict:
    p = _Parser(prog="python -m experiments.horizon_diagnosis", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 10000)")
    p.add_argument("--width", type=int, default=None, help="MLP width (default 256)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers (default 3)")
    p.add_argument("--seeds", nargs="+", default=["0"], help="e.g. 0 1 2 or 0,1,2")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   help=f"default: all of {', '.join(VARIANTS)}")  # fmt: skip
    p.add_argument("--out", type=Path, default=None,
                   help="output dir (default experiments/results/horizon_diagnosis, "
                   "or its quick/ subdir with --quick)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-size", type=int, default=None, help="held-out images (default 2000)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST dir (default: the lookup)")
    p.add_argument("--clamp-at", type=float, default=None, help="default 1000 (quick: steps/4)")
    p.add_argument("--rescale-to", type=float, default=None, help="default 1000 (quick: steps/4)")
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--study-cells", type=Path, default=STUDY_CELLS)
    p.add_argument("--note", default="", help="a provenance note for the header")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny run: {QUICK['steps']} steps, width {QUICK['width']}")  # fmt: skip
    p.add_argument("--force", action="store_true", help="rerun runs already in runs.jsonl")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the table and plots from runs.jsonl")  # fmt: skip
    a = p.parse_args(argv)
    quick = QUICK if a.quick else {}
    cfg = {
        "steps": a.steps if a.steps is not None else quick.get("steps", 10000),
        "width": a.width if a.width is not None else quick.get("width", 256),
        "depth": a.depth,
        "batch_size": a.batch_size,
        "eval_size": a.eval_size if a.eval_size is not None else quick.get("eval_size", 2000),
        "data_root": a.data_root,
        "warmup_frac": a.warmup_frac,
        "log_every": a.log_every,
        "threads": a.threads,
        "note": a.note,
        "force": a.force,
        "report_only": a.report_only,
        "progress": not a.no_progress,
        "study_cells": a.study_cells,
    }
    default_t = max(1, cfg["steps"] // 4) if a.quick else META_HORIZON
    cfg["clamp_at"] = a.clamp_at if a.clamp_at is not None else default_t
    cfg["rescale_to"] = a.rescale_to if a.rescale_to is not None else default_t
    try:
        cfg["seeds"] = [s for arg in a.seeds for s in _list(arg, int)]
    except ValueError:
        fail(f"--seeds must be integers, got {' '.join(a.seeds)}")
    cfg["variants"] = [v for arg in a.variants for v in _list(arg)]
    out = a.out or Path("experiments/results/horizon_diagnosis")
    cfg["out"] = out / "quick" if a.quick and a.out is None else out
    for k in ("steps", "width", "depth", "batch_size", "eval_size", "log_every", "threads"):
        if cfg[k] < 1:
            fail(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if not cfg["seeds"] or not cfg["variants"]:
        fail("--seeds and --variants must each name at least one value")
    if not 0 <= cfg["warmup_frac"] < 1:
        fail(f"--warmup-frac must be in [0, 1), got {cfg['warmup_frac']}")
    if not (cfg["clamp_at"] > 0 and cfg["rescale_to"] > 0):
        fail("--clamp-at and --rescale-to must be > 0")
    for v in cfg["variants"]:
        try:
            parse_variant(v)
        except ValueError as e:
            fail(str(e))
    if len(set(cfg["variants"])) != len(cfg["variants"]):
        fail("--variants names a variant twice")
    return cfg


def report(cfg: dict, runs_path: Path, provenance: str) -> str:
    """Rebuild the table and plots from every finished run at these settings."""
    out, variants = cfg["out"], cfg["variants"]
    keys = ("steps", "width", "depth", "batch_size", "eval_size")
    latest = {r["identity"]: r for r in load_runs(runs_path)}  # a --force rerun replaces
    runs = [r for r in latest.values() if all(r.get(k) == cfg[k] for k in keys)]
    # every variant with runs at these settings, the requested ones first
    variants = variants + [v for v in VARIANTS if v not in variants and any(
        r["variant"] == v for r in runs)]  # fmt: skip
    refs, source = study_references(cfg["study_cells"], cfg["steps"], cfg["width"], cfg["depth"])
    md = header(cfg, provenance, runs) + "\n\n" + table(runs, variants, refs, source, cfg) + "\n"
    md += "\n" + tensor_table(runs, variants, cfg["steps"]) + "\n"
    (out / "horizon_diagnosis.md").write_text(md)
    mark = cfg["clamp_at"]
    plot_step_rms(runs, variants, out / "step_rms.png", mark)
    plot_step_rms(runs, variants, out / "step_rms_per_lr.png", mark, per_lr=True)
    plot_loss(runs, variants, refs, out / "loss.png", cfg["steps"], mark)
    return md


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg["threads"]))
    torch.set_num_threads(cfg["threads"])
    out: Path = cfg["out"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        runs_path = out / "runs.jsonl"
        done = {r["identity"] for r in load_runs(runs_path)}
        plan = [] if cfg["report_only"] else [(v, s) for s in cfg["seeds"] for v in cfg["variants"]]
        provenance = library_provenance()
        print(provenance, flush=True)
        bar = tqdm(plan, desc="runs", disable=not cfg["progress"], dynamic_ncols=True)
        for variant, seed in bar:
            if identity(variant, seed, cfg) in done and not cfg["force"]:
                continue
            bar.set_postfix(run=f"{variant} s{seed}")
            record = run_one(variant, seed, cfg, progress=cfg["progress"])
            record.update(code=provenance, note=cfg["note"])
            with runs_path.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")
            tqdm.write(
                f"{variant} seed {seed}: final train loss {record['final_train_loss']:.4f}, "
                f"eval acc {record.get('eval_accuracy', float('nan')):.4f}, "
                f"{record['seconds']:.0f} s"
            )
        bar.close()
        md = report(cfg, runs_path, provenance)
    except (ValueError, OSError, KeyError) as e:
        fail(str(e) if not isinstance(e, KeyError) else f"missing key {e}")
    print(md)
    print(f"-> {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
