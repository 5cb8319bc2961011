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


@pytest.mark.parametrize("use_kernel", [True, False])
def test_v2_steps_a_non_contiguous_parameter_like_its_contiguous_copy(use_kernel, monkeypatch):
    monkeypatch.setattr(LF, "USE_KERNEL", use_kernel)
    gen = torch.Generator().manual_seed(3)
    meta = LF.init_meta_params(population=2, generator=gen, architecture="small_fc_lopt_v2")
    base = torch.randn(2, 5, 7, generator=gen)
    grad = torch.randn(2, 7, 5, generator=gen)
    strided = base.clone().transpose(1, 2)  # [2, 7, 5], not contiguous
    dense = strided.contiguous()
    assert not strided.is_contiguous()
    for p in (strided, dense):
        LF.lo_step_(meta, LF.init_state(p, 10.0), p, grad, scale=1.0, step_mult=0.01)
    assert torch.equal(strided, dense) and not torch.equal(dense, base.transpose(1, 2))


def test_the_optimizer_sees_its_meta_weights_edited_in_place():
    import mulo
    import parametrizations as P

    def run(edit: bool):
        torch.manual_seed(0)
        model = P.mlp(6, 8, 2, 3)
        opt = mulo.MuLO(model, meta_weights=LF.init_meta_params(architecture="small_fc_lopt_v2"))
        x = torch.randn(4, 6)
        for step in range(3):
            if edit and step == 1:
                with torch.no_grad():
                    opt.meta["theta"].add_(0.1)  # prepared at step 0: must be prepared again
            opt.zero_grad()
            (model(x) - 1).square().sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    def run_fresh():  # the edit made by hand before a fresh optimizer's second step
        torch.manual_seed(0)
        model = P.mlp(6, 8, 2, 3)
        meta = LF.init_meta_params(architecture="small_fc_lopt_v2")
        opt = mulo.MuLO(model, meta_weights=meta)
        x = torch.randn(4, 6)
        for step in range(3):
            if step == 1:
                state = opt.state_dict()
                meta = {k: v.clone() for k, v in opt.meta.items()}
                meta["theta"] = meta["theta"] + 0.1
                opt = mulo.MuLO(model, meta_weights=meta)
                opt.load_state_dict(state)
            opt.zero_grad()
            (model(x) - 1).square().sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    edited, fresh, untouched = run(True), run_fresh(), run(False)
    assert all(torch.equal(a, b) for a, b in zip(edited, fresh, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(edited, untouched, strict=True))
