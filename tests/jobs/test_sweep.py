"""A real tiny sweep on CPU: Ray Tune + Ray Train + DeepSpeed + the probe + MLflow, end to end.

Four trials (mask probability x codebook entries) of the tiny model on a synthesised
corpus, 40 updates each, probed at updates 20 and 40, ASHA on the probe CER, two trials
at once. Checked: every trial has a child MLflow run with a probe CER; ASHA's outcome is
consistent with the steps each trial reached; the registered model version is, among the
trials trained furthest, the one with the lowest final probe CER (read back from MLflow,
not from the sweep's own records), and its Hugging Face directory loads with
``transformers``; running the same sweep again restores it from Tune's state without
training or registering anything new; the command line checks a sweep file without
running it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tune import BEST_ALIAS, DRIVER_TAG, PARENT_TAG, SWEEP_TAG, TRIAL_TAG, load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "jobs" / "configs" / "sweep" / "tiny_demo.yaml"
MAX_STEPS = 40
FAULT_STEPS = 100


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    """Ray with its dashboard on loopback (the sweep's way) and a small prepared corpus with a
    held-out split for the probe's dev set."""
    import ray

    from pipeline.cluster import connect_ray
    from pipeline.config import load_config
    from pipeline.data.demo_corpus import make_corpus
    from pipeline.data.prepare import prepare

    root = tmp_path_factory.mktemp("sweep")
    make_corpus(root / "corpus", minutes=3.0, seed=3, progress=lambda _: None)
    if ray.is_initialized():
        ray.shutdown()
    connect_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        cfg = load_config(preset="tiny", overrides=["data.valid_fraction=0.25", "data.shard_size_mb=0.5"])
        prepare(str(root / "corpus"), str(root / "shards"), cfg.data, progress=lambda _: None)
        yield root
    finally:
        ray.shutdown()


def _last(history) -> tuple[int, float]:
    m = max(history, key=lambda m: (m.step, m.timestamp))
    return int(m.step), float(m.value)


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_sweep_ranks_by_probe_registers_the_best_and_restores(corpus: Path) -> None:
    from mlflow.tracking import MlflowClient
    from transformers import Wav2Vec2Model

    shards = corpus / "shards"
    overrides = [
        f"data.train_uri={shards}", f"probe.train_uri={shards}", f"checkpoint.storage_path={corpus / 'runs'}",
        f"train.max_steps={MAX_STEPS}", "sweep.name=e2e", "sweep.register_as=wavray-sweep-e2e",
    ]
    spec = load_sweep(DEMO, overrides)
    assert spec.keys == ["model.mask.prob", "model.quantizer.entries"]
    t0 = time.perf_counter()
    result = run_sweep(spec)
    elapsed = time.perf_counter() - t0
    print(f"\nsweep took {elapsed:.0f} s\n{result.table()}")

    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    assert len(result.records) == 4
    grid = {(r.params["model.mask.prob"], r.params["model.quantizer.entries"]) for r in result.records}
    assert grid == {(0.3, 16), (0.3, 64), (0.65, 16), (0.65, 64)}

    # Every trial: a child run of the sweep's run, its params, a probe CER curve at the probed steps.
    finals: dict[str, tuple[int, float]] = {}
    for r in result.records:
        assert r.outcome != "failed", r.error
        run = client.get_run(r.run_id)
        assert run.data.tags[PARENT_TAG] == result.parent_run_id
        assert run.data.tags[SWEEP_TAG] == "e2e" and run.data.tags[TRIAL_TAG] == r.trial_id
        assert float(run.data.params["model.mask.prob"]) == r.params["model.mask.prob"]
        assert int(run.data.params["model.quantizer.entries"]) == r.params["model.quantizer.entries"]
        history = client.get_metric_history(r.run_id, "probe/cer")
        assert history, f"trial {r.trial_id} has no probe CER"
        assert {m.step for m in history} <= {20, 40}
        finals[r.run_id] = _last(history)
        assert 0.0 <= finals[r.run_id][1] and math.isfinite(finals[r.run_id][1])
        assert client.get_metric_history(r.run_id, "loss"), "pretraining losses are logged beside the probe"
        # ASHA: a trial stopped early never reached the last update; a completed one did.
        assert (r.outcome == "completed") == (r.step == MAX_STEPS), (r.trial_id, r.outcome, r.step)
        # A stopped trial's run is ended where it stood (KILLED), unless its training had
        # already finished before the probe that stopped it (a slow probe on a busy machine).
        assert run.info.status in (("FINISHED",) if r.outcome == "completed" else ("KILLED", "FINISHED"))
        assert run.data.tags["wavray.sweep.outcome"] == r.outcome

    # The registered version: among the trials that reached the most updates, the lowest final
    # probe CER, as MLflow has them.
    furthest = max(step for step, _ in finals.values())
    lowest = min(cer for step, cer in finals.values() if step == furthest)
    mv = client.get_model_version_by_alias("wavray-sweep-e2e", BEST_ALIAS)
    assert str(mv.version) == result.model_version
    assert mv.run_id in finals and finals[mv.run_id] == (furthest, pytest.approx(lowest, abs=1e-9)), finals
    assert float(mv.tags["probe_cer"]) == pytest.approx(lowest, abs=1e-6)
    best_run = mv.run_id
    local = Path(client.download_artifacts(mv.run_id, "best_model", str(corpus / "download")))
    hf = Wav2Vec2Model.from_pretrained(local / "hf_model")
    assert hf.config.num_hidden_layers == spec.config.model.transformer.num_layers
    assert (local / "config.yaml").is_file()

    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"summary.csv", "summary.md", "probe_cer_vs_params.png", "probe_cer_curves.png"} <= names
    assert float(parent.data.metrics["best_probe_cer"]) == pytest.approx(lowest, abs=1e-6)

    # The same sweep again: Tune restores it, every trial is already finished, nothing new
    # is trained or registered.
    t0 = time.perf_counter()
    again = run_sweep(load_sweep(DEMO, overrides))
    assert time.perf_counter() - t0 < elapsed
    assert {r.trial_id for r in again.records} == {r.trial_id for r in result.records}
    assert again.best is not None and again.best.run_id == best_run
    assert again.model_version == result.model_version
    assert len(client.search_model_versions("name = 'wavray-sweep-e2e'")) == 1
    for r in again.records:
        steps = [m.step for m in client.get_metric_history(r.run_id, "probe/cer")]
        assert len(steps) == len(set(steps)), "a restored sweep re-ran a finished trial"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_trial_whose_driver_dies_is_retried_and_resumes_its_run(corpus: Path) -> None:
    """SIGKILL a trial's driver after its first probe report: Tune retries the trial, whose
    run continues from its newest checkpoint under the same name, and the sweep finishes.

    The watcher finds the driver through the trial run's ``wavray.sweep.driver`` tag, once
    that run has its first probe CER; the trial's FAULT_STEPS updates leave it time to."""
    import os
    import signal
    import threading

    from mlflow.tracking import MlflowClient

    shards = corpus / "shards"
    spec = load_sweep(DEMO, [
        f"data.train_uri={shards}", f"probe.train_uri={shards}", f"checkpoint.storage_path={corpus / 'runs-fault'}",
        f"train.max_steps={FAULT_STEPS}", "sweep.name=fault", "sweep.scheduler=fifo", "sweep.max_failures=1",
        "space.model.mask.prob={grid: [0.5]}", "space.model.quantizer.entries={grid: [32]}",
    ])
    tracking_uri = f"sqlite:///{corpus / 'runs-fault' / 'mlflow.db'}"
    killed: dict[str, int] = {}
    seen: list[str] = []

    def kill_after_first_report() -> None:
        """Once the trial's run has its first probe CER, SIGKILL the driver its run names."""
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not killed:
            time.sleep(1)
            try:
                client = MlflowClient(tracking_uri=tracking_uri)
                exp = client.get_experiment_by_name(spec.config.tracking.experiment)
                runs = client.search_runs([exp.experiment_id], "tags.`wavray.sweep` = 'fault'") if exp else []
                probed = [r for r in runs if client.get_metric_history(r.info.run_id, "probe/cer")]
            except Exception as e:  # the store is created by the sweep: not there at first
                seen.append(repr(e))
                continue
            if probed:
                time.sleep(3)  # the probe is logged just before it is reported to Tune
                pid = int(probed[0].data.tags[DRIVER_TAG].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid

    watcher = threading.Thread(target=kill_after_first_report, daemon=True)
    watcher.start()
    result = run_sweep(spec)
    watcher.join(timeout=5)
    assert killed, f"the trial finished before its driver could be killed ({seen[-3:]})"

    (record,) = result.records
    assert record.outcome == "completed" and record.step == FAULT_STEPS, record
    assert result.best is not None and result.best.trial_id == record.trial_id
    client = MlflowClient(tracking_uri=result.tracking_uri)
    history = client.get_metric_history(record.run_id, "probe/cer")
    assert max(m.step for m in history) == FAULT_STEPS
    # The last report came from the retried driver, not the killed one; the run it trained
    # is the same (one run folder, one MLflow run for the trial).
    exp = client.get_experiment_by_name(spec.config.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`wavray.sweep` = 'fault' and tags.`wavray.sweep.role` = 'trial'")
    assert len(runs) == 1
    import json

    reports = [json.loads(line) for line in
               (Path(result.experiment_path) / record.trial_id / "result.json").read_text().splitlines()]
    assert killed["pid"] in {r["pid"] for r in reports} and reports[-1]["pid"] != killed["pid"]
    assert reports[-1]["step"] == FAULT_STEPS and reports[-1]["trial_done"]
    assert sorted(p.name for p in (corpus / "runs-fault").iterdir() if p.name.startswith("fault-")) == [
        f"fault-{record.trial_id}"
    ]


def test_command_line_checks_a_sweep_without_running_it() -> None:
    ok = subprocess.run([sys.executable, "-m", "jobs.sweep", "--config", str(DEMO), "--check"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "model.mask.prob: grid [0.3, 0.65]" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.sweep", "--config", str(DEMO), "--check",
                          "space.model.quantizer.entires={grid: [16]}"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert bad.returncode == 2
    assert "model.quantizer.entires" in bad.stderr and "entries" in bad.stderr


@pytest.mark.e2e
def test_a_sweep_over_the_objective_ranks_trials_at_equal_compute(corpus: Path) -> None:
    """``model.objective`` is a search dimension like any other: a wav2vec 2.0 and a BEST-RQ
    trial on the same encoder, each given the same seconds of training (``train.max_seconds``),
    ranked by the probe at their end; the best is registered."""
    from mlflow.tracking import MlflowClient

    budget = 12.0
    spec = load_sweep(ROOT / "jobs" / "configs" / "sweep" / "objectives_demo.yaml", [
        f"data.train_uri={corpus / 'shards'}", f"probe.train_uri={corpus / 'shards'}",
        f"checkpoint.storage_path={corpus / 'runs-objectives'}", f"train.max_seconds={budget}",
        "checkpoint.every_steps=1000", "probe.train_minutes=1.0", "probe.dev_minutes=0.5", "probe.head=linear",
        "probe.steps=50", "sweep.name=objectives-test", "space.model.mask.prob={grid: [0.6]}",
        "data.max_samples_per_batch=64000", "data.max_sample_size=32000",
    ])
    assert [d.key for d in spec.space] == ["model.objective", "model.mask.prob"]
    result = run_sweep(spec)
    by_objective = {r.params["model.objective"]: r for r in result.records}
    assert set(by_objective) == {"wav2vec2", "best_rq"}
    for objective, r in by_objective.items():
        assert r.outcome == "completed" and math.isfinite(r.probe_cer), objective
        assert r.train_seconds >= budget and r.budget_spent == 1.0, objective  # each spent the whole budget
    # Ranked by the probe at equal compute, whatever the update counts.
    best = min(result.records, key=lambda r: r.probe_cer)
    assert result.best is not None and result.best.trial_id == best.trial_id
    assert "| seconds |" in result.table()
    client = MlflowClient(tracking_uri=result.tracking_uri, registry_uri=result.tracking_uri)
    mv = client.get_model_version_by_alias(result.model_name, BEST_ALIAS)
    assert mv.run_id == best.run_id
    ce = client.get_metric_history(by_objective["best_rq"].run_id, "loss/masked_ce")
    assert ce and all(math.isfinite(m.value) for m in ce)
