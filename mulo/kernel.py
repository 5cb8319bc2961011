"""The fused CPU kernel for the LO network (mulo/kernels/lo_net.c): build once, call.

The C file is compiled with the system C compiler on first use and cached under
``$MULO_CACHE_DIR`` (default ``~/.cache/mulo``), keyed by source, flags and the CPU's
feature flags (it is built with -march=native, so a home directory shared across different
machines gets one binary per CPU). It is called through ctypes;
OpenMP splits a chunk's elements over torch's own thread team (torch ships libgomp under
its standard soname, so the kernel, loaded after torch, shares it: no second pool spinning
against the first). Without a compiler, or with
``MULO_DISABLE_KERNEL=1``, mulo warns once and uses the PyTorch path, which is slower.
"""

from __future__ import annotations

import ctypes
import hashlib
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
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")

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
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.lo_net_update.argtypes = [p, i64, i64, p, i64, p, i64, i64, p, p, p, p, p, p]
    lib.lo_net_update.argtypes += [ctypes.c_double]
    lib.lo_net_update.restype = None
    _lib = lib
    return lib


def usable(p: Tensor) -> bool:
    """Whether the fused kernel can step this population-stacked tensor."""
    return p.shape[0] == 1 and p.device.type == "cpu" and p.dtype == torch.float32


def net_update_(
    x: Tensor,
    rowterm: Tensor,
    colterm_t: Tensor,
    ncols: int,
    w1: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    p: Tensor,
    alpha: float,
) -> None:
    """p += alpha * d * exp(0.001 a) for the network (w1 [32, k] ... b3 [2]) on inputs x [k, n],
    the first layer starting from rowterm [R, 32] + colterm_t [32, C] (see lo_net.c).

    Every tensor must be contiguous float32 on the CPU; ``p`` is the chunk's [n] elements.
    """
    lib = load()
    k, n = x.shape
    args = [x, rowterm, colterm_t, w1, w2, b2, w3, b3, p]
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in args)
    lib.lo_net_update(
        x.data_ptr(), n, k, rowterm.data_ptr(), int(rowterm.shape[0] > 1), colterm_t.data_ptr(),
        int(colterm_t.shape[1] > 1), ncols, w1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
        w3.data_ptr(), b3.data_ptr(), p.data_ptr(), alpha,
    )  # fmt: skip
