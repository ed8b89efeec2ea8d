"""The context network: convolutional relative positions, then Transformer layers.

Post-LN (BASE, ``layer_norm_first=False``): the LayerNorm follows the positional
embedding and every residual sum. Pre-LN (LARGE, ``layer_norm_first=True``): each
sub-block normalises its input and one LayerNorm closes the stack. Attention goes
through ``scaled_dot_product_attention`` with a key padding mask.
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


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        batch, time, dim = x.shape
        qkv = self.qkv(x).view(batch, time, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
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
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention = SelfAttention(dim, num_heads, attention_dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, activation_dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.attn_norm(x), attn_mask))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attention(x, attn_mask)))
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
        absolute_positions: bool = False,
    ):
        super().__init__()
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
                activation_dropout=activation_dropout, layer_norm_first=layer_norm_first,
            )
            for _ in range(num_layers)
        )
        init_linear_bert_(self.layers)

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
        for layer, keep in zip(self.layers, self.kept_layers(layerdrop_generator), strict=True):
            if keep and recompute:
                # Non-reentrant: the RNG is restored for the recomputation, so dropout matches.
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            elif keep:
                x = layer(x, attn_mask)
        if self.layer_norm_first:
            x = self.norm(x)
        return x
