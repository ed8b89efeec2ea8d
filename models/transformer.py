"""The context network: convolutional relative positions, then Transformer layers.

Post-LN (BASE, ``layer_norm_first=False``): the LayerNorm follows the positional
embedding and every residual sum. Pre-LN (LARGE, ``layer_norm_first=True``): each
sub-block normalises its input and one LayerNorm closes the stack. Attention goes
through ``scaled_dot_product_attention`` with a key padding mask.

WavLM's gated relative position bias (``relative_bias="gated"``, FAMILY.md section 2):
the stack keeps one learned bias per head and distance bucket (T5's bidirectional log
buckets); every layer adds it to its attention scores after scaling it, per head and
query frame, by a gate computed from the layer's own input (``RelativePositionGate``).
The conv positional embedding stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def kept_layers(
    num_layers: int, layerdrop: float, *, training: bool, generator: torch.Generator | None
) -> list[bool]:
    """Which of ``num_layers`` layers run this step; LayerDrop only in training.

    The draws come from ``generator`` (a CPU generator: reading the decision must not
    wait on an accelerator). Seeding it from (seed, step) only makes every rank drop
    the same layers, which ZeRO-3 requires. Every context network (Transformer,
    Conformer) draws here, so one seed drops the same layers whatever the layer type.
    """
    if not training or layerdrop <= 0.0:
        return [True] * num_layers
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"layerdrop_generator: expected a CPU torch.Generator, got one on {generator.device}")
    draws = torch.rand(num_layers, generator=generator)
    return (draws >= layerdrop).tolist()


def init_linear_bert_(module: nn.Module) -> None:
    """BERT-style init of every Linear in ``module``: N(0, 0.02) weights, zero biases.

    fairseq applies ``init_bert_params`` to its Transformer and Conformer layers alike.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def sinusoid_positions(time: int, dim: int, like: Tensor) -> Tensor:
    """(T, D) fixed absolute positions, ``sin`` on even and ``cos`` on odd channels of
    ``pos / 10000 ** (2 * (i // 2) / D)`` (Mockingjay's table), in ``like``'s dtype and device."""
    pos = torch.arange(time, device=like.device, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    i = torch.arange(dim, device=like.device)
    angles = pos / torch.pow(10000.0, (2 * (i // 2)).float() / dim)  # (T, D)
    return torch.where(i % 2 == 0, angles.sin(), angles.cos()).to(like.dtype)


class PositionalConvEmbedding(nn.Module):
    """Grouped Conv1d over time with weight norm over the kernel dim, then GELU.

    The weight is ``weight_g * weight_v / ||weight_v||``, the norm taken over the output
    and input channels for each kernel tap (``weight_norm(dim=2)``). The two factors are
    parameters of this module itself (not a parametrization submodule) so that ZeRO-3
    gathers them when this module runs. An even kernel yields one frame too many; the
    last is trimmed (fairseq ``SamePad``).
    """

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.kernel = kernel
        self.groups = groups
        std = math.sqrt(4.0 / (kernel * dim))
        v = torch.empty(dim, dim // groups, kernel).normal_(0.0, std)
        self.weight_v = nn.Parameter(v)  # (D, D/G, K)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))  # (1, 1, K)
        self.bias = nn.Parameter(torch.zeros(dim))

    def weight(self) -> Tensor:
        # g * v / ||v||, norm over all dims but 2; torch's fused kernel (what
        # ``nn.utils.weight_norm`` runs) is several times faster than the composed ops.
        return torch._weight_norm(self.weight_v, self.weight_g, 2)  # (D, D/G, K)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv1d(x.transpose(1, 2), self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]
        return F.gelu(y).transpose(1, 2)  # (B, T, D)


def relative_position_buckets(time: int, num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """(T, T) long: the bucket of each (query i, key j) pair, T5's bidirectional log buckets
    as WavLM's: half the buckets per direction (key after the query: the upper half), the
    first half of those one per distance, the rest log-spaced up to ``max_distance``."""
    half = num_buckets // 2
    exact = half // 2
    rel = torch.arange(time, device=device)[None, :] - torch.arange(time, device=device)[:, None]  # (T, T): j - i
    buckets = (rel > 0).long() * half
    dist = rel.abs()
    far = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far = torch.clamp(far, max=half - 1)
    return buckets + torch.where(dist < exact, dist, far)


class RelativePositionGate(nn.Module):
    """WavLM's gate of the relative position bias, per head and query frame: the layer's input
    split into heads, ``Linear(head_dim -> 8)``, summed in two groups of 4, sigmoids g_a and
    g_b, then ``g_a * (g_b * a_h - 1) + 2`` with a learned ``a_h`` per head (initially 1)."""

    def __init__(self, head_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.linear = nn.Linear(head_dim, 8)
        self.const = nn.Parameter(torch.ones(1, num_heads, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) attention input -> (B, H, T, 1) gate."""
        batch, time, dim = x.shape
        heads = x.view(batch, time, self.num_heads, dim // self.num_heads).transpose(1, 2)  # (B, H, T, Dh)
        proj = self.linear(heads).view(batch, self.num_heads, time, 2, 4).sum(dim=-1)  # (B, H, T, 2)
        gate_a, gate_b = torch.sigmoid(proj).chunk(2, dim=-1)  # each (B, H, T, 1)
        return gate_a * (gate_b * self.const - 1.0) + 2.0


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection; with ``gated``, WavLM's gate
    of a relative position bias the stack hands every layer."""

    def __init__(self, dim: int, num_heads: int, dropout: float, *, gated: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        if gated:
            self.gate = RelativePositionGate(self.head_dim, num_heads)

    def forward(self, x: Tensor, attn_mask: Tensor | None, position_bias: Tensor | None = None) -> Tensor:
        """``attn_mask`` (B, 1, 1, T) bool, True = attend; ``position_bias`` (1, H, T, T) float
        (gated layers only)."""
        batch, time, dim = x.shape
        qkv = self.qkv(x).view(batch, time, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        if position_bias is not None:
            bias = self.gate(x) * position_bias  # (B, H, T, T)
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            attn_mask = bias.to(q.dtype)  # a float mask must match the query's dtype (bf16 under autocast)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, dim))


class FeedForward(nn.Module):
    """Linear -> activation -> dropout (activation_dropout) -> Linear.

    GELU in the Transformer; the Conformer passes SiLU (swish), as fairseq's does.
    """

    def __init__(
        self, dim: int, ffn_dim: int, activation_dropout: float, activation: Callable[[Tensor], Tensor] = F.gelu
    ):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(activation_dropout)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class TransformerLayer(nn.Module):
    """One block; ``layer_norm_first`` selects pre-LN, else post-LN."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layer_norm_first: bool,
        gated: bool = False,
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention = SelfAttention(dim, num_heads, attention_dropout, gated=gated)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, activation_dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None, position_bias: Tensor | None = None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.attn_norm(x), attn_mask, position_bias))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attention(x, attn_mask, position_bias)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class TransformerEncoder(nn.Module):
    """Positional conv (or fixed sinusoids) + LayerNorm placement + layers with LayerDrop. (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        *,
        dim: int,
        ffn_dim: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layerdrop: float,
        layer_norm_first: bool,
        pos_conv_kernel: int,
        pos_conv_groups: int,
        relative_bias: str = "none",
        relative_buckets: int = 320,
        relative_max_distance: int = 800,
        absolute_positions: bool = False,
    ):
        super().__init__()
        if relative_bias not in ("none", "gated"):
            raise ValueError(f"relative_bias: expected 'none' or 'gated', got {relative_bias!r}")
        gated = relative_bias == "gated"
        self.out_dim = dim
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop
        self.checkpoint_activations = False
        """Recompute each layer in the backward instead of keeping its activations
        (``train.activation_checkpointing``): memory for compute."""
        self.absolute_positions = absolute_positions
        # Mockingjay/TERA add fixed sinusoids instead: no positional parameters at all.
        self.pos_conv = None if absolute_positions else PositionalConvEmbedding(dim, pos_conv_kernel, pos_conv_groups)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim, ffn_dim, num_heads, dropout=dropout, attention_dropout=attention_dropout,
                activation_dropout=activation_dropout, layer_norm_first=layer_norm_first, gated=gated,
            )
            for _ in range(num_layers)
        )
        init_linear_bert_(self.layers)
        self.relative_buckets = relative_buckets
        self.relative_max_distance = relative_max_distance
        if gated:
            # The stack's one bias table (Hugging Face keeps it in layer 0): it is computed
            # here, so a LayerDrop of the first layer still leaves the others their bias.
            self.relative_embedding = nn.Embedding(relative_buckets, num_heads)

    def position_bias(self, time: int, device: torch.device) -> Tensor | None:
        """(1, H, T, T) the ungated relative position bias; None without one."""
        table = getattr(self, "relative_embedding", None)
        if table is None:
            return None
        buckets = relative_position_buckets(time, self.relative_buckets, self.relative_max_distance, device)
        return table(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)

    def kept_layers(self, generator: torch.Generator | None) -> list[bool]:
        """Which layers run this step (:func:`kept_layers`)."""
        return kept_layers(len(self.layers), self.layerdrop, training=self.training, generator=generator)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        layerdrop_generator: torch.Generator | None = None,
    ) -> Tensor:
        attn_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            attn_mask = (~padding_mask).view(x.shape[0], 1, 1, x.shape[1])  # (B, 1, 1, T): True = attend
        x = x + (sinusoid_positions(x.shape[1], x.shape[2], x) if self.pos_conv is None else self.pos_conv(x))
        if not self.layer_norm_first:
            x = self.norm(x)
        x = self.dropout(x)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        bias = self.position_bias(x.shape[1], x.device)
        extra = () if bias is None else (bias,)
        for layer, keep in zip(self.layers, self.kept_layers(layerdrop_generator), strict=True):
            if keep and recompute:
                # Non-reentrant: the RNG is restored for the recomputation, so dropout matches.
                x = checkpoint(layer, x, attn_mask, *extra, use_reentrant=False)
            elif keep:
                x = layer(x, attn_mask, *extra)
        if self.layer_norm_first:
            x = self.norm(x)
        return x
