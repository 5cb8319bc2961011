"""Command-line plumbing shared by the Hydra apps: bad input is one line and a non-zero exit.

Hydra reports an unknown key or config-group choice over many lines (and advises ``+key=``,
the wrong fix for a typo), and a crash inside the app as a traceback. The checks here run
before Hydra starts: group names, the output directory, and every override against the
composed config (:func:`check_overrides`: the key exists, else the closest one is named; the
value keeps its default's type, numbers stay finite and non-negative, a device exists; the
sizes fit in memory). ``one_line_errors`` turns the errors a user can cause inside the app
(bad values, missing data, unreadable files) into ``error: ...`` on stderr with exit code 2.
Bugs still show their traceback.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
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


def check_argv(
    argv: list[str],
    default_out_dir: str = "outputs",
    config_name: str | None = None,
    memory: Callable[[dict], list] | None = None,
) -> None:
    """Validate config-group choices and the output directory named on the command line, then
    (given the app's ``config_name``) every override: :func:`check_overrides`."""
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
    if config_name is not None:
        check_overrides(argv, named_config(argv, config_name), memory)


def named_config(argv: list[str], default: str) -> str:
    """The primary config Hydra will load: ``--config-name X`` / ``--config-name=X`` / ``-cn X``
    on the command line (e.g. ``transfer_study --config-name graft_study``), else ``default``."""
    name = default
    for i, arg in enumerate(argv):
        if arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg in ("--config-name", "-cn") and i + 1 < len(argv):
            name = argv[i + 1]
    if not (CONFIG_DIR / f"{name}.yaml").is_file():
        found = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        fail(f"unknown config {name!r}; choose one of: {', '.join(found)}")
    return name


def check_overrides(
    argv: list[str], config_name: str, memory: Callable[[dict], list] | None = None
) -> None:
    """Compose ``config_name`` with the command line's overrides (each sweep at its first
    value) and check every override; ``memory(config)`` lists ``(key, bytes)`` the run needs,
    checked against the memory available."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args = [a for a in argv if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as e:
        fail(f"cannot parse the overrides: {e}")
    parsed = [o for o in parsed if not o.key_or_group.startswith(("hydra.", "hydra/"))]
    groups = [o for o in parsed if o.key_or_group in GROUPS]
    base = None
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name=config_name):
            base = compose(config_name, overrides=[_first(o) for o in groups])
            config = compose(config_name, overrides=[_first(o) for o in parsed])
    except (HydraException, OmegaConfBaseException) as e:
        unknown = re.match(r"Could not override '([^']+)'", str(e))
        if unknown:
            _unknown_key(unknown.group(1), base)
        fail(f"invalid overrides: {' '.join(str(e).split())}")
    for o in parsed:
        if o.key_or_group not in GROUPS and not o.is_delete():
            for value in _values(o):
                _check_value(o.key_or_group, value, _select(base, o.key_or_group))
    for key in _keys(config):
        if key.split(".")[-1] == "device" and key in {o.key_or_group for o in parsed}:
            _check_device(key, _select(config, key))
    if memory is not None:
        try:
            needs = memory(OmegaConf.to_container(config, resolve=False))
        except (ValueError, TypeError, KeyError):
            needs = []  # a value the estimate cannot use: the app's own checks report it
        for key, need in needs:
            _check_memory(key, _select(config, key), need)


def _select(cfg: DictConfig, key: str):
    # a default such as ${hydra:runtime.choices.experiment} resolves only inside Hydra's app
    return OmegaConf.select(cfg, key, throw_on_resolution_failure=False)


def _first(o) -> str:
    prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(o.type.name, "")
    key = f"{prefix}{o.get_key_element().lstrip('+~')}"
    if o.is_delete() and o.value() is None:
        return key
    if o.is_sweep_override():
        return f"{key}={next(iter(o.sweep_string_iterator()))}"
    return f"{key}={o.input_line.split('=', 1)[1]}"


def _values(o) -> list:
    if not o.is_sweep_override():
        return [o.value()]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    return [parser.parse_override(f"k={v}").value() for v in o.sweep_string_iterator()]


def _keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for k in cfg:
        key = f"{prefix}{k}"
        value = cfg._get_node(k)
        out.append(key)
        if isinstance(value, DictConfig):
            out += _keys(value, key + ".")
    return out


def _unknown_key(key: str, base: DictConfig | None) -> None:
    known = [k for k in (_keys(base) if base is not None else [])] + list(GROUPS)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f" (a new key is added with +{key}=...)"
    fail(f"unknown key {key!r}{hint}")


def _check_value(key: str, value, default) -> None:
    if value is None or default is None or isinstance(default, str):
        return
    if isinstance(default, ListConfig) or isinstance(value, list):
        if isinstance(default, ListConfig) and isinstance(value, list) and len(default):
            for item in value:
                _check_value(f"each entry of {key}", item, default[0])
        return
    if isinstance(default, DictConfig):
        return
    kind = "true or false" if isinstance(default, bool) else (
        "an integer" if isinstance(default, int) else "a number")  # fmt: skip
    ok = (
        isinstance(value, bool)
        if isinstance(default, bool)
        else isinstance(value, int) and not isinstance(value, bool)
        if isinstance(default, int)
        else isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    if not ok:
        example = "" if key.startswith("each entry") else f" (default {default})"
        fail(f"{key} must be {kind}{example}, got {value!r}")
    if isinstance(value, bool):
        return
    if not math.isfinite(value):
        fail(f"{key} must be a finite number, got {value}")
    if default >= 0 and value < 0:
        fail(f"{key} must be >= 0, got {value}")


def _check_device(key: str, value) -> None:
    import torch

    try:
        device = torch.device(str(value))
    except RuntimeError:
        fail(f"{key}={value!r} is not a device; use cpu or cuda (cuda:0, ...)")
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        fail(f"{key}={value}: no {device.type.upper()} device on this machine; use {key}=cpu")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            fail(f"{key}={value}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def available_memory() -> int:
    """Bytes of memory a new allocation can get (Linux MemAvailable; else unbounded)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 1 << 62
    match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else 1 << 62


def blame(size_key: str, batch_key: str, estimate: tuple[int, int]) -> tuple[str, int]:
    """(the key to name, total bytes) for a (parameter, activation) bytes estimate: the size
    key when the parameters dominate, else the batch key."""
    params, activations = estimate
    return (size_key if params >= activations else batch_key), params + activations


def _check_memory(key: str, value, need: int) -> None:
    have = available_memory()
    if need > have:
        fail(
            f"{key}={value} needs about {need / 2**30:.1f} GiB (model, gradients, optimizer "
            f"state, activations), more than the {have / 2**30:.1f} GiB available; lower it"
        )


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
