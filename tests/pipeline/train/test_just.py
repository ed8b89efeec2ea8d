"""JUST's step on one process: the supervised loss reads the labelled utterances only, the
logged loss is the weighted sum of the three parts it logs, and a batch without
transcripts trains w2v-BERT's losses alone."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.text import Vocabulary
from pipeline.train import engine as E
from pipeline.train.just import JustStep
from pipeline.train.loop import LoopHooks, TrainLoop
from pipeline.train.transcripts import Targets

VOCAB = Vocabulary.from_characters("abcde")
LABELLED = {"u0": "ab cd", "u2": "bad"}  # u1 and u3 have no transcript


@pytest.fixture(scope="module", autouse=True)
def process_group():
    E.ensure_process_group("gloo")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*overrides: str) -> C.Config:
    return C.apply_overrides(C.just_laptop(), [
        "finetune.vocab=abcde", "finetune.vocab_from_data=false", f"model.just.vocab_size={len(VOCAB)}",
        "train.log_every=1", "schedule.warmup_steps=1", "train.max_steps=3", "deepspeed.zero_stage=0",
        "model.just.ctc_weight=0.5", *overrides,
    ])


LENGTHS = {"u0": 14400, "u1": 16000, "u2": 12000, "u3": 16000}


def _targets() -> Targets:
    return Targets(ids={k: np.asarray(VOCAB.encode(t)) for k, t in LABELLED.items()},
                   num_samples={k: LENGTHS[k] for k in LABELLED})


def _batch(seed: int = 0, ids: tuple[str, ...] = ("u0", "u1", "u2", "u3")) -> dict:
    rng = np.random.default_rng(seed)
    width = max(LENGTHS[i] for i in ids)
    source = np.zeros((len(ids), width), np.float32)
    pad = np.ones((len(ids), width), bool)
    for b, utt in enumerate(ids):
        source[b, :LENGTHS[utt]] = rng.standard_normal(LENGTHS[utt]).astype(np.float32)
        pad[b, :LENGTHS[utt]] = False
    return {"source": source, "padding_mask": pad, "num_samples": np.asarray([LENGTHS[i] for i in ids]),
            "ids": np.asarray(ids)}


def _model(cfg: C.Config) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_pretraining_model(cfg.model)


def _ctc_sum(step: JustStep, model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        prepared = step.prepare(batch, step=1, micro=0, rank=0, device=torch.device("cpu"))
        out = step.forward(model, prepared, step=1)
    return float(out.metrics["ctc/loss_sum"])


def test_the_ctc_loss_reads_only_the_labelled_utterances() -> None:
    cfg = _cfg()
    model = _model(cfg).eval()  # argmax codes, no dropout: the same input gives the same output
    step = JustStep(cfg, model, _targets())
    base = _batch(0)
    ref = _ctc_sum(step, model, base)
    assert ref > 0
    other = _batch(1)
    unlabelled_changed = {**base, "source": base["source"].copy()}
    for row in (1, 3):  # u1, u3: other audio of the same length (the same masks)
        unlabelled_changed["source"][row] = other["source"][row]
    assert _ctc_sum(step, model, unlabelled_changed) == pytest.approx(ref, rel=1e-6)
    labelled_changed = {**base, "source": base["source"].copy()}
    labelled_changed["source"][0] = other["source"][0]
    assert abs(_ctc_sum(step, model, labelled_changed) - ref) > 1e-3 * ref
    # The reference by hand: CTC of the labelled rows' head scores.
    with torch.no_grad():
        prepared = step.prepare(base, step=1, micro=0, rank=0, device=torch.device("cpu"))
        out = step.run(model, prepared)
        rows = [0, 2]
        log_probs = torch.log_softmax(out.ctc_logits[rows], -1).transpose(0, 1)
        targets = [torch.as_tensor(VOCAB.encode(LABELLED[u])) for u in ("u0", "u2")]
        by_hand = torch.nn.functional.ctc_loss(log_probs, torch.cat(targets), out.output_lengths[rows],
                                               torch.tensor([len(t) for t in targets]), reduction="sum")
    assert ref == pytest.approx(float(by_hand), rel=1e-5)
    # No transcript in the batch: nothing supervised.
    assert _ctc_sum(step, model, _batch(0, ("u1", "u3"))) == 0.0


class Record(LoopHooks):
    def __init__(self) -> None:
        self.logs: dict[int, dict[str, float]] = {}

    def on_log(self, step, metrics, alarms):
        self.logs[step] = dict(metrics)


def test_the_loop_logs_three_losses_whose_weighted_sum_is_the_loss() -> None:
    cfg = _cfg()
    model = _model(cfg)

    def batches() -> Iterator[dict]:
        seed = 0
        while True:
            yield _batch(seed)
            seed += 1

    rec = Record()
    step = JustStep(cfg, model, _targets())
    TrainLoop(cfg, E.build_engine(cfg, model), step, hooks=rec).run(batches())
    assert sorted(rec.logs) == [1, 2, 3]
    chars = sum(len(VOCAB.encode(t)) for t in LABELLED.values())
    for s, m in rec.logs.items():
        parts = (m["loss/contrastive"] + cfg.model.loss.diversity_weight * m["loss/diversity"] + m["loss/mlm"]
                 + 0.5 * m["loss/ctc"])
        assert m["loss"] == pytest.approx(parts, rel=1e-5), f"update {s}"
        assert m["labelled_share"] == 0.5 and m["loss/ctc"] > 0 and m["frames_per_token"] > 1
        frames = model.encoder.feature_encoder.output_lengths(torch.tensor([LENGTHS["u0"], LENGTHS["u2"]])).sum()
        assert m["frames_per_token"] == pytest.approx(float(frames) / chars)  # the labelled rows' alone


def test_a_run_is_refused_before_it_starts_without_transcripts_or_with_crops(tmp_path) -> None:
    from pipeline.train.just import resolve_config

    with pytest.raises(ValueError, match="data.batch_mode"):
        resolve_config(C.apply_overrides(_cfg(), ["data.batch_mode=crop"]))
    with pytest.raises(ValueError, match="vocab_size = 3"):
        resolve_config(C.apply_overrides(_cfg(), ["model.just.vocab_size=3"]))
    cfg = _cfg()
    step = JustStep(cfg, _model(cfg), _targets())
    cropped = _batch(0)
    cropped["num_samples"] = np.asarray([12000, 16000, 12000, 16000])
    with pytest.raises(ValueError, match="u0.*cropped"):
        step.prepare(cropped, step=1, micro=0, rank=0, device=torch.device("cpu"))
