"""Meta-weight files: save / load, validation errors, the shipped-name lookup and the default
meta-initialisation with its one-time warning."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mulo
import mulo.meta_weights as MW
import parametrizations as P
from mulo import functional as LF

IN, OUT = 12, 5


def meta(seed: int = 1) -> dict[str, torch.Tensor]:
    return LF.init_meta_params(generator=torch.Generator().manual_seed(seed))


def mlp(width: int = 16):
    torch.manual_seed(0)
    return P.mlp(IN, width, 3, OUT)


def run(cls, meta_weights, steps: int = 3) -> dict[str, torch.Tensor]:
    """Parameters after a few steps on fixed data."""
    model = mlp()
    opt = cls(model, meta_weights=meta_weights)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, IN, generator=g), torch.randint(0, OUT, (16,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# --- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [mulo.MuLO, mulo.SPLO])
def test_saved_file_behaves_like_the_dict(tmp_path, cls):
    path = tmp_path / "trained.pt"
    m = meta()
    mulo.save_meta_weights(path, m, {"run": "abc", "outer_steps": 100})
    from_dict = run(cls, m)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(from_dict.values(), run(cls, meta(), 0).values(), strict=True)
    )
    assert_same(run(cls, path), from_dict)
    assert_same(run(cls, str(path)), from_dict)
    opt = cls(mlp(), meta_weights=path)
    assert opt.provenance == {"run": "abc", "outer_steps": 100}


def test_load_returns_meta_and_provenance(tmp_path):
    path = tmp_path / "sub" / "dir" / "w.pt"  # parent folders are created
    m = meta(3)
    prov = {"widths": [128, 512], "task": "mlp", "seed": 3, "loss": 1.25}
    mulo.save_meta_weights(path, {k: v.double() for k, v in m.items()}, prov)
    loaded, provenance = mulo.load_meta_weights(path)
    assert provenance == prov
    assert loaded.keys() == m.keys()
    for k in m:
        assert loaded[k].dtype is torch.float32 and torch.equal(loaded[k], m[k]), k
    mulo.save_meta_weights(tmp_path / "n.pt", m)  # provenance is optional
    assert mulo.load_meta_weights(tmp_path / "n.pt")[1] == {}


def test_provenance_written_by_save_can_be_read_back(tmp_path):
    """Whatever provenance ``save_meta_weights`` accepts must load again: a numpy float (a
    logged loss) and a Path (a config entry) are ordinary provenance values."""
    path = tmp_path / "w.pt"
    prov = {"final_loss": np.float64(1.5), "config": Path("configs/mlp.yaml")}
    try:
        mulo.save_meta_weights(path, meta(), prov)
    except (mulo.MetaWeightsError, TypeError, ValueError):
        return  # rejecting it up front is fine too
    _, back = mulo.load_meta_weights(path)
    assert float(back["final_loss"]) == 1.5 and str(back["config"]) == "configs/mlp.yaml"


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    mulo.save_meta_weights(path, meta(1), {"v": 1})
    mulo.save_meta_weights(path, meta(2), {"v": 2})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # no leftover .tmp
    assert mulo.load_meta_weights(path)[1] == {"v": 2}

    real_save = torch.save

    def dies_halfway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        mulo.save_meta_weights(path, meta(3), {"v": 3})
    monkeypatch.undo()
    loaded, prov = mulo.load_meta_weights(path)  # the old file is intact under the real name
    assert prov == {"v": 2} and torch.equal(loaded["w1"], meta(2)["w1"])


@pytest.mark.parametrize(
    "bad, problem",
    [
        (lambda m: m.__setitem__("w1", torch.zeros(32, 38)), "w1"),
        (lambda m: m.pop("b3"), "b3"),
        (lambda m: m.__setitem__("extra", torch.zeros(1)), "extra"),
        (lambda m: m["w2"].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda m: m["theta"].__setitem__(0, float("inf")), "non-finite"),
    ],
    ids=["shape", "missing", "extra", "nan", "inf"],
)
def test_save_rejects_bad_meta_and_writes_nothing(tmp_path, bad, problem):
    m = meta()
    bad(m)
    with pytest.raises(mulo.MetaWeightsError) as e:
        mulo.save_meta_weights(tmp_path / "w.pt", m)
    assert problem in one_line(e)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(mulo.MetaWeightsError) as e:  # the same check for an in-memory dict
        mulo.MuLO(mlp(), meta_weights=m)
    assert problem in one_line(e)


# --- broken files -----------------------------------------------------------------------------


def _payload(**changes):
    payload = {
        "format": MW.FORMAT,
        "version": MW.VERSION,
        "architecture": MW.ARCHITECTURE,
        "meta_params": meta(),
        "provenance": {},
    }
    payload.update(changes)
    return payload


def _meta_with(**changes):
    m = meta()
    for k, v in changes.items():
        if v is None:
            del m[k]
        else:
            m[k] = v
    return m


def _nan_w1():
    m = meta()
    m["w1"][3, 4] = float("nan")
    return m


def _write(kind: str, path: Path) -> None:
    rng = random.Random(0)
    if kind == "random bytes":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        mulo.save_meta_weights(path, meta())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not a dict":
        torch.save(torch.zeros(3), path)
    elif kind == "wrong version":
        torch.save(_payload(version=MW.VERSION + 1), path)
    elif kind == "no version":
        payload = _payload()
        del payload["version"]
        torch.save(payload, path)
    elif kind == "wrong format":
        torch.save(_payload(format="some-other-format"), path)
    elif kind == "wrong architecture":
        torch.save(_payload(architecture="hyper_v3"), path)
    elif kind == "w1 shape":
        torch.save(_payload(meta_params=_meta_with(w1=torch.zeros(32, 40))), path)
    elif kind == "missing key":
        torch.save(_payload(meta_params=_meta_with(b3=None)), path)
    elif kind == "meta not a dict":
        torch.save(_payload(meta_params=[1, 2, 3]), path)
    elif kind == "non-finite":
        torch.save(_payload(meta_params=_nan_w1()), path)
    elif kind == "flipped bytes":  # 64 bytes inside w1's data: the zip still reads fine
        m = meta()
        mulo.save_meta_weights(path, m)
        data = bytearray(path.read_bytes())
        at = data.find(m["w1"].numpy().tobytes()[:256]) + 1000
        data[at : at + 64] = bytes(b ^ 0x5A for b in data[at : at + 64])
        path.write_bytes(bytes(data))
    elif kind in ("theta = 100", "theta = -100"):
        theta = torch.full_like(meta()["theta"], 100.0 if kind == "theta = 100" else -100.0)
        torch.save(_payload(meta_params=_meta_with(theta=theta)), path)
    elif kind in ("int64", "complex"):
        dtype = torch.int64 if kind == "int64" else torch.complex64
        torch.save(_payload(meta_params=_meta_with(w2=meta()["w2"].to(dtype))), path)
    else:
        raise AssertionError(kind)


BROKEN = {
    "random bytes": "",
    "empty": "",
    "truncated": "",
    "not a dict": "format",
    "wrong version": "version",
    "no version": "version",
    "wrong format": "format",
    "wrong architecture": "small_fc_lopt",
    "w1 shape": "w1",
    "missing key": "b3",
    "meta not a dict": "meta_params",
    "non-finite": "non-finite",
    "flipped bytes": "sha256",
    "theta = 100": "1 - beta",
    "theta = -100": "1 - beta",
    "int64": "dtype int64",
    "complex": "dtype complex64",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_file_raises_one_line_error(tmp_path, kind):
    path = tmp_path / f"broken_{kind.replace(' ', '_')}.pt"
    _write(kind, path)
    for load in (
        mulo.load_meta_weights,
        lambda p: mulo.MuLO(mlp(), meta_weights=p),
        lambda p: mulo.SPLO(mlp(), meta_weights=str(p)),
    ):
        with pytest.raises(mulo.MetaWeightsError) as e:
            load(path)
        msg = one_line(e)
        assert path.name in msg, msg  # names the file ...
        assert BROKEN[kind] in msg, msg  # ... and the problem
        assert isinstance(e.value, ValueError)


def test_missing_file_and_unknown_name(tmp_path):
    missing = tmp_path / "nowhere" / "missing.pt"
    for arg in (missing, str(missing), tmp_path / "missing_no_suffix"):
        with pytest.raises(mulo.MetaWeightsError) as e:
            mulo.load_meta_weights(arg)
        assert Path(arg).name in one_line(e)
        assert all(name in str(e.value) for name in (*mulo.available(), "meta-init"))
    with pytest.raises(mulo.MetaWeightsError) as e:
        mulo.MuLO(mlp(), meta_weights="no_such_shipped_weights")
    assert "no_such_shipped_weights" in one_line(e)


def test_shipped_name_lookup(tmp_path, monkeypatch):
    """A file in the package's weights folder is found by name, listed by ``available()``, and
    the default name replaces the meta-initialisation without a warning."""
    monkeypatch.setattr(MW, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(MW, "_warned", set())
    assert mulo.available() == []
    mulo.save_meta_weights(tmp_path / f"{MW.DEFAULT_NAMES['mup']}.pt", meta(4), {"shipped": True})
    mulo.save_meta_weights(tmp_path / "other.pt", meta(5))
    assert mulo.available() == sorted([MW.DEFAULT_NAMES["mup"], "other"])
    assert_same(run(mulo.MuLO, "other"), run(mulo.MuLO, meta(5)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = run(mulo.MuLO, None)
    assert not [w for w in caught if "meta-initialisation" in str(w.message)]
    assert_same(default, run(mulo.MuLO, meta(4)))
    assert mulo.MuLO(mlp()).provenance == {"shipped": True}


# --- default meta-initialisation --------------------------------------------------------------


@pytest.mark.parametrize("cls, par", [(mulo.MuLO, "mup"), (mulo.SPLO, "sp")])
def test_default_meta_init_warns_once(monkeypatch, tmp_path, cls, par):
    monkeypatch.setattr(MW, "WEIGHTS_DIR", tmp_path)  # a build without the shipped files
    monkeypatch.setattr(MW, "_warned", set())  # as in a fresh process, whatever ran before
    with pytest.warns(UserWarning, match="meta-initialisation") as first:
        opt = cls(mlp())
    ours = [w for w in first if "meta-initialisation" in str(w.message)]
    assert len(ours) == 1
    assert ours[0].filename == __file__  # points at the caller, not at mulo's internals
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        cls(mlp())
        cls(mlp())
    assert not [w for w in again if "meta-initialisation" in str(w.message)]
    assert opt.provenance["name"] == "meta-init"
    seeded = LF.init_meta_params(generator=torch.Generator().manual_seed(MW.INIT_SEED))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(run(cls, None), run(cls, seeded))


def test_default_warning_is_per_optimizer_kind(monkeypatch, tmp_path):
    monkeypatch.setattr(MW, "WEIGHTS_DIR", tmp_path)  # a build without the shipped files
    monkeypatch.setattr(MW, "_warned", set())
    with pytest.warns(UserWarning, match="meta-initialisation"):
        mulo.MuLO(mlp())
    with pytest.warns(UserWarning, match="meta-initialisation"):
        mulo.SPLO(mlp())


def test_explicit_meta_weights_do_not_warn(monkeypatch, tmp_path):
    monkeypatch.setattr(MW, "_warned", set())
    path = tmp_path / "w.pt"
    mulo.save_meta_weights(path, meta())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mulo.MuLO(mlp(), meta_weights=meta())
        mulo.SPLO(mlp(), meta_weights=path)
    assert not [w for w in caught if "meta-initialisation" in str(w.message)]
    assert MW._warned == set()


def test_meta_init_by_name_is_the_seeded_initialisation_without_warning(recwarn):
    meta, provenance = mulo.load_meta_weights("meta-init")
    expected = mulo.functional.init_meta_params(
        generator=torch.Generator().manual_seed(mulo.meta_weights.INIT_SEED)
    )
    assert provenance["name"] == "meta-init"
    assert all(torch.equal(meta[k], expected[k]) for k in expected)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    mulo.SPLO(model, meta_weights="meta-init")
    assert not [w for w in recwarn if "meta-initialisation" in str(w.message)]
