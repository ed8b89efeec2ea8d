"""The sweep's driver: the parent MLflow run, the Tuner (new or restored), and the end of
the sweep (records, summary, registration)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config, save_config, to_dict
from pipeline.tune.names import METRIC_MODE, ROLE_TAG, SWEEP_TAG, TIME_ATTR, trial_dirname
from pipeline.tune.registry import register_best
from pipeline.tune.results import SweepResult, best_record, collect_records, finish_child_runs, write_summary
from pipeline.tune.spec import SweepSettings, SweepSpec, probe_cadence
from pipeline.tune.trial import TrialContext, resolve_paths, trial_main


class SweepInterrupted(RuntimeError):
    """The sweep stopped before its trials finished; running it again resumes it."""


def _open_parent_run(spec: SweepSpec, cfg: Config) -> Any:
    from pipeline.tracking import Tracker

    tracker = Tracker.open(cfg, f"sweep-{spec.settings.name}")
    client = tracker.client
    client.set_tag(tracker.run_id, SWEEP_TAG, spec.settings.name)
    client.set_tag(tracker.run_id, ROLE_TAG, "parent")
    existing = client.get_run(tracker.run_id).data.params
    params = {f"sweep.{k}": str(v) for k, v in dataclasses.asdict(spec.settings).items()}
    params.update({f"space.{d.key}": d.describe() for d in spec.space})
    params.update({"sweep.metric_mode": METRIC_MODE, "base.preset": cfg.preset,
                   "base.train.max_steps": str(cfg.train.max_steps),
                   "base.probe_cadence": str(probe_cadence(cfg))})
    from mlflow.entities import Param

    new = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(tracker.run_id, params=new)
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "base_config.yaml")
        from pipeline.tracking import redact

        path = Path(tmp) / "base_config.yaml"
        path.write_text(redact(path.read_text()))
        if spec.source and Path(spec.source).is_file():
            (Path(tmp) / "sweep.yaml").write_text(redact(Path(spec.source).read_text()))
        tracker.log_artifacts(tmp)
    return tracker


def search_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's ``param_space``: the dotted config paths with their distributions."""
    return {d.key: d.to_tune() for d in spec.space}


def make_scheduler(s: SweepSettings, cfg: Config) -> Any:
    """ASHA on the probe score at equal ``step`` (rungs from the grace period up to
    ``train.max_steps``), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=TIME_ATTR, max_t=cfg.train.max_steps,
        grace_period=min(s.grace_period or probe_cadence(cfg), cfg.train.max_steps),
        reduction_factor=s.reduction_factor,
    )


def make_searcher(s: SweepSettings) -> tuple[Any, int | None]:
    """(search algorithm, ``max_concurrent_trials`` for ``TuneConfig``).

    Tune applies ``max_concurrent_trials`` only to a ``Searcher`` (Optuna, which it wraps
    in a ConcurrencyLimiter); the variant generator of grid and random search takes the
    limit itself and would ignore the TuneConfig setting.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if s.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=s.seed), s.max_concurrent_trials
    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent_trials), None


def _build_tuner(spec: SweepSpec, cfg: Config, parent_run_id: str, experiment_path: str) -> Any:
    """A new Tuner, or the restored one when the sweep's folder holds a Tune experiment."""
    from ray import tune

    from pipeline.data import storage
    from pipeline.train.trainer import storage_for

    s = spec.settings
    ctx = TrialContext(
        sweep=s.name, base=to_dict(cfg), parent_run_id=parent_run_id,
        trial_cpus=s.trial_cpus, trial_gpus=s.trial_gpus, poll_seconds=s.poll_seconds,
    )
    resources = {"CPU": s.trial_cpus}
    if s.trial_gpus:
        resources["GPU"] = s.trial_gpus
    trainable = tune.with_resources(tune.with_parameters(trial_main, ctx=ctx), resources)
    store = storage_for(cfg)
    fs, path = storage.resolve(experiment_path, store)
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[wavray] sweep {s.name!r}: resuming the sweep stored at {experiment_path}", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=fs)

    scheduler = make_scheduler(s, cfg)
    search_alg, max_concurrent = make_searcher(s)
    parent_fs_path = storage.resolve(storage.join(cfg.checkpoint.storage_path, "sweeps"), store)[1]
    return tune.Tuner(
        trainable,
        param_space=search_space(spec),
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=METRIC_MODE, search_alg=search_alg, scheduler=scheduler,
            num_samples=s.num_samples, max_concurrent_trials=max_concurrent, reuse_actors=False,
            trial_name_creator=trial_dirname, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=s.name, storage_path=parent_fs_path, storage_filesystem=fs,
            failure_config=tune.FailureConfig(max_failures=s.max_failures, fail_fast=False),
            verbose=1,
        ),
    )


def run_sweep(spec: SweepSpec) -> SweepResult:
    """Run (or resume) the sweep of ``spec`` on the connected Ray cluster."""
    from pipeline.data import storage
    from pipeline.tracking import install_log_redaction
    from pipeline.train.trainer import storage_for

    install_log_redaction()
    s = spec.settings
    cfg = resolve_paths(spec.config)
    store = storage_for(cfg)
    storage.ensure_bucket(cfg.checkpoint.storage_path, store)
    if not storage.is_s3(cfg.checkpoint.storage_path):
        os.makedirs(cfg.checkpoint.storage_path, exist_ok=True)
    experiment_path = storage.join(cfg.checkpoint.storage_path, "sweeps", s.name)
    from pipeline.tune.labels import label_before_trials

    label_before_trials(spec, cfg)  # HuBERT's targets: made once, shared by the trials
    parent = _open_parent_run(spec, cfg)
    print(f"[wavray] sweep {s.name!r}: {s.searcher} search over {', '.join(spec.keys)}; ranked by {s.metric} "
          f"({s.scheduler}); MLflow parent run {parent.run_id} in {parent.uri}", flush=True)
    try:
        tuner = _build_tuner(spec, cfg, parent.run_id, experiment_path)
        result_grid = tuner.fit()
        unfinished = len(result_grid) - result_grid.num_terminated - result_grid.num_errors
        if unfinished:
            # Interrupted (Ctrl-C, the driver's job stopped): Tune saved its state; the same
            # command resumes. Nothing is summarised or registered from a partial sweep.
            parent.set_tag("wavray.sweep.interrupted", f"{unfinished} unfinished trial(s); rerun to resume")
            parent.end("KILLED")
            raise SweepInterrupted(
                f"sweep {s.name!r} was interrupted with {unfinished} unfinished trial(s); run the same command "
                f"again to resume it from {experiment_path}"
            )
        client = parent.client
        records = collect_records(result_grid, client, cfg, s.name, spec.keys)
        finish_child_runs(client, records)
        best = best_record(records)
        with tempfile.TemporaryDirectory() as tmp:
            write_summary(records, spec.keys, Path(tmp))
            parent.log_artifacts(tmp)
        counts = {o: sum(r.outcome == o for r in records) for o in ("completed", "early_stopped", "failed")}
        parent.log_metrics(0, {"num_trials": float(len(records)), **{f"num_{k}": float(v) for k, v in counts.items()}})
        version = None
        if best is not None:
            parent.log_metrics(0, {f"best_{s.metric}": float(getattr(best, s.metric))})
            parent.set_tag("wavray.sweep.best_trial", best.trial_id)
            parent.set_tag("wavray.sweep.best_run_id", best.run_id)
            version = register_best(best, cfg, sweep=s.name, model_name=s.model_name,
                                    tracking_uri=parent.uri, experiment=cfg.tracking.experiment)
            parent.set_tag("wavray.sweep.model", f"{s.model_name}/{version}")
    except SweepInterrupted:
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    if best is None:
        parent.end("FAILED")
        raise RuntimeError(f"sweep {s.name!r}: no trial produced a probe score ({len(records)} trials, "
                           f"{counts['failed']} failed); see the trials' errors in {experiment_path}")
    parent.end("FINISHED")
    return SweepResult(
        name=s.name, keys=spec.keys, records=records, best=best, model_name=s.model_name,
        model_version=version, parent_run_id=parent.run_id, tracking_uri=parent.uri,
        experiment_path=experiment_path,
    )
