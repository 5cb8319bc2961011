"""Tied embedding/readout matrices (GPT-2 / nanoGPT style): one documented rule, the alias name
accepted in roles=, a warning where the init would otherwise blow the logits up."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mulo
import parametrizations as P
from mulo import functional as LF

VOCAB, WIDTH = 64, 32


class TinyLM(nn.Module):
    def __init__(self, readout: str = "linear"):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wte.weight.data.normal_(0, 0.02)  # nanoGPT's own init
        self.hidden = nn.Linear(WIDTH, WIDTH)
        if readout == "linear":
            self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        else:
            self.lm_head = P.Readout(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx):
        return self.lm_head(torch.relu(self.hidden(self.wte(idx))))


def loss_of(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (8, 16), generator=g)
    return F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


def test_tied_matrix_is_input_like_and_listed_once():
    roles = P.infer_roles(TinyLM())
    assert roles == {
        "wte.weight": P.Role.INPUT,
        "hidden.weight": P.Role.HIDDEN,
        "hidden.bias": P.Role.VECTOR,
    }
    assert P.roles.aliases(TinyLM()) == {"lm_head.weight": "wte.weight"}


def test_alias_name_is_accepted_in_roles_and_conflicts_are_one_line():
    model = TinyLM()
    assert P.infer_roles(model, {"lm_head.weight": "input"})["wte.weight"] is P.Role.INPUT
    with pytest.raises(P.ParametrizationError) as e:
        P.infer_roles(model, {"lm_head.weight": "output", "wte.weight": "input"})
    assert "\n" not in str(e.value) and "tied" in str(e.value)
    opt = mulo.MuLO(model, roles={"lm_head.weight": "readout"}, meta_weights="meta-init")
    assert opt.state[model.wte.weight]["scale"] == 1.0


def test_init_keeps_a_tied_matrix_without_output_multiplier_and_warns():
    """The reported case: init_ re-initialised the tied matrix as an embedding (std 1) with
    no 1/width on the logits, and a nanoGPT model's initial loss went from 4.2 to 58."""
    model = TinyLM()
    before = model.wte.weight.detach().clone()
    with pytest.warns(UserWarning, match="tied to the readout 'lm_head.weight'"):
        P.get("mup").init_(model)
    assert torch.equal(model.wte.weight, before)
    assert loss_of(model).item() < 1.5 * math.log(VOCAB)


def test_init_of_a_tied_readout_with_multiplier_follows_mup():
    model = TinyLM(readout="readout")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.get("mup").init_(model)
    assert 0.8 < model.wte.weight.std().item() < 1.2  # an embedding: std 1
    assert model.lm_head.multiplier == 1.0 / WIDTH
    assert loss_of(model).item() < 1.5 * math.log(VOCAB)


def test_mulo_steps_the_tied_matrix_once_with_scale_one():
    model = TinyLM()
    meta = LF.init_meta_params(generator=torch.Generator().manual_seed(1))
    opt = mulo.MuLO(model, meta_weights=meta)
    assert len([p for g in opt.param_groups for p in g["params"]]) == 3
    loss_of(model).backward()
    opt.step()
    assert opt.state[model.wte.weight]["step"].item() == 1.0
