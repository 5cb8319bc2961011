"""Where experiment records go: always a local JSONL file, optionally Weights & Biases.

W&B runs carry the full config and are grouped and tagged (optimizer, parametrization, width,
depth) so μLO vs SP-LO compare side by side in the W&B UI. With no API key, or with
WANDB_MODE=offline, the run is written offline under the run directory (`wandb sync` later).
"""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path

from mulo._atomic import atomic_path


class JsonlLogger:
    """One JSON object per line; flushed per record so a crash loses nothing written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(_jsonable(record)) + "\n")
        self._file.flush()

    def rewind(self, step: int) -> None:
        """Drop the records of steps after ``step``: a run resumed from that step's checkpoint
        redoes them, and readers must see each step once. Earlier resume markers are replayed
        the same way (files from before this rule repeat steps), a torn last line is dropped,
        and the rewrite is atomic; logging continues on the new file."""
        self._file.close()
        kept: list[dict] = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "resumed_from" in record:
                at = record.pop("at_step", record.pop("step", None))
                kept = [r for r in kept if not _past(r, at)]
                record["at_step"] = at
            kept.append(record)
        kept = [r for r in kept if not _past(r, step)]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")

    def close(self, summary: dict | None = None) -> None:
        if summary is not None:
            self.log({"summary": summary})
        self._file.close()


def _past(record, step: int) -> bool:
    return isinstance(record, dict) and record.get("step") is not None and record["step"] > step


class WandbLogger:
    def __init__(self, *, config: dict, project: str, group: str | None, tags: list[str],
                 name: str | None, directory: str | Path, mode: str | None = None,
                 entity: str | None = None):  # fmt: skip
        import wandb  # imported here: a plain local run never pays for it

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            tags=tags,
            name=name,
            config=config,
            dir=str(directory),
            mode=mode or wandb_mode(),
            reinit="finish_previous",
        )

    def log(self, record: dict) -> None:
        record = dict(record)
        step = record.pop("step", None)
        self.run.log(_jsonable(record), step=step)

    def close(self, summary: dict | None = None) -> None:
        for key, value in _jsonable(summary or {}).items():
            self.run.summary[key] = value
        self.run.finish()


def wandb_mode() -> str:
    """'offline' unless an API key is available (env or ~/.netrc) and WANDB_MODE allows."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        host = None
    return "online" if host else "offline"


class Loggers:
    """Fan a record out to several loggers."""

    def __init__(self, *loggers):
        self.loggers = [lg for lg in loggers if lg is not None]

    def log(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log(record)

    def rewind(self, step: int) -> None:
        """Forget records after ``step`` where a logger can (the JSONL file; W&B cannot)."""
        for lg in self.loggers:
            if hasattr(lg, "rewind"):
                lg.rewind(step)

    def close(self, summary: dict | None = None) -> None:
        for lg in self.loggers:
            lg.close(summary)


def _jsonable(record: dict) -> dict:
    """Floats that JSON cannot hold (nan/inf) become strings; everything else passes."""
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        elif isinstance(v, dict):
            v = _jsonable(v)
        out[k] = v
    return out
