"""Which objective to pay for: every objective on the same data, encoder size and compute.

    python -m jobs.bench objectives [--objectives laptop,best_rq_laptop,hubert_laptop:2,data2vec_laptop,...] [--languages en,de,fr]
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
   table shows the probe after each iteration. ``vq_bert_laptop`` is vq-wav2vec's two stages
   in the one budget: ``vq_wav2vec_laptop`` pretrains on the first half of it
   (``VQ_BERT_FIRST_STAGE_SHARE``), the tokenising job (``jobs.label label.features=tokens``
   with that model as ``label.teacher``; its CPU-seconds counted as HuBERT's labelling) writes
   its tokens next to the shards, and the BERT trains on them with what is left; its first
   stage gets a row of its own (``stage 1 of 2``), and the probe reads the BERT through the
   tokeniser of its label set (``pipeline.label.tokens.audio_model``), and fine-tuning trains
   a CTC head on the BERT behind that tokeniser (``models.vq_bert.VqBertForCTC``).
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
OBJECTIVE_NAMES.update(data2vec="data2vec", data2vec2="data2vec 2.0", w2v_bert="w2v-BERT", vq_bert="vq-wav2vec + BERT")
FIRST_ITERATION_SHARE = 0.4
"""Of a two-iteration HuBERT row's budget, the first iteration's (HuBERT BASE: 250k of 650k updates)."""
SECOND_ITERATION = ["model.hubert.clusters=500", "label.features=model", "label.layer=1"]
"""The laptop model's second iteration (``jobs/configs/pretrain/hubert_laptop_it2.yaml``)."""
VQ_BERT_FIRST_STAGE_SHARE = 0.5
"""Of a vq_bert row's budget, its first stage's: vq-wav2vec's pretraining; the tokenising
job's CPU-seconds and the BERT's training share the rest. Half each is this benchmark's
choice: the paper trains its two stages for different numbers of updates on different
hardware and gives no ratio of their compute, and an even split keeps either stage from
deciding the row alone (the first stage's row beside it shows what half the budget buys
without the BERT)."""
TOKENISERS = {"vq_bert": "vq_wav2vec", "vq_bert_laptop": "vq_wav2vec_laptop"}
"""The vq-wav2vec preset whose tokens each vq_bert preset's BERT reads (its first stage)."""
DEFAULT_OBJECTIVES = (
    "laptop,best_rq_laptop,hubert_laptop:2,wavlm_laptop,wav2vec_laptop,vq_wav2vec_laptop,apc_laptop,tera_laptop,"
    "data2vec_laptop,data2vec2_laptop,w2v_bert_laptop,vq_bert_laptop"
)


def _describe(cfg: Any) -> str:
    m = cfg.model
    if m.objective == "vq_bert":  # no audio front end: tokens of the vq-wav2vec model at label.teacher
        return f"vq-wav2vec tokens ({m.vq_bert.vocab}) + {m.transformer.kind} {m.transformer.num_layers}x{m.transformer.dim}"
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
    the budget), and with ``iterations`` 2 the second iteration on labels of the first's model;
    for vq_bert, vq-wav2vec's pretraining, its tokenising and the BERT (:func:`pretrain_vq_bert`).
    The info's ``earlier`` lists the models trained before the last (checkpoint, the row's
    name, labelling seconds until then), so the table can show what each stage added."""
    from pipeline.config import preset_config
    from pipeline.train.checkpoint import read_state

    objective = preset_config(preset).model.objective
    if objective == "vq_bert":
        return pretrain_vq_bert(work, data, preset=preset, seed=seed, seconds=seconds, overrides=overrides, log=log)
    if objective != "hubert":
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
            earlier.append({"checkpoint": ckpt, "label_seconds": label_seconds, "what": f"it. {it} of {iterations}",
                            "preset": preset})
    assert ckpt is not None
    return ckpt, {"label_seconds": label_seconds, "wall": float("nan"), "earlier": earlier}


def pretrain_vq_bert(work: Path, data: str, *, preset: str, seed: int, seconds: float, overrides: list[str],
                     log: Any) -> tuple[Path, dict[str, Any]]:
    """vq-wav2vec's two stages in ``seconds`` in all: its ``TOKENISERS`` preset pretrains for
    ``VQ_BERT_FIRST_STAGE_SHARE`` of them, ``jobs.label`` tokenises ``data`` with that model
    (``label.features=tokens``, the preset's), and the BERT ``preset`` trains on the tokens
    with what the first stage and the tokenising left. Every stage is reused when done, as
    the other rows' runs are: the first stage's checkpoint names the label set's teacher and
    so the BERT's run."""
    from pipeline.train.checkpoint import read_state

    first = TOKENISERS[preset]
    stage1, _ = pretrain(work, data, seed=seed, steps=10**9, seconds=VQ_BERT_FIRST_STAGE_SHARE * seconds,
                         overrides=overrides, log=log, preset=first, log_every=50)
    spent = read_state(stage1).train_seconds
    items = overrides + [f"label.teacher={stage1}"]
    took = label_corpus(preset, data, items, log)
    spent += took
    budget = max(1.0, seconds - spent)
    log(f"{preset}: {first} trained {spent - took:.0f} s, tokenised in {took:.0f} s; {budget:.0f} s of BERT training")
    ckpt, _ = pretrain(work, data, seed=seed, steps=10**9, seconds=budget, overrides=items, log=log, preset=preset,
                       log_every=50)
    earlier = [{"checkpoint": stage1, "label_seconds": 0.0, "what": "stage 1 of 2", "preset": first}]
    return ckpt, {"label_seconds": took, "wall": float("nan"), "earlier": earlier}


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
        "   'label s': CPU-seconds of k-means labelling or of vq_bert's tokenising, counted in the row's budget;",
        "   'updates': its last iteration's or stage's)",
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
    parser.add_argument("--languages", default="",
                        help="a multilingual demo corpus of these languages (e.g. en,de,fr; each language's held-out "
                             "voices in the test set); default: the English one")
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
    from pipeline.model_io import load_model
    from pipeline.probe import load_labelled_set
    from pipeline.train.checkpoint import read_state

    presets = [p for p in args.objectives.split(",") if p]
    for p in presets:
        name, _, iterations = p.partition(":")
        preset_config(name)  # an unknown preset fails here, before any work
        if iterations and (not iterations.isdigit() or not 1 <= int(iterations) <= 2
                           or preset_config(name).model.objective != "hubert"):
            parser.error(f"--objectives: {p!r}: ':N' (N = 1 or 2) is for HuBERT presets only")
        if preset_config(name).model.objective == "vq_bert" and name not in TOKENISERS:
            parser.error(f"--objectives: {p!r}: a vq_bert row needs its first stage's preset; known: "
                         f"{', '.join(TOKENISERS)}")
    from pipeline.data.demo_corpus import parse_languages

    session = Session("objectives", args, languages=parse_languages(args.languages) if args.languages else None)
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
        what = f" {int(iterations)} iterations" if iterations and int(iterations) > 1 else ""
        stages = [(f"{key}@{i}", it["preset"], Path(it["checkpoint"]), it["label_seconds"], f" {it['what']}")
                  for i, it in enumerate(info["earlier"], start=1)]  # what the earlier stages alone reached
        stages.append((key, preset, Path(ckpt), info["label_seconds"], what))
        added = []
        for row_key, row_preset, row_ckpt, labelled, suffix in stages:
            row_cfg = preset_config(row_preset)
            state = read_state(row_ckpt)
            model = load_model(str(row_ckpt)).model
            arch = _describe(row_cfg)
            bert = row_cfg.model.objective == "vq_bert"  # a BERT on tokens, read through its tokeniser
            rows.append({
                "key": row_key, "label": f"{_name(row_cfg)}{suffix} ({row_preset}, {arch})",
                "checkpoint": str(row_ckpt), "params": count_parameters(model.encoder), "updates": state.step,
                "audio_s_per_s": state.metrics.get("speed/audio_s_per_s"), "train_seconds": state.train_seconds,
                "label_seconds": labelled,
            })
            added.append((row_key, row_ckpt, arch, bert, count_parameters(model.encoder)))
        for row_key, row_ckpt, arch, bert, params in reversed(added):  # the last stage's weights' shape first
            if arch not in random_rows:
                rnd = random_checkpoint(row_ckpt, work / "random-init", seed=args.seed)
                label = (f"random-init BERT on {row_key}'s tokens ({arch})" if bert
                         else f"random-init encoder ({arch})")
                random_rows[arch] = {"key": f"random {arch}", "label": label, "checkpoint": str(rnd),
                                     "params": params}
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
