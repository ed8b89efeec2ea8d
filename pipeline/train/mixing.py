"""WavLM's denoising input (``model.mixing``): other speech or noise laid over the batch.

UniSpeech-SAT's ``mixing_collated_audios`` (FAMILY.md section 2), on the host before the
batch goes to the device: each utterance, with probability ``prob``, gets an overlay of
a random length in ``[0, max_ratio * its length]``, cut at a random place from a partner
drawn uniformly from the same batch (itself included), or, with ``noise_prob``, from a
random clip of the noise set, and added at a random place, scaled so that the energy
ratio of the utterance to the overlay is a uniform draw in ``[snr_min, snr_max]`` dB
(``noise_snr_*`` for noise). Overlays are cut from the batch as it came, so every overlay
is one clean voice. Lengths, padding and the targets do not change: the model learns to
predict the primary speaker's units. With ``data.normalize`` a mixed utterance is
normalised again, as the loader normalised it.

Draws come from a generator seeded by (seed, step, rank, micro-batch), like the masks.
"""

from __future__ import annotations

import numpy as np

from models.config import MixingConfig
from pipeline.data.batching import normalize as normalize_wave


def mix_batch(
    source: np.ndarray,
    num_samples: np.ndarray,
    cfg: MixingConfig,
    rng: np.random.Generator,
    *,
    noise: list[np.ndarray] | None = None,
    normalize: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(mixed (B, S) float32, which rows got an overlay (B,) bool) of ``source`` (B, S) whose
    rows hold ``num_samples`` valid samples (module doc)."""
    out = source.astype(np.float32, copy=True)
    mixed = np.zeros(len(source), dtype=bool)
    for b in range(len(source)):
        if rng.random() >= cfg.prob:
            continue
        n = int(num_samples[b])
        if noise and rng.random() < cfg.noise_prob:
            clip, low, high = noise[int(rng.integers(len(noise)))], cfg.noise_snr_min, cfg.noise_snr_max
        else:
            j = int(rng.integers(len(source)))
            clip, low, high = source[j, : int(num_samples[j])], cfg.snr_min, cfg.snr_max
        length = min(int(rng.integers(0, int(cfg.max_ratio * n) + 1)), len(clip))
        snr = rng.uniform(low, high)
        if length == 0:
            continue
        start = int(rng.integers(0, len(clip) - length + 1))
        at = int(rng.integers(0, n - length + 1))
        segment = clip[start:start + length].astype(np.float64)
        energy = float(np.mean(source[b, :n].astype(np.float64) ** 2))
        overlay = float(np.mean(segment ** 2))
        if energy <= 0.0 or overlay <= 0.0:
            continue  # silence on either side: no ratio to set
        scale = np.sqrt(energy / (overlay * 10.0 ** (snr / 10.0)))
        out[b, at:at + length] += (scale * segment).astype(np.float32)
        if normalize:
            out[b, :n] = normalize_wave(out[b, :n])
        mixed[b] = True
    return out, mixed


def load_noise(uri: str, *, s3_endpoint: str = "", s3_region: str = "", max_minutes: float = 60.0) -> list[np.ndarray]:
    """The clips of a prepared dataset of noise (every split), up to ``max_minutes`` in all."""
    from pipeline.data import schema as S
    from pipeline.data import storage
    from pipeline.data.audio import decode_segment
    from pipeline.data.loader import read_dataset_info

    store = storage.Storage.from_config(s3_endpoint, s3_region)
    info = read_dataset_info(uri, store)
    budget = int(max_minutes * 60 * info.sample_rate)
    clips: list[np.ndarray] = []
    for split in S.SPLITS:
        for shard in info.split(split):
            table = storage.read_table(info.uri(shard), [S.AUDIO, S.NUM_SAMPLES], store)
            audio = table.column(S.AUDIO)
            for i, n in enumerate(table.column(S.NUM_SAMPLES).to_pylist()):
                if budget <= 0:
                    return clips
                clips.append(decode_segment(audio[i].as_buffer(), 0, int(n)))
                budget -= int(n)
    if not clips:
        raise ValueError(f"model.mixing.noise_uri: {uri} holds no clips")
    return clips
