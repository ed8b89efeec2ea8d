"""Evaluate a fine-tuned CTC model: greedy decoding, CER and WER, a per-utterance table, MLflow.

    python -m jobs.evaluate --checkpoint runs/ft-demo --data demo_data/test [--split all]
        [--output results.parquet] [--speakers A,B | --exclude-speakers C]

``--checkpoint``: a wavray fine-tuning checkpoint (``config.yaml`` + ``model.safetensors``),
a fine-tuning run folder (its newest checkpoint), or a Hugging Face ``Wav2Vec2ForCTC``
directory (with ``vocab.json``; ``jobs.finetune`` logs one to MLflow), each local or
``s3://``, or an MLflow model URI (``models:/name@alias``; ``pipeline/model_io.py``).
``--data``: a prepared dataset with transcripts (local or s3://).

Writes one row per utterance (id, speaker, reference, hypothesis, edits, CER, WER) as
Parquet or TSV (by the extension of ``--output``), prints the corpus CER and WER (total
edits over total reference characters / words, references normalised like the training
targets), and logs both with the table to an MLflow run (``--tracking-uri``; default: the
store of the fine-tuning run, or a sqlite store under ``runs/``).

On a dataset whose utterances have languages (``jobs.prepare`` gives them from a sidecar,
a folder or ``data.prepare_language``), the table gains a ``language`` column and the
CER and WER are also reported per language, each over that language's utterances
(``eval/cer/lang/<code>``, ``eval/wer/lang/<code>``, ``eval/num_utterances/lang/<code>``;
``none`` for utterances without one): a multilingual model's overall rate hides which
languages it fails on.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Evaluation:
    summary: dict[str, float]
    rows: list[dict[str, Any]]

    @property
    def languages(self) -> list[str]:
        """The languages reported one by one (metric-name form), in the summary's order."""
        prefix = "cer/lang/"
        return [k[len(prefix):] for k in self.summary if k.startswith(prefix)]


def evaluate(
    checkpoint: str,
    data: str,
    *,
    split: str = "all",
    speakers: list[str] | None = None,
    exclude_speakers: list[str] | None = None,
    s3_endpoint: str = "",
    tracking_uri: str = "",
) -> tuple[Evaluation, Any]:
    """Score ``checkpoint`` (any location :mod:`pipeline.model_io` reads) on the transcribed
    utterances of ``data``; returns (results, run config or None)."""
    import torch

    from pipeline.data.storage import Storage
    from pipeline.evaluation import score
    from pipeline.model_io import load_model
    from pipeline.probe import load_labelled_set

    t0 = time.perf_counter()
    trained = load_model(checkpoint, task="ctc", store=Storage.from_config(s3_endpoint), tracking_uri=tracking_uri)
    cfg, model, vocab = trained.config, trained.model, trained.require_vocab()
    endpoint = s3_endpoint or (cfg.data.s3_endpoint if cfg is not None else "")
    labelled = load_labelled_set(data, split=split, speakers=speakers, exclude_speakers=exclude_speakers,
                                 s3_endpoint=endpoint)
    torch.manual_seed(0)
    scored = score(model, labelled.audio, labelled.transcripts, vocab, languages=labelled.languages,
                   normalize=trained.normalize)
    rows = []
    named = any(labelled.languages)
    for utt, speaker, lang, ref, hyp, e, audio in zip(labelled.ids, labelled.speakers, labelled.languages,
                                                       scored.references, scored.hypotheses, scored.errors,
                                                       labelled.audio, strict=True):
        rows.append({
            "id": utt, "speaker": speaker, **({"language": lang} if named else {}),
            "seconds": len(audio) / labelled.sample_rate, "reference": ref,
            "hypothesis": hyp, "char_edits": e.char_edits, "num_chars": e.num_chars, "word_edits": e.word_edits,
            "num_words": e.num_words, "cer": e.cer, "wer": e.wer,
        })
    summary = dict(scored.summary)
    summary["minutes"] = labelled.minutes
    summary["seconds"] = time.perf_counter() - t0
    return Evaluation(summary=summary, rows=rows), cfg


def write_table(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Per-utterance results as Parquet (``.parquet``) or TSV (anything else)."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), p)
        return p
    with open(p, "w", newline="") as f:  # transcripts hold no tabs or newlines after normalisation
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [], delimiter="\t", lineterminator="\n",
                           quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writeheader()
        w.writerows(rows)
    return p


def log_to_mlflow(ev: Evaluation, table: Path, *, cfg: Any, checkpoint: str, data: str, split: str,
                  tracking_uri: str, experiment: str, run_name: str) -> tuple[str, str]:
    """One MLflow run: params (what was evaluated), eval/* metrics, the table. Returns (uri, run id)."""
    from pipeline.config import tiny
    from pipeline.tracking import Tracker

    tcfg = tiny() if cfg is None else cfg
    tcfg.tracking.uri = tracking_uri or tcfg.tracking.uri
    if cfg is None and not tcfg.tracking.uri:
        tcfg.checkpoint.storage_path = "runs"
    tcfg.tracking.experiment = experiment or tcfg.tracking.experiment
    tracker = Tracker.open(tcfg, run_name)
    try:
        from mlflow.entities import Param

        from pipeline.tracking import redact

        params = {"eval.checkpoint": checkpoint, "eval.data": data, "eval.split": split}
        tracker.client.log_batch(tracker.run_id, params=[Param(k, redact(v, k)) for k, v in params.items()])
        tracker.set_tag("wavray.task", "evaluate")
        tracker.log_metrics(0, {f"eval/{k}": v for k, v in ev.summary.items()})
        tracker.client.log_artifact(tracker.run_id, str(table))
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return tracker.uri, tracker.run_id


def _short_name(location: str) -> str:
    """The last part of a model location (a path, an s3:// or models:/ URI), for run names."""
    if "://" in location or location.startswith(("models:/", "runs:/")):
        return location.rstrip("/").rsplit("/", 1)[-1]
    return Path(location).resolve().name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="fine-tuned model: wavray CTC checkpoint or run folder, a HF CTC directory, local or "
                             "s3://, or an MLflow model URI (models:/name@alias)")
    parser.add_argument("--data", required=True, help="prepared dataset with transcripts (local or s3://)")
    parser.add_argument("--split", default="all", choices=["train", "valid", "all"])
    parser.add_argument("--speakers", default="", help="comma-separated speakers to keep (default: all)")
    parser.add_argument("--exclude-speakers", default="", help="comma-separated speakers to leave out")
    parser.add_argument("--output", default="eval_results.parquet", help="per-utterance table (.parquet or .tsv)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking URI: where models:/ URIs are read and the results logged "
                             "(default: MLFLOW_TRACKING_URI, else the run's store)")
    parser.add_argument("--experiment", default="", help="MLflow experiment (default: the run's)")
    parser.add_argument("--run-name", default="", help="MLflow run name (default: eval-<checkpoint>-<time>)")
    parser.add_argument("--no-mlflow", action="store_true", help="only print and write the table")
    parser.add_argument("--s3-endpoint", default="", help="endpoint for s3:// data (default: AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)

    speakers = [s for s in args.speakers.split(",") if s]
    exclude = [s for s in args.exclude_speakers.split(",") if s]
    try:
        ev, cfg = evaluate(args.checkpoint, args.data, split=args.split, speakers=speakers or None,
                           exclude_speakers=exclude or None, s3_endpoint=args.s3_endpoint,
                           tracking_uri=args.tracking_uri)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    table = write_table(ev.rows, args.output)
    s = ev.summary
    print(f"[wavray] {int(s['num_utterances'])} utterances ({s['minutes']:.1f} min) of {args.data} [{args.split}]: "
          f"CER {100 * s['cer']:.2f}%  WER {100 * s['wer']:.2f}%  ({s['seconds']:.0f} s)")
    for lang in ev.languages:
        print(f"[wavray]   {lang}: {int(s[f'num_utterances/lang/{lang}'])} utterances  "
              f"CER {100 * s[f'cer/lang/{lang}']:.2f}%  WER {100 * s[f'wer/lang/{lang}']:.2f}%")
    print(f"[wavray] per-utterance table: {table}")
    if not args.no_mlflow:
        name = args.run_name or f"eval-{_short_name(args.checkpoint)}-{time.strftime('%Y%m%d-%H%M%S')}"
        uri, run_id = log_to_mlflow(ev, table, cfg=cfg, checkpoint=args.checkpoint, data=args.data,
                                    split=args.split, tracking_uri=args.tracking_uri,
                                    experiment=args.experiment, run_name=name)
        print(f"[wavray] MLflow run {run_id} in {uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
