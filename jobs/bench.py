"""Benchmarks as jobs: ``python -m jobs.bench SUBCOMMAND [options]``.

Benchmarks run through ``ray job submit`` like any other job, so they measure the
machines a run will use. Each subcommand lives in its own module under
``jobs/benchmarks/`` exposing ``main(argv) -> int``, imported only when chosen (a data
benchmark should not pay for torch, a model benchmark not for Ray).

    python -m jobs.bench model-step --preset base --batch 2 --seconds 4
    python -m jobs.bench model-step --preset base --device cuda --dtype bf16
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line description); register new benchmarks with one line here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model-step": ("jobs.benchmarks.model_step", "forward+backward of our model vs transformers' Wav2Vec2ForPreTraining"),
    "train-step": ("jobs.benchmarks.train_step", "the training loop with its DeepSpeed engine on synthetic batches"),
    "data": ("jobs.benchmarks.data", "decoding shards: plain soundfile vs the Ray Data training input, local and S3"),
    "scale": ("jobs.benchmarks.scale", "how each data-path cost grows from 1e3 to 1e5 files, fitted and projected to 1e7"),
    "pretraining-value": ("jobs.benchmarks.pretraining_value", "pretrained vs random-init vs log-mel with 10 min of labels (CPC-style table)"),
    "objectives": ("jobs.benchmarks.objectives", "every objective at equal compute, probed and fine-tuned on held-out voices"),
    "just": ("jobs.benchmarks.just", "JUST's one joint run against pretraining then fine-tuning, CER per language"),
    "probe": ("jobs.benchmarks.probe", "the frozen-feature probe of one model, as a sweep scores its trials"),
}


def _usage() -> str:
    lines = ["usage: python -m jobs.bench SUBCOMMAND [options]   (SUBCOMMAND -h for its options)", "", "subcommands:"]
    width = max(len(n) for n in SUBCOMMANDS)
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"jobs.bench: unknown subcommand {name!r}; valid: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
