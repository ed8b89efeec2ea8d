"""Log-mel filterbank front ends: classic features in the place of the conv feature encoder.

A front end turns 16 kHz samples into frames: ``forward(source (B, S), num_samples (B,)
or None) -> (B, T, C)`` plus ``output_lengths(num_samples)``. The conv feature encoder
(``models.feature_encoder``) is the one wav2vec 2.0 learns; :class:`LogMelFrontend` is the
one BEST-RQ, w2v-BERT, APC and TERA read (FAMILY.md), and the baseline every learned one is
measured against:

- one frame per ``hop_length`` samples from a ``win_length`` Hann window (STFT, HTK mel
  scale, log of power + 1e-6), computed in torch on the training device, no parameters;
- ``stack`` consecutive frames concatenated into one (B, T / stack, n_mels * stack): 80
  mels every 10 ms stacked by 4 give BEST-RQ's 40 ms frames of 320 values;
- ``deltas``: 1 appends each channel's first time derivative, 2 also the second
  (torchaudio's ``compute_deltas``, a 5-frame regression, the edges repeated at each
  utterance's own last valid frame), before normalisation: Mockingjay's 240-d input;
- ``normalize``: each utterance's frames to zero mean and unit variance per channel, over
  its own valid frames only (padding does not move the statistics).

With ``hop_length`` 320, ``win_length`` 400 and no stacking the frames line up with the
conv feature encoder's (20 ms, 25 ms receptive field): the log-mel baseline of the
benchmarks and of ``finetune.frontend=logmel``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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


def regression_delta(x: Tensor, last: Tensor, width: int = 2) -> Tensor:
    """Time derivative of (B, F, M) frames: ``sum_n n (x[t+n] - x[t-n]) / (2 sum_n n^2)``,
    n = 1 .. ``width`` (torchaudio ``compute_deltas`` with ``win_length`` 5), reading
    ``x[clamp(t +- n, 0, last[b])]``: each row's edges repeat its own last valid frame."""
    frames = x.shape[1]
    t = torch.arange(frames, device=x.device)
    denom = 2 * sum(n * n for n in range(1, width + 1))
    out = torch.zeros_like(x)
    for n in range(1, width + 1):
        ahead = torch.minimum((t + n).unsqueeze(0), last.unsqueeze(1))  # (B, F)
        behind = torch.minimum(torch.clamp(t - n, min=0).unsqueeze(0), last.unsqueeze(1))  # (B, F)
        out = out + n * (_frames_at(x, ahead) - _frames_at(x, behind))
    return out / denom


def _frames_at(x: Tensor, index: Tensor) -> Tensor:
    """(B, F, M) frames at (B, F) time indices."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class LogMelFrontend(nn.Module):
    """(B, S) 16 kHz samples -> (B, T, n_mels * stack) log-mel frames (module doc)."""

    def __init__(
        self,
        n_mels: int = 80,
        *,
        sample_rate: int = 16000,
        win_length: int = 400,
        hop_length: int = 320,
        n_fft: int = 512,
        stack: int = 1,
        normalize: bool = False,
        f_min: float = 20.0,
        f_max: float | None = None,
        eps: float = 1e-6,
        deltas: int = 0,
    ) -> None:
        super().__init__()
        if n_mels < 1:
            raise ValueError(f"n_mels: expected >= 1, got {n_mels}")
        if not 0 < win_length <= n_fft:
            raise ValueError(f"win_length: expected in (0, n_fft={n_fft}], got {win_length}")
        if hop_length < 1:
            raise ValueError(f"hop_length: expected >= 1, got {hop_length}")
        if stack < 1:
            raise ValueError(f"stack: expected >= 1, got {stack}")
        if deltas not in (0, 1, 2):
            raise ValueError(f"deltas: expected 0, 1 or 2, got {deltas}")
        self.deltas = deltas
        self.n_mels = n_mels
        self.win_length = win_length
        self.hop_length = hop_length
        self.n_fft = n_fft
        self.stack = stack
        self.normalize = normalize
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
        return self.n_mels * (1 + self.deltas) * self.stack

    @property
    def stride(self) -> int:
        """Samples per output frame."""
        return self.hop_length * self.stack

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        """Frames for ``num_samples`` samples: one per hop whose window fits, then stacked."""
        frames = torch.div(num_samples - self.win_length, self.hop_length, rounding_mode="floor") + 1
        return torch.div(torch.clamp(frames, min=0), self.stack, rounding_mode="floor")

    def forward(self, source: Tensor, num_samples: Tensor | None = None) -> Tensor:
        """(B, S) -> (B, T, n_mels * stack); ``num_samples`` (B,) are the valid samples of
        each row (right padding), used only by ``normalize``."""
        if source.dim() != 2:
            raise ValueError(f"source: expected (B, S) float samples, got shape {tuple(source.shape)}")
        batch, total = source.shape
        if total < self.win_length:
            return source.new_zeros(batch, 0, self.dim)
        x = source.float()
        # Frames of n_fft samples whose centred win_length part is the analysis window;
        # pad so the last window that fits is complete.
        pad = (self.n_fft - self.win_length) // 2
        x = nn.functional.pad(x, (pad, self.n_fft - self.win_length - pad))  # (B, S + n_fft - win)
        frames = x.unfold(1, self.n_fft, self.hop_length)  # (B, F, n_fft)
        spec = torch.fft.rfft(frames * self.window, dim=-1)  # (B, F, n_fft/2+1)
        power = spec.real.square() + spec.imag.square()
        mel = torch.log(power @ self.filterbank + self.eps)  # (B, F, n_mels)
        num_frames = mel.shape[1] // self.stack
        mel = mel[:, : num_frames * self.stack]  # whole stacks only
        if self.deltas:
            mel = self._with_deltas(mel, num_samples)  # (B, F, n_mels * (1 + deltas))
        if self.normalize:
            mel = self._normalize(mel, num_samples)
        out = mel.reshape(batch, num_frames, self.dim)  # (B, T, C * stack): frames side by side
        return out.to(source.dtype)

    def _with_deltas(self, mel: Tensor, num_samples: Tensor | None) -> Tensor:
        """(B, F, M) -> (B, F, M * (1 + deltas)): ``[static, delta, delta-delta]`` per frame."""
        frames = mel.shape[1]
        last = torch.full((mel.shape[0],), frames - 1, device=mel.device, dtype=torch.long)
        if num_samples is not None:
            valid = self.output_lengths(num_samples.to(mel.device)) * self.stack
            last = torch.clamp(valid - 1, min=0).clamp(max=max(frames - 1, 0))
        parts = [mel]
        for _ in range(self.deltas):
            parts.append(regression_delta(parts[-1], last))
        return torch.cat(parts, dim=-1)

    def _normalize(self, mel: Tensor, num_samples: Tensor | None) -> Tensor:
        """Zero mean, unit variance per utterance and channel over its valid frames (B, F, M)."""
        if num_samples is None:
            mean = mel.mean(dim=1, keepdim=True)
            std = mel.std(dim=1, keepdim=True, unbiased=False)
            return (mel - mean) / (std + 1e-5)
        valid_frames = self.output_lengths(num_samples) * self.stack  # (B,)
        valid = (torch.arange(mel.shape[1], device=mel.device)[None, :] < valid_frames[:, None]).unsqueeze(-1)
        count = valid.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1, 1)
        mean = (mel * valid).sum(dim=1, keepdim=True) / count  # (B, 1, M)
        var = ((mel - mean).square() * valid).sum(dim=1, keepdim=True) / count
        return torch.where(valid, (mel - mean) / (var.sqrt() + 1e-5), torch.zeros_like(mel))
