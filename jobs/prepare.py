"""Turn a directory or s3:// prefix of audio files into training shards.

    python -m jobs.prepare --input demo_data/corpus --output demo_data/shards [a.b.c=value ...]
    python -m jobs.prepare --input corpora/ --output shards/ --language folder   # corpora/<lang>/...
    ray job submit -- python -m jobs.prepare --input s3://raw/audio --output s3://data/shards

Overrides address the config tree (``data.shard_size_mb=64``, ``data.valid_fraction=0.02``,
``data.s3_endpoint=http://127.0.0.1:8333``); ``--config`` names a YAML file. Each file's
language (the ``language`` column the training input balances by) is its sidecar row's
``language`` cell, else what ``--language`` says: ``folder`` for the first folder under
the input, or a code for every file. The layout of
the output is in ``pipeline/data/schema.py``; what happens to each file is in
``pipeline/data/prepare.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.cluster import connect_ray
from pipeline.config import ConfigError, load_config
from pipeline.data.prepare import prepare
from pipeline.data.storage import LocalDiskFullError, StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="directory or s3://bucket/prefix of audio files")
    parser.add_argument("--output", required=True, help="directory or s3://bucket/prefix for the shards")
    parser.add_argument("--sidecar", default=None,
                        help="table (tab-, comma- or semicolon-separated) with path or id, and transcript, "
                             "speaker and/or language (default: <input>/transcripts.tsv if present)")
    parser.add_argument("--language", default=None,
                        help="language of files the sidecar gives none: 'folder' (the first folder under "
                             "--input) or a code for all of them (data.prepare_language)")
    parser.add_argument("--config", default=None, help="YAML config (preset + deltas)")
    parser.add_argument("--preset", default=None, help="preset when no --config (tiny, base, large, ...)")
    parser.add_argument("--force", action="store_true", help="convert again even if the output is up to date")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto': the one `ray start` left on this machine; "
                             "default: RAY_ADDRESS, else a local instance on 127.0.0.1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value config overrides")
    args = parser.parse_args(argv)
    # Quoted: YAML would read a code such as Norwegian's ``no`` as false.
    overrides = list(args.overrides) + ([f"data.prepare_language={json.dumps(args.language)}"] if args.language else [])
    try:
        cfg = load_config(args.config, overrides, preset=args.preset)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    connect_ray(args.address, num_cpus=args.num_cpus, dashboard=False)
    try:
        prepare(args.input, args.output, cfg.data, sidecar_uri=args.sidecar, force=args.force)
    except (StorageError, LocalDiskFullError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
