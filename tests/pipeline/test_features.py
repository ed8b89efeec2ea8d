"""The log-mel baseline frontend: frame rate, frequency placement, padding, the CTC model on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import tiny
from models.feature_encoder import FeatureEncoder
from pipeline.features import LogMelFrontend, build_logmel_ctc_model, mel_filterbank


def tone(freq: float, seconds: float = 1.0, rate: int = 16000) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return (0.5 * torch.sin(2 * torch.pi * freq * t)).unsqueeze(0)  # (1, S)


def test_frame_rate_matches_the_conv_encoder() -> None:
    fe = LogMelFrontend(40)
    conv = FeatureEncoder(tiny().encoder.conv_layers)
    for n in (400, 401, 719, 720, 16000, 48123):
        ours = int(fe.output_lengths(torch.tensor(n)))
        assert ours == (n - 400) // 320 + 1
        assert fe(torch.zeros(1, n)).shape == (1, ours, 40)
        assert abs(ours - int(conv.output_lengths(torch.tensor(n)))) <= 1  # both 20 ms frames
    assert fe(torch.zeros(2, 399)).shape == (2, 0, 40)
    assert int(fe.output_lengths(torch.tensor(100))) == 0


def test_a_tone_lights_the_mel_band_of_its_frequency() -> None:
    fe = LogMelFrontend(40)
    centers = []
    for f in (300.0, 1000.0, 4000.0):
        feats = fe(tone(f))[0]  # (T, 40)
        centers.append(int(feats.mean(0).argmax()))
    assert centers[0] < centers[1] < centers[2]
    fb = mel_filterbank(512, 40, 16000, 20.0, 8000.0)
    freqs = np.linspace(0, 8000, 257)
    for f, band in zip((300.0, 1000.0, 4000.0), centers, strict=True):
        assert fb[int(np.argmin(np.abs(freqs - f))), band] > 0.3


def test_frames_do_not_see_padding_beyond_their_window() -> None:
    fe = LogMelFrontend(40)
    x = torch.randn(1, 8000)
    padded = torch.cat([x, torch.zeros(1, 4000)], dim=1)
    n = int(fe.output_lengths(torch.tensor(8000)))
    assert torch.allclose(fe(x)[0], fe(padded)[0, :n], atol=1e-5)


def test_no_parameters_and_no_state_dict() -> None:
    fe = LogMelFrontend(80)
    assert list(fe.parameters()) == [] and fe.state_dict() == {}
    with pytest.raises(ValueError, match="n_mels"):
        LogMelFrontend(0)


def test_logmel_ctc_model_trains_end_to_end() -> None:
    torch.manual_seed(0)
    model = build_logmel_ctc_model(tiny(), vocab_size=6, n_mels=40)
    src = torch.randn(2, 16000)
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 12000:] = True
    out = model(src, pad)
    assert out.logits.shape == (2, 49, 6)
    assert out.output_lengths.tolist() == [49, (12000 - 400) // 320 + 1]
    out.logits.sum().backward()
    assert model.encoder.feature_projection.linear.weight.grad is not None
