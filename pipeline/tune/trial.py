"""One trial: its config, its pretraining run in a child actor, and the driver that probes
each checkpoint the run writes and reports the score to Tune."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, apply_overrides, from_dict, to_dict
from pipeline.tune.names import DRIVER_TAG, PARENT_TAG, ROLE_TAG, SWEEP_TAG, TIME_ATTR, TRIAL_TAG, run_name_of
from pipeline.tune.spec import probe_cadence

log = logging.getLogger("wavray.tune")

PATH_FIELDS = ("data.train_uri", "probe.train_uri", "probe.dev_uri", "checkpoint.storage_path", "train.init_from",
               "label.teacher", "model.mixing.noise_uri")
"""Local paths made absolute in the driver: Tune runs each trial in its own directory."""


def _absolute(value: str) -> str:
    if not value or "://" in value or value.startswith(("models:/", "runs:/")):  # URIs stay as they are
        return value
    return str(Path(value).expanduser().resolve())


def resolve_paths(cfg: Config) -> Config:
    """Local paths made absolute (Tune runs trials in their own directories) and the
    tracking URI fixed, so every trial and the sweep share one MLflow store."""
    from pipeline.tracking import default_tracking_uri

    deltas: dict[str, Any] = {}
    for key in PATH_FIELDS:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value and "://" not in value:
            deltas[key] = _absolute(value)
    out = apply_overrides(cfg, deltas)
    uri = default_tracking_uri(out)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + _absolute(uri[len("sqlite:///"):])
    return apply_overrides(out, {"tracking.uri": uri})


def trial_config(base: Config, params: Mapping[str, Any], *, sweep: str, trial_id: str) -> Config:
    """The config of one trial: the base, the trial's searched values, its own run name, and
    no registration of its own (the sweep registers the best trial)."""
    cfg = apply_overrides(base, dict(params))
    return apply_overrides(cfg, {"checkpoint.run_name": run_name_of(sweep, trial_id), "tracking.register_as": ""})


@dataclass
class CheckpointRef:
    uri: str
    step: int
    metrics: dict[str, float]


class CheckpointProber:
    """Finds a run's newest checkpoint and scores its model with the probe."""

    def __init__(self, cfg: Config, run_uri: str, train_set: Any, dev_set: Any, device: str = "cpu") -> None:
        from pipeline.train.trainer import storage_for

        self.cfg = cfg
        self.run_uri = run_uri
        self.store = storage_for(cfg)
        self.train_set = train_set
        self.dev_set = dev_set
        self.device = device

    def newest(self) -> CheckpointRef | None:
        """The newest checkpoint Ray Train recorded for the run (None before the first)."""
        from pipeline.train.trainer import latest_checkpoint_uri, read_trainer_state

        try:
            uri = latest_checkpoint_uri(self.run_uri, self.store)
            if uri is None:
                return None
            state = read_trainer_state(uri, self.store)
        except (OSError, ValueError, RuntimeError) as e:  # not written yet, or being rotated out
            log.debug("no readable checkpoint under %s yet: %s", self.run_uri, e)
            return None
        return CheckpointRef(uri=uri, step=int(state.step), metrics=dict(state.metrics))

    def probe(self, ref: CheckpointRef) -> dict[str, float]:
        """The probe's scores of the model in checkpoint ``ref``."""
        from pipeline.model_io import load_model
        from pipeline.probe import run_probe

        model = load_model(ref.uri, task="pretraining", store=self.store).model.to(self.device)
        return run_probe(model, self.train_set, self.dev_set, self.cfg.probe,
                         normalize=self.cfg.data.normalize, device=self.device)


def tune_report(ref: CheckpointRef, probe: Mapping[str, float], *, done: bool, run_id: str) -> dict[str, Any]:
    """What a trial reports to Tune: the probe score at ``step`` and the loss beside it."""
    m = ref.metrics
    return {
        TIME_ATTR: ref.step,
        "probe_cer": float(probe["probe/cer"]),
        "probe_wer": float(probe["probe/wer"]),
        "probe_dev_loss": float(probe["probe/dev_loss"]),
        "loss": float(m.get("loss", math.nan)),
        "loss_contrastive": float(m.get("loss/contrastive", math.nan)),
        "accuracy": float(m.get("accuracy", math.nan)),
        "train_seconds": float(m.get("train_seconds", math.nan)),
        "checkpoint_uri": ref.uri,
        "mlflow_run_id": run_id,
        "trial_done": done,
    }


@dataclass
class TrialContext:
    """What every trial's driver needs from the sweep (small and picklable)."""

    sweep: str
    base: dict[str, Any]
    """The resolved base config as a dict."""
    parent_run_id: str
    trial_cpus: float
    trial_gpus: float
    poll_seconds: float


class PretrainingRunner:
    """Runs one trial's pretraining in its own Ray actor, owned by the trial's driver.

    Ray Train's controller belongs to whichever process calls ``fit()``. Calling it from
    this actor rather than from the driver lets the driver end the run the moment Tune
    stops the trial (ASHA) or the trial fails: killing this actor takes the controller and
    its workers with it, and the controller's placement group is released. A Tune trial
    that is merely told to stop would otherwise train to the end in the background.
    """

    def run(self, config: dict[str, Any], run_name: str) -> str:
        from pipeline.train.trainer import run_pretraining

        return run_pretraining(from_dict(config), run_name=run_name).run_name


def open_trial_run(cfg: Config, ctx: TrialContext, trial_id: str, params: Mapping[str, Any]) -> Any:
    """The trial's MLflow run, created before the pretraining so that it starts as a child
    of the sweep's run; the pretraining re-opens it by its run name."""
    from pipeline.tracking import Tracker

    tracker = Tracker.open(cfg, cfg.checkpoint.run_name)
    client = tracker.client
    client.set_tag(tracker.run_id, PARENT_TAG, ctx.parent_run_id)
    client.set_tag(tracker.run_id, SWEEP_TAG, ctx.sweep)
    client.set_tag(tracker.run_id, TRIAL_TAG, trial_id)
    client.set_tag(tracker.run_id, ROLE_TAG, "trial")
    client.set_tag(tracker.run_id, "wavray.sweep.params", json.dumps(dict(params), sort_keys=True))
    client.set_tag(tracker.run_id, DRIVER_TAG, f"{_node_ip()}:{os.getpid()}")
    return tracker


def _node_ip() -> str:
    import ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (a trial function called directly)
        return "local"


def trial_main(params: dict[str, Any], ctx: TrialContext) -> None:
    """The function Tune runs for each trial (its driver): pretrain, probe, report."""
    import ray
    import torch
    from ray import tune

    from pipeline.data import storage
    from pipeline.probe import probe_sets

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(ctx.base), params, sweep=ctx.sweep, trial_id=trial_id)
    if cfg.model.objective == "hubert":  # its labels: made by the sweep's driver, unless drawn from a range
        from pipeline.label.job import ensure_labels

        ensure_labels(cfg, progress=lambda line: print(f"[wavray] trial {trial_id}: {line}", flush=True))
    run_name = cfg.checkpoint.run_name
    run_uri = storage.join(cfg.checkpoint.storage_path, run_name)
    tracker = open_trial_run(cfg, ctx, trial_id, params)
    # The driver has a fraction of a CPU: more threads would only fight the trainers.
    torch.set_num_threads(max(1, math.ceil(ctx.trial_cpus)))
    device = "cuda" if ctx.trial_gpus > 0 and torch.cuda.is_available() else "cpu"
    train_set, dev_set = probe_sets(cfg)
    prober = CheckpointProber(cfg, run_uri, train_set, dev_set, device)
    every = probe_cadence(cfg)

    def probe_and_report(ref: CheckpointRef, done: bool) -> dict[str, float]:
        scores = prober.probe(ref)
        try:
            tracker.log_metrics(ref.step, scores)
            tracker.set_tag("wavray.sweep.last_probed", ref.uri)
        except Exception as e:  # tracking must not stop the trial
            log.warning("MLflow logging of the probe at step %d failed: %s", ref.step, e)
        print(f"[wavray] trial {trial_id} step {ref.step}: probe CER {scores['probe/cer']:.4f} "
              f"(pretraining loss {ref.metrics.get('loss', math.nan):.4f})", flush=True)
        tune.report(tune_report(ref, scores, done=done, run_id=tracker.run_id))
        return scores

    runner = ray.remote(num_cpus=0, max_restarts=0)(PretrainingRunner).remote()
    done_ref = runner.run.remote(to_dict(cfg), run_name)
    try:
        last: tuple[CheckpointRef, dict[str, float]] | None = None
        while not ray.wait([done_ref], timeout=ctx.poll_seconds)[0]:
            ref = prober.newest()
            fresh = last is None or (ref is not None and ref.step > last[0].step)
            if ref is not None and fresh and ref.step % every == 0 and ref.step < cfg.train.max_steps:
                last = (ref, probe_and_report(ref, done=False))
        ray.get(done_ref)  # the run's own error, if any, fails the trial (Tune retries it)
        final = prober.newest()
        if final is None:
            raise RuntimeError(f"trial {trial_id}: the run {run_uri} finished without a checkpoint to probe")
        if last is not None and final.step <= last[0].step:
            # The data ended right after a probed checkpoint: that score is the final one.
            tune.report(tune_report(last[0], last[1], done=True, run_id=tracker.run_id))
        else:
            probe_and_report(final, done=True)
    finally:
        # Stopped by the scheduler (tune.report raised SystemExit), failed, or done: no
        # training may outlive the trial.
        ray.kill(runner, no_restart=True)
