"""One file in, 16 kHz FLAC or a reason out: every case of the hostile corpus
(:mod:`pipeline.data.hostile`), and conversions that must be right."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from pipeline.data import audio as A
from pipeline.data import hostile as H
from pipeline.data import testing as T

CASES = H.audio_cases()
# What a reason must never show: a decoder's internals, addresses, impossible numbers.
INTERNALS = re.compile(r"psf_|sf_\w+\(|Libsndfile|Error opening|object at 0x|Invalid data found|\de[+-]?\d\d")


def stored(result: A.Converted) -> np.ndarray:
    audio, rate = sf.read(io.BytesIO(result.flac), dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return audio


def check_case(case: T.Case, result: A.Converted | A.Rejected) -> None:
    """The verdict the case promises; accepted: its length and its signal survived."""
    if not case.accepted:
        assert isinstance(result, A.Rejected), f"{case.name} was accepted"
        assert result.reason in case.reasons, (case.name, result)
        assert result.detail and not INTERNALS.search(result.detail), (case.name, result.detail)
        return
    assert isinstance(result, A.Converted), (case.name, result)
    audio = stored(result)
    assert len(audio) == result.num_samples
    assert abs(result.num_samples - case.num_samples) <= case.length_tolerance, (case.name, result.num_samples)
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert T.dominant_frequency(audio, 16000) == pytest.approx(case.freq, abs=3), case.name
    assert float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) >= case.min_rms, case.name


def test_the_corpus_covers_every_class() -> None:
    assert len(CASES) >= 150
    reasons = {r for c in CASES for r in c.reasons}
    assert reasons >= {A.REASON_EMPTY_FILE, A.REASON_UNREADABLE, A.REASON_NO_SAMPLES, A.REASON_DECODE_ERROR,
                       A.REASON_TRUNCATED, A.REASON_NON_FINITE, A.REASON_SILENT, A.REASON_SIGNAL_LOST,
                       A.REASON_BAD_SAMPLE_RATE, A.REASON_TOO_SHORT, A.REASON_TOO_LONG}
    assert sum(c.accepted for c in CASES) >= 90


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_input_is_converted_correctly_or_rejected_with_its_reason(case: T.Case) -> None:
    check_case(case, A.convert(case.data, sample_rate=16000, min_seconds=0.1, max_seconds=3600))


@pytest.mark.parametrize("name", ["marker_data_ffffffff", "chunk_list_overshoots", "flac_length_unknown",
                                  "loud_float_x1e10", "antiphase_44k", "wav_cut_at_90_percent"])
def test_a_stream_is_converted_like_the_same_bytes(name: str) -> None:
    """Files over the whole-read limit are decoded from a seekable stream: same verdicts."""
    case = next(c for c in CASES if c.name == name)
    from_bytes = A.convert(case.data, min_seconds=0.1)
    from_stream = A.convert(pa.BufferReader(case.data), min_seconds=0.1)
    check_case(case, from_stream)
    assert from_stream == from_bytes


def test_header_claiming_a_hundred_hours_is_rejected_before_decoding() -> None:
    # Decoding what this header claims would allocate 23 GB of float32.
    data = T.flac_declaring(T.tone(1.0, 16000), 16000, 16000 * 3600 * 100)
    result = A.convert(data, max_seconds=3600)
    assert isinstance(result, A.Rejected) and result.reason == A.REASON_TOO_LONG


def test_downmix_is_the_mean_of_channels_unless_they_cancel() -> None:
    left = T.tone(1.0, 16000, freq=200)[:, 0]
    same = A.convert(T.encode(np.stack([left, left], axis=1), 16000))
    assert isinstance(same, A.Converted) and same.source_channels == 2
    assert np.abs(stored(same) - left).max() < 2e-4  # 16-bit PCM twice
    half = A.convert(T.encode(np.stack([left, np.zeros_like(left)], axis=1), 16000))
    assert isinstance(half, A.Converted) and np.abs(stored(half) - left / 2).max() < 2e-4
    # channels in antiphase: the mean is silence; the loudest channel carries the signal
    anti = A.convert(T.encode(np.stack([0.9 * left, -left], axis=1), 16000, subtype="FLOAT"))
    assert isinstance(anti, A.Converted)
    assert np.abs(stored(anti) + left).max() < 2e-4


def test_a_single_absurd_sample_is_clipped_not_made_the_gain() -> None:
    clean = T.tone(1.0, 16000, freq=300)
    spiked = clean.copy()
    spiked[5000, 0] = 1e30
    reference = stored(A.convert(T.encode(clean, 16000, subtype="FLOAT")))
    result = stored(A.convert(T.encode(spiked, 16000, subtype="FLOAT")))
    differs = np.flatnonzero(reference != result)
    assert differs.tolist() == [5000] and result[5000] == pytest.approx(1.0, abs=1e-4)


def test_float_above_full_scale_is_scaled_to_fit_with_its_shape() -> None:
    clean = T.tone(1.0, 16000, freq=300)
    loud = stored(A.convert(T.encode(clean * 3e20, 16000, subtype="FLOAT")))
    quiet = stored(A.convert(T.encode(clean, 16000, subtype="FLOAT")))
    gain = float(np.dot(loud, quiet) / np.dot(quiet, quiet))
    assert 1.5 < gain < 2.1  # to full scale, give or take the outliers allowed to clip
    kept = np.abs(loud) < 0.999
    assert kept.mean() > 0.999 and np.abs(loud - gain * quiet)[kept].max() < 2e-3


@pytest.mark.parametrize(("name", "says"), [
    ("near_silent_float", "dBFS"), ("subnormal_float", "dBFS"), ("ultrasonic_20k_at_48k", "above 8000 Hz"),
    ("just_short_16k", "0.099 s (1599 samples at 16000 Hz); at least 0.1 s"),
    ("flac_declares_two_hours", "7200.00 s; at most 3600 s"),
    ("chain_link_two_cut", "the file was cut"),
    ("marker_data_ffffffff", ""),
])
def test_reasons_say_what_is_wrong_in_the_users_terms(name: str, says: str) -> None:
    case = next(c for c in CASES if c.name == name)
    result = A.convert(case.data, min_seconds=0.1, max_seconds=3600)
    if case.accepted:
        assert isinstance(result, A.Converted)
    else:
        assert isinstance(result, A.Rejected) and says in result.detail, result


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
    unknown = T.flac_declaring(T.tone(1.0, 16000), 16000, 0)  # length 0: "unknown", not 2^63 frames
    assert A.estimate_seconds(unknown[:4096], len(unknown)) is None
