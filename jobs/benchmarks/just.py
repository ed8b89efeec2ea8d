"""JUST against pretraining then fine-tuning: the same audio, labels and CPU-seconds, CER per language.

    python -m jobs.bench just [--languages en,de,fr] [--seconds 600] [--pretrain-share 0.667]
        [--finetune-steps 1500 | wav2vec2=3000,w2v_bert=6500] [--ctc-weight W] [--labelled-ratio R] [--rows wav2vec2,w2v_bert,just]
        [--seed 0] [--workdir runs/just]

JUST (joint unsupervised and supervised training) claims that one run of w2v-BERT's
contrastive and masked-LM losses with a supervised loss on the labelled part of the data
beats pretraining first and fine-tuning after, across languages. This puts the claim to
the multilingual demo corpus, on CPU:

1. Data (``pipeline.data.demo_corpus``, seeded, as ``jobs.bench pretraining-value`` makes
   it, in ``--languages``): untranscribed speech from each language's training voices
   (``--pretrain-minutes``), transcribed speech from the same voices (``--label-minutes``,
   other renditions), and a test set spoken only by each language's held-out voice. The
   languages come from the corpus sidecar's ``language`` column through ``jobs.prepare``.
   One more corpus joins the first two (the labelled files with their transcripts, the
   others with none) and is prepared once: all the audio every row trains on.
2. Rows, each within the same ``--seconds`` of training (``train.max_seconds``, counted by
   ``train.budget_clock``: CPU-seconds of the training process on CPU), on one worker:
   - wav2vec 2.0 (``laptop``): pretrained on all the audio for ``--pretrain-share`` of the
     budget, then CTC fine-tuned on the transcribed part for the rest (``jobs.finetune``'s
     recipe, ``jobs/configs/finetune/tiny_10m.yaml``, with a joint grapheme vocabulary:
     ``finetune.vocab_from_data``; ``--finetune-steps`` lays out its tri-stage schedule, one
     count for both rows or one per row, and the budget may end it sooner: a row that
     finishes its schedule first spends less than its budget, which the table shows);
   - w2v-BERT (``w2v_bert_laptop``, the Conformer JUST trains): the same two stages, so the
     difference between it and JUST is the joint training, not the architecture;
   - JUST (``just_laptop``): one run for the whole budget on the joined dataset, its CTC
     head trained on the transcribed utterances beside the two unsupervised losses
     (``--ctc-weight``: ``model.just.ctc_weight``; ``--labelled-ratio``:
     ``data.labelled_ratio``, the share of transcribed utterances in its stream, when not 0).
3. Each row's CTC model is scored by ``jobs.evaluate`` (greedy CTC, no language model) on
   the held-out voices: the CER over all of them and over each language's.

Prints one table (rows x languages, with the updates and CPU-seconds each row spent) and
writes ``just-s<seed>.json`` (``just-s<seed>-r<ratio>.json`` with ``--labelled-ratio``) in the
work directory; stages already done there (corpora, prepared data, finished runs) are
reused, so a second call only re-evaluates.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.benchmarks.objectives import pretrain_budgeted
from jobs.benchmarks.pretraining_value import Session, _fmt, finetune, prepare_corpus


@dataclass(frozen=True)
class Row:
    key: str
    preset: str
    name: str
    joint: bool
    """One run with the supervised loss inside (JUST), or pretraining then fine-tuning."""


ROWS = (
    Row("wav2vec2", "laptop", "wav2vec 2.0", joint=False),
    Row("w2v_bert", "w2v_bert_laptop", "w2v-BERT", joint=False),
    Row("just", "just_laptop", "JUST", joint=True),
)
DEFAULT_SHARE = 2 / 3
"""Of a two-stage row's budget, pretraining's; fine-tuning gets the rest."""


def split_budget(seconds: float, pretrain_share: float) -> tuple[float, float]:
    """A two-stage row's (pretraining, fine-tuning) seconds: ``pretrain_share`` of ``seconds``
    and the rest, whole seconds (they name the runs, so a rerun finds them again)."""
    if not 0.0 < pretrain_share < 1.0:
        raise ValueError(f"--pretrain-share: expected a fraction in (0, 1), got {pretrain_share}")
    pre = float(round(seconds * pretrain_share))
    return pre, float(seconds - pre)


def parse_steps(text: str, keys: list[str]) -> dict[str, int]:
    """``--finetune-steps``: one count for every two-stage row (``1500``) or one per row
    (``wav2vec2=3000,w2v_bert=6500``, each row named): the rows fine-tune at different
    costs per update, so filling the same seconds takes each a different schedule."""
    text = text.strip()
    if text.isdigit():
        return {k: int(text) for k in keys}
    out: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or key.strip() not in keys:
            raise ValueError(f"--finetune-steps: expected N or ROW=N,... with ROW of {','.join(keys)}, got {text!r}")
        out[key.strip()] = int(value)
    missing = [k for k in keys if k not in out]
    if missing:
        raise ValueError(f"--finetune-steps: no count for {','.join(missing)} in {text!r}")
    return out


def joint_corpus(unlabelled: Path, labelled: Path, out: Path) -> Path:
    """One corpus of both demo corpora: ``labelled/...`` with their transcripts,
    ``unlabelled/...`` with empty ones (``jobs.prepare`` stores no transcript for them), each
    with its speaker and language. The files are hard links (copies across file systems);
    ``transcripts.tsv`` is written last, so its presence means the folder is complete."""
    sidecar = out / "transcripts.tsv"
    if sidecar.is_file():
        return out
    rows: list[dict[str, str]] = []
    for sub, corpus, keep in (("unlabelled", unlabelled, False), ("labelled", labelled, True)):
        with open(corpus / "transcripts.tsv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                rel = f"{sub}/{row['path']}"
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    try:
                        os.link(corpus / row["path"], target)
                    except OSError:
                        shutil.copy2(corpus / row["path"], target)
                rows.append({"path": rel, "transcript": row["transcript"] if keep else "",
                             "speaker": row["speaker"], "language": row.get("language", "")})
    tmp = sidecar.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["path", "transcript", "speaker", "language"], delimiter="\t",
                           quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(sidecar)
    return out


def _or_preset(value: float | None, default: str = "the preset's") -> str:
    return default if value is None else f"{value:g}"


def render(results: dict[str, Any]) -> str:
    """The table: one line per row, overall CER and each language's, the updates and the
    CPU-seconds of training it spent (pretraining + fine-tuning for the two-stage rows)."""
    def pct(x: float | None) -> str:
        return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"

    s = results["setup"]
    langs = s["languages"]
    pre, ft = s["budget_split"]
    lines = [
        "just: joint training (JUST) against pretraining then fine-tuning, the same audio, labels and CPU-seconds",
        f"  seed {s['seed']} | languages {','.join(langs)} | audio: {s['audio_minutes']:.1f} min from "
        f"{s['num_train_voices']} voices, {s['label_minutes']:.1f} min of it transcribed | "
        f"test: {s['test_minutes']:.1f} min, held-out voices {s['test_voices']}",
        f"  budget per row: {s['seconds']:g} CPU-s of training (1 worker)"
        + (f"; two-stage rows: {pre:g} pretraining + {ft:g} fine-tuning (a schedule of "
           + ", ".join(f"{n} updates for {k}" for k, n in s["finetune_steps"].items()) + ")"
           if s["finetune_steps"] else ""),
        f"  JUST: model.just.ctc_weight {_or_preset(s.get('ctc_weight'))}, data.labelled_ratio "
        f"{_or_preset(s.get('labelled_ratio') or None, 'as the data is')}",
        "",
        f"  {'row':<46} {'updates':>11} {'CPU-s':>6} {'CER':>6} " + " ".join(f"{x:>6}" for x in langs),
    ]
    for row in results["rows"]:
        updates = "+".join(str(u) for u in row.get("updates", [])) or "-"
        used = f"{row['cpu_seconds']:.0f}" if row.get("cpu_seconds") is not None else "-"
        per = [pct(row.get("cer_lang", {}).get(x)) for x in langs]
        lines.append(f"  {row['label']:<46} {updates:>11} {used:>6} {pct(row.get('cer')):>6} "
                     + " ".join(f"{x:>6}" for x in per))
    lines += [
        "  (character error rates on the held-out voices; greedy CTC decoding, no language model; lower is better;",
        "   'updates': pretraining+fine-tuning; 'CPU-s': the training seconds the row spent, all stages)",
    ]
    lines += ["", "  wall time: " + ", ".join(f"{k} {_fmt(v)}" for k, v in results["wall"].items() if math.isfinite(v))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench just", description=__doc__.split("\n")[0])
    parser.add_argument("--languages", default="en,de,fr", help="demo corpus languages (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="CPU-seconds of training per row, all stages (default: %(default)s)")
    parser.add_argument("--pretrain-share", type=float, default=DEFAULT_SHARE,
                        help="of a two-stage row's budget, pretraining's (default: 2/3)")
    parser.add_argument("--finetune-steps", default="1500",
                        help="the fine-tuning schedule's length, N or ROW=N,... per row; its budget may end it "
                             "sooner (default: %(default)s)")
    parser.add_argument("--ctc-weight", type=float, default=None,
                        help="JUST's model.just.ctc_weight (default: the preset's)")
    parser.add_argument("--labelled-ratio", type=float, default=0.0,
                        help="JUST's data.labelled_ratio, the share of transcribed utterances in its stream "
                             "(default: 0, as the data is)")
    parser.add_argument("--rows", default=",".join(r.key for r in ROWS),
                        help="comma-separated rows of %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/just")
    parser.add_argument("--pretrain-minutes", type=float, default=30.0,
                        help="untranscribed minutes, all languages together (default: %(default)s)")
    parser.add_argument("--label-minutes", type=float, default=9.0,
                        help="transcribed minutes, all languages together (default: %(default)s)")
    parser.add_argument("--test-minutes", type=float, default=4.0)
    parser.add_argument("--pretrain-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra overrides for every row's pretraining (JUST's run included)")
    args = parser.parse_args(argv)

    from pipeline.config import ConfigError, preset_config
    from pipeline.data.demo_corpus import parse_languages

    try:
        languages = parse_languages(args.languages)
        budget = split_budget(args.seconds, args.pretrain_share)
        ft_steps = parse_steps(args.finetune_steps, [r.key for r in ROWS if not r.joint])
    except ValueError as e:
        parser.error(str(e))
    by_key = {r.key: r for r in ROWS}
    wanted = [k for k in args.rows.split(",") if k]
    unknown = [k for k in wanted if k not in by_key]
    if unknown or not wanted:
        parser.error(f"--rows: expected some of {','.join(by_key)}, got {args.rows!r}")
    for key in wanted:  # an unknown preset fails here, before any work
        try:
            preset_config(by_key[key].preset)
        except ConfigError as e:
            parser.error(f"--rows: {key} needs the preset {by_key[key].preset!r}: {e}")

    from jobs.evaluate import evaluate
    from pipeline.probe import load_labelled_set
    from pipeline.train.checkpoint import read_state

    session = Session("just", args, languages=languages)
    work, data, log, t_all = session.work, session.data, session.log, session.started
    wall: dict[str, float] = {"data": session.data_seconds}
    t0 = time.perf_counter()
    corpus = joint_corpus(Path(data["unlabelled_corpus"]), Path(data["labelled_corpus"]),
                          work / "corpus" / f"joint-{Path(data['unlabelled_corpus']).name}-"
                          f"{Path(data['labelled_corpus']).name}")
    joint = prepare_corpus(corpus, work / "data" / corpus.name, valid_fraction=0.0)
    wall["joint data"] = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    for key in wanted:
        row = by_key[key]
        out: dict[str, Any] = {"key": key, "preset": row.preset}
        t0 = time.perf_counter()
        if row.joint:
            out["label"] = f"{row.name} ({row.preset}), one run"
            items = list(args.pretrain_set)
            if args.ctc_weight is not None:
                items.append(f"model.just.ctc_weight={args.ctc_weight:g}")
            if args.labelled_ratio:
                items.append(f"data.labelled_ratio={args.labelled_ratio:g}")
            ckpt, _ = pretrain_budgeted(work, joint, preset=row.preset, iterations=1, seed=args.seed,
                                        seconds=args.seconds, overrides=items, log=log)
            state = read_state(ckpt)
            out.update(updates=[state.step], cpu_seconds=state.train_seconds, checkpoint=str(ckpt),
                       overrides=items)
        else:
            out["label"] = f"{row.name} ({row.preset}) + CTC fine-tuning"
            pre_ckpt, _ = pretrain_budgeted(work, joint, preset=row.preset, iterations=1, seed=args.seed,
                                            seconds=budget[0], overrides=args.pretrain_set, log=log)
            extra = [f"train.init_from={pre_ckpt}", "finetune.vocab_from_data=true"]
            ckpt, _ = finetune(work, data["labelled"], name=key, seed=args.seed, steps=ft_steps[key],
                               seconds=budget[1], extra=extra, log=log)
            pre, ft = read_state(pre_ckpt), read_state(ckpt)
            out.update(updates=[pre.step, ft.step], cpu_seconds=pre.train_seconds + ft.train_seconds,
                       pretrain_checkpoint=str(pre_ckpt), checkpoint=str(ckpt))
        wall[f"train {key}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev, _ = evaluate(str(ckpt), data["test"])
        wall[f"evaluate {key}"] = time.perf_counter() - t0
        out["cer"] = ev.summary["cer"]
        out["wer"] = ev.summary["wer"]
        out["cer_lang"] = {x: ev.summary[f"cer/lang/{x}"] for x in ev.languages}
        rows.append(out)
        log(f"{key}: test CER {100 * out['cer']:.1f}% ("
            + ", ".join(f"{x} {100 * v:.1f}%" for x, v in out["cer_lang"].items()) + ")")
    wall["total"] = time.perf_counter() - t_all

    minutes = {k: load_labelled_set(data[k]).minutes for k in ("labelled", "test")}
    summary = json.loads((Path(joint) / "summary.json").read_text())
    results = {
        "setup": {
            "seed": args.seed, "languages": languages, "seconds": args.seconds, "budget_split": list(budget),
            "pretrain_share": args.pretrain_share, "finetune_steps": {k: n for k, n in ft_steps.items() if k in wanted},
            "ctc_weight": args.ctc_weight, "labelled_ratio": args.labelled_ratio,
            "audio_minutes": float(summary.get("hours", 0.0)) * 60, "label_minutes": minutes["labelled"],
            "test_minutes": minutes["test"], "test_voices": data["test_voices"],
            "num_train_voices": data["num_train_voices"], "pretrain_overrides": args.pretrain_set,
            "joint_data": joint, "command": "python -m jobs.bench just " + " ".join(argv or sys.argv[2:]),
        },
        "rows": rows,
        "wall": wall,
    }
    # A resampled JUST run is a variant beside the table as the data is, not its replacement.
    ratio = f"-r{args.labelled_ratio:g}" if args.labelled_ratio else ""
    (work / f"just-s{args.seed}{ratio}.json").write_text(json.dumps(results, indent=1, default=str))
    print(render(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
