"""Which objective to pay for: every objective on the same data, encoder size and compute.

    python -m jobs.bench objectives [--objectives laptop,best_rq_laptop,data2vec_laptop,data2vec2_laptop]
        [--seconds 1800]
        [--seed 0] [--workdir runs/objectives] [--finetune-steps 1500] [--probe-steps 300]

1. Data, as ``jobs.bench pretraining-value`` makes it (``pipeline.data.demo_corpus``,
   seeded): unlabelled speech from the training voices for pretraining, 10 minutes of
   transcribed speech from the same voices, a test set spoken only by the held-out voices.
2. Each objective (a preset: ``laptop`` is wav2vec 2.0, ``best_rq_laptop`` BEST-RQ,
   ``data2vec_laptop`` / ``data2vec2_laptop`` data2vec 1.0 / 2.0; encoders of the same width
   and depth) pretrains for the same **CPU-seconds of training** (``train.max_seconds``,
   counted by ``train.budget_clock``: the training process's CPU time on CPU, so other load
   on the machine moves nothing), on one worker: an objective that costs more per update
   reaches fewer updates, which is what it costs. The table shows the updates each
   reached and its audio seconds per second.
3. The same downstream budget for every row: the frozen-feature probe (a conv CTC head,
   ``--probe-steps`` updates, trained on the 10 minutes, scored on the held-out voices), and
   CTC fine-tuning (``jobs/configs/finetune/tiny_10m.yaml``, ``--finetune-steps`` updates,
   evaluated on the held-out voices). Baselines: log-mel filterbanks (80), and each encoder
   architecture with random weights.

Prints one table and writes ``objectives-s<seed>.json`` in the work directory; stages
already done there are reused, so a second call only re-evaluates. Later objectives add
their preset to ``--objectives``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from jobs.benchmarks.pretraining_value import Session, _fmt, finetune, pretrain, probes, random_checkpoint

OBJECTIVE_NAMES = {"wav2vec2": "wav2vec 2.0", "best_rq": "BEST-RQ"}
OBJECTIVE_NAMES.update(data2vec="data2vec", data2vec2="data2vec 2.0")


def _describe(cfg: Any) -> str:
    m = cfg.model
    front = "log-mel" if m.frontend.kind == "logmel" else "conv"
    return f"{front} + {m.transformer.kind} {m.transformer.num_layers}x{m.transformer.dim}"


def render(results: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "   -  " if x is None or not math.isfinite(x) else f"{100 * x:5.1f}%"

    s = results["setup"]
    lines = [
        "objectives: the same data, encoder size and compute for each objective, then the same probe",
        f"  seed {s['seed']} | pretraining: {s['pretrain_minutes']:.1f} min unlabelled, {s['num_train_voices']} voices, "
        f"{s['seconds']:g} CPU-s of training each (1 worker) | labels: {s['label_minutes']:.1f} min | "
        f"test: {s['test_minutes']:.1f} min, held-out voices {s['test_voices']}",
        f"  downstream, equal for all rows: probe {s['probe_steps']} updates of a conv CTC head; "
        f"fine-tune {s['finetune_steps']} updates",
        "",
        f"  {'row':<44} {'params':>8} {'updates':>8} {'audio-s/s':>10} {'probe CER':>10} {'fine-tuned CER':>15}",
    ]
    for row in results["rows"]:
        params = f"{row['params'] / 1e3:.0f}k" if row.get("params") else "-"
        updates = str(row["updates"]) if row.get("updates") else "-"
        speed = f"{row['audio_s_per_s']:.0f}" if row.get("audio_s_per_s") else "-"
        lines.append(f"  {row['label']:<44} {params:>8} {updates:>8} {speed:>10} {pct(row.get('probe_cer')):>10} "
                     f"{pct(row.get('finetune_cer')):>15}")
    lines += [
        "  (character error rates on the held-out voices; greedy CTC decoding, no language model; lower is better)",
        "",
        "  wall time: " + ", ".join(f"{k} {_fmt(v)}" for k, v in results["wall"].items() if math.isfinite(v)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench objectives", description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", default="laptop,best_rq_laptop,data2vec_laptop,data2vec2_laptop",
                        help="comma-separated presets, one row each (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=1800.0,
                        help="CPU-seconds of training per objective (default: %(default)s = 30 CPU-minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/objectives")
    parser.add_argument("--pretrain-minutes", type=float, default=40.0)
    parser.add_argument("--label-minutes", type=float, default=10.0)
    parser.add_argument("--test-minutes", type=float, default=4.0)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--skip-finetune", action="store_true", help="probe only (the cheap half)")
    parser.add_argument("--pretrain-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra pretraining overrides, the same for every objective")
    args = parser.parse_args(argv)

    from jobs.evaluate import evaluate
    from models.factory import count_parameters
    from pipeline.config import preset_config
    from pipeline.probe import load_labelled_set
    from pipeline.train.checkpoint import read_state

    presets = [p for p in args.objectives.split(",") if p]
    for p in presets:
        preset_config(p)  # an unknown preset fails here, before any work
    session = Session("objectives", args)
    work, data, log, t_all = session.work, session.data, session.log, session.started
    wall: dict[str, float] = {"data": session.data_seconds}

    rows: list[dict[str, Any]] = [{"key": "logmel", "label": "log-mel filterbank (80)", "checkpoint": None}]
    random_rows: dict[str, dict[str, Any]] = {}
    normalize = True
    for preset in presets:
        ckpt, secs = pretrain(work, data["unlabelled"], seed=args.seed, steps=10**9, seconds=args.seconds,
                              overrides=args.pretrain_set, log=log, preset=preset, log_every=50)
        wall[f"pretrain {preset}"] = secs
        cfg = preset_config(preset)
        normalize = cfg.data.normalize
        state = read_state(ckpt)
        from pipeline.model_io import load_model

        model = load_model(str(ckpt)).model
        rows.append({
            "key": preset, "label": f"{OBJECTIVE_NAMES.get(cfg.model.objective, cfg.model.objective)} ({preset}, "
                                    f"{_describe(cfg)})",
            "checkpoint": str(ckpt), "params": count_parameters(model.encoder), "updates": state.step,
            "audio_s_per_s": state.metrics.get("speed/audio_s_per_s"), "train_seconds": state.train_seconds,
        })
        arch = _describe(cfg)
        if arch not in random_rows:
            rnd = random_checkpoint(ckpt, work / "random-init", seed=args.seed)
            random_rows[arch] = {"key": f"random {arch}", "label": f"random-init encoder ({arch})",
                                 "checkpoint": str(rnd), "params": count_parameters(model.encoder)}
    rows[1:1] = list(random_rows.values())

    t0 = time.perf_counter()
    scores = probes({r["key"]: r["checkpoint"] for r in rows}, data["labelled"], data["test"], seed=args.seed,
                    steps=args.probe_steps, normalize=normalize, log=log)
    wall["probes"] = time.perf_counter() - t0
    for r in rows:
        r["probe_cer"] = scores[r["key"]]["probe/cer"]
    if not args.skip_finetune:
        for r in rows:
            extra = [f"train.init_from={r['checkpoint']}"] if r["checkpoint"] else [
                "finetune.frontend=logmel", f"data.normalize={str(normalize).lower()}"]
            ckpt, secs = finetune(work, data["labelled"], name=r["key"].replace(" ", "-").replace("+", ""),
                                  seed=args.seed, steps=args.finetune_steps, extra=extra, log=log)
            wall[f"finetune {r['key']}"] = secs
            ev, _ = evaluate(str(ckpt), data["test"])
            r["finetune_cer"] = ev.summary["cer"]
            log(f"{r['key']}: fine-tuned test CER {100 * ev.summary['cer']:.1f}%")
    wall["total"] = time.perf_counter() - t_all

    minutes = {k: load_labelled_set(data[k]).minutes for k in ("labelled", "test")}
    summary = json.loads((Path(data["unlabelled"]) / "summary.json").read_text())
    results = {
        "setup": {
            "seed": args.seed, "seconds": args.seconds, "probe_steps": args.probe_steps,
            "finetune_steps": args.finetune_steps, "pretrain_minutes": float(summary.get("hours", 0.0)) * 60,
            "label_minutes": minutes["labelled"], "test_minutes": minutes["test"],
            "test_voices": data["test_voices"], "num_train_voices": data["num_train_voices"],
            "objectives": presets, "pretrain_overrides": args.pretrain_set,
        },
        "rows": rows,
        "wall": wall,
    }
    (work / f"objectives-s{args.seed}.json").write_text(json.dumps(results, indent=1, default=str))
    print(render(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
