"""AGD, NAG-GS and learning-rate grafting (mulo.baselines): each against a plain reference of
the paper's equations written out here, plus the torch.optim contract and the CLI."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import write_learnable_fashion
from torch import nn

import parametrizations as P
from mulo import baselines as B

ROOT = Path(__file__).resolve().parents[1]


def batch(seed: int = 1, shape=(8,), n: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def mlp(bias: bool = True, seed: int = 0):
    """A float64 SP MLP (8 -> 16 -> 16 -> 4): float64 so references agree to ~1e-12."""
    torch.manual_seed(seed)
    return P.mlp(8, 16, 2, 4, parametrization="sp", bias=bias).double()


def conv_net(seed: int = 0):
    """Bias-free conv -> linear -> linear: AGD's layers with a conv fan-in of 2 * 3 * 3."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(48, 5, bias=False), nn.ReLU(), nn.Linear(5, 4, bias=False),
    ).double()  # fmt: skip


def grads_at(model, params: list[torch.Tensor], data) -> list[torch.Tensor]:
    """Gradient of the batch loss at ``params`` (model's parameter order), model untouched."""
    x, y = data
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    out = torch.func.functional_call(model, dict(zip(names, leaves, strict=True)), (x,))
    return list(torch.autograd.grad(F.cross_entropy(out, y), leaves))


def run(model, opt, steps: int, data, sched=None) -> None:
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def quiet_build(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AGD's note about the vectors it leaves alone
        return B.build_optimizer(*args, **kwargs)


# -- AGD ----------------------------------------------------------------------------------------


def agd_reference(model, data, steps: int, lr: float = 1.0) -> list[torch.Tensor]:
    """Bernstein et al. 2023, Algorithm 1, literally, on a bias-free model's weights."""
    ws = snapshot(model)
    depth = len(ws)
    for _ in range(steps):
        gs = grads_at(model, ws, data)
        s = [math.sqrt(w.shape[0] / math.prod(w.shape[1:])) for w in ws]
        big_g = sum(sk * g.norm() for sk, g in zip(s, gs, strict=True)) / depth
        eta = math.log((1 + math.sqrt(1 + 4 * big_g)) / 2)
        ws = [w - lr * eta / depth * sk * g / g.norm() for w, sk, g in zip(ws, s, gs, strict=True)]
    return ws


@pytest.mark.parametrize("make, shape", [(lambda: mlp(bias=False), (8,)), (conv_net, (2, 6, 6))])
def test_agd_matches_the_papers_update(make, shape):
    data = batch(shape=shape)
    model = make()
    opt = B.build_optimizer("agd", model, seed=3)
    assert isinstance(opt, B.AGD) and opt.param_groups[0]["lr"] == 1.0
    expected = agd_reference(model, data, steps=4)
    run(model, opt, 4, data)
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_agd_init_is_scaled_semi_orthogonal_and_seeded():
    model = conv_net()
    B.agd_init_(model, generator=torch.Generator().manual_seed(0))
    for p in model.parameters():
        d_out, d_in = p.shape[0], math.prod(p.shape[1:])
        sv = torch.linalg.svdvals(p.reshape(d_out, d_in))
        torch.testing.assert_close(sv, torch.full_like(sv, math.sqrt(d_out / d_in)))
    a, b, c = conv_net(), conv_net(), conv_net()
    for m, seed in ((a, 5), (b, 5), (c, 6)):
        B.build_optimizer("agd", m, seed=seed)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_agd_embedding_tables_map_rows_to_columns():
    model = P.transformer_lm(32, 8, 1, context=4, parametrization="sp", bias=False)
    layers, vectors = B.agd_layers(model)
    assert {n for n, _, emb in layers if emb} == {"tok_embed.weight", "pos_embed.weight"}
    assert vectors and all(n.startswith(("blocks.0.ln", "ln_f")) for n in vectors)
    B.agd_init_(model, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(model.tok_embed.weight.detach())  # (32, 8): maps 32 -> 8
    torch.testing.assert_close(sv, torch.full_like(sv, math.sqrt(8 / 32)))


def test_agd_lr_multiplies_the_step():
    data = batch()
    steps = []
    for lr in (1.0, 2.5):
        model = mlp(bias=False)
        opt = B.build_optimizer("agd", model, lr=lr, seed=0)
        before = snapshot(model)
        run(model, opt, 1, data)
        steps.append([p - b for p, b in zip(model.parameters(), before, strict=True)])
    for one, other in zip(*steps, strict=True):
        torch.testing.assert_close(other, 2.5 * one, rtol=1e-12, atol=1e-15)


def test_agd_leaves_vectors_untouched_and_says_so():
    model = mlp(bias=True)
    with pytest.warns(UserWarning, match=r"agd leaves 3 vector parameter\(s\) untouched.*input"):
        opt = B.build_optimizer("agd", model, seed=0)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    run(model, opt, 3, batch())
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], b) for n, b in biases.items())
    layers, vectors = opt.param_groups  # the 3 matrices are the layers; the vectors are held
    assert len(layers["params"]) == 3 and not layers["vector"]
    assert len(vectors["params"]) == 3 and vectors["vector"]


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(3, 3))  # a matrix no role rule classifies

    def forward(self, x):
        return x @ self.table


@pytest.mark.parametrize(
    "model, kwargs, words",
    [
        (nn.LayerNorm(4), {}, "no trainable weight matrix"),
        (Odd(), {}, "cannot infer the μP role of 'table'"),
        (mlp(), {"weight_decay": 0.1}, "agd has no weight decay"),
        (mlp(), {"roles": {"input.bias": "hidden"}}, "'input.bias' has role hidden"),
    ],
    ids=["no-matrix", "unclassifiable", "weight-decay", "vector-as-layer"],
)
def test_agd_refuses_what_it_cannot_train_in_one_line(model, kwargs, words):
    with pytest.raises(ValueError) as err:
        quiet_build("agd", model, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="weight matrices only"):
        B.AGD([torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))])


# -- NAG-GS -------------------------------------------------------------------------------------


def naggs_reference(
    model, data, steps: int, alpha: float, mu: float, gamma: float, weight_decay: float = 0.0
):
    """Leplat et al., Algorithm 1, literally: x_{k+1}, then γ_{k+1}, then v_{k+1} from the
    gradient at x_{k+1} (of the loss + wd/2 ||x||²); v_0 = x_0. Returns the parameters after
    ``steps`` optimizer steps (x_{steps+1}: each step ends with the next iteration's x
    half-step), v and γ."""
    xs = snapshot(model)
    vs = [x.clone() for x in xs]
    for _ in range(steps):
        xs = [(x + alpha * v) / (1 + alpha) for x, v in zip(xs, vs, strict=True)]
        gamma = (gamma + alpha * mu) / (1 + alpha)
        gs = [g + weight_decay * x for g, x in zip(grads_at(model, xs, data), xs, strict=True)]
        vs = [
            (gamma * v + alpha * mu * x - alpha * g) / (gamma + alpha * mu)
            for v, x, g in zip(vs, xs, gs, strict=True)
        ]
    xs = [(x + alpha * v) / (1 + alpha) for x, v in zip(xs, vs, strict=True)]
    return xs, vs, gamma


def test_naggs_matches_the_papers_algorithm():
    data = batch()
    model = mlp()
    alpha, mu, gamma0 = 0.3, 0.7, 1.9  # gamma_0 != mu, so the γ update matters
    opt = B.build_optimizer("naggs", model, lr=alpha, mu=mu, gamma=gamma0)
    assert isinstance(opt, B.NAGGS)
    xs, vs, gamma = naggs_reference(model, data, 5, alpha, mu, gamma0)
    run(model, opt, 5, data)
    for p, x, v in zip(model.parameters(), xs, vs, strict=True):
        torch.testing.assert_close(p, x, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["v"], v, rtol=1e-12, atol=1e-14)
        assert opt.state[p]["gamma"] == pytest.approx(gamma, rel=1e-15)
    assert gamma != pytest.approx(gamma0)


def test_naggs_lr_is_alpha_and_enters_the_first_step_in_closed_form():
    """lr is the paper's α, not a multiplier: the first step (v_0 = x_0) is
    ``-α² g / ((1 + α)(γ_1 + αμ))`` with ``γ_1 = (γ_0 + αμ)/(1 + α)``."""
    data = batch()
    mu, gamma0 = 1.0, 1.5
    for alpha in (0.1, 0.4):
        model = mlp()
        opt = B.build_optimizer("naggs", model, lr=alpha, mu=mu, gamma=gamma0)
        before = snapshot(model)
        g = grads_at(model, before, data)
        run(model, opt, 1, data)
        gamma1 = (gamma0 + alpha * mu) / (1 + alpha)
        coef = alpha**2 / ((1 + alpha) * (gamma1 + alpha * mu))
        for p, b, gk in zip(model.parameters(), before, g, strict=True):
            torch.testing.assert_close(p - b, -coef * gk, rtol=1e-10, atol=1e-15)


def test_naggs_weight_decay_is_l2_in_the_gradient():
    data = batch()
    model = mlp()
    opt = B.build_optimizer("naggs", model, lr=0.2, mu=1.0, gamma=1.0, weight_decay=0.05)
    xs, _, _ = naggs_reference(model, data, 3, 0.2, 1.0, 1.0, weight_decay=0.05)
    run(model, opt, 3, data)
    for p, x in zip(model.parameters(), xs, strict=True):
        torch.testing.assert_close(p, x, rtol=1e-12, atol=1e-14)


# -- grafting -----------------------------------------------------------------------------------


def graft_reference(model, data, steps: int, lr_m: float, lr_d: float, momentum: float = 0.9):
    """Agarwal et al. 2020, Algorithm 1, with M = Adam (torch's defaults: β = (0.9, 0.999),
    ε = 1e-8, no decay) and D = SGD with Nesterov momentum, both written out."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    ps = snapshot(model)
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    buf = [None] * len(ps)
    for t in range(1, steps + 1):
        gs = grads_at(model, ps, data)
        new = []
        for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            step_m = -lr_m * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            buf[i] = g.clone() if buf[i] is None else momentum * buf[i] + g
            step_d = -lr_d * (g + momentum * buf[i])
            new.append(p + step_m.norm() * step_d / step_d.norm())
        ps = new
    return ps


def test_graft_matches_the_papers_algorithm():
    data = batch()
    model = mlp()
    opt = B.build_optimizer("graft", model, magnitude="adamw", direction="sgd", lr=3e-3)
    assert isinstance(opt, B.Graft)
    assert opt.param_groups is opt.magnitude.param_groups and opt.param_groups[0]["lr"] == 3e-3
    assert opt.direction.param_groups[0]["lr"] == B.DEFAULT_LR["sgd"]
    expected = graft_reference(model, data, 4, lr_m=3e-3, lr_d=B.DEFAULT_LR["sgd"])
    run(model, opt, 4, data)
    for got, want in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["adamw", "mulo", "naggs"])
def test_graft_of_an_optimizer_with_itself_is_that_optimizer_exactly(name):
    data = batch()
    plain_model, graft_model = mlp(), mlp()
    plain = B.build_optimizer(name, plain_model, lr=0.05, parametrization="sp")
    graft = B.build_optimizer(
        "graft", graft_model, magnitude=name, direction=name, lr=0.05, parametrization="sp",
        direction_kwargs={"lr": 0.05},
    )  # fmt: skip
    run(plain_model, plain, 3, data)
    run(graft_model, graft, 3, data)
    for a, b in zip(plain_model.parameters(), graft_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_graft_step_has_the_magnitudes_norm_and_the_directions_direction():
    data = batch()
    model = mlp()
    opt = B.build_optimizer("graft", model, magnitude="sgd", direction="adamw", lr=0.2)
    for _ in range(3):
        model.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        proposals = {}
        for role in ("magnitude", "direction"):  # each inner optimizer alone, on a copy
            twin = copy.deepcopy({"model": model, "opt": opt})
            for q, p in zip(twin["model"].parameters(), model.parameters(), strict=True):
                q.grad = p.grad.clone()  # a deep-copied Parameter has no grad
            before = snapshot(twin["model"])
            getattr(twin["opt"], role).step()
            after = twin["model"].parameters()
            proposals[role] = [p - b for p, b in zip(after, before, strict=True)]
        before = snapshot(model)
        opt.step()
        for p, b, dm, dd in zip(model.parameters(), before, *proposals.values(), strict=True):
            step = p - b
            torch.testing.assert_close(step.norm(), dm.norm(), rtol=1e-10, atol=0)
            cosine = (step * dd).sum() / (step.norm() * dd.norm())
            assert cosine.item() == pytest.approx(1.0, abs=1e-10)


def test_graft_does_not_move_a_tensor_its_direction_leaves_alone():
    model = mlp()
    opt = quiet_build("graft", model, magnitude="adamw", direction="agd", lr=0.01)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    run(model, opt, 3, batch())
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], b) for n, b in biases.items())  # AGD proposes 0 there
    assert all(not torch.equal(named[n], w) for n, w in weights.items())


def test_graft_defaults_and_its_parts_arguments():
    opt = B.build_optimizer("graft", mlp())
    assert type(opt.magnitude).__name__ == "AdamW" and type(opt.direction).__name__ == "MuLO"
    assert opt.param_groups[0]["lr"] == B.DEFAULT_LR["graft"] == B.DEFAULT_LR["adamw"]
    opt = B.build_optimizer(
        "graft", mlp(), magnitude="sgd", direction="naggs", weight_decay=0.01, momentum=0.5,
        direction_kwargs={"lr": 0.3, "mu": 2.0},
    )  # fmt: skip
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.01
    d = opt.direction.param_groups[0]
    assert (d["lr"], d["mu"], d["weight_decay"]) == (0.3, 2.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(magnitude="graft"), "unknown graft magnitude 'graft'"),
        (dict(direction="adam"), "unknown graft direction 'adam'"),
        (dict(direction_kwargs={"lrr": 1}), "unknown argument(s) 'lrr'"),
        (dict(magnitude_kwargs=[1]), "must be a mapping"),
        (dict(lr=-1), "lr must be"),
    ],
    ids=repr,
)
def test_graft_bad_arguments_are_one_line_value_errors(kwargs, words):
    with pytest.raises(ValueError) as err:
        B.build_optimizer("graft", mlp(), **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_graft_contract():
    model = mlp()
    opt = B.build_optimizer("graft", model, magnitude="adamw", direction="sgd")
    with pytest.raises(ValueError, match="not from a Graft"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    with pytest.raises(ValueError, match="two optimizer instances"):
        B.Graft(opt.magnitude, opt.magnitude)
    run(model, opt, 1, batch())
    assert set(map(id, opt.state)) == {id(p) for p in model.parameters()}
    assert set(next(iter(opt.state.values()))) == {"magnitude", "direction"}
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[-1]["params"] == [extra] and opt.param_groups[-1]["lr"] == 0.5
    assert opt.direction.param_groups[-1]["params"] == [extra]
    assert "magnitude: AdamW" in repr(opt) and "direction: SGD" in repr(opt)


# -- all three: the torch.optim contract --------------------------------------------------------

CASES = {
    "agd": dict(),
    "naggs": dict(lr=0.2, mu=0.8, gamma=1.3),
    "graft": dict(magnitude="adamw", direction="mulo", lr=0.01),
    "graft-naggs-muon": dict(magnitude="naggs", direction="muon"),
}


def build(case: str, model):
    return quiet_build(case.split("-")[0], model, seed=0, **CASES[case])


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_continues_bitwise(case):
    """k steps, save, load into a fresh model/optimizer/schedule, k more == 2k uninterrupted."""
    k, data = 3, batch()

    def fresh(model):
        opt = build(case, model)
        return opt, B.build_schedule(opt, "cosine", steps=3 * k, warmup=1, final_lr_frac=0.1)

    ref_model = mlp()
    ref_opt, ref_sched = fresh(ref_model)
    run(ref_model, ref_opt, 2 * k, data, ref_sched)

    model = mlp()
    opt, sched = fresh(model)
    run(model, opt, k, data, sched)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = mlp(seed=9)
    opt2, sched2 = fresh(resumed)  # (AGD re-initialises: the checkpoint then overwrites it)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    run(resumed, opt2, k, data, sched2)
    for a, b in zip(ref_model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in ref_opt.param_groups]


@pytest.mark.parametrize("case", CASES)
def test_closure_copies_and_zero_grad(case):
    model = mlp()
    opt = build(case, model)
    x, y = batch()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    twin = copy.deepcopy({"model": model, "opt": opt})
    for m, o in ((model, opt), (twin["model"], twin["opt"])):
        run(m, o, 2, (x, y))
    for a, b in zip(model.parameters(), twin["model"].parameters(), strict=True):
        assert torch.equal(a, b)  # a deep copy steps exactly like the original
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_naggs_loaded_state_is_not_shared_with_its_source():
    model = mlp()
    opt = B.build_optimizer("naggs", model)
    run(model, opt, 1, batch())
    other = B.build_optimizer("naggs", model)
    other.load_state_dict(opt.state_dict())
    p = next(model.parameters())
    assert opt.state[p]["v"] is not other.state[p]["v"]
    assert torch.equal(opt.state[p]["v"], other.state[p]["v"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(name="naggs", mu=0), dict(name="naggs", gamma=-1.0), dict(name="naggs", lr=float("nan")),
     dict(name="agd", seed=-1), dict(name="agd", lr=0)],
    ids=repr,
)  # fmt: skip
def test_bad_arguments_are_one_line_value_errors(kwargs):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError) as err:
        quiet_build(kwargs.pop("name"), mlp(), **kwargs)
    assert "\n" not in str(err.value) and str(err.value)


# -- the experiments ----------------------------------------------------------------------------


def test_graft_under_auto_builds_the_magnitudes_parametrization():
    from experiments.evaluate import natural_parametrization as natural

    assert natural({"name": "graft", "magnitude": "mulo", "parametrization": None}) == "mup"
    assert natural({"name": "graft", "magnitude": "adamw", "parametrization": None}) == "sp"
    assert natural({"name": "graft", "magnitude": "muadam", "parametrization": "sp"}) == "sp"
    assert natural({"name": "agd", "parametrization": "sp"}) == "sp"


def test_transfer_study_hashes_the_meta_weights_of_a_grafts_learned_parts():
    from experiments.transfer_study import meta_weights_digest as digest

    lo = digest({"name": "mulo"})
    assert digest({"name": "graft", "magnitude": "adamw", "direction": "mulo"}) == f"direction={lo}"
    assert digest({"name": "graft", "magnitude": "splo", "direction": "sgd"}).startswith("magn")
    assert digest({"name": "graft", "magnitude": "adamw", "direction": "naggs"}) is None


# -- from the command line ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_fashion(tmp_path_factory.mktemp("fashion"))


def test_total_steps_auto_reaches_a_grafts_learned_parts(data_dir):
    from experiments.evaluate import build_run

    cfg = {"name": "graft", "magnitude": "mulo", "direction": "splo", "total_steps": "auto",
           "direction_kwargs": {"total_steps": "auto"}}  # fmt: skip
    before = copy.deepcopy(cfg)
    task = {"name": "mlp", "width": 8, "depth": 2, "data_root": str(data_dir), "eval_size": 16}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, opt, _ = build_run(task, cfg, parametrization="mup", steps=7, batch_size=4, seed=0,
                              device="cpu")  # fmt: skip
    assert opt.magnitude.total_steps == opt.direction.total_steps == 7
    assert cfg == before  # a study reuses its config for every cell


def cli(*args):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, parametrization",
    [
        (["optimizer=agd"], "sp"),
        (["optimizer=naggs", "optimizer.mu=0.5"], "sp"),
        (["optimizer=graft", "optimizer.magnitude=adamw", "optimizer.direction=mulo"], "sp"),
        (["optimizer=graft", "optimizer.magnitude=mulo", "optimizer.direction=naggs",
          "+optimizer.direction_kwargs.lr=0.3"], "mup"),
    ],
    ids=["agd", "naggs", "graft-adamw-mulo", "graft-mulo-naggs"],
)  # fmt: skip
def test_cli_smoke_run(data_dir, tmp_path, overrides, parametrization):
    out = cli(
        *overrides, "task.width=16", "steps=3", "batch_size=16", "progress=false",
        "task.eval_size=128", f"out_dir={tmp_path}", f"task.data_root={data_dir}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (tmp_path / "evaluate").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer"] == overrides[0].split("=")[1]
    assert summary["parametrization"] == parametrization  # graft: the magnitude's
    assert summary["steps_done"] == 3 and math.isfinite(summary["final_train_loss"])


def test_graft_add_param_group_reaches_a_combined_magnitude():
    torch.manual_seed(0)
    model = P.mlp(10, 8, 2, 3, parametrization="sp")
    opt = B.build_optimizer("graft", model, magnitude="muon", direction="adamw",
                            parametrization="sp")  # fmt: skip
    extra = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="index="):
        opt.add_param_group({"params": [extra]})  # muon is Muon + AdamW: which one?
    opt.add_param_group({"params": [extra]}, index=0)
    assert any(extra is p for g in opt.magnitude.optimizers[0].param_groups for p in g["params"])
    for p in [*model.parameters(), extra]:
        p.grad = torch.randn_like(p)
    before = extra.detach().clone()
    opt.step()
    assert not torch.equal(before, extra)
