"""Convert between wavray model checkpoints and Hugging Face model directories.

    python -m jobs.export --checkpoint LOCATION --out DIR [--ctc]   # ours -> HF directory
    python -m jobs.export --from-hf LOCATION --out PATH [--task ctc]  # HF directory -> ours

A wavray model checkpoint is a directory with ``config.yaml`` (the resolved run config)
and ``model.safetensors`` (the model's plain state dict); every training checkpoint
holds one, and a run folder stands for its newest. Either side is read from a local path,
an ``s3://`` URI (the checkpoint a run prints) or an MLflow model URI
(``models:/name@alias``; ``--tracking-uri``), see ``pipeline/model_io.py``. The HF directory loads with ``transformers.Wav2Vec2ForPreTraining``
(``--ctc``: ``Wav2Vec2ForCTC``) ``from_pretrained``. Going the other way, the run config
starts from the preset closest to the HF model's architecture and takes the whole
``model`` section from the HF config; that directory can then seed continued
pretraining (``train.init_from``) or fine-tuning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.checkpoint import load_weights, save_weights
from models.hf import load_hf, read_hf_config, save_hf_ctc, save_hf_encoder, save_hf_pretraining
from pipeline.config import CONFIG_FILE, PRESETS, ConfigError, from_dict, save_config, to_dict, to_flat_dict
from pipeline.data.storage import Storage
from pipeline.model_io import fetch, load_model


def closest_preset(model_cfg) -> str:  # noqa: ANN001 - models.config.ModelConfig
    """The preset whose model section shares the most settings with ``model_cfg``.

    Architecture (widths, depth, extractor mode, layer norm placement) must match for a
    preset to win on ties of the other settings; ``base`` if none matches.
    """
    target = to_flat_dict(model_cfg)
    arch_keys = [
        "transformer.dim", "transformer.num_layers", "transformer.ffn_dim", "transformer.num_heads",
        "transformer.layer_norm_first", "transformer.kind", "encoder.mode", "encoder.conv_layers",
        "frontend.kind", "objective",
    ]
    best, best_score = "base", -1
    for name, make in PRESETS.items():
        flat = to_flat_dict(make().model)
        if any(flat[k] != target[k] for k in arch_keys):
            continue
        score = sum(flat[k] == v for k, v in target.items())
        if score > best_score:
            best, best_score = name, score
    return best


def export_to_hf(checkpoint: str, out: str | Path, *, ctc: bool = False, pad_token_id: int = 0,
                 store: Storage | None = None, tracking_uri: str = "") -> Path:
    """wavray checkpoint -> HF ``Wav2Vec2ForPreTraining`` (or ``Wav2Vec2ForCTC``) directory; the
    encoder alone (``Wav2Vec2Model``) for an objective whose heads Hugging Face has no class
    for (BEST-RQ); ``Wav2Vec2Conformer*`` for a conformer. A log-mel front end cannot be
    represented (the error says so)."""
    trained = load_model(str(checkpoint), store=store, tracking_uri=tracking_uri)
    if ctc and trained.config is not None and trained.config.model.objective == "just":
        trained = load_model(str(checkpoint), task="ctc", store=store, tracking_uri=tracking_uri)  # encoder + head
    if trained.config is None:
        raise ValueError(f"{checkpoint!r} is a Hugging Face directory already; nothing to export")
    if ctc and trained.task != "ctc":
        raise ValueError(f"checkpoint {str(checkpoint)!r}: no CTC head (head.weight); not a fine-tuned model")
    if not ctc and trained.task == "ctc":
        raise ValueError(f"checkpoint {str(checkpoint)!r}: a fine-tuned model; export it with --ctc")
    cfg = trained.config
    if ctc:
        return save_hf_ctc(trained.model, cfg.model, out, pad_token_id=pad_token_id, normalize=cfg.data.normalize)
    if cfg.model.objective != "wav2vec2":
        encoder = {k[len("encoder."):]: v for k, v in trained.model.state_dict().items() if k.startswith("encoder.")}
        return save_hf_encoder(encoder, cfg.model, out, normalize=cfg.data.normalize)
    return save_hf_pretraining(trained.model, cfg.model, out, normalize=cfg.data.normalize)


def import_from_hf(hf_dir: str, out: str | Path, *, task: str = "pretraining", store: Storage | None = None,
                   tracking_uri: str = "") -> tuple[Path, str]:
    """HF directory -> wavray model checkpoint (config.yaml + model.safetensors). Returns (dir, preset)."""
    model_cfg, model = load_hf(fetch(str(hf_dir), store=store, tracking_uri=tracking_uri), task=task)
    preset = closest_preset(model_cfg)
    cfg = PRESETS[preset]()
    cfg.model = model_cfg
    cfg = from_dict(to_dict(cfg))  # validates the combined tree
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out)
    save_config(cfg, out / CONFIG_FILE)
    return out, preset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint",
                     help="wavray model checkpoint (or its model.safetensors) or run folder: a local path, an "
                          "s3:// URI or an MLflow model URI")
    src.add_argument("--from-hf", help="Hugging Face model directory (config.json + weights): a local path, an "
                                       "s3:// URI or an MLflow model URI")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow tracking store of models:/ and runs:/ URIs (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--s3-endpoint", default="", help="endpoint for s3:// URIs (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--ctc", action="store_true", help="with --checkpoint: export a fine-tuned CTC model")
    parser.add_argument("--pad-token-id", type=int, default=0, help="with --ctc: the CTC blank id in config.json")
    parser.add_argument(
        "--task", choices=["pretraining", "ctc"], default="pretraining",
        help="with --from-hf: the model to build (pretraining keeps/creates the quantizer; ctc needs lm_head)",
    )
    args = parser.parse_args(argv)
    where = {"store": Storage.from_config(args.s3_endpoint), "tracking_uri": args.tracking_uri}
    try:
        if args.checkpoint is not None:
            out = export_to_hf(args.checkpoint, args.out, ctc=args.ctc, pad_token_id=args.pad_token_id, **where)
            kind = ", ".join(read_hf_config(out).get("architectures", []))
            print(f"export: wrote {kind} directory {out} (config.json, model.safetensors)")
        else:
            if args.ctc:
                parser.error("--ctc applies to --checkpoint; use --task ctc with --from-hf")
            out, preset = import_from_hf(args.from_hf, args.out, task=args.task, **where)
            num = sum(t.numel() for t in load_weights(out).values())
            print(
                f"export: wrote wavray checkpoint {out} ({CONFIG_FILE} with preset {preset!r} and the model "
                f"section of the Hugging Face config; model.safetensors with {num / 1e6:.1f}M values)"
            )
    except (ValueError, ConfigError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
