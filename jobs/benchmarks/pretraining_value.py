"""Does pretraining pay? The wav2vec 2.0 claim, measured on the demo corpus, on CPU.

    python -m jobs.bench pretraining-value [--seed 0] [--workdir runs/pretraining-value]
        [--pretrain-steps N] [--finetune-steps N] [--probe-steps N] [--pretrain-set a.b=c ...]

1. Data (``pipeline.data.demo_corpus``, seeded): unlabelled speech from the 14 training
   voices for pretraining; 10 minutes of transcribed speech from the same voices (other
   sentences and renditions) for fine-tuning; a test set spoken only by the two voices
   marked held-out, heard by neither pretraining nor fine-tuning. Each goes through
   ``jobs.prepare`` into its own dataset.
2. Pretraining: the laptop preset for a fixed number of updates (``run_pretraining``, Ray
   Train + DeepSpeed, as ``jobs.pretrain``), on one worker (``PRETRAIN_OVERRIDES``).
3. The same downstream budget for three inputs, in the same harness:
   - wav2vec 2.0: fine-tuned from the pretrained checkpoint (``jobs.finetune`` recipe,
     ``jobs/configs/finetune/tiny_10m.yaml``);
   - random init: the same model and recipe from freshly initialised weights;
   - log-mel: the same projection, Transformer and head on 80 log-mel filterbanks.
   Each is evaluated on the held-out voices (``jobs.evaluate``: greedy CTC, CER/WER).
4. The frozen-feature probe (``pipeline.probe``, CPC's table): a small CTC head on the
   frozen pretrained encoder, on the same encoder with random weights, and on log-mel
   features; trained on the 10 minutes, scored on the held-out voices.

Prints a table like CPC's and writes ``results-s<seed>.json`` in the work directory. Every
random choice comes from ``--seed``; stages already done in the work directory (corpus,
prepared data, finished runs) are reused, so a second call only re-evaluates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from models.checkpoint import WEIGHTS_NAME
from pipeline.config import CONFIG_FILE

ROOT = Path(__file__).resolve().parents[2]
FINETUNE_CONFIG = ROOT / "jobs" / "configs" / "finetune" / "tiny_10m.yaml"

# The laptop preset (the tiny model with the settings that make it learn within a CPU
# budget: ``pipeline.config.laptop``) on one worker without ZeRO, the cheapest layout.
PRETRAIN_PRESET = "laptop"
PRETRAIN_OVERRIDES: list[str] = ["scaling.num_workers=1", "scaling.cpus_per_worker=1", "deepspeed.zero_stage=0"]


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _tag(items: list[str]) -> str:
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:8]


def prepare_corpus(corpus: Path, data: Path, *, valid_fraction: float) -> str:
    """``jobs.prepare`` of one demo corpus with the settings every demo benchmark uses (the
    tiny preset's data section, 4 MB shards); a dataset already made from the same files
    and settings is kept as it is."""
    from pipeline.config import apply_overrides, tiny
    from pipeline.data.prepare import prepare

    cfg = apply_overrides(tiny(), [f"data.valid_fraction={valid_fraction}", "data.shard_size_mb=4"])
    prepare(str(corpus), str(data), cfg.data, progress=lambda _: None)
    return str(data)


def make_data(work: Path, *, seed: int, pretrain_minutes: float, label_minutes: float, test_minutes: float,
              log: Any, languages: list[str] | None = None) -> dict[str, str]:
    """Three corpora (unlabelled / labelled / held-out test voices) and their prepared datasets.

    ``languages``: a multilingual corpus (``pipeline.data.demo_corpus.voices_for``), each
    language's held-out voices in the test set; None: the English corpus. The result names
    each prepared dataset and, under ``<name>_corpus``, the corpus folder it came from.
    """
    from pipeline.data.demo_corpus import available_voices, make_corpus, voices_for

    voices = voices_for(languages) if languages else available_voices()
    train_voices = [v for v in voices if not v.heldout]
    test_voices = [v for v in voices if v.heldout]
    if not train_voices or not test_voices:
        raise ValueError("demo corpus: need both training and held-out voices (install espeak-ng and flite)")
    plan = [
        ("unlabelled", train_voices, pretrain_minutes, seed * 10 + 1, 0.02),
        ("labelled", train_voices, label_minutes, seed * 10 + 2, 0.0),
        ("test", test_voices, test_minutes, seed * 10 + 3, 0.0),
    ]
    # The English corpora keep the names they always had, so existing work directories stay reusable.
    tag = "-" + "-".join(languages) if languages else ""
    out = {}
    for name, vs, minutes, corpus_seed, valid_fraction in plan:
        corpus = work / "corpus" / f"{name}{tag}-{minutes:g}min-s{corpus_seed}"
        if not (corpus / "transcripts.tsv").is_file():
            log(f"corpus {name}: synthesising {minutes:g} min from {len(vs)} voices")
            make_corpus(corpus, minutes=minutes, seed=corpus_seed, voices=vs, languages=languages,
                        progress=lambda _: None)
        out[name] = prepare_corpus(corpus, work / "data" / corpus.name, valid_fraction=valid_fraction)
        out[f"{name}_corpus"] = str(corpus)
    out["test_voices"] = ",".join(v.name for v in test_voices)
    out["num_train_voices"] = str(len(train_voices))
    return out


class Session:
    """What every demo-corpus benchmark starts with: its work directory, a timed log, Ray,
    and the three prepared datasets of :func:`make_data` (reused when already there), of
    ``languages`` when given."""

    def __init__(self, name: str, args: argparse.Namespace, *, languages: list[str] | None = None) -> None:
        import torch

        from pipeline.cluster import connect_ray

        torch.set_num_threads(1)  # the probe in this process; 2 shared cores gain nothing from more
        self.name = name
        self.work = Path(args.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        connect_ray()
        self.data = make_data(self.work, seed=args.seed, pretrain_minutes=args.pretrain_minutes,
                              label_minutes=args.label_minutes, test_minutes=args.test_minutes, log=self.log,
                              languages=languages)
        self.data_seconds = time.perf_counter() - self.started

    def log(self, msg: str) -> None:
        print(f"[{self.name} {_fmt(time.perf_counter() - self.started)}] {msg}", flush=True)


def _finished(run_dir: Path, steps: int, seconds: float = 0.0) -> Path | None:
    """The final checkpoint of a run that already reached ``steps`` updates (or spent its
    ``seconds`` of training)."""
    from pipeline.train.checkpoint import latest_complete, read_state

    latest = latest_complete(run_dir)
    if latest is None:
        return None
    state = read_state(latest)
    if state.step >= steps or (seconds and state.train_seconds >= seconds):
        return latest
    return None


def pretrain(work: Path, data: str, *, seed: int, steps: int, overrides: list[str], log: Any,
             preset: str = PRETRAIN_PRESET, seconds: float = 0.0, log_every: int = 0) -> tuple[Path, float]:
    """Pretrain ``preset`` for ``steps`` updates, or for ``seconds`` of training when given (a
    compute budget: the run ends there, whatever its update count)."""
    from pipeline.config import apply_overrides, preset_config
    from pipeline.train.trainer import run_pretraining

    items = PRETRAIN_OVERRIDES + overrides + [f"train.max_steps={steps}", f"train.seed={seed}",
                                              f"data.shuffle_seed={seed}", f"train.max_seconds={seconds}"]
    name = f"pretrain-s{seed}-{steps if not seconds else f'{seconds:g}s'}-{_tag([preset, *items])}"
    runs = work / "runs"
    done = _finished(runs / name, steps, seconds)
    if done is not None:
        log(f"pretraining: reusing {done}")
        return done, float("nan")
    cfg = apply_overrides(preset_config(preset), items + [
        f"data.train_uri={data}", f"checkpoint.storage_path={runs}", f"checkpoint.run_name={name}",
        f"checkpoint.every_steps={steps}", "checkpoint.keep_last=1", "tracking.experiment=pretraining-value",
        f"train.log_every={log_every or max(1, steps // 20)}",
    ])
    log(f"pretraining {name}: {steps} updates; overrides {items}")
    t0 = time.perf_counter()
    result = run_pretraining(cfg, run_name=name)
    if result.checkpoint_uri is None:
        raise RuntimeError(f"pretraining {name} left no checkpoint")
    return Path(result.checkpoint_uri), time.perf_counter() - t0


def finetune(work: Path, data: str, *, name: str, seed: int, steps: int, extra: list[str],
             log: Any, seconds: float = 0.0) -> tuple[Path, float]:
    """CTC fine-tuning (``FINETUNE_CONFIG`` with ``extra``) for ``steps`` updates, the length
    its tri-stage schedule is laid out over; with ``seconds``, also at most that much training
    (``train.max_seconds``: a compute budget ends the run there, wherever the schedule is)."""
    from pipeline.config import load_config
    from pipeline.train.finetune import run_finetuning

    items = extra + [f"train.max_steps={steps}", f"train.seed={seed}", f"data.shuffle_seed={seed}"]
    if seconds:
        items.append(f"train.max_seconds={seconds:g}")
    run_name = f"ft-{name}-s{seed}-{steps}-{_tag(items)}"
    runs = work / "runs"
    done = _finished(runs / run_name, steps, seconds)
    if done is not None:
        log(f"fine-tuning {name}: reusing {done}")
        return done, float("nan")
    cfg = load_config(FINETUNE_CONFIG, items + [
        f"data.train_uri={data}", f"checkpoint.storage_path={runs}", f"checkpoint.run_name={run_name}",
        f"checkpoint.every_steps={steps}", "tracking.experiment=pretraining-value",
        f"train.log_every={max(1, steps // 10)}",
    ])
    budget = f" or {seconds:g} s" if seconds else ""
    log(f"fine-tuning {name} ({run_name}): {steps} updates{budget}")
    t0 = time.perf_counter()
    result = run_finetuning(cfg, run_name=run_name)
    if result.checkpoint_uri is None:
        raise RuntimeError(f"fine-tuning {run_name} left no checkpoint")
    return Path(result.checkpoint_uri), time.perf_counter() - t0


def random_checkpoint(pretrained: Path, out: Path, *, seed: int) -> Path:
    """The pretrained checkpoint's architecture and config with fresh weights: the random-init
    row then goes through exactly the same fine-tuning path (``train.init_from``)."""
    import torch

    from models.checkpoint import save_weights
    from models.factory import build_pretraining_model
    from pipeline.config import load_config, save_config, to_flat_dict

    cfg = load_config(pretrained / CONFIG_FILE)
    content = [json.dumps(to_flat_dict(cfg.model), sort_keys=True, default=str), str(cfg.data.normalize)]
    if cfg.model.objective == "vq_bert":  # its features of audio are its tokeniser's too: one per teacher
        content.append(cfg.label.teacher)
    out = out / f"s{seed}-{_tag(content)}"
    if not (out / WEIGHTS_NAME).is_file():  # the name is the content: fine-tuning runs stay reusable
        torch.manual_seed(seed)
        save_weights(build_pretraining_model(cfg.model), out)
        save_config(cfg, out / CONFIG_FILE)
    return out


def probes(models: dict[str, str | None], labelled: str, test: str, *, seed: int, steps: int, normalize: bool,
           log: Any) -> dict[str, dict]:
    """The frozen-feature probe on each named input: a checkpoint path, or None for log-mel
    filterbanks; the same head, budget and data for every row. A vq_bert model is read
    through the tokeniser of its label set (``pipeline.label.tokens.audio_model``)."""
    from pipeline.config import ProbeConfig
    from pipeline.features import LogMelFrontend
    from pipeline.label.tokens import audio_model
    from pipeline.model_io import load_model
    from pipeline.probe import load_labelled_set, run_probe

    train_set = load_labelled_set(labelled)
    test_set = load_labelled_set(test)
    pcfg = ProbeConfig(head="conv", hidden=64, steps=steps, batch_size=16, lr=2e-3, seed=seed)
    out = {}
    for name, location in models.items():
        model = LogMelFrontend(80) if location is None else audio_model(load_model(location))
        log(f"probe {name}: {steps} updates of a {pcfg.head} CTC head on frozen features")
        out[name] = run_probe(model, train_set, test_set, pcfg, normalize=normalize)
    return out


ROWS = (
    ("logmel", "log-mel filterbank (80)"),
    ("random", "random-init encoder (same size)"),
    ("pretrained", "wav2vec 2.0, pretrained (ours)"),
)


def render(results: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "   -  " if x is None or not math.isfinite(x) else f"{100 * x:5.1f}%"

    s = results["setup"]
    lines = [
        "pretraining-value: does self-supervised pretraining make 10 minutes of labels go further?",
        f"  seed {s['seed']} | {PRETRAIN_PRESET} preset | pretraining: {s['pretrain_minutes']:.1f} min unlabelled, "
        f"{s['num_train_voices']} voices, {s['pretrain_steps']} updates "
        f"(final contrastive loss {s.get('pretrain_contrastive', float('nan')):.3f}, chance {s['chance']:.3f})",
        f"  labels: {s['label_minutes']:.1f} min, same voices | test: {s['test_minutes']:.1f} min, held-out voices "
        f"{s['test_voices']}",
        f"  downstream budget, equal for all rows: fine-tune {s['finetune_steps']} updates; "
        f"probe {s['probe_steps']} updates of a conv CTC head",
        "",
        f"  {'input features / initialisation':<34} {'probe CER':>10} {'fine-tuned CER':>15} {'fine-tuned WER':>15}",
    ]
    for key, label in ROWS:
        probe = results["probe"].get(key, {}).get("probe/cer")
        ft = results["finetune"].get(key, {})
        lines.append(f"  {label:<34} {pct(probe):>10} {pct(ft.get('cer')):>15} {pct(ft.get('wer')):>15}")
    lines += [
        "  (character / word error rates on the held-out voices; greedy CTC decoding, no language model;",
        "   lower is better. CPC's LibriSpeech phone-probe accuracy, for the shape: random 27.6, MFCC 39.7, CPC 64.6)",
        "",
        "  wall time: " + ", ".join(f"{k} {_fmt(v)}" for k, v in results["seconds"].items() if math.isfinite(v)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench pretraining-value", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/pretraining-value")
    parser.add_argument("--pretrain-minutes", type=float, default=40.0)
    parser.add_argument("--label-minutes", type=float, default=10.0)
    parser.add_argument("--test-minutes", type=float, default=4.0)
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--pretrain-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra pretraining overrides (after PRETRAIN_OVERRIDES)")
    parser.add_argument("--finetune-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra fine-tuning overrides, the same for all three rows")
    parser.add_argument("--skip-probe", action="store_true")
    args = parser.parse_args(argv)

    from jobs.evaluate import evaluate
    from pipeline.config import load_config

    session = Session("pretraining-value", args)
    work, data, log, t_all = session.work, session.data, session.log, session.started
    seconds: dict[str, float] = {"data": session.data_seconds}
    pre_ckpt, seconds["pretrain"] = pretrain(work, data["unlabelled"], seed=args.seed, steps=args.pretrain_steps,
                                             overrides=args.pretrain_set, log=log)
    random_ckpt = random_checkpoint(pre_ckpt, work / "random-init", seed=args.seed)
    normalize = load_config(pre_ckpt / CONFIG_FILE).data.normalize
    rows = {  # the same input scaling everywhere: the pretrained encoder's
        "pretrained": [f"train.init_from={pre_ckpt}"],
        "random": [f"train.init_from={random_ckpt}"],
        "logmel": ["finetune.frontend=logmel", f"data.normalize={str(normalize).lower()}"],
    }
    finetuned: dict[str, dict[str, float]] = {}
    for key, extra in rows.items():
        ckpt, secs = finetune(work, data["labelled"], name=key, seed=args.seed, steps=args.finetune_steps,
                              extra=extra + args.finetune_set, log=log)
        seconds[f"finetune {key}"] = secs
        t0 = time.perf_counter()
        ev, _ = evaluate(str(ckpt), data["test"])
        seconds[f"evaluate {key}"] = time.perf_counter() - t0
        finetuned[key] = {**ev.summary, "checkpoint": str(ckpt)}
        log(f"{key}: test CER {100 * ev.summary['cer']:.1f}% WER {100 * ev.summary['wer']:.1f}%")
    probe_results: dict[str, dict] = {}
    if not args.skip_probe:
        t0 = time.perf_counter()
        probe_results = probes({"logmel": None, "random": str(random_ckpt), "pretrained": str(pre_ckpt)},
                               data["labelled"], data["test"], seed=args.seed, steps=args.probe_steps,
                               normalize=normalize, log=log)
        seconds["probes"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    from pipeline.train.checkpoint import read_state

    pre_cfg = load_config(pre_ckpt / CONFIG_FILE)
    state = read_state(pre_ckpt)
    from pipeline.probe import load_labelled_set

    minutes = {k: load_labelled_set(data[k]).minutes for k in ("labelled", "test")}
    results = {
        "setup": {
            "seed": args.seed, "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
            "probe_steps": args.probe_steps, "pretrain_minutes": _summary_minutes(data["unlabelled"]),
            "label_minutes": minutes["labelled"], "test_minutes": minutes["test"],
            "test_voices": data["test_voices"], "num_train_voices": data["num_train_voices"],
            "pretrain_contrastive": float(state.metrics.get("loss/contrastive", float("nan"))),
            "chance": math.log(pre_cfg.model.loss.num_negatives + 1),
            "pretrain_overrides": PRETRAIN_OVERRIDES + args.pretrain_set, "finetune_overrides": args.finetune_set,
            "pretrained_checkpoint": str(pre_ckpt),
        },
        "finetune": finetuned,
        "probe": probe_results,
        "seconds": seconds,
    }
    (work / f"results-s{args.seed}.json").write_text(json.dumps(results, indent=1, default=str))
    print(render(results), flush=True)
    return 0


def _summary_minutes(uri: str) -> float:
    summary = json.loads((Path(uri) / "summary.json").read_text())
    return float(summary.get("hours", 0.0)) * 60.0


if __name__ == "__main__":
    sys.exit(main())
