"""HuBERT's targets: k-means labels for every utterance of a prepared dataset, on Ray Data
(or vq-wav2vec's tokens: ``label.features=tokens``).

    python -m jobs.label --config jobs/configs/pretrain/hubert_laptop.yaml data.train_uri=demo_data/shards
    python -m jobs.label --config jobs/configs/pretrain/hubert_laptop_it2.yaml data.train_uri=demo_data/shards \\
        label.teacher=runs/hubert-it1
    ray job submit -- python -m jobs.label --config jobs/configs/pretrain/hubert.yaml data.train_uri=s3://data/ls960
    python -m jobs.label --config jobs/configs/pretrain/vq_bert_laptop.yaml label.teacher=runs/vq-wav2vec

The config is the pretraining run's own (the same file and overrides): ``model.hubert.clusters``
is K (``model.vq_bert.vocab`` for tokens), the ``label`` section says which features
(``label.features=mfcc``, ``model`` with ``label.teacher`` and ``label.layer``, or ``tokens``
with a vq-wav2vec model as ``label.teacher``: no k-means, the sample builds the vocabulary), the sample k-means is fitted on and the label set's
name. The labels go next to the shards (``<data.train_uri>/labels/<name>/``) with a
``summary.json`` of the cluster usage and purity against the transcripts; running it again
finishes what an interrupted run left and does nothing when the labels are there. The
stages are in ``pipeline/label/job.py``, the layout in ``pipeline/data/labels.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cluster import connect_ray
from pipeline.config import ConfigError, load_config
from pipeline.data.storage import LocalDiskFullError, StorageError, failure_in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.label", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (preset + deltas): the pretraining run's")
    parser.add_argument("--preset", default=None, help="preset when no --config (hubert, hubert_laptop, wavlm, ...)")
    parser.add_argument("--force", action="store_true", help="label again even if the labels are up to date")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto': the one `ray start` left on this machine; "
                             "default: RAY_ADDRESS, else a local instance on 127.0.0.1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking store of a models:/ or runs:/ label.teacher (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--print-summary", action="store_true", help="print the committed summary.json")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        cfg = load_config(args.config, args.overrides, preset=args.preset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.data.train_uri:
        print("error: data.train_uri: expected the prepared dataset to label (jobs.prepare --output)", file=sys.stderr)
        return 2
    from pipeline.label.job import run_labelling

    connect_ray(args.address, num_cpus=args.num_cpus, dashboard=False)
    try:
        summary = run_labelling(cfg, force=args.force, tracking_uri=args.tracking_uri)
    except (StorageError, LocalDiskFullError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a task's store or disk failure arrives wrapped by Ray
        cause = failure_in(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1
    if args.print_summary:
        shown = {k: v for k, v in summary.items() if k != "usage"}
        shown["usage"] = {k: v for k, v in summary["usage"].items() if k != "counts"}
        print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
