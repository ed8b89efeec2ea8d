"""wav2vec 1.0's convolutions: its feature encoder and its causal context network.

Both are fairseq's ``wav2vec.py`` (FAMILY.md section 9), in wavray's component shapes:

- :class:`Wav2VecFeatureEncoder`, a front end (``model.encoder.mode=wav2vec``): strided
  convolutions on the waveform, each followed by a GroupNorm with one group and ReLU (or
  GELU, vq-wav2vec), then ``log(|z| + 1)``. wav2vec 1.0's layers (kernels 10, 8, 4, 4, 4;
  strides 5, 4, 2, 2, 2; then 1x1 convs) give one frame per 10 ms from 465 samples.
- :class:`CausalConvContext`, a context network (``model.transformer.kind=causal_conv``):
  ``num_layers`` convolutions of kernel 2, 3, ..., padded on the left by repeating the
  first frame (fairseq's ``ReplicationPad1d``), so frame t's convolutions read frames up to
  t only; each adds its input (through a 1x1 conv where the width changes) and scales by
  sqrt(0.5). As in fairseq, each layer's GroupNorm takes its statistics over the whole
  utterance: later frames reach frame t through those two numbers per layer (a shift and
  a scale), never through their content.

The GroupNorms take their statistics over each utterance's valid frames only
(:class:`ValidGroupNorm`): with right padding, a strided valid convolution's frame t reads
only valid samples and a causal one only earlier frames, so an utterance's features do not
depend on what it is batched with. Without padding they are ``nn.GroupNorm`` (fairseq's
``Fp32GroupNorm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

RESIDUAL_SCALE = math.sqrt(0.5)
"""fairseq's ``residual_scale`` 0.5, applied as its square root after every residual sum."""


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation: expected 'relu' or 'gelu', got {name!r}")


def conv_output_lengths(lengths: Tensor, kernel: int, stride: int) -> Tensor:
    """Valid frames of a stride-``stride`` convolution without padding: ``floor((L - k) / s) + 1``, >= 0."""
    return torch.clamp(torch.div(lengths - kernel, stride, rounding_mode="floor") + 1, min=0)


class ValidGroupNorm(nn.Module):
    """GroupNorm of (B, C, T) in float32 whose statistics skip each row's padded frames.

    ``lengths`` (B,) are the valid frames of each row (right padding); None: every frame
    is valid, and this is ``F.group_norm``. Padded frames are normalised with their row's
    statistics (nothing downstream reads them).
    """

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"ValidGroupNorm: {num_groups} groups must divide {channels} channels")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if lengths is None:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        batch, channels, time = x.shape
        xf = x.float().view(batch, self.num_groups, channels // self.num_groups, time)  # (B, G, C/G, T)
        valid = (torch.arange(time, device=x.device) < lengths.to(x.device).unsqueeze(1)).view(batch, 1, 1, time)
        count = (valid.sum(dim=-1, keepdim=True) * (channels // self.num_groups)).clamp(min=1)  # (B, 1, 1, 1)
        mean = (xf * valid).sum(dim=(2, 3), keepdim=True) / count  # (B, G, 1, 1)
        var = ((xf - mean).square() * valid).sum(dim=(2, 3), keepdim=True) / count
        y = ((xf - mean) / torch.sqrt(var + self.eps)).view(batch, channels, time)
        return (y * self.weight.float().view(1, -1, 1) + self.bias.float().view(1, -1, 1)).to(x.dtype)


class _FeatureBlock(nn.Module):
    """Conv1d -> GroupNorm (one group, valid frames) -> activation."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, *, bias: bool, activation: str):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=kernel, stride=stride, bias=bias)
        self.norm = ValidGroupNorm(1, out_dim)
        self.act = _activation(activation)

    def forward(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        return self.act(self.norm(self.conv(x), lengths))  # (B, C, T')


class Wav2VecFeatureEncoder(nn.Module):
    """Raw waveform (B, S) -> wav2vec 1.0's features (B, T, C) (module doc)."""

    def __init__(self, conv_layers: Sequence[Sequence[int]], *, activation: str = "relu", conv_bias: bool = False):
        super().__init__()
        self.kernels = [int(k) for _, k, _ in conv_layers]
        self.strides = [int(s) for _, _, s in conv_layers]
        blocks = []
        in_dim = 1
        for dim, kernel, stride in conv_layers:
            blocks.append(_FeatureBlock(in_dim, int(dim), int(kernel), int(stride), bias=conv_bias,
                                        activation=activation))
            in_dim = int(dim)
        self.layers = nn.ModuleList(blocks)
        self.dim = in_dim
        self.stride = math.prod(self.strides)
        """Samples per output frame (160: 10 ms)."""

    @property
    def receptive_field(self) -> int:
        """Samples one output frame sees (465 for wav2vec 1.0's layers)."""
        field, jump = 1, 1
        for k, s in zip(self.kernels, self.strides, strict=True):
            field += (k - 1) * jump
            jump *= s
        return field

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        """Frames from ``num_samples`` samples (any integer tensor, no host sync); 0 when too short."""
        lengths = num_samples
        for k, s in zip(self.kernels, self.strides, strict=True):
            lengths = conv_output_lengths(lengths, k, s)
        return lengths

    def forward(self, source: Tensor, num_samples: Tensor | None = None) -> Tensor:
        """(B, S) -> (B, T, C); ``num_samples`` (B,) are each row's valid samples (the norms' statistics)."""
        x = source.unsqueeze(1)  # (B, 1, S)
        lengths = num_samples
        for layer, k, s in zip(self.layers, self.kernels, self.strides, strict=True):
            if lengths is not None:
                lengths = conv_output_lengths(lengths, k, s)
            x = layer(x, lengths)
        x = torch.log1p(x.abs())  # fairseq's log compression: log(|z| + 1)
        return x.transpose(1, 2)  # (B, T, C)


class CausalConvLayer(nn.Module):
    """Left replication pad (k - 1) -> Conv1d -> dropout -> GroupNorm -> activation, plus the
    residual, scaled by sqrt(0.5). (B, T, C) -> (B, T, D)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, *, dropout: float, activation: str, bias: bool):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=kernel, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.norm = ValidGroupNorm(1, out_dim)
        self.act = _activation(activation)
        self.residual_proj = nn.Conv1d(in_dim, out_dim, 1, bias=False) if in_dim != out_dim else None

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        h = x.transpose(1, 2)  # (B, C, T)
        y = F.pad(h, (self.kernel - 1, 0), mode="replicate")  # (B, C, T + k - 1): frame t sees t-k+1 .. t
        y = self.act(self.norm(self.dropout(self.conv(y)), lengths))  # (B, D, T)
        residual = h if self.residual_proj is None else self.residual_proj(h)
        return ((y + residual) * RESIDUAL_SCALE).transpose(1, 2)  # (B, T, D)


class CausalConvContext(nn.Module):
    """wav2vec 1.0's context network: causal convolutions of kernels 2 .. ``num_layers`` + 1.

    (B, T, C) -> (B, T, D); frame t of the output reads input frames up to t only, but for
    the per-utterance GroupNorm statistics (module doc). The
    interface of the other context networks: ``forward(x, padding_mask, layerdrop_generator=)``,
    ``layers`` (each ``layer(x, lengths)``), ``out_dim``, activation checkpointing.
    """

    def __init__(self, *, in_dim: int, dim: int, num_layers: int, dropout: float, activation: str,
                 bias: bool = True):
        super().__init__()
        self.out_dim = dim
        self.layer_norm_first = False
        """No final LayerNorm: the last layer's output is the last hidden state."""
        self.checkpoint_activations = False
        """Recompute each layer in the backward (``train.activation_checkpointing``)."""
        self.layers = nn.ModuleList(
            CausalConvLayer(in_dim if i == 0 else dim, dim, i + 2, dropout=dropout, activation=activation, bias=bias)
            for i in range(num_layers)
        )

    @property
    def receptive_field(self) -> int:
        """Frames of input one output frame depends on."""
        return 1 + sum(layer.kernel - 1 for layer in self.layers)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, *,
                layerdrop_generator: torch.Generator | None = None) -> Tensor:
        """``padding_mask`` (B, T) True at padded frames (right padding); no LayerDrop."""
        lengths = None if padding_mask is None else (~padding_mask).long().sum(dim=1)  # (B,)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, lengths, use_reentrant=False) if recompute else layer(x, lengths)
        return x
