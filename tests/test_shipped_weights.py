"""The meta-trained optimizers that ship inside the package: they load offline by default,
record their provenance, and the shipped μLO_M trains a fresh model much wider than any it was
meta-trained on."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from helpers import write_learnable_fashion

import mulo
import mulo.meta_weights as MW
import parametrizations as P
from mulo import tasks
from mulo.data import DatasetNotFoundError

SHIPPED = {"mulo_m": ("mup", "mu", mulo.MuLO), "splo_m": ("sp", "sp", mulo.SPLO)}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_are_the_class_defaults_and_load_without_warning(name):
    parametrization, _, cls = SHIPPED[name]
    assert name in MW.available()
    assert MW.DEFAULT_NAMES[parametrization] == name
    meta, provenance = MW.load_meta_weights(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "untrained meta-initialisation" fallback warning
        opt = cls(P.mlp(8, 16, 3, 4, parametrization=parametrization))
    assert opt.provenance == provenance
    for key, value in meta.items():
        assert torch.equal(opt.meta[key], value), key
    init, _ = MW.meta_init()
    assert any(not torch.equal(meta[k], init[k]) for k in meta)  # trained, not the floor


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_record_their_provenance(name):
    _, kind, _ = SHIPPED[name]
    _, provenance = MW.load_meta_weights(name)
    config = provenance["config"]
    assert provenance["name"] == name and config["kind"] == kind
    assert max(config["widths"]) <= 128 and len(config["widths"]) > 1  # "_M": several widths
    assert provenance["outer_steps"] == config["outer_steps"] > 0  # a finished run
    assert math.isfinite(provenance["final_meta_loss"])
    assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"])


# The settings that decide a meta-training run's compute and its inner problems.
COMPUTE = (
    "widths", "depth", "pairs", "sigma", "estimator", "truncation", "min_length", "max_length",
    "max_offset", "batch_size", "outer_steps", "dataset", "image_pool",
)  # fmt: skip


def test_mulo_m_and_splo_m_had_the_same_meta_training_compute():
    mu, sp = (MW.load_meta_weights(name)[1]["config"] for name in ("mulo_m", "splo_m"))
    differs = [k for k in COMPUTE if k not in mu or k not in sp or mu[k] != sp[k]]
    assert not differs, f"meta-training settings differ: {differs}"


def _fashion_task(tmp_path, **kw):
    """Real Fashion-MNIST if installed (Debian dataset-fashion-mnist), else a learnable stand-in."""
    try:
        return tasks.build_task("mlp", dataset="fashion_mnist", **kw)
    except DatasetNotFoundError:
        root = write_learnable_fashion(tmp_path / "fashion", n_train=2048)
        return tasks.build_task("mlp", dataset="fashion_mnist", data_root=root, **kw)


@pytest.mark.slow
def test_shipped_mulo_trains_a_fresh_width_1024_mlp_within_100_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("MULO_DOWNLOAD", "0")
    task = _fashion_task(tmp_path, width=1024, depth=3, parametrization="mup", seed=1)
    optimizer = mulo.MuLO(task.model)  # no arguments: the shipped μLO_M
    torch.manual_seed(1)
    losses = []
    for _ in range(100):
        x, y = task.sample()
        loss = task.loss(task.model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    final = sum(losses[-10:]) / 10
    assert final < 0.6 * losses[0], (losses[0], final)


@pytest.mark.parametrize("name", MW.available())
def test_every_shipped_file_carries_its_digest(name):
    """Shipped files are format version 2: a corrupted copy is refused, not used."""
    payload = torch.load(MW.WEIGHTS_DIR / f"{name}.pt", weights_only=True)
    assert payload["version"] == 2
    assert payload["sha256"][:16] == MW.digest(payload["meta_params"])
