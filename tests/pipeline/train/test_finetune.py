"""The CTC fine-tuning step on one process: freezing, learning, whole utterances, init sources."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_weights
from models.factory import build_pretraining_model
from models.hf import save_hf_pretraining
from pipeline import config as C
from pipeline.text import Vocabulary
from pipeline.train import engine as E
from pipeline.train import finetune as FT
from pipeline.train.loop import LoopHooks, TrainLoop

VOCAB = Vocabulary.from_characters("abcde")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    E.ensure_process_group("gloo")


pytestmark = pytest.mark.usefixtures("one_thread")


def finetune_cfg(*overrides: str) -> C.Config:
    return C.apply_overrides(C.tiny(), [
        "data.batch_mode=pad", "data.max_sample_size=64000", "data.min_sample_size=1000",
        "data.max_samples_per_batch=256000", "schedule.kind=tri_stage", "schedule.warmup_steps=0",
        "optim.weight_decay=0.0", "optim.lr=0.003", "model.mask.prob=0.2", "model.mask.channel_prob=0.1",
        "model.mask.channel_length=8", "finetune.vocab=abcde", "train.log_every=1", *overrides,
    ])


def batches(targets: FT.Targets, seed: int = 0) -> Iterator[dict]:
    """The same two padded batches of noise over and over (utterances of 0.6-0.9 s)."""
    rng = np.random.default_rng(seed)
    ids = sorted(targets.ids)
    fixed = []
    for group in (ids[:3], ids[3:]):
        lengths = np.asarray([targets.num_samples[i] for i in group])
        width = int(lengths.max())
        source = np.zeros((len(group), width), np.float32)
        pad = np.ones((len(group), width), bool)
        for b, n in enumerate(lengths):
            source[b, :n] = rng.standard_normal(n).astype(np.float32)
            pad[b, :n] = False
        fixed.append({"source": source, "padding_mask": pad, "num_samples": lengths, "ids": np.asarray(group)})
    while True:
        yield from fixed


def toy_targets() -> FT.Targets:
    rng = np.random.default_rng(1)
    texts = ["ab cd", "e", "abc", "dd ea", "bad", "c"]
    ids = {f"u{i}": np.asarray(VOCAB.encode(t)) for i, t in enumerate(texts)}
    return FT.Targets(ids=ids, num_samples={k: int(rng.integers(9600, 14400)) for k in ids})


class Snapshots(LoopHooks):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.logs: dict[int, dict[str, float]] = {}
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def on_log(self, step, metrics, alarms):
        self.logs[step] = dict(metrics)
        self.params[step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


def test_frozen_transformer_then_training_and_the_loss_falls() -> None:
    cfg = FT.resolve_config(finetune_cfg("train.max_steps=30", "finetune.freeze_encoder_steps=3"))
    torch.manual_seed(cfg.train.seed)
    model = FT.build_model(cfg, len(VOCAB))
    eng = E.build_engine(cfg, model)
    targets = toy_targets()
    rec = Snapshots(model)
    TrainLoop(cfg, eng, FT.FinetuneStep(cfg, model, targets), hooks=rec).run(batches(targets))
    before = {k: v.clone() for k, v in rec.params[1].items()}
    # Updates 0-2 are frozen: only the head moves; the feature encoder never does.
    assert _changed(rec.params[1], rec.params[2], "head.")
    for step in (2, 3):
        assert not _changed(rec.params[step - 1], rec.params[step], "encoder.transformer.")
        assert not _changed(rec.params[step - 1], rec.params[step], "encoder.feature_projection.")
    assert rec.logs[3]["transformer_frozen"] == 1.0 and rec.logs[4]["transformer_frozen"] == 0.0
    assert _changed(rec.params[3], rec.params[4], "encoder.transformer.")
    assert not _changed(before, rec.params[30], "encoder.feature_encoder.")
    # The same two batches again and again: the CTC loss per character must fall a lot.
    first, last = rec.logs[1]["loss/ctc"], rec.logs[30]["loss/ctc"]
    assert np.isfinite(first) and last < 0.6 * first, (first, last)
    assert rec.logs[30]["loss"] == pytest.approx(last)


def test_a_multilingual_fine_tuning_logs_each_languages_ctc_loss() -> None:
    """Batches that carry languages: each language's CTC loss per character, weighted by its
    share of the characters, is ``loss/ctc``, and the total is the one the same batches
    without languages give (the per-utterance losses sum to what CTC's sum gives)."""
    cfg = FT.resolve_config(finetune_cfg("train.max_steps=2", "train.log_every=2"))
    targets = toy_targets()
    logs = {}
    for languages in ((), ("aa", "bb")):
        torch.manual_seed(cfg.train.seed)
        model = FT.build_model(cfg, len(VOCAB))
        rec = Snapshots(model)

        def tagged() -> Iterator[dict]:
            for batch in batches(targets):
                yield {**batch, "languages": np.asarray(["aa", "bb", "aa"][: len(batch["ids"])])}

        TrainLoop(cfg, E.build_engine(cfg, model), FT.FinetuneStep(cfg, model, targets), hooks=rec,
                  languages=languages).run(tagged() if languages else batches(targets))
        logs[languages] = rec.logs[2]
    m = logs[("aa", "bb")]
    weighted = m["lang_share/aa"] * m["loss/lang/aa"] + m["lang_share/bb"] * m["loss/lang/bb"]
    assert weighted == pytest.approx(m["loss/ctc"], rel=1e-5)
    assert m["loss/ctc"] == pytest.approx(logs[()]["loss/ctc"], rel=1e-5)
    assert [m[f"loss/ctc/lang/{lang}"] == m[f"loss/lang/{lang}"] for lang in ("aa", "bb")] == [True, True]
    assert not [k for k in logs[()] if "lang" in k]


def test_a_cropped_or_unknown_utterance_is_refused() -> None:
    cfg = FT.resolve_config(finetune_cfg())
    torch.manual_seed(0)
    model = FT.build_model(cfg, len(VOCAB))
    targets = toy_targets()
    step = FT.FinetuneStep(cfg, model, targets)
    batch = next(batches(targets))
    cropped = dict(batch, num_samples=batch["num_samples"] - np.asarray([0, 5, 0]))
    with pytest.raises(ValueError, match=r"cropped.*data.batch_mode=pad"):
        step.prepare(cropped, step=0, micro=0, rank=0, device=torch.device("cpu"))
    unknown = dict(batch, ids=np.asarray(["u0", "nope", "u2"]))
    with pytest.raises(ValueError, match="'nope': no transcript"):
        step.prepare(unknown, step=0, micro=0, rank=0, device=torch.device("cpu"))
    prepared = step.prepare(batch, step=0, micro=0, rank=0, device=torch.device("cpu"))
    assert float(prepared.count) == sum(len(targets.ids[i]) for i in batch["ids"])


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="data.batch_mode"):
        FT.resolve_config(finetune_cfg("data.batch_mode=crop"))
    with pytest.raises(ValueError, match="frontend"):
        FT.resolve_config(finetune_cfg("finetune.frontend=logmel", "train.init_from=/tmp"))
    with pytest.warns(UserWarning, match="weight_decay"):
        FT.resolve_config(finetune_cfg("finetune.freeze_encoder_steps=5", "optim.weight_decay=0.01"))
    assert FT.resolve_config(finetune_cfg("finetune.vocab=")).finetune.vocab == "abcdefghijklmnopqrstuvwxyz'"


@pytest.mark.parametrize("kind", ["wavray", "hf"])
def test_init_from_takes_the_architecture_and_weights_of_the_source(tmp_path: Path, kind: str) -> None:
    pre_cfg = C.apply_overrides(C.tiny(), ["model.transformer.num_layers=1", "model.transformer.ffn_dim=96"])
    torch.manual_seed(5)
    pre = build_pretraining_model(pre_cfg.model)
    src = tmp_path / "src"
    if kind == "wavray":
        save_weights(pre, src)
        C.save_config(pre_cfg, src / "config.yaml")
    else:
        save_hf_pretraining(pre, pre_cfg.model, src)
    cfg = FT.resolve_config(finetune_cfg(f"train.init_from={src}"))
    assert cfg.model.transformer.num_layers == 1 and cfg.model.transformer.ffn_dim == 96
    assert cfg.model.mask.prob == 0.2 and cfg.model.mask.channel_prob == 0.1  # the fine-tuning regularisers
    model = FT.build_model(cfg, len(VOCAB))
    ours = model.state_dict()
    for key, value in pre.state_dict().items():
        if key.startswith("encoder."):
            assert torch.allclose(ours[key], value), key
    assert all(not p.requires_grad for p in model.encoder.feature_encoder.parameters())


def test_logmel_baseline_model_runs_and_has_no_feature_encoder_weights() -> None:
    cfg = FT.resolve_config(finetune_cfg("finetune.frontend=logmel", "finetune.n_mels=40"))
    model = FT.build_model(cfg, len(VOCAB))
    assert not any(k.startswith("encoder.feature_encoder.") for k in model.state_dict())
    model.eval()
    out = model(torch.randn(2, 16000))
    assert out.logits.shape == (2, 49, len(VOCAB))
