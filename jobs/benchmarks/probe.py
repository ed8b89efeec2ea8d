"""The frozen-feature probe of one model: the yardstick the sweeps rank trials by, on its own.

    python -m jobs.bench probe --checkpoint runs/hubert-it1 --config jobs/configs/sweep/hubert_demo.yaml

Scores any model location (``pipeline/model_io.py``; a vq_bert model through the
vq-wav2vec tokeniser of its label set) with the probe a sweep or a pretraining
config names (its ``probe`` section: the labelled sets, the head, its budget; a sweep file's
base config, or a pretraining config with ``probe.*`` overrides), exactly as each trial is
scored: a CTC head trained on the frozen features of ``probe.train_*``, its greedy CER and
WER on ``probe.dev_*``. Prints one line and, with ``--json``, the scores.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench probe", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="the model: any location jobs.export reads")
    parser.add_argument("--config", required=True, help="a sweep file or a pretraining config (its probe section)")
    parser.add_argument("--json", default="", help="write the scores to this file")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides of the config (probe.steps=...)")
    args = parser.parse_intermixed_args(argv)

    import yaml

    from pipeline.config import ConfigError, load_config
    from pipeline.label.tokens import audio_model
    from pipeline.model_io import load_model
    from pipeline.probe import probe_sets, run_probe

    try:
        with open(args.config) as f:
            raw = yaml.safe_load(f) or {}
        if "sweep" in raw or "space" in raw:
            from pipeline.tune.spec import load_sweep

            cfg = load_sweep(args.config, args.overrides).config
        else:
            cfg = load_config(args.config, args.overrides)
        train, dev = probe_sets(cfg)
        trained = load_model(args.checkpoint)
        model = audio_model(trained)
    except (ConfigError, ValueError) as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2
    scores = run_probe(model, train, dev, cfg.probe, normalize=trained.normalize)
    print(f"probe: {args.checkpoint}: CER {100 * scores['probe/cer']:.1f}% WER {100 * scores['probe/wer']:.1f}% "
          f"(dev loss {scores['probe/dev_loss']:.3f}; {train.minutes:.1f} min to train the head, "
          f"{dev.minutes:.1f} min scored; {scores['probe/seconds']:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
