"""The fused CPU kernel of the learned optimizer (mulo/kernels/lo_net.c): build once, call.

The C file is compiled with the system C compiler on first use and cached under
``$MULO_CACHE_DIR`` (default ``~/.cache/mulo``), keyed by source, flags and the CPU's
feature flags (it is built with -march=native, so a home directory shared across different
machines gets one binary per CPU). It is called through ctypes on population-stacked tensors
(``accumulate_`` then ``step_``; see lo_net.c). OpenMP splits the elements over torch's own
thread team (torch ships libgomp under its standard soname, so the kernel, loaded after torch,
shares it: no second pool spinning against the first). Without a compiler, or with
``MULO_DISABLE_KERNEL=1``, mulo warns once and uses the PyTorch path, which is slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
from torch import Tensor

from mulo._atomic import atomic_path

SOURCE = Path(__file__).parent / "kernels" / "lo_net.c"
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fopenmp",
    "-std=gnu11",
    "-shared",
    "-fPIC",
)

_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("MULO_CACHE_DIR", Path.home() / ".cache" / "mulo")) / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"lo_net-{platform.machine()}-{key}.so"
    if not target.exists():  # built beside it, then renamed: no one ever loads a partial file
        with atomic_path(target, suffix=".so", mode=0o777) as tmp:
            subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"],
                check=True,
                capture_output=True,
                timeout=120,
            )
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (after one warning) when it cannot be built."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("MULO_DISABLE_KERNEL", "") not in ("", "0"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[:1] or [str(e)]
        warnings.warn(
            f"mulo: fused CPU kernel unavailable ({reason[0]}); using the slower PyTorch path",
            stacklevel=2,
        )
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.lo_accumulate.argtypes = [i64, i64, i64, i64] + [p] * 8
    lib.lo_accumulate.restype = None
    lib.lo_step.argtypes = [i64, i64, i64, i64] + [p] * 12 + [f32, f32, i64] + [p] * 4
    lib.lo_step.restype = None
    lib.lo_block.argtypes, lib.lo_block.restype = [], i64
    _lib = lib
    return lib


def geometry(shape: tuple[int, ...], dims: tuple[int, int] | None) -> tuple[int, int, int] | None:
    """(A, B, C) = (shape[0], shape[1], prod(shape[2:])) when the kernel can step this tensor:
    rank >= 2, non-empty, and its factored dims ``dims`` are its first two. ``shape`` excludes
    the population dim."""
    if dims is None or set(dims) != {0, 1} or math.prod(shape) == 0:
        return None
    return shape[0], shape[1], math.prod(shape[2:])


def usable(*tensors: Tensor) -> bool:
    """Whether these population-stacked tensors can go to the kernel as they are."""
    return all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors
    )


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _blocks(n: int) -> int:
    """Blocks of parallel work (one partial sum each) for n elements."""
    block = load().lo_block()
    return -(-n // block)


def accumulate_(geo, g, p, mv, w, f0, f1) -> Tensor:
    """Update the moments ``mv`` [P, 4, n] in place (``w`` [P, 4] = 1 - beta) and return the
    sums of squares [P, 16] (float64) of the per-element channels, read after the update.
    ``f0`` [P, 3, n0] / ``f1`` [P, 3, n1]: the factored rsqrt factors (see lo_net.c)."""
    a, b, c = geo
    pop, n = p.shape[0], a * b * c
    partial = torch.empty(pop, _blocks(n), 16, dtype=torch.float64)
    sums = torch.empty(pop, 16, dtype=torch.float64)
    args = [g, p, mv, w, f0, f1]
    assert usable(*args)
    load().lo_accumulate(pop, a, b, c, *map(_ptr, args), _ptr(partial), _ptr(sums))
    return sums


def step_(geo, g, p, mv, f0, f1, w1, t0, t1, w2, b2, w3, b3, *, exp_mult, exp_cap, alpha, out):
    """The network on every element. With ``out`` None: ``p += alpha[q] * u`` (u finite);
    else ``out`` [P, n] gets u (0 where not finite) and the return value is the sum of d^2
    [P] (float64) over the finite u. ``alpha`` [P] float32."""
    a, b, c = geo
    pop, n = p.shape[0], a * b * c
    normalised = out is not None
    partial = torch.empty(pop, _blocks(n) if normalised else 0, dtype=torch.float64)
    dsq = torch.zeros(pop if normalised else 0, dtype=torch.float64)
    args = [g, p, mv, f0, f1, w1, t0, t1, w2, b2, w3, b3]
    assert usable(*args, alpha) and (out is None or usable(out))
    load().lo_step(
        pop, a, b, c, *map(_ptr, args), exp_mult, exp_cap, int(normalised), _ptr(alpha),
        _ptr(out) if normalised else 0, _ptr(partial), _ptr(dsq),
    )  # fmt: skip
    return dsq
