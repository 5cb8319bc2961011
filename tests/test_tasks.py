"""Tasks on tiny synthetic files in the real formats (IDX, text), and the population MLP."""

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import parametrizations as P
from mulo import data as D
from mulo import tasks as T

N_TRAIN, N_TEST = 300, 120


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Learnable 28x28 images: each class lights up its own 7x7-aligned block, plus noise."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            r, col = divmod(int(c), 4)
            images[i, 7 * r : 7 * r + 7, 7 * col : 7 * col + 7] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "cat"]
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, 2000)) + "\n")
    return path


def mlp_task(root, **kw):
    kw = {"width": 16, "depth": 3, "batch_size": 32, "data_root": root, **kw}
    return T.build_task("mlp", **kw)


def lm_task(path, **kw):
    kw = {"width": 16, "depth": 1, "batch_size": 4, "context": 16, "data_root": path, **kw}
    return T.build_task("transformer", **kw)


def same_params(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# --- building and sampling ---------------------------------------------------------------------


def test_mlp_task_shapes(image_root):
    task = mlp_task(image_root)
    x, y = task.sample()
    assert x.shape == (32, 196) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert task.model(x).shape == (32, 10)
    assert task.num_params == 196 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 10 + 10
    assert (
        task.kind == "image" and task.parametrization == "mup" and task.dataset == "fashion_mnist"
    )
    assert abs(task.batcher.x.mean().item()) < 1e-3  # normalised with train statistics
    assert task.eval_x.shape == (N_TEST, 196)  # eval_size larger than the test split: all of it
    xp, yp = task.sample_population(3)
    assert xp.shape == (3, 32, 196) and yp.shape == (3, 32)


def test_cnn_task_shapes(image_root):
    task = T.build_task("cnn", width=8, depth=3, batch_size=16, data_root=image_root)
    x, y = task.sample()
    assert x.shape == (16, 1, 14, 14) and y.shape == (16,)
    assert task.model(x).shape == (16, 10)
    unpooled = T.build_task("cnn", width=8, depth=2, data_root=image_root, image_pool=1)
    assert unpooled.sample()[0].shape == (128, 1, 28, 28)
    ev = task.evaluate()
    assert set(ev) == {"loss", "accuracy"} and 0 <= ev["accuracy"] <= 1


def test_cifar10_tasks(tmp_path):
    rng = np.random.default_rng(0)
    for name in D.CIFAR10_FILES:
        batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": [1, 2] * 10}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    cnn = T.build_task("cnn", width=4, depth=2, batch_size=8, dataset="cifar10", data_root=tmp_path)
    assert cnn.sample()[0].shape == (8, 3, 16, 16) and cnn.model.input.in_channels == 3
    assert cnn.model(cnn.sample()[0]).shape == (8, 10)
    mlp = T.build_task("mlp", width=4, depth=1, dataset="CIFAR-10", data_root=tmp_path)
    assert mlp.sample()[0].shape == (128, 3 * 16 * 16) and mlp.dataset == "cifar10"
    assert set(mlp.evaluate()) == {"loss", "accuracy"}


def test_transformer_task_shapes_and_bpb(text_file):
    task = lm_task(text_file, eval_size=5)
    x, y = task.sample()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])  # targets are the next bytes
    assert task.model(x).shape == (4, 16, 256)
    assert task.eval_x.shape == (5, 16)
    ev = task.evaluate()
    assert set(ev) == {"loss", "bpb"}
    assert ev["bpb"] == pytest.approx(ev["loss"] / math.log(2))
    assert ev["loss"] == pytest.approx(math.log(256), rel=1e-4)  # μP zero readout: uniform
    loss = task.train_loss()
    assert loss.shape == () and loss.requires_grad


def test_same_seed_same_run(image_root, text_file):
    for make in (lambda s: mlp_task(image_root, seed=s), lambda s: lm_task(text_file, seed=s)):
        a, b, c = make(3), make(3), make(4)
        assert same_params(a.model, b.model) and not same_params(a.model, c.model)
        for _ in range(3):
            (xa, ya), (xb, yb), (xc, _) = a.sample(), b.sample(), c.sample()
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)


def test_build_does_not_touch_global_rng(image_root):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mlp_task(image_root, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_sp_task_and_dataset_cache(image_root):
    T.clear_data_cache()
    mu = mlp_task(image_root)
    sp = mlp_task(image_root, parametrization="sp", width=32)
    assert sp.parametrization == "sp" and sp.model.readout.multiplier == 1.0
    assert sp.batcher.x.data_ptr() == mu.batcher.x.data_ptr()  # the loaded set is shared
    assert len(T._DATA_CACHE) == 1


# --- evaluation --------------------------------------------------------------------------------


def test_evaluate_is_deterministic_and_restores_mode(image_root):
    task = mlp_task(image_root, parametrization="sp", eval_size=100)
    first = task.evaluate()
    assert set(first) == {"loss", "accuracy"}
    assert 0.0 <= first["accuracy"] <= 1.0 and 0.0 < first["loss"] < 20.0
    assert task.evaluate() == first and task.model.training
    task.model.eval()
    task.evaluate()
    assert not task.model.training
    assert task.evaluate(max_batches=1) == first  # 100 examples fit one batch
    other = P.mlp(196, 8, 1, 10, parametrization="sp")
    assert task.evaluate(other) != first


def test_evaluate_batches_match_single_pass(image_root, monkeypatch):
    task = mlp_task(image_root, parametrization="sp")
    whole = task.evaluate()
    monkeypatch.setattr(T, "EVAL_BATCH", 7)
    chunked = task.evaluate()
    assert chunked["accuracy"] == whole["accuracy"]
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    partial = task.evaluate(max_batches=2)["accuracy"] * 14  # 2 batches of 7 examples
    assert partial == pytest.approx(round(partial))


def test_adam_lowers_mlp_train_loss(image_root):
    task = mlp_task(image_root, width=32, batch_size=64)
    opt = torch.optim.Adam(P.mu_adam_param_groups(task.model, 0.1))
    x_all, y_all = task.batcher.x, task.batcher.y
    with torch.no_grad():
        before = task.loss(task.model(x_all), y_all).item()
    for _ in range(20):
        loss = task.train_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = task.loss(task.model(x_all), y_all).item()
    assert after < 0.7 * before
    assert task.evaluate()["accuracy"] > 0.5


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_errors(image_root, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'vit'; valid names: mlp, cnn, transformer"):
        T.build_task("vit", width=8, depth=1)
    for bad in ({"width": 0}, {"depth": 0}, {"width": -1}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="must be a positive integer") as e:
            T.build_task("mlp", **{"width": 8, "depth": 1, "data_root": image_root, **bad})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*fashion_mnist"):
        T.build_task("mlp", width=8, depth=1, dataset="imagenet")
    with pytest.raises(ValueError, match="unknown dataset 'mnist' for task 'transformer'"):
        T.build_task("transformer", width=8, depth=1, dataset="mnist")
    with pytest.raises(P.ParametrizationError, match="unknown parametrization"):
        T.build_task("mlp", width=8, depth=1, parametrization="ntk")
    with pytest.raises(D.DatasetNotFoundError):
        T.build_task("mlp", width=8, depth=1, data_root=tmp_path)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x" * 40)
    with pytest.raises(ValueError, match="fewer than context"):
        T.build_task("transformer", width=8, depth=1, context=16, data_root=tiny)


# --- population --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["mup", "sp"])
@pytest.mark.parametrize("shared", [True, False])
def test_population_matches_separate_modules(scheme, shared):
    n, width, depth, seed = 3, 8, 3, 5
    pop = T.MLPPopulation(n, 196, width, depth, 10, parametrization=scheme, seed=seed)
    models = []
    for i in range(n):
        torch.manual_seed(seed + i)
        models.append(P.mlp(196, width, depth, 10, parametrization=scheme))
    for name, stacked in pop.params.items():  # P independently seeded inits, in module names
        torch.testing.assert_close(
            stacked, torch.stack([dict(m.named_parameters())[name] for m in models])
        )
    assert list(pop.params) == [name for name, _ in models[0].named_parameters()]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero readout, so every gradient is non-trivial under μP too
        for m in models:
            m.readout.weight.normal_(0, 1, generator=gen)
    params = T.stack_params(models)
    if shared:
        x, y = torch.randn(6, 196, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        xs, ys = [x] * n, [y] * n
    else:
        x, y = torch.randn(n, 6, 196, generator=gen), torch.randint(0, 10, (n, 6), generator=gen)
        xs, ys = list(x), list(y)
    loss, grads = pop.grads(params, x, y)
    assert loss.shape == (n,) and not loss.requires_grad
    torch.testing.assert_close(pop.loss(params, x, y), loss)
    for i, m in enumerate(models):
        ref = F.cross_entropy(m(xs[i]), ys[i])
        m.zero_grad()
        ref.backward()
        torch.testing.assert_close(loss[i], ref.detach())
        for name, p in m.named_parameters():
            assert p.grad.abs().sum() > 0
            torch.testing.assert_close(grads[name][i], p.grad)
        acc = (m(xs[i]).argmax(-1) == ys[i]).float().mean()
        torch.testing.assert_close(pop.accuracy(params, x, y)[i], acc)
        rebuilt = pop.module(i, params)
        torch.testing.assert_close(rebuilt(xs[i]), m(xs[i]))


def test_population_from_task(image_root):
    task = mlp_task(image_root, width=8, depth=2, seed=2)
    pop = task.population(4)
    assert pop.multiplier == task.model.readout.multiplier == pytest.approx(1 / 8)
    for name, p in task.model.named_parameters():  # copy 0 is the task's own model
        assert pop.params[name].shape == (4, *p.shape)
        torch.testing.assert_close(pop.params[name][0], p.detach())
    x, y = task.sample_population(4)
    loss, grads = pop.grads(pop.params, x, y)
    assert loss.shape == (4,) and torch.allclose(loss, torch.tensor(math.log(10)))
    assert set(grads) == set(pop.params)
    with pytest.raises(ValueError, match="mlp task"):
        T.build_task("cnn", width=4, depth=1, data_root=image_root).population(2)


# --- real data ---------------------------------------------------------------------------------


@pytest.mark.skipif(
    not D.SYSTEM_DIRS["fashion_mnist"].is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_real_fashion_mnist(monkeypatch):
    for var in ("FASHION_MNIST_DIR", "MULO_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    task = T.build_task("mlp", width=32, depth=3, eval_size=1000)
    assert task.batcher.x.shape == (60000, 196) and task.eval_x.shape == (1000, 196)
    assert task.evaluate()["accuracy"] == pytest.approx(0.1, abs=0.05)  # zero readout at init
    opt = torch.optim.Adam(P.mu_adam_param_groups(task.model, 0.1))
    for _ in range(30):
        loss = task.train_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert task.evaluate()["accuracy"] > 0.5
