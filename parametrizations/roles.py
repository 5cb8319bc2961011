"""Which μP role each parameter plays: input, hidden, output or vector-like (docs/math.md §2).

Roles are a property of the model, not of the parametrization: μP and SP read the same table and
differ only in what they do with it. A role comes from, in order of precedence:

1. an explicit per-name override;
2. what the module type makes certain (1-D/0-D tensors, readouts, embeddings, attention biases);
3. `p.infshape` from `mup.set_base_shapes` (which dims scale with width);
4. inference from the module graph: the first data-consuming layer is input-like, the last
   ``nn.Linear`` is the readout, other weights of known layer types are hidden.

A ≥2-D parameter that none of these settles is an error naming it, never a guess.

Tied (shared) parameters are listed once, under their first name; every other name (e.g.
``lm_head.weight`` tied to ``wte.weight``) is an alias that ``roles=`` accepts. One rule for a
matrix shared by an embedding and the readout, μP's rule for tied embeddings (as mup's
``MuSharedReadout``): it is input-like (embedding init, s_W = 1), and the readout's forward
must apply the output multiplier; :func:`tied_readouts` tells which readouts do not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum

import torch
from mup.layer import MuReadout
from torch import nn


class Role(str, Enum):
    INPUT = "input"
    HIDDEN = "hidden"
    OUTPUT = "output"
    VECTOR = "vector"

    def __str__(self) -> str:
        return self.value


class ParametrizationError(ValueError):
    """A model or argument the μP layer cannot handle; the message is one line that says the fix."""


_VALID_ROLES = ", ".join(r.value for r in Role) + " (readout = output)"

_CONVS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
# Layer types whose `weight` is a matrix we know how to classify.
WEIGHTED = (nn.Linear, nn.Bilinear, *_CONVS)
# Layer types whose matrices the rules understand; they consume the data stream, and the first one
# registered is input-like.
KNOWN_LAYERS = (*WEIGHTED, *EMBEDDINGS, nn.MultiheadAttention)
_MHA_MATRICES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def fan_in(param: torch.Tensor) -> int:
    """Absolute fan-in (base width 1): product of all dims but the first, as PyTorch's init does."""
    return math.prod(param.shape[1:]) if param.dim() >= 2 else 1


def is_readout(module: nn.Module) -> bool:
    """`P.Readout` and mup's `MuReadout` (its base class) always mark the output layer."""
    return isinstance(module, MuReadout)


_ALIASES = {"readout": Role.OUTPUT}  # the word the README and the μP papers use


def as_role(value: Role | str, name: str = "") -> Role:
    """A role from its name (``"readout"`` is an alias of ``"output"``)."""
    try:
        key = value.lower() if isinstance(value, str) else value
        return _ALIASES.get(key) or Role(key)
    except ValueError:
        where = f" for '{name}'" if name else ""
        raise ParametrizationError(
            f"unknown role {value!r}{where}; valid roles: {_VALID_ROLES}"
        ) from None


def owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Map each `model.named_parameters()` name to (owning module, attribute name)."""
    out = {}
    for name, _ in model.named_parameters():
        mod_name, _, attr = name.rpartition(".")
        out[name] = (model.get_submodule(mod_name), attr)
    return out


def aliases(model: nn.Module) -> dict[str, str]:
    """Every other name of a shared (tied) parameter -> its name in ``model.named_parameters()``."""
    first: dict[int, str] = {}
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


def tied_readouts(model: nn.Module) -> dict[str, str]:
    """{parameter name: readout alias} for matrices shared with the output layer when that
    layer is a plain ``nn.Linear``: it applies no μP output multiplier (a ``Readout`` does)."""
    _, outputs = _graph_facts(model)
    out = {}
    for alias, name in aliases(model).items():
        module = model.get_submodule(alias.rpartition(".")[0])
        if id(module) in outputs and not is_readout(module):
            out[name] = alias
    return out


def check_overrides(model: nn.Module, overrides: Mapping[str, Role | str] | None) -> dict:
    """Validate override names against the model's parameters (aliases of tied parameters
    count as their parameter) and normalise values to `Role`."""
    if not overrides:
        return {}
    names = {n for n, _ in model.named_parameters()}
    tied = aliases(model)
    canonical: dict[str, Role | str] = {}
    for key, value in overrides.items():
        name = tied.get(key, key)
        if name in canonical and as_role(canonical[name], name) != as_role(value, key):
            raise ParametrizationError(
                f"'{key}' is tied to '{name}' (one tensor): give it one role, not two"
            )
        canonical[name] = value
    overrides = canonical
    unknown = [k for k in overrides if k not in names]
    if unknown:
        shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
        raise ParametrizationError(
            f"override names {unknown} are not parameters of {type(model).__name__}; "
            f"use names from model.named_parameters() (e.g. {shown})"
        )
    return {k: as_role(v, k) for k, v in overrides.items()}


def _graph_facts(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of the input-like and output modules found by walking registration order."""
    mha = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]

    def in_attention(name: str) -> bool:  # an MHA's out_proj is a Linear but always hidden
        return any(name.startswith(a + ".") if a else name != "" for a in mha)

    consumers = [
        m for n, m in model.named_modules() if isinstance(m, KNOWN_LAYERS) and not in_attention(n)
    ]
    readouts = [m for _, m in model.named_modules() if is_readout(m)]
    linears = [m for m in consumers if isinstance(m, nn.Linear)]
    outputs = {id(m) for m in (readouts or linears[-1:])}
    inputs = {id(m) for m in consumers if isinstance(m, EMBEDDINGS)}
    if consumers and not isinstance(consumers[0], EMBEDDINGS):
        inputs.add(id(consumers[0]))
    return inputs - outputs, outputs


def _from_infshape(param: torch.Tensor) -> Role | None:
    ninf = param.infshape.ninf()
    if ninf == 0:
        return None
    if ninf >= 2:
        return Role.HIDDEN
    return Role.OUTPUT if param.infshape[1].isinf() else Role.INPUT


def infer_roles(
    model: nn.Module, overrides: Mapping[str, Role | str] | None = None, strict: bool = True
) -> dict[str, Role]:
    """Role of every parameter, keyed like `model.named_parameters()`; see the module docstring.

    With ``strict=False`` unclassifiable parameters are left out instead of raising (for SP, which
    treats every tensor alike and so must not reject a model μP cannot classify).
    """
    overrides = check_overrides(model, overrides)
    inputs, outputs = _graph_facts(model)
    roles: dict[str, Role] = {}
    unknown: list[str] = []
    owned = owners(model)
    for name, (module, attr) in owned.items():
        param = getattr(module, attr)
        if name in overrides:
            roles[name] = overrides[name]
        elif param.dim() < 2 or (
            isinstance(module, nn.MultiheadAttention) and attr in ("bias_k", "bias_v")
        ):
            roles[name] = Role.VECTOR
        elif is_readout(module) and attr == "weight":
            roles[name] = Role.OUTPUT
        elif isinstance(module, EMBEDDINGS) and attr == "weight":
            roles[name] = Role.INPUT
        elif hasattr(param, "infshape") and (role := _from_infshape(param)) is not None:
            roles[name] = role
        elif (isinstance(module, WEIGHTED) and attr == "weight") or (
            isinstance(module, nn.MultiheadAttention) and attr in _MHA_MATRICES
        ):
            if id(module) in outputs:
                roles[name] = Role.OUTPUT
            elif id(module) in inputs:
                roles[name] = Role.INPUT
            else:
                roles[name] = Role.HIDDEN
        else:
            unknown.append(name)
    for alias, name in aliases(model).items():  # the tied-readout rule (module docstring)
        module = model.get_submodule(alias.rpartition(".")[0])
        shared_with_readout = id(module) in outputs or is_readout(module)
        if shared_with_readout and name not in overrides and roles.get(name) is not Role.INPUT:
            roles[name] = Role.OUTPUT
            unknown = [n for n in unknown if n != name]
    if unknown and strict:
        what = ", ".join(
            f"'{n}' (shape {tuple(getattr(owned[n][0], owned[n][1]).shape)}"
            f" on {type(owned[n][0]).__name__})"
            for n in unknown
        )
        example = ", ".join(f"'{n}': 'input'" for n in unknown)
        raise ParametrizationError(
            f"cannot infer the μP role of {what}; pass overrides={{{example}}} "
            f"(roles: {_VALID_ROLES}) or call mup.set_base_shapes(model, base) first"
        )
    return roles
