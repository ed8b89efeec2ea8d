"""End to end on a tiny budget: a pretrained checkpoint -> ``jobs.export`` (Hugging Face
directory) -> ``jobs.finetune`` (Ray Train + DeepSpeed, MLflow) -> ``jobs.evaluate`` on the
wavray checkpoint and on the Hugging Face ``Wav2Vec2ForCTC`` directory logged to MLflow.

One Ray Train fit (the expensive part, ~30 s of start-up); everything else is seconds.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.checkpoint import load_weights, save_weights
from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.text import Vocabulary

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    from pipeline.cluster import connect_ray

    if ray.is_initialized():
        ray.shutdown()
    connect_ray(num_cpus=2, dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """About 40 s of transcribed speech from two voices, prepared (a quarter of it in the valid split)."""
    from jobs.prepare import main as prepare_main
    from pipeline.data.demo_corpus import VOICES, make_corpus

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (infra/setup.sh installs it)")
    base = tmp_path_factory.mktemp("labelled")
    voices = [v for v in VOICES if v.name in ("espeak-us-m1", "espeak-gb-f4")]
    make_corpus(base / "corpus", minutes=0.6, seed=3, voices=voices, workers=2, progress=lambda _: None)
    assert prepare_main(["--input", str(base / "corpus"), "--output", str(base / "data"), "--preset", "tiny",
                         "data.valid_fraction=0.25"]) == 0
    return base / "data"


def test_hf_export_finetunes_and_evaluates(tmp_path: Path, labelled: Path) -> None:
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import main as evaluate_main
    from jobs.export import main as export_main
    from jobs.finetune import main as finetune_main

    torch.set_num_threads(1)
    # A "pretrained" tiny model as a wavray checkpoint, exported to Hugging Face format.
    pre_cfg = C.tiny()
    torch.manual_seed(0)
    pre = build_pretraining_model(pre_cfg.model)
    save_weights(pre, tmp_path / "pre")
    C.save_config(pre_cfg, tmp_path / "pre" / "config.yaml")
    assert export_main(["--checkpoint", str(tmp_path / "pre"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    rc = finetune_main([
        "--config", str(ROOT / "jobs/configs/finetune/tiny_10m.yaml"),
        f"data.train_uri={labelled}", f"train.init_from={tmp_path / 'hf'}", f"checkpoint.storage_path={runs}",
        "checkpoint.run_name=ft", "checkpoint.every_steps=4", "train.max_steps=8", "finetune.freeze_encoder_steps=2",
        "train.log_every=2", "schedule.warmup_steps=1", "data.max_samples_per_batch=200000", f"tracking.uri={db}",
        "scaling.cpus_per_worker=1",
    ])
    assert rc == 0
    ckpt = runs / "ft" / "checkpoint_000000008"
    assert (ckpt / "model.safetensors").is_file()
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert saved["train"]["init_from"] == str(tmp_path / "hf")
    vocab = Vocabulary.from_characters(saved["finetune"]["vocab"])
    state = load_weights(ckpt)
    assert tuple(state["head.weight"].shape) == (len(vocab), pre_cfg.model.transformer.dim)
    # The conv feature encoder was frozen: exactly the exported (= pretrained) weights.
    for key, value in pre.state_dict().items():
        if key.startswith("encoder.feature_encoder."):
            assert torch.equal(state[key], value), key

    client = MlflowClient(db)
    exp = client.get_experiment_by_name("wavray-finetune")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`wavray.run_name` = 'ft'")
    assert run.data.tags["wavray.task"] == "finetune" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss/ctc")
    assert [m.step for m in history][-1] == 8 and all(np.isfinite(m.value) for m in history)
    frozen = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "transformer_frozen")}
    assert frozen[2] == 1.0 and frozen[4] == 0.0
    hf_ctc = Path(client.download_artifacts(run.info.run_id, "hf_model", str(tmp_path / "artifacts")))
    assert Vocabulary.load(hf_ctc) == vocab
    # Each checkpoint logged its dev CER: the final one is jobs.evaluate's on the valid split.
    dev = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "dev/cer")}
    assert sorted(dev) == [4, 8] and all(0.0 <= v for v in dev.values())
    assert evaluate_main(["--checkpoint", str(runs / "ft"), "--data", str(labelled), "--split", "valid",
                          "--output", str(tmp_path / "valid.tsv"), "--no-mlflow"]) == 0
    with open(tmp_path / "valid.tsv") as f:
        valid = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert valid and dev[8] == pytest.approx(sum(int(r["char_edits"]) for r in valid)
                                              / sum(int(r["num_chars"]) for r in valid))
    assert run.data.metrics["dev/num_utterances"] == len(valid)

    # Evaluate the wavray checkpoint (through its run folder) and the Hugging Face directory.
    tables = {}
    for name, source in (("ours", runs / "ft"), ("hf", hf_ctc)):
        out = tmp_path / f"eval-{name}.tsv"
        assert evaluate_main(["--checkpoint", str(source), "--data", str(labelled), "--output", str(out),
                              "--tracking-uri", db, "--experiment", "wavray-eval", "--run-name", f"eval-{name}"]) == 0
        with open(out) as f:
            tables[name] = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = tables["ours"]
    assert len(rows) >= 8 and all(r["reference"] and r["reference"] == vocab.normalize(r["reference"]) for r in rows)
    assert [r["hypothesis"] for r in rows] == [r["hypothesis"] for r in tables["hf"]], "same weights, same output"
    edits = sum(int(r["char_edits"]) for r in rows)
    chars = sum(int(r["num_chars"]) for r in rows)
    (ev,) = client.search_runs([client.get_experiment_by_name("wavray-eval").experiment_id],
                               filter_string="tags.`wavray.run_name` = 'eval-ours'")
    assert ev.data.metrics["eval/cer"] == pytest.approx(edits / chars)
    assert ev.data.metrics["eval/num_utterances"] == len(rows)
    assert ev.data.params["eval.data"] == str(labelled)

    # The CTC directory is a real transformers model.
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.Wav2Vec2ForCTC.from_pretrained(str(hf_ctc)).eval()
    assert hf_model.config.vocab_size == len(vocab) and hf_model.config.pad_token_id == vocab.blank_id


def test_probe_sets_from_a_prepared_dataset(labelled: Path) -> None:
    from pipeline.probe import probe_sets

    cfg = C.apply_overrides(C.tiny(), [f"probe.train_uri={labelled}", "probe.train_split=all", "probe.dev_split=all",
                                       "probe.train_minutes=0.3", "probe.dev_minutes=5"])
    train, dev = probe_sets(cfg)
    assert 0 < train.minutes <= 0.3 and len(dev) > 0
    assert not set(train.ids) & set(dev.ids), "the dev set must not repeat training utterances"
    assert all(t.strip() for t in train.transcripts + dev.transcripts)
    assert all(a.dtype == np.float32 and a.ndim == 1 for a in train.audio)
    again, _ = probe_sets(cfg)
    assert again.ids == train.ids
    # Picked before decoding: the same utterances and samples as decoding all, then picking.
    from pipeline.probe import load_labelled_set

    everything = load_labelled_set(str(labelled))
    for by_language in (False, True):
        picked = load_labelled_set(str(labelled), minutes=0.2, seed=1, by_language=by_language)
        want = everything.take_minutes(0.2, seed=1, by_language=by_language)
        assert picked.ids == want.ids and 0 < len(picked) < len(everything)
        assert all(np.array_equal(a, b) for a, b in zip(picked.audio, want.audio, strict=True))
    with pytest.raises(ValueError, match="probe.train_uri"):
        probe_sets(C.tiny())


def _upload(local: Path, uri: str) -> None:
    from pipeline.data import storage

    storage.upload_file(local, uri)  # a directory, file by file, as every job uploads


def _register(db: str, local: Path, name: str) -> str:
    """``local`` logged as a run's ``model`` artifact and registered as ``name`` with the alias ``best``."""
    from pipeline.tracking import Tracker

    tracker = Tracker.open(C.apply_overrides(C.tiny(), [f"tracking.uri={db}"]), f"publish-{name}")
    tracker.log_artifacts(local, "model")
    version = tracker.register_model(name, artifact_path="model")
    tracker.client.set_registered_model_alias(name, "best", version)
    return f"models:/{name}@best"


def test_every_job_reads_a_model_from_a_path_an_s3_uri_and_an_mlflow_uri(
    tmp_path: Path, labelled: Path, s3_store, monkeypatch
) -> None:
    from jobs.evaluate import evaluate
    from jobs.export import main as export_main
    from models.factory import build_ctc_model
    from models.hf import read_hf_state_dict
    from pipeline.train import finetune as FT
    from pipeline.train.trainer import resolve_init
    from pipeline.train.worker import PretrainTask

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)  # where export and evaluate read models:/ URIs
    torch.manual_seed(0)
    cfg = C.apply_overrides(C.tiny(), ["finetune.vocab=abcdefghijklmnopqrstuvwxyz'"])
    ctc = build_ctc_model(cfg.model, len(Vocabulary.from_characters(cfg.finetune.vocab)))
    pre = build_pretraining_model(cfg.model)
    forms: dict[str, dict[str, str]] = {}
    for kind, model in (("ctc", ctc), ("pre", pre)):
        local = tmp_path / kind
        save_weights(model, local)
        C.save_config(cfg, local / "config.yaml")
        _upload(local, s3_store.uri(f"jobs-io/{kind}"))
        forms[kind] = {"path": str(local), "s3": s3_store.uri(f"jobs-io/{kind}"),
                       "mlflow": _register(db, local, f"jobs-io-{kind}")}

    # jobs.evaluate and jobs.export --ctc: the same model from every location.
    hyps, exported = {}, {}
    for form, location in forms["ctc"].items():
        ev, _ = evaluate(location, str(labelled))
        hyps[form] = [r["hypothesis"] for r in ev.rows]
        assert export_main(["--checkpoint", location, "--out", str(tmp_path / f"hf-{form}"), "--ctc"]) == 0
        exported[form] = read_hf_state_dict(tmp_path / f"hf-{form}")
    assert hyps["s3"] == hyps["path"] == hyps["mlflow"]
    assert all(torch.equal(v, exported["path"][k]) for form in ("s3", "mlflow") for k, v in exported[form].items())

    # train.init_from of jobs.finetune and jobs.pretrain: every location gives the same weights.
    run_cfg = C.apply_overrides(C.tiny(), [f"data.train_uri={labelled}", "data.batch_mode=pad",
                                           f"tracking.uri={db}", f"checkpoint.storage_path={tmp_path / 'runs'}"])
    for form, location in forms["pre"].items():
        ft_cfg = FT.resolve_config(C.apply_overrides(run_cfg, [f"train.init_from={location}"]))
        assert not ft_cfg.train.init_from.endswith("@best"), "an alias is pinned to its version"
        model = FT.build_model(ft_cfg, len(Vocabulary.from_characters(ft_cfg.finetune.vocab)))
        assert torch.equal(model.encoder.transformer.layers[0].ffn.fc1.weight,
                           pre.encoder.transformer.layers[0].ffn.fc1.weight), form
        pt_cfg = resolve_init(C.apply_overrides(run_cfg, [f"train.init_from={location}"]))
        again = PretrainTask().build_model(pt_cfg)
        assert torch.equal(again.quantizer.codevectors, pre.quantizer.codevectors), form


def test_a_first_generation_checkpoint_is_probed_fine_tuned_and_evaluated(tmp_path: Path, labelled: Path) -> None:
    """vq-wav2vec (wav2vec 1.0's convs at 10 ms, a quantizer, a causal conv context network)
    as a wavray checkpoint: the probe reads every hidden state of it on transcribed speech,
    ``jobs.finetune`` takes its architecture and weights (the fine-tuning preset's LayerDrop
    ignored) and logs a wavray bundle, not a Hugging Face model, and ``jobs.evaluate`` scores it."""
    import math

    from mlflow.tracking import MlflowClient

    from jobs.evaluate import main as evaluate_main
    from jobs.finetune import main as finetune_main
    from pipeline.probe import num_hidden_states, probe_sets, run_probe

    torch.set_num_threads(1)
    pre_cfg = C.vq_wav2vec_laptop()
    torch.manual_seed(0)
    pre = build_pretraining_model(pre_cfg.model)
    save_weights(pre, tmp_path / "pre")
    C.save_config(pre_cfg, tmp_path / "pre" / "config.yaml")

    probe_cfg = C.apply_overrides(C.tiny(), [
        f"probe.train_uri={labelled}", "probe.train_split=all", "probe.dev_split=all", "probe.train_minutes=0.3",
        "probe.dev_minutes=5", "probe.steps=20", "probe.head=conv",
    ])
    train, dev = probe_sets(probe_cfg)
    scores = run_probe(pre, train, dev, probe_cfg.probe)
    weights = [v for k, v in scores.items() if k.startswith("probe/layer_weight_")]
    assert len(weights) == num_hidden_states(pre) == 6  # the front end's output, then each of its 5 layers
    assert math.isfinite(scores["probe/train_loss"]) and 0.0 <= scores["probe/cer"] <= scores["probe/cer_at_start"]

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = tmp_path / "runs"
    rc = finetune_main([
        "--config", str(ROOT / "jobs/configs/finetune/tiny_10m.yaml"),
        f"data.train_uri={labelled}", f"train.init_from={tmp_path / 'pre'}", f"checkpoint.storage_path={runs}",
        "checkpoint.run_name=ft", "checkpoint.every_steps=4", "train.max_steps=4", "finetune.freeze_encoder_steps=2",
        "train.log_every=2", "schedule.warmup_steps=1", "data.max_samples_per_batch=200000", f"tracking.uri={db}",
        "scaling.cpus_per_worker=1",
    ])
    assert rc == 0
    ckpt = runs / "ft" / "checkpoint_000000004"
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert saved["model"]["objective"] == "vq_wav2vec" and saved["model"]["transformer"]["kind"] == "causal_conv"
    state = load_weights(ckpt)
    vocab = Vocabulary.from_characters(saved["finetune"]["vocab"])
    assert tuple(state["head.weight"].shape) == (len(vocab), pre_cfg.model.transformer.dim)
    for key, value in pre.state_dict().items():  # the frozen front end: the pretrained weights
        if key.startswith("encoder.feature_encoder."):
            assert torch.equal(state[key], value), key
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("wavray-finetune").experiment_id],
                                filter_string="tags.`wavray.run_name` = 'ft'")
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss/ctc")]
    assert losses and all(np.isfinite(losses))
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model" in logged and "hf_model" not in logged

    out = tmp_path / "eval.tsv"
    assert evaluate_main(["--checkpoint", str(runs / "ft"), "--data", str(labelled), "--output", str(out),
                          "--tracking-uri", db, "--experiment", "wavray-eval", "--run-name", "eval-vq"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) >= 8 and all(r["reference"] for r in rows)


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """About 20 s of German, French and Spanish demo speech with transcripts, prepared (some of
    each language in the valid split)."""
    from jobs.prepare import main as prepare_main
    from pipeline.data.demo_corpus import OTHER_VOICES, make_corpus

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (infra/setup.sh installs it)")
    base = tmp_path_factory.mktemp("multilingual")
    voices = [v for v in OTHER_VOICES if v.name in ("de-espeak-m1", "fr-espeak-f2", "es-espeak-m3")]
    make_corpus(base / "corpus", minutes=0.3, seed=4, voices=voices, workers=2, progress=lambda _: None)
    assert prepare_main(["--input", str(base / "corpus"), "--output", str(base / "data"), "--preset", "tiny",
                         "data.valid_fraction=0.4"]) == 0
    return base / "data"


def test_a_multilingual_set_gets_a_joint_vocabulary_and_per_language_error_rates(
    tmp_path: Path, multilingual: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``finetune.vocab_from_data`` gives every letter of the German, French and Spanish
    transcripts a token (written out in the resolved config), so the references keep their
    accents; ``jobs.evaluate`` of a CTC model with that vocabulary reports each language's
    CER and WER over its own utterances (printed and in MLflow), beside the overall ones."""
    from mlflow.tracking import MlflowClient

    from jobs.evaluate import main as evaluate_main
    from pipeline.train import finetune as FT

    torch.set_num_threads(1)
    cfg = C.apply_overrides(C.tiny(), [f"data.train_uri={multilingual}", "data.batch_mode=pad",
                                       "finetune.vocab_from_data=true"])
    resolved = FT.resolve_config(cfg)
    assert not resolved.finetune.vocab_from_data and FT.resolve_config(resolved) == resolved
    chars = resolved.finetune.vocab
    assert {"ä", "ü", "é", "è", "ñ", "á"} <= set(chars) and " " not in chars
    vocab = Vocabulary.from_characters(chars)
    with pytest.warns(UserWarning, match="finetune.vocab = 'abc' is replaced by the characters of the transcripts"):
        assert FT.resolve_config(C.apply_overrides(cfg, ["finetune.vocab=abc"])).finetune.vocab == chars

    torch.manual_seed(0)
    model = FT.build_model(resolved, len(vocab))
    save_weights(model, tmp_path / "ctc")
    C.save_config(resolved, tmp_path / "ctc" / "config.yaml")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    table = tmp_path / "eval.tsv"
    assert evaluate_main(["--checkpoint", str(tmp_path / "ctc"), "--data", str(multilingual), "--output", str(table),
                          "--tracking-uri", db, "--experiment", "wavray-eval", "--run-name", "multi"]) == 0
    printed = capsys.readouterr().out
    with open(table, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert {r["language"] for r in rows} == {"de", "fr", "es"}
    assert any(set(r["reference"]) & set("äüéèñá") for r in rows), "references keep their accents"
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("wavray-eval").experiment_id],
                                filter_string="tags.`wavray.run_name` = 'multi'")
    got = run.data.metrics
    for lang in ("de", "fr", "es"):
        mine = [r for r in rows if r["language"] == lang]
        edits, num = sum(int(r["char_edits"]) for r in mine), sum(int(r["num_chars"]) for r in mine)
        assert got[f"eval/cer/lang/{lang}"] == pytest.approx(edits / num)
        assert got[f"eval/num_utterances/lang/{lang}"] == len(mine)
        assert f"{lang}: {len(mine)} utterances  CER {100 * edits / num:.2f}%" in printed
    total = sum(got[f"eval/num_chars/lang/{lang}"] for lang in ("de", "fr", "es"))
    overall = sum(got[f"eval/cer/lang/{lang}"] * got[f"eval/num_chars/lang/{lang}"] for lang in ("de", "fr", "es"))
    assert got["eval/cer"] == pytest.approx(overall / total), "the overall CER is the languages' pooled edits"


def test_a_just_run_scores_its_dev_cer_per_language(tmp_path: Path, multilingual: Path) -> None:
    """The dev CER a CTC-trained run logs at its checkpoints (``pipeline.train.dev``), for
    JUST, whose CTC model is its encoder and head: per language on a multilingual valid split,
    the same figures ``jobs.evaluate`` gives that split for the same weights, without moving
    the training RNG or the run's model; a budget of one utterance takes one."""
    from types import SimpleNamespace

    from jobs.evaluate import evaluate
    from pipeline.probe import load_labelled_set
    from pipeline.train.dev import DevScorer, dev_line
    from pipeline.train.just import resolve_config

    torch.set_num_threads(1)
    cfg = resolve_config(C.apply_overrides(C.just_laptop(), [f"data.train_uri={multilingual}"]))
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    save_weights(model, tmp_path / "just")
    C.save_config(cfg, tmp_path / "just" / "config.yaml")
    rng = torch.get_rng_state()
    scorer = DevScorer(cfg, rank=0)
    got = scorer.score(SimpleNamespace(module=model), zero_stage=0)  # the engine's module under ZeRO 0-2
    assert torch.equal(torch.get_rng_state(), rng), "scoring must not move the training RNG"
    assert model.training, "the run's own model stays in training mode"
    ev, _ = evaluate(str(tmp_path / "just"), str(multilingual), split="valid")
    langs = ev.languages
    assert len(langs) >= 2 and got["dev/num_utterances"] == ev.summary["num_utterances"]
    for key in ("cer", "wer", *(f"cer/lang/{lang}" for lang in langs), *(f"wer/lang/{lang}" for lang in langs)):
        assert got[f"dev/{key}"] == pytest.approx(ev.summary[key]), key
    assert all(f"{lang} " in dev_line(3, got) for lang in langs)

    valid = load_labelled_set(str(multilingual), split="valid")
    shortest = min(len(a) for a in valid.audio) / valid.sample_rate / 60.0
    assert len(DevScorer(C.apply_overrides(cfg, [f"finetune.dev_minutes={1.01 * shortest}"]), rank=0).labelled) == 1
    with pytest.raises(ValueError, match="finetune.dev_minutes"):
        C.apply_overrides(cfg, ["finetune.dev_minutes=-1"])
