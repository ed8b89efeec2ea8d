"""JUST's step on one process: the supervised loss reads the labelled utterances only, the
logged loss is the weighted sum of the three parts it logs, and a batch without
transcripts trains w2v-BERT's losses alone; each part's per-language losses, on one
process and on two ranks of which one has no transcript."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.net import free_port
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
                                               torch.tensor([len(t) for t in targets]), reduction="none")
    assert ref == pytest.approx(float(by_hand.sum()), rel=1e-5)
    # A batch with languages gives each utterance's CTC loss and characters: the labelled
    # rows' by hand, 0 and 0 for the unlabelled ones; the total is the same.
    with torch.no_grad():
        tagged = {**base, "languages": np.asarray(["aa", "aa", "bb", "cc"])}
        stepped = step.forward(model, step.prepare(tagged, step=1, micro=0, rank=0, device=torch.device("cpu")),
                               step=1)
    loss, chars = stepped.row_parts["ctc"]
    assert loss.tolist() == pytest.approx([float(by_hand[0]), 0.0, float(by_hand[1]), 0.0], rel=1e-5)
    assert chars.tolist() == [len(targets[0]), 0, len(targets[1]), 0]
    assert float(stepped.metrics["ctc/loss_sum"]) == pytest.approx(ref, rel=1e-6)
    assert sorted(stepped.row_parts) == ["contrastive", "ctc", "mlm"]
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


def test_each_part_pools_back_per_language_and_an_unlabelled_language_has_no_ctc() -> None:
    """Languages aa (u0 labelled, u1 not), bb (u2 labelled) and cc (u3, never labelled):
    the contrastive and masked-LM losses of each language, weighted by its share of the
    masked frames, pool back into ``loss/contrastive`` and ``loss/mlm``; the CTC loss of
    each, weighted by its share of the labelled characters, into ``loss/ctc``. cc counted
    no character: its ``loss/ctc/lang/cc`` is NaN (there, as every name is on every rank),
    while its self-supervised losses are finite."""
    cfg = _cfg("train.max_steps=2", "train.log_every=2")
    model = _model(cfg)
    languages = {"u0": "aa", "u1": "aa", "u2": "bb", "u3": "cc"}

    def batches() -> Iterator[dict]:
        seed = 0
        while True:
            batch = _batch(seed)
            yield {**batch, "languages": np.asarray([languages[str(u)] for u in batch["ids"]])}
            seed += 1

    rec = Record()
    TrainLoop(cfg, E.build_engine(cfg, model), JustStep(cfg, model, _targets()), hooks=rec,
              languages=("aa", "bb", "cc")).run(batches())
    m = rec.logs[2]
    share = {lang: m[f"lang_share/{lang}"] for lang in ("aa", "bb", "cc")}
    assert sum(share.values()) == pytest.approx(1.0) and min(share.values()) > 0
    for part in ("contrastive", "mlm"):
        per = {lang: m[f"loss/{part}/lang/{lang}"] for lang in share}
        assert all(np.isfinite(v) for v in per.values()) and len(set(per.values())) == 3, part
        assert sum(share[lang] * per[lang] for lang in share) == pytest.approx(m[f"loss/{part}"], rel=1e-5), part
    assert np.isnan(m["loss/ctc/lang/cc"])
    chars = {"aa": len(VOCAB.encode(LABELLED["u0"])), "bb": len(VOCAB.encode(LABELLED["u2"]))}
    ctc = {lang: m[f"loss/ctc/lang/{lang}"] for lang in chars}
    assert np.isfinite(ctc["aa"]) and np.isfinite(ctc["bb"]) and ctc["aa"] != ctc["bb"]
    pooled = sum(chars[lang] * ctc[lang] for lang in chars) / sum(chars.values())
    assert pooled == pytest.approx(m["loss/ctc"], rel=1e-5)


def _two_ranks_main(rank: int, port: int, out: str) -> None:
    """Rank 0 trains on u0 (aa, labelled) and u1 (aa); rank 1 on u3 (cc) and u1: no
    transcript, so its micro-batches give no ctc part at all."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cfg = _cfg("train.max_steps=2", "train.log_every=2")
    model = _model(cfg)
    ids = ("u0", "u1") if rank == 0 else ("u3", "u1")
    languages = {"u0": "aa", "u1": "aa", "u3": "cc"}

    def batches() -> Iterator[dict]:
        seed = rank
        while True:
            yield {**_batch(seed, ids), "languages": np.asarray([languages[u] for u in ids])}
            seed += 2

    rec = Record()
    TrainLoop(cfg, E.build_engine(cfg, model), JustStep(cfg, model, _targets()), hooks=rec,
              languages=("aa", "bb", "cc")).run(batches())
    torch.save(rec.logs, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_reduce_the_same_per_language_names_when_one_has_no_transcript(tmp_path: Path) -> None:
    """The loop all-reduces one vector of metric sums: a name only the rank with transcripts
    had would break it. Both ranks log the same names and values; the CTC loss is aa's
    alone (its only labelled utterance), bb and cc have none (NaN), and cc's self-supervised
    losses come from rank 1."""
    torch.multiprocessing.spawn(_two_ranks_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    logs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert sorted(logs[0]) == sorted(logs[1]) == [2]
    m, other = logs[0][2], logs[1][2]
    assert sorted(m) == sorted(other)
    for key in (k for k in m if "lang" in k or k.startswith("loss")):
        assert m[key] == pytest.approx(other[key], nan_ok=True), key
    assert m["loss/ctc/lang/aa"] == pytest.approx(m["loss/ctc"], rel=1e-6)
    assert np.isnan(m["loss/ctc/lang/bb"]) and np.isnan(m["loss/ctc/lang/cc"])
    assert np.isfinite(m["loss/mlm/lang/cc"]) and m["lang_share/cc"] > 0 and m["lang_share/bb"] == 0


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
