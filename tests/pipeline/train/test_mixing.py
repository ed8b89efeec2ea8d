"""WavLM's mixing: what an overlay is, and that the targets stay the primary speaker's.

``mix_batch`` on its own: an unmixed row is untouched; a mixed row differs from the
original in one stretch, no longer than ``max_ratio`` of the utterance, which is exactly a
stretch of another row (or of a noise clip) scaled to the drawn energy ratio; padding
stays silent. Through the HuBERT step: with every utterance mixed, the labels the step
hands the model are the batch's own, frame for frame, while the audio changed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import MixingConfig
from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.train.masked_prediction import MaskedPredictionStep
from pipeline.train.mixing import mix_batch


def _speech(rows: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    num = np.array([width - 1000 * i for i in range(rows)])
    source = np.zeros((rows, width), np.float32)
    for i, n in enumerate(num):
        source[i, :n] = (rng.uniform(0.2, 1.0) * rng.standard_normal(n)).astype(np.float32)
    return source, num


def _overlay_of(original: np.ndarray, mixed: np.ndarray) -> tuple[int, int]:
    changed = np.flatnonzero(np.abs(mixed - original) > 1e-7)
    return (int(changed[0]), int(changed[-1]) + 1) if len(changed) else (0, 0)


@pytest.mark.parametrize("snr", [-5.0, 0.0, 4.0])
def test_an_overlay_is_a_stretch_of_another_utterance_at_the_drawn_energy_ratio(snr: float) -> None:
    source, num = _speech(4, 16000, seed=0)
    cfg = MixingConfig(prob=0.5, max_ratio=0.5, snr_min=snr, snr_max=snr)
    mixed, which = mix_batch(source, num, cfg, np.random.default_rng(3))
    assert which.any() and not which.all()
    for b in range(4):
        if not which[b]:
            np.testing.assert_array_equal(mixed[b], source[b])
            continue
        start, stop = _overlay_of(source[b], mixed[b])
        assert 0 < stop - start <= 0.5 * num[b] and stop <= num[b]
        assert not mixed[b, num[b]:].any(), "padding must stay silent"
        added = (mixed[b] - source[b])[start:stop].astype(np.float64)
        ratio = 10 * np.log10(np.mean(source[b, : num[b]].astype(np.float64) ** 2) / np.mean(added ** 2))
        assert ratio == pytest.approx(snr, abs=1e-3)
        # The overlay is a positively scaled piece of some row of the batch as it came (possibly itself).
        head = added[:16] / np.linalg.norm(added[:16])
        found = False
        for j in range(4):
            windows = np.lib.stride_tricks.sliding_window_view(source[j, : num[j]].astype(np.float64), 16)
            windows = windows[: num[j] - len(added) + 1]
            close = np.abs(windows / np.linalg.norm(windows, axis=1, keepdims=True) - head).max(axis=1) < 1e-4
            for at in np.flatnonzero(close):
                piece = source[j, at: at + len(added)].astype(np.float64)
                found = found or np.allclose(added, piece * (np.linalg.norm(added) / np.linalg.norm(piece)), atol=1e-4)
        assert found, f"row {b}: the overlay is no stretch of the batch"


def test_noise_overlays_come_from_the_noise_set() -> None:
    source, num = _speech(3, 8000, seed=1)
    noise = [np.full(4000, 0.25, np.float32)]  # a clip that shows where it went
    cfg = MixingConfig(prob=1.0, noise_uri="unused-here", noise_prob=1.0, noise_snr_min=10.0, noise_snr_max=10.0)
    mixed, which = mix_batch(source, num, cfg, np.random.default_rng(0), noise=noise)
    for b in np.flatnonzero(which):
        start, stop = _overlay_of(source[b], mixed[b])
        added = mixed[b, start:stop] - source[b, start:stop]
        assert stop - start <= 4000 and np.allclose(added, added[0], atol=1e-5)  # a constant: the noise clip


def test_mixing_keeps_the_primary_speakers_targets() -> None:
    cfg = C.apply_overrides(C.wavlm_laptop(), ["model.mixing.prob=1.0", "model.hubert.clusters=9"])
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    step = MaskedPredictionStep(cfg, model)
    source, num = _speech(3, 16000, seed=2)
    frames = int(model.encoder.feature_encoder.output_lengths(torch.tensor(16000)))
    labels = np.random.default_rng(4).integers(0, 9, (3, frames + 1))  # the loader gives one frame more
    batch = {"source": source, "padding_mask": np.arange(16000)[None] >= num[:, None], "num_samples": num,
             "target_ids": labels, "ids": np.array(["a", "b", "c"])}
    prepared = step.prepare(batch, step=5, micro=0, rank=0, device=torch.device("cpu"))
    targets = prepared.inputs["target_ids"][..., 0].numpy()  # (B, T)
    lengths = model.encoder.feature_encoder.output_lengths(torch.from_numpy(num)).numpy()
    for b in range(3):
        np.testing.assert_array_equal(targets[b, : lengths[b]], labels[b, : lengths[b]])
    assert not np.allclose(prepared.inputs["source"].numpy(), source), "mixing changed nothing"
    assert float(prepared.inputs["mixed_share"]) > 0
    # The same draw again: the step is a function of (seed, step, rank, micro-batch).
    again = step.prepare(batch, step=5, micro=0, rank=0, device=torch.device("cpu"))
    torch.testing.assert_close(again.inputs["source"], prepared.inputs["source"])
    out = step.forward(model, prepared, step=5)
    assert torch.isfinite(out.loss_sum) and "mp/mixed_share" in out.metrics


def test_labels_that_miss_a_frame_are_refused() -> None:
    cfg = C.apply_overrides(C.hubert_laptop(), ["model.hubert.clusters=9"])
    model = build_pretraining_model(cfg.model)
    step = MaskedPredictionStep(cfg, model)
    source, num = _speech(2, 16000, seed=3)
    frames = int(model.encoder.feature_encoder.output_lengths(torch.tensor(16000)))
    labels = np.zeros((2, frames), dtype=np.int64)
    labels[0, 10] = -1
    batch = {"source": source, "padding_mask": np.arange(16000)[None] >= num[:, None], "num_samples": num,
             "target_ids": labels, "ids": np.array(["a", "b"])}
    with pytest.raises(ValueError, match="'a' has no label for frame 10"):
        step.prepare(batch, step=0, micro=0, rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="no 'target_ids'"):
        step.prepare({k: v for k, v in batch.items() if k != "target_ids"}, step=0, micro=0, rank=0,
                     device=torch.device("cpu"))
