"""Writers for tiny datasets in the exact on-disk formats, shared by the tests."""

import gzip
import struct
from pathlib import Path

import numpy as np

IDX_STEMS = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def write_idx(path, arr, gz=None):
    """The IDX format: 0x00 0x00, dtype code, ndim, big-endian uint32 dims, big-endian data."""
    code = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    arr = np.asarray(arr)
    header = bytes([0, 0, code[arr.dtype.type], arr.ndim]) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    gz = path.suffix == ".gz" if gz is None else gz
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist_dir(directory, marker=0, n_train=5, n_test=3, gz=True):
    """A complete tiny MNIST-style directory; every label equals ``marker`` to tell dirs apart."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(marker)
    for stem in IDX_STEMS:
        n = n_train if stem.startswith("train") else n_test
        if "images" in stem:
            arr = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        else:
            arr = np.full(n, marker, dtype=np.uint8)
        write_idx(directory / (stem + (".gz" if gz else "")), arr, gz=gz)
    return directory


def write_learnable_fashion(directory, n_train=512, n_test=256, seed=0):
    """Tiny Fashion-MNIST-shaped IDX files whose label is readable from the image (a bright
    band per class), so a few optimizer steps can lower the loss."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 6, :] = 255
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def run_concurrently(commands, workers: int = 4, **kwargs):
    """``subprocess.run`` of independent commands, several at once (a CLI error case is mostly
    interpreter start-up, so running them side by side cuts the suite's wall time)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    kwargs = {"capture_output": True, "text": True, "timeout": 300, **kwargs}
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda cmd: subprocess.run(cmd, **kwargs), commands))


def run_ranks(script: str, args, env: dict, world_size: int = 2, timeout: float = 240, cwd=None):
    """Run ``python -c script *args`` once per rank (RANK / LOCAL_RANK set) and wait; a rank
    that fails leaves the others waiting in a collective, so they are stopped at once.
    Returns [(returncode, stderr)] per rank."""
    import subprocess
    import sys
    import time

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(world_size)
    ]
    try:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outputs = [p.communicate() for p in procs]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outputs, strict=True)]
