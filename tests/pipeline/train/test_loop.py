"""The generic loop on one process: non-finite skips and stop, cadences, ZeRO stages, resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.train import checkpoint as ckpt
from pipeline.train import engine as E
from pipeline.train.loop import LoopHooks, NonFiniteLossError, TrainLoop
from pipeline.train.pretrain import PretrainStep


@pytest.fixture(scope="module", autouse=True)
def process_group():
    E.ensure_process_group("gloo")


def synthetic(nan_steps: frozenset[int] = frozenset(), *, accum: int = 1, seed: int = 0) -> Iterator[dict]:
    """Batches of 3 x 0.75 s noise; every micro-batch of the updates in ``nan_steps`` holds a NaN."""
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        source = rng.standard_normal((3, 12000)).astype(np.float32)
        if i // accum in nan_steps:
            source[0, 100] = np.nan
        yield {"source": source, "padding_mask": np.zeros((3, 12000), bool)}
        i += 1


def make(cfg: C.Config, init_seed: int | None = None) -> tuple[E.Engine, PretrainStep]:
    torch.manual_seed(cfg.train.seed if init_seed is None else init_seed)
    model = build_pretraining_model(cfg.model)
    return E.build_engine(cfg, model), PretrainStep(cfg, model)


class Record(LoopHooks):
    def __init__(self) -> None:
        self.logs: list[tuple[int, dict[str, float]]] = []
        self.params: list[torch.Tensor] = []
        self.eng: E.Engine | None = None

    def on_log(self, step, metrics, alarms):
        self.logs.append((step, dict(metrics)))
        if self.eng is not None:
            self.params.append(torch.cat([p.detach().flatten().clone() for p in self.eng.module.parameters()]))


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run() -> None:
    cfg = C.apply_overrides(C.tiny(), ["train.max_steps=12", "train.log_every=1", "train.max_nonfinite_steps=2",
                                       "schedule.warmup_steps=0"])
    eng, task = make(cfg)
    rec = Record()
    rec.eng = eng
    loop = TrainLoop(cfg, eng, task, hooks=rec)
    # Update 2 alone is bad (skipped, run goes on); 5, 6, 7 in a row exceed the limit of 2.
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive updates .*max_nonfinite_steps = 2"):
        loop.run(synthetic(frozenset({2, 5, 6, 7})))
    by_step = dict(rec.logs)
    assert by_step[2]["skipped_steps"] == 0 and by_step[3]["skipped_steps"] == 1
    assert by_step[3]["nonfinite_in_row"] == 1 and by_step[4]["nonfinite_in_row"] == 0
    assert by_step[7]["skipped_steps"] == 3
    assert max(rec.logs)[0] == 8, "the run must stop at the update that crossed the limit"
    # A skipped update leaves every parameter exactly as it was; a good one changes them.
    p = dict(zip([s for s, _ in rec.logs], rec.params, strict=True))
    assert torch.equal(p[2], p[3])
    assert not torch.equal(p[3], p[4])
    assert all(np.isfinite(v) for v in (by_step[4]["loss"], by_step[4]["grad_norm"]))


_STAGE_LOSSES: dict[int, list[float]] = {}


def _stage_losses(stage: int) -> list[float]:
    if stage not in _STAGE_LOSSES:
        cfg = C.apply_overrides(C.tiny(), ["train.max_steps=3", "train.log_every=1", f"deepspeed.zero_stage={stage}",
                                           "train.grad_accum=2", "schedule.warmup_steps=1"])
        eng, task = make(cfg)
        rec = Record()
        TrainLoop(cfg, eng, task, hooks=rec).run(synthetic(accum=2))
        _STAGE_LOSSES[stage] = [m["loss"] for _, m in rec.logs]
    return _STAGE_LOSSES[stage]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_match_stage0(stage: int) -> None:
    """fp32 on CPU: ZeRO-2/3 partition the same arithmetic; the first updates agree."""
    np.testing.assert_allclose(_stage_losses(stage), _stage_losses(0), rtol=2e-4)
    assert _stage_losses(0)[0] != _stage_losses(0)[-1]


class Saver(Record):
    def __init__(self, cfg: C.Config, out: Path):
        super().__init__()
        self.cfg, self.out, self.loop = cfg, out, None

    def should_checkpoint(self, step):
        return step == 3

    def on_checkpoint(self, step, metrics):
        if step == 3:
            ckpt.save(self.out / ckpt.checkpoint_dir_name(step), cfg=self.cfg, engine=self.eng.engine, step=step,
                      skipped_steps=0, data_position={"batches": step}, metrics=metrics)


@pytest.mark.parametrize("stage", [0, 2])
def test_checkpoint_resume_repeats_the_losses(tmp_path: Path, stage: int) -> None:
    cfg = C.apply_overrides(C.tiny(), ["train.max_steps=6", "train.log_every=1", f"deepspeed.zero_stage={stage}",
                                       "schedule.warmup_steps=2", "model.transformer.dropout=0.1"])
    eng, task = make(cfg)
    saver = Saver(cfg, tmp_path)
    saver.eng = eng
    TrainLoop(cfg, eng, task, hooks=saver).run(synthetic())
    full = {s: m for s, m in saver.logs}

    d = tmp_path / ckpt.checkpoint_dir_name(3)
    assert (d / "model.safetensors").is_file() and (d / "config.yaml").is_file()
    assert C.load_config(d / "config.yaml") == cfg
    eng2, task2 = make(cfg, init_seed=99)  # different weights: the load must restore them
    state = ckpt.load(d, engine=eng2.engine, cfg=cfg)
    assert state.step == 3 and state.data_position == {"batches": 3}
    # The Gumbel temperature buffer comes back as it was during update 2.
    assert float(eng2.module.quantizer.temperature) == pytest.approx(max(2.0 * 0.999995**2, 0.5), rel=1e-7)
    data = synthetic()
    for _ in range(3):
        next(data)  # the batches the first run consumed before the checkpoint
    rec = Record()
    TrainLoop(cfg, eng2, task2, start_step=3, hooks=rec).run(data)
    for s, m in rec.logs:
        assert m["loss"] == pytest.approx(full[s]["loss"], abs=1e-5), f"update {s}"
        assert m["lr"] == pytest.approx(full[s]["lr"])


def test_incomplete_checkpoint_is_refused_and_skipped(tmp_path: Path) -> None:
    cfg = C.apply_overrides(C.tiny(), ["train.max_steps=1", "deepspeed.zero_stage=2"])
    eng, _ = make(cfg)
    good = ckpt.save(tmp_path / ckpt.checkpoint_dir_name(1), cfg=cfg, engine=eng.engine, step=1,
                     skipped_steps=0, data_position=None)
    bad = ckpt.save(tmp_path / ckpt.checkpoint_dir_name(2), cfg=cfg, engine=eng.engine, step=2,
                    skipped_steps=0, data_position=None)
    # A crash before the last write: the state file never appeared.
    (bad / ckpt.STATE_FILE).unlink()
    with pytest.raises(ValueError, match="trainer_state.json missing"):
        ckpt.validate(bad)
    assert ckpt.latest_complete(tmp_path) == good
    # A crash while DeepSpeed's files were written: the state names a tag whose shard is gone.
    for f in (good / ckpt.DS_DIR).rglob("*optim_states.pt"):
        f.unlink()
    with pytest.raises(ValueError, match="incomplete: missing"):
        ckpt.validate(good)
    assert ckpt.latest_complete(tmp_path) is None
    # A copy without the model states (a listing of a store not whole yet), which DeepSpeed
    # itself would meet with a bare assertion.
    third = ckpt.save(tmp_path / ckpt.checkpoint_dir_name(3), cfg=cfg, engine=eng.engine, step=3,
                      skipped_steps=0, data_position=None)
    ckpt.validate(third)
    for f in (third / ckpt.DS_DIR).rglob("*model_states.pt"):
        f.unlink()
    with pytest.raises(ValueError, match=r"incomplete: missing \['deepspeed/step_000000003/mp_rank_\*_model_states"):
        ckpt.validate(third)


def _with_languages(batches: Iterator[dict], languages: list[str]) -> Iterator[dict]:
    for batch in batches:
        yield {**batch, "languages": np.asarray(languages, dtype=str)}


def test_a_multilingual_run_logs_each_languages_loss_and_share() -> None:
    """Batches of two German utterances and one French (the dataset also has Italian, which
    never comes): each language's loss is its utterances' contrastive loss per masked frame,
    so the languages' losses weighted by their shares of the masked frames give back
    ``loss/contrastive``; Italian has no frames (share 0, loss NaN). Over 2 updates of 2
    micro-batches, as the sums add up across micro-batches and updates."""
    cfg = C.apply_overrides(C.tiny(), ["train.max_steps=2", "train.log_every=2", "train.grad_accum=2",
                                       "schedule.warmup_steps=0"])
    eng, task = make(cfg)
    rec = Record()
    loop = TrainLoop(cfg, eng, task, hooks=rec, languages=("de", "fr", "it"))
    loop.run(_with_languages(synthetic(), ["de", "fr", "de"]))
    ((step, m),) = rec.logs
    assert step == 2
    assert m["lang_share/de"] + m["lang_share/fr"] == pytest.approx(1.0) and m["lang_share/it"] == 0.0
    assert 0.3 < m["lang_share/fr"] < 0.4  # one utterance of three, all of one length
    assert np.isnan(m["loss/lang/it"]) and np.isfinite(m["loss/lang/de"]) and np.isfinite(m["loss/lang/fr"])
    assert m["loss/lang/de"] != m["loss/lang/fr"]
    weighted = m["lang_share/de"] * m["loss/lang/de"] + m["lang_share/fr"] * m["loss/lang/fr"]
    assert weighted == pytest.approx(m["loss/contrastive"], rel=1e-5)
    # The step's loss part "contrastive" is the same loss, summed the same way.
    assert [m[f"loss/contrastive/lang/{lang}"] == m[f"loss/lang/{lang}"] for lang in ("de", "fr")] == [True, True]
    assert np.isnan(m["loss/contrastive/lang/it"])

    # The same run without languages logs none of it; a language the dataset lacks is an error.
    eng, task = make(cfg)
    rec = Record()
    TrainLoop(cfg, eng, task, hooks=rec).run(_with_languages(synthetic(), ["de", "fr", "de"]))
    assert not [k for k in rec.logs[0][1] if "lang" in k]
    assert rec.logs[0][1]["loss/contrastive"] == pytest.approx(m["loss/contrastive"], rel=1e-6), "same numbers"
    eng, task = make(cfg)
    with pytest.raises(ValueError, match="language 'xx' is not one of the dataset's"):
        TrainLoop(cfg, eng, task, languages=("de", "fr")).run(_with_languages(synthetic(), ["de", "xx", "de"]))


class _LatePart(PretrainStep):
    """wav2vec 2.0's step with a second loss part, ``per_frame`` (1 per masked frame), that
    only the micro-batches of updates from ``first`` on give; ``extra`` names a part it
    gives without declaring it."""

    row_part_names = ("contrastive", "per_frame")

    def __init__(self, cfg: C.Config, model: torch.nn.Module, *, first: int = 1, extra: str = "") -> None:
        super().__init__(cfg, model)
        self.first, self.extra = first, extra

    def forward(self, model, prepared, *, step):
        out = super().forward(model, prepared, step=step)
        if out.row_parts and step >= self.first:
            out.row_parts["per_frame"] = (out.row_count, out.row_count)
        if out.row_parts and self.extra:
            out.row_parts[self.extra] = (out.row_count, out.row_count)
        return out


def test_every_loss_part_has_its_per_language_loss_under_names_no_batch_changes() -> None:
    """A part that no micro-batch of a log interval gave still has its names (NaN: nothing
    counted), so every rank reduces the same metrics whatever its batches held; once given,
    its per-language loss is its own (here exactly 1 per masked frame, over 2 micro-batches).
    A part the task gives without declaring it stops the run: the loop would drop it."""
    cfg = C.apply_overrides(C.tiny(), ["train.max_steps=2", "train.log_every=1", "train.grad_accum=2",
                                       "schedule.warmup_steps=0"])
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    rec = Record()
    TrainLoop(cfg, E.build_engine(cfg, model), _LatePart(cfg, model), hooks=rec,
              languages=("de", "fr")).run(_with_languages(synthetic(), ["de", "fr", "de"]))
    (_, first), (_, second) = rec.logs
    names = sorted(k for k in first if "lang" in k)
    assert names == sorted(k for k in second if "lang" in k) == sorted(
        f"{key}/{lang}" for key in ("loss/lang", "lang_share", "loss/contrastive/lang", "loss/per_frame/lang")
        for lang in ("de", "fr"))
    assert np.isnan(first["loss/per_frame/lang/de"]) and np.isnan(first["loss/per_frame/lang/fr"])
    assert second["loss/per_frame/lang/de"] == 1.0 and second["loss/per_frame/lang/fr"] == 1.0
    assert second["loss/contrastive/lang/de"] == second["loss/lang/de"] != second["loss/lang/fr"]

    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    with pytest.raises(ValueError, match=r"\['typo'\] not among the task's row_part_names"):
        TrainLoop(cfg, E.build_engine(cfg, model), _LatePart(cfg, model, extra="typo"),
                  languages=("de", "fr")).run(_with_languages(synthetic(), ["de", "fr", "de"]))
