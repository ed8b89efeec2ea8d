"""One file in, 16 kHz FLAC or a reason out: every bad-input class, and conversions that must be right."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from pipeline.data import audio as A
from pipeline.data import testing as T

CASES = T.bad_inputs()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_input_is_converted_correctly_or_rejected_with_its_reason(case: T.Case) -> None:
    result = A.convert(case.data, sample_rate=16000, min_seconds=0.1, max_seconds=3600)
    if not case.accepted:
        assert isinstance(result, A.Rejected), f"{case.name} was accepted"
        assert result.reason in case.reasons, (case.name, result)
        assert result.detail
        return
    assert isinstance(result, A.Converted), (case.name, result)
    decoded, rate = sf.read(io.BytesIO(result.flac), dtype="float32")
    assert rate == 16000 and result.sample_rate == 16000
    assert decoded.ndim == 1, "must be down-mixed to mono"
    assert len(decoded) == result.num_samples == case.num_samples
    assert np.isfinite(decoded).all() and np.abs(decoded).max() <= 1.0
    assert T.dominant_frequency(decoded, 16000) == pytest.approx(case.freq, abs=3)


def test_header_claiming_a_hundred_hours_is_rejected_before_decoding() -> None:
    # Decoding what this header claims would allocate 23 GB of float32.
    data = T.flac_declaring(T.tone(1.0, 16000), 16000, 16000 * 3600 * 100)
    result = A.convert(data, max_seconds=3600)
    assert isinstance(result, A.Rejected) and result.reason == A.REASON_TOO_LONG


def test_downmix_is_the_mean_of_channels() -> None:
    left = T.tone(1.0, 16000, freq=200)[:, 0]
    stereo = np.stack([left, -left], axis=1)  # mean is silence
    assert A.convert(T.encode(stereo, 16000, subtype="FLOAT")) == A.Rejected(A.REASON_SILENT, "every sample is 0")
    same = np.stack([left, left], axis=1)
    result = A.convert(T.encode(same, 16000))
    assert isinstance(result, A.Converted) and result.source_channels == 2
    back, _ = sf.read(io.BytesIO(result.flac), dtype="float32")
    assert np.abs(back - left).max() < 2e-4  # 16-bit PCM twice


def test_decode_segment_returns_exactly_the_requested_samples() -> None:
    x = T.tone(6.0, 16000)[:, 0]
    flac = T.encode(x, 16000, "FLAC")
    full, _ = sf.read(io.BytesIO(flac), dtype="float32")
    # short offsets are decoded through, long ones seek: both must be exact
    for offset, length in [(0, 100), (5, 3), (12345, 4000), (31999, 1), (20000, 8000), (90000, 5000),
                           (96000 - 500, 500)]:
        np.testing.assert_array_equal(A.decode_segment(flac, offset, length), full[offset:offset + length])
    out = np.zeros(300, np.float32)
    assert A.decode_segment(flac, 10, 300, out=out) is out
    with pytest.raises(ValueError, match="segment"):
        A.decode_segment(flac, 95000, 2000)


def test_duration_estimated_from_the_first_bytes() -> None:
    wav = T.encode(T.tone(3.0, 44100, channels=2), 44100)
    flac = T.encode(T.tone(2.5, 22050), 22050, "FLAC")
    assert A.estimate_seconds(wav[:4096], len(wav)) == pytest.approx(3.0, abs=0.01)
    assert A.estimate_seconds(flac[:4096], len(flac)) == pytest.approx(2.5, abs=1e-6)
    assert A.estimate_seconds(b"not audio", 9) is None
