"""The fused C kernel (mulo/kernels/lo_net.c) against the PyTorch path and the literal network,
for one particle (the drop-in optimizer) and for populations (meta-training), v1 and v2."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from mulo import functional as LF
from mulo import kernel

SHAPES = [(), (300,), (64, 200), (200, 64), (37, 53), (6, 4, 3, 3), (8, 4, 3, 3), (5, 1), (1, 5)]


def run(shape, use_kernel, chunk_size, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    meta = LF.init_meta_params(population=1, generator=gen)
    p = torch.randn(1, *shape, generator=gen)
    state = LF.init_state(p)
    old = LF.USE_KERNEL
    LF.USE_KERNEL = use_kernel
    try:
        for _ in range(steps):
            g = torch.randn(1, *shape, generator=gen)
            LF.lo_step_(meta, state, p, g, scale=0.5, step_mult=0.01, chunk_size=chunk_size)
    finally:
        LF.USE_KERNEL = old
    return p, state


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no cc")
def test_kernel_builds_where_a_compiler_exists():
    assert kernel.load() is not None


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", [7, 100, LF.DEFAULT_CHUNK_SIZE])
def test_kernel_matches_pytorch_path(shape, chunk_size):
    if kernel.load() is None:
        pytest.skip("kernel unavailable")
    assert_same_step(run(shape, True, chunk_size), run(shape, False, chunk_size), atol=1e-6)


def assert_same_step(fused, unfused, atol):
    """Parameters and every LO state field of two paths agree."""
    (p_k, s_k), (p_t, s_t) = fused, unfused
    torch.testing.assert_close(p_k, p_t, rtol=1e-5, atol=atol)
    for name, value in s_t.to_dict().items():
        torch.testing.assert_close(s_k.to_dict()[name], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(33, 70), (70, 33), (129,)])
def test_kernel_step_equals_literal_network_on_features(shape):
    """p_new = p - lr*scale*step_mult * d * exp(0.001 a) with (d, a) = net(features)."""
    gen = torch.Generator().manual_seed(1)
    meta = LF.init_meta_params(population=1, generator=gen)
    p = torch.randn(1, *shape, generator=gen)
    g = torch.randn(1, *shape, generator=gen)
    state = LF.init_state(p)
    x = LF.features(meta, state, p, g).flatten(2).transpose(1, 2)  # [1, n, 39]
    h = torch.relu(x @ meta["w1"].transpose(1, 2) + meta["b1"][:, None])
    h = torch.relu(h @ meta["w2"].transpose(1, 2) + meta["b2"][:, None])
    out = h @ meta["w3"].transpose(1, 2) + meta["b3"][:, None]
    expected = p.flatten(1) - 2.0 * 0.5 * 0.01 * out[..., 0] * torch.exp(0.001 * out[..., 1])
    LF.lo_step_(meta, state, p, g, scale=0.5, step_mult=0.01, lr=2.0, chunk_size=50)
    torch.testing.assert_close(p.flatten(1), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_non_finite_step_never_reaches_the_parameter(use_kernel):
    meta = LF.init_meta_params(population=1, generator=torch.Generator().manual_seed(2))
    meta["b3"][0, 1] = 1e6  # exp(0.001 a) overflows to inf for every element
    p = torch.randn(1, 40, 30)
    before = p.clone()
    old = LF.USE_KERNEL
    LF.USE_KERNEL = use_kernel
    try:
        LF.lo_step_(meta, LF.init_state(p), p, torch.randn_like(p), scale=1.0, step_mult=0.01)
    finally:
        LF.USE_KERNEL = old
    assert torch.equal(p, before)


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    code = (
        "import warnings, torch, mulo, parametrizations as P\n"
        "warnings.simplefilter('always')\n"
        "m = P.mlp(8, 16, 2, 3)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    opt = mulo.MuLO(m, meta_weights=mulo.functional.init_meta_params())\n"
        "    for _ in range(2):\n"
        "        m(torch.randn(4, 8)).sum().backward(); opt.step()\n"
        "msgs = [str(x.message) for x in w if 'kernel' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert mulo.kernel.load() is None\n"
        "assert all(torch.isfinite(p).all() for p in m.parameters())\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), MULO_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


POP_SHAPES = [(64, 200), (200, 64), (37, 53), (6, 4, 3, 3), (16, 8, 3, 3), (33, 1), (3, 5, 3)]


def run_population(shape, arch, use_kernel, steps=3, pop=5, seed=0):
    """Per-particle meta-parameters, counters and horizons: what meta-training steps."""
    gen = torch.Generator().manual_seed(seed)
    meta = LF.init_meta_params(population=pop, generator=gen, architecture=arch)
    meta = {
        k: (v + 0.05 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in meta.items()
    }
    p = torch.randn(pop, *shape, generator=gen)
    horizon = torch.tensor([0.0, 10.0, 100.0, 3.0, 1000.0][:pop])
    state = LF.init_state(p, horizon=horizon if arch != "small_fc_lopt" else None)
    state.t += torch.arange(pop, dtype=torch.float32) * 7  # particles out of lockstep
    old = LF.USE_KERNEL
    LF.USE_KERNEL = use_kernel
    try:
        for _ in range(steps):
            g = torch.randn(pop, *shape, generator=gen) * torch.logspace(-3, 1, pop).reshape(
                pop, *[1] * len(shape)
            )
            LF.lo_step_(meta, state, p, g, scale=1 / 64, step_mult=0.01)
    finally:
        LF.USE_KERNEL = old
    return p, state


@pytest.mark.parametrize("arch", ["small_fc_lopt", "small_fc_lopt_v2"])
@pytest.mark.parametrize("shape", POP_SHAPES)
def test_fused_population_path_matches_the_unfused_one(shape, arch):
    if kernel.load() is None:
        pytest.skip("kernel unavailable")
    fused, unfused = run_population(shape, arch, True), run_population(shape, arch, False)
    assert_same_step(fused, unfused, atol=2e-6)


def test_kernel_takes_rank2_and_conv_layouts_and_leaves_the_rest_to_pytorch():
    assert kernel.geometry((64, 200), LF.factored_dims((64, 200))) == (64, 200, 1)
    assert kernel.geometry((16, 8, 3, 3), LF.factored_dims((16, 8, 3, 3))) == (16, 8, 9)
    assert kernel.geometry((3, 5, 3), LF.factored_dims((3, 5, 3))) is None  # largest dims 1, 2
    assert kernel.geometry((300,), LF.factored_dims((300,))) is None
    assert kernel.geometry((0, 5), LF.factored_dims((0, 5))) is None


def test_kernel_results_do_not_depend_on_the_thread_count():
    if kernel.load() is None:
        pytest.skip("kernel unavailable")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_population((70, 90), "small_fc_lopt_v2", True)[0]
        torch.set_num_threads(2)
        two = run_population((70, 90), "small_fc_lopt_v2", True)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
