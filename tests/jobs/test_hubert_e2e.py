"""HuBERT end to end on the real object store (SeaweedFS on loopback) and a local Ray.

1. The labelling job labels the demo corpus, prepared into the bucket, while one of its
   workers is killed (SIGKILL) between writing a label file under its temporary name and
   moving it into place: Ray restarts the worker and retries its shard, and in the end
   every utterance has exactly one row, with one label per 10 ms frame of its length.
   Running the job again does nothing; a run interrupted before its commit (summary and
   a file gone) redoes only the missing shard, identically.
2. Pretraining refuses labels that are not the ones its settings name (another number of
   clusters, other k-means settings) before any worker starts.
3. HuBERT on 2 workers with DeepSpeed ZeRO-2 through Ray Train, a checkpoint and a resume
   that extends the run on the same labels; labels of another version would be refused by
   a resume (its targets cannot change midway); the final model is logged with its encoder
   as a Hugging Face ``HubertModel``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import ray
from fixtures.objectstore import s3_store  # noqa: F401 - the session fixture

from pipeline import config as C
from pipeline.data import labels as L
from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.label.job import KILL_ONCE_ENV, run_labelling, training_labels
from pipeline.tracking import Tracker
from pipeline.train.trainer import check_resumed_labels, run_pretraining

pytestmark = pytest.mark.e2e

CLUSTERS = 20


@pytest.fixture(scope="module")
def kill_marker(s3_store, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """A Ray instance whose workers carry the kill-once fault (the first labelling task to
    find the marker absent kills its own worker)."""
    from pipeline.cluster import connect_ray

    marker = tmp_path_factory.mktemp("fault") / "killed"
    if ray.is_initialized():
        ray.shutdown()
    os.environ[KILL_ONCE_ENV] = str(marker)
    connect_ray(num_cpus=2)
    try:
        yield marker
    finally:
        ray.shutdown()
        os.environ.pop(KILL_ONCE_ENV, None)


@pytest.fixture(scope="module")
def data_uri(kill_marker, s3_store, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    from pipeline.data.demo_corpus import make_corpus
    from pipeline.data.prepare import prepare

    corpus = tmp_path_factory.mktemp("hubert") / "corpus"
    make_corpus(corpus, minutes=1.0, seed=7, progress=lambda _: None)
    uri = s3_store.uri("hubert")
    prepare(str(corpus), uri, C.apply_overrides(C.tiny(), ["data.shard_size_mb=0.3"]).data, progress=lambda _: None)
    return uri


def _config(data: str, *extra: str) -> C.Config:
    return C.apply_overrides(C.hubert_laptop(), [
        f"data.train_uri={data}", f"model.hubert.clusters={CLUSTERS}", "label.name=mfcc", "label.n_init=2",
        "label.workers=1", *extra,
    ])


def _label_files(set_uri: str, version: str) -> dict[str, float]:
    fs, root = storage.resolve(storage.join(set_uri, version), None)
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {storage.relative(root, i.path): i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File}


@pytest.fixture(scope="module")
def labelled(data_uri: str, kill_marker: Path) -> dict:
    messages: list[str] = []
    summary = run_labelling(_config(data_uri), progress=messages.append)
    return {"summary": summary, "messages": messages}


def test_labelling_on_the_object_store_labels_every_frame_once_through_a_killed_worker(
    data_uri: str, kill_marker: Path, labelled: dict
) -> None:
    summary = labelled["summary"]
    assert kill_marker.is_file(), "no labelling worker was killed"
    set_uri = L.set_uri(data_uri, "mfcc")
    manifest = storage.read_table(storage.join(data_uri, S.MANIFEST_FILE), [S.ID, S.SHARD, S.NUM_SAMPLES])
    shards = sorted(set(manifest.column(S.SHARD).to_pylist()))
    files = _label_files(set_uri, summary["version"])
    assert sorted(files) == sorted([L.KMEANS_FILE] + [L.shard_label_path(s) for s in shards]), "temporary or extra files"
    assert len(shards) >= 3 and summary["shards_reused"] == 0

    seen: dict[str, int] = {}
    expected = dict(zip(manifest.column(S.ID).to_pylist(), manifest.column(S.NUM_SAMPLES).to_pylist(), strict=True))
    for name in files:
        if name == L.KMEANS_FILE:
            continue
        table = storage.read_table(storage.join(set_uri, summary["version"], name))
        for utt, frames, ids in zip(*(table.column(c).to_pylist() for c in (S.ID, L.NUM_FRAMES, L.LABELS)),
                                    strict=True):
            seen[utt] = seen.get(utt, 0) + 1
            assert frames == len(ids) == L.expected_frames(expected[utt], stride=160, window=400), utt
            assert 0 <= min(ids) and max(ids) < CLUSTERS
    assert seen == dict.fromkeys(expected, 1), "an utterance without labels, or labelled twice"
    assert summary["utterances"] == len(expected) and summary["stride"] == 160
    assert summary["kmeans"]["cpu_seconds"] > 0 and summary["cpu_seconds"] > summary["kmeans"]["cpu_seconds"]
    usage, purity = summary["usage"], summary["purity"]
    assert usage["clusters_used"] > CLUSTERS // 2 and usage["perplexity"] > 4
    assert purity["frames"] == summary["frames"] and 0 < purity["pnmi"] < 1
    assert purity["cluster_purity"] > purity["majority_character"], "clusters say nothing about the characters"

    # Again: nothing to do, nothing rewritten.
    messages: list[str] = []
    again = run_labelling(_config(data_uri), progress=messages.append)
    assert again["version"] == summary["version"] and any("nothing to do" in m for m in messages)
    assert _label_files(set_uri, summary["version"]) == files

    # A job that died before its commit: only the missing shard is labelled again, identically.
    gone = L.shard_label_path(shards[1])
    before = storage.read_table(storage.join(set_uri, summary["version"], gone))
    for uri in (storage.join(set_uri, S.SUMMARY_FILE), storage.join(set_uri, summary["version"], gone)):
        fs, path = storage.resolve(uri, None)
        fs.delete_file(path)
    resumed = run_labelling(_config(data_uri), progress=lambda _: None)
    assert resumed["version"] == summary["version"] and resumed["shards_reused"] == len(shards) - 1
    assert resumed["kmeans"]["reused"] is True and resumed["kmeans"]["cpu_seconds"] == 0
    assert 0 < resumed["cpu_seconds"] < summary["cpu_seconds"], "a resumed job counts only what it redid"
    assert storage.read_table(storage.join(set_uri, summary["version"], gone)).equals(before)
    assert resumed["usage"] == summary["usage"] and resumed["purity"] == summary["purity"]


def test_pretraining_refuses_labels_its_settings_did_not_make(data_uri: str, labelled: dict, tmp_path: Path) -> None:
    cfg = _config(data_uri, f"checkpoint.storage_path={tmp_path}")
    with pytest.raises(ValueError, match=f"have {CLUSTERS} clusters, the model predicts 30"):
        run_pretraining(C.apply_overrides(cfg, ["model.hubert.clusters=30"]))
    with pytest.raises(ValueError, match="made with other settings.*kmeans.seed: made with 0, this run 1"):
        run_pretraining(C.apply_overrides(cfg, ["label.seed=1"]))
    with pytest.raises(ValueError, match="no label set"):
        run_pretraining(C.apply_overrides(cfg, ["label.name=other"]))
    assert not list(tmp_path.iterdir()), "a refused run must start nothing"


def test_hubert_on_two_zero2_workers_resumes_on_its_labels(data_uri: str, labelled: dict, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    cfg = _config(data_uri, f"checkpoint.storage_path={runs}", "checkpoint.run_name=hubert", "train.max_steps=4",
                  "checkpoint.every_steps=2", "train.log_every=1", "schedule.warmup_steps=2",
                  "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "deepspeed.zero_stage=2",
                  "data.decode_cpus=0.5", "data.max_samples_per_batch=64000", "data.max_sample_size=32000")
    first = run_pretraining(cfg)
    assert first.step == 4
    second = run_pretraining(C.apply_overrides(cfg, ["train.max_steps=8"]))
    assert second.step == 8 and second.mlflow_run_id == first.mlflow_run_id
    client = Tracker(second.mlflow_uri, "wavray", second.mlflow_run_id).client
    run = client.get_run(second.mlflow_run_id)
    assert run.data.tags["wavray.resumed_from"] == "4"
    ce = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss/masked_ce")}
    assert sorted(ce) == list(range(1, 9)) and all(math.isfinite(v) for v in ce.values())
    assert abs(ce[1] - math.log(CLUSTERS)) < 1.5, "the first loss is not near chance, ln(K)"
    assert run.data.metrics["perplexity/target_0"] > 4.0, "the targets the model saw were not the labels"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model/hf_model")}
    assert "model/hf_model/config.json" in artifacts
    import json

    hf_config = json.loads(Path(client.download_artifacts(run.info.run_id, "model/hf_model/config.json")).read_text())
    assert hf_config["architectures"] == ["HubertModel"] and hf_config["model_type"] == "hubert"

    # Had the set been relabelled since (another version under the same name), the run could
    # not go on: its checkpoint's data position names the labels it trained on.
    spec = training_labels(cfg)
    check_resumed_labels(cfg, "hubert", spec)
    with pytest.raises(ValueError, match=f"label version {spec.version}.*cannot change its targets midway"):
        check_resumed_labels(cfg, "hubert", dataclasses.replace(spec, version="0123456789ab"))
