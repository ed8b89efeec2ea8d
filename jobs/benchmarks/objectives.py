"""Which objective to pay for: every objective on the same data, encoder size and compute.

    python -m jobs.bench objectives [--objectives laptop,best_rq_laptop,hubert_laptop:2,data2vec_laptop,...]
        [--seconds 1800] [--seed 0] [--workdir runs/objectives] [--finetune-steps 1500] [--probe-steps 300]

1. Data, as ``jobs.bench pretraining-value`` makes it (``pipeline.data.demo_corpus``,
   seeded): unlabelled speech from the training voices for pretraining, 10 minutes of
   transcribed speech from the same voices, a test set spoken only by the held-out voices.
2. Each objective (a preset: ``laptop`` is wav2vec 2.0, ``best_rq_laptop`` BEST-RQ,
   ``hubert_laptop`` / ``wavlm_laptop`` HuBERT / WavLM, ``wav2vec_laptop`` wav2vec 1.0,
   ``vq_wav2vec_laptop`` vq-wav2vec, ``apc_laptop`` APC, ``tera_laptop`` TERA,
   ``data2vec_laptop`` / ``data2vec2_laptop`` data2vec 1.0 / 2.0, ``w2v_bert_laptop``
   w2v-BERT; encoders of the same width) pretrains for the same **CPU-seconds of training**
   (``train.max_seconds``, counted by ``train.budget_clock``: the training process's CPU time
   on CPU, so other load on the machine moves nothing), on one worker: an objective that costs more per update
   reaches fewer updates, which is what it costs. The table shows the updates each reached
   and its audio seconds per second. HuBERT and WavLM first label the corpus
   (``jobs.label``: MFCC, 100 clusters), and that labelling's CPU-seconds (its workers' and
   the k-means fit's) come out of their budget; ``<preset>:2`` runs HuBERT's two iterations
   in the one budget: the first (labelling included) gets 40% of it (the paper's 250k of
   650k updates), then the corpus is labelled again from layer 1 of that model (500
   clusters, ``jobs/configs/pretrain/hubert_laptop_it2.yaml``) and a fresh model trains on
   what is left; the first iteration's model gets a row of its own (``it. 1 of 2``), so the
   table shows the probe after each iteration.
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

OBJECTIVE_NAMES = {"wav2vec2": "wav2vec 2.0", "best_rq": "BEST-RQ", "hubert": "HuBERT", "wav2vec": "wav2vec",
                   "vq_wav2vec": "vq-wav2vec", "apc": "APC", "tera": "TERA"}
OBJECTIVE_NAMES.update(data2vec="data2vec", data2vec2="data2vec 2.0", w2v_bert="w2v-BERT")
FIRST_ITERATION_SHARE = 0.4
"""Of a two-iteration HuBERT row's budget, the first iteration's (HuBERT BASE: 250k of 650k updates)."""
SECOND_ITERATION = ["model.hubert.clusters=500", "label.features=model", "label.layer=1"]
"""The laptop model's second iteration (``jobs/configs/pretrain/hubert_laptop_it2.yaml``)."""
DEFAULT_OBJECTIVES = (
    "laptop,best_rq_laptop,hubert_laptop:2,wavlm_laptop,wav2vec_laptop,vq_wav2vec_laptop,apc_laptop,tera_laptop,"
    "data2vec_laptop,data2vec2_laptop,w2v_bert_laptop"
)


def _describe(cfg: Any) -> str:
    m = cfg.model
    front = "log-mel" if m.frontend.kind == "logmel" else "conv"
    if m.frontend.kind == "conv" and m.encoder.mode == "wav2vec":
        front = "wav2vec conv" + (" + vq" if m.objective == "vq_wav2vec" else "")  # the quantizer is in the encoder
    gated = " + gated bias" if m.transformer.relative_bias == "gated" else ""
    gated += " + ALiBi" if m.transformer.alibi else ""  # data2vec 2.0's attention bias
    layers = str(m.transformer.num_layers)
    if m.objective == "w2v_bert":  # contrastive + masked-LM blocks
        layers = f"{m.w2v_bert_contrastive_layers}+{m.transformer.num_layers - m.w2v_bert_contrastive_layers}"
    return f"{front} + {m.transformer.kind}{gated} {layers}x{m.transformer.dim}"


def _name(cfg: Any) -> str:
    if cfg.model.objective == "hubert" and cfg.model.transformer.relative_bias == "gated":
        return "WavLM"
    return OBJECTIVE_NAMES.get(cfg.model.objective, cfg.model.objective)


def label_corpus(preset: str, data: str, overrides: list[str], log: Any) -> float:
    """Label ``data`` for ``preset`` (``jobs.label``); the seconds the labelling took, by the clock
    the training budget counts in (``train.budget_clock``): on CPU the CPU-seconds of its
    workers and of the k-means fit, as training counts its own, so that load from elsewhere
    moves neither; elapsed seconds on GPU. Read from its summary, so a reused label set still
    counts what it cost."""
    from pipeline.config import apply_overrides, preset_config
    from pipeline.label.job import run_labelling

    cfg = apply_overrides(preset_config(preset), [f"data.train_uri={data}", *overrides])
    summary = run_labelling(cfg, progress=lambda line: log(line))
    clock = cfg.train.budget_clock
    if clock == "auto":
        import torch

        clock = "wall" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    return float(summary["seconds"] if clock == "wall" else summary["cpu_seconds"])


def pretrain_budgeted(work: Path, data: str, *, preset: str, iterations: int, seed: int, seconds: float,
                      overrides: list[str], log: Any) -> tuple[Path, dict[str, Any]]:
    """Pretrain ``preset`` within ``seconds`` in all: for HuBERT, labelling first (its time out of
    the budget), and with ``iterations`` 2 the second iteration on labels of the first's model.
    The info's ``earlier`` lists the iterations before the last (checkpoint, labelling
    seconds), so the table can show what each iteration added."""
    from pipeline.config import preset_config
    from pipeline.train.checkpoint import read_state

    if preset_config(preset).model.objective != "hubert":
        ckpt, secs = pretrain(work, data, seed=seed, steps=10**9, seconds=seconds, overrides=overrides, log=log,
                              preset=preset, log_every=50)
        return ckpt, {"label_seconds": 0.0, "wall": secs, "earlier": []}
    spent = 0.0
    label_seconds = 0.0
    extra: list[str] = []
    ckpt = None
    earlier: list[dict[str, Any]] = []
    for it in range(1, iterations + 1):
        items = overrides + extra
        took = label_corpus(preset, data, items, log)
        label_seconds += took
        spent += took
        share = FIRST_ITERATION_SHARE if it < iterations else 1.0
        budget = max(1.0, share * seconds - spent)
        log(f"{preset} iteration {it}/{iterations}: labelled in {took:.0f} s; {budget:.0f} s of training")
        ckpt, _ = pretrain(work, data, seed=seed, steps=10**9, seconds=budget, overrides=items, log=log,
                           preset=preset, log_every=50)
        spent += read_state(ckpt).train_seconds
        extra = SECOND_ITERATION + [f"label.teacher={ckpt}"]
        if it < iterations:
            earlier.append({"checkpoint": ckpt, "label_seconds": label_seconds})
    assert ckpt is not None
    return ckpt, {"label_seconds": label_seconds, "wall": float("nan"), "earlier": earlier}


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
        f"  {'row':<62} {'params':>8} {'updates':>8} {'label s':>8} {'audio-s/s':>10} {'probe CER':>10} "
        f"{'fine-tuned CER':>15}",
    ]
    for row in results["rows"]:
        params = f"{row['params'] / 1e3:.0f}k" if row.get("params") else "-"
        updates = str(row["updates"]) if row.get("updates") else "-"
        speed = f"{row['audio_s_per_s']:.0f}" if row.get("audio_s_per_s") else "-"
        labelling = f"{row['label_seconds']:.0f}" if row.get("label_seconds") else "-"
        lines.append(f"  {row['label']:<62} {params:>8} {updates:>8} {labelling:>8} {speed:>10} "
                     f"{pct(row.get('probe_cer')):>10} {pct(row.get('finetune_cer')):>15}")
    lines += [
        "  (character error rates on the held-out voices; greedy CTC decoding, no language model; lower is better;",
        "   'label s': CPU-seconds of k-means labelling, counted in the row's budget; 'updates': its last iteration's)",
        "",
        "  wall time: " + ", ".join(f"{k} {_fmt(v)}" for k, v in results["wall"].items() if math.isfinite(v)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench objectives", description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", default=DEFAULT_OBJECTIVES,
                        help="comma-separated presets, one row each; <hubert preset>:2 runs HuBERT's two iterations "
                             "in the budget (default: %(default)s)")
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
        name, _, iterations = p.partition(":")
        preset_config(name)  # an unknown preset fails here, before any work
        if iterations and (not iterations.isdigit() or not 1 <= int(iterations) <= 2
                           or preset_config(name).model.objective != "hubert"):
            parser.error(f"--objectives: {p!r}: ':N' (N = 1 or 2) is for HuBERT presets only")
    session = Session("objectives", args)
    work, data, log, t_all = session.work, session.data, session.log, session.started
    wall: dict[str, float] = {"data": session.data_seconds}

    rows: list[dict[str, Any]] = [{"key": "logmel", "label": "log-mel filterbank (80)", "checkpoint": None}]
    random_rows: dict[str, dict[str, Any]] = {}
    normalize = True
    for key in presets:
        preset, _, iterations = key.partition(":")
        t0 = time.perf_counter()
        ckpt, info = pretrain_budgeted(work, data["unlabelled"], preset=preset, iterations=int(iterations or 1),
                                       seed=args.seed, seconds=args.seconds, overrides=args.pretrain_set, log=log)
        wall[f"pretrain {key}"] = time.perf_counter() - t0
        cfg = preset_config(preset)
        normalize = cfg.data.normalize
        state = read_state(ckpt)
        from pipeline.model_io import load_model

        model = load_model(str(ckpt)).model
        what = f" {int(iterations)} iterations" if iterations and int(iterations) > 1 else ""
        for i, it in enumerate(info["earlier"], start=1):  # what the first iteration alone reached
            st = read_state(it["checkpoint"])
            rows.append({
                "key": f"{key}@{i}", "label": f"{_name(cfg)} it. {i} of {iterations} ({preset}, {_describe(cfg)})",
                "checkpoint": str(it["checkpoint"]), "params": count_parameters(model.encoder), "updates": st.step,
                "audio_s_per_s": st.metrics.get("speed/audio_s_per_s"), "train_seconds": st.train_seconds,
                "label_seconds": it["label_seconds"],
            })
        rows.append({
            "key": key, "label": f"{_name(cfg)}{what} ({preset}, {_describe(cfg)})",
            "checkpoint": str(ckpt), "params": count_parameters(model.encoder), "updates": state.step,
            "audio_s_per_s": state.metrics.get("speed/audio_s_per_s"), "train_seconds": state.train_seconds,
            "label_seconds": info["label_seconds"],
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
            name = r["key"].replace(" ", "-").replace("+", "").replace(":", "-").replace("@", "-it")
            ckpt, secs = finetune(work, data["labelled"], name=name, seed=args.seed, steps=args.finetune_steps,
                                  extra=extra, log=log)
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
