"""A hostile corpus: every class of input a new user's messy corpus brings, with the
verdict ``prepare`` owes each one.

- :func:`audio_cases` (a superset of :func:`pipeline.data.testing.bad_inputs`): file
  contents. Valid files in every format and odd layout must be accepted with their
  length and their signal (dominant frequency, a level above ``min_rms``); broken ones
  rejected with one of the listed reasons. The classes: formats and extensions;
  down-mixes that cancel; single absurd samples and float files far above full scale;
  quiet, near-silent, subnormal and ultrasonic input; chained Oggs; WAV streaming
  markers and malformed chunks; FLAC of unknown length; what ffmpeg reads and
  libsndfile does not; truncated, corrupt and non-audio files; lengths at the limits.
- :func:`name_cases`: file names, written the same way to a directory or an s3://
  prefix: stems shared across extensions, a file named ``.wav``, NFD names, odd
  characters, extensions in any case, files that are not audio.
- :func:`write_link_cases`: what only a local directory has: symbolic links (loops,
  duplicates, dangling, self), hard links, a named pipe, names that are not UTF-8.

Shipped with the package like ``bad_inputs()``, so any behaviour of the data path on
hostile input can be reproduced anywhere.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import testing as T
from pipeline.data import verdicts as V

RATE = 16000


def _ok(name: str, ext: str, data: bytes, seconds: float, freq: float = 440.0, *, tolerance: int = 0,
        min_rms: float = 0.1) -> T.Case:
    return T.Case(name, ext, data, num_samples=round(seconds * RATE), freq=freq, length_tolerance=tolerance,
                  min_rms=min_rms)


def _no(name: str, ext: str, data: bytes, *reasons: str) -> T.Case:
    return T.Case(name, ext, data, reasons=frozenset(reasons))


def _tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    return T.tone(seconds, rate, channels=channels, freq=freq, seed=seed)


def audio_cases() -> list[T.Case]:
    """Every file-content case; names are unique, extensions as a user would have them."""
    cases = T.bad_inputs() + _formats() + _levels() + _chains() + _layouts() + _broken()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


# --- formats and extensions: all accepted -------------------------------------------------------


def _formats() -> list[T.Case]:
    e = T.encode
    out = [
        _ok("wav_pcm16_16k", ".wav", e(_tone(1.0, 16000), 16000), 1.0),
        _ok("wav_pcm24_44k_stereo", ".wav", e(_tone(0.75, 44100, 523, 2), 44100, subtype="PCM_24"), 0.75, 523),
        _ok("wav_pcm32_48k", ".wav", e(_tone(0.5, 48000, 660), 48000, subtype="PCM_32"), 0.5, 660),
        _ok("wav_u8_8k", ".wav", e(_tone(1.0, 8000, 350), 8000, subtype="PCM_U8"), 1.0, 350),
        _ok("wav_float_22k", ".wav", e(_tone(1.0, 22050, 400), 22050, subtype="FLOAT"), 1.0, 400),
        _ok("wav_double_32k", ".wav", e(_tone(0.5, 32000, 1200), 32000, subtype="DOUBLE"), 0.5, 1200),
        _ok("wav_ulaw_8k", ".wav", e(_tone(1.0, 8000, 300), 8000, subtype="ULAW"), 1.0, 300),
        _ok("wav_alaw_8k", ".wav", e(_tone(1.0, 8000, 310), 8000, subtype="ALAW"), 1.0, 310),
        _ok("wav_pcm16_11k", ".wav", e(_tone(1.0, 11025, 720), 11025), 1.0, 720),
        _ok("wav_6ch_48k", ".wav", e(_tone(0.5, 48000, 880, 6), 48000), 0.5, 880),
        _ok("wavex_24k", ".wav", e(_tone(1.0, 24000, 450), 24000, "WAVEX"), 1.0, 450),
        _ok("wav_ima_adpcm", ".wav", e(_tone(1.0, 16000, 500), 16000, subtype="IMA_ADPCM"), 1.0, 500, tolerance=400),
        _ok("wav_gsm610_8k", ".wav", e(_tone(1.0, 8000, 500), 8000, subtype="GSM610"), 1.0, 500, tolerance=800),
        _ok("flac_16k", ".flac", e(_tone(1.0, 16000, 500), 16000, "FLAC"), 1.0, 500),
        _ok("flac_8bit", ".flac", e(_tone(1.0, 16000, 610), 16000, "FLAC", "PCM_S8"), 1.0, 610),
        _ok("flac_48k", ".flac", e(_tone(0.5, 48000, 2000), 48000, "FLAC"), 0.5, 2000),
        _ok("ogg_vorbis_16k_stereo", ".ogg", e(_tone(1.0, 16000, 330, 2), 16000, "OGG", "VORBIS"), 1.0, 330),
        _ok("oga_vorbis_22k", ".oga", e(_tone(1.0, 22050, 370), 22050, "OGG", "VORBIS"), 1.0, 370),
        _ok("opus_48k", ".opus", e(_tone(1.0, 48000, 420), 48000, "OGG", "OPUS"), 1.0, 420),
        _ok("opus_16k_in_ogg", ".ogg", e(_tone(1.0, 16000, 430), 16000, "OGG", "OPUS"), 1.0, 430),
        _ok("mp3_16k", ".mp3", e(_tone(1.0, 16000, 460), 16000, "MP3", "MPEG_LAYER_III"), 1.0, 460),
        _ok("mp3_44k_stereo", ".mp3", e(_tone(1.0, 44100, 470, 2), 44100, "MP3", "MPEG_LAYER_III"), 1.0, 470),
        _ok("mp3_8k", ".mp3", e(_tone(1.0, 8000, 480), 8000, "MP3", "MPEG_LAYER_III"), 1.0, 480),
        _ok("aiff_pcm16", ".aiff", e(_tone(1.0, 22050, 490), 22050, "AIFF"), 1.0, 490),
        _ok("aif_float", ".aif", e(_tone(1.0, 16000, 510), 16000, "AIFF", "FLOAT"), 1.0, 510),
        _ok("aifc_pcm16", ".aifc", e(_tone(1.0, 16000, 515), 16000, "AIFF"), 1.0, 515),
        _ok("au_pcm16", ".au", e(_tone(1.0, 8000, 520), 8000, "AU"), 1.0, 520),
        _ok("snd_ulaw", ".snd", e(_tone(1.0, 8000, 530), 8000, "AU", "ULAW"), 1.0, 530),
        _ok("caf_pcm16", ".caf", e(_tone(1.0, 16000, 540), 16000, "CAF"), 1.0, 540),
        _ok("caf_alac", ".caf", e(_tone(1.0, 16000, 550), 16000, "CAF", "ALAC_16"), 1.0, 550),
        _ok("w64_pcm16", ".w64", e(_tone(1.0, 16000, 560), 16000, "W64"), 1.0, 560),
        _ok("rf64_pcm24", ".rf64", e(_tone(1.0, 16000, 570), 16000, "RF64", "PCM_24"), 1.0, 570),
        _ok("sph_nist", ".sph", e(_tone(1.0, 16000, 580), 16000, "NIST"), 1.0, 580),
        _ok("nist_nist", ".nist", e(_tone(1.0, 8000, 590), 8000, "NIST"), 1.0, 590),
        _ok("voc_u8", ".voc", e(_tone(1.0, 8000, 600), 8000, "VOC", "PCM_U8"), 1.0, 600),  # VOC stores 8 kHz exactly
        _ok("upper_ext", ".WAV", e(_tone(1.0, 16000, 620), 16000), 1.0, 620),
        _ok("mixed_case_ext", ".Flac", e(_tone(1.0, 16000, 630), 16000, "FLAC"), 1.0, 630),
        _ok("wave_ext", ".wave", e(_tone(1.0, 16000, 640), 16000), 1.0, 640),
        # ffmpeg reads what libsndfile does not: AAC in ADTS frames, named as MP3 by a
        # download tool (AAC adds its 1024-sample priming and pads the last frame).
        _ok("aac_named_mp3", ".mp3", _aac(_tone(1.0, 16000, 650)[:, 0], 16000), 1.0, 650, tolerance=2100),
    ]
    return out


def _aac(x: np.ndarray, rate: int) -> bytes:
    """AAC in ADTS frames (what ``ffmpeg -c:a aac out.aac`` writes), through PyAV."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="adts") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(x[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


# --- levels: what conversion must not destroy -------------------------------------------------


def _levels() -> list[T.Case]:
    e = T.encode
    t = _tone(1.0, 16000, 300)
    t44 = _tone(1.0, 44100, 350)

    def spiked(x: np.ndarray, at: list[int], value: float, dtype: type = np.float32) -> np.ndarray:
        y = x.astype(dtype)
        y[at, 0] = value
        return y

    anti = np.concatenate([t, -t], axis=1)
    noisy = np.random.default_rng(3).standard_normal((16000, 2)).astype(np.float32) * 0.02
    quad = np.concatenate([t, t, -t, -t], axis=1)
    return [
        # down-mixes that cancel: the loudest channel is kept
        _ok("antiphase_pcm16", ".wav", e(anti, 16000), 1.0, 300),
        _ok("antiphase_float", ".wav", e(anti, 16000, subtype="FLOAT"), 1.0, 300),
        _ok("antiphase_flac24", ".flac", e(anti, 16000, "FLAC", "PCM_24"), 1.0, 300),
        _ok("antiphase_partial", ".wav", e(np.concatenate([t, -0.9 * t], axis=1), 16000), 1.0, 300),
        _ok("antiphase_noisy", ".wav", e(anti + noisy, 16000), 1.0, 300),
        _ok("antiphase_quad", ".wav", e(quad, 16000), 1.0, 300),
        _ok("antiphase_44k", ".wav", e(np.concatenate([t44, -t44], axis=1), 44100), 1.0, 350),
        _ok("one_silent_channel", ".wav", e(np.concatenate([t, 0 * t], axis=1), 16000), 1.0, 300),
        # single absurd samples are clicks, not a gain that silences the rest
        _ok("spike_1e30", ".wav", e(spiked(t, [5000], 1e30), 16000, subtype="FLOAT"), 1.0, 300),
        _ok("spike_1e6_44k", ".wav", e(spiked(t44, [20000], 1e6), 44100, subtype="FLOAT"), 1.0, 350),
        _ok("spike_stereo", ".wav", e(spiked(np.concatenate([t, t], axis=1), [9000], 1e12), 16000,
                                      subtype="FLOAT"), 1.0, 300),
        _ok("spike_first_sample", ".wav", e(spiked(t, [0], 3e9), 16000, subtype="FLOAT"), 1.0, 300),
        _ok("spike_last_sample", ".wav", e(spiked(t, [15999], -3e9), 16000, subtype="FLOAT"), 1.0, 300),
        _ok("spikes_five", ".wav", e(spiked(t, [100, 3000, 7000, 9000, 12000], 1e20), 16000, subtype="FLOAT"),
            1.0, 300),
        _ok("spike_negative", ".wav", e(spiked(t, [8000], -1e35), 16000, subtype="FLOAT"), 1.0, 300),
        _ok("spikes_scattered_20", ".wav", e(spiked(t, list(range(50, 16000, 800)), 1e30), 16000, subtype="FLOAT"),
            1.0, 300),
        _ok("loud_with_ten_spikes", ".wav", e(spiked(t * 1e5, list(range(100, 110)), 1e25), 16000, subtype="FLOAT"),
            1.0, 300),
        # not a few samples: a gain that fits them would leave the rest below 16 bits
        _no("spikes_every_40_samples", ".wav", e(spiked(t, list(range(5, 16000, 40)), 1e30), 16000, subtype="FLOAT"),
            V.REASON_SIGNAL_LOST),
        _no("burst_of_absurd_values", ".wav", e(np.concatenate([t[:8000], t[8000:9600] * 1e10, t[9600:]]), 16000,
                                                subtype="FLOAT"), V.REASON_SIGNAL_LOST),
        _ok("spike_double_1e300", ".wav", e(spiked(t, [4000], 1e300, np.float64), 16000, subtype="DOUBLE"),
            1.0, 300),
        # far above full scale, but finite: scaled to fit
        _ok("loud_float_x1e10", ".wav", e(t * 1e10, 16000, subtype="FLOAT"), 1.0, 300),
        _ok("float32_near_max", ".wav", e((t / np.abs(t).max() * np.float32(3.4e38)).astype(np.float32), 16000,
                                          subtype="FLOAT"), 1.0, 300),
        _ok("float32_near_max_stereo_44k", ".wav",
            e((np.concatenate([t44, t44], axis=1) / np.abs(t44).max() * np.float32(3.4e38)).astype(np.float32),
              44100, subtype="FLOAT"), 1.0, 350),
        _ok("double_1e300", ".wav", e(t.astype(np.float64) * 1e300, 16000, subtype="DOUBLE"), 1.0, 300),
        _ok("double_loud_and_spike", ".wav", e(spiked(t * 1e5, [100], 1e200, np.float64), 16000, subtype="DOUBLE"),
            1.0, 300),
        _ok("float_slightly_over", ".wav", e(t * 2.4, 16000, subtype="FLOAT"), 1.0, 300),
        _ok("loud_antiphase_float", ".wav", e(anti * 1e8, 16000, subtype="FLOAT"), 1.0, 300),
        _ok("clipped_int16", ".wav", e(np.clip(t * 6, -1, 1), 16000), 1.0, 300),
        _ok("square_full_scale_44k", ".wav", e(np.sign(t44 + 1e-9) * 0.99997, 44100), 1.0, 350),
        _ok("dc_offset", ".wav", e(t * 0.5 + 0.4, 16000), 1.0, 300),
        # quiet but within 16 bits: kept
        _ok("quiet_float_44k", ".wav", e(t44 * 2e-3, 44100, subtype="FLOAT"), 1.0, 350, min_rms=5e-4),
        _ok("quiet_int16_few_lsb", ".wav", e(np.round(t * 6) / 32768, 16000), 1.0, 300, min_rms=5e-5),
        # below what 16-bit audio holds: stored it would be silence
        _no("near_silent_float", ".wav", e(t * 2e-5, 16000, subtype="FLOAT"), V.REASON_SIGNAL_LOST),
        _no("near_silent_float_44k", ".wav", e(t44 * 6e-6, 44100, subtype="FLOAT"), V.REASON_SIGNAL_LOST),
        _no("subnormal_float", ".wav", e((t * 1e-39).astype(np.float32), 16000, subtype="FLOAT"),
            V.REASON_SIGNAL_LOST),
        _no("tiny_double", ".wav", e(t.astype(np.float64) * 1e-300, 16000, subtype="DOUBLE"), V.REASON_SIGNAL_LOST),
        _no("pcm24_minus_110db", ".wav", e(t * 6e-6, 16000, subtype="PCM_24"), V.REASON_SIGNAL_LOST),
        # all of its sound above 8 kHz: resampling to 16 kHz would leave nothing
        _no("ultrasonic_20k_at_48k", ".wav", e(_tone(1.0, 48000, 20000), 48000), V.REASON_SIGNAL_LOST),
        _no("ultrasonic_12k_at_44k", ".flac", e(_tone(1.0, 44100, 12000), 44100, "FLAC"), V.REASON_SIGNAL_LOST),
        _ok("in_band_7k_at_48k", ".wav", e(_tone(1.0, 48000, 7000), 48000), 1.0, 7000),
        # digital silence and non-finite samples
        _no("zeros_float", ".wav", e(np.zeros((16000, 1), np.float32), 16000, subtype="FLOAT"), V.REASON_SILENT),
        _no("zeros_stereo", ".wav", e(np.zeros((16000, 2), np.float32), 16000), V.REASON_SILENT),
        _no("zeros_flac", ".flac", e(np.zeros((16000, 1), np.float32), 16000, "FLAC"), V.REASON_SILENT),
        _no("nan_in_channel_two", ".wav", e(spiked(np.concatenate([t, t], axis=1)[:, ::-1], [700], np.nan)[:, ::-1],
                                            16000, subtype="FLOAT"), V.REASON_NON_FINITE),
        _no("inf_at_end", ".wav", e(spiked(t, [15999], np.inf), 16000, subtype="FLOAT"), V.REASON_NON_FINITE),
    ]


# --- chained Oggs: every link kept ----------------------------------------------------------------


def _chains() -> list[T.Case]:
    e = T.encode
    v16 = e(_tone(1.0, 16000, 300), 16000, "OGG", "VORBIS")
    v16b = e(_tone(0.5, 16000, 300, seed=1), 16000, "OGG", "VORBIS")
    v22s = e(_tone(1.5, 22050, 600, 2), 22050, "OGG", "VORBIS")
    o48 = e(_tone(0.5, 48000, 300), 48000, "OGG", "OPUS")
    v44m = e(_tone(0.5, 44100, 800), 44100, "OGG", "VORBIS")
    v44s = e(_tone(1.0, 44100, 800, 2), 44100, "OGG", "VORBIS")
    quarter = [e(_tone(0.25, 16000, 900, seed=i), 16000, "OGG", "VORBIS") for i in range(4)]
    broken = bytearray(v22s)
    for p in np.random.default_rng(4).integers(len(broken) // 3, 2 * len(broken) // 3, 60):
        broken[p] ^= 0x5A
    return [
        _ok("chain_vorbis_two", ".ogg", v16 + v16b, 1.5, 300, tolerance=2),
        _ok("chain_three_codecs_rates", ".ogg", v16 + v22s + o48, 3.0, 600, tolerance=3),
        _ok("chain_opus_two", ".opus", o48 + o48, 1.0, 300, tolerance=2),
        _ok("chain_four_short", ".ogg", b"".join(quarter), 1.0, 900, tolerance=4),
        _ok("chain_mono_then_stereo_44k", ".oga", v44m + v44s, 1.5, 800, tolerance=2),
        _no("chain_link_two_corrupt", ".ogg", v16 + bytes(broken), V.REASON_DECODE_ERROR, V.REASON_TRUNCATED),
        _no("chain_link_two_cut", ".ogg", v16 + v22s[: len(v22s) // 2], V.REASON_DECODE_ERROR, V.REASON_TRUNCATED),
    ]


# --- odd but valid layouts: WAV chunks, streaming markers, FLAC of unknown length ---------------------


def _chunk(cid: bytes, payload: bytes, pad: bool = True) -> bytes:
    return cid + struct.pack("<I", len(payload)) + payload + (b"\0" if pad and len(payload) % 2 else b"")


def _riff(*chunks: bytes, size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if size is None else size) + body


def _patch32(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset:offset + 4] = struct.pack("<I", value)
    return bytes(out)


def _layouts() -> list[T.Case]:
    e = T.encode
    wav = e(_tone(1.0, 16000, 700), 16000)
    fmt, data = wav[12:36], wav[36:]  # the 'fmt ' chunk and the 'data' chunk of a plain 44-byte-header WAV
    stereo24 = e(_tone(0.75, 44100, 710, 2), 44100, subtype="PCM_24")
    flt = e(_tone(1.0, 16000, 720), 16000, subtype="FLOAT")  # has a 'fact' chunk: data size at 76
    flt_data = flt.index(b"data") + 4
    wavex = e(_tone(1.0, 16000, 730), 16000, "WAVEX")
    wavex_data = wavex.index(b"data") + 4
    info = _chunk(b"LIST", b"INFOICMT" + struct.pack("<I", 20) + b"metadata and a data\0")
    rf64 = e(_tone(1.0, 16000, 760), 16000, "RF64")
    ds64 = rf64.index(b"ds64") + 16  # ds64 payload: RIFF size (8 bytes), then the data size
    aiff = e(_tone(1.0, 16000, 770), 16000, "AIFF")
    au = e(_tone(1.0, 8000, 780), 8000, "AU")
    return [
        _ok("rf64_ds64_size_zero", ".wav", rf64[:ds64] + bytes(8) + rf64[ds64 + 8:], 1.0, 760),
        _no("rf64_cut", ".rf64", rf64[: len(rf64) * 3 // 4], V.REASON_TRUNCATED),
        _ok("aiff_ssnd_size_zero", ".aiff", _patch32(aiff, aiff.index(b"SSND") + 4, 0), 1.0, 770),
        _ok("au_size_unknown", ".au", au[:8] + b"\xff\xff\xff\xff" + au[12:], 1.0, 780),
        _ok("marker_data_ffffffff", ".wav", _patch32(wav, 40, 0xFFFFFFFF), 1.0, 700),
        _ok("marker_data_zero", ".wav", _patch32(wav, 40, 0), 1.0, 700),
        _ok("marker_riff_and_data_ffffffff", ".wav", _patch32(_patch32(wav, 40, 0xFFFFFFFF), 4, 0xFFFFFFFF), 1.0, 700),
        _ok("marker_riff_and_data_zero", ".wav", _patch32(_patch32(wav, 40, 0), 4, 0), 1.0, 700),
        _ok("marker_riff_only", ".wav", _patch32(wav, 4, 0), 1.0, 700),
        _ok("marker_stereo_pcm24", ".wav", _patch32(stereo24, 40, 0xFFFFFFFF), 0.75, 710),
        _ok("marker_float_with_fact", ".wav", _patch32(flt, flt_data, 0), 1.0, 720),
        _ok("marker_wavex", ".wav", _patch32(wavex, wavex_data, 0xFFFFFFFF), 1.0, 730),
        _ok("flac_length_unknown", ".flac", T.flac_declaring(_tone(1.0, 16000, 740), 16000, 0), 1.0, 740),
        _ok("flac_length_unknown_44k_stereo", ".flac",
            T.flac_declaring(_tone(1.0, 44100, 750, 2), 44100, 0), 1.0, 750),
        _ok("chunk_unknown_before_data", ".wav", _riff(fmt, _chunk(b"abcd", b"x" * 13), data), 1.0, 700),
        _ok("chunk_odd_without_pad", ".wav", _riff(fmt, _chunk(b"abcd", b"xyz", pad=False), data), 1.0, 700),
        _ok("chunk_list_overshoots", ".wav", _riff(fmt, b"LIST" + struct.pack("<I", 100) + b"INFOxx", data), 1.0, 700),
        _ok("chunk_junk_past_end", ".wav", _riff(fmt, b"junk" + struct.pack("<I", 0x7FFFFFFF) + b"zz", data), 1.0, 700),
        _ok("chunk_after_data", ".wav", _riff(fmt, data, _chunk(b"id3 ", b"ID3" + bytes(30))), 1.0, 700),
        _ok("chunk_fmt_after_data", ".wav", _riff(data, fmt), 1.0, 700),
        _ok("chunk_bext_ixml", ".wav", _riff(_chunk(b"bext", bytes(602)), fmt, _chunk(b"iXML", b"<BWFXML/>"), data),
            1.0, 700),
        _ok("chunk_list_with_word_data", ".wav",
            _riff(fmt, info[:4] + struct.pack("<I", 500) + info[8:], data), 1.0, 700),
        _ok("chunk_riff_size_wrong", ".wav", _riff(fmt, data, size=12345), 1.0, 700),
        _ok("trailing_garbage", ".wav", wav + b"\x00garbage after the audio" * 3, 1.0, 700),
    ]


# --- broken, and at the limits -------------------------------------------------------------------


def _broken() -> list[T.Case]:
    e = T.encode
    wav = e(_tone(1.0, 16000, 800), 16000)
    flac = e(_tone(1.0, 16000, 800), 16000, "FLAC")
    ogg = e(_tone(1.0, 16000, 800), 16000, "OGG", "VORBIS")
    opus = e(_tone(1.0, 48000, 800), 48000, "OGG", "OPUS")
    pcm24 = e(_tone(1.0, 16000, 800), 16000, subtype="PCM_24")
    unreadable = V.REASON_UNREADABLE
    return [
        _no("text_as_mp3", ".mp3", b"Lorem ipsum dolor sit amet\n" * 200, unreadable),
        _no("html_error_page", ".wav", b"<html><body><h1>404 Not Found</h1></body></html>\n" * 20, unreadable),
        _no("zip_as_flac", ".flac", b"PK\x03\x04" + bytes(26) + b"corpus/a.wav" + bytes(500), unreadable),
        _no("png_as_ogg", ".ogg", b"\x89PNG\r\n\x1a\n" + bytes(400), unreadable),
        _no("random_as_mp3", ".mp3", np.random.default_rng(5).bytes(20000), unreadable),
        _no("one_byte", ".wav", b"R", unreadable),
        _no("wav_cut_at_10", ".wav", wav[:10], unreadable),
        _no("wav_cut_at_30", ".wav", wav[:30], unreadable),
        _no("wav_cut_at_90_percent", ".wav", wav[: int(len(wav) * 0.9)], V.REASON_TRUNCATED),
        _no("pcm24_cut_mid_sample", ".wav", pcm24[: len(pcm24) // 2 + 1], V.REASON_TRUNCATED),
        _no("flac_streaminfo_only", ".flac", flac[:42], V.REASON_NO_SAMPLES, V.REASON_DECODE_ERROR,
            V.REASON_TRUNCATED, unreadable),
        _no("ogg_cut_in_half", ".ogg", ogg[: len(ogg) // 2], V.REASON_TRUNCATED, V.REASON_DECODE_ERROR),
        _no("opus_cut_in_half", ".opus", opus[: len(opus) // 2], V.REASON_TRUNCATED, V.REASON_DECODE_ERROR),
        _no("id3_tag_only", ".mp3", b"ID3\x04\x00\x00\x00\x00\x00\x10" + bytes(16), unreadable, V.REASON_NO_SAMPLES),
        _no("rate_1000", ".wav", e(_tone(1.0, 1000), 1000), V.REASON_BAD_SAMPLE_RATE),
        _no("rate_zero", ".wav", _patch32(wav, 24, 0), V.REASON_BAD_SAMPLE_RATE, unreadable),
        _no("rate_1mhz", ".wav", _patch32(_patch32(wav, 24, 1_000_000), 28, 2_000_000), V.REASON_BAD_SAMPLE_RATE,
            unreadable),
        _no("zero_channels", ".wav", wav[:22] + b"\0\0" + wav[24:], unreadable),
        _no("just_short_16k", ".wav", e(_tone(1599 / 16000, 16000), 16000), V.REASON_TOO_SHORT),
        _ok("just_long_enough_16k", ".wav", e(_tone(0.1, 16000), 16000), 0.1),
        _no("just_short_44k", ".wav", e(_tone(4405 / 44100, 44100), 44100), V.REASON_TOO_SHORT),
        _ok("just_long_enough_44k", ".wav", e(_tone(0.1, 44100), 44100), 0.1),
        _no("flac_declares_two_hours", ".flac", T.flac_declaring(_tone(1.0, 16000), 16000, 16000 * 7200),
            V.REASON_TOO_LONG),
        _no("empty_flac", ".flac", b"", V.REASON_EMPTY_FILE),
        _no("silent_int16_44k", ".wav", e(np.zeros((44100, 2), np.float32), 44100), V.REASON_SILENT),
    ]


# --- names (any store) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NameCase:
    """A file under the input root and what becomes of it."""

    rel: str
    data: bytes
    id: str | None = None
    """Accepted: the id it must get; None: not an audio file (counted by extension)."""
    transcript: str | None = None
    """Accepted: the transcript the sidecar gives it."""


def name_cases() -> list[NameCase]:
    """Names that have confused ids, listings and sidecars; the same on disk and on S3. The
    sidecar for them is :func:`name_sidecar`."""
    e = T.encode

    def wav(freq: float) -> bytes:
        return e(_tone(0.5, 16000, freq), 16000)

    nfd = "names/cafe\u0301-nfd.wav"  # "café" as macOS writes it (e + combining acute)
    return [
        NameCase("names/a/y.wav", wav(1000), id="names/a/y.wav", transcript="y as wav"),
        NameCase("names/a/y.flac", e(_tone(0.5, 16000, 1010), 16000, "FLAC"), id="names/a/y.flac",
                 transcript="y as flac"),
        NameCase("names/a/y.wav.ogg", e(_tone(0.5, 16000, 1020), 16000, "OGG", "VORBIS"), id="names/a/y.wav.ogg",
                 transcript="y as ogg"),
        NameCase("names/.wav", wav(1030), id="names/.wav", transcript="only an extension"),
        NameCase("names/b/.flac", e(_tone(0.5, 16000, 1040), 16000, "FLAC"), id="names/b/.flac"),
        NameCase("names/UPPER.WAV", wav(1050), id="names/UPPER", transcript="upper"),
        NameCase("names/with space.wav", wav(1060), id="names/with space", transcript="with a space"),
        NameCase("names/ñandú-nfc.wav", wav(1070), id="names/ñandú-nfc", transcript="nfc name"),
        NameCase(nfd, wav(1080), id="names/caf\u00e9-nfd", transcript="nfd name, nfc row"),
        NameCase("names/emoji-🎤.wav", wav(1090), id="names/emoji-🎤"),
        NameCase("names/hash#percent%20.wav", wav(1100), id="names/hash#percent%20", transcript="odd characters"),
        NameCase("names/take.wav/inner.wav", wav(1110), id="names/take.wav/inner"),
        NameCase("names/" + "long" * 45 + ".wav", wav(1120), id="names/" + "long" * 45),
        NameCase("names/x.wav.txt", b"not audio"),
        NameCase("names/readme.md", b"# corpus"),
        NameCase("names/notes", b"no extension"),
        NameCase("names/.DS_Store", b"\0\0\0\1Bud1"),
        NameCase("names/TextGrid/y.TextGrid", b"File type"),
    ]


def name_sidecar() -> bytes:
    """The sidecar of :func:`name_cases` as a spreadsheet saves it: UTF-8 with a byte-order
    mark, CRLF line ends, a quoted cell, keys by path and by id (one in NFC for a file named
    in NFD), a repeated key and rows that match no file."""
    rows = [
        "path\ttranscript\tspeaker",
        "names/a/y.wav\ty as wav\ts1",
        "names/a/y.flac\ty as flac\ts1",
        "names/a/y.wav.ogg\ty as ogg\ts1",
        "names/.wav\tonly an extension\ts2",
        "./names/UPPER.WAV\tupper\ts2",
        "names/with space.wav\t\"with a space\"\ts2",
        "names/ñandú-nfc.wav\tnfc name\ts3",
        "names/caf\u00e9-nfd.wav\tnfd name, nfc row\ts3",
        "names/hash#percent%20.wav\todd characters\ts3",
        "names/a/y.wav\ta repeated row\ts9",
        "names/missing.wav\tno such file\ts4",
        "names/a/y\tthe old id of a file that now shares its stem\ts4",
    ]
    return "\ufeff".encode() + "\r\n".join(rows).encode() + b"\r\n"


NAME_SIDECAR_UNMATCHED = 2
NAME_SIDECAR_DUPLICATE = 1


# --- what only a local directory has --------------------------------------------------------------


def write_link_cases(root: Path, outside: Path) -> dict[str, str | None]:
    """Links, a pipe and names that are not UTF-8 under ``root/links`` (``outside`` is a
    directory out of the root, for a link that leaves it). Returns each audio path (relative
    to ``root``, as the rejects table shows it) -> the reason it is rejected for, or None when
    it must be accepted. Also makes a directory loop and a second link to one directory,
    which the listing walks once."""
    base = root / "links"
    (base / "real").mkdir(parents=True)
    tone = T.encode(_tone(0.5, 16000, 1200), 16000)
    (base / "real" / "a.wav").write_bytes(tone)
    (base / "real" / "b.flac").write_bytes(T.encode(_tone(0.5, 16000, 1210), 16000, "FLAC"))
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "o.wav").write_bytes(T.encode(_tone(0.5, 16000, 1220), 16000))
    os.symlink(".", base / "loop")  # links/loop/loop/... would list real/a.wav forever
    os.symlink("real", base / "alias")  # a second path to links/real
    os.symlink("real/a.wav", base / "ln.wav")
    os.link(base / "real" / "a.wav", base / "real" / "hard-copy.wav")  # one file, two real paths
    os.symlink("nowhere.wav", base / "dangling.wav")
    os.symlink("self.wav", base / "self.wav")
    os.symlink("nowhere.txt", base / "dangling.txt")
    os.symlink(outside / "o.wav", base / "outside.wav")
    os.mkfifo(base / "pipe.wav")
    os.mkdir(os.fsencode(base) + b"/dir-\xff")
    (Path(os.fsdecode(os.fsencode(base) + b"/dir-\xff")) / "x.wav").write_bytes(tone)
    with open(os.fsencode(base) + b"/caf\xe9-latin1.wav", "wb") as f:
        f.write(tone)
    return {
        "links/real/a.wav": None,
        "links/real/b.flac": None,
        "links/outside.wav": None,
        "links/ln.wav": V.REASON_DUPLICATE,
        "links/real/hard-copy.wav": V.REASON_DUPLICATE,
        "links/dangling.wav": V.REASON_BROKEN_LINK,
        "links/self.wav": V.REASON_BROKEN_LINK,
        "links/pipe.wav": V.REASON_NOT_A_FILE,
        "links/dir-\\xff/x.wav": V.REASON_BAD_NAME,
        "links/caf\\xe9-latin1.wav": V.REASON_BAD_NAME,
    }
