"""data2vec in the one loop, on one process: an update skipped for a non-finite loss moves
neither student nor teacher; the teacher comes back exactly from a checkpoint and the
resumed updates repeat the uninterrupted run's losses; the health alarm watches the stds;
data2vec 2.0's clones count for their utterance in the per-language losses.

The EMA on ZeRO-3's shards is pinned in test_deepspeed_compat.py (one rank) and in
test_fault_tolerance.py, where data2vec 2.0 runs on two workers under ZeRO-2 and ZeRO-3,
a worker is SIGKILLed in each, and both runs log the same losses."""

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
from pipeline.train.data2vec import Data2VecStep
from pipeline.train.deepspeed_compat import consolidated_state_dict
from pipeline.train.loop import LoopHooks, TrainLoop
from pipeline.train.objectives import pretraining_step


@pytest.fixture(scope="module", autouse=True)
def process_group():
    E.ensure_process_group("gloo")


def voices(seed: int = 0, *, nan_at: int = -1) -> Iterator[dict]:
    """2 x 1 s of tones at changing pitch over a noise floor; the batch at ``nan_at`` is NaN."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    i = 0
    while True:
        rows = []
        for _ in range(2):
            f0 = rng.uniform(100, 300)
            envelope = 0.2 + (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0)
            rows.append((envelope * np.sin(2 * np.pi * f0 * t) + 0.1 * rng.standard_normal(16000)).astype(np.float32))
        source = np.stack(rows)
        if i == nan_at:
            source[:] = np.nan
        i += 1
        yield {"source": source, "padding_mask": np.zeros_like(source, dtype=bool)}


class Record(LoopHooks):
    """Metrics after every update, the teacher after the updates in ``teachers_at`` (all when
    None); a checkpoint at ``save_at``."""

    def __init__(self, cfg: C.Config | None = None, out: Path | None = None, save_at: int = -1,
                 teachers_at: set[int] | None = None) -> None:
        self.logs: dict[int, dict[str, float]] = {}
        self.teachers: dict[int, dict[str, torch.Tensor]] = {}
        self.eng: E.Engine | None = None
        self.cfg, self.out, self.save_at, self.teachers_at = cfg, out, save_at, teachers_at

    def on_log(self, step, metrics, alarms):
        self.logs[step] = dict(metrics)
        if self.eng is not None and (self.teachers_at is None or step in self.teachers_at):
            state = consolidated_state_dict(self.eng.engine, self.eng.zero_stage)
            self.teachers[step] = {k: v.clone() for k, v in state.items() if k.startswith("teacher.")}

    def should_checkpoint(self, step):
        return step == self.save_at

    def on_checkpoint(self, step, metrics):
        if step == self.save_at:
            ckpt.save(self.out / ckpt.checkpoint_dir_name(step), cfg=self.cfg, engine=self.eng.engine, step=step,
                      skipped_steps=0, data_position=None, metrics=metrics)


def _cfg(preset: str, *overrides: str) -> C.Config:
    return C.apply_overrides(C.preset_config(preset), [
        "train.log_every=1", "schedule.warmup_steps=1", "deepspeed.zero3_persistence_threshold=0", *overrides,
    ])


def _run(cfg: C.Config, data: Iterator[dict], *, hooks: Record | None = None) -> tuple[Record, E.Engine]:
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    rec = hooks or Record()
    rec.eng = eng
    TrainLoop(cfg, eng, pretraining_step(cfg, model), hooks=rec).run(data)
    return rec, eng


def test_the_objective_picks_the_data2vec_step() -> None:
    for preset in ("data2vec_laptop", "data2vec2_laptop"):
        cfg = C.preset_config(preset)
        assert isinstance(pretraining_step(cfg, build_pretraining_model(cfg.model)), Data2VecStep)


def test_data2vec2s_clones_count_for_their_utterance() -> None:
    """On a batch with languages, utterance b's loss and masked frames are those of its M
    clones (rows b * M .. b * M + M - 1): each clone masks exactly floor(prob * n) of the
    utterance's n frames, so a shorter utterance counts M times fewer of its own, and its
    loss is its clones' squared errors at their masked frames."""
    cfg = _cfg("data2vec2_laptop")
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model).eval()
    step = pretraining_step(cfg, model)
    batch = next(voices())
    batch["padding_mask"][1, 9000:] = True
    batch["languages"] = np.asarray(["sw", "yo"])
    with torch.no_grad():
        prepared = step.prepare(batch, step=0, micro=0, rank=0, device=torch.device("cpu"))
        out = step.forward(model, prepared, step=0)
        again = step.prepare(batch, step=0, micro=0, rank=0, device=torch.device("cpu")).inputs  # the same draws
        raw = model(again["source"], again["padding_mask"], mask_time_indices=again["mask_time_indices"],
                    num_kept=again["num_kept"], generator=again["generator"])
    clones, prob = model.clones, model.mask_prob
    frames = model.encoder.feature_encoder.output_lengths(torch.tensor([16000, 9000])).tolist()
    assert clones > 1 and frames[1] < frames[0]
    assert out.row_count.tolist() == [clones * int(prob * n) for n in frames]
    err = (raw.predictions.float() - raw.targets).square().sum(dim=-1) * model.loss_scale  # (B * M, T)
    by_hand = (err * raw.mask_time_indices).sum(dim=1).view(2, clones).sum(dim=1)
    assert out.row_loss.tolist() == pytest.approx(by_hand.tolist(), rel=1e-5)
    assert float(out.row_loss.sum()) == pytest.approx(float(out.loss_sum), rel=1e-5)
    assert out.row_parts["regression"][0] is out.row_loss


def test_a_skipped_update_moves_neither_student_nor_teacher() -> None:
    cfg = _cfg("data2vec_laptop", "train.max_steps=4", "deepspeed.zero_stage=0")
    rec, eng = _run(cfg, voices(nan_at=2), hooks=Record(teachers_at={2, 3, 4}))
    assert [round(rec.logs[s]["skipped_steps"]) for s in range(1, 5)] == [0, 0, 1, 1]
    for name, value in rec.teachers[2].items():
        assert torch.equal(rec.teachers[3][name], value), f"update 3 was skipped but moved {name}"
    assert any(not torch.equal(rec.teachers[4][k], v) for k, v in rec.teachers[3].items()), "update 4 moves it again"


def test_the_teacher_comes_back_exactly_from_a_checkpoint(tmp_path: Path) -> None:
    """data2vec 1.0 under ZeRO-2 on one process (2.0 under ZeRO-2 and ZeRO-3 on two workers
    with a SIGKILL: test_fault_tolerance.py)."""
    stage = 2
    cfg = _cfg("data2vec_laptop", "train.max_steps=4", f"deepspeed.zero_stage={stage}")
    full = Record(cfg=cfg, out=tmp_path, save_at=2, teachers_at={2, 4})
    _run(cfg, voices(), hooks=full)
    # A model built from another seed has another student and teacher; the checkpoint restores both.
    torch.manual_seed(99)
    other = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, other)
    state = ckpt.load(tmp_path / ckpt.checkpoint_dir_name(2), engine=eng.engine, cfg=cfg)
    restored = consolidated_state_dict(eng.engine, stage)
    for name, value in full.teachers[2].items():
        assert torch.equal(restored[name], value), name
    data = voices()
    for _ in range(2):
        next(data)
    resumed = Record(teachers_at={4})
    resumed.eng = eng
    TrainLoop(cfg, eng, pretraining_step(cfg, other), hooks=resumed, start_step=state.step).run(data)
    assert sorted(resumed.logs) == [3, 4]
    for s in (3, 4):
        assert resumed.logs[s]["loss"] == pytest.approx(full.logs[s]["loss"], abs=1e-5), f"update {s}"
    for name, value in full.teachers[4].items():
        assert torch.allclose(resumed.teachers[4][name], value, atol=1e-6), name


def test_the_health_alarm_watches_the_stds_not_a_chance_level() -> None:
    from pipeline.train.metrics import check_health

    cfg = C.data2vec_laptop()
    health = Data2VecStep(cfg, build_pretraining_model(cfg.model)).health()
    assert health.chance is None
    fine = {"loss/regression": 0.0, "std/target": 0.5, "std/prediction": 0.3}
    assert check_health(fine, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health) == []
    for key, value in (("std/target", 0.05), ("std/prediction", 0.001)):
        alarms = check_health({**fine, key: value}, step=100, warmup_steps=10, chance_margin=0.05,
                              min_perplexity=2.0, health=health)
        assert [a.key for a in alarms] == ["alarm_representation_collapse"] and key in alarms[0].message
    assert check_health({**fine, "std/target": 0.0}, step=5, warmup_steps=10, chance_margin=0.05,
                        min_perplexity=2.0, health=health) == [], "not during warm-up"


def test_continued_pretraining_from_an_encoder_starts_the_teacher_as_that_encoder(tmp_path: Path) -> None:
    """``train.init_from`` weights without a teacher (an encoder, as a Hugging Face
    ``Data2VecAudioModel`` or another objective's checkpoint gives): the teacher is the
    loaded encoder, not the fresh one the model was built with."""
    from models.checkpoint import save_weights
    from pipeline.train.worker import PretrainTask

    cfg = C.data2vec_laptop()
    torch.manual_seed(5)
    source = build_pretraining_model(cfg.model)
    save_weights({k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}, tmp_path / "enc")
    C.save_config(cfg, tmp_path / "enc" / C.CONFIG_FILE)
    run = C.apply_overrides(cfg, [f"train.init_from={tmp_path / 'enc'}", f"checkpoint.storage_path={tmp_path}"])
    with pytest.warns(UserWarning, match="kept the initialisation"):
        model = PretrainTask().build_model(run)
    for name, value in source.encoder.transformer.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], value), name
