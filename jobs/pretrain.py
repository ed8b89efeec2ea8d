"""Pretrain a wav2vec 2.0 encoder with Ray Train + DeepSpeed, tracked in MLflow.

    python -m jobs.pretrain --config jobs/configs/pretrain/tiny.yaml [a.b.c=value ...]

Through a running cluster (``ray start --head --node-ip-address=127.0.0.1`` locally)::

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) \\
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.pretrain --config jobs/configs/pretrain/tiny.yaml \\
        data.train_uri=s3://wavray/demo checkpoint.storage_path=s3://wavray/runs checkpoint.run_name=demo

``--working-dir .`` ships the repository (minus .gitignore'd paths such as .venv) and
runs the command in that copy: relative local paths then point into the copy, so give
data and checkpoint locations as absolute paths or s3:// URIs. Environment for the
workers (``AWS_*`` for the object store) goes through ``--runtime-env-json
'{"env_vars": {...}}'`` or the cluster's environment.

The same ``checkpoint.run_name`` and ``checkpoint.storage_path`` resume the run from its
newest checkpoint. The job prints a progress line every ``train.log_every`` updates and,
at the end, where the checkpoint, the MLflow run and the UI command are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config

RAY_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


def connect_ray() -> str:
    """Join ``RAY_ADDRESS`` or a cluster started on this machine, else start Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    if RAY_CLUSTER_FILE.exists():
        try:
            ray.init(address="auto", log_to_driver=True)
            return "auto"
        except (ConnectionError, RuntimeError):
            pass  # a stale file from a stopped cluster: start our own
    # The dashboard (on 127.0.0.1) serves the state API Ray Train's clean-up polls.
    ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", log_to_driver=True)
    return "local"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config: a preset and its deltas")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pipeline.data.storage import StorageError
    from pipeline.train.trainer import RunStoppedError, make_run_name, run_pretraining

    run_name = make_run_name(cfg)
    where = connect_ray()
    print(f"[wavray] run {run_name!r}: preset {cfg.preset}, {cfg.scaling.num_workers} workers, "
          f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.max_steps} updates (Ray: {where})", flush=True)
    try:
        result = run_pretraining(cfg, run_name=run_name)
    except (StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunStoppedError as e:
        print(f"error: the run stopped: {e}", file=sys.stderr)
        return 3
    print(f"[wavray] checkpoint: {result.checkpoint_uri} (step {result.step})")
    print(f"[wavray] MLflow run: {result.mlflow_run_id} in {result.mlflow_uri} "
          f"(experiment {cfg.tracking.experiment!r})")
    if result.model_version:
        print(f"[wavray] registered model {cfg.tracking.register_as!r} version {result.model_version}")
    print(f"[wavray] MLflow UI: {result.ui_command}")
    print(f"[wavray] resume or extend: the same command with checkpoint.run_name={result.run_name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
