"""One audio file in, 16 kHz mono FLAC out, or a reason why not.

:func:`convert` is what ``prepare`` runs on every input file. It never raises on bad
audio: it returns a :class:`Converted` or a :class:`Rejected` with one of the
``REASON_*`` codes (:mod:`pipeline.data.verdicts`), because one unreadable file among
millions must not stop a job. The header is checked before anything is decoded, so a
file that claims a hundred hours is rejected without decoding a hundred hours.

Accepting is not the same as keeping: the stored audio must carry the file's signal.
On the way from the decoder (:mod:`pipeline.data.decode`) to 16-bit FLAC:

1. down-mix: the mean of the channels, unless they cancel (a channel wired in
   antiphase): when the mean keeps less than a tenth of the channels' energy, the
   loudest channel is taken instead;
2. level: a file above full scale (float formats) is scaled so that all but its loudest
   0.01% of samples (at least 8) fit, and those few are clipped, before resampling, so a
   single absurd sample (1e30 in a float WAV) is a click, not a gain that turns the rest
   into silence; up to 1% may clip where fewer would still take the file's typical level
   below 16 bits (scattered spikes);
3. resample (soxr HQ), fit any resampler overshoot, round to 16 bits;
4. check, measuring before and after: a file whose stored audio would be silence (too
   quiet for 16 bits, or a burst of absurd values no gain fits beside the rest), whose
   sound is all above the target's Nyquist frequency, or whose rounding would bury it, or
   that conversion would clip more than the input was, is rejected as ``signal_lost``
   with what happened, rather than stored damaged.

Steps 1 and 2 need the whole file: a first pass measures while it converts, and a second
pass runs only when the measurement changes the plan (cancelling channels, a level above
full scale), so clean files are decoded once.

:func:`decode_segment` is what the training input runs per utterance: it seeks in the
FLAC stream and decodes only the crop it needs.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from pipeline.data.decode import Stream, open_streams, read_into
from pipeline.data.verdicts import (
    REASON_BAD_SAMPLE_RATE,
    REASON_DECODE_ERROR,
    REASON_EMPTY_FILE,
    REASON_ERROR,
    REASON_NO_SAMPLES,
    REASON_NON_FINITE,
    REASON_SIGNAL_LOST,
    REASON_SILENT,
    REASON_TOO_LONG,
    REASON_TOO_SHORT,
    REASON_TRUNCATED,
    REASON_UNREADABLE,
    Rejected,
    Unusable,
)

__all__ = [
    "REASON_BAD_SAMPLE_RATE", "REASON_DECODE_ERROR", "REASON_EMPTY_FILE", "REASON_ERROR", "REASON_NO_SAMPLES",
    "REASON_NON_FINITE", "REASON_SIGNAL_LOST", "REASON_SILENT", "REASON_TOO_LONG", "REASON_TOO_SHORT",
    "REASON_TRUNCATED", "REASON_UNREADABLE", "Converted", "Rejected", "convert", "decode_segment",
    "estimate_seconds",
]

MIN_SOURCE_RATE = 2000
MAX_SOURCE_RATE = 768_000
PCM_SCALE = 32768
"""Full scale of the stored 16-bit samples: libsndfile's, both ways, so 16-bit input survives
the round trip bit for bit."""
CANCEL_RATIO = 0.1
"""A down-mix keeping less than this fraction of the channels' mean energy cancels."""
OUTLIER_FRACTIONS = (1e-4, 1e-3, 1e-2)
"""Samples above full scale that are clipped rather than allowed to set the gain (at least
:data:`MIN_OUTLIERS`): the first fraction, or a larger one where that would take the file's
typical level (:data:`TYPICAL_QUANTILE`) below what 16 bits hold (scattered spikes)."""
MIN_OUTLIERS = 8
MIN_RESAMPLED_ENERGY = 0.01
"""Resampling that keeps less than this fraction (-20 dB) of the energy destroyed the signal."""
MIN_SNR_DB = 10.0
"""Stored audio with less signal over its 16-bit rounding noise than this is buried in it."""
MAX_ADDED_CLIPPING = 0.01
"""Conversion may clip at most this fraction of the samples beyond what the input had clipped."""
TYPICAL_QUANTILE = 0.75
"""A file's typical level: this quantile of the median magnitudes of its 100 ms windows (a
spike moves no median). The gain must leave it within 16 bits; where no allowance of outliers
does, the loud part is not a few samples (a burst of absurd values) and the file is rejected
rather than stored as that burst and silence."""
_FULL_SCALE = 0.999


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
class _Plan:
    """How one pass turns the decoded channels into the mono signal to resample."""

    weights: tuple[tuple[float, ...], ...]
    """Per stream, the weight of each channel (the mean, or the loudest channel alone)."""
    gain: float = 1.0
    typical: float | None = None
    """The down-mix's typical level, once a pass with a gain has measured it."""


@dataclass
class _Pass:
    """One pass's output and what it measured (energies on the signal as the plan shapes
    it, clipped to full scale, so no absurd value can overflow them)."""

    gain: float = 1.0
    pieces: list[np.ndarray] = field(default_factory=list)
    frames: int = 0
    source_peak: float = 0.0
    """Largest |sample| of any channel."""
    mono_peak: float = 0.0
    """Largest |sample| of the down-mix, before the gain."""
    over: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The largest down-mix magnitudes above full scale, before the gain."""
    num_over: int = 0
    full_scale_in: int = 0
    """Down-mix samples at full scale before the gain (what the input had clipped)."""
    window_levels: list[np.ndarray] = field(default_factory=list)
    """With a gain: the median magnitude of each 100 ms window of the down-mix, before the gain."""
    typical: float | None = None
    """:data:`TYPICAL_QUANTILE` of the window levels (or the plan's, when this pass measured none)."""
    energy: float = 0.0
    """Sum of squares of the signal going into the resampler."""
    mono_energy: list[float] = field(default_factory=list)
    channel_energy: list[np.ndarray] = field(default_factory=list)


def convert(
    data: bytes | BinaryIO,
    *,
    sample_rate: int = 16000,
    min_seconds: float = 0.0,
    max_seconds: float = 3600.0,
) -> Converted | Rejected:
    """Decode, check, down-mix, set the level, resample (soxr HQ), encode FLAC PCM 16, check
    that the signal survived (the module docstring has the steps).

    ``data`` is the whole file or a seekable binary stream.
    """
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 0:
        return Rejected(REASON_EMPTY_FILE, "0 bytes")
    try:
        streams = open_streams(data)
        return _convert(streams, sample_rate, min_seconds, max_seconds)
    except Unusable as e:
        return e.rejected


def _convert(streams: list[Stream], sample_rate: int, min_seconds: float, max_seconds: float) -> Converted | Rejected:
    for s in streams:
        if not MIN_SOURCE_RATE <= s.rate <= MAX_SOURCE_RATE:
            return Rejected(REASON_BAD_SAMPLE_RATE, f"{s.rate} Hz; expected {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz")
    if all(s.frames is not None for s in streams):
        declared = sum((s.frames or 0) / s.rate for s in streams)
        if declared <= 0:
            return Rejected(REASON_NO_SAMPLES, "its header declares no audio")
        if declared > max_seconds:
            return Rejected(REASON_TOO_LONG, f"its header declares {_ceil(declared, 2)} s; at most {max_seconds:g} s")
        if declared < min_seconds:
            return Rejected(REASON_TOO_SHORT, _too_short(sum(s.frames or 0 for s in streams), streams[0].rate,
                                                         min_seconds))

    plan = _Plan(weights=tuple(tuple([1.0 / s.channels] * s.channels) for s in streams))
    # Measurements are made before the gain, so the plan settles: the down-mix, then the gain
    # from the outliers, then (once a pass with a gain measured the typical level) the allowance.
    for _ in range(4):
        done = _run(streams, plan, sample_rate, max_seconds)
        better = _replan(streams, plan, done)
        if (better.weights, better.gain) == (plan.weights, plan.gain):
            break
        plan = better

    if done.frames == 0:
        return Rejected(REASON_NO_SAMPLES, "no audio after the header")
    audio = np.concatenate(done.pieces) if done.pieces else np.zeros(0, np.float32)  # (num_samples,)
    if len(audio) / sample_rate < min_seconds or len(audio) == 0:
        return Rejected(REASON_TOO_SHORT, _too_short(len(audio), sample_rate, min_seconds) + " after decoding")
    pcm = _check_and_round(done, audio, sample_rate)
    if isinstance(pcm, Rejected):
        return pcm
    out = io.BytesIO()
    sf.write(out, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return Converted(
        flac=out.getvalue(),
        num_samples=len(pcm),
        sample_rate=sample_rate,
        source_sample_rate=streams[0].rate,
        source_channels=max(s.channels for s in streams),
    )


def _run(streams: list[Stream], plan: _Plan, sample_rate: int, max_seconds: float) -> _Pass:
    """Decode every stream once: down-mix, gain, clip, resample; measure on the way."""
    p = _Pass(gain=plan.gain)
    budget = max(MIN_OUTLIERS, int(sum(max_seconds * s.rate for s in streams) * OUTLIER_FRACTIONS[-1])) + 1
    for s, weights in zip(streams, plan.weights, strict=True):
        w = np.asarray(weights, np.float64)  # (channels,)
        resampler = (soxr.ResampleStream(s.rate, sample_rate, 1, dtype="float32", quality="HQ")
                     if s.rate != sample_rate else None)
        mono_energy, channel_energy, frames = 0.0, np.zeros(s.channels), 0
        for block in s.decode():  # (frames, channels) float64
            # Reductions rather than elementwise masks: this loop runs over every sample of
            # the corpus, and clean audio needs none of the branches below.
            mono = block @ w if s.channels > 1 else block[:, 0]  # (frames,); the block is not used again
            source_peak = peak = max(float(mono.max()), -float(mono.min()))
            if s.channels > 1:
                source_peak = max(float(block.max()), -float(block.min()))
            if not math.isfinite(source_peak) or not math.isfinite(peak):
                bad = ~np.isfinite(block).all(axis=1)
                if bad.any():
                    at = frames + int(np.argmax(bad))
                    raise Unusable(REASON_NON_FINITE, f"a NaN or infinite sample {at / s.rate:.3f} s into {s.what}")
            frames += len(block)
            if frames > max_seconds * s.rate + 1 and s.frames is None:
                raise Unusable(REASON_TOO_LONG, f"longer than {max_seconds:g} s (its header gives no length; "
                               "reading stopped there)")
            p.source_peak = max(p.source_peak, source_peak)
            p.mono_peak = max(p.mono_peak, peak)
            if s.channels > 1:
                shaped = block if source_peak * plan.gain <= 1.0 else np.clip(block * plan.gain, -1.0, 1.0)
                energies = np.array([_energy(shaped[:, c]) for c in range(s.channels)])  # (channels,)
                channel_energy += energies * (plan.gain**2 if shaped is block else 1.0)
            if peak >= _FULL_SCALE:
                size = np.abs(mono)
                p.full_scale_in += int(np.count_nonzero(size >= _FULL_SCALE))
                if peak > 1.0:
                    above = size[size > 1.0]
                    p.num_over += len(above)
                    p.over = _largest(np.concatenate([p.over, above]), budget)
            if plan.gain != 1.0:
                p.window_levels.append(_window_levels(mono, max(1, s.rate // 10)))
                mono *= plan.gain
            if peak * plan.gain > 1.0:
                np.clip(mono, -1.0, 1.0, out=mono)  # the few outliers the gain left above full scale
            energy = _energy(mono)
            mono_energy += energy
            p.energy += energy
            out = mono.astype(np.float32)
            if resampler is not None:
                out = resampler.resample_chunk(out, last=False)
            p.pieces.append(out)
        if resampler is not None:
            p.pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        p.frames += frames
        p.mono_energy.append(mono_energy)
        p.channel_energy.append(channel_energy)
    p.typical = (float(np.quantile(np.concatenate(p.window_levels), TYPICAL_QUANTILE)) if p.window_levels
                 else plan.typical)
    return p


def _window_levels(mono: np.ndarray, window: int) -> np.ndarray:
    """Median magnitude of each ``window`` samples of ``mono`` (a spike does not move a median)."""
    whole = len(mono) // window * window
    levels = [np.median(np.abs(mono[:whole].reshape(-1, window)), axis=1)] if whole else []
    if whole < len(mono):
        levels.append(np.array([np.median(np.abs(mono[whole:]))]))
    return np.concatenate(levels)


def _energy(x: np.ndarray) -> float:
    """Sum of squares (a BLAS dot: prepare's Ray tasks run BLAS on one thread, where it is the
    fastest way; elementwise temporaries would cost several passes)."""
    return float(np.dot(x, x))


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    return values if len(values) <= k else np.partition(values, len(values) - k)[-k:]


def _replan(streams: list[Stream], plan: _Plan, done: _Pass) -> _Plan:
    """The plan the first pass's measurements call for (the same plan when nothing changes)."""
    weights = list(plan.weights)
    for i, s in enumerate(streams):
        energies = done.channel_energy[i]
        if s.channels > 1 and energies.mean() > 0 and done.mono_energy[i] < CANCEL_RATIO * energies.mean():
            weights[i] = tuple(float(c == int(np.argmax(energies))) for c in range(s.channels))
    if weights != list(plan.weights):
        return _Plan(weights=tuple(weights))  # measure the level of the new down-mix first
    largest = np.sort(done.over)[::-1]
    typical = done.typical
    gain = 1.0
    for fraction in OUTLIER_FRACTIONS:
        allowed = max(MIN_OUTLIERS, int(done.frames * fraction))
        # what all but the allowed outliers stay under
        gain = 1.0 / float(largest[allowed]) if done.num_over > allowed else 1.0
        if typical is None or typical * gain >= 1.0 / PCM_SCALE:
            break
    return _Plan(weights=tuple(weights), gain=gain, typical=typical)


def _check_and_round(done: _Pass, audio: np.ndarray, sample_rate: int) -> np.ndarray | Rejected:
    """16-bit samples of ``audio``, or why storing them would destroy the signal."""
    if done.source_peak == 0.0:
        return Rejected(REASON_SILENT, "every sample is 0")
    level = _dbfs(done.mono_peak)
    if done.mono_peak * done.gain < 0.5 / PCM_SCALE:
        return Rejected(REASON_SIGNAL_LOST, f"too quiet to keep: it peaks at {level} dBFS, below the quietest "
                        "level 16-bit audio holds (-96 dBFS); stored, it would be silence")
    typical = done.typical
    if typical is not None:
        if typical * done.gain < 1.0 / PCM_SCALE <= typical:
            return Rejected(REASON_SIGNAL_LOST, f"its loudest samples are {_db(done.gain**-2)} dB above full scale "
                            f"(damaged float samples?); fitting them into 16 bits would leave the rest of it at "
                            f"{_dbfs(typical * done.gain)} dBFS, below what 16 bits hold")
    before = done.energy / max(1, done.frames)
    after = _energy(audio) / len(audio)
    if before > 0 and after < MIN_RESAMPLED_ENERGY * before:
        return Rejected(REASON_SIGNAL_LOST, f"its sound lies above {sample_rate / 2:g} Hz, which {sample_rate} Hz "
                        f"audio cannot hold: resampling kept {_db(after / before)} dB of its energy")
    allowed = max(MIN_OUTLIERS, int(len(audio) * OUTLIER_FRACTIONS[0]))
    if max(float(audio.max()), -float(audio.min())) > 1.0:  # resampler overshoot: fit all but a few, clip those
        size = np.abs(audio)
        above = size[size > 1.0]
        if len(above) > allowed:
            audio = audio / np.float32(np.sort(above)[::-1][allowed])
        audio = np.clip(audio, -1.0, 1.0)
    pcm = np.clip(np.rint(audio * PCM_SCALE), -PCM_SCALE, PCM_SCALE - 1).astype(np.int16)  # (num_samples,)
    error = pcm.astype(np.float32) * np.float32(1.0 / PCM_SCALE) - audio  # (num_samples,)
    signal, noise = _energy(audio), _energy(error)
    if not pcm.any() or (noise > 0 and signal < noise * 10 ** (MIN_SNR_DB / 10)):
        return Rejected(REASON_SIGNAL_LOST, f"too quiet for 16-bit audio: it peaks at {level} dBFS, and rounding to "
                        f"16 bits would leave {_db(signal / noise) if noise else '-inf'} dB of signal over the "
                        f"rounding noise (at least {MIN_SNR_DB:g} dB)")
    clipped_before = done.full_scale_in / max(1, done.frames)
    at_full_scale = _FULL_SCALE * PCM_SCALE
    clipped_after = 0.0
    if int(pcm.max()) >= at_full_scale or -int(pcm.min()) >= at_full_scale:
        clipped_after = float(np.count_nonzero(np.abs(pcm.astype(np.int32)) >= at_full_scale)) / len(pcm)
    if clipped_after - clipped_before > MAX_ADDED_CLIPPING:
        return Rejected(REASON_SIGNAL_LOST, f"converting would clip {100 * clipped_after:.1f}% of its samples "
                        f"(the input had {100 * clipped_before:.1f}% at full scale)")
    return pcm


def _dbfs(x: float) -> str:
    return "-inf" if x <= 0 else f"{20 * math.log10(x):.0f}"


def _db(ratio: float) -> str:
    return "-inf" if ratio <= 0 else f"{10 * math.log10(ratio):.0f}"


def _too_short(frames: int, rate: int, min_seconds: float) -> str:
    return f"{_floor(frames / rate, 3)} s ({frames} samples at {rate} Hz); at least {min_seconds:g} s"


def _floor(x: float, digits: int) -> str:
    """``x`` rounded down for a "less than" message: it never reads as the limit it missed."""
    return f"{math.floor(x * 10**digits) / 10**digits:.{digits}f}"


def _ceil(x: float, digits: int) -> str:
    """``x`` rounded up for a "more than" message."""
    return f"{math.ceil(x * 10**digits) / 10**digits:.{digits}f}"


_BYTES_PER_SAMPLE = {
    "PCM_S8": 1, "PCM_U8": 1, "ULAW": 1, "ALAW": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
}


def estimate_seconds(head: bytes, size: int) -> float | None:
    """Duration of a file from its first bytes and its size, or None when they cannot tell.

    For sizing shards only: PCM formats from the header's rate, channels and sample
    width; FLAC from its STREAMINFO (unless it leaves the length unknown, which libsndfile
    reports as 2^63 frames). Lossy formats need the whole file (None).
    """
    try:
        info = sf.info(io.BytesIO(head))
    except Exception:
        return None
    if info.samplerate <= 0 or info.channels <= 0:
        return None
    if info.format == "FLAC":
        return info.frames / info.samplerate if 0 < info.frames < 2**62 else None
    width = _BYTES_PER_SAMPLE.get(info.subtype)
    if width is None:
        return None
    return size / (info.samplerate * info.channels * width)


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
        got = read_into(snd, out)
    if got != length:
        raise ValueError(f"FLAC segment [{offset}, {offset + length}): got {got} samples")
    return out
