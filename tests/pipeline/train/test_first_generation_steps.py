"""wav2vec, vq-wav2vec, APC and Mockingjay/TERA through what wavray has, without Ray: the
objective picks the step (and is a sweep dimension), every objective trains and resumes
exactly on 2 ranks under ZeRO-2 (its Gumbel temperature and optimizer state included), the
health alarms know each objective's chance level (and that a regression loss has none),
the probe reads their hidden states, and their models leave as wavray bundles. Each
one's Ray Train run with MLflow is in test_fault_tolerance.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.factory import build_pretraining_model
from pipeline import config as C
from pipeline.net import free_port
from pipeline.train import checkpoint as ckpt
from pipeline.train import engine as E
from pipeline.train.loop import LoopHooks, TrainLoop
from pipeline.train.metrics import check_health
from pipeline.train.objectives import pretraining_step
from pipeline.train.reconstruction import ApcStep, TeraStep
from pipeline.train.wav2vec1 import FuturePredictionStep

RESUMED = ["wav2vec_laptop", "vq_wav2vec_laptop", "apc_laptop", "tera_laptop"]  # k-means: parameters only
STEPS, SAVE_AT = 3, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(rank: int, step: int, micro: int = 0) -> dict[str, np.ndarray]:
    """2 x 0.5 s of pitch sweeps in noise bursts (the second row padded), the same for a
    (rank, step) whichever run asks."""
    rng = np.random.default_rng(1000 * rank + 10 * step + micro)
    t = np.arange(8000) / 16000
    rows = []
    for _ in range(2):
        f0 = rng.uniform(100, 300)
        envelope = (np.sin(2 * np.pi * rng.uniform(4, 9) * t) > 0).astype(np.float32)
        rows.append((np.sin(2 * np.pi * f0 * t * (1 + t)) + 0.3 * rng.standard_normal(8000)) * envelope)
    source = np.stack(rows).astype(np.float32)
    pad = np.zeros_like(source, dtype=bool)
    pad[1, 6000:] = True
    source[pad] = 0.0
    return {"source": source, "padding_mask": pad}


def _config(preset: str, *overrides: str) -> C.Config:
    return C.apply_overrides(C.preset_config(preset), ["train.log_every=1", "schedule.warmup_steps=2", *overrides])


class Record(LoopHooks):
    def __init__(self, cfg: C.Config | None = None, out: Path | None = None) -> None:
        self.logs: dict[int, dict[str, float]] = {}
        self.cfg, self.out, self.eng = cfg, out, None

    def on_log(self, step, metrics, alarms):
        self.logs[step] = dict(metrics)

    def should_checkpoint(self, step):
        return self.out is not None and step == SAVE_AT

    def on_checkpoint(self, step, metrics):
        if self.out is None or step != SAVE_AT:
            return  # the loop's final checkpoint: not needed here
        ckpt.save(self.out, cfg=self.cfg, engine=self.eng.engine, step=step, skipped_steps=0, data_position=None,
                  metrics=metrics, train_seconds=0.0)


def _data(rank: int, start: int):
    step = start
    while True:
        yield batch(rank, step)
        step += 1


def _straight_and_resumed(preset: str, rank: int, out: Path) -> dict[str, object]:
    """Losses of a 3-update run and of a run resumed from its update-2 checkpoint (fresh weights,
    another seed) on this rank; the Gumbel temperature after the resume."""
    cfg = _config(preset, f"train.max_steps={STEPS}", "deepspeed.zero_stage=2")
    torch.manual_seed(cfg.train.seed)
    model = build_pretraining_model(cfg.model)
    eng = E.build_engine(cfg, model)
    rec = Record(cfg, out)
    rec.eng = eng
    TrainLoop(cfg, eng, pretraining_step(cfg, model), hooks=rec).run(_data(rank, 0))
    torch.manual_seed(99)
    model2 = build_pretraining_model(cfg.model)
    eng2 = E.build_engine(cfg, model2)
    state = ckpt.load(out, engine=eng2.engine, cfg=cfg)
    q = getattr(eng2.module, "quantizer", None)
    temperature = float(q.temperature) if hasattr(q, "temperature") else None
    rec2 = Record()
    TrainLoop(cfg, eng2, pretraining_step(cfg, model2), start_step=state.step, hooks=rec2).run(_data(rank, state.step))
    return {"straight": rec.logs, "resumed": rec2.logs, "start": state.step, "temperature": temperature}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    results = {p: _straight_and_resumed(p, rank, Path(out) / p) for p in RESUMED}
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    torch.distributed.destroy_process_group()


def test_every_objective_trains_and_resumes_exactly_on_two_zero2_ranks(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for preset, r in results.items():
        straight, resumed = r["straight"], r["resumed"]
        assert r["start"] == SAVE_AT and sorted(straight) == list(range(1, STEPS + 1)), preset
        assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1)), preset
        for s in resumed:
            assert resumed[s]["loss"] == pytest.approx(straight[s]["loss"], abs=1e-5), f"{preset} update {s}"
        assert all(math.isfinite(m["loss"]) and m["skipped_steps"] == 0 for m in straight.values()), preset
        assert straight[STEPS]["grad_norm"] > 0, preset
        # Each ZeRO-2 rank holds a part of the optimizer state; both parts came back.
        assert len(list((tmp_path / preset).glob("deepspeed/step_*/zero_pp_rank_*_optim_states.pt"))) == 2, preset
    # The Gumbel temperature of the checkpoint's last update came back (a fresh model has 2.0).
    assert results["vq_wav2vec_laptop"]["temperature"] == pytest.approx(2.0 * 0.999 ** (SAVE_AT - 1))
    first = results["wav2vec_laptop"]["straight"][1]
    assert {"loss/binary_contrastive", "accuracy"} <= set(first)
    vq = results["vq_wav2vec_laptop"]["straight"][1]
    assert {"perplexity/code_0", "perplexity/prob_1", "temperature"} <= set(vq)
    assert all(1 / 32 <= vq[f"codes/argmax_share_{g}"] <= 1 for g in range(4))
    for preset in ("apc_laptop", "tera_laptop"):
        m = results[preset]["straight"][1]
        assert m["loss"] == pytest.approx(m["loss/l1"]) and m["l1_vs_baseline"] == pytest.approx(
            m["loss/l1"] / m["baseline/l1"])


@pytest.fixture(scope="module")
def process_group():
    E.ensure_process_group("gloo")


def test_the_objective_picks_the_step_and_is_a_sweep_dimension(process_group) -> None:
    steps = {"wav2vec_laptop": FuturePredictionStep, "vq_wav2vec_kmeans_laptop": FuturePredictionStep,
             "apc_laptop": ApcStep, "mockingjay_laptop": TeraStep}
    for preset, step_class in steps.items():
        cfg = C.preset_config(preset)
        assert isinstance(pretraining_step(cfg, build_pretraining_model(cfg.model)), step_class)
    # One encoder that every objective can train (log-mel frames, a GRU): a sweep over
    # model.objective alone; each step's loss is finite and reaches the encoder.
    for objective in ("wav2vec2", "best_rq", "wav2vec", "vq_wav2vec", "apc", "tera"):
        cfg = C.apply_overrides(C.apc_laptop(), [f"model.objective={objective}"])
        torch.manual_seed(0)
        model = build_pretraining_model(cfg.model)
        step = pretraining_step(cfg, model)
        step.begin_update(model, 0)
        out = step.forward(model, step.prepare(batch(0, 0), step=0, micro=0, rank=0, device=torch.device("cpu")), step=0)
        (out.loss_sum / out.count.clamp(min=1)).backward()
        assert math.isfinite(float(out.loss_sum.detach())) and int(out.count) > 0, objective
        assert model.encoder.transformer.layers[0].gru.weight_ih_l0.grad.abs().sum() > 0, objective
    with pytest.raises(C.ConfigError, match="causal"):
        C.apply_overrides(C.tera_laptop(), ["model.objective=apc"])  # a Transformer sees the future


def test_kmeans_loss_parts_and_the_cosine_schedule(process_group) -> None:
    from pipeline.train.schedule import lr_multiplier

    cfg = _config("vq_wav2vec_kmeans_laptop")
    torch.manual_seed(0)
    model = build_pretraining_model(cfg.model)
    step = pretraining_step(cfg, model)
    out = step.forward(model, step.prepare(batch(0, 0), step=0, micro=0, rank=0, device=torch.device("cpu")), step=0)
    logged = step.summarize({k: float(v) for k, v in out.metrics.items()} | {"num_micro": 1.0})
    assert float(out.loss_sum.detach()) / int(out.count) == pytest.approx(
        logged["loss/binary_contrastive"] + (32 / 512) * logged["loss/kmeans"], rel=1e-5)
    ids = model.tokens(torch.from_numpy(batch(0, 0)["source"]), torch.from_numpy(batch(0, 0)["padding_mask"]))[0]
    for g in range(2):
        used = ids[..., g][ids[..., g] >= 0]
        assert logged[f"codes/argmax_share_{g}"] == pytest.approx(torch.bincount(used).max().item() / used.numel())
    wav2vec = C.wav2vec()  # fairseq's cosine: warm-up to the peak, half a cosine down to end_lr
    f = lr_multiplier(wav2vec.schedule, 1500, wav2vec.optim.lr)
    assert f(0) == 0 and f(500) == pytest.approx(1.0) and f(1500) == pytest.approx(1e-6 / 5e-3)
    assert f(1000) == pytest.approx((1 + 1e-6 / 5e-3) / 2)


def test_health_knows_the_binary_chance_level_and_that_l1_has_none(process_group) -> None:
    cfg = _config("vq_wav2vec_laptop")
    step = pretraining_step(cfg, build_pretraining_model(cfg.model))
    health = step.health()
    at_chance = {"loss/binary_contrastive": 3.36, "perplexity/code_0": 20.0, "perplexity/prob_0": 30.0}
    alarms = check_health(at_chance, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health)
    assert [a.key for a in alarms] == ["alarm_chance_level"] and "(10+1)*H(1/(10+1)) = 3.3510" in alarms[0].message
    collapsed = {"loss/binary_contrastive": 2.0, "perplexity/code_0": 1.1}
    alarms = check_health(collapsed, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health)
    assert [a.key for a in alarms] == ["alarm_codebook_collapse"]
    # Most frames on one codeword while the rest spread: the perplexity stays above its alarm, the share does not.
    one_target = {"loss/binary_contrastive": 2.0, "perplexity/code_0": 3.0, "codes/argmax_share_0": 0.5,
                  "codes/argmax_share_1": 0.97}
    alarms = check_health(one_target, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health)
    assert [a.key for a in alarms] == ["alarm_codebook_collapse"] and "argmax_share_1 = 0.970 > 0.95" in alarms[0].message
    both = {**collapsed, "codes/argmax_share_0": 1.0}
    alarms = check_health(both, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health)
    assert [a.key for a in alarms] == ["alarm_codebook_collapse"]  # one alarm for one collapse
    healthy = {**one_target, "codes/argmax_share_1": 0.88}  # a learning laptop run passes there
    assert check_health(healthy, step=100, warmup_steps=10, chance_margin=0.05, min_perplexity=2.0, health=health) == []
    plain = _config("wav2vec_laptop")
    assert pretraining_step(plain, build_pretraining_model(plain.model)).health().collapse_keys == ()
    for preset in ("apc_laptop", "tera_laptop"):
        cfg = _config(preset)
        assert pretraining_step(cfg, build_pretraining_model(cfg.model)).health() is None


def test_the_probe_reads_their_hidden_states() -> None:
    from pipeline.probe import LabelledSet, extract, num_hidden_states

    data = LabelledSet(ids=["x", "y"], audio=[batch(0, 0)["source"][0], batch(0, 1)["source"][0][:6000]],
                       transcripts=["a", "b"])
    # wav2vec's laptop front end is 32 wide and its context 64: like APC's, its states are the layers'.
    expected = {"wav2vec_laptop": (6, 64), "vq_wav2vec_laptop": (6, 64), "apc_laptop": (3, 64),
                "tera_laptop": (3, 64)}
    for preset, (num, dim) in expected.items():
        torch.manual_seed(0)
        model = build_pretraining_model(C.preset_config(preset).model)
        feats = extract(model, data)
        assert num_hidden_states(model) == num, preset
        frames = [int(model.encoder.feature_encoder.output_lengths(torch.tensor(len(a)))) for a in data.audio]
        assert [tuple(f.shape) for f in feats] == [(num, frames[0], dim), (num, frames[1], dim)], preset


def test_their_models_leave_as_wavray_bundles(tmp_path: Path) -> None:
    from pipeline.model_io import load_model, write_bundle
    from pipeline.tracking import MODEL_ARTIFACT, final_model_artifact
    from pipeline.train.finetune import hf_exportable

    for preset in ("vq_wav2vec_laptop", "tera_laptop"):
        cfg = C.preset_config(preset)
        assert final_model_artifact(cfg) == MODEL_ARTIFACT and not hf_exportable(cfg)
        torch.manual_seed(0)
        model = build_pretraining_model(cfg.model)
        out = write_bundle(model, cfg, tmp_path / preset)
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]  # no hf_model/
        back = load_model(str(out)).model
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
