"""Benchmark: one MuLO step vs one torch.optim.AdamW step on the same parameters.

    python -m experiments.bench_step                  # 1e5, 1e6, 1e7 parameters + transformer
    python -m experiments.bench_step --sizes 1e6 --reps 10 --chunk-size 32768

For each size it builds a μP MLP (784 -> w -> w -> w -> 10, w chosen to reach the size), and
then a μP transformer LM shaped like a small char-level GPT (d_model 128, 4 layers, context
64, 256 tokens: 0.87M parameters in 70 tensors, 38 of them 128-vectors), fills the gradients
once, and times LO and AdamW steps interleaved in one run, so the ratio is taken under the
same machine conditions. "LO one by one" is the same LO with ``foreach=False`` (every tensor
its own call), timed in the same loop. "LO GFLOP/s" is the network's nominal work (39->32->32->2,
4,672 FLOP per element) divided by the whole LO step time, features included; it is printed
next to a same-run 2048x2048 fp32 matmul. "peak extra MiB" is the step's resident-memory peak
above what was resident before it (params, grads and LO state excluded).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import platform
import statistics
import sys
import time
import warnings

import torch

import parametrizations as P
from mulo import MuLO, functional

NET_FLOP_PER_ELEMENT = 2 * (
    functional.NUM_FEATURES * functional.HIDDEN + functional.HIDDEN**2 + functional.HIDDEN * 2
)


def width_for(n_params: float, in_features=784, out_features=10, depth=3) -> int:
    # params = (in+1) w + (depth-1)(w^2 + w) + (w+1) out ; solve the quadratic for w
    a, b, c = depth - 1, in_features + 1 + (depth - 1) + out_features, out_features - n_params
    return max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def matmul_gflops(n=2048, reps=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    ms = statistics.median(timed(lambda: a @ b, reps))
    return 2 * n**3 / ms / 1e6


class PeakMemory:
    """Resident-set peak above the current RSS, via /proc (Linux); None where unsupported."""

    def __enter__(self):
        self.ok = sys.platform.startswith("linux")
        if self.ok:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so RSS is live data
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the high-water mark
                self.before = self._read("VmRSS")
            except OSError:
                self.ok = False
        return self

    def __exit__(self, *exc):
        self.mib = (self._read("VmHWM") - self.before) / 1024 if self.ok else None

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])  # kB
        raise OSError(key)


def transformer() -> torch.nn.Module:
    return P.transformer_lm(256, 128, 4, context=64, parametrization="mup")


def bench_model(model: torch.nn.Module, reps: int, chunk_size: int) -> dict:
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the meta-init warning is irrelevant to timing
        lo = MuLO(model, chunk_size=chunk_size)
        alone = MuLO(model, chunk_size=chunk_size, foreach=False)
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for s, p in zip(shadow, params, strict=True):
        s.grad = p.grad.clone()
    adamw = torch.optim.AdamW(shadow, lr=1e-3)
    lo.step()
    alone.step()
    adamw.step()  # state allocated, caches warm
    with PeakMemory() as mem:
        lo.step()
    lo_ms, alone_ms, adam_ms = [], [], []
    for _ in range(reps):  # interleaved: all see the same machine conditions
        lo_ms += timed(lo.step, 1)
        alone_ms += timed(alone.step, 1)
        adam_ms += timed(adamw.step, 3)
    lo_t, adam_t = statistics.median(lo_ms), statistics.median(adam_ms)
    return dict(
        params=n,
        tensors=len(params),
        lo_ms=lo_t,
        alone_ms=statistics.median(alone_ms),
        adamw_ms=adam_t,
        ratio=lo_t / adam_t,
        lo_gflops=NET_FLOP_PER_ELEMENT * n / lo_t / 1e6,
        peak_mib=mem.mib,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=functional.DEFAULT_CHUNK_SIZE)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-transformer", action="store_true", help="MLP rows only")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.chunk_size < 1 or any(s < 1 for s in args.sizes):
        ap.error("--reps, --chunk-size and --sizes must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(
        f"# {platform.node()} | {platform.processor() or platform.machine()} | "
        f"torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"chunk {args.chunk_size} | {time.strftime('%Y-%m-%d %H:%M')}"
    )
    models = [(f"MLP w={width_for(size)}", lambda s=size: P.mlp(
        784, width_for(s), 3, 10, parametrization="mup")) for size in args.sizes]  # fmt: skip
    if not args.no_transformer:
        models.append(("transformer d=128 L=4", transformer))
    rows = []
    for name, build in models:
        mm_before = matmul_gflops()
        torch.manual_seed(0)
        r = bench_model(build(), args.reps, args.chunk_size)
        r["matmul_gflops"] = (mm_before + matmul_gflops()) / 2
        rows.append({"model": name, **r})
    print(
        "| model | params | tensors | LO step ms | LO one by one ms | AdamW step ms | LO / AdamW | "
        "LO GFLOP/s | matmul GFLOP/s | LO / matmul | peak extra MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(
            f"| {r['model']} | {r['params']:.2e} | {r['tensors']} | {r['lo_ms']:.2f} | "
            f"{r['alone_ms']:.2f} | {r['adamw_ms']:.3f} | {r['ratio']:.1f}x | "
            f"{r['lo_gflops']:.1f} | {r['matmul_gflops']:.1f} | "
            f"{r['lo_gflops'] / r['matmul_gflops']:.0%} | {peak} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
