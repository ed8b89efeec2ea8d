"""The Ray Train worker of a pretraining run: one of these runs on every training rank.

It builds the model and the DeepSpeed engine from the resolved config, resumes from
``ray.train.get_checkpoint()`` when the run has one, streams its part of the training
data, and runs the generic loop with the pretraining step. Rank 0 alone talks to
MLflow and prints the progress line; checkpoints are collective.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config, from_dict
from pipeline.data import storage
from pipeline.ray_compat import quiet_worker_logs
from pipeline.train import checkpoint as ckpt
from pipeline.train.deepspeed_compat import consolidated_state_dict
from pipeline.train.dev import DevScorer, dev_line, dev_scoring
from pipeline.train.engine import Engine, build_engine
from pipeline.train.loop import LoopHooks, NonFiniteLossError, TrainLoop
from pipeline.train.metrics import Alarm
from pipeline.train.objectives import pretraining_step

log = logging.getLogger("wavray.train")

ABORT_FILE = "wavray_abort.json"
"""Written into the run folder when the run stops on purpose (non-finite losses): a
worker error would make Ray Train retry from the last checkpoint, which would only
repeat the same divergence."""


def say(line: str) -> None:
    """One line on the worker's stdout (Ray forwards it to the driver and the job log).

    Written directly: Ray Train's patched ``print`` would also copy it into the log
    records, and the driver would show it twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_duration(seconds: float) -> str:
    """``1h02m`` or ``3m05s`` for the progress line; ``?`` while there is no estimate."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, max_steps: int, metrics: dict[str, float], eta_s: float) -> str:
    """``[wavray] step 50/200 loss 2.913 acc 0.214 audio-s/s 181 (90/worker) wait 3% ETA 1m35s``."""
    return (
        f"[wavray] step {step}/{max_steps} loss {metrics.get('loss', float('nan')):.4f} "
        f"acc {metrics.get('accuracy', float('nan')):.3f} "
        f"audio-s/s {metrics.get('speed/audio_s_per_s', 0.0):.0f} "
        f"({metrics.get('speed/audio_s_per_s_per_worker', 0.0):.0f}/worker) "
        f"wait {100 * metrics.get('speed/data_wait_frac', 0.0):.0f}% ETA {format_duration(eta_s)}"
    )


class RayHooks(LoopHooks):
    """Data position, MLflow, progress and checkpoints of a Ray Train worker."""

    def __init__(self, cfg: Config, eng: Engine, *, rank: int, tracker: Any, position: Any, start_step: int,
                 run_uri: str = "", store: storage.Storage | None = None, dev: DevScorer | None = None):
        self.cfg = cfg
        self.dev = dev
        self.run_uri = run_uri
        self.store = store
        self.eng = eng
        self.rank = rank
        self.tracker = tracker
        self.position = position
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.last_checkpoint_step = start_step

    def on_batch(self, batch: Any) -> None:
        self.position.update(batch)

    def on_log(self, step: int, metrics: dict[str, float], alarms: list[Alarm]) -> None:
        if self.rank != 0:
            return
        done = step - self.start_step
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.cfg.train.max_steps - step)
        if self.cfg.train.max_seconds:  # a time budget ends the run first, typically
            eta = min(eta, self.cfg.train.max_seconds - metrics.get("train_seconds", 0.0))
        say(self.progress(step, metrics, eta))
        if self.tracker is not None:
            try:
                self.tracker.log_metrics(step, metrics)
                for alarm in alarms:
                    self.tracker.set_tag(alarm.key, alarm.message)
            except Exception as e:  # tracking must never stop training
                log.warning("MLflow logging failed at step %d: %s", step, e)

    def progress(self, step: int, metrics: dict[str, float], eta_s: float) -> str:
        """The task's progress line."""
        return progress_line(step, self.cfg.train.max_steps, metrics, eta_s)

    def should_checkpoint(self, step: int) -> bool:
        return step % self.cfg.checkpoint.every_steps == 0

    def on_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        from pipeline.data.position import DataPosition

        states: list[Any] = [None] * dist.get_world_size() if dist.is_initialized() else [None]
        if dist.is_initialized():
            dist.all_gather_object(states, self.position.state_dict())
        else:
            states = [self.position.state_dict()]
        merged = DataPosition.merge(states)
        staging = self.cfg.checkpoint.local_dir or tempfile.gettempdir()
        tmp = Path(staging) / f"wavray-ckpt-{step}-rank{self.rank}-{os.getpid()}"
        try:
            try:
                tmp.mkdir(parents=True, exist_ok=True)
                ckpt.save(
                    tmp, cfg=self.cfg, engine=self.eng.engine, step=step,
                    skipped_steps=int(metrics.get("skipped_steps", 0)), data_position=merged, metrics=metrics,
                    train_seconds=metrics.get("train_seconds", 0.0),
                )
            except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
                err = staging_error(e, staging, f"writing the checkpoint of step {step} (rank {self.rank})")
                if err is e:
                    raise
                raise err from e
            report = {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
            report["step"] = step
            ray.train.report(
                report, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=ckpt.checkpoint_dir_name(step),
                checkpoint_upload_fn=self.upload if self.run_uri else None,
            )
            self.last_checkpoint_step = step
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.dev is not None:
            self.score_dev(step)

    def score_dev(self, step: int) -> None:
        """The dev CER of the weights just saved (:mod:`pipeline.train.dev`), to MLflow at ``step``."""
        assert self.dev is not None
        scores = self.dev.score(self.eng.engine, self.eng.zero_stage)  # every rank: collective under ZeRO-3
        if self.rank != 0 or not scores:
            return
        say(dev_line(step, scores))
        if self.tracker is not None:
            try:
                self.tracker.log_metrics(step, scores)
            except Exception as e:  # tracking must never stop training
                log.warning("MLflow logging failed at step %d: %s", step, e)

    def upload(self, checkpoint: Any, dir_name: str) -> Any:
        """Ray Train's ``checkpoint_upload_fn``: every rank's files, then the state file last
        (:func:`pipeline.train.checkpoint.upload`), through the retrying filesystem that Ray
        Train's controller uses too."""
        import ray.train

        dest = storage.join(self.run_uri, dir_name)
        ckpt.upload(checkpoint.path, dest, self.store, rank=self.rank)
        fs, path = storage.resolve(dest, self.store)
        return ray.train.Checkpoint(path=path, filesystem=fs)


FULL_BELOW_BYTES = 16 << 20
"""A write that fails where less than this is free failed for want of space."""


def staging_error(e: BaseException, directory: str, doing: str) -> BaseException:
    """A full local disk as a :class:`storage.LocalDiskFullError` naming the directory (torch
    and DeepSpeed report it as a RuntimeError of their own, so the free space decides);
    any other error as it is."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return storage.local_disk_error(e, directory, doing)
    try:
        full = shutil.disk_usage(directory).free < FULL_BELOW_BYTES
    except OSError:
        full = False
    if full and isinstance(e, OSError | RuntimeError):
        return storage.local_disk_error(OSError(errno.ENOSPC, str(e)), directory, doing)
    return e


def consolidated_model(eng: Engine, build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """A plain fp32 model (from ``build``) with the trained weights on rank 0, None elsewhere;
    collective under ZeRO-3, so every rank calls it."""
    state = consolidated_state_dict(eng.engine, eng.zero_stage)
    if state is None:
        return None
    model = build()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def record_abort(
    loop_config: dict[str, Any], error: Exception, *, step: int, last_checkpoint_step: int, tracker: Any,
    reason: str = "nonfinite_loss",
) -> None:
    """After a fault that a restart would only repeat (repeated non-finite losses, a full
    local disk): write the run's abort file (the driver reads it to fail the run with this
    message instead of letting Ray Train retry; a restarted worker group finds it and
    stops) and tag the MLflow run."""
    log.error("%s", error)
    storage.write_json(
        storage.join(loop_config["run_uri"], ABORT_FILE),
        {"step": step, "reason": reason, "message": str(error), "last_checkpoint_step": last_checkpoint_step},
        loop_config["storage"],
    )
    if tracker is not None:
        try:
            tracker.set_tag("stopped", str(error))
        except Exception as tag_error:  # tracking must never hide the real error
            log.warning("MLflow tag failed: %s", tag_error)


class WorkerTask:
    """What a task brings to the shared worker: its model, its step, its hooks and what
    it leaves behind at the end. Everything else (engine, resume, data position,
    checkpoints, MLflow, the non-finite stop) is :func:`run_worker`'s, for every task."""

    hooks_class: type[RayHooks] = RayHooks

    def build_model(self, cfg: Config) -> torch.nn.Module:
        """The model, before the engine wraps it (same seed on every rank: same weights)."""
        raise NotImplementedError

    def build_step(self, cfg: Config, model: torch.nn.Module) -> Any:
        """The task's step (:class:`pipeline.train.loop.TaskStep`) for the wrapped model."""
        raise NotImplementedError

    def finish(self, cfg: Config, eng: Engine, *, rank: int, tracker: Any) -> None:
        """After the last update, on every rank (gathering ZeRO-3 weights is collective)."""

    def trains_ctc(self, cfg: Config) -> bool:
        """Whether the task trains a CTC head, whose dev CER the checkpoints log (:mod:`pipeline.train.dev`)."""
        return False


class PretrainTask(WorkerTask):
    """Self-supervised pretraining; the final model goes to MLflow in Hugging Face format."""

    def build_model(self, cfg: Config) -> torch.nn.Module:
        from models.factory import build_pretraining_model
        from pipeline import model_io
        from pipeline.tracking import default_tracking_uri
        from pipeline.train.trainer import storage_for

        model = build_pretraining_model(cfg.model)
        if cfg.train.init_from:
            left = model_io.init_weights(model, cfg.train.init_from, store=storage_for(cfg),
                                         tracking_uri=default_tracking_uri(cfg))
            if any(name.startswith("teacher.") for name in left) and hasattr(model, "reset_teacher"):
                model.reset_teacher()  # data2vec from an encoder without a teacher: it starts as that encoder
        return model

    def build_step(self, cfg: Config, model: torch.nn.Module) -> Any:
        return pretraining_step(cfg, model)

    def trains_ctc(self, cfg: Config) -> bool:
        return cfg.model.objective == "just"  # JUST's CTC head on its masked-LM module

    def finish(self, cfg: Config, eng: Engine, *, rank: int, tracker: Any) -> None:
        from models.factory import build_pretraining_model
        from pipeline.tracking import log_final_model

        full = consolidated_model(eng, lambda: build_pretraining_model(cfg.model))
        if rank == 0 and tracker is not None and full is not None:
            try:
                log_final_model(tracker, full, cfg)
            except Exception as e:
                log.warning("could not log the final model to MLflow: %s", e)


RESTORE_RETRY_S = 60.0
"""Least time a copy that came down short is fetched again: a store that has just restarted
answers before its listing is whole again, which is not the outage ``data.s3_retry_seconds``
bounds."""


def restore(resumed: Any, eng: Engine, cfg: Config, store: storage.Storage) -> ckpt.TrainerState:
    """Load the checkpoint Ray Train resumes from into ``eng``; its trainer state.

    Ray records a checkpoint only once its state file (uploaded last) is there, so a copy
    that comes down without one of its files was listed by a store that is not itself yet
    (seen right after an object store restarts mid-run). Such a copy is fetched again for
    up to ``data.s3_retry_seconds`` (at least ``RESTORE_RETRY_S``) before the run fails
    naming what is missing.
    """
    import pyarrow.fs as pafs

    remote = not isinstance(resumed.filesystem, pafs.LocalFileSystem)
    deadline = time.monotonic() + (max(store.retry_s, RESTORE_RETRY_S) if remote else 0.0)
    while True:
        with tempfile.TemporaryDirectory(prefix="wavray-resume-") as tmp:
            resumed.to_directory(tmp)
            try:
                ckpt.validate(tmp)
            except ValueError as e:
                if time.monotonic() >= deadline:
                    raise
                log.warning("%s; fetching %s again (data.s3_retry_seconds)", e, resumed.path)
                time.sleep(5.0)
                continue
            return ckpt.load(tmp, engine=eng.engine, cfg=cfg)


def run_worker(loop_config: dict[str, Any], task: WorkerTask) -> None:
    """The body of every task's ``train_loop_per_worker``.

    ``loop_config``: ``config`` (the resolved config as a dict), ``run_uri`` (the run's
    folder in storage), ``storage`` (a :class:`pipeline.data.storage.Storage`),
    ``tracker`` (a :class:`pipeline.tracking.Tracker` or None), ``verbose`` (Ray's own
    INFO logs on the console); see :func:`pipeline.train.trainer.loop_config`.
    """
    import ray.train

    from pipeline.data.loader import dataset_languages, iter_train_batches, read_dataset_info
    from pipeline.data.position import DataPosition
    from pipeline.tracking import install_log_redaction

    if not logging.getLogger().handlers:  # Ray Train usually installed its own already
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("wavray").setLevel(logging.INFO)
    quiet_worker_logs(bool(loop_config.get("verbose", False)))
    install_log_redaction()
    cfg = from_dict(loop_config["config"])
    tracker = loop_config.get("tracker")
    rank = ray.train.get_context().get_world_rank()
    if storage.exists(storage.join(loop_config["run_uri"], ABORT_FILE), loop_config["storage"]):
        return  # a worker of the group before stopped the run (record_abort): restarting would not help

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = task.build_model(cfg)
    eng = build_engine(cfg, model)

    start_step, skipped, position, seconds = 0, 0, None, 0.0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        state = restore(resumed, eng, cfg, loop_config["storage"])
        start_step, skipped, position, seconds = state.step, state.skipped_steps, state.data_position, state.train_seconds
        if rank == 0:
            say(f"[wavray] resumed from step {start_step} ({resumed.path})")
            if tracker is not None:
                try:
                    tracker.set_tag("wavray.resumed_from", start_step)
                except Exception as e:  # tracking must never stop training
                    log.warning("MLflow tag failed: %s", e)
    if start_step >= cfg.train.max_steps:
        if rank == 0:
            say(f"[wavray] nothing to do: the run is at step {start_step} of train.max_steps = {cfg.train.max_steps}")
        return

    shard = ray.train.get_dataset_shard("train")
    batches = iter_train_batches(shard, cfg.data, position=position)
    hooks = task.hooks_class(
        cfg, eng, rank=rank, tracker=tracker if rank == 0 else None,
        position=DataPosition(position), start_step=start_step,
        run_uri=loop_config["run_uri"], store=loop_config["storage"],
        dev=DevScorer(cfg, rank=rank) if task.trains_ctc(cfg) and dev_scoring(cfg) else None,
    )
    if cfg.train.max_seconds and seconds >= cfg.train.max_seconds:
        if rank == 0:
            say(f"[wavray] nothing to do: the run spent {seconds:.0f} s of train.max_seconds = {cfg.train.max_seconds:g}")
        return
    # Every rank reads the same summary, so all log the same per-language metric names.
    languages = dataset_languages(read_dataset_info(cfg.data.train_uri, storage.Storage.for_data(cfg.data), wait=True))
    loop = TrainLoop(cfg, eng, task.build_step(cfg, model), start_step=start_step, hooks=hooks,
                     skipped_steps=skipped, train_seconds=seconds, languages=languages)
    try:
        result = loop.run(batches)
    except NonFiniteLossError as e:
        if rank == 0:
            record_abort(loop_config, e, step=loop.step, last_checkpoint_step=hooks.last_checkpoint_step,
                         tracker=tracker)
        return
    except storage.LocalDiskFullError as e:
        # Any rank: the disk of its node is full. Restarting would fill it again; the
        # restarted group finds the abort file and stops, and the driver says why.
        record_abort(loop_config, e, step=loop.step, last_checkpoint_step=hooks.last_checkpoint_step,
                     tracker=tracker if rank == 0 else None, reason="local_disk_full")
        raise

    task.finish(cfg, eng, rank=rank, tracker=tracker)
    if rank == 0:
        say(f"[wavray] finished at step {result.step} (skipped {result.skipped_steps} non-finite)")


def train_worker(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the pretraining ``TorchTrainer`` (see :func:`run_worker`)."""
    run_worker(loop_config, PretrainTask())
