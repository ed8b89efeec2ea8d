"""vq-wav2vec's second stage end to end on the real object store (SeaweedFS on loopback) and a
local Ray.

1. The tokenising job (``jobs.label label.features=tokens``) tokenises the demo corpus,
   prepared into the bucket, with a vq-wav2vec model: every utterance has exactly one row,
   with one token per frame of the model's front end, and each token is the model's own
   codeword pair of that frame through the vocabulary the job saved. Running it again
   writes nothing.
2. A short vq_bert pretraining on 1 worker reads the tokens through the label join of the
   data path: its first masked cross-entropy is near chance, ln(K), and the tokens it saw
   vary. The trained BERT reads audio through the tokeniser of its label set (the label
   files' own tokens, from a padded batch) and the probe trains a head on its states.
3. CTC fine-tuning of the BERT behind that tokeniser, and jobs.evaluate of the result.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from fixtures.objectstore import s3_store  # noqa: F401 - the session fixture

from pipeline import config as C
from pipeline.data import labels as L
from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data.audio import decode_segment
from pipeline.data.batching import normalize
from pipeline.label.job import run_labelling
from pipeline.label.tokens import VOCABULARY_FILE, TokenMap
from pipeline.tracking import Tracker
from pipeline.train.trainer import run_pretraining

pytestmark = pytest.mark.e2e

VOCAB = 64


@pytest.fixture(scope="module")
def ray_local(s3_store):  # noqa: F811
    from pipeline.cluster import connect_ray

    if ray.is_initialized():
        ray.shutdown()
    connect_ray(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data_uri(ray_local, s3_store, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    from pipeline.data.demo_corpus import make_corpus
    from pipeline.data.prepare import prepare

    corpus = tmp_path_factory.mktemp("vqbert") / "corpus"
    make_corpus(corpus, minutes=1.0, seed=7, progress=lambda _: None)
    uri = s3_store.uri("vqbert")
    prepare(str(corpus), uri, C.apply_overrides(C.tiny(), ["data.shard_size_mb=0.3"]).data, progress=lambda _: None)
    return uri


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A vq-wav2vec model as a wavray bundle (untrained: any model tokenises; the job must
    reproduce its tokens)."""
    from models.factory import build_pretraining_model
    from pipeline.model_io import write_bundle

    cfg = C.vq_wav2vec_laptop()
    torch.manual_seed(3)
    model = build_pretraining_model(cfg.model).eval()
    out = write_bundle(model, cfg, tmp_path_factory.mktemp("teacher") / "vq_wav2vec")
    return out, model


def _config(data: str, teacher_dir: Path, *extra: str) -> C.Config:
    return C.apply_overrides(C.vq_bert_laptop(), [
        f"data.train_uri={data}", f"label.teacher={teacher_dir}", f"model.vq_bert.vocab={VOCAB}",
        "label.name=tokens", "label.workers=1", *extra,
    ])


def _label_files(set_uri: str, version: str) -> dict[str, float]:
    import pyarrow.fs as pafs

    fs, root = storage.resolve(storage.join(set_uri, version), None)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {storage.relative(root, i.path): i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File}


@pytest.fixture(scope="module")
def tokenised(data_uri: str, teacher: tuple[Path, torch.nn.Module]) -> dict:
    return run_labelling(_config(data_uri, teacher[0]), progress=lambda _: None)


def test_tokenising_on_the_object_store_gives_the_models_token_for_every_frame_once(
    data_uri: str, teacher: tuple[Path, torch.nn.Module], tokenised: dict
) -> None:
    summary = tokenised
    _, model = teacher
    set_uri = L.set_uri(data_uri, "tokens")
    manifest = storage.read_table(storage.join(data_uri, S.MANIFEST_FILE), [S.ID, S.SHARD, S.ROW, S.NUM_SAMPLES])
    shards = sorted(set(manifest.column(S.SHARD).to_pylist()))
    files = _label_files(set_uri, summary["version"])
    assert sorted(files) == sorted([VOCABULARY_FILE] + [L.shard_label_path(s) for s in shards]), "temporary or extra files"
    assert len(shards) >= 3 and summary["shards_reused"] == 0
    assert summary["stride"] == 160 and summary["clusters"] == VOCAB
    assert summary["settings"]["features"]["kind"] == "tokens" and summary["settings"]["features"]["teacher_weights"]

    saved = np.load(__import__("io").BytesIO(storage.read_bytes(storage.join(set_uri, summary["version"],
                                                                             VOCABULARY_FILE))))
    to_ids = TokenMap(saved["pairs"], VOCAB, model.quantizer.entries)
    frontend = model.encoder.feature_encoder
    expected = dict(zip(manifest.column(S.ID).to_pylist(), manifest.column(S.NUM_SAMPLES).to_pylist(), strict=True))
    seen: dict[str, int] = {}
    checked = 0
    for shard in shards:
        table = storage.read_table(storage.join(set_uri, summary["version"], L.shard_label_path(shard)))
        audio = storage.read_table(storage.join(data_uri, shard), [S.ID, S.AUDIO, S.NUM_SAMPLES])
        for row, (utt, frames, ids) in enumerate(zip(*(table.column(c).to_pylist()
                                                       for c in (S.ID, L.NUM_FRAMES, L.LABELS)), strict=True)):
            seen[utt] = seen.get(utt, 0) + 1
            model_frames = int(frontend.output_lengths(torch.tensor(expected[utt])).item())
            assert frames == len(ids) == model_frames, f"{utt}: not one token per model frame"
            assert 0 <= min(ids) and max(ids) < VOCAB
            if row < 2:  # the job's tokens are the model's, through the saved vocabulary
                assert audio.column(S.ID)[row].as_py() == utt
                wave = decode_segment(audio.column(S.AUDIO)[row].as_buffer(), 0, expected[utt])
                x = torch.from_numpy(normalize(wave))
                codes, _ = model.tokens(x.unsqueeze(0))
                assert to_ids(codes[0].numpy()).tolist() == ids, utt
                checked += 1
    assert seen == dict.fromkeys(expected, 1), "an utterance without tokens, or tokenised twice"
    assert checked >= 2 * len(shards)
    tokens = summary["tokens"]
    possible = model.quantizer.entries ** model.quantizer.groups
    assert tokens["pairs_possible"] == possible and 1 < tokens["distinct_pairs"] <= possible
    assert tokens["pair_perplexity"] > 1.0 and 0.0 <= tokens["unknown_share"] < 1.0
    assert summary["usage"]["clusters_used"] > 1 and summary["vocabulary"]["sample_frames"] > 0

    # Again: nothing to do, nothing rewritten.
    messages: list[str] = []
    again = run_labelling(_config(data_uri, teacher[0]), progress=messages.append)
    assert again["version"] == summary["version"] and any("nothing to do" in m for m in messages)
    assert _label_files(set_uri, summary["version"]) == files


@pytest.fixture(scope="module")
def bert_run(data_uri: str, teacher: tuple[Path, torch.nn.Module], tokenised: dict,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[C.Config, object]:
    """(config, result) of a short vq_bert pretraining on the tokens."""
    runs = tmp_path_factory.mktemp("vqbert_runs")
    cfg = _config(data_uri, teacher[0], f"checkpoint.storage_path={runs}", "checkpoint.run_name=vqbert",
                  "train.max_steps=6", "checkpoint.every_steps=6", "train.log_every=1", "schedule.warmup_steps=2",
                  "scaling.num_workers=1", "scaling.cpus_per_worker=1", "data.decode_cpus=0.5",
                  "data.max_samples_per_batch=64000", "data.max_sample_size=32000")
    return cfg, run_pretraining(cfg)


def test_vq_bert_pretrains_on_the_tokens(data_uri: str, tokenised: dict, bert_run: tuple) -> None:
    cfg, result = bert_run
    assert result.step == 6
    client = Tracker(result.mlflow_uri, "wavray", result.mlflow_run_id).client
    run = client.get_run(result.mlflow_run_id)
    ce = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss/masked_ce")}
    assert sorted(ce) == list(range(1, 7)) and all(math.isfinite(v) for v in ce.values())
    assert abs(ce[1] - math.log(VOCAB)) < 1.0, "the first loss is not near chance, ln(K)"
    assert run.data.metrics["perplexity/target_0"] > 2.0, "the tokens the model saw do not vary"
    with pytest.raises(ValueError, match="label.features must be 'tokens'"):
        run_pretraining(C.apply_overrides(cfg, ["label.features=mfcc"]))

    # Downstream: the trained BERT reads audio through the tokeniser of its label set; the
    # tokens it gets are the label files' tokens, and the probe trains a head on its states.
    from models.vq_bert import TokenisedBert
    from pipeline.label.tokens import audio_model
    from pipeline.model_io import load_model
    from pipeline.probe import LabelledSet, num_hidden_states, pad_batch, run_probe

    trained = load_model(result.checkpoint_uri)
    with pytest.raises(ValueError, match="tokeniser in front"):
        num_hidden_states(trained.model)
    model = audio_model(trained)
    assert isinstance(model, TokenisedBert) and num_hidden_states(model) == cfg.model.transformer.num_layers + 1
    manifest = storage.read_table(storage.join(data_uri, S.MANIFEST_FILE), [S.ID, S.SHARD, S.NUM_SAMPLES])
    shard = manifest.column(S.SHARD)[0].as_py()
    labels = storage.read_table(storage.join(L.set_uri(data_uri, "tokens"), tokenised["version"],
                                             L.shard_label_path(shard)))
    audio = storage.read_table(storage.join(data_uri, shard), [S.ID, S.AUDIO, S.NUM_SAMPLES])
    waves = [decode_segment(audio.column(S.AUDIO)[i].as_buffer(), 0, audio.column(S.NUM_SAMPLES)[i].as_py())
             for i in range(3)]
    assert labels.column(S.ID).to_pylist()[:3] == audio.column(S.ID).to_pylist()[:3]
    source, pad = pad_batch(waves, torch.device("cpu"))  # a padded batch tokenises each utterance whole
    ids, lengths = model.tokens(source, pad)
    for b in range(3):
        assert ids[b, : int(lengths[b])].tolist() == labels.column(L.LABELS)[b].as_py(), f"utterance {b}"
    words = ["one two", "three four", "five six"]
    sets = LabelledSet([f"u{i}" for i in range(3)], waves, words)
    scores = run_probe(model, sets, sets, cfg.probe.__class__(steps=5, head="linear", weighted_sum=True))
    assert math.isfinite(scores["probe/dev_loss"]) and 0.0 <= scores["probe/cer"]


def test_vq_bert_fine_tunes_behind_its_tokeniser(data_uri: str, teacher: tuple[Path, torch.nn.Module],
                                                 tokenised: dict, bert_run: tuple, tmp_path: Path) -> None:
    """CTC fine-tuning of the vq_bert model on the transcribed corpus: the model carries the
    tokeniser of its label set (the vq-wav2vec model's front end and quantizer, the set's
    vocabulary) and its BERT; the run logs its CTC loss, logs the model as a
    wavray bundle (no Hugging Face class), and jobs.evaluate transcribes with it."""
    import csv

    from mlflow.tracking import MlflowClient

    from jobs.evaluate import main as evaluate_main
    from jobs.finetune import main as finetune_main
    from models.checkpoint import load_weights
    from pipeline.model_io import load_model

    _, result = bert_run
    _, vq = teacher
    root = Path(__file__).resolve().parents[2]
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    assert finetune_main([
        "--config", str(root / "jobs/configs/finetune/tiny_10m.yaml"), f"data.train_uri={data_uri}",
        f"train.init_from={result.checkpoint_uri}", f"checkpoint.storage_path={runs}", "checkpoint.run_name=ft",
        "checkpoint.every_steps=4", "train.max_steps=4", "finetune.freeze_encoder_steps=2", "train.log_every=2",
        "schedule.warmup_steps=1", "data.max_samples_per_batch=200000", f"tracking.uri={db}",
        "scaling.cpus_per_worker=1",
    ]) == 0
    ckpt = runs / "ft" / "checkpoint_000000004"
    state = load_weights(ckpt)
    saved = np.load(__import__("io").BytesIO(storage.read_bytes(storage.join(
        L.set_uri(data_uri, "tokens"), tokenised["version"], VOCABULARY_FILE))))["pairs"]
    assert state["tokeniser.pairs"][: len(saved)].tolist() == saved.tolist()
    assert (state["tokeniser.pairs"][len(saved):] == -1).all()
    for key, value in vq.encoder.feature_encoder.state_dict().items():  # frozen: the vq-wav2vec model's
        assert torch.equal(state[f"tokeniser.frontend.{key}"], value), key

    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("wavray-finetune").experiment_id],
                                filter_string="tags.`wavray.run_name` = 'ft'")
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss/ctc")]
    assert losses and all(math.isfinite(v) for v in losses)
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model" in logged and "hf_model" not in logged

    # The fine-tuned model alone tokenises audio as the label set did.
    model = load_model(str(ckpt), task="ctc").model
    manifest = storage.read_table(storage.join(data_uri, S.MANIFEST_FILE), [S.SHARD])
    shard = manifest.column(S.SHARD)[0].as_py()
    labels = storage.read_table(storage.join(L.set_uri(data_uri, "tokens"), tokenised["version"],
                                             L.shard_label_path(shard)))
    audio = storage.read_table(storage.join(data_uri, shard), [S.AUDIO, S.NUM_SAMPLES])
    wave = normalize(decode_segment(audio.column(S.AUDIO)[0].as_buffer(), 0, audio.column(S.NUM_SAMPLES)[0].as_py()))
    ids, _ = model.tokeniser(torch.from_numpy(wave).unsqueeze(0))
    assert ids[0].tolist() == labels.column(L.LABELS)[0].as_py()

    out = tmp_path / "eval.tsv"
    assert evaluate_main(["--checkpoint", str(runs / "ft"), "--data", data_uri, "--output", str(out),
                          "--no-mlflow"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows and all(r["reference"] for r in rows)
