"""The log-mel filterbank baseline frontend: what a downstream model sees without pretraining.

CPC's and wav2vec's tables compare learned features against classic ones (MFCC,
filterbanks). To compare like with like, this frontend has the conv feature encoder's
interface and frame rate: ``forward(source (B, S)) -> (B, T, n_mels)`` and
``output_lengths(num_samples)``, one frame per 20 ms (hop 320 samples) from a 25 ms
window (400 samples, the conv stack's receptive field). So it can stand in for the
feature encoder of a ``Wav2Vec2Encoder`` (:func:`build_logmel_ctc_model`): the same
projection, Transformer and CTC head then train on filterbanks instead of learned latents.

Computed in torch (STFT of a Hann window, HTK mel scale, log of power + 1e-6): no
extra dependency, runs on the training device, no parameters (nothing to freeze).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.factory import build_ctc_model
from models.feature_encoder import FeatureProjection
from models.wav2vec2 import Wav2Vec2ForCTC


def _hz_to_mel(hz: float | Tensor) -> float | Tensor:
    if isinstance(hz, Tensor):
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> Tensor:
    """Triangular HTK-mel filters, shape (n_fft // 2 + 1, n_mels), peak 1 (not area-normalised)."""
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel filterbank: expected 0 <= f_min < f_max <= {sample_rate / 2}, got {f_min}, {f_max}")
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    mels = torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    edges = _mel_to_hz(mels)  # (M + 2,)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]  # each (M,)
    rising = (freqs[:, None] - lower[None, :]) / (center - lower)[None, :]  # (F, M)
    falling = (upper[None, :] - freqs[:, None]) / (upper - center)[None, :]  # (F, M)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMelFrontend(nn.Module):
    """(B, S) 16 kHz samples -> (B, T, n_mels) log-mel features, T = floor((S - 400) / 320) + 1."""

    def __init__(
        self,
        n_mels: int = 80,
        *,
        sample_rate: int = 16000,
        win_length: int = 400,
        hop_length: int = 320,
        n_fft: int = 512,
        f_min: float = 20.0,
        f_max: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if n_mels < 1:
            raise ValueError(f"n_mels: expected >= 1, got {n_mels}")
        if not 0 < win_length <= n_fft:
            raise ValueError(f"win_length: expected in (0, n_fft={n_fft}], got {win_length}")
        if hop_length < 1:
            raise ValueError(f"hop_length: expected >= 1, got {hop_length}")
        self.n_mels = n_mels
        self.win_length = win_length
        self.hop_length = hop_length
        self.n_fft = n_fft
        self.eps = eps
        # Buffers, not parameters, and not persistent: a checkpoint holds no filterbank.
        window = torch.zeros(n_fft)
        start = (n_fft - win_length) // 2
        window[start:start + win_length] = torch.hann_window(win_length, periodic=True)
        self.register_buffer("window", window, persistent=False)  # (n_fft,)
        fb = mel_filterbank(n_fft, n_mels, sample_rate, f_min, f_max or sample_rate / 2)
        self.register_buffer("filterbank", fb, persistent=False)  # (n_fft/2+1, n_mels)

    @property
    def dim(self) -> int:
        return self.n_mels

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        """Frames for ``num_samples`` samples: one per hop whose 25 ms window fits."""
        frames = torch.div(num_samples - self.win_length, self.hop_length, rounding_mode="floor") + 1
        return torch.clamp(frames, min=0)

    def forward(self, source: Tensor) -> Tensor:
        if source.dim() != 2:
            raise ValueError(f"source: expected (B, S) float samples, got shape {tuple(source.shape)}")
        batch, num_samples = source.shape
        if num_samples < self.win_length:
            return source.new_zeros(batch, 0, self.n_mels)
        x = source.float()
        # Frames of n_fft samples whose centred win_length part is the analysis window;
        # pad so the last window that fits is complete.
        pad = (self.n_fft - self.win_length) // 2
        x = nn.functional.pad(x, (pad, self.n_fft - self.win_length - pad))  # (B, S + n_fft - win)
        frames = x.unfold(1, self.n_fft, self.hop_length)  # (B, T, n_fft)
        spec = torch.fft.rfft(frames * self.window, dim=-1)  # (B, T, n_fft/2+1)
        power = spec.real.square() + spec.imag.square()
        mel = power @ self.filterbank  # (B, T, n_mels)
        return torch.log(mel + self.eps).to(source.dtype)


def build_logmel_ctc_model(cfg: ModelConfig, vocab_size: int, n_mels: int = 80) -> Wav2Vec2ForCTC:
    """The CTC model of ``cfg`` with the conv feature encoder replaced by log-mel filterbanks.

    Projection, Transformer, masking and head are exactly those of
    :func:`models.factory.build_ctc_model` (same sizes, fresh weights); only the input
    features differ, so the comparison isolates what the learned features bring.
    """
    model = build_ctc_model(cfg, vocab_size)
    enc = model.encoder
    enc.feature_encoder = LogMelFrontend(n_mels)
    enc.feature_projection = FeatureProjection(n_mels, enc.dim, cfg.dropout_input)
    enc.grad_mult = 1.0  # no parameters below: nothing to scale
    return model
