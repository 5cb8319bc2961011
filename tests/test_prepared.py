"""``functional.prepare``: meta-parameters prepared once must step exactly like the dict they
come from, whatever the tensors' step counters and run lengths (its time memo must never serve
a counter it was not computed for)."""

from __future__ import annotations

import pytest
import torch

from mulo import functional as LF

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(6, 5), (6,), (4, 3, 3, 3), (3, 1, 3, 3), (1,)]


def problem(arch: str, horizon):
    gen = torch.Generator().manual_seed(0)
    pop = 3
    meta = LF.init_meta_params(population=pop, generator=gen, architecture=arch)
    meta = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in meta.items()}
    params = [torch.randn(pop, *s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(pop, *s, generator=gen) for s in SHAPES] for _ in range(4)]
    states = [LF.init_state(p, horizon) for p in params]
    return meta, params, grads, states


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize(
    "arch, horizon",
    [("small_fc_lopt", None), ("small_fc_lopt_v2", None), ("small_fc_lopt_v2", 7.0)],
)
def test_prepared_meta_steps_bitwise_like_the_dict(arch, horizon, use_kernel, monkeypatch):
    monkeypatch.setattr(LF, "USE_KERNEL", use_kernel)
    runs = []
    for prepared in (False, True):
        meta, params, grads, states = problem(arch, horizon)
        if prepared:
            meta = LF.prepare(meta)
        # the tensors' counters drift apart: tensor k skips the steps s < k, so one prepared
        # object sees several counters within a step and must recompute for each
        for step, step_grads in enumerate(grads):
            for k, (p, g, st) in enumerate(zip(params, step_grads, states, strict=True)):
                if step >= k % 3:
                    LF.lo_step_(meta, st, p, g, scale=0.5 if p.dim() > 2 else 1.0, step_mult=0.01)
        runs.append((params, states))
    (p_dict, s_dict), (p_prep, s_prep) = runs
    for a, b in zip(p_dict, p_prep, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(s_dict, s_prep, strict=True):
        for key, value in a.to_dict().items():
            assert torch.equal(value, b.to_dict()[key]), key


def test_prepare_passes_a_prepared_one_through_and_converts_dtype():
    meta = LF.init_meta_params(population=2, architecture="small_fc_lopt_v2")
    prep = LF.prepare(meta)
    assert LF.prepare(prep) is prep
    assert LF.prepare(prep, torch.float32) is prep
    wide = LF.prepare(prep, torch.float64)
    assert wide.dtype == torch.float64 and wide.meta["w1"].dtype == torch.float64
    # a memo entry for one horizon is not served for another
    t = torch.tensor([5.0, 5.0])
    bias_known, sched_known = prep.timed(t, torch.tensor([10.0, 10.0]))
    bias_unknown, sched_unknown = prep.timed(t, None)
    assert not torch.equal(bias_known, bias_unknown)
    assert not torch.equal(sched_known, sched_unknown)
