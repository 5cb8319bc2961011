"""Coordinate check: under Adam the SP logits blow up with width, μP + μAdam logits do not."""

import pytest
import torch
import torch.nn.functional as F

import parametrizations as P

WIDTHS = [64, 256, 1024]
LR = 1e-2


def run(parametrization):
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(64, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    if parametrization == "sp":
        make_opt = lambda m: torch.optim.Adam(m.parameters(), lr=LR)  # noqa: E731
    else:
        make_opt = lambda m: torch.optim.Adam(P.mu_adam_param_groups(m, LR))  # noqa: E731
    return P.coord_check(
        lambda w: P.mlp(32, w, 3, 10, parametrization=parametrization),
        WIDTHS,
        make_opt,
        data,
        F.cross_entropy,
        steps=3,
    )


@pytest.fixture(scope="module")
def records():
    return {name: run(name) for name in ("sp", "mup")}


def test_records_have_expected_keys(records):
    for recs in records.values():
        assert all(set(r) == {"width", "step", "layer", "mean_abs"} for r in recs)
        assert {r["width"] for r in recs} == set(WIDTHS)
        assert {r["step"] for r in recs} == {0, 1, 2, 3}
        assert {r["layer"] for r in recs} == {"input", "hidden1", "hidden2", "readout"}
        assert len(recs) == len(WIDTHS) * 4 * 4


def test_sp_logits_blow_up_and_mup_logits_stay(records):
    sp = P.coord_table(records["sp"], step=3)["readout"]
    mu = P.coord_table(records["mup"], step=3)["readout"]
    sp_ratio, mu_ratio = sp[1024] / sp[64], mu[1024] / mu[64]
    print(f"step-3 |logits| ratio 1024/64: SP {sp_ratio:.2f}, μP {mu_ratio:.2f}")
    assert sp_ratio >= 3
    assert 1 / 1.5 <= mu_ratio <= 1.5
    mu_hidden = P.coord_table(records["mup"], step=3)["hidden2"]
    assert 1 / 1.5 <= mu_hidden[1024] / mu_hidden[64] <= 1.5


def test_coord_check_layers_and_fixed_step_batches():
    data = torch.randn(8, 4), torch.randint(0, 3, (8,))
    recs = P.coord_check(
        lambda w: P.mlp(4, w, 2, 3),
        [8, 16],
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        lambda step: data,
        F.cross_entropy,
        steps=1,
        layers=["readout"],
    )
    assert {r["layer"] for r in recs} == {"readout"} and len(recs) == 4
    with pytest.raises(ValueError, match="nope"):
        P.coord_check(lambda w: P.mlp(4, w, 2, 3), [8], lambda m: None, data, None, layers=["nope"])
