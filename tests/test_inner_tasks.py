"""Population-batched inner tasks for any module (mulo.meta.inner_tasks): vmapped losses and
gradients against a plain per-module loop, seeded inits against build_task, the MLP against the
hand-batched MLPTask, μP scales, held-out evaluation, and a PES truncation in the estimator."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import write_learnable_fashion

import parametrizations as P
from mulo import functional as LF
from mulo.meta.estimators import NUM_META, InnerProblem, MLPTask, flatten_meta
from mulo.meta.inner_tasks import ModulePopulation, ModuleTask, build_module
from mulo.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")

POP = 3
# tiny sizes: the CNN's depth 3 has a stride-2 conv (14 -> 7) and a stride-1 one
SIZES = {
    "mlp": {"width": 8, "depth": 3, "batch_size": 6},
    "cnn": {"width": 4, "depth": 3, "batch_size": 5},
    "transformer": {"width": 8, "depth": 2, "batch_size": 3, "context": 8},
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"), n_train=64, n_test=24)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "cat"]
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, 1500)) + "\n")
    return path


def root_for(name, image_root, text_file):
    return text_file if name == "transformer" else image_root


@pytest.fixture(scope="module")
def tasks(image_root, text_file):
    """``(name, kind) -> ModuleTask`` at the tiny sizes, built once."""
    cache = {}

    def get(name, kind="mu"):
        if (name, kind) not in cache:
            root = root_for(name, image_root, text_file)
            cache[name, kind] = ModuleTask.from_name(
                name, kind=kind, data_root=root, eval_size=20, **SIZES[name]
            )
        return cache[name, kind]

    return get


def population_params(task, seeds, noise=0.1):
    """Inits of ``seeds`` stacked, plus seeded noise so that no gradient is trivially zero (μP
    zero-initialises the readout and the query projection)."""
    inits = [task.init_params(s) for s in seeds]
    gen = torch.Generator().manual_seed(123)
    out = {}
    for name in inits[0]:
        p = torch.cat([i[name] for i in inits])
        out[name] = p + noise * torch.randn(p.shape, generator=gen)
    return out


def loop_loss_and_grads(task, params, x, y):
    """Reference: P separately built modules, each its own forward and torch.autograd.grad."""
    losses, grads = [], {n: [] for n in params}
    for i in range(x.shape[0]):
        model = build_module(task.builder, 1000 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n][i])
        out = model(x[i])
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[i].reshape(-1))
        names = [n for n, _ in model.named_parameters()]
        for n, g in zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True):
            grads[n].append(g)
        losses.append(loss.detach())
    return torch.stack(losses), {n: torch.stack(g) for n, g in grads.items()}


def batch(task, pop=POP, seed=0):
    return task.make_batcher(seed).sample_population(pop, task.batch_size, shared=False)


# --- the population against a loop over modules -------------------------------------------------


@pytest.mark.parametrize("grad_method", ["autograd", "vmap_grad"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_population_grads_equal_per_module_grads(tasks, name, grad_method):
    task = tasks(name)
    params = population_params(task, [3, 4, 5])
    x, y = batch(task)
    pop = ModulePopulation(task.builder, 1, grad_method=grad_method)
    loss, grads = pop.grads(params, x, y)
    ref_loss, ref_grads = loop_loss_and_grads(task, params, x, y)
    assert loss.shape == (POP,) and not loss.requires_grad
    assert list(grads) == list(params) == [n for n, _ in pop.template.named_parameters()]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n in params:
        assert grads[n].shape == params[n].shape
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    torch.testing.assert_close(pop.loss(params, x, y), ref_loss, rtol=1e-5, atol=1e-6)
    if name == "transformer":  # attention through the MATH backend: the same function
        math_pop = ModulePopulation(task.builder, 1, grad_method=grad_method, sdpa_math=True)
        loss, grads = math_pop.grads(params, x, y)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for n in params:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_functional_forward_keeps_readout_multiplier_and_attention_scale(tasks, name):
    """functional_call runs the module's own forward: the cached float multipliers apply."""
    task = tasks(name)
    pop = task.template
    readout = pop.template.readout
    assert isinstance(readout, P.Readout) and readout.multiplier == pytest.approx(1 / task.width)
    if name == "transformer":
        attn = pop.template.blocks[0].attn
        assert attn.scale == pytest.approx(1 / attn.head_dim)  # μP: 1/d_head
    params = population_params(task, [0, 1], noise=0.5)
    x, _ = batch(task, pop=2)
    out = pop.logits(params, x)
    for i in range(2):
        torch.testing.assert_close(out[i], pop.module(i, params)(x[i]), rtol=1e-5, atol=1e-6)
    # and the multiplier is really in there: without it the logits are `width` times larger
    plain = pop.module(0, params)
    plain.readout.multiplier = 1.0
    assert not torch.allclose(plain(x[0]), out[0])


def test_chunked_vmap_gives_the_same_grads(tasks):
    task = tasks("cnn")
    params = population_params(task, [0, 1, 2])
    x, y = batch(task)
    loss, grads = task.grads(params, x, y)
    for method in ("vmap_grad", "autograd"):
        chunked = ModulePopulation(task.builder, 1, grad_method=method, chunk_size=2)
        c_loss, c_grads = chunked.grads(params, x, y)
        torch.testing.assert_close(c_loss, loss)
        for n in params:
            torch.testing.assert_close(c_grads[n], grads[n], rtol=1e-5, atol=1e-7)


def test_shared_batch_equals_expanded_batch(tasks):
    task = tasks("cnn")
    params = population_params(task, [0, 1, 2])
    x, y = task.make_batcher(0).sample(task.batch_size)
    shared = task.template.grads(params, x, y, shared=True)
    expanded = task.grads(params, x.expand(POP, *x.shape), y.expand(POP, *y.shape))
    torch.testing.assert_close(shared[0], expanded[0])
    for n in params:
        torch.testing.assert_close(shared[1][n], expanded[1][n], rtol=1e-5, atol=1e-7)


def test_grads_work_under_no_grad(tasks):
    task = tasks("transformer")
    params = population_params(task, [0, 1])
    x, y = batch(task, pop=2)
    ref = task.grads(params, x, y)
    with torch.no_grad():
        loss, grads = task.grads(params, x, y)
    torch.testing.assert_close(loss, ref[0])
    for n in params:
        torch.testing.assert_close(grads[n], ref[1][n])


# --- inits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("kind", ["mu", "sp"])
def test_init_params_are_seeded_like_build_task(tasks, image_root, text_file, name, kind):
    task = tasks(name, kind)
    rng = torch.get_rng_state()
    a, b, c = task.init_params(7), task.init_params(7), task.init_params(8)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    model = build_task(
        name, parametrization="mup" if kind == "mu" else "sp", seed=7, eval_size=20,
        data_root=root_for(name, image_root, text_file), **SIZES[name],
    ).model  # fmt: skip
    assert list(a) == [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert a[n].shape == (1, *p.shape) and a[n].dtype == torch.float32
        assert torch.equal(a[n][0], p.detach()) and torch.equal(a[n], b[n])
    weights = [n for n in a if a[n].dim() > 2 and a[n].abs().sum() > 0]
    assert weights and all(not torch.equal(a[n], c[n]) for n in weights)


# --- the MLP against the hand-batched MLPTask --------------------------------------------------


def test_module_mlp_matches_hand_batched_mlp_task(image_root):
    task = ModuleTask.from_name("mlp", kind="mu", data_root=image_root, **SIZES["mlp"])
    ref = MLPTask.from_dataset(kind="mu", data_root=image_root, **SIZES["mlp"])
    # same parameter names (both are P.mlp's named_parameters), same inits, same data
    init, ref_init = task.init_params(3), ref.init_params(3)
    assert list(init) == list(ref_init)
    assert all(torch.equal(init[n], ref_init[n]) for n in init)
    assert task.scales == ref.scales and task.step_mult == ref.step_mult
    assert task.loss_cap == ref.loss_cap and torch.equal(task.x_train, ref.x_train)
    assert torch.equal(task.x_test, ref.x_test)
    params = population_params(task, [0, 1, 2])
    x, y = batch(task)
    x_ref, y_ref = ref.make_batcher(0).sample_population(POP, ref.batch_size, shared=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    loss, grads = task.grads(params, x, y)
    ref_loss, ref_grads = ref.grads(params, x, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n in params:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    ev, ref_ev = task.evaluate(params), ref.evaluate(params)
    torch.testing.assert_close(ev["test_loss"], ref_ev["test_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ev["test_accuracy"], ref_ev["test_accuracy"])


# --- scales, evaluation, batches, describe --------------------------------------------------


def test_scales_follow_the_parametrization(tasks):
    cnn, lm = tasks("cnn", "mu"), tasks("transformer", "mu")
    w = SIZES["cnn"]["width"]
    for name, s in cnn.scales.items():
        hidden = name in ("conv1.weight", "conv2.weight")
        assert s == pytest.approx(1 / (w * 9) if hidden else 1.0), name
    w = SIZES["transformer"]["width"]
    for name, s in lm.scales.items():
        leaf = name.split(".")[-2] if name.endswith("weight") else ""
        if leaf in ("q", "k", "v", "out", "mlp_in"):
            expected = 1 / w
        elif leaf == "mlp_out":
            expected = 1 / (4 * w)
        else:  # embeddings, LayerNorms, biases, readout
            expected = 1.0
        assert s == pytest.approx(expected), name
    for name in ("mlp", "cnn", "transformer"):
        sp = tasks(name, "sp")
        assert set(sp.scales) == set(tasks(name, "mu").scales)
        assert all(s == 1.0 for s in sp.scales.values())
        assert sp.step_mult == LF.STEP_MULT_SP and tasks(name, "mu").step_mult == LF.STEP_MULT_MU
    assert cnn.loss_cap == pytest.approx(1.5 * math.log(10))
    assert lm.loss_cap == pytest.approx(1.5 * math.log(256))


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_evaluate_matches_task_evaluate_per_particle(tasks, image_root, text_file, name):
    task = tasks(name)
    params = population_params(task, [0, 1], noise=0.3)
    ev = task.evaluate(params, chunk=7)  # several chunks, a ragged last one
    assert set(ev) >= {"test_loss", "test_accuracy"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in ev.values())
    torch.testing.assert_close(ev["test_loss"], task.evaluate(params)["test_loss"])
    ref = build_task(name, eval_size=20, data_root=root_for(name, image_root, text_file),
                     **SIZES[name])  # fmt: skip
    for i in range(2):
        model = task.template.module(i, params)
        out = ref.evaluate(model)
        assert ev["test_loss"][i].item() == pytest.approx(out["loss"], rel=1e-5)
        if name == "cnn":
            assert ev["test_accuracy"][i].item() == pytest.approx(out["accuracy"])


def test_batchers_and_describe(tasks):
    for name in ("cnn", "transformer"):
        task = tasks(name)
        b = task.make_batcher(5)
        state = b.state_dict()
        x, y = b.sample_population(4, task.batch_size, shared=False)
        if name == "cnn":
            assert x.shape == (4, task.batch_size, 1, 14, 14) and y.shape == (4, task.batch_size)
        else:
            assert x.shape == y.shape == (4, task.batch_size, SIZES[name]["context"])
            assert torch.equal(x[..., 1:], y[..., :-1])
        b.load_state_dict(state)
        x2, _ = b.sample_population(4, task.batch_size, shared=False)
        assert torch.equal(x, x2)
        d = task.describe()
        assert {"task", "kind", "width", "depth", "batch_size", "dataset"} <= set(d)
        assert d["task"] == name and d["kind"] == "mu" and d["width"] == SIZES[name]["width"]
        assert task.dtype == torch.float32 and task.device == torch.device("cpu")


def test_unknown_names_are_rejected(image_root):
    with pytest.raises(ValueError, match="unknown task"):
        ModuleTask.from_name("resnet", 8, 2, "mu", data_root=image_root)
    with pytest.raises(ValueError, match="unknown LO kind"):
        ModuleTask.from_name("cnn", 8, 2, "adam", data_root=image_root)


# --- inside the estimator ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_module_task_runs_in_the_pes_estimator(tasks, name):
    torch.set_flush_denormal(True)  # as MetaTrainer does (conftest's one_thread resets it)
    task = tasks(name)
    theta = flatten_meta(LF.init_meta_params(generator=torch.Generator().manual_seed(0)))
    prob = InnerProblem(task, pairs=2, truncation=3, min_length=3, max_length=6, max_offset=1)
    before = {n: p.clone() for n, p in prob.params.items()}
    for _ in range(2):  # the second truncation restarts the runs that ended
        rows, _ = prob.rows(theta)
        assert rows.shape == (2, NUM_META + 2) and torch.isfinite(rows).all()
        assert (rows[:, NUM_META:] > 0).all()
    assert set(prob.params) == set(task.scales)
    assert any(not torch.equal(before[n], p) for n, p in prob.params.items())
    assert all(torch.isfinite(p).all() for p in prob.params.values())
