"""The Conformer context network (wav2vec 2.0-Conformer, w2v-BERT, BEST-RQ).

A drop-in alternative to ``TransformerEncoder``: same call, same LayerDrop, same
``layers`` and ``layer_norm_first`` for the probe. Each block is Hugging Face's
``Wav2Vec2ConformerEncoderLayer`` (fairseq ``conformer_layer.py``, ESPnet attention)::

    x = x + 0.5 * FFN1(LN(x))                        macaron half step, SiLU
    x = x + Dropout(MHSA(LN(x), positions))          relative (Transformer-XL) or rotary
    x = x + Conv(x)                                  LN, pointwise + GLU, depthwise, BatchNorm, SiLU, pointwise
    x = x + 0.5 * FFN2(LN(x))
    x = LN(x)

The stack zeroes padded frames, applies its LayerNorm before the first block
(``layer_norm_first=False``, fairseq's BASE layout) or after the last (True: fairseq's
LARGE and Hugging Face's only layout), and has no conv positional embedding: positions
enter every attention instead.

Dropouts follow Hugging Face: ``dropout`` on the stack input, on each FFN output and on
the convolution module's output; ``activation_dropout`` inside the FFNs;
``attention_dropout`` on the attention weights and on the attention output. (fairseq
uses one rate for all of them.)

Padded frames never reach valid ones: attention masks them as keys, the convolution
module zeroes them before its depthwise convolution (as ESPnet's ``mask_pad`` and
Hugging Face's Wav2Vec2-BERT do), and its BatchNorm takes training statistics over valid
frames only. Hugging Face's Wav2Vec2-Conformer does neither in its convolution module:
there the padding leaks into the valid frames next to it, and from the second layer on
through attention into all of them, so on a padded batch every valid frame of a padded
utterance differs from ours; utterance by utterance the two agree
(tests/models/test_hf_conformer.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.transformer import FeedForward, init_linear_bert_, kept_layers

ROTARY_BASE = 10000.0


def relative_sinusoids(time: int, dim: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2T - 1, D): sinusoids of the relative positions T-1, ..., 1, 0, -1, ..., -(T-1).

    Row ``p`` encodes the distance ``i - j = T - 1 - p`` of query ``i`` to key ``j``
    (positive: the key is to the left), channels interleaved ``sin, cos`` as in ESPnet's
    ``RelPositionalEncoding``; computed in float32 for every length, so no table caps T.
    """
    distance = torch.arange(time - 1, -time, -1, device=device, dtype=torch.float32)  # (2T-1,)
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / dim)
    )  # (D/2,)
    angles = distance[:, None] * inv_freq  # (2T-1, D/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).view(2 * time - 1, dim).to(dtype)  # (2T-1, D)


def rotary_inv_freq(head_dim: int, *, device: torch.device | None = None) -> Tensor:
    """(Dh/2,) float32: the rotary frequencies ``1 / base**(2i / Dh)``."""
    return 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rotary_cos_sin(time: int, head_dim: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(2, T, Dh): cos and sin of the rotary angles ``t / base**(2i / Dh)``, each half repeated."""
    inv_freq = rotary_inv_freq(head_dim, device=device)  # (Dh/2,)
    angles = torch.arange(time, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Dh)
    return torch.stack([angles.cos(), angles.sin()]).to(dtype)  # (2, T, Dh)


def rel_shift(scores: Tensor) -> Tensor:
    """(B, H, T, 2T-1) scores against every relative position -> (B, H, T, T) per key.

    Transformer-XL's skew: left-pad one column and re-read the buffer with rows one
    element shorter, so that output ``[i, j]`` is input ``[i, T - 1 - i + j]``.
    """
    batch, heads, time, num_pos = scores.shape
    padded = F.pad(scores, (1, 0))  # (B, H, T, 2T)
    shifted = padded.view(batch, heads, num_pos + 1, time)[:, :, 1:]  # (B, H, 2T-1, T)
    return shifted.reshape(batch, heads, time, num_pos)[..., :time]  # (B, H, T, T)


class ConformerSelfAttention(nn.Module):
    """ESPnet multi-head self-attention with relative or rotary positions.

    ``relative``: scores ``((q + u) . k + rel_shift((q + v) . W_pos p)) / sqrt(Dh)``;
    the position term reaches ``scaled_dot_product_attention`` as an additive float mask
    (with -inf at padded keys). ``rotary``: the attention *input* is rotated before the
    query and key projections (fairseq's and Hugging Face's order), the value projection
    reads it unrotated. Separate q/k/v projections for that reason; each is a module of
    its own so that ZeRO-3 gathers its weight when it runs.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, *, position: str):
        super().__init__()
        if position not in ("relative", "rotary"):
            raise ValueError(f"position: expected 'relative' or 'rotary', got {position!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.position = position
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if position == "relative":
            self.linear_pos = nn.Linear(dim, dim, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.head_dim))  # (H, Dh)
            self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.head_dim))  # (H, Dh)
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: Tensor) -> Tensor:
        batch, time, _ = x.shape
        return x.view(batch, time, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, x: Tensor, padding_mask: Tensor | None, positions: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D); ``positions`` from :meth:`ConformerEncoder.positions`."""
        batch, time, dim = x.shape
        dropout_p = self.dropout if self.training else 0.0
        if self.position == "rotary":
            cos, sin = positions.unbind(0)  # each (T, Dh)
            heads = x.view(batch, time, self.num_heads, self.head_dim)  # (B, T, H, Dh)
            first, second = heads.chunk(2, dim=-1)  # each (B, T, H, Dh/2)
            rotated = heads * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]  # (B, T, H, Dh)
            qk_input = rotated.reshape(batch, time, dim)  # (B, T, D)
            q, k, v = self._heads(self.q_proj(qk_input)), self._heads(self.k_proj(qk_input)), self._heads(self.v_proj(x))
            attn_mask = None if padding_mask is None else (~padding_mask).view(batch, 1, 1, time)  # True = attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, H, T, Dh)
        else:
            q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            pos = self.linear_pos(positions).view(2 * time - 1, self.num_heads, self.head_dim)  # (2T-1, H, Dh)
            pos = pos.permute(1, 2, 0)  # (H, Dh, 2T-1)
            scores = torch.matmul(q + self.pos_bias_v[:, None], pos)  # (B, H, T, 2T-1)
            bias = rel_shift(scores) * self.head_dim**-0.5  # (B, H, T, T)
            if padding_mask is not None:
                bias = bias.masked_fill(padding_mask.view(batch, 1, 1, time), float("-inf"))
            y = F.scaled_dot_product_attention(
                q + self.pos_bias_u[:, None], k, v, attn_mask=bias, dropout_p=dropout_p
            )  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, dim))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over channels of (B, C, T) whose training statistics skip padded frames.

    Without a padding mask, or in eval mode (running statistics, per frame), it is
    ``nn.BatchNorm1d`` itself; the parameters and buffers keep its names, so Hugging
    Face's ``batch_norm`` weights and running statistics load as they are. Training
    statistics are taken in float32; ``momentum`` must be a number (not None).
    """

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if padding_mask is None or not self.training:
            return super().forward(x)
        valid = (~padding_mask).unsqueeze(1).to(torch.float32)  # (B, 1, T)
        xf = x.float()
        count = valid.sum()  # () valid frames
        mean = (xf * valid).sum(dim=(0, 2)) / count  # (C,)
        var = ((xf - mean[:, None]).square() * valid).sum(dim=(0, 2)) / count  # (C,) biased, as BatchNorm
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                unbiased = var * (count / (count - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        y = (xf - mean[:, None]) * torch.rsqrt(var + self.eps)[:, None]  # (B, C, T)
        if self.affine:
            y = y * self.weight[:, None] + self.bias[:, None]
        return y.to(x.dtype)


class ConvolutionModule(nn.Module):
    """LN -> pointwise conv (2D) + GLU -> depthwise conv -> BatchNorm -> SiLU -> pointwise conv -> dropout.

    (B, T, D) -> (B, T, D). Convolutions without bias, as in fairseq and Hugging Face;
    padded frames are zeroed before the depthwise convolution.
    """

    def __init__(self, dim: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise1 = nn.Conv1d(dim, 2 * dim, 1, bias=False)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=False)
        self.batch_norm = MaskedBatchNorm1d(dim)
        self.pointwise2 = nn.Conv1d(dim, dim, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        y = F.glu(self.pointwise1(self.norm(x).transpose(1, 2)), dim=1)  # (B, D, T)
        if padding_mask is not None:
            y = y.masked_fill(padding_mask.unsqueeze(1), 0.0)  # (B, 1, T) broadcast over channels
        y = F.silu(self.batch_norm(self.depthwise(y), padding_mask))  # (B, D, T)
        return self.dropout(self.pointwise2(y)).transpose(1, 2)  # (B, T, D)


class ConformerLayer(nn.Module):
    """One macaron Conformer block (see the module docstring). (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        *,
        conv_kernel: int,
        position: str,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
    ):
        super().__init__()
        self.ffn1_norm = nn.LayerNorm(dim)
        self.ffn1 = FeedForward(dim, ffn_dim, activation_dropout, activation=F.silu)
        self.attn_norm = nn.LayerNorm(dim)
        self.attention = ConformerSelfAttention(dim, num_heads, attention_dropout, position=position)
        self.attn_dropout = nn.Dropout(attention_dropout)
        self.conv = ConvolutionModule(dim, conv_kernel, dropout)
        self.ffn2_norm = nn.LayerNorm(dim)
        self.ffn2 = FeedForward(dim, ffn_dim, activation_dropout, activation=F.silu)
        self.final_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None, positions: Tensor) -> Tensor:
        x = x + 0.5 * self.dropout(self.ffn1(self.ffn1_norm(x)))
        x = x + self.attn_dropout(self.attention(self.attn_norm(x), padding_mask, positions))
        x = x + self.conv(x, padding_mask)
        x = x + 0.5 * self.dropout(self.ffn2(self.ffn2_norm(x)))
        return self.final_norm(x)


class ConformerEncoder(nn.Module):
    """Padding zeroed + stack LayerNorm placement + Conformer layers with LayerDrop. (B, T, D) -> (B, T, D)."""

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
        conv_kernel: int,
        position: str,
    ):
        super().__init__()
        self.out_dim = dim
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop
        self.checkpoint_activations = False
        """Recompute each layer in the backward instead of keeping its activations
        (``train.activation_checkpointing``): memory for compute."""
        self.position = position
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            ConformerLayer(
                dim, ffn_dim, num_heads, conv_kernel=conv_kernel, position=position, dropout=dropout,
                attention_dropout=attention_dropout, activation_dropout=activation_dropout,
            )
            for _ in range(num_layers)
        )
        init_linear_bert_(self.layers)

    def kept_layers(self, generator: torch.Generator | None) -> list[bool]:
        """Which layers run this step (:func:`models.transformer.kept_layers`)."""
        return kept_layers(len(self.layers), self.layerdrop, training=self.training, generator=generator)

    def positions(self, x: Tensor) -> Tensor:
        """What every layer's attention needs for (B, T, D) ``x``: (2T-1, D) relative
        sinusoids or (2, T, Dh) rotary cos/sin; computed once per forward, on ``x``'s device."""
        time = x.shape[1]
        if self.position == "rotary":
            return rotary_cos_sin(time, self.head_dim, device=x.device, dtype=x.dtype)
        return relative_sinusoids(time, x.shape[2], device=x.device, dtype=x.dtype)

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        layerdrop_generator: torch.Generator | None = None,
    ) -> Tensor:
        return self.forward_split(x, padding_mask, split=len(self.layers), layerdrop_generator=layerdrop_generator)[1]

    def forward_split(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        *,
        split: int,
        layerdrop_generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(output of the first ``split`` blocks, output of the stack), both (B, T, D), in one pass.

        w2v-BERT reads both: its contrastive module is the first blocks, its masked-LM module
        the rest (:mod:`models.w2v_bert`). Each block ends with its own LayerNorm, so the
        first output is normalised whatever the stack's LayerNorm placement; that LayerNorm
        itself (``layer_norm_first``) ends the stack only. A dropped layer (LayerDrop) is
        skipped on either side of the split.
        """
        if not 0 <= split <= len(self.layers):
            raise ValueError(f"split: expected 0..{len(self.layers)} layers, got {split}")
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if not self.layer_norm_first:
            x = self.norm(x)
        x = self.dropout(x)
        positions = self.positions(x)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        first = x
        for i, (layer, keep) in enumerate(zip(self.layers, self.kept_layers(layerdrop_generator), strict=True)):
            if i == split:
                first = x
            if keep and recompute:
                # Non-reentrant: the RNG is restored for the recomputation, so dropout matches.
                x = checkpoint(layer, x, padding_mask, positions, use_reentrant=False)
            elif keep:
                x = layer(x, padding_mask, positions)
        if split == len(self.layers):
            first = x
        if self.layer_norm_first:
            x = self.norm(x)
        return first, x
