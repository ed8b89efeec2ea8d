"""The driver side of a pretraining run: a Ray Train V2 ``TorchTrainer`` and what it needs.

- Run identity: ``checkpoint.storage_path`` + ``checkpoint.run_name``. Fitting again with
  the same pair resumes from the newest checkpoint Ray Train recorded for the run
  (``ray.train.get_checkpoint()`` in the workers; no ``resume_from_checkpoint``).
- Failures: ``FailureConfig(max_failures=checkpoint.max_failures)``: a dead worker
  restarts the worker group from the newest checkpoint.
- Data: the training dataset is passed as a factory (:class:`TrainDataFactory`). Ray
  Train calls it every time it starts a worker group, and it builds the stream from the
  data position saved in the checkpoint the workers are about to resume from, so a
  restart continues the epoch where the checkpoint left it instead of replaying the
  stream from the start. Block order is preserved and the equal split is greedy, so
  every rank sees the same batches in the same order as in an uninterrupted run.
- Tracking: the driver opens the MLflow run (params, config) and closes it; rank 0
  logs metrics, alarms and the final model during the run.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import Config, DataConfig, to_dict
from pipeline.data import storage
from pipeline.train import checkpoint as ckpt
from pipeline.train.worker import ABORT_FILE, train_worker

log = logging.getLogger("wavray.train")

class RunStoppedError(RuntimeError):
    """The run stopped on purpose (e.g. repeated non-finite losses); retrying would not help."""


def make_run_name(cfg: Config) -> str:
    """``checkpoint.run_name`` or ``<preset>-<UTC time>``."""
    if cfg.checkpoint.run_name:
        return cfg.checkpoint.run_name
    return f"{cfg.preset}-{datetime.datetime.now(datetime.UTC).strftime('%Y%m%d-%H%M%S')}"


def storage_for(cfg: Config) -> storage.Storage:
    """How to reach s3:// URIs (endpoint/region from the data section or the AWS variables)."""
    return storage.Storage.for_data(cfg.data)


def latest_checkpoint_uri(
    run_uri: str, store: storage.Storage | None = None, *, recorded_only: bool = False
) -> str | None:
    """The checkpoint Ray Train resumes ``run_uri`` from: the newest one it recorded.

    Where Ray Train's record is missing or unreadable (a run folder copied without it, a
    record of another Ray version), the newest complete ``checkpoint_*`` folder
    (``trainer_state.json`` present, written last), unless ``recorded_only``: what a
    restarting worker group resumes from is Ray Train's record alone, and a folder it has
    not recorded yet (an upload that finished before the record) must not be taken for it.
    """
    from pipeline.ray_compat import latest_checkpoint_dir

    fs, path = storage.resolve(run_uri, store)
    try:
        name = latest_checkpoint_dir(path, fs)
        return None if name is None else storage.join(run_uri, name)
    except FileNotFoundError:
        if recorded_only:
            return None
    except (OSError, ValueError) as e:
        if recorded_only:
            log.warning("%s; Ray Train cannot resume from it either", e)
            return None
        log.warning("%s; looking for the newest complete checkpoint instead", e)
    names = sorted(
        info.base_name for info in storage.list_dir(run_uri, store)
        if info.type == pafs.FileType.Directory and ckpt.CHECKPOINT_DIR_RE.match(info.base_name)
    )
    for name in reversed(names):
        uri = storage.join(run_uri, name)
        if storage.exists(storage.join(uri, ckpt.STATE_FILE), store):
            return uri
    return None


def read_trainer_state(ckpt_uri: str, store: storage.Storage | None = None) -> ckpt.TrainerState:
    uri = storage.join(ckpt_uri, ckpt.STATE_FILE)
    return ckpt.TrainerState.from_json(storage.read_bytes(uri, store).decode("utf-8"), uri)


@dataclass
class TrainDataFactory:
    """Builds the training dataset at each worker-group start, from the resume position."""

    data: DataConfig
    seed: int
    num_workers: int
    run_uri: str
    store: storage.Storage
    max_steps: int = 0
    """The run's ``train.max_steps`` (0: stream every epoch of ``data.max_epochs``)."""
    grad_accum: int = 1
    started: bool = False
    """Set after the first worker group's dataset: later calls are restarts of a running
    run, which ride out an object store that cannot be reached instead of failing fast."""
    labels: Any = None
    """HuBERT's labels or vq_bert's tokens (``pipeline.data.labels.LabelSpec``) joined with every batch, or None."""

    def position(self) -> tuple[dict[str, Any] | None, int]:
        """(data position, step) of the checkpoint the workers resume from; (None, 0) when none."""
        uri = latest_checkpoint_uri(self.run_uri, self.store, recorded_only=True)
        if uri is None:
            return None, 0
        state = read_trainer_state(uri, self.store)
        return state.data_position, state.step

    def __call__(self) -> Any:
        from pipeline.data.loader import build_train_dataset

        position, step = self.position()
        # What the run will still read: its remaining updates, on every worker.
        needed = max(1, self.max_steps - step) * self.grad_accum * self.num_workers if self.max_steps else None
        ds = build_train_dataset(
            self.data, split="train", position=position, seed=self.seed, num_splits=self.num_workers,
            wait=self.started, max_batches=needed,
            labels=self.labels,
        )
        self.started = True
        # The progress line of rank 0 says how training goes; Ray Data's bars for the
        # split only interleave with it.
        ds.context.enable_progress_bars = False
        return ds


@dataclass
class RunResult:
    """Where a finished run put things."""

    run_name: str
    run_uri: str
    checkpoint_uri: str | None
    step: int | None
    mlflow_uri: str
    mlflow_run_id: str
    ui_command: str
    model_version: str | None = None


def resolve_init(cfg: Config) -> Config:
    """``train.init_from`` pinned (an MLflow alias becomes its version, a local path
    absolute: every worker loads the same model) and checked readable before any work."""
    if not cfg.train.init_from:
        return cfg
    from pipeline import model_io
    from pipeline.config import apply_overrides
    from pipeline.tracking import default_tracking_uri

    tracking_uri = default_tracking_uri(cfg)
    source = model_io.pin(cfg.train.init_from, tracking_uri=tracking_uri)
    model_io.fetch(source, store=storage_for(cfg), tracking_uri=tracking_uri)
    return apply_overrides(cfg, {"train.init_from": source})


def run_pretraining(cfg: Config, *, run_name: str | None = None, verbose: bool = False) -> RunResult:
    """Fit (or resume) the pretraining run of ``cfg`` on the connected Ray cluster."""
    if not cfg.data.train_uri:
        raise ValueError("data.train_uri: expected the prepared dataset (jobs.prepare --output), got ''")
    cfg = resolve_init(cfg)
    if cfg.model.objective == "just":  # the CTC vocabulary and the labelled utterances, before any worker
        from pipeline.train.just import resolve_config as resolve_just

        cfg = resolve_just(cfg)
    labels = None
    if cfg.model.objective in ("hubert", "vq_bert"):  # targets (tokens) made offline: the set the settings name
        from pipeline.label.job import training_labels
        from pipeline.tracking import default_tracking_uri

        labels = training_labels(cfg, tracking_uri=default_tracking_uri(cfg))
        check_resumed_labels(cfg, run_name or cfg.checkpoint.run_name, labels)
    return fit_run(cfg, train_worker, run_name=run_name, register=bool(cfg.tracking.register_as), verbose=verbose,
                   labels=labels)


def check_resumed_labels(cfg: Config, run_name: str, labels: Any) -> None:
    """A run being resumed continues on the labels it started with; refused here, before any
    worker starts, when the label set was remade with other settings since."""
    if not run_name:
        return
    store = storage_for(cfg)
    latest = latest_checkpoint_uri(storage.join(cfg.checkpoint.storage_path, run_name), store, recorded_only=True)
    if latest is not None:
        labels.check_position(read_trainer_state(latest, store).data_position)


def loop_config(cfg: Config, *, run_uri: str, store: storage.Storage, tracker: Any,
                verbose: bool = False) -> dict[str, Any]:
    """The ``train_loop_config`` every worker receives (pickled by Ray): the resolved config,
    where the run lives, how to reach storage (no credentials: :class:`storage.Storage`),
    the MLflow run, and whether Ray's own INFO logs reach the console."""
    return {"config": to_dict(cfg), "run_uri": run_uri, "storage": store, "tracker": tracker, "verbose": verbose}


def fit_run(
    cfg: Config,
    worker: Callable[[dict[str, Any]], None],
    *,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    register: bool = False,
    verbose: bool = False,
    labels: Any = None,
) -> RunResult:
    """Fit (or resume) a training run of ``worker`` (the Ray Train function) for ``cfg``.

    Pretraining and fine-tuning differ only in the worker: run identity and storage, the
    MLflow run (opened here, ended with the run's outcome), Ray Train's failure handling,
    the data factory and the exact-resume data settings are this one function.
    ``register``: register the final model as ``tracking.register_as``. ``verbose``: Ray
    Train's own INFO logs on the console (every report of every worker); off, the console
    shows wavray's progress lines, alarms and closing summary. ``labels``: a label set
    joined with the training batches (HuBERT).
    """
    import ray.train
    from ray.data import DataContext, ExecutionOptions
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.ray_compat import train_logging_config
    from pipeline.tracking import Tracker, install_log_redaction

    install_log_redaction()
    run_name = run_name or make_run_name(cfg)
    store = storage_for(cfg)
    storage.ensure_bucket(cfg.checkpoint.storage_path, store)
    fs, storage_path = storage.resolve(cfg.checkpoint.storage_path, store)
    if not storage.is_s3(cfg.checkpoint.storage_path):
        os.makedirs(storage_path, exist_ok=True)
    run_uri = storage.join(cfg.checkpoint.storage_path, run_name)
    abort_uri = storage.join(run_uri, ABORT_FILE)
    if storage.exists(abort_uri, store):
        fs.delete_file(storage.resolve(abort_uri, store)[1])

    DataContext.get_current().enable_progress_bars = False
    tracker = Tracker.open(cfg, run_name)
    tracker.log_config(cfg)
    for key, value in {"wavray.preset": cfg.preset, "wavray.run_uri": run_uri, **(tags or {})}.items():
        tracker.set_tag(key, value)

    use_gpu = cfg.scaling.use_gpu
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources()}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config(cfg, run_uri=run_uri, store=store, tracker=tracker, verbose=verbose),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
            logging_config=train_logging_config(verbose),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=1800),
        # Ray Train replaces the dataset's execution options with these: block order is
        # preserved, so the greedy equal split hands every rank the same batches as in an
        # uninterrupted run (exact resume after a fault; locality hints are ignored then).
        dataset_config=ray.train.DataConfig(
            execution_options={"train": ExecutionOptions(preserve_order=True)}, enable_shard_locality=False,
        ),
        datasets={"train": TrainDataFactory(
            cfg.data, seed=cfg.train.seed, num_workers=cfg.scaling.num_workers, run_uri=run_uri, store=store,
            max_steps=cfg.train.max_steps, grad_accum=cfg.train.grad_accum,
            labels=labels,
        )},
    )
    try:
        trainer.fit()
    except BaseException as e:
        tracker.end("FAILED")
        cause = storage.failure_in(e)
        if cause is not None:
            raise cause from e
        raise
    if storage.exists(abort_uri, store):
        info = storage.read_json(abort_uri, store)
        tracker.end("FAILED")
        raise RunStoppedError(info.get("message", "the run stopped"))

    latest = latest_checkpoint_uri(run_uri, store)
    step = read_trainer_state(latest, store).step if latest else None
    version = None
    if register:
        from pipeline.tracking import final_model_artifact

        version = tracker.register_model(cfg.tracking.register_as, artifact_path=final_model_artifact(cfg))
    tracker.end("FINISHED")
    return RunResult(
        run_name=run_name, run_uri=run_uri, checkpoint_uri=latest, step=step, mlflow_uri=tracker.uri,
        mlflow_run_id=tracker.run_id, ui_command=tracker.ui_command(), model_version=version,
    )
