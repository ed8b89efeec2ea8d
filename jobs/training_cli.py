"""The command line that the training jobs (``jobs.pretrain``, ``jobs.finetune``) share:
their arguments, config errors, Ray connection, run errors and closing lines, so that
every training job answers a user the same way.

Exit codes: 0 done, 1 the run could not start or failed (storage, data), 2 a bad config,
3 the run stopped itself (repeated non-finite losses, a full local disk; the message names
the last good checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import Config, ConfigError, load_config


def training_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """``--config FILE [--address A] [a.b.c=value ...]``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config: a preset and its deltas")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto': the one `ray start` left on this machine; "
                             "default: RAY_ADDRESS, else a local instance on 127.0.0.1)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own INFO logs on the console too (every report of every worker, data "
                             "execution); by default the console shows wavray's progress lines, alarms and summary")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value config overrides")
    return parser


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def load_job_config(args: argparse.Namespace) -> Config | None:
    """The config of ``--config`` and the overrides, or None after printing what is wrong."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        error(str(e))
        return None


def connect(args: argparse.Namespace) -> str:
    """Join or start Ray (see :func:`pipeline.cluster.connect_ray`); the address, for the log."""
    from pipeline.cluster import connect_ray

    return connect_ray(args.address, verbose=args.verbose)


def run_training(run: Callable[[Config], Any], cfg: Config) -> tuple[Any, int]:
    """``run(cfg)``'s result and 0, or None and the exit code after printing the error."""
    from pipeline.data.storage import LocalDiskFullError, StorageError
    from pipeline.train.trainer import RunStoppedError

    try:
        return run(cfg), 0
    except (StorageError, LocalDiskFullError, ValueError) as e:
        error(str(e))
        return None, 1
    except RunStoppedError as e:
        error(f"the run stopped: {e}")
        return None, 3


def print_result(cfg: Config, result: Any, extra: Sequence[str] = ()) -> None:
    """Where the run's checkpoint, MLflow run, registered model and UI are."""
    print(f"[wavray] checkpoint: {result.checkpoint_uri} (step {result.step})")
    for line in extra:
        print(f"[wavray] {line}")
    print(f"[wavray] MLflow run: {result.mlflow_run_id} in {result.mlflow_uri} "
          f"(experiment {cfg.tracking.experiment!r})")
    if result.model_version:
        print(f"[wavray] registered model {cfg.tracking.register_as!r} version {result.model_version}")
    print(f"[wavray] MLflow UI: {result.ui_command}", flush=True)
