"""The multi-tensor step (``foreach``, ``functional.lo_step_many_``) against the per-tensor one:
small same-shape tensors stepped as one population must move exactly as if stepped one by one."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import parametrizations as P
from mulo import SPLO, MuLO
from mulo import functional as LF
from mulo import optim as LO

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return P.transformer_lm(64, 32, 2, context=8, parametrization="mup").to(dtype)


def v2_meta(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    meta = LF.init_meta_params(population=1, architecture="small_fc_lopt_v2", generator=gen)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=gen))[0] for k, v in meta.items()}


def run_pair(cls, dtype=torch.float32, steps: int = 4, **kwargs):
    """The same model stepped by ``foreach=True`` and ``foreach=False`` on the same gradients;
    one tensor misses a step (its counter then differs from its same-shape peers)."""
    models = [gpt(dtype), gpt(dtype)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [cls(m, foreach=f, **kwargs) for m, f in zip(models, (True, False), strict=True)]
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        grads = [
            torch.randn(p.shape, generator=gen) * 10.0 ** (step - 3) for p in models[0].parameters()
        ]
        for model in models:
            for i, (p, g) in enumerate(zip(model.parameters(), grads, strict=True)):
                p.grad = None if (step == 1 and i == 3) else g.to(dtype)
        for opt in opts:
            opt.step()
    return models, opts


def differences(models, opts) -> tuple[float, float]:
    pairs = list(zip(models[0].parameters(), models[1].parameters(), strict=True))
    param = max((a.double() - b.double()).abs().max().item() for a, b in pairs)
    state = max(
        (opts[0].state[a][k].double() - opts[1].state[b][k].double()).abs().max().item()
        for a, b in pairs
        for k, v in opts[0].state[a].items()
        if torch.is_tensor(v)
    )
    return param, state


def test_the_transformer_has_tensors_that_step_together():
    model = gpt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = MuLO(model)
    keys = [opt._foreach_key(opt.param_groups[0], p, opt.state[p]) for p in model.parameters()]
    shared = [k for k in set(keys) if k is not None and keys.count(k) > 1]
    assert len(shared) >= 3  # vectors, square matrices, MLP matrices share a call each


@pytest.mark.parametrize("cls", [MuLO, SPLO])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_v1_foreach_is_bitwise_the_per_tensor_step(cls, dtype):
    param, state = differences(*run_pair(cls, dtype))
    assert param == 0 and state == 0


@pytest.mark.parametrize("total_steps", [None, 20])
def test_v2_foreach_matches_the_per_tensor_step(total_steps):
    models, opts = run_pair(MuLO, meta_weights=v2_meta(), total_steps=total_steps)
    param, state = differences(models, opts)
    # v2's 1/rms(d) multiplies in another order when tensors are stacked: float ulps, no more
    assert param <= 1e-6 and state == 0
    moved = [
        (p - q).abs().max().item()
        for p, q in zip(models[0].parameters(), gpt().parameters(), strict=True)
    ]
    assert min(moved) > 0  # every tensor moved, so the comparison means something


def test_bf16_tensors_step_alone_with_their_own_rounding_seed():
    models, opts = run_pair(MuLO, torch.bfloat16)
    assert all(
        opts[0]._foreach_key(g, p, opts[0].state[p]) is None
        for g in opts[0].param_groups
        for p in g["params"]
    )
    assert differences(models, opts) == (0.0, 0.0)


def test_groups_with_other_lr_or_weight_decay_do_not_share_a_call():
    models = [gpt(), gpt()]
    groups = []
    for model in models:
        vectors = [p for p in model.parameters() if p.shape == (32,)]
        half = len(vectors) // 2
        groups.append(
            [
                {"params": vectors[:half], "role": "vector"},
                {"params": vectors[half:], "role": "vector", "lr": 0.5, "weight_decay": 0.1},
            ]
        )
    opts = [
        MuLO(g, meta_weights="mulo_m", foreach=f)
        for g, f in zip(groups, (True, False), strict=True)
    ]
    keys = {
        opts[0]._foreach_key(g, p, opts[0].state[p])
        for g in opts[0].param_groups
        for p in g["params"]
    }
    assert len(keys) == 2
    for model in models:
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.01)
    for opt in opts:
        opt.step()
    a = [p for p in models[0].parameters() if p.shape == (32,)]
    b = [p for p in models[1].parameters() if p.shape == (32,)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_large_tensors_step_alone(monkeypatch):
    monkeypatch.setattr(LO, "FOREACH_MAX_NUMEL", 100)
    model = gpt()
    opt = MuLO(model)
    for p in model.parameters():
        key = opt._foreach_key(opt.param_groups[0], p, opt.state[p])
        assert (key is None) == (p.numel() > 100)


def test_a_copy_keeps_the_setting():
    opt = MuLO(gpt(), foreach=False)
    assert copy.deepcopy(opt).foreach is False


def test_lo_step_many_refuses_what_it_cannot_stack():
    meta = {k: v.unsqueeze(0) for k, v in v2_meta().items()}
    p, q = torch.zeros(1, 4), torch.zeros(1, 5)
    states = [LF.init_state(p), LF.init_state(q)]
    with pytest.raises(ValueError, match="one shape"):
        LF.lo_step_many_(meta, states, [p, q], [p, q], scale=1.0, step_mult=0.01)
    b = torch.zeros(1, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        LF.lo_step_many_(
            meta, [LF.init_state(b)] * 2, [b, b.clone()], [b, b], scale=1.0, step_mult=0.01
        )
    with pytest.raises(ValueError, match=r"\[1, \.\.\.\]"):
        two = {k: v.expand(2, *v.shape[1:]) for k, v in meta.items()}
        LF.lo_step_many_(
            two, [LF.init_state(p)] * 2, [p, p.clone()], [p, p], scale=1.0, step_mult=0.01
        )
    states = [LF.init_state(p, horizon=10), LF.init_state(p)]
    with pytest.raises(ValueError, match="horizon"):
        LF.lo_step_many_(meta, states, [p, p.clone()], [p, p], scale=1.0, step_mult=0.01)
