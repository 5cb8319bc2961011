"""Meta-weight files: save, load with format/version/shape checks, and the shipped defaults.

A file is a ``torch.save`` of ``{"format", "version", "architecture", "meta_params",
"provenance", "sha256"}``; it is read with ``weights_only=True`` so a file cannot run code.
``sha256`` (version 2) is the hash of the meta-parameters, checked on load: a flipped byte in
the tensors is an error, not a silently different optimizer. Version 1 files (no hash) still
load, with every other check.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor

from mulo import functional as LF
from mulo import velo as V
from mulo._atomic import atomic_path
from mulo.functional import init_meta_params

FORMAT = "mulo-meta-weights"
VERSION = 2
READABLE_VERSIONS = (1, 2)
ARCHITECTURE = "small_fc_lopt"  # v1; a file names its architecture (LF.ARCHITECTURES)
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_NAMES = {"mup": "mulo_m", "sp": "splo_m"}
INIT_SEED = 0


class MetaWeightsError(ValueError):
    """A meta-weight file that is missing, corrupt or does not fit small_fc_lopt."""


def save_meta_weights(path: str | Path, meta: dict[str, Tensor], provenance: dict | None = None):
    check_meta_params(meta, str(path))
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": "velo" if V.is_velo(meta) else LF.architecture(meta).name,
        "meta_params": {k: v.detach().cpu().float().clone() for k, v in meta.items()},
        # plain JSON types only, so that weights_only loading can read it back
        "provenance": json.loads(json.dumps(dict(provenance or {}), default=_plain)),
    }
    payload["sha256"] = _sha256(payload["meta_params"])
    with atomic_path(path) as tmp:  # a crash never leaves a half-written file under the name
        torch.save(payload, tmp)


def _plain(obj):
    return obj.item() if hasattr(obj, "item") else str(obj)


def available() -> list[str]:
    """Names of the meta-weights shipped inside the package."""
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.pt"))


def resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".pt" or path.exists() or len(path.parts) > 1:
        if not path.is_file():
            names = ", ".join([*available(), META_INIT])
            raise MetaWeightsError(
                f"meta-weights file not found: {path} (or use a shipped name: {names})"
            )
        return path
    shipped = WEIGHTS_DIR / f"{name_or_path}.pt"
    if not shipped.is_file():
        names = ", ".join([*available(), META_INIT])
        raise MetaWeightsError(
            f"unknown meta-weights {str(name_or_path)!r}: pass a .pt path or one of: {names}"
        )
    return shipped


def load_meta_weights(name_or_path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(meta_params, provenance) from a shipped name, a file path, or "meta-init"."""
    if str(name_or_path) == META_INIT:
        return meta_init()
    path = resolve(name_or_path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure is a corrupt file to the user
        raise MetaWeightsError(
            f"cannot read meta-weights {path}: not a readable torch file ({type(e).__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MetaWeightsError(f"{path} is not a mulo meta-weights file (format != {FORMAT!r})")
    if payload.get("version") not in READABLE_VERSIONS:
        raise MetaWeightsError(
            f"{path} has meta-weights format version {payload.get('version')!r}; "
            f"this mulo reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    arch = payload.get("architecture")
    if arch not in (*LF.ARCHITECTURES, "velo"):
        known = ", ".join((*LF.ARCHITECTURES, "velo"))
        raise MetaWeightsError(f"{path} holds {arch!r} weights, expected one of: {known}")
    meta = payload.get("meta_params")
    check_meta_params(meta, str(path), arch)
    if payload["version"] >= 2 and payload.get("sha256") != _sha256(meta):
        raise MetaWeightsError(
            f"{path} is corrupt: its meta-parameters do not match the sha256 stored with them"
        )
    return {k: v.float() for k, v in meta.items()}, dict(payload.get("provenance") or {})


def digest(meta: dict[str, Tensor]) -> str:
    """A short content hash of meta-parameters: which learned optimizer produced a result."""
    return _sha256(meta)[:16]


def _sha256(meta: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(meta):
        h.update(name.encode())
        h.update(meta[name].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_meta_params(meta, where: str, architecture: str | None = None) -> None:
    """Keys, shapes and finiteness against ``architecture`` (default: the one ``meta``'s keys
    name: v2 has ``log_lr``)."""
    if not isinstance(meta, dict):
        raise MetaWeightsError(f"{where}: meta_params must be a dict of tensors")
    if architecture == "velo" or (architecture is None and V.is_velo(meta)):
        _check_tensors(meta, V.meta_shapes(*velo_sizes(meta)), where, "velo")
        return
    arch = LF.architecture(meta if architecture is None else architecture)
    _check_tensors(meta, arch.meta_shapes, where, arch.name)
    # 1 - beta = (1 - beta0) exp(10 theta) must be a usable EMA weight: at 0 (beta rounds to 1
    # in float32) an accumulator never moves; infinite, theta is garbage (above 1 the LO clamps
    # beta to 0: no memory, still an optimizer)
    one_minus_beta = (1 - torch.tensor(LF.DECAY_INIT, dtype=torch.float64)) * torch.exp(
        10 * meta["theta"].double()
    )
    bad = ~(torch.isfinite(one_minus_beta) & (one_minus_beta >= 1e-7))
    if bool(bad.any()):
        worst = one_minus_beta[bad][0].item()
        raise MetaWeightsError(
            f"{where}: theta gives a decay with 1 - beta = {worst:.3g}, outside [1e-7, inf) "
            "(an accumulator that never moves, or garbage)"
        )


def velo_sizes(meta: dict) -> tuple[int, int]:
    """(LSTM hidden, bank size) of VeLO meta-parameters, from their shapes."""
    try:
        return int(meta["h0"].shape[-1]), int(meta["mix_b"].shape[-1])
    except (KeyError, AttributeError, IndexError):
        return V.LSTM_HIDDEN, V.BANK


def _check_tensors(meta: dict, shapes: dict, where: str, arch_name: str) -> None:
    missing = sorted(set(shapes) - set(meta))
    extra = sorted(set(meta) - set(shapes))
    if missing or extra:
        raise MetaWeightsError(
            f"{where}: meta_params keys mismatch (missing {missing}, extra {extra})"
        )
    for name, shape in shapes.items():
        t = meta[name]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise MetaWeightsError(
                f"{where}: {name} has shape {got}, expected {shape} ({arch_name})"
            )
        if not t.is_floating_point():
            raise MetaWeightsError(
                f"{where}: {name} has dtype {str(t.dtype).removeprefix('torch.')}, "
                "expected floating point"
            )
        if not torch.isfinite(t).all():
            raise MetaWeightsError(f"{where}: {name} holds non-finite values")


_warned: set[str] = set()


def default_meta_weights(parametrization: str) -> tuple[dict[str, Tensor], dict]:
    """The shipped default for μP ("mup") or SP ("sp"); until it ships, the seeded
    meta-initialisation with a one-time warning."""
    name = DEFAULT_NAMES[parametrization]
    if (WEIGHTS_DIR / f"{name}.pt").is_file():
        return load_meta_weights(name)
    if name not in _warned:
        _warned.add(name)
        warnings.warn(
            f"no meta-trained weights {name!r} ship with this mulo yet: using the untrained "
            "meta-initialisation (pass meta_weights=... to load a trained file)",
            stacklevel=5,  # MuLO(...)'s caller: __init__, _load_meta, _resolve_meta, here
        )
    return meta_init()


META_INIT = "meta-init"  # the name that asks for the untrained meta-initialisation explicitly


def meta_init() -> tuple[dict[str, Tensor], dict]:
    """The seeded, untrained meta-initialisation (the floor every trained LO must beat)."""
    meta = init_meta_params(generator=torch.Generator().manual_seed(INIT_SEED))
    return meta, {"name": META_INIT, "seed": INIT_SEED, "num_meta_params": _count(meta)}


def _count(meta: dict[str, Tensor]) -> int:
    return sum(math.prod(t.shape) for t in meta.values())
