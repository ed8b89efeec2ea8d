"""A training worker killed with SIGKILL mid-run: Ray Train restarts the worker group from
the newest checkpoint, the run finishes, and every update after the resume repeats the
uninterrupted run's loss (fp32, CPU, same seed) to within 1e-4.

Exact repetition needs the same batches on the same ranks after the resume: the dataset
is rebuilt from the checkpoint's data position (``TrainDataFactory``), and masks,
distractors and dropout are seeded by (seed, step, rank).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from pipeline import config as C
from pipeline.tracking import Tracker
from pipeline.train.trainer import latest_checkpoint_uri, run_pretraining

pytestmark = pytest.mark.e2e

STEPS = 12
EVERY = 4


@pytest.fixture(scope="module")
def local_ray():
    from pipeline.cluster import connect_ray

    connect_ray(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def shards(local_ray, tmp_path_factory: pytest.TempPathFactory) -> str:
    from pipeline.data.demo_corpus import make_corpus
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("fault_data")
    make_corpus(root / "corpus", minutes=1.5, seed=3, progress=lambda _: None)
    prepare(str(root / "corpus"), str(root / "shards"), C.tiny().data, progress=lambda _: None)
    return str(root / "shards")


def _config(shards: str, storage: Path, name: str, preset: C.Config | None = None) -> C.Config:
    return C.apply_overrides(preset or C.tiny(), [
        f"data.train_uri={shards}", f"checkpoint.storage_path={storage}", f"checkpoint.run_name={name}",
        f"train.max_steps={STEPS}", "train.log_every=1", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=2",
        "checkpoint.max_failures=2", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "deepspeed.zero_stage=2", "data.decode_cpus=0.5", "data.max_samples_per_batch=64000",
        "data.max_sample_size=32000",
    ])


def _history(cfg: C.Config, run_id: str) -> dict[int, float]:
    """Step -> loss, the last value logged for each step (a resumed step is logged again)."""
    client = Tracker(f"sqlite:///{Path(cfg.checkpoint.storage_path) / 'mlflow.db'}", "wavray", run_id).client
    out: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out


def _our_train_workers() -> list[psutil.Process]:
    """RayTrainWorker processes under this test's own Ray instance (never anyone else's)."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _kill_after_first_checkpoint(run_dir: Path, killed: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            latest = latest_checkpoint_uri(str(run_dir), recorded_only=True) if run_dir.is_dir() else None
        except (OSError, ValueError):
            latest = None
        if latest is not None:
            time.sleep(0.5)  # an update or two past the checkpoint
            workers = _our_train_workers()
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.1)


def test_sigkill_worker_resumes_from_checkpoint_and_repeats_losses(shards: str, tmp_path: Path) -> None:
    straight_cfg = _config(shards, tmp_path / "runs", "straight")
    straight = run_pretraining(straight_cfg)
    assert straight.step == STEPS

    killed_cfg = _config(shards, tmp_path / "runs", "killed")
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_after_first_checkpoint, args=(tmp_path / "runs" / "killed", killed, stop), daemon=True
    )
    killer.start()
    try:
        result = run_pretraining(killed_cfg)
    finally:
        stop.set()
        killer.join(timeout=5)

    assert killed, "no training worker was killed"
    assert result.step == STEPS
    tags = Tracker(result.mlflow_uri, "wavray", result.mlflow_run_id).client.get_run(result.mlflow_run_id).data.tags
    resumed_from = int(tags["wavray.resumed_from"])
    assert resumed_from % EVERY == 0 and EVERY <= resumed_from < STEPS

    ref = _history(straight_cfg, straight.mlflow_run_id)
    got = _history(killed_cfg, result.mlflow_run_id)
    assert sorted(ref) == list(range(1, STEPS + 1)) == sorted(got)
    after = [s for s in ref if s > resumed_from]
    assert after, "no update ran after the resume"
    for s in after:
        assert got[s] == pytest.approx(ref[s], abs=1e-4), f"update {s}: resumed {got[s]} vs uninterrupted {ref[s]}"
    # The newest two checkpoints are kept (the final one at STEPS), each a model checkpoint.
    kept = sorted(p.name for p in (tmp_path / "runs" / "killed").glob("checkpoint_0*"))
    assert kept == [f"checkpoint_{STEPS - EVERY:09d}", f"checkpoint_{STEPS:09d}"]
    for k in kept:
        assert (tmp_path / "runs" / "killed" / k / "model.safetensors").is_file()
    # ... which the export job turns into a Hugging Face directory.
    from jobs.export import main as export

    out = tmp_path / "hf"
    assert export(["--checkpoint", str(tmp_path / "runs" / "killed" / kept[-1]), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_best_rq_on_two_zero2_workers_resumes_with_its_targets_unchanged(shards: str, tmp_path: Path) -> None:
    """BEST-RQ through everything wavray has: Ray Train, DeepSpeed ZeRO-2 on 2 workers,
    checkpoints, a resume that extends the run, MLflow; its frozen quantizer is the same in
    every checkpoint and the final model is logged as a bundle."""
    from models.checkpoint import load_weights
    from models.factory import build_pretraining_model

    cfg = C.apply_overrides(_config(shards, tmp_path / "runs", "best-rq", C.best_rq_laptop()),
                            ["train.max_steps=4", "checkpoint.every_steps=2", "schedule.warmup_steps=2"])
    first = run_pretraining(cfg)
    assert first.step == 4
    saved = {4: load_weights(Path(first.run_uri) / "checkpoint_000000004")}
    second = run_pretraining(C.apply_overrides(cfg, ["train.max_steps=8"]))
    saved[8] = load_weights(Path(second.run_uri) / "checkpoint_000000008")
    assert second.step == 8 and second.mlflow_run_id == first.mlflow_run_id
    client = Tracker(second.mlflow_uri, "wavray", second.mlflow_run_id).client
    run = client.get_run(second.mlflow_run_id)
    assert run.data.tags["wavray.resumed_from"] == "4"
    ce = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss/masked_ce")}
    assert sorted(ce) == list(range(1, 9)) and all(v == v for v in ce.values())
    assert run.data.metrics["perplexity/target_0"] > 2.0
    fresh = build_pretraining_model(cfg.model).quantizer.state_dict()
    for step, state in saved.items():
        assert torch.equal(state["quantizer.projection"], fresh["projection"]), step
        assert torch.equal(state["quantizer.codebook"], fresh["codebook"]), step
    assert not torch.equal(saved[4]["prediction_head.weight"], saved[8]["prediction_head.weight"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.yaml", "model/model.safetensors"} <= artifacts


FIRST_GENERATION = {  # preset -> the loss part it logs; one of each kind of step (module doc of the test below)
    "vq_wav2vec_laptop": "loss/binary_contrastive", "tera_laptop": "loss/l1", "just_laptop": "loss/ctc",
}
WHOLE = ["data.max_sample_size=160000", "data.max_samples_per_batch=200000"]  # JUST reads its transcripts' audio whole


@pytest.mark.parametrize("preset", list(FIRST_GENERATION))
def test_first_generation_on_two_zero2_workers_resumes(shards: str, tmp_path: Path, preset: str) -> None:
    """The first generation through everything wavray has, as BEST-RQ above: on 2 ZeRO-2
    workers under Ray Train, a checkpoint, a resume that extends the run (vq-wav2vec's Gumbel
    temperature where it was), one MLflow run, the final model logged as a bundle (Hugging
    Face has no class for them). Two updates a leg, one leg per family of step: vq-wav2vec
    (wav2vec's future-prediction step, with a quantizer), TERA (reconstruction), JUST
    (w2v-BERT's step, plus CTC). wav2vec and APC, like vq-wav2vec and TERA, train and resume
    exactly on 2 ZeRO-2 ranks in test_first_generation_steps.py, without Ray."""
    import math

    from pipeline.model_io import load_model

    cfg = C.apply_overrides(_config(shards, tmp_path / "runs", preset.replace("_", "-"), C.preset_config(preset)),
                            ["train.max_steps=2", "checkpoint.every_steps=2", "schedule.warmup_steps=2",
                             *(WHOLE if preset == "just_laptop" else [])])
    first = run_pretraining(cfg)
    second = run_pretraining(C.apply_overrides(cfg, ["train.max_steps=4"]))
    assert first.step == 2 and second.step == 4 and second.mlflow_run_id == first.mlflow_run_id
    assert (Path(second.run_uri) / "checkpoint_000000004" / "model.safetensors").is_file()
    client = Tracker(second.mlflow_uri, "wavray", second.mlflow_run_id).client
    run = client.get_run(second.mlflow_run_id)
    assert run.data.tags["wavray.resumed_from"] == "2"
    part = FIRST_GENERATION[preset]
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, part)}
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) and v > 0 for v in losses.values())
    if part == "loss/l1":  # beside the trivial predictor's L1 (the regression losses have no chance level)
        assert math.isfinite(run.data.metrics["baseline/l1"]) and run.data.metrics["baseline/l1"] > 0
    else:
        assert 0.0 <= run.data.metrics["accuracy"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.yaml", "model/model.safetensors"} <= artifacts
    assert not any(a.path == "hf_model" for a in client.list_artifacts(run.info.run_id))
    if preset == "vq_wav2vec_laptop":
        temperature = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "temperature")}
        assert sorted(temperature) == [1, 2, 3, 4]
        for step, value in temperature.items():  # update step - 1 ran at 2 * 0.999^(step - 1), resumed or not
            assert value == pytest.approx(2.0 * 0.999 ** (step - 1), rel=1e-6), step
        final = load_model(second.run_uri).model  # its tokens, the second stage's input
        ids, lengths = final.tokens(torch.randn(2, 16000))
        assert ids.shape == (2, int(lengths[0]), final.num_groups) and bool((ids >= 0).all())
    if preset == "just_laptop":  # its CTC half scores like a fine-tuned model, in the joint vocabulary
        from jobs.evaluate import evaluate

        assert run.data.metrics["labelled_share"] == 1.0 and math.isfinite(run.data.metrics["loss/mlm"])
        result, saved = evaluate(second.run_uri, shards)
        assert saved.model.just.vocab_size == len(saved.finetune.vocab) + 2 and saved.finetune.vocab_from_data is False
        assert 0.0 < result.summary["cer"] and result.summary["num_utterances"] > 0
        assert "dev/cer" not in run.data.metrics, "no valid split here: no dev CER, and the run trains as without"


def _loss_log(cfg: C.Config, name: str) -> list[tuple[int, float]]:
    """(step, loss) as logged, in order: a step re-run after a resume appears twice. Empty
    while the run has not logged yet."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RUN_NAME_TAG

    db = Path(cfg.checkpoint.storage_path) / "mlflow.db"
    if not db.is_file():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'")
    if not runs:
        return []
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def _kill_two_updates_past_a_checkpoint(cfg: C.Config, name: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL a training worker once the newest recorded checkpoint is two logged updates old,
    so that updates both before the kill and after the resume are logged."""
    run_dir = Path(cfg.checkpoint.storage_path) / name
    while not stop.is_set():
        try:
            latest = latest_checkpoint_uri(str(run_dir), recorded_only=True) if run_dir.is_dir() else None
            logged = max((s for s, _ in _loss_log(cfg, name)), default=0)
        except Exception:  # the store is being written: ask again
            latest, logged = None, 0
        if latest is not None and logged >= int(Path(latest).name.split("_")[-1]) + 2:
            workers = _our_train_workers()
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.1)


def test_a_data2vec_teacher_survives_a_sigkilled_worker_under_zero2_and_zero3(shards: str, tmp_path: Path) -> None:
    """data2vec 2.0 (clones, decoder, ALiBi, the whole context network in the EMA teacher)
    on 2 workers, once under ZeRO-2 and once under ZeRO-3 (every parameter sharded,
    the teacher's too), each with a worker SIGKILLed two updates after a checkpoint. In each
    run the updates repeated after the resume log the losses they logged before the kill
    (the teacher, whose targets set the loss, came back with every rank's shard), and the
    two runs log the same losses at every update: the EMA on ZeRO-3's shards is the EMA of
    the whole tensors. The final teachers agree too."""
    from models.checkpoint import load_weights

    runs = {}
    for stage in (2, 3):
        name = f"d2v-zero{stage}"
        cfg = C.apply_overrides(_config(shards, tmp_path / "runs", name, C.data2vec2_laptop()), [
            f"deepspeed.zero_stage={stage}", "deepspeed.zero3_persistence_threshold=0", "train.max_steps=10",
            "checkpoint.every_steps=3", "schedule.warmup_steps=2",
        ])
        killed: list[int] = []
        stop = threading.Event()
        killer = threading.Thread(target=_kill_two_updates_past_a_checkpoint, args=(cfg, name, killed, stop),
                                  daemon=True)
        killer.start()
        try:
            result = run_pretraining(cfg)
        finally:
            stop.set()
            killer.join(timeout=5)
        assert killed, f"ZeRO-{stage}: no training worker was killed"
        assert result.step == 10
        client = Tracker(result.mlflow_uri, "wavray", result.mlflow_run_id).client
        resumed_from = int(client.get_run(result.mlflow_run_id).data.tags["wavray.resumed_from"])
        logged = _loss_log(cfg, name)
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        for step, loss in logged:
            first.setdefault(step, loss)
            last[step] = loss
        again = [s for s in first if s > resumed_from and len([1 for t, _ in logged if t == s]) > 1]
        assert again, f"ZeRO-{stage}: no update logged both before the kill and after the resume"
        for s in again:
            assert last[s] == pytest.approx(first[s], abs=1e-4), f"ZeRO-{stage} update {s}: resumed {last[s]} vs {first[s]}"
        assert sorted(last) == list(range(1, 11))
        runs[stage] = (last, load_weights(Path(result.run_uri) / "checkpoint_000000010"))

    (losses2, weights2), (losses3, weights3) = runs[2], runs[3]
    for s in range(1, 11):
        assert losses3[s] == pytest.approx(losses2[s], abs=1e-4), f"update {s}: ZeRO-3 {losses3[s]} vs ZeRO-2 {losses2[s]}"
    teacher = [k for k in weights2 if k.startswith("teacher.")]
    assert teacher and all(torch.allclose(weights3[k], weights2[k], atol=1e-4) for k in teacher)
    student = weights2["encoder.transformer.layers.0.ffn.fc1.weight"]
    assert not torch.allclose(weights2["teacher.layers.0.ffn.fc1.weight"], student, atol=1e-5)
