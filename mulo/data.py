"""Datasets as in-memory tensors: Fashion-MNIST / MNIST (IDX), CIFAR-10 (pickles), bytes of text.

    data = load_mnist_like("fashion_mnist")              # finds the files, or one clear error
    (xtr, ytr), (xte, yte) = prepare_images(data, pool=2, flatten=True)  # 14x14, mean 0 / std 1
    batches = TensorBatcher(xtr, ytr, seed=0)
    x, y = batches.sample(128)                           # [128, 196], [128]
    x, y = batches.sample_population(8, 128)             # [8, 128, 196]: one batch for all 8

Nothing here iterates a DataLoader: the whole train set is one tensor and a batch is one
indexing op driven by a seeded ``torch.Generator``, so data never dominates a step, and a
resumed run (``state_dict`` / ``load_state_dict``) draws the same batches.

Where Fashion-MNIST / MNIST are looked for, first hit wins:
  1. ``root=`` (a config path): that directory or its ``fashion-mnist/``-style subdirectory; when
     given, nothing else is searched;
  2. ``$FASHION_MNIST_DIR`` / ``$MNIST_DIR``, then ``$MULO_DATA_DIR/<subdir>``;
  3. the system directory of the Debian/Ubuntu package ``dataset-fashion-mnist``
     (``/usr/share/datasets/fashion-mnist``; MNIST has no such package);
  4. the user cache ``$MULO_CACHE_DIR/<name>`` (default ``~/.cache/mulo/<name>``);
  5. a download of the canonical files, md5-checked, into the cache (or into ``root`` with
     ``download=True``). It is automatic when no ``root`` is given (``MULO_DOWNLOAD=0`` turns it
     off) and fails fast without internet. Failing all that, a :class:`DatasetNotFoundError`
     lists every option in one line.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mulo._atomic import atomic_path

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------------
# Where data lives


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is in none of the places looked; the message (one line) says how to fix it."""


SPLIT_FILES = {  # split -> (images, labels), file names without the optional ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST_LIKE = {
    "fashion_mnist": dict(
        title="Fashion-MNIST",
        env="FASHION_MNIST_DIR",
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        apt="dataset-fashion-mnist",
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "mnist": dict(
        title="MNIST",
        env="MNIST_DIR",
        subdirs=("mnist", "MNIST/raw"),
        apt=None,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}

# Directories that system packages install into (module constants so tests can point them away).
SYSTEM_DIRS: dict[str, Path] = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
TEXT_CORPUS_DIRS: tuple[Path, ...] = (  # Debian/Ubuntu `fortunes`, then other distros' layouts
    Path("/usr/share/games/fortunes"),
    Path("/usr/share/games/fortune"),
    Path("/usr/share/fortune"),
)
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation: a dead network fails fast instead of hanging


def cache_dir(name: str) -> Path:
    """``$MULO_CACHE_DIR/<name>``, default ``$XDG_CACHE_HOME/mulo/<name>`` or ``~/.cache/...``."""
    root = os.environ.get("MULO_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mulo"
    return Path(root).expanduser() / name


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10"}.get(key, key)
    known = [*MNIST_LIKE, "cifar10"]
    if key not in known:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {', '.join(known)}")
    return key


def _with_subdirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    return [root] + [root / s for s in subdirs]


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (``*-idx1-ubyte`` / ``*-idx3-ubyte``, gzipped or not) into an array.

    Header: two zero bytes, a dtype code, the number of dims, then each dim as a big-endian
    uint32; the data follows in C order. Raises ValueError (naming the file) on anything else.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dims, {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header says {dims} of {dtype.name} = {expected} bytes, "
            f"file has {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def _idx_path(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _complete_idx_dir(directory: Path) -> bool:
    stems = [s for pair in SPLIT_FILES.values() for s in pair]
    return all(_idx_path(directory, s) is not None for s in stems)


def _read_idx_dir(directory: Path) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for split, (img_stem, lbl_stem) in SPLIT_FILES.items():
        img_path, lbl_path = _idx_path(directory, img_stem), _idx_path(directory, lbl_stem)
        x, y = read_idx(img_path), read_idx(lbl_path)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"{img_path} / {lbl_path}: expected images [N,H,W] and labels [N], "
                f"got {x.shape} and {y.shape}"
            )
        out[split] = (torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y.astype(np.int64)))
    return out


def load_mnist_like(
    name: str = "fashion_mnist", root: PathLike | None = None, download: bool | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Fashion-MNIST or MNIST as ``{"train": (x, y), "test": (x, y)}``.

    ``x`` is uint8 ``[N, 28, 28]``, ``y`` int64 ``[N]`` (60000 / 10000 for the real sets). See
    the module docstring for where the files are looked for. ``download`` fetches missing files
    from the canonical source, verifying each file's md5; ``None`` (the default) means: yes
    unless an explicit ``root`` was given, and ``$MULO_DOWNLOAD`` (``0``/``1``) decides if set.
    """
    name = _canonical(name)
    if name not in MNIST_LIKE:
        raise ValueError(f"{name!r} is not an IDX dataset; choose one of {', '.join(MNIST_LIKE)}")
    spec = MNIST_LIKE[name]
    looked: list[str] = []
    if root is not None:
        candidates = _with_subdirs(Path(root).expanduser(), spec["subdirs"])
        looked.append(f"root={root}")
    else:
        candidates = []
        for var, subdirs in ((spec["env"], ()), ("MULO_DATA_DIR", spec["subdirs"])):
            value = os.environ.get(var)
            looked.append(f"${var}={value}" if value else f"${var} (unset)")
            if value:
                candidates += _with_subdirs(Path(value).expanduser(), subdirs)
        for directory in (SYSTEM_DIRS.get(name), cache_dir(name)):
            if directory is not None:
                candidates.append(directory)
                looked.append(str(directory))
    for directory in candidates:
        if _complete_idx_dir(directory):
            return _read_idx_dir(directory)

    target = Path(root).expanduser() if root is not None else cache_dir(name)
    if download is None:
        env = os.environ.get("MULO_DOWNLOAD", "").strip()
        download = _env_flag("MULO_DOWNLOAD") if env else root is None
    if download:
        _download_mnist_like(name, target, looked)
        return _read_idx_dir(target)
    raise DatasetNotFoundError(_mnist_not_found_message(name, looked))


def _mnist_not_found_message(name: str, looked: list[str], reason: str = "") -> str:
    spec = MNIST_LIKE[name]
    fixes = [
        "pass root=DIR (the config's data path) holding train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]",
        f"set {spec['env']}=DIR, or MULO_DATA_DIR=ROOT with ROOT/{spec['subdirs'][0]}",
    ]
    if spec["apt"]:
        fixes.append(f"`sudo apt-get install {spec['apt']}` (installs {SYSTEM_DIRS[name]})")
    fixes += [
        f"put the files in {cache_dir(name)}",
        f"download them (needs internet; automatic without root=, or download=True / "
        f"MULO_DOWNLOAD=1) from {spec['mirrors'][0]}",
    ]
    why = f" ({reason})" if reason else ""
    msg = f"{spec['title']} not found{why}; looked in: {', '.join(looked)}. "
    return " ".join((msg + f"Fix with one of: {'; '.join(fixes)}.").split())  # one line


def _download_mnist_like(name: str, target: Path, looked: list[str]) -> None:
    spec = MNIST_LIKE[name]
    target.mkdir(parents=True, exist_ok=True)
    for filename, md5 in spec["md5"].items():
        stem = filename.removesuffix(".gz")
        if _idx_path(target, stem) is not None:
            continue
        errors = []
        for mirror in spec["mirrors"]:
            try:
                download_file(mirror + filename, target / filename, md5)
                break
            except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
                errors.append(f"{mirror + filename}: {e}")
        else:
            reason = "download failed: " + " | ".join(errors)
            raise DatasetNotFoundError(_mnist_not_found_message(name, looked, reason))


def download_file(url: str, dest: PathLike, md5: str | None = None) -> Path:
    """Fetch ``url`` into ``dest`` atomically: a temp file in the same directory, md5-checked
    (when ``md5`` is given), then renamed. On any failure nothing is left at ``dest``."""
    dest = Path(dest)
    digest = hashlib.md5(usedforsecurity=False)
    with atomic_path(dest, suffix=".part") as tmp:
        with (
            open(tmp, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError(f"md5 mismatch: got {digest.hexdigest()}, expected {md5}")
    return dest


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)


def load_cifar10(root: PathLike | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """CIFAR-10 from the python batches (``data_batch_1..5``, ``test_batch``).

    ``root`` is the ``cifar-10-batches-py`` directory or its parent; without it, ``$CIFAR10_DIR``,
    ``$MULO_DATA_DIR/cifar-10-batches-py`` and ``~/.cache/mulo/cifar10`` are tried. Returns
    ``{"train": (x, y), "test": (x, y)}`` with x uint8 **[N, 3, 32, 32]** (channels first, the
    pickles' own order: 1024 red, 1024 green, 1024 blue bytes per row) and y int64 [N].
    Note: the batches are pickles; load only files you trust.
    """
    looked: list[str] = []
    if root is not None:
        candidates = _with_subdirs(Path(root).expanduser(), (CIFAR10_SUBDIR,))
        looked.append(f"root={root}")
    else:
        candidates = []
        for var, subdirs in (("CIFAR10_DIR", (CIFAR10_SUBDIR,)), ("MULO_DATA_DIR", ("cifar10",))):
            value = os.environ.get(var)
            looked.append(f"${var}={value}" if value else f"${var} (unset)")
            if value:
                candidates += _with_subdirs(Path(value).expanduser(), (CIFAR10_SUBDIR, *subdirs))
        candidates += _with_subdirs(cache_dir("cifar10"), (CIFAR10_SUBDIR,))
        looked.append(str(cache_dir("cifar10")))
    for directory in candidates:
        if all((directory / f).is_file() for f in CIFAR10_FILES):
            train = [_read_cifar_batch(directory / f) for f in CIFAR10_FILES[:-1]]
            x = torch.cat([b[0] for b in train])
            y = torch.cat([b[1] for b in train])
            return {"train": (x, y), "test": _read_cifar_batch(directory / CIFAR10_FILES[-1])}
    raise DatasetNotFoundError(
        f"CIFAR-10 not found; looked in: {', '.join(looked)}. Fix with one of: pass root=DIR "
        f"holding {CIFAR10_SUBDIR}/ ({', '.join(CIFAR10_FILES)}), e.g. the unpacked "
        f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html; set "
        f"CIFAR10_DIR=DIR or MULO_DATA_DIR=ROOT with ROOT/{CIFAR10_SUBDIR}; or unpack it into "
        f"{cache_dir('cifar10')}."
    )


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(
            f"{path}: expected data [N, 3072] and labels [N], got {data.shape} and {labels.shape}"
        )
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_images(
    name: str, root: PathLike | None = None, download: bool | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"`` by name (for task configs)."""
    key = _canonical(name)
    if key == "cifar10":
        return load_cifar10(root)
    return load_mnist_like(key, root=root, download=download)


# ---------------------------------------------------------------------------------------------
# Image preprocessing


def image_tensors(
    x: Tensor,
    pool: int = 1,
    flatten: bool = False,
    mean: Tensor | float | None = None,
    std: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 images ``[N,H,W]`` or ``[N,C,H,W]`` -> float32, average-pooled by ``pool``
    (``pool=2``: 28x28 -> 14x14), normalised to mean 0 / std 1.

    The statistics are computed from ``x`` unless given: a scalar for grey images, one per
    channel for ``[N,C,H,W]``. Returns ``(x, mean, std)`` so the test set can reuse the train
    set's statistics (see :func:`prepare_images`). ``flatten`` gives ``[N, features]``.
    """
    grey = x.dim() == 3
    xf = x.float()
    if pool > 1:
        xf = F.avg_pool2d(xf.unsqueeze(1) if grey else xf, pool)
        xf = xf.squeeze(1) if grey else xf
    dims = (0, 1, 2) if grey else (0, 2, 3)
    if mean is None:
        mean = xf.mean(dims, keepdim=not grey)
    if std is None:
        std = xf.std(dims, keepdim=not grey).clamp_min(1e-6)
    mean, std = torch.as_tensor(mean, dtype=xf.dtype), torch.as_tensor(std, dtype=xf.dtype)
    xf = (xf - mean) / std
    if flatten:
        xf = xf.reshape(len(xf), -1)
    return xf, mean, std


def prepare_images(
    data: dict[str, tuple[Tensor, Tensor]], pool: int = 1, flatten: bool = False
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``load_*`` output -> ``((x_train, y_train), (x_test, y_test))`` as float32, normalised
    with the train set's statistics."""
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    xtr, mean, std = image_tensors(xtr, pool, flatten)
    xte, _, _ = image_tensors(xte, pool, flatten, mean, std)
    return (xtr, ytr), (xte, yte)


# ---------------------------------------------------------------------------------------------
# Text (bytes)

_SKIP_SUFFIXES = (".dat", ".u8")  # fortune's strfile indexes, and the .u8 -> text symlinks


def _text_files(paths: Iterable[PathLike]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():  # top level only: e.g. fortunes' off/ subdirectory stays out
            found = [
                f
                for f in sorted(p.iterdir())
                if f.is_file()
                and not f.is_symlink()
                and not f.name.startswith(".")
                and f.suffix not in _SKIP_SUFFIXES
            ]
        elif p.is_file():
            found = [p]
        else:
            raise DatasetNotFoundError(
                f"text corpus path {p} does not exist; pass an existing text file or directory "
                "(e.g. /usr/share/games/fortunes from `sudo apt-get install fortunes`)"
            )
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    return files


def load_text_bytes(
    path_or_paths: PathLike | Sequence[PathLike], test_fraction: float = 0.1
) -> dict[str, Tensor]:
    """Byte-level corpus from text file(s) and/or directories as ``{"train", "test"}`` uint8 1-D
    tensors (token ids 0..255).

    A directory contributes its top-level regular files (sorted), skipping hidden files,
    symlinks and ``.dat`` / ``.u8`` (the fortune index and alias files). Each file is split
    separately (first ``1 - test_fraction`` of its bytes to train, the rest to test), so the
    test set samples every file.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if isinstance(path_or_paths, (str, os.PathLike)):
        path_or_paths = [path_or_paths]
    train, test = bytearray(), bytearray()
    for f in _text_files(path_or_paths):
        raw = f.read_bytes()
        cut = len(raw) - int(len(raw) * test_fraction)
        train += raw[:cut]
        test += raw[cut:]
    if not train:
        raise DatasetNotFoundError(
            f"no text found in {', '.join(map(str, path_or_paths))}; pass non-empty text files"
        )
    empty = torch.zeros(0, dtype=torch.uint8)  # frombuffer refuses an empty buffer
    test_t = torch.frombuffer(test, dtype=torch.uint8) if test else empty
    return {"train": torch.frombuffer(train, dtype=torch.uint8), "test": test_t}


def default_text_corpus() -> Path:
    """The installed ``fortunes`` directory (a few MB of English), else DatasetNotFoundError."""
    for d in TEXT_CORPUS_DIRS:
        if d.is_dir() and _text_files([d]):
            return d
    raise DatasetNotFoundError(
        f"no default text corpus; looked in: {', '.join(map(str, TEXT_CORPUS_DIRS))}. Fix with "
        "one of: `sudo apt-get install fortunes` (installs /usr/share/games/fortunes); or pass "
        "any text file or directory as the corpus path."
    )


# ---------------------------------------------------------------------------------------------
# Batchers: the data stays in memory, a seeded generator picks the batches


class _SeededSampler:
    """Seeded index drawing shared by the batchers; subclasses define ``n`` and ``_gather``."""

    n: int

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _draw(self, shape: tuple[int, ...]) -> Tensor:
        # Uniform with replacement: a batch is one randint, and the state is the generator's.
        return torch.randint(0, self.n, shape, generator=self.generator)

    def _gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sample(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """One batch ``(x [B, ...], y [B, ...])``."""
        return self._gather(self._draw((batch_size,)))

    def sample_population(
        self, population: int, batch_size: int, shared: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Batches for ``population`` models: ``(x [P, B, ...], y [P, B, ...])``.

        ``shared=True``: every member sees the same batch (antithetic ES pairs must); the result
        is an ``expand`` view, so do not write into it. ``shared=False``: independent batches.
        """
        if not shared:
            return self._gather(self._draw((population, batch_size)))
        x, y = self.sample(batch_size)
        return x.expand(population, *x.shape), y.expand(population, *y.shape)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


class TensorBatcher(_SeededSampler):
    """A whole (preprocessed) train set in memory; ``sample`` draws rows with a seeded generator.

    ``x`` [N, ...] (e.g. float, normalised) and ``y`` [N, ...] are moved to ``device`` once.
    """

    def __init__(
        self, x: Tensor, y: Tensor, seed: int = 0, device: str | torch.device | None = None
    ):
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"x and y must be non-empty with equal length, got {len(x)} and {len(y)}"
            )
        super().__init__(seed)
        self.x, self.y = x.to(device), y.to(device)
        self.n = len(x)

    def _gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        flat = idx.reshape(-1).to(self.x.device)
        # index_select, not x[idx]: CPU advanced indexing of a big 2-D tensor was 10-100x slower
        x, y = self.x.index_select(0, flat), self.y.index_select(0, flat)
        return x.reshape(*idx.shape, *self.x.shape[1:]), y.reshape(*idx.shape, *self.y.shape[1:])


class TextBatcher(_SeededSampler):
    """Random windows of ``block_size + 1`` bytes: ``x`` = the first L, ``y`` = the next-byte
    targets (the window shifted by one), both int64 ``[B, L]``."""

    def __init__(
        self, data: Tensor, block_size: int, seed: int = 0, device: str | torch.device | None = None
    ):
        if data.dim() != 1 or len(data) < block_size + 1:
            raise ValueError(
                f"text needs a 1-D tensor of at least block_size + 1 = {block_size + 1} bytes, "
                f"got shape {tuple(data.shape)}"
            )
        super().__init__(seed)
        self.data = data.to(device)
        self.block_size = int(block_size)
        self.n = len(data) - self.block_size  # number of valid window starts
        self._offsets = torch.arange(self.block_size + 1, device=self.data.device)

    def _gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        starts = idx.to(self.data.device).unsqueeze(-1) + self._offsets  # [..., L + 1]
        window = self.data.index_select(0, starts.reshape(-1)).reshape(starts.shape).long()
        return window[..., :-1], window[..., 1:]
