"""Kaldi's MFCCs with deltas and delta-deltas: the features HuBERT's first iteration clusters.

fairseq's ``simple_kmeans/dump_mfcc_feature.py`` computes ``torchaudio.compliance.kaldi.mfcc``
with its defaults but ``use_energy=False`` on the waveform in [-1, 1], then two rounds of
``torchaudio.functional.compute_deltas``: 39 values every 10 ms (FAMILY.md section 1).
torchaudio is not a dependency of wavray, so the same computation is written out here:

1. frames of 400 samples (25 ms) every 160 (10 ms), only whole ones ("snip edges");
2. per frame: DC offset removed, pre-emphasis 0.97, Povey window (Hann ** 0.85), FFT of 512;
3. power spectrum -> 23 triangular filters on Kaldi's mel scale (1127 ln(1 + f/700)) from
   20 Hz to 8 kHz -> log (floored at float32's epsilon);
4. orthonormal DCT-II, 13 coefficients, cepstral liftering with L = 22;
5. deltas over +-2 frames (edges repeated), twice: (T, 39).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SAMPLE_RATE = 16000
FRAME_LENGTH = 400
FRAME_SHIFT = 160
NUM_MEL_BINS = 23
NUM_CEPS = 13
LIFTER = 22.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
FFT_SIZE = 512
DIM = 3 * NUM_CEPS


def _mel(freq: Tensor) -> Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


def mel_banks() -> Tensor:
    """(FFT_SIZE // 2 + 1, NUM_MEL_BINS) Kaldi's triangular filters (the Nyquist bin weighs 0)."""
    num_fft_bins = FFT_SIZE // 2
    low = _mel(torch.tensor(LOW_FREQ, dtype=torch.float64))
    high = _mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))
    delta = (high - low) / (NUM_MEL_BINS + 1)
    b = torch.arange(NUM_MEL_BINS, dtype=torch.float64).unsqueeze(1)  # (M, 1)
    left, center, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
    mel = _mel(SAMPLE_RATE / FFT_SIZE * torch.arange(num_fft_bins, dtype=torch.float64)).unsqueeze(0)  # (1, F)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # (M, F)
    banks = torch.cat([banks, torch.zeros(NUM_MEL_BINS, 1, dtype=torch.float64)], dim=1)  # (M, F + 1)
    return banks.t().float()


def dct_matrix() -> Tensor:
    """(NUM_MEL_BINS, NUM_CEPS) orthonormal DCT-II (column 0 is sqrt(1 / M))."""
    n = torch.arange(NUM_MEL_BINS, dtype=torch.float64)
    k = torch.arange(NUM_CEPS, dtype=torch.float64).unsqueeze(1)
    dct = torch.cos(math.pi / NUM_MEL_BINS * (n + 0.5) * k)  # (C, M)
    dct[0] *= 1.0 / math.sqrt(2.0)
    dct *= math.sqrt(2.0 / NUM_MEL_BINS)
    return dct.t().float()


def lifter() -> Tensor:
    """(NUM_CEPS,) Kaldi's cepstral lifter ``1 + L/2 sin(pi i / L)``."""
    i = torch.arange(NUM_CEPS, dtype=torch.float64)
    return (1.0 + 0.5 * LIFTER * torch.sin(math.pi * i / LIFTER)).float()


def deltas(x: Tensor) -> Tensor:
    """(T, C) -> (T, C): ``sum_k k x[t + k] / 10`` over k in -2..2, edges repeated
    (``torchaudio.functional.compute_deltas`` with its window of 5)."""
    if x.shape[0] == 0:
        return x.clone()
    padded = torch.cat([x[:1].expand(2, -1), x, x[-1:].expand(2, -1)], dim=0)  # (T + 4, C)
    t = x.shape[0]
    out = sum(k * padded[2 + k: 2 + k + t] for k in (-2, -1, 1, 2))
    return out / 10.0


def num_frames(num_samples: int) -> int:
    """Whole 25 ms frames every 10 ms in ``num_samples`` samples."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


class Mfcc:
    """Waveform (S,) float in [-1, 1] at 16 kHz -> (T, 39) MFCC + deltas + delta-deltas."""

    stride = FRAME_SHIFT
    window = FRAME_LENGTH
    dim = DIM

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.banks = mel_banks().to(self.device)  # (F + 1, M)
        self.dct = dct_matrix().to(self.device)  # (M, C)
        self.lifter = lifter().to(self.device)  # (C,)
        self.window_fn = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float32).pow(0.85).to(self.device)

    @torch.no_grad()
    def __call__(self, wave: Tensor) -> Tensor:
        wave = wave.to(self.device, torch.float32).reshape(-1)
        frames_n = num_frames(wave.shape[0])
        if frames_n == 0:
            return torch.zeros(0, DIM, device=self.device)
        frames = wave.unfold(0, FRAME_LENGTH, FRAME_SHIFT)[:frames_n]  # (T, 400)
        frames = frames - frames.mean(dim=1, keepdim=True)
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - PREEMPHASIS * previous
        frames = frames * self.window_fn
        spec = torch.fft.rfft(frames, n=FFT_SIZE)  # (T, 257)
        power = spec.real.square() + spec.imag.square()
        logmel = torch.clamp(power @ self.banks, min=torch.finfo(torch.float32).eps).log()  # (T, M)
        ceps = (logmel @ self.dct) * self.lifter  # (T, 13)
        d1 = deltas(ceps)
        return torch.cat([ceps, d1, deltas(d1)], dim=1)  # (T, 39)
