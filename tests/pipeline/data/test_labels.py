"""Labels next to the shards: their join with cropped audio, and what pretraining refuses.

Alignment is checked two ways: by index (every model frame of any crop gets the label of
the utterance frame it starts on, and none the front end gives is missing), and by
content (the labels of a crop's own MFCC frames are exactly the joined labels of the whole
utterance's, at 10 ms and at the model's 20 ms).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import config as C
from models.factory import build_frontend
from pipeline.data import labels as L
from pipeline.data import storage
from pipeline.label.kmeans import assign
from pipeline.label.mfcc import Mfcc, num_frames


def _spec(stride: int, model_stride: int = 320, version: str = "v1") -> L.LabelSpec:
    return L.LabelSpec(uri="/nowhere", name="set", version=version, dataset_version="d1", stride=stride,
                       model_stride=model_stride, clusters=100)


@pytest.mark.parametrize(("stride", "window"), [(160, 400), (320, 400)])
def test_every_frame_of_any_crop_gets_the_label_it_starts_on(stride: int, window: int) -> None:
    frontend = build_frontend(C.tiny())  # the conv feature encoder: 320-sample frames, 400-sample window
    spec = _spec(stride)
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(400, 60000))
        length = int(rng.integers(400, n + 1))
        offset = L.quantize_offsets(np.array([rng.integers(0, n - length + 1)]), stride)
        have = np.arange(L.expected_frames(n, stride=stride, window=window)).astype(np.int16)  # label j = j
        targets = L.batch_targets({"u": have}, ["u"], offset, np.array([length]), spec)[0]
        frames = int(frontend.output_lengths(torch.tensor(length)))
        t = np.arange(frames)
        assert (targets[:frames] >= 0).all(), f"n={n} crop {offset[0]}+{length}: a frame without its label"
        np.testing.assert_array_equal(targets[:frames], offset[0] // stride + t * (320 // stride))
        assert offset[0] + length <= n


def test_a_crops_own_mfcc_labels_are_the_joined_labels_of_its_utterance() -> None:
    rng = np.random.default_rng(1)
    t = np.arange(24000) / 16000
    wave = (np.sin(2 * np.pi * 220 * t * (1 + t)) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.1 * rng.standard_normal(24000))
    wave = wave.astype(np.float32)
    mfcc = Mfcc()
    centroids = mfcc(torch.from_numpy(wave)).numpy()[::7]  # clusters of this utterance's own frames
    whole = assign(mfcc(torch.from_numpy(wave)).numpy(), centroids)
    for model_stride in (160, 320):
        spec = _spec(160, model_stride)
        for offset, length in ((0, 8000), (1234, 9000), (16001 - 9000, 9000)):
            o = L.quantize_offsets(np.array([offset]), 160)
            crop = wave[o[0]: o[0] + length]
            own = assign(mfcc(torch.from_numpy(crop)).numpy(), centroids)[:: model_stride // 160]
            joined = L.batch_targets({"u": whole}, ["u"], o, np.array([length]), spec)[0]
            np.testing.assert_array_equal(joined[: len(own)], own)
            assert len(own) == (num_frames(length) - 1) // (model_stride // 160) + 1


def test_batch_targets_refuse_unaligned_offsets_and_unknown_utterances() -> None:
    spec = _spec(160)
    with pytest.raises(ValueError, match="multiples of the label stride"):
        L.batch_targets({"u": np.zeros(10, np.int16)}, ["u"], np.array([100]), np.array([800]), spec)
    with pytest.raises(ValueError, match="no labels for utterance 'v'"):
        L.batch_targets({"u": np.zeros(10, np.int16)}, ["v"], np.array([0]), np.array([800]), spec)


def _summary(tmp_path, **over) -> str:
    data = str(tmp_path / "data")
    summary = {"format": L.FORMAT, "format_version": L.FORMAT_VERSION, "version": "v1", "dataset_version": "d1",
               "stride": 160, "window": 400, "clusters": 100, "settings": {"kmeans": {"seed": 0}}, **over}
    storage.write_json(storage.join(L.set_uri(data, "set"), "summary.json"), summary)
    return data


def test_pretraining_refuses_labels_of_another_shard_version_rate_model_or_version(tmp_path) -> None:
    kw = dict(dataset_version="d1", model_stride=320, clusters=100)
    with pytest.raises(ValueError, match="no label set"):
        L.open_label_set(str(tmp_path / "empty"), "set", **kw)
    data = _summary(tmp_path)
    assert L.open_label_set(data, "set", **kw).ratio == 2
    with pytest.raises(ValueError, match="version d1 of the shards.*now holds version d2"):
        L.open_label_set(data, "set", **{**kw, "dataset_version": "d2"})
    with pytest.raises(ValueError, match="another frame rate"):
        L.open_label_set(_summary(tmp_path, stride=480), "set", **kw)
    with pytest.raises(ValueError, match="have 100 clusters, the model predicts 500"):
        L.open_label_set(_summary(tmp_path), "set", **{**kw, "clusters": 500})
    with pytest.raises(ValueError, match="made with other settings"):
        L.open_label_set(_summary(tmp_path), "set", **kw, version="v2")
    (tmp_path / "data" / "labels" / "set" / "summary.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a wavray label set"):
        L.open_label_set(data, "set", **kw)


def test_a_run_resumes_only_on_the_labels_it_started_with() -> None:
    spec = _spec(160, version="v1")
    spec.check_position(None)  # a new run
    spec.check_position({"plan": "d1+v1/train/abc"})
    with pytest.raises(ValueError, match="trained on label version v0.*cannot change its targets"):
        spec.check_position({"plan": "d1+v0/train/abc"})
    with pytest.raises(ValueError, match="trained without labels"):
        spec.check_position({"plan": "d1/train/abc"})
