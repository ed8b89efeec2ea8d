"""Small model configs and structured synthetic audio shared by the model tests."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import (
    FeatureEncoderConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    QuantizerConfig,
    TransformerConfig,
)


def make_small_config(mode: str = "default", **overrides) -> ModelConfig:
    """A 2-layer, 32-wide model with the full architecture; no dropout, no LayerDrop.

    ``layer_norm`` mode also switches to pre-LN and conv bias (the LV-60k layout) and uses
    an odd positional kernel, so both trimming paths of the positional conv are covered.
    """
    ln = mode == "layer_norm"
    cfg = ModelConfig(
        encoder=FeatureEncoderConfig(
            conv_layers=[[16, 10, 5]] + [[16, 3, 2]] * 4 + [[16, 2, 2]] * 2, mode=mode, conv_bias=ln, grad_mult=1.0
        ),
        transformer=TransformerConfig(
            num_layers=2, dim=32, ffn_dim=64, num_heads=4, layer_norm_first=ln, dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
            pos_conv_kernel=15 if ln else 16, pos_conv_groups=4,
        ),
        mask=MaskConfig(prob=0.5, length=4, min_masks=2),
        quantizer=QuantizerConfig(groups=2, entries=6, codevector_dim=24),
        loss=LossConfig(num_negatives=10, feature_penalty_weight=0.0),
        final_dim=16, dropout_input=0.0, dropout_features=0.0,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every model test on one thread (``one_thread``)."""


@pytest.fixture
def small_config():
    """Factory fixture: ``small_config("default" | "layer_norm")``."""
    return make_small_config


def symbol_audio(batch: int, seconds: float, generator: torch.Generator, sample_rate: int = 16000) -> torch.Tensor:
    """(B, S) audio made of 0.3-0.6 s "symbols": six harmonic tones, noise, silence.

    Like phones, a few recurring units with sharp boundaries: masked spans can be
    predicted from the visible parts of the same unit, so a model that learns anything
    beats chance quickly; white noise would leave nothing to learn.
    """
    n = int(seconds * sample_rate)
    t = torch.arange(n) / sample_rate
    out = torch.zeros(batch, n)
    for b in range(batch):
        pos = 0
        while pos < n:
            dur = int(sample_rate * (0.3 + 0.3 * torch.rand((), generator=generator).item()))
            seg = slice(pos, min(n, pos + dur))
            tt = t[seg] - t[pos]
            symbol = int(torch.randint(0, 8, (), generator=generator))
            if symbol < 6:
                f = 120.0 * 2 ** (symbol * 0.5)
                out[b, seg] = sum(torch.sin(2 * math.pi * h * f * tt) / h for h in (1, 2, 3))
            elif symbol == 6:
                out[b, seg] = 0.3 * torch.randn(tt.shape[0], generator=generator)
            pos += dur
    out = out + 0.01 * torch.randn(out.shape, generator=generator)
    return (out - out.mean(1, keepdim=True)) / out.std(1, keepdim=True)
