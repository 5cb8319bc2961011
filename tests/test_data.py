"""mulo.data: real parsers on tiny files in the exact on-disk formats, lookup order, download,
batcher determinism; one test on the real Fashion-MNIST when the Debian package is installed."""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IDX_STEMS, write_idx, write_mnist_dir

from mulo import data as D


@pytest.fixture
def hermetic(tmp_path, monkeypatch):
    """No env vars, the system dir and the cache under tmp_path, no network (MULO_DOWNLOAD=0)."""
    for var in ("FASHION_MNIST_DIR", "MNIST_DIR", "MULO_DATA_DIR", "CIFAR10_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MULO_DOWNLOAD", "0")
    monkeypatch.setenv("MULO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "SYSTEM_DIRS", {"fashion_mnist": tmp_path / "system"})
    return tmp_path


# --- IDX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    out = D.read_idx(write_idx(tmp_path / name, images))
    assert out.dtype == np.uint8 and out.shape == (2, 28, 28)
    np.testing.assert_array_equal(out, images)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    np.testing.assert_array_equal(D.read_idx(write_idx(tmp_path / "y-idx1-ubyte", labels)), labels)


def test_read_idx_big_endian_wider_types(tmp_path):
    arr = np.array([[1, -2], [300, -40000]], dtype=np.int32)
    out = D.read_idx(write_idx(tmp_path / "w-idx2-int", arr))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_malformed(tmp_path):
    bad_magic = tmp_path / "bad-idx3-ubyte"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    truncated = tmp_path / "short-idx3-ubyte"
    truncated.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + b"\x00" * 10)
    bad_gz = tmp_path / "broken-idx3-ubyte.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00" * 100)[:20])
    for path in (bad_magic, truncated, bad_gz):
        with pytest.raises(ValueError) as err:
            D.read_idx(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# --- Fashion-MNIST / MNIST lookup -------------------------------------------------------------


def test_load_mnist_like_shapes_and_raw_files(hermetic):
    root = write_mnist_dir(hermetic / "raw", marker=7, gz=False)
    data = D.load_mnist_like("fashion_mnist", root=root)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.dtype == torch.uint8 and xtr.shape == (5, 28, 28) and xte.shape == (3, 28, 28)
    assert ytr.dtype == torch.int64 and ytr.tolist() == [7] * 5 and yte.tolist() == [7] * 3


def test_lookup_order(hermetic, monkeypatch):
    write_mnist_dir(hermetic / "cache" / "fashion_mnist", marker=5)
    assert D.load_mnist_like("fashion_mnist")["train"][1][0] == 5  # cache, the last resort
    write_mnist_dir(hermetic / "system", marker=4)
    assert D.load_mnist_like("fashion_mnist")["train"][1][0] == 4  # system dir beats cache
    write_mnist_dir(hermetic / "data_root" / "fashion-mnist", marker=3)
    monkeypatch.setenv("MULO_DATA_DIR", str(hermetic / "data_root"))
    assert D.load_mnist_like("fashion-mnist")["train"][1][0] == 3  # MULO_DATA_DIR/<subdir>
    monkeypatch.setenv("FASHION_MNIST_DIR", str(write_mnist_dir(hermetic / "env", marker=2)))
    assert D.load_mnist_like("fashion_mnist")["train"][1][0] == 2  # the dataset's own env var
    explicit = write_mnist_dir(hermetic / "explicit" / "FashionMNIST" / "raw", marker=1)
    assert D.load_mnist_like("fashion_mnist", root=explicit)["train"][1][0] == 1
    # A root may also be the parent of a known subdirectory (torchvision's layout here).
    assert D.load_mnist_like("fashion_mnist", root=hermetic / "explicit")["train"][1][0] == 1
    # An explicit root is authoritative: it never silently falls back to another place.
    with pytest.raises(D.DatasetNotFoundError):
        D.load_mnist_like("fashion_mnist", root=hermetic / "nowhere")
    # MNIST never picks up Fashion-MNIST's places.
    with pytest.raises(D.DatasetNotFoundError):
        D.load_mnist_like("mnist")


def test_incomplete_directory_is_skipped(hermetic):
    write_mnist_dir(hermetic / "system", marker=4)
    (hermetic / "system" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetNotFoundError):
        D.load_mnist_like("fashion_mnist")


def test_missing_dataset_error_is_one_clear_line(hermetic):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_mnist_like("fashion_mnist")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and "\n" not in msg
    for needle in (
        "FASHION_MNIST_DIR",
        "MULO_DATA_DIR",
        "apt-get install dataset-fashion-mnist",
        str(hermetic / "system"),
        str(hermetic / "cache" / "fashion_mnist"),
        "download=True",
        "MULO_DOWNLOAD=1",
        "root=",
    ):
        assert needle in msg, needle


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="fashion_mnist"):
        D.load_images("imagenet")


# --- download (file:// mirror, no network) ------------------------------------------------------


@pytest.fixture
def mirror(hermetic, monkeypatch):
    """A local file:// mirror of a tiny Fashion-MNIST with the right md5s patched in."""
    src = write_mnist_dir(hermetic / "mirror", marker=9)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in src.iterdir()}
    spec = dict(D.MNIST_LIKE["fashion_mnist"], mirrors=(src.as_uri() + "/",), md5=md5)
    monkeypatch.setitem(D.MNIST_LIKE, "fashion_mnist", spec)
    return spec


def test_download_verifies_and_caches(hermetic, mirror, monkeypatch):
    with pytest.raises(D.DatasetNotFoundError):
        D.load_mnist_like("fashion_mnist")  # MULO_DOWNLOAD=0: no download
    monkeypatch.delenv("MULO_DOWNLOAD")
    data = D.load_mnist_like("fashion_mnist")  # no root given: downloads by default
    assert data["train"][1].tolist() == [9] * 5
    cache = hermetic / "cache" / "fashion_mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(mirror["md5"])
    # The cache is found afterwards without downloading (a broken mirror does not matter).
    monkeypatch.setitem(D.MNIST_LIKE, "fashion_mnist", dict(mirror, mirrors=("file:///nope/",)))
    assert D.load_mnist_like("fashion_mnist")["test"][1].tolist() == [9] * 3


def test_explicit_root_is_strict_unless_download_is_asked(hermetic, mirror, monkeypatch):
    monkeypatch.delenv("MULO_DOWNLOAD")
    with pytest.raises(D.DatasetNotFoundError):
        D.load_mnist_like("fashion_mnist", root=hermetic / "empty")
    assert D.load_mnist_like("fashion_mnist", root=hermetic / "r", download=True)["test"][1].numel()


def test_download_via_env_into_explicit_root(hermetic, mirror, monkeypatch):
    monkeypatch.setenv("MULO_DOWNLOAD", "1")
    root = hermetic / "mine"
    assert D.load_mnist_like("fashion_mnist", root=root)["train"][0].shape == (5, 28, 28)
    assert len(list(root.iterdir())) == 4


def test_download_checksum_mismatch_leaves_nothing(hermetic, mirror, monkeypatch):
    bad = dict(mirror["md5"], **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setitem(D.MNIST_LIKE, "fashion_mnist", dict(mirror, md5=bad))
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_mnist_like("fashion_mnist", download=True)
    assert "md5 mismatch" in str(err.value) and "\n" not in str(err.value)
    cache = hermetic / "cache" / "fashion_mnist"
    names = {p.name for p in cache.iterdir()}
    assert "t10k-images-idx3-ubyte.gz" not in names
    assert not any(n.endswith(".part") for n in names)


def test_download_file_unreachable_url(tmp_path):
    with pytest.raises(OSError):
        D.download_file((tmp_path / "absent").as_uri(), tmp_path / "out" / "f.gz")
    assert list((tmp_path / "out").iterdir()) == []


# --- CIFAR-10 -----------------------------------------------------------------------------------


def write_cifar(directory, n=2):
    directory.mkdir(parents=True)
    for i, name in enumerate(D.CIFAR10_FILES):
        rows = np.zeros((n, 3072), dtype=np.uint8)
        rows[:, :1024], rows[:, 1024:2048], rows[:, 2048:] = 10, 20, 30  # R, G, B planes
        rows[:, 0] = i  # which file, in the first red pixel
        batch = {b"batch_label": name.encode(), b"labels": [i] * n, b"data": rows}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


def test_load_cifar10(hermetic):
    write_cifar(hermetic / "c" / "cifar-10-batches-py")
    data = D.load_cifar10(hermetic / "c")  # the parent of cifar-10-batches-py works too
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (10, 3, 32, 32) and xtr.dtype == torch.uint8 and xte.shape == (2, 3, 32, 32)
    assert ytr.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and yte.tolist() == [5, 5]
    assert xtr[:, 0, 0, 0].tolist() == ytr.tolist()  # row order kept
    assert xtr[0, :, 5, 5].tolist() == [10, 20, 30]  # channel-major planes
    x, mean, std = D.image_tensors(xtr)
    assert x.shape == (10, 3, 32, 32) and mean.shape == (1, 3, 1, 1)


def test_load_cifar10_missing_and_corrupt(hermetic):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.load_cifar10()
    assert "CIFAR10_DIR" in str(err.value) and "\n" not in str(err.value)
    write_cifar(hermetic / "c")
    (hermetic / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        D.load_cifar10(hermetic / "c")


# --- image preprocessing -----------------------------------------------------------------------


def test_image_tensors_pool_flatten_and_train_stats(hermetic):
    data = D.load_mnist_like("mnist", root=write_mnist_dir(hermetic / "m", n_train=20, n_test=4))
    (xtr, _), (xte, _) = D.prepare_images(data, pool=2, flatten=True)
    assert xtr.shape == (20, 196) and xte.shape == (4, 196) and xtr.dtype == torch.float32
    assert abs(xtr.mean().item()) < 1e-4 and abs(xtr.std().item() - 1) < 1e-4
    raw = data["test"][0][0].float()
    pooled = raw.reshape(14, 2, 14, 2).mean((1, 3))
    _, mean, std = D.image_tensors(data["train"][0], pool=2)
    torch.testing.assert_close(xte[0], ((pooled - mean) / std).flatten())
    assert D.image_tensors(data["train"][0])[0].shape == (20, 28, 28)


# --- text ---------------------------------------------------------------------------------------


def test_load_text_bytes_fortune_layout(tmp_path):
    d = tmp_path / "fortunes"
    d.mkdir()
    (d / "a").write_bytes(b"0123456789")  # fortune text files, '%'-separated in reality
    (d / "b").write_bytes(b"abcdefghij\n%\nxyz")
    (d / "a.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (d / "a.u8").symlink_to("a")
    (d / ".hidden").write_bytes(b"secret")
    (d / "off").mkdir()
    (d / "off" / "c").write_bytes(b"offensive")
    out = D.load_text_bytes(d, test_fraction=0.2)
    assert out["train"].dtype == torch.uint8 and out["train"].dim() == 1
    assert bytes(out["train"].tolist()) == b"01234567" + b"abcdefghij\n%\n"
    assert bytes(out["test"].tolist()) == b"89" + b"xyz"
    both = D.load_text_bytes([d / "a", d], test_fraction=0.0)  # duplicates are read once
    assert len(both["train"]) == 26 and len(both["test"]) == 0
    with pytest.raises(D.DatasetNotFoundError):
        D.load_text_bytes(tmp_path / "missing.txt")
    with pytest.raises(ValueError):
        D.load_text_bytes(d, test_fraction=1.0)


def test_default_text_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "TEXT_CORPUS_DIRS", (tmp_path / "none",))
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.default_text_corpus()
    assert "apt-get install fortunes" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("hello\n%\nworld\n")
    monkeypatch.setattr(D, "TEXT_CORPUS_DIRS", (tmp_path / "none", tmp_path / "t"))
    assert D.default_text_corpus() == tmp_path / "t"


def test_real_fortunes_corpus_when_installed():
    try:
        corpus = D.default_text_corpus()
    except D.DatasetNotFoundError:
        pytest.skip("fortunes not installed (apt-get install fortunes)")
    out = D.load_text_bytes(corpus)
    assert len(out["train"]) > 1_000_000 and len(out["test"]) > 100_000
    assert (out["train"] == ord("%")).sum() > 1000  # the fortune separators


# --- batchers -----------------------------------------------------------------------------------


def make_batcher(seed=0, n=50):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1).repeat(1, 3)  # row i is all i
    return D.TensorBatcher(x, torch.arange(n), seed=seed)


def test_tensor_batcher_determinism_and_pairing():
    a, b, c = make_batcher(0), make_batcher(0), make_batcher(1)
    xa, ya = a.sample(16)
    xb, yb = b.sample(16)
    assert xa.shape == (16, 3) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, c.sample(16)[1])
    assert torch.equal(xa[:, 0].long(), ya)  # x and y rows stay paired
    assert not torch.equal(ya, a.sample(16)[1])  # the stream moves on


def test_batcher_state_dict_resumes_identically():
    a = make_batcher(3)
    for _ in range(3):
        a.sample(8)
    state = a.state_dict()
    expected = [a.sample(8)[1] for _ in range(2)] + [a.sample_population(2, 4, shared=False)[1]]
    resumed = make_batcher(99)
    resumed.load_state_dict(state)
    got = [resumed.sample(8)[1] for _ in range(2)] + [resumed.sample_population(2, 4, False)[1]]
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    assert resumed.seed == 3


def test_sample_population_shapes():
    bat = make_batcher()
    x, y = bat.sample_population(4, 8)  # shared: every member the same batch
    assert x.shape == (4, 8, 3) and y.shape == (4, 8)
    assert all(torch.equal(y[0], y[p]) for p in range(4))
    x, y = bat.sample_population(4, 8, shared=False)
    assert x.shape == (4, 8, 3) and y.shape == (4, 8)
    assert not all(torch.equal(y[0], y[p]) for p in range(4))
    assert torch.equal(x[..., 0].long(), y)


def test_text_batcher_windows():
    text = torch.arange(100, dtype=torch.uint8)
    bat = D.TextBatcher(text, block_size=10, seed=0)
    x, y = bat.sample(32)
    assert x.shape == y.shape == (32, 10) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # next-byte targets
    assert int(y.max()) <= 99 and int(x.min()) >= 0
    xp, yp = bat.sample_population(3, 5, shared=False)
    assert xp.shape == (3, 5, 10) and torch.equal(yp, xp + 1)
    again = D.TextBatcher(text, block_size=10, seed=0)
    assert torch.equal(again.sample(32)[0], x)
    with pytest.raises(ValueError):
        D.TextBatcher(text, block_size=100)


# --- the real Fashion-MNIST (Debian package dataset-fashion-mnist) ----------------------------


REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not all((REAL_DIR / f"{s}.gz").is_file() for s in IDX_STEMS),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(tmp_path, monkeypatch):
    for var in ("FASHION_MNIST_DIR", "MULO_DATA_DIR", "MULO_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MULO_CACHE_DIR", str(tmp_path))
    data = D.load_mnist_like("fashion_mnist")  # found through the real system-dir lookup
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert ytr.min() == 0 and ytr.max() == 9 and yte.min() == 0 and yte.max() == 9
    assert torch.bincount(ytr).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert torch.bincount(yte).tolist() == [1000] * 10
