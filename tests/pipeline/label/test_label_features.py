"""What the labelling job clusters: Kaldi's MFCCs, a teacher's layer in chunks, k-means, purity.

The MFCCs are checked against a direct NumPy/SciPy transcription of Kaldi's recipe (its
own FFT, its own DCT from ``scipy.fft``), frame by frame.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from models import config as C
from models.factory import build_pretraining_model
from pipeline.label.features import MfccFeatures, TeacherFeatures, receptive_field
from pipeline.label.kmeans import KMeansSettings, assign, fit
from pipeline.label.mfcc import deltas
from pipeline.label.purity import LabelStats, character_targets


def _kaldi_mfcc_by_hand(x: np.ndarray) -> np.ndarray:
    """Kaldi's ``compute-mfcc-feats`` defaults, use_energy=false, in float64, one frame at a time."""
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    step = (hi - lo) / 24
    fft_mel = mel(np.arange(256) * 16000 / 512)
    banks = np.zeros((23, 257))
    for m in range(23):
        left, center, right = lo + m * step, lo + (m + 1) * step, lo + (m + 2) * step
        for k in range(256):
            f = fft_mel[k]
            if left < f < right:
                banks[m, k] = (f - left) / (center - left) if f <= center else (right - f) / (right - center)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    out = []
    for start in range(0, len(x) - 400 + 1, 160):
        frame = x[start:start + 400].astype(np.float64)
        frame = frame - frame.mean()
        frame = frame - 0.97 * np.concatenate([[frame[0]], frame[:-1]])
        power = np.abs(np.fft.rfft(frame * window, 512)) ** 2
        logmel = np.log(np.maximum(banks @ power, np.finfo(np.float32).eps))
        ceps = scipy.fft.dct(logmel, type=2, norm="ortho")[:13]
        out.append(ceps * (1 + 11 * np.sin(np.pi * np.arange(13) / 22)))
    return np.array(out)


def test_mfcc_is_kaldis_recipe_with_deltas() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(8000)).astype(np.float32)
    got = MfccFeatures()(x)
    ceps = _kaldi_mfcc_by_hand(x)
    assert got.shape == (len(ceps), 39) == (1 + (8000 - 400) // 160, 39)
    np.testing.assert_allclose(got[:, :13], ceps, rtol=1e-4, atol=2e-3)
    d = torch.from_numpy(ceps)
    padded = torch.cat([d[:1], d[:1], d, d[-1:], d[-1:]])
    by_hand = sum(k * padded[2 + k: 2 + k + len(d)] for k in (-2, -1, 1, 2)) / 10
    torch.testing.assert_close(deltas(d), by_hand)
    np.testing.assert_allclose(got[:, 13:26], by_hand.numpy(), rtol=1e-3, atol=5e-3)


def test_a_teacher_in_chunks_gives_every_frame_once() -> None:
    cfg = C.hubert_laptop()
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).eval()
    whole = TeacherFeatures(model, 2, normalize=False, max_chunk_seconds=100.0)
    chunked = TeacherFeatures(model, 2, normalize=False, max_chunk_seconds=0.5)
    x = np.random.default_rng(1).standard_normal(16000 * 2 + 777).astype(np.float32)
    a, b = whole(x), chunked(x)
    frames = int(model.encoder.feature_encoder.output_lengths(torch.tensor(len(x))))
    assert a.shape == b.shape == (frames, cfg.transformer.dim)
    assert receptive_field(model.encoder.feature_encoder) == (320, 400)
    # A chunk's frames are the utterance's frames: the Transformer's input (hidden state 0)
    # agrees wherever the positional convolution (16 frames wide) stays inside the chunk.
    conv = TeacherFeatures(model, 0, normalize=False, max_chunk_seconds=100.0)(x)
    conv_chunked = TeacherFeatures(model, 0, normalize=False, max_chunk_seconds=0.5)(x)
    first = chunked.chunk // 320
    np.testing.assert_allclose(conv[:first - 8], conv_chunked[:first - 8], atol=1e-4)
    np.testing.assert_allclose(conv[first + 8: 2 * first - 8], conv_chunked[first + 8: 2 * first - 8], atol=1e-4)
    with pytest.raises(ValueError, match="label.layer: 3 is not a hidden state"):
        TeacherFeatures(model, 3, normalize=False, max_chunk_seconds=1.0)


def test_kmeans_finds_separated_clusters_and_assigns_to_the_nearest() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.standard_normal((200, 2)) for c in centres]).astype(np.float32)
    found, inertia = fit(x, KMeansSettings(clusters=3, batch_size=100, n_init=3, max_iter=50,
                                           max_no_improvement=20, seed=0))
    order = np.argsort(found[:, 0] + 2 * found[:, 1])
    np.testing.assert_allclose(found[order], centres, atol=0.3)
    assert inertia == pytest.approx(2.0, rel=0.2)  # two unit-variance dimensions
    ids = assign(x, found)
    assert len(set(ids[:200])) == len(set(ids[200:400])) == len(set(ids[400:])) == 1
    with pytest.raises(ValueError, match="sampled frames for 700 clusters"):
        fit(x, KMeansSettings(clusters=700, batch_size=100, n_init=1, max_iter=1, max_no_improvement=1, seed=0))


def test_purity_of_perfect_and_of_uninformative_labels() -> None:
    text = "ab ab"  # characters a b | a b, uniformly over 10 frames: a a b b | | a a b b
    chars = character_targets(text, 10)
    perfect = LabelStats(3)
    perfect.add(np.unique(chars, return_inverse=True)[1], text)
    p = perfect.purity()
    assert p["cluster_purity"] == p["character_purity"] == pytest.approx(1.0)
    assert p["pnmi"] == pytest.approx(1.0)
    blind = LabelStats(3)
    blind.add(np.zeros(10, dtype=np.int64), text)
    q = blind.purity()
    assert q["pnmi"] == pytest.approx(0.0) and q["cluster_purity"] == pytest.approx(q["majority_character"]) == 0.4
    u = blind.usage()
    assert u["clusters_used"] == 1 and u["perplexity"] == pytest.approx(1.0) and u["largest_share"] == 1.0
    merged = LabelStats.from_json(perfect.to_json())
    merged.merge(blind)
    assert merged.frames == 20 and merged.cooc.sum() == 20
    assert math.isclose(LabelStats.from_json(merged.to_json()).purity()["pnmi"], merged.purity()["pnmi"])
