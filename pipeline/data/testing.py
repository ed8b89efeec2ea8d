"""Audio dummies for tests and benchmarks: clean tones and every kind of bad file.

Shipped with the package (not hidden in tests/) so the prepare job's behaviour on bad
input can be reproduced anywhere: ``bad_inputs()`` gives each case with the outcome
the data path promises for it (:mod:`pipeline.data.hostile` has the whole hostile
corpus built on it).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile as sf

from pipeline.data import audio as A


def tone(seconds: float, rate: int, *, channels: int = 1, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A sine at ``freq`` with a little noise, shape (frames, channels), peak about 0.5."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    x = 0.5 * np.sin(2 * np.pi * freq * t)[:, None] + 0.01 * rng.standard_normal((n, channels))
    return x.astype(np.float32)  # (frames, channels)


def encode(audio: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def flac_declaring(audio: np.ndarray, rate: int, declared_frames: int) -> bytes:
    """A FLAC whose STREAMINFO claims ``declared_frames`` (a lying header)."""
    data = bytearray(encode(audio, rate, "FLAC"))
    # STREAMINFO starts after "fLaC" + 4-byte block header; total samples is its 36-bit
    # field after min/max block (16+16), min/max frame (24+24), rate (20), channels (3), bits (5).
    start, nbits = 8, 144
    shift = nbits - (16 + 16 + 24 + 24 + 20 + 3 + 5) - 36
    value = int.from_bytes(data[start:start + 18], "big")
    value = (value & ~(((1 << 36) - 1) << shift)) | ((declared_frames & ((1 << 36) - 1)) << shift)
    data[start:start + 18] = value.to_bytes(18, "big")
    return bytes(data)


@dataclass(frozen=True)
class Case:
    """One input file and what prepare must do with it."""

    name: str
    ext: str
    data: bytes
    reasons: frozenset[str] = frozenset()
    """Accepted reject reasons; empty: the file must be accepted."""
    num_samples: int = 0
    """Accepted files: the expected length at 16 kHz."""
    freq: float = 0.0
    """Accepted files: the dominant frequency the converted audio must keep."""
    length_tolerance: int = 0
    """Accepted files: how far the length may be from ``num_samples`` (codec priming and padding)."""
    min_rms: float = 0.1
    """Accepted files: the level the stored audio must keep (its signal survived)."""

    @property
    def accepted(self) -> bool:
        return not self.reasons


def bad_inputs() -> list[Case]:
    """Every bad-input class of the data path's promise, plus awkward files that must pass."""
    clean = tone(2.0, 16000)
    wav = encode(clean, 16000)
    flac = encode(clean, 16000, "FLAC")
    mp3 = encode(clean, 16000, "MP3", "MPEG_LAYER_III")
    flipped = bytearray(flac)
    for p in np.random.default_rng(1).integers(len(flac) // 3, 2 * len(flac) // 3, 40):
        flipped[p] ^= 0xFF
    nan = clean.copy()
    nan[1000, 0] = np.nan
    inf = clean.copy()
    inf[5, 0] = np.inf
    return [
        Case("zero_length", ".wav", b"", frozenset({A.REASON_EMPTY_FILE})),
        Case("header_only", ".wav", wav[:44], frozenset({A.REASON_NO_SAMPLES})),
        Case("not_audio", ".flac", b"this is a text file, not audio\n" * 40, frozenset({A.REASON_UNREADABLE})),
        Case("random_bytes", ".wav", np.random.default_rng(2).bytes(30000), frozenset({A.REASON_UNREADABLE})),
        Case("corrupt_flac", ".flac", bytes(flipped), frozenset({A.REASON_DECODE_ERROR, A.REASON_TRUNCATED})),
        Case("truncated_wav", ".wav", wav[: len(wav) // 2], frozenset({A.REASON_TRUNCATED})),
        Case("truncated_flac", ".flac", flac[: len(flac) // 2], frozenset({A.REASON_DECODE_ERROR, A.REASON_TRUNCATED})),
        Case("truncated_mp3", ".mp3", mp3[: len(mp3) // 2], frozenset({A.REASON_TRUNCATED, A.REASON_DECODE_ERROR})),
        Case("nan_samples", ".wav", encode(nan, 16000, subtype="FLOAT"), frozenset({A.REASON_NON_FINITE})),
        Case("inf_samples", ".wav", encode(inf, 16000, subtype="DOUBLE"), frozenset({A.REASON_NON_FINITE})),
        Case("absurd_long", ".flac", flac_declaring(clean, 16000, 16000 * 3600 * 100), frozenset({A.REASON_TOO_LONG})),
        Case("absurd_rate", ".wav", encode(clean[:2000], 1), frozenset({A.REASON_BAD_SAMPLE_RATE})),
        Case("absurd_short", ".wav", encode(clean[:10], 16000), frozenset({A.REASON_TOO_SHORT})),
        Case("silent", ".wav", encode(np.zeros((16000, 1), np.float32), 16000), frozenset({A.REASON_SILENT})),
        Case("eight_channels", ".wav", encode(tone(1.5, 16000, channels=8, freq=300), 16000), num_samples=24000, freq=300),
        Case("rate_8k", ".wav", encode(tone(1.25, 8000, freq=500), 8000), num_samples=20000, freq=500),
        Case("rate_96k_stereo", ".flac", encode(tone(1.5, 96000, channels=2, freq=1000), 96000, "FLAC", "PCM_24"),
             num_samples=24000, freq=1000),
        Case("rate_44k_ogg", ".ogg", encode(tone(1.0, 44100, freq=700), 44100, "OGG", "VORBIS"),
             num_samples=16000, freq=700),
        Case("loud_float", ".wav", encode(4.0 * tone(1.0, 16000, freq=250), 16000, subtype="FLOAT"),
             num_samples=16000, freq=250),
    ]


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    """Frequency (Hz) of the largest FFT bin of a 1-D signal, its DC offset aside."""
    spectrum = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def drain(shard: Any, cfg: Any, *, max_batches: int | None = None, position: dict | None = None) -> dict[str, Any]:
    """Consume a training-input shard the way a Ray Train worker does, and report it.

    Runs inside a Ray task in tests and benchmarks (``ray.remote(drain)``). Per batch:
    its key, ids, lengths, width, whether it had padding, per-item sums of the
    delivered samples (to compare content with the shards), and the languages it carried
    (None on a monolingual split). Stops after
    ``max_batches`` like a run reaching its step limit.
    """
    from pipeline.data.loader import iter_train_batches
    from pipeline.data.position import DataPosition

    pos = DataPosition()
    records = []
    for batch in iter_train_batches(shard, cfg, position=position):
        if max_batches is not None and len(records) >= max_batches:
            break
        pos.update(batch)
        n = batch["num_samples"]
        records.append({
            "key": (int(batch["epoch"]), int(batch["shard"]), int(batch["batch_index"])),
            "ids": batch["ids"].tolist(),
            "num_samples": n.tolist(),
            "width": int(batch["source"].shape[1]),
            "padded": bool(batch["padding_mask"].any()),
            "mask_ok": bool((batch["padding_mask"].sum(axis=1) == batch["source"].shape[1] - n).all()),
            "sums": [float(batch["source"][i, : n[i]].sum(dtype=np.float64)) for i in range(len(n))],
            "languages": batch["languages"].tolist() if "languages" in batch else None,
        })
    return {"batches": records, "position": pos.state_dict()}


def drain_two_workers(cfg: Any, *, max_batches: int | None = None, position: dict | None = None) -> list[dict]:
    """The training input of ``cfg`` split for two workers (``streaming_split(2, equal=True)``,
    as Ray Train splits it), each split drained by :func:`drain` in a Ray task, resumed from
    ``position`` when given; the two reports in split order. Needs a connected Ray."""
    import ray

    from pipeline.data.loader import build_train_dataset

    ds = build_train_dataset(cfg, position=position, num_splits=2)
    remote = ray.remote(num_cpus=0)(drain)
    return ray.get([remote.remote(s, cfg, max_batches=max_batches, position=position)
                    for s in ds.streaming_split(2, equal=True)])
