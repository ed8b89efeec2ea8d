"""Sweep the pretext task with Ray Tune, rank the trials by the downstream probe, register the best.

    python -m jobs.sweep --config jobs/configs/sweep/tiny_demo.yaml [a.b.c=value | sweep.x=value ...]

``a.b.c=value`` changes the base pretraining config of every trial, ``sweep.<setting>=value``
the sweep's settings (``sweep.num_samples=8``, ``sweep.max_concurrent_trials=2``) and
``space.<path>={grid: [...]}`` the search space; the format is in ``pipeline/tune.py``.

Through a running cluster (``ray job submit`` sets ``RAY_ADDRESS``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.sweep --config jobs/configs/sweep/masking.yaml

Running the same ``sweep.name`` again resumes the sweep: finished trials are kept and
unfinished ones continue from their newest checkpoints. At the end the job prints the
table of trials (params, pretraining loss, probe CER), the MLflow parent run and the
registered model version.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cluster import connect_ray
from pipeline.tune import SweepError, SweepInterrupted, load_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML: base config, deltas, settings, space")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local instance on 127.0.0.1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="validate the sweep file and its search space, print the plan, run nothing")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value, sweep.<setting>=value or space.<path>=...")
    args = parser.parse_args(argv)
    try:
        spec = load_sweep(args.config, args.overrides)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = spec.settings
    print(f"[wavray] sweep {s.name!r}: {s.searcher}, {s.num_samples} sample(s), up to {s.max_concurrent_trials} "
          f"at once, ranked by {s.metric} ({s.scheduler}); base preset {spec.config.preset}, "
          f"{spec.config.train.max_steps} updates per trial", flush=True)
    for d in spec.space:
        print(f"[wavray]   {d.key}: {d.describe()}", flush=True)
    if args.check:
        return 0

    from pipeline.data.storage import StorageError
    from pipeline.tune import run_sweep

    where = connect_ray(args.address, num_cpus=args.num_cpus)
    print(f"[wavray] Ray: {where}", flush=True)
    try:
        result = run_sweep(spec)
    except (StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SweepInterrupted as e:
        print(f"[wavray] {e}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(result.table())
    best = result.best
    assert best is not None  # run_sweep raises when no trial has a score
    print(f"[wavray] best trial {best.trial_id}: {s.metric} {getattr(best, s.metric):.4f} at step {best.step} "
          f"({', '.join(f'{k}={v}' for k, v in best.params.items())})")
    print(f"[wavray] registered {result.model_name!r} version {result.model_version} (alias 'best'); "
          f"MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    print(f"[wavray] resume or extend: the same command (sweep {s.name!r} is stored at {result.experiment_path})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
