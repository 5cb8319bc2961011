"""Meta-training checkpoints: everything needed to continue on the same trajectory.

A checkpoint is a ``torch.save`` of ``{"format", "version", "fingerprint", "state", "extra"}``:
``state`` is :meth:`MetaTrainer.state_dict` (θ, AdamW and schedule state, every inner
problem's particles, LO states, step counters, inner lengths, PES accumulators ξ and ε, the
problems' generator and data-sampler states, the outer step); ``fingerprint`` is the config
fields that decide the trajectory plus the task descriptions. It is read back with
``weights_only=True`` (a file cannot run code).

Writing is atomic: a temp file in the same directory, fsync'd, then ``os.replace``. The file it
replaces is kept as ``<name>.prev`` (hard-linked when the filesystem allows, else copied)
before the rename, so a crash at any moment leaves a complete checkpoint under the name. In a
distributed run every rank calls :func:`save_checkpoint` (the particles are gathered) and rank
0 writes; every rank reads the same file on load and takes its own block of pairs, so a run
may resume with a different number of processes.

Anything wrong with a file (unreadable, not a checkpoint, another version, written for a
different configuration, tensors that do not fit) raises :class:`CheckpointError` with a
one-line message: never a silent restart from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mulo._atomic import atomic_path
from mulo.meta import distributed as dist_utils

FORMAT = "mulo-meta-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to resume this run (message: one line)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def prev_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_checkpoint(path: str | Path, trainer, extra: dict | None = None) -> Path:
    """Write ``trainer``'s full state to ``path`` atomically (collective when distributed)."""
    path = Path(path)
    state = trainer.state_dict()  # gathers the particles from every rank
    if trainer.rank == 0:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": _plain(trainer.fingerprint()),
            "state": state,
            "extra": _plain(extra or {}),
        }
        _atomic_save(payload, path)
    dist_utils.barrier()
    return path


def _plain(obj):
    """JSON types only, so ``weights_only`` loading can read it back."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _atomic_save(payload: dict, path: Path) -> None:
    with atomic_path(path, durable=True) as tmp:
        torch.save(payload, tmp)
        if path.exists():
            _keep_previous(path)


def _keep_previous(path: Path) -> None:
    """``path`` -> ``path.prev`` without ever leaving ``path`` missing."""
    with atomic_path(prev_path(path)) as tmp:
        tmp.unlink()  # os.link needs a free name
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)


def read_checkpoint(path: str | Path) -> dict:
    """The checked payload of a checkpoint file (format and version), else CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no meta-training checkpoint at {path}")
    hint = f" (the previous checkpoint is {prev_path(path)})" if prev_path(path).is_file() else ""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a corrupt file to the user
        raise CheckpointError(
            f"cannot read meta-training checkpoint {path}: corrupt or not a torch file "
            f"({type(e).__name__}){hint}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a mulo meta-training checkpoint (format != {FORMAT!r})"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is a version {payload.get('version')!r} meta-training checkpoint; "
            f"this mulo reads version {VERSION}"
        )
    for key in ("fingerprint", "state"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path} is incomplete: no {key}{hint}")
    return payload


def fingerprint_mismatch(saved: dict, current: dict) -> str | None:
    """A description of the first field where two fingerprints differ, or None."""
    keys = sorted(set(saved) | set(current), key=lambda k: (k == "tasks", str(k)))
    for key in keys:  # the config fields first, then the task descriptions
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if key == "tasks" and isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                return f"number of inner tasks: {len(a)} in the checkpoint, {len(b)} now"
            for i, (ta, tb) in enumerate(zip(a, b, strict=True)):
                sub = fingerprint_mismatch(ta, tb)
                if sub:
                    return f"task {i}: {sub}"
            continue
        if a != b:
            return f"{key} = {a!r} in the checkpoint, {b!r} now"
    return None


def check_resumable(path: str | Path) -> None:
    """Refuse to start over beside an orphaned ``.prev``: the run would later overwrite the
    only good copy of its state."""
    path = Path(path)
    if not path.exists() and prev_path(path).is_file():
        raise CheckpointError(
            f"{path} is missing but {prev_path(path)} exists: restore it to resume "
            f"(mv {prev_path(path)} {path}), or start over with fresh=true"
        )


def saved_step(path: str | Path, trainer) -> int:
    """The outer step of the checkpoint at ``path``, checked against ``trainer``'s config."""
    return int(_matching_payload(Path(path), trainer)["state"]["outer_step"])


def _matching_payload(path: Path, trainer) -> dict:
    payload = read_checkpoint(path)
    diff = fingerprint_mismatch(payload["fingerprint"], _plain(trainer.fingerprint()))
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was written for a different configuration: {diff} "
            "(use a fresh checkpoint path or restore the configuration)"
        )
    return payload


def load_checkpoint(path: str | Path, trainer) -> dict:
    """Restore ``trainer`` from ``path``; returns the ``extra`` dict saved with it."""
    path = Path(path)
    payload = _matching_payload(path, trainer)
    try:
        trainer.load_state_dict(payload["state"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this trainer: {detail}") from None
    return dict(payload.get("extra") or {})
