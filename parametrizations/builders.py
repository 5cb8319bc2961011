"""Model families buildable at any width/depth under any parametrization.

Every builder constructs its modules with a `Readout` as the output layer and then hands the model
to the parametrization's `init_` exactly once (re-running `torch.nn.init` afterwards would undo μP).
Register new families in `BUILDERS` so configs can name them.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Parametrization
from .readout import Readout
from .schemes import MuP, get


def check_positive(**sizes: int) -> None:
    """One-line ValueError for any size that is not a positive integer."""
    for key, value in sizes.items():
        try:
            ok = operator.index(value) > 0
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def finish(
    model: nn.Module, parametrization: str | Parametrization, bias_std: float | None
) -> nn.Module:
    """Apply the parametrization's init; biases default to N(0, 1) under μP (μLO tasks), else 0."""
    param = get(parametrization)
    if bias_std is None:
        bias_std = 1.0 if isinstance(param, MuP) else 0.0
    return param.init_(model, bias_std=bias_std)


def mlp(
    in_features: int,
    width: int,
    depth: int,
    out_features: int,
    parametrization: str | Parametrization = "mup",
    bias: bool = True,
    output_mult: float = 1.0,
    bias_std: float | None = None,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """MLP with `depth` hidden layers: input Linear, depth-1 hidden Linears, Readout.

    Modules are named ``input, act1, hidden1, act2, ..., readout``: parameter names say the role.
    """
    check_positive(in_features=in_features, width=width, depth=depth, out_features=out_features)
    layers: list[tuple[str, nn.Module]] = [("input", nn.Linear(in_features, width, bias=bias))]
    layers.append(("act1", activation()))
    for i in range(1, depth):
        layers.append((f"hidden{i}", nn.Linear(width, width, bias=bias)))
        layers.append((f"act{i + 1}", activation()))
    layers.append(("readout", Readout(width, out_features, bias=bias, output_mult=output_mult)))
    return finish(nn.Sequential(OrderedDict(layers)), parametrization, bias_std)


def cnn(
    in_channels: int,
    width: int,
    depth: int,
    num_classes: int,
    image_size: int,
    parametrization: str | Parametrization = "mup",
    kernel_size: int = 3,
    bias: bool = True,
    output_mult: float = 1.0,
    bias_std: float = 0.0,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Conv classifier whose width is the channel count: `depth` convs, global mean, Readout.

    ``input`` (in_channels -> width, stride 1) is input-like; ``conv1 .. conv{depth-1}`` (width ->
    width, fan_in = width * k * k) are hidden. An inner conv has stride 2 while the feature map is
    larger than 8x8 (28 -> 14 -> 7, 32 -> 16 -> 8, 14 -> 7), so depth sets the downsampling only
    up to that point. Then ``pool`` (global average) and ``readout``. Biases start at zero
    (`bias_std`) under both parametrizations.
    """
    check_positive(
        in_channels=in_channels,
        width=width,
        depth=depth,
        num_classes=num_classes,
        image_size=image_size,
        kernel_size=kernel_size,
    )
    pad = kernel_size // 2
    layers: list[tuple[str, nn.Module]] = [
        ("input", nn.Conv2d(in_channels, width, kernel_size, padding=pad, bias=bias)),
        ("act1", activation()),
    ]
    size = image_size
    for i in range(1, depth):
        stride = 2 if size > 8 else 1
        size = (size + 2 * pad - kernel_size) // stride + 1
        conv = nn.Conv2d(width, width, kernel_size, stride=stride, padding=pad, bias=bias)
        layers += [(f"conv{i}", conv), (f"act{i + 1}", activation())]
    layers += [
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("readout", Readout(width, num_classes, bias=bias, output_mult=output_mult)),
    ]
    return finish(nn.Sequential(OrderedDict(layers)), parametrization, bias_std)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with q/k/v/out as separate `nn.Linear`s (hidden roles).

    `scale` multiplies the logits q·k; it is a plain float fixed at construction (1/d_head under
    μP, 1/sqrt(d_head) under SP) so it survives copies and `functional_call`.
    """

    def __init__(self, width: int, num_heads: int, scale: float, bias: bool = True):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.scale = num_heads, width // num_heads, float(scale)
        self.q = nn.Linear(width, width, bias=bias)
        self.k = nn.Linear(width, width, bias=bias)
        self.v = nn.Linear(width, width, bias=bias)
        self.out = nn.Linear(width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape

        def heads(t: Tensor) -> Tensor:  # [B, L, D] -> [B, H, L, d_head]
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True, scale=self.scale
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:g}"


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(
        self, width: int, num_heads: int, scale: float, mlp_ratio: int = 4, bias: bool = True
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, num_heads, scale, bias=bias)
        self.ln2 = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, mlp_ratio * width, bias=bias)
        self.act = nn.GELU()
        self.mlp_out = nn.Linear(mlp_ratio * width, width, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_out(self.act(self.mlp_in(self.ln2(x))))


class TransformerLM(nn.Module):
    """Decoder-only LM: token + learned position embeddings, pre-LN blocks, final LN, Readout.

    ``forward(tokens [B, L] int64) -> logits [B, L, vocab_size]``, with L <= context.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        depth: int,
        num_heads: int,
        context: int,
        scale: float,
        mlp_ratio: int = 4,
        bias: bool = True,
        output_mult: float = 1.0,
    ):
        super().__init__()
        self.context = context
        self.tok_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, scale, mlp_ratio, bias) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(width)
        self.readout = Readout(width, vocab_size, bias=bias, output_mult=output_mult)

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[-1]
        if n > self.context:
            raise ValueError(f"sequence length {n} exceeds the model's context {self.context}")
        pos = torch.arange(n, device=tokens.device)
        h = self.tok_embed(tokens) + self.pos_embed(pos)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.ln_f(h))


def _heads(width: int, num_heads: int | None, head_dim: int | None) -> int:
    """Number of heads from `num_heads` and/or `head_dim` (default: 4, 2 or 1 dividing width)."""
    if num_heads is None and head_dim is None:
        return next(h for h in (4, 2, 1) if width % h == 0)
    given = {k: v for k, v in (("num_heads", num_heads), ("head_dim", head_dim)) if v is not None}
    check_positive(**given)
    heads = num_heads if num_heads is not None else width // head_dim
    dim = head_dim if head_dim is not None else width // heads
    if heads * dim != width:
        raise ValueError(
            f"width {width} must equal num_heads * head_dim, got num_heads={num_heads}, "
            f"head_dim={head_dim}"
        )
    return heads


def transformer_lm(
    vocab_size: int = 256,
    width: int = 128,
    depth: int = 2,
    num_heads: int | None = None,
    head_dim: int | None = None,
    context: int = 64,
    parametrization: str | Parametrization = "mup",
    mlp_ratio: int = 4,
    bias: bool = True,
    output_mult: float = 1.0,
    attn_mult: float = 1.0,
    zero_query: bool | None = None,
    bias_std: float = 0.0,
) -> TransformerLM:
    """Pre-LN decoder-only transformer LM of model width `width` (d_model) and `depth` blocks.

    Heads: give `num_heads` or `head_dim` (or both, with product `width`); by default 4 heads
    when 4 divides `width` (else 2, else 1), so d_head grows with width. Attention logits are
    scaled by ``attn_mult * parametrization.attention_scale(d_head)`` (μP: 1/d_head, SP:
    1/sqrt(d_head)). Roles (docs/math.md §2): both embeddings input-like, q/k/v/out and the MLP
    matrices hidden (so ``mlp_out`` gets s_W = 1/(mlp_ratio * width)), LayerNorms and biases
    vector-like, ``readout`` output. `zero_query` (default: True under μP, False under SP)
    zero-initialises the query projection. Biases start at zero (`bias_std`).
    """
    check_positive(
        vocab_size=vocab_size, width=width, depth=depth, context=context, mlp_ratio=mlp_ratio
    )
    heads = _heads(width, num_heads, head_dim)
    param = get(parametrization)
    scale = float(attn_mult) * param.attention_scale(width // heads)
    model = TransformerLM(
        vocab_size, width, depth, heads, context, scale, mlp_ratio, bias, output_mult
    )
    finish(model, param, bias_std)
    if zero_query is None:
        zero_query = isinstance(param, MuP)
    if zero_query:
        with torch.no_grad():
            for block in model.blocks:
                block.attn.q.weight.zero_()
                if block.attn.q.bias is not None:
                    block.attn.q.bias.zero_()
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer_lm": transformer_lm,
}


def build(family: str, **kwargs) -> nn.Module:
    """Build a registered model family by name, e.g. ``build("mlp", in_features=..., ...)``."""
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(BUILDERS)}")
    return BUILDERS[family](**kwargs)
