"""Pretrain a wav2vec 2.0 encoder with Ray Train + DeepSpeed, tracked in MLflow.

    python -m jobs.pretrain --config jobs/configs/pretrain/laptop.yaml [a.b.c=value ...]

Through a running cluster (``ray start --head --node-ip-address=127.0.0.1`` locally)::

    RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token) \\
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.pretrain --config jobs/configs/pretrain/laptop.yaml \\
        data.train_uri=s3://wavray/demo checkpoint.storage_path=s3://wavray/runs checkpoint.run_name=demo

``--working-dir .`` ships the repository (minus .gitignore'd paths such as .venv) and
runs the command in that copy: relative local paths then point into the copy, so give
data and checkpoint locations as absolute paths or s3:// URIs. Environment for the
workers (``AWS_*`` for the object store) goes through ``--runtime-env-json
'{"env_vars": {...}}'`` or the cluster's environment.

Run directly, the job joins ``--address`` (``auto``: the cluster ``ray start`` left on
this machine) or ``RAY_ADDRESS``, else starts a local Ray instance on 127.0.0.1.

The same ``checkpoint.run_name`` and ``checkpoint.storage_path`` resume the run from its
newest checkpoint. The job prints a progress line every ``train.log_every`` updates and,
at the end, where the checkpoint, the MLflow run and the UI command are.
"""

from __future__ import annotations

import sys

from jobs.training_cli import connect, load_job_config, print_result, run_training, training_parser


def main(argv: list[str] | None = None) -> int:
    args = training_parser("python -m jobs.pretrain", __doc__).parse_args(argv)
    cfg = load_job_config(args)
    if cfg is None:
        return 2

    from pipeline.train.trainer import make_run_name, run_pretraining

    run_name = make_run_name(cfg)
    where = connect(args)
    print(f"[wavray] run {run_name!r}: preset {cfg.preset}, {cfg.scaling.num_workers} workers, "
          f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.max_steps} updates (Ray: {where})", flush=True)
    result, code = run_training(lambda c: run_pretraining(c, run_name=run_name, verbose=args.verbose), cfg)
    if result is None:
        return code
    print_result(cfg, result)
    print(f"[wavray] resume or extend: the same command with checkpoint.run_name={result.run_name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
