"""The convolutional feature encoder (waveform -> latents) and the feature projection.

Seven temporal convolutions turn 16 kHz samples into one latent per 20 ms. Two norm
layouts exist (fairseq's ``extractor_mode``): ``default`` puts a GroupNorm with one group
per channel after the first convolution only (BASE); ``layer_norm`` puts a LayerNorm over
channels after every convolution (LARGE LV-60k, more stable). GELU follows each block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by ``scale`` backward (fairseq ``GradMultiply``)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def grad_multiply(x: Tensor, scale: float) -> Tensor:
    """Scale the gradient flowing back through ``x``; the encoder learns 10x slower in BASE.

    The paper found that a smaller gradient into the feature encoder stabilises training
    of the group-norm extractor (``feature_grad_mult`` 0.1).
    """
    if scale == 1.0:
        return x
    return _GradMultiply.apply(x, scale)


class _ConvBlock(nn.Module):
    """Conv1d -> optional norm -> GELU."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, *, bias: bool, norm: str | None):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size=kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm_kind = norm
        if norm == "group":
            self.norm: nn.Module | None = nn.GroupNorm(out_dim, out_dim, affine=True)
        elif norm == "layer":
            self.norm = nn.LayerNorm(out_dim, elementwise_affine=True)
        else:
            self.norm = None
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)  # (B, C, T)
        if self.norm_kind == "group":
            x = self.norm(x)
        elif self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)  # LayerNorm over channels per frame
        return self.act(x)


class FeatureEncoder(nn.Module):
    """Raw waveform (B, S) -> latents (B, T, C).

    ``conv_layers`` holds (channels, kernel, stride) per layer; ``mode`` is ``default`` or
    ``layer_norm`` (see the module docstring).
    """

    def __init__(self, conv_layers: Sequence[Sequence[int]], *, mode: str = "default", conv_bias: bool = False):
        super().__init__()
        if mode not in ("default", "layer_norm"):
            raise ValueError(f"model.encoder.mode: expected 'default' or 'layer_norm', got {mode!r}")
        self.kernels = [int(k) for _, k, _ in conv_layers]
        self.strides = [int(s) for _, _, s in conv_layers]
        blocks = []
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            if mode == "layer_norm":
                norm = "layer"
            else:
                norm = "group" if i == 0 else None
            blocks.append(_ConvBlock(in_dim, int(dim), int(kernel), int(stride), bias=conv_bias, norm=norm))
            in_dim = int(dim)
        self.layers = nn.ModuleList(blocks)
        self.dim = in_dim
        self.stride = math.prod(self.strides)
        """Samples per output frame (320: 20 ms)."""

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        """Frames produced from ``num_samples`` samples: ``floor((L - k) / s) + 1`` per layer.

        Works on integer tensors of any shape, on device, without a host sync. Inputs
        shorter than the receptive field give 0 (never negative).
        """
        lengths = num_samples
        for k, s in zip(self.kernels, self.strides, strict=True):
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
            lengths = lengths.clamp(min=0)
        return lengths

    def forward(self, source: Tensor, num_samples: Tensor | None = None) -> Tensor:
        """(B, S) -> (B, T, C); ``num_samples`` is the front-end interface's (unused: each
        frame sees only its receptive field)."""
        x = source.unsqueeze(1)  # (B, 1, S)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(1, 2)  # (B, T, C)


class FeatureProjection(nn.Module):
    """LayerNorm(C) -> Linear(C -> D) -> dropout; also returns the normalised latents.

    The normalised latents (before the Linear) are what the quantizer sees, as in both
    fairseq and Hugging Face.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)

    @property
    def out_dim(self) -> int:
        """Width of the frames the context network reads."""
        return self.linear.out_features

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        normed = self.norm(features)  # (B, T, C)
        return self.dropout(self.linear(normed)), normed  # (B, T, D), (B, T, C)


class IdentityProjection(nn.Module):
    """The front end's frames as they are (dropout only), in the projection's place.

    wav2vec 1.0 and APC feed their causal context network the features themselves: no
    LayerNorm and no Linear between (FAMILY.md sections 9, 10). Returns ``(dropout(features),
    features)`` like :class:`FeatureProjection`.
    """

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.out_dim = dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        return self.dropout(features), features  # (B, T, C), (B, T, C)
