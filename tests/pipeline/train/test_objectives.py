"""Every objective through the one loop: BEST-RQ's step on one process (its loss, metrics and
health; its quantizer frozen through updates, a checkpoint and a resume), the objective
chosen by ``model.objective`` alone, and the time budget that compares objectives at
equal compute. The 2-worker ZeRO-2 run with Ray is in test_fault_tolerance.py."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.train import checkpoint as ckpt
from pipeline.train import engine as E
from pipeline.train.loop import LoopHooks, TrainLoop
from pipeline.train.masked_prediction import MaskedPredictionStep
from pipeline.train.objectives import pretraining_step
from pipeline.train.pretrain import PretrainStep


@pytest.fixture(scope="module", autouse=True)
def process_group():
    E.ensure_process_group("gloo")


def speechlike(seed: int = 0) -> Iterator[dict]:
    """3 x 1 s of noise bursts at changing pitch: spectra that vary, as speech does."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    while True:
        rows = []
        for _ in range(3):
            f0 = rng.uniform(100, 300)
            envelope = (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0).astype(np.float32)
            x = np.sin(2 * np.pi * f0 * t * (1 + 0.2 * t)) + 0.3 * rng.standard_normal(16000)
            rows.append((x * envelope).astype(np.float32))
        source = np.stack(rows)
        yield {"source": source, "padding_mask": np.zeros_like(source, dtype=bool)}


class Record(LoopHooks):
    def __init__(self, cfg: C.Config | None = None, out: Path | None = None, save_at: int = -1) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.cfg, self.out, self.save_at, self.eng = cfg, out, save_at, None

    def on_log(self, step, metrics, alarms):
        self.logs.append((step, dict(metrics)))

    def should_checkpoint(self, step):
        return step == self.save_at

    def on_checkpoint(self, step, metrics):
        if step == self.save_at:
            ckpt.save(self.out / ckpt.checkpoint_dir_name(step), cfg=self.cfg, engine=self.eng.engine, step=step,
                      skipped_steps=0, data_position=None, metrics=metrics,
                      train_seconds=metrics.get("train_seconds", 0.0))


def _best_rq(*overrides: str) -> C.Config:
    return C.apply_overrides(C.best_rq_laptop(), ["train.log_every=1", "schedule.warmup_steps=2", *overrides])


def test_the_objective_picks_the_step() -> None:
    for cfg, step_class in ((C.laptop(), PretrainStep), (C.best_rq_laptop(), MaskedPredictionStep)):
        assert isinstance(pretraining_step(cfg, build_pretraining_model(cfg.model)), step_class)
    swapped = C.apply_overrides(C.laptop(), ["model.objective=best_rq"])  # any front end, any objective
    assert isinstance(pretraining_step(swapped, build_pretraining_model(swapped.model)), MaskedPredictionStep)


@pytest.mark.parametrize("stage", [0, 2])
def test_best_rq_trains_with_its_quantizer_frozen_through_a_checkpoint_and_resume(tmp_path: Path, stage: int) -> None:
    cfg = _best_rq("train.max_steps=6", f"deepspeed.zero_stage={stage}")
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    frozen = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    eng = E.build_engine(cfg, model)
    rec = Record(cfg, tmp_path, save_at=3)
    rec.eng = eng
    TrainLoop(cfg, eng, MaskedPredictionStep(cfg, model), hooks=rec).run(speechlike())
    full = dict(rec.logs)
    first, last = full[1], full[6]
    assert math.isfinite(last["loss/masked_ce"]) and last["loss"] == pytest.approx(last["loss/masked_ce"])
    assert first["loss/masked_ce"] == pytest.approx(math.log(cfg.model.best_rq.codebook_size), abs=0.7)
    assert 0.0 <= last["accuracy"] <= 1.0 and last["perplexity/target_0"] > 2.0
    assert all(torch.equal(eng.module.quantizer.state_dict()[k], v) for k, v in frozen.items()), "trained targets"

    # The checkpoint holds the quantizer; a model built with another seed gets it back on resume.
    d = tmp_path / ckpt.checkpoint_dir_name(3)
    from models.checkpoint import load_weights

    saved = load_weights(d)
    assert torch.equal(saved["quantizer.projection"], frozen["projection"])
    other = C.apply_overrides(cfg, ["model.best_rq.seed=99"])
    torch.manual_seed(99)
    model2 = build_pretraining_model(other.model)
    assert not torch.equal(model2.quantizer.projection, frozen["projection"])
    eng2 = E.build_engine(cfg, model2)
    state = ckpt.load(d, engine=eng2.engine, cfg=cfg)
    assert torch.equal(eng2.module.quantizer.projection, frozen["projection"])
    data = speechlike()
    for _ in range(3):
        next(data)
    rec2 = Record()
    TrainLoop(cfg, eng2, MaskedPredictionStep(cfg, model2), start_step=state.step, hooks=rec2).run(data)
    for s, m in rec2.logs:
        assert m["loss"] == pytest.approx(full[s]["loss"], abs=1e-5), f"update {s}"


def test_the_health_alarm_knows_the_objectives_chance_level() -> None:
    from pipeline.train.metrics import check_health

    cfg = _best_rq()
    health = MaskedPredictionStep(cfg, build_pretraining_model(cfg.model)).health()
    chance = math.log(cfg.model.best_rq.codebook_size)
    at_chance = {"loss/masked_ce": chance - 0.01, "perplexity/target_0": 40.0}
    alarms = check_health(at_chance, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health)
    assert [a.key for a in alarms] == ["alarm_chance_level"] and f"ln({cfg.model.best_rq.codebook_size})" in alarms[0].message
    collapsed = {"loss/masked_ce": 1.0, "perplexity/target_0": 1.2, "perplexity/prediction_0": 1.0}
    alarms = check_health(collapsed, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health)
    assert [a.key for a in alarms] == ["alarm_codebook_collapse"] and "perplexity/target_0" in alarms[0].message


def test_a_time_budget_ends_the_run_and_survives_a_resume(tmp_path: Path) -> None:
    cfg = _best_rq("train.max_steps=100000", "train.max_seconds=3")
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    rec = Record()
    result = TrainLoop(cfg, eng, MaskedPredictionStep(cfg, model), hooks=rec).run(speechlike())
    seconds = rec.logs[-1][1]["train_seconds"]
    assert 1 <= result.step < 100000 and 3.0 <= seconds < 30.0
    # Resumed with the budget spent, it stops after one update.
    rec2 = Record()
    again = TrainLoop(cfg, eng, MaskedPredictionStep(cfg, model), start_step=result.step, hooks=rec2,
                      train_seconds=seconds).run(speechlike())
    assert again.step == result.step + 1


@pytest.mark.parametrize("preset", ["best_rq_laptop", "w2v_bert_laptop"])
def test_a_log_mel_conformer_checkpoint_fine_tunes_with_ctc(tmp_path: Path, preset: str) -> None:
    """jobs.finetune's model from a BEST-RQ or w2v-BERT checkpoint: the source's architecture
    (log-mel front end, Conformer), its encoder weights, a fresh CTC head that trains on
    padded batches."""
    from models.checkpoint import save_weights
    from pipeline.train import finetune as FT

    pre_cfg = C.preset_config(preset)
    torch.manual_seed(0)
    pre = build_pretraining_model(pre_cfg.model)
    save_weights(pre, tmp_path / "pre")
    C.save_config(pre_cfg, tmp_path / "pre" / C.CONFIG_FILE)
    cfg = FT.resolve_config(C.apply_overrides(C.tiny(), [
        f"train.init_from={tmp_path / 'pre'}", "data.batch_mode=pad", "finetune.vocab=abc",
    ]))
    assert cfg.model.frontend.kind == "logmel" and cfg.model.transformer.kind == "conformer"
    assert cfg.model.mask.prob == C.tiny().model.mask.prob  # the regularisers are the fine-tuning run's
    model = FT.build_model(cfg, vocab_size=5)
    for name, value in pre.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    source = torch.randn(2, 16000)
    pad = torch.zeros(2, 16000, dtype=torch.bool)
    pad[1, 9000:] = True
    out = model(source, pad)
    assert out.logits.shape[:2] == (2, 24) and out.output_lengths.tolist() == [24, 13]
    out.logits.sum().backward()
    assert model.head.weight.grad is not None


@pytest.mark.parametrize(("preset", "parts"), [
    ("laptop", ("contrastive",)),
    ("best_rq_laptop", ("masked_ce",)),
    ("w2v_bert_laptop", ("contrastive", "mlm")),
    ("data2vec_laptop", ("regression",)),
    ("data2vec2_laptop", ("regression",)),  # 4 clones of each utterance
    ("wav2vec_laptop", ("binary_contrastive",)),
    ("vq_wav2vec_laptop", ("binary_contrastive",)),
    ("apc_laptop", ("l1",)),
    ("tera_laptop", ("l1",)),
    ("vq_bert_laptop", ("masked_ce",)),  # tokens in, not audio
])
def test_each_languages_loss_pools_back_into_the_total(preset: str, parts: tuple[str, ...]) -> None:
    """On a multilingual batch the step gives each utterance's loss parts (the first, the
    main one, also as ``loss/lang/<code>``): for every part the languages' losses weighted
    by their shares of the counted units (masked frames, true pairs, values: the same units
    for every part of these objectives) are the logged ``loss/<part>``; the languages'
    losses differ (each is its own utterances', not the batch's); and the per-language
    names are the parts times the languages, whatever the batches held. One update: the
    sums over micro-batches and updates are the loop's (test_loop.py)."""
    cfg = C.apply_overrides(C.preset_config(preset), ["train.max_steps=1", "train.log_every=1",
                                                      "schedule.warmup_steps=1"])
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    step = pretraining_step(cfg, model)
    assert step.row_losses and step.row_part_names == parts
    rec = Record()

    tokens = np.random.default_rng(0)

    def tagged() -> Iterator[dict]:
        for batch in speechlike():
            if preset == "vq_bert_laptop":  # the tokens a label set would join with the batch
                batch["target_ids"] = tokens.integers(0, model.codebook_size, (3, 50))
            yield {**batch, "languages": np.asarray(["sw", "yo", "yo"])}

    TrainLoop(cfg, E.build_engine(cfg, model), step, hooks=rec, languages=("sw", "yo", "zu")).run(tagged())
    ((_, m),) = rec.logs
    share = {lang: m[f"lang_share/{lang}"] for lang in ("sw", "yo")}
    assert share["sw"] + share["yo"] == pytest.approx(1.0) and share["sw"] > 0 and m["lang_share/zu"] == 0.0
    assert sorted(k for k in m if "/lang/" in k) == sorted(
        f"loss/{p}lang/{lang}" for p in ("", *(f"{q}/" for q in parts)) for lang in ("sw", "yo", "zu"))
    assert m[f"loss/{parts[0]}/lang/sw"] == m["loss/lang/sw"] and m[f"loss/{parts[0]}/lang/yo"] == m["loss/lang/yo"]
    for part in parts:
        per = {lang: m[f"loss/{part}/lang/{lang}"] for lang in ("sw", "yo")}
        assert math.isnan(m[f"loss/{part}/lang/zu"]), f"{part}: a language with no utterance has no loss"
        assert math.isfinite(per["sw"]) and math.isfinite(per["yo"]) and per["sw"] != per["yo"], part
        weighted = share["sw"] * per["sw"] + share["yo"] * per["yo"]
        assert weighted == pytest.approx(m[f"loss/{part}"], rel=1e-5), part


def test_w2v_berts_per_utterance_parts_are_each_utterances_own() -> None:
    """Each utterance's masked-LM part is the model's loss function on that utterance alone
    (and its contrastive part InfoNCE on it alone); the rows add up to the batch's sums."""
    from models.losses import masked_cross_entropy

    cfg = C.w2v_bert_laptop()
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model).eval()
    step = pretraining_step(cfg, model)
    batch = {**next(speechlike()), "languages": np.asarray(["sw", "yo", "yo"])}
    with torch.no_grad():
        prepared = step.prepare(batch, step=0, micro=0, rank=0, device=torch.device("cpu"))
        out = step.run(model, prepared)
        rows = step.w2v_bert_rows(out, prepared)["row_parts"]
    mask = out.contrastive.mask_time_indices  # (B, T)
    for b in range(3):
        alone, _ = masked_cross_entropy(out.mlm_logits[b:b + 1], out.target_ids[b:b + 1], mask[b:b + 1])
        assert float(rows["mlm"][0][b]) == pytest.approx(float(alone), rel=1e-5), b
        per_frame = torch.logsumexp(out.contrastive.logits[b], -1) - out.contrastive.logits[b, :, 0]  # (T,)
        assert float(rows["contrastive"][0][b]) == pytest.approx(float(per_frame[mask[b]].sum()), rel=1e-5), b
    assert rows["mlm"][1].tolist() == rows["contrastive"][1].tolist() == mask.sum(dim=1).tolist()
    assert float(rows["mlm"][0].sum()) == pytest.approx(float(out.mlm_sum), rel=1e-5)
    assert float(rows["contrastive"][0].sum()) == pytest.approx(float(out.contrastive.contrastive_sum), rel=1e-5)


def test_w2v_bert_logs_its_loss_parts_and_resumes_exactly(tmp_path: Path) -> None:
    """w2v-BERT's step in the loop under ZeRO-2: the logged loss is the weighted sum of the parts
    it logs (contrastive, diversity, masked-LM), the masked-LM starts at chance ln(entries),
    and a resume from a checkpoint repeats every later update's loss (masks, distractors,
    Gumbel noise and temperature included)."""
    from pipeline.train.w2v_bert import W2vBertStep

    cfg = C.apply_overrides(C.w2v_bert_laptop(), [
        "train.log_every=1", "schedule.warmup_steps=2", "train.max_steps=6", "deepspeed.zero_stage=2",
        "model.w2v_bert.mlm_weight=0.5",
    ])
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    step = pretraining_step(cfg, model)
    assert isinstance(step, W2vBertStep)
    eng = E.build_engine(cfg, model)
    rec = Record(cfg, tmp_path, save_at=3)
    rec.eng = eng
    TrainLoop(cfg, eng, step, hooks=rec).run(speechlike())
    full = dict(rec.logs)
    for s, m in full.items():
        parts = m["loss/contrastive"] + cfg.model.loss.diversity_weight * m["loss/diversity"] + 0.5 * m["loss/mlm"]
        assert m["loss"] == pytest.approx(parts, rel=1e-5), f"update {s}"
    assert full[1]["loss/mlm"] == pytest.approx(math.log(cfg.model.quantizer.entries), abs=0.7)
    last = full[6]
    assert 0.0 <= last["accuracy/mlm"] <= 1.0 and 0.0 <= last["accuracy"] <= 1.0
    assert last["perplexity/code_0"] > 2.0 and last["temperature"] < full[1]["temperature"]

    torch.manual_seed(99)
    model2 = build_pretraining_model(cfg.model)
    eng2 = E.build_engine(cfg, model2)
    state = ckpt.load(tmp_path / ckpt.checkpoint_dir_name(3), engine=eng2.engine, cfg=cfg)
    data = speechlike()
    for _ in range(3):
        next(data)
    rec2 = Record()
    TrainLoop(cfg, eng2, pretraining_step(cfg, model2), start_step=state.step, hooks=rec2).run(data)
    assert [s for s, _ in rec2.logs] == [4, 5, 6]
    for s, m in rec2.logs:
        for key in ("loss", "loss/mlm", "loss/contrastive", "temperature"):
            assert m[key] == pytest.approx(full[s][key], abs=1e-5), f"update {s}: {key}"

