"""Fine-tune a wav2vec 2.0 encoder with CTC on labelled audio (Ray Train + DeepSpeed, MLflow).

    python -m jobs.finetune --config jobs/configs/finetune/tiny_10m.yaml \\
        data.train_uri=demo_data/labelled train.init_from=runs/demo [a.b.c=value ...]

``train.init_from`` is a wavray checkpoint (``config.yaml`` + ``model.safetensors``), a
wavray run folder (its newest checkpoint), or a Hugging Face directory (``jobs.export``
output, a ``Wav2Vec2ForPreTraining`` / ``Wav2Vec2Model`` / ``Wav2Vec2ForCTC`` from the
hub); empty trains from scratch (the random-init baseline), and
``finetune.frontend=logmel`` puts log-mel filterbanks in place of the conv encoder (the
classic-features baseline). The dataset must be prepared with transcripts
(``jobs.prepare`` with a sidecar); every train-split utterance needs one.

The run is resumable like pretraining (same ``checkpoint.run_name`` and storage path).
Its checkpoints are wavray CTC checkpoints that ``jobs.evaluate --checkpoint`` reads;
MLflow gets the metrics and the final model as a Hugging Face ``Wav2Vec2ForCTC``
directory with ``vocab.json`` (``hf_model`` artifact).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML config: a preset and its deltas")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from jobs.pretrain import connect_ray
    from pipeline.data.storage import StorageError
    from pipeline.train.finetune import resolve_config, run_finetuning
    from pipeline.train.trainer import RunStoppedError, make_run_name

    try:
        cfg = resolve_config(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_name = make_run_name(cfg)
    where = connect_ray()
    source = cfg.train.init_from or f"scratch ({cfg.finetune.frontend} frontend)"
    print(f"[wavray] fine-tuning run {run_name!r} from {source}: {cfg.scaling.num_workers} workers, "
          f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.max_steps} updates, Transformer frozen for "
          f"{cfg.train.freeze_encoder_steps} (Ray: {where})", flush=True)
    try:
        result = run_finetuning(cfg, run_name=run_name)
    except (StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunStoppedError as e:
        print(f"error: the run stopped: {e}", file=sys.stderr)
        return 3
    print(f"[wavray] checkpoint: {result.checkpoint_uri} (step {result.step})")
    print(f"[wavray] evaluate: python -m jobs.evaluate --checkpoint {result.checkpoint_uri} --data URI")
    print(f"[wavray] MLflow run: {result.mlflow_run_id} in {result.mlflow_uri} "
          f"(experiment {cfg.tracking.experiment!r})")
    if result.model_version:
        print(f"[wavray] registered model {cfg.tracking.register_as!r} version {result.model_version}")
    print(f"[wavray] MLflow UI: {result.ui_command}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
