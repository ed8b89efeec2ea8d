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

import sys

from jobs.training_cli import connect, error, load_job_config, print_result, run_training, training_parser


def main(argv: list[str] | None = None) -> int:
    args = training_parser("python -m jobs.finetune", __doc__).parse_args(argv)
    cfg = load_job_config(args)
    if cfg is None:
        return 2

    from pipeline.train.finetune import resolve_config, run_finetuning
    from pipeline.train.trainer import make_run_name

    try:
        cfg = resolve_config(cfg)
    except ValueError as e:
        error(str(e))
        return 2
    run_name = make_run_name(cfg)
    where = connect(args)
    source = cfg.train.init_from or f"scratch ({cfg.finetune.frontend} frontend)"
    print(f"[wavray] fine-tuning run {run_name!r} from {source}: {cfg.scaling.num_workers} workers, "
          f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.train.max_steps} updates, Transformer frozen for "
          f"{cfg.finetune.freeze_encoder_steps} (Ray: {where})", flush=True)
    result, code = run_training(lambda c: run_finetuning(c, run_name=run_name, verbose=args.verbose), cfg)
    if result is None:
        return code
    print_result(cfg, result, [f"evaluate: python -m jobs.evaluate --checkpoint {result.checkpoint_uri} --data URI"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
