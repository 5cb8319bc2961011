"""Command-line plumbing shared by the Hydra apps: bad input is one line and a non-zero exit.

Hydra reports an unknown config-group choice over many lines, and a crash inside the app as a
traceback. The checks here run before Hydra starts (group names, output directory), and
``one_line_errors`` turns the errors a user can cause (bad values, missing data, unreadable
files) into ``error: ...`` on stderr with exit code 2. Bugs still show their traceback.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("task", "optimizer", "parametrization", "logger", "experiment", "meta")
DIR_KEYS = ("out_dir", "hydra.run.dir", "hydra.sweep.dir")


def fail(message: str) -> None:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    print(f"error: {first}", file=sys.stderr)
    raise SystemExit(2)


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def check_argv(argv: list[str], default_out_dir: str = "outputs") -> None:
    """Validate config-group choices and the output directory named on the command line."""
    out_dirs = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            for choice in _sweep_values(value):
                if choice not in choices(key):
                    fail(f"unknown {key} {choice!r}; choose one of: {', '.join(choices(key))}")
        if key in DIR_KEYS and "${" not in value:
            out_dirs[key] = value
    for path in out_dirs.values() or [default_out_dir]:
        _check_writable(Path(path))


def _sweep_values(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("choice(") and value.endswith(")"):
        value = value[len("choice(") : -1]
    return [v.strip() for v in value.split(",") if v.strip()]


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        fail(f"output directory {str(path)!r} is not writable ({e.strerror or e})")


def one_line_errors(fn):
    """Run ``fn``; errors a user can cause become one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, KeyError, OmegaConfBaseException) as e:
            fail(str(e) if not isinstance(e, KeyError) else f"missing key {e}")

    return wrapper


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
