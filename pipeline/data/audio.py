"""One audio file in, 16 kHz mono FLAC out, or a reason why not.

:func:`convert` is what ``prepare`` runs on every input file. It never raises on bad
audio: it returns a :class:`Converted` or a :class:`Rejected` with one of the
``REASON_*`` codes, because one unreadable file among millions must not stop a job.
The header is checked before anything is decoded, so a file that claims a hundred
hours is rejected without allocating a hundred hours of samples.

:func:`decode_segment` is what the training input runs per utterance: it seeks in the
FLAC stream and decodes only the crop it needs.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

REASON_EMPTY_FILE = "empty_file"
"""Zero bytes."""
REASON_UNREADABLE = "unreadable"
"""libsndfile cannot open it: not audio, unknown format, broken header."""
REASON_NO_SAMPLES = "no_samples"
"""A valid header with no audio after it."""
REASON_DECODE_ERROR = "decode_error"
"""Opens, but the stream is corrupt part-way."""
REASON_TRUNCATED = "truncated"
"""Shorter than its header says (cut-off download or copy)."""
REASON_NON_FINITE = "non_finite"
"""NaN or infinite samples (float formats)."""
REASON_SILENT = "silent"
"""Digital silence: nothing to learn, and it would break per-utterance normalisation."""
REASON_BAD_SAMPLE_RATE = "bad_sample_rate"
REASON_TOO_SHORT = "too_short"
REASON_TOO_LONG = "too_long"
REASON_ERROR = "error"
"""Anything unexpected (reading the object, a bug); the detail says what."""

MIN_SOURCE_RATE = 2000
MAX_SOURCE_RATE = 768_000
_BLOCK_FRAMES = 1 << 18
# A header that claims more frames than this much audio could hold is lying (or the
# data was cut): compare with what the decoder actually delivers.
_TRUNCATION_TOLERANCE = 0.01


@dataclass(frozen=True)
class Converted:
    """An accepted file: FLAC bytes at the target rate, plus what we learnt on the way."""

    flac: bytes
    num_samples: int
    sample_rate: int
    source_sample_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


def convert(
    data: bytes | BinaryIO,
    *,
    sample_rate: int = 16000,
    min_seconds: float = 0.0,
    max_seconds: float = 3600.0,
) -> Converted | Rejected:
    """Decode, check, down-mix (mean of channels), resample (soxr HQ), encode FLAC PCM 16.

    ``data`` is the whole file or a seekable binary stream. Float input peaking above
    full scale is scaled down to fit 16 bits rather than clipped.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            return Rejected(REASON_EMPTY_FILE, "0 bytes")
        stream: BinaryIO = io.BytesIO(data)
    else:
        stream = data
    try:
        snd = sf.SoundFile(stream)
    except Exception as e:  # libsndfile's errors and anything its Python binding raises
        return Rejected(REASON_UNREADABLE, _first_line(e))
    with snd:
        rate, channels, frames = snd.samplerate, snd.channels, snd.frames
        if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
            return Rejected(
                REASON_BAD_SAMPLE_RATE, f"{rate} Hz; expected {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz"
            )
        if frames <= 0:
            return Rejected(REASON_NO_SAMPLES, f"header declares {frames} frames")
        if frames / rate > max_seconds:
            return Rejected(REASON_TOO_LONG, f"{frames / rate:.1f} s declared; at most {max_seconds:g} s")
        if frames / rate < min_seconds:
            return Rejected(REASON_TOO_SHORT, f"{frames / rate:.3f} s; at least {min_seconds:g} s")
        if _wav_data_chunk_cut(snd):
            return Rejected(REASON_TRUNCATED, "data chunk is shorter than its header declares")
        resampler = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ") if rate != sample_rate else None
        pieces: list[np.ndarray] = []
        decoded = 0
        try:
            while decoded < frames:
                block = snd.read(min(_BLOCK_FRAMES, frames - decoded), dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                decoded += len(block)
                if not np.isfinite(block).all():
                    return Rejected(REASON_NON_FINITE, f"NaN or inf among the first {decoded} frames")
                mono = block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0]  # (n,)
                if resampler is not None:
                    mono = resampler.resample_chunk(mono, last=False)
                pieces.append(np.ascontiguousarray(mono, dtype=np.float32))
        except Exception as e:
            return Rejected(REASON_DECODE_ERROR, f"after {decoded} of {frames} frames: {_first_line(e)}")
        if decoded < frames * (1.0 - _TRUNCATION_TOLERANCE):
            return Rejected(REASON_TRUNCATED, f"decoded {decoded} of {frames} frames declared")
        if resampler is not None:
            pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)  # (num_samples,)
    if len(audio) / sample_rate < min_seconds or len(audio) == 0:
        return Rejected(REASON_TOO_SHORT, f"{len(audio) / sample_rate:.3f} s after decoding")
    peak = float(np.max(np.abs(audio)))
    if peak == 0.0:
        return Rejected(REASON_SILENT, "every sample is 0")
    if peak > 1.0:
        audio = audio / np.float32(peak)
    out = io.BytesIO()
    sf.write(out, audio, sample_rate, format="FLAC", subtype="PCM_16")
    return Converted(
        flac=out.getvalue(),
        num_samples=len(audio),
        sample_rate=sample_rate,
        source_sample_rate=rate,
        source_channels=channels,
    )


_BYTES_PER_SAMPLE = {
    "PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
}


def estimate_seconds(head: bytes, size: int) -> float | None:
    """Duration of a file from its first bytes and its size, or None when they cannot tell.

    For sizing shards only: PCM formats from the header's rate, channels and sample
    width; FLAC from its STREAMINFO. Lossy formats need the whole file (None).
    """
    try:
        info = sf.info(io.BytesIO(head))
    except Exception:
        return None
    if info.samplerate <= 0 or info.channels <= 0:
        return None
    if info.format == "FLAC" and info.frames > 0:
        return info.frames / info.samplerate
    width = _BYTES_PER_SAMPLE.get(info.subtype)
    if width is None:
        return None
    return size / (info.samplerate * info.channels * width)


def _wav_data_chunk_cut(snd: sf.SoundFile) -> bool:
    """libsndfile silently shortens a WAV whose data chunk was cut; its log says so."""
    if snd.format not in ("WAV", "WAVEX", "RF64", "W64"):
        return False
    for line in snd.extra_info.splitlines():
        if line.startswith("data") and "should be" in line:
            return True
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = re.sub(r"<[^>]* object at 0x[0-9a-f]+>", "the file", text[0] if text else "")
    return f"{type(e).__name__}: {first}"[:300]


# soundfile's read() re-seeks to the position it computed after every call, and on a
# FLAC stream that seek costs about as much as decoding a second of audio: the training
# input reads through libsndfile directly (one call, no seek after it). The fallback
# keeps working should soundfile's internals move.
_RAW_READ = hasattr(sf, "_snd") and hasattr(sf, "_ffi") and hasattr(sf._snd, "sf_readf_float")


def _read_into(snd: sf.SoundFile, out: np.ndarray) -> int:
    """Decode ``len(out)`` frames of a mono stream into the float32 C-contiguous ``out``."""
    if _RAW_READ:
        return int(sf._snd.sf_readf_float(snd._file, sf._ffi.cast("float *", out.ctypes.data), len(out)))
    return len(snd.read(len(out), dtype="float32", out=out))


def decode_segment(
    flac: bytes | memoryview, offset: int, length: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Samples ``[offset, offset + length)`` of a mono FLAC stream as float32, decoding only
    those (a seek decodes from the enclosing frame). ``out``: a float32 (length,) array to fill."""
    if out is None:
        out = np.empty(length, dtype=np.float32)  # (length,)
    if out.dtype != np.float32 or out.shape != (length,) or not out.flags.c_contiguous:
        raise ValueError(f"decode_segment: out must be float32 C-contiguous ({length},), got {out.dtype} {out.shape}")
    with sf.SoundFile(io.BytesIO(flac)) as snd:
        if snd.channels != 1:
            raise ValueError(f"FLAC segment: expected mono, got {snd.channels} channels")
        if offset:
            snd.seek(offset)
        got = _read_into(snd, out)
    if got != length:
        raise ValueError(f"FLAC segment [{offset}, {offset + length}): got {got} samples")
    return out
