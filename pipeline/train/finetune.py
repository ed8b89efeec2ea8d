"""CTC fine-tuning: the second task of the generic loop, its Ray Train worker and driver.

wav2vec 2.0's recipe (SPEC.md): drop the quantizer and projections, add
Linear(d_model -> vocab) on the context network, train with CTC on characters plus the
word boundary ``|`` (blank at 0); keep time and channel masking as a regulariser; keep
the conv feature encoder frozen; keep the Transformer (and projection, mask embedding)
frozen for the first ``finetune.freeze_encoder_steps`` updates, so the fresh head first
learns to read the pretrained features; tri-stage learning rate (``schedule.kind``).

Data: the same training input as pretraining (Ray Data, length buckets, exact resume),
in ``pad`` mode with ``data.max_sample_size`` above the longest utterance, so every
utterance arrives whole; the transcripts come from the dataset's manifest, looked up by
the ids every batch carries. A cropped utterance would no longer match its transcript:
:meth:`FinetuneStep.prepare` refuses it.

Loss: CTC summed over the batch (``zero_infinity``: an utterance too short for its
transcript contributes nothing instead of infinity), counted in target characters; the
loop divides by the global count, as it divides the contrastive loss by masked frames.

Several languages: ``finetune.vocab_from_data`` makes the vocabulary every letter of the
training transcripts (a joint grapheme vocabulary; the default, English letters, strips
accents and breaks words at letters like ``ß``); on a multilingual split every batch
carries its languages and the step returns each utterance's CTC loss, which the loop logs
as ``loss/lang/<code>`` per character (and under its part name, ``loss/ctc/lang/<code>``).

Dev CER: every checkpoint also transcribes ``finetune.dev_minutes`` of the dataset's valid
split and logs ``dev/cer`` (per language too) to MLflow (:mod:`pipeline.train.dev`).

Freezing: while frozen, the projection and the Transformer run without autograd
(forward hooks switch the grad mode around them), so no activations are stored and no
gradient reaches them. DeepSpeed then gives their parameters zero gradients; with
``optim.weight_decay`` 0 (the fine-tuning configs) they do not move at all.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.vq_bert import VqBertForCTC
from models.wav2vec2 import Wav2Vec2ForCTC
from pipeline.config import CONFIG_FILE, Config, apply_overrides, to_flat_dict
from pipeline.data.loader import LANGUAGES
from pipeline.text import Vocabulary
from pipeline.train import seeding
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import ratio
from pipeline.train.transcripts import Targets, resolve_vocab
from pipeline.train.worker import RayHooks, WorkerTask, consolidated_model, format_duration, run_worker

log = logging.getLogger("wavray.train")


# --- config and model -------------------------------------------------------------------------


# Fields of the model config a fine-tuning run chooses itself; everything else (the
# architecture) comes from the pretrained source.
_REGULARISERS = (
    "mask.prob", "mask.length", "mask.min_masks", "mask.channel_prob", "mask.channel_length",
    "transformer.dropout", "transformer.attention_dropout", "transformer.activation_dropout",
    "transformer.layerdrop", "dropout_input", "final_dropout",
)


def resolve_config(cfg: Config) -> Config:
    """The fine-tuning config as it will run, saved with every checkpoint.

    - ``finetune.vocab``: written out (:func:`resolve_vocab`).
    - ``train.init_from``: pinned (:func:`pipeline.model_io.pin`: an MLflow alias becomes
      its version, a local path absolute); the model's architecture comes from the source
      (its ``config.yaml`` or ``config.json``), the regularisers (masking, dropouts,
      LayerDrop, ``final_dropout``) from ``cfg``; a wavray source also sets
      ``data.normalize`` (the input must be scaled as in pretraining).
    """
    from pipeline import model_io
    from pipeline.tracking import default_tracking_uri
    from pipeline.train.trainer import storage_for

    cfg = resolve_vocab(cfg)
    vocab = Vocabulary.from_characters(cfg.finetune.vocab)
    if cfg.finetune.freeze_encoder_steps > 0 and cfg.optim.weight_decay > 0:
        warnings.warn(
            f"optim.weight_decay = {cfg.optim.weight_decay}: the Transformer still decays during the "
            f"{cfg.finetune.freeze_encoder_steps} frozen updates (DeepSpeed gives frozen parameters zero "
            "gradients); use 0 for an exact freeze",
            stacklevel=2,
        )
    deltas: dict[str, Any] = {"finetune.vocab": vocab.characters}
    if cfg.train.init_from:
        if cfg.finetune.frontend != "wav2vec2":
            raise ValueError(
                f"finetune.frontend = {cfg.finetune.frontend!r} trains from scratch (a baseline); "
                f"train.init_from must be empty, got {cfg.train.init_from!r}"
            )
        where = {"store": storage_for(cfg), "tracking_uri": default_tracking_uri(cfg)}
        source = model_io.pin(cfg.train.init_from, tracking_uri=where["tracking_uri"])
        source_model, normalize = model_io.source_model_config(source, **where)
        if source_model.objective == "vq_bert":  # a BERT on tokens reads audio through its tokeniser
            tokeniser = _tokeniser(source, **where)
            source_model, normalize = tokeniser.model, tokeniser.normalize
        mine = to_flat_dict(cfg.model)
        deltas["model"] = {**to_flat_dict(source_model), **{k: mine[k] for k in _REGULARISERS}}
        deltas["train.init_from"] = source
        if normalize is not None:
            if normalize != cfg.data.normalize:
                log.warning("data.normalize: %s from the pretrained model %s (the config said %s)",
                            normalize, source, cfg.data.normalize)
            deltas["data.normalize"] = normalize
    return apply_overrides(cfg, deltas)


def _tokeniser(source: str, **where: Any) -> Any:
    """The tokeniser of the vq_bert model at ``source`` (:func:`pipeline.label.tokens.load_tokeniser`)."""
    from pipeline import model_io
    from pipeline.label.tokens import load_tokeniser

    source_cfg = model_io.run_config(source, **where)
    if source_cfg is None:
        raise ValueError(f"train.init_from: {source}: a vq_bert model without its run config: its tokeniser "
                         "cannot be found")
    return load_tokeniser(source_cfg, **where)


def build_model(cfg: Config, vocab_size: int) -> Wav2Vec2ForCTC:
    """The CTC model of a resolved config: fresh, or initialised from ``train.init_from``
    (a vq_bert model: its BERT, and the tokeniser of its label set in front).

    Seed the global RNG first for identical fresh weights on every rank.
    """
    from pipeline import model_io
    from pipeline.tracking import default_tracking_uri
    from pipeline.train.trainer import storage_for

    model = model_io.architecture(cfg, "ctc", vocab_size)
    if cfg.train.init_from:
        where = {"store": storage_for(cfg), "tracking_uri": default_tracking_uri(cfg)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*kept the initialisation of.*")
            left = model_io.init_weights(model, cfg.train.init_from, **where)
        if cfg.model.objective == "vq_bert" and any(k.startswith("tokeniser.") for k in left):
            model.tokeniser.load_state_dict(_tokeniser(cfg.train.init_from, **where).module.state_dict())
            left = [k for k in left if not k.startswith("tokeniser.")]
        if [k for k in left if not k.startswith("head.")]:
            raise ValueError(f"train.init_from: {cfg.train.init_from}: no weights for {left}")
    if cfg.finetune.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model  # type: ignore[return-value]


# --- the task step ----------------------------------------------------------------------------


class _TransformerFreeze:
    """While ``active``, the feature projection (vq_bert: the token embedding) and the
    Transformer run without autograd.

    A pre-hook on the projection switches the grad mode off and a hook after the
    Transformer restores it: masking (no parameters) and the head run as usual.
    """

    def __init__(self, model: Wav2Vec2ForCTC) -> None:
        self.active = False
        self._saved: bool | None = None
        enc = model.encoder
        first = enc.embedding if isinstance(model, VqBertForCTC) else enc.feature_projection  # vq_bert: its tokens'
        first.register_forward_pre_hook(self._enter)
        enc.transformer.register_forward_hook(self._leave)

    def _enter(self, _module: torch.nn.Module, _args: tuple) -> None:
        if self.active:
            self._saved = torch.is_grad_enabled()
            torch.set_grad_enabled(False)

    def _leave(self, _module: torch.nn.Module, _args: tuple, _output: Any) -> None:
        if self._saved is not None:
            torch.set_grad_enabled(self._saved)
            self._saved = None


class FinetuneStep:
    """The CTC task of the generic loop (:class:`pipeline.train.loop.TrainStep`)."""

    row_losses = True
    """Gives each utterance's loss (``StepOutput.row_loss``) on a batch with languages."""
    row_part_names: tuple[str, ...] = ("ctc",)
    """The loss parts given per utterance (``StepOutput.row_parts``): ``loss/<part>/lang/<code>``."""

    def __init__(self, cfg: Config, model: Wav2Vec2ForCTC, targets: Targets) -> None:
        self.cfg = cfg
        self.model = model
        self.targets = targets
        self.freeze_steps = cfg.finetune.freeze_encoder_steps
        self._freeze = _TransformerFreeze(model)
        self._layerdrop_gen: torch.Generator | None = None

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        source_np = batch["source"]
        if source_np.ndim != 2:
            raise ValueError(f"batch['source']: expected (B, S) samples, got shape {source_np.shape}")
        lengths = np.asarray(batch["num_samples"], dtype=np.int64)  # (B,)
        _, labels = self.targets.of_batch(batch["ids"], lengths.tolist(), where=self.cfg.data.train_uri)
        target_lengths = np.asarray([len(x) for x in labels], dtype=np.int64)  # (B,)
        pad_np = batch.get("padding_mask")
        has_pad = pad_np is not None and bool(pad_np.any())
        inputs: dict[str, Any] = {
            "source": to_device(source_np.astype(np.float32, copy=False), device),  # (B, S)
            "padding_mask": to_device(pad_np.astype(bool, copy=False), device) if has_pad else None,  # (B, S)
            "targets": to_device(np.concatenate(labels), device),  # (sum U,)
            "target_lengths": to_device(target_lengths, device),  # (B,)
            "generator": seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device),
            "per_row": LANGUAGES in batch,
        }
        count = torch.tensor(float(target_lengths.sum()), device=device)
        return Prepared(inputs=inputs, count=count, num_samples=int(lengths.sum()))

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        self._freeze.active = step < self.freeze_steps
        self._layerdrop_gen = seeding.layerdrop_generator(self.cfg.train.seed, step)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        inp = prepared.inputs
        grad_mode = torch.is_grad_enabled()
        try:
            out = model(inp["source"], inp["padding_mask"], generator=inp["generator"],
                        layerdrop_generator=self._layerdrop_gen)
        finally:
            torch.set_grad_enabled(grad_mode)  # restored even if the forward failed while frozen
        log_probs = F.log_softmax(out.logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
        # Per utterance, then summed: bit for bit what reduction="sum" gives, and a
        # multilingual batch keeps each utterance's loss for loss/lang/<code>.
        per_utterance = F.ctc_loss(
            log_probs, inp["targets"], out.output_lengths, inp["target_lengths"], blank=0,
            reduction="none", zero_infinity=True,
        )  # (B,)
        loss_sum = per_utterance.sum()
        row_loss = row_count = None
        if inp.get("per_row"):
            row_loss, row_count = per_utterance.detach(), inp["target_lengths"].float()
        too_short = (out.output_lengths < inp["target_lengths"]).float().sum()
        metrics = {
            "ctc/loss_sum": loss_sum.detach(),
            "ctc/num_tokens": prepared.count,
            "ctc/num_frames": out.output_lengths.float().sum(),
            "ctc/num_utterances": torch.tensor(float(out.output_lengths.shape[0]), device=prepared.count.device),
            "ctc/too_short": too_short,
            "ctc/frozen": torch.tensor(float(self._freeze.active), device=prepared.count.device),
        }
        row_parts = {} if row_loss is None or row_count is None else {"ctc": (row_loss, row_count)}
        return StepOutput(loss_sum=loss_sum, count=prepared.count, metrics=metrics, row_loss=row_loss,
                          row_count=row_count, row_parts=row_parts)

    def health(self) -> None:
        """CTC has no chance level to watch: its loss falls from any start."""
        return None

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {
            "loss/ctc": ratio(sums.get("ctc/loss_sum", 0.0), sums.get("ctc/num_tokens", 0.0)),
            "frames_per_token": ratio(sums.get("ctc/num_frames", 0.0), sums.get("ctc/num_tokens", 0.0)),
            "too_short_utterances": sums.get("ctc/too_short", 0.0),
            "transformer_frozen": ratio(sums.get("ctc/frozen", 0.0), sums.get("num_micro", 0.0)),
        }


# --- the Ray Train worker ---------------------------------------------------------------------


class FinetuneHooks(RayHooks):
    """The worker's hooks with the CTC progress line."""

    def progress(self, step: int, metrics: dict[str, float], eta_s: float) -> str:
        frozen = " (Transformer frozen)" if metrics.get("transformer_frozen", 0.0) > 0 else ""
        return (
            f"[wavray] step {step}/{self.cfg.train.max_steps} ctc {metrics.get('loss', float('nan')):.4f}/char "
            f"lr {metrics.get('lr', 0.0):.2e} audio-s/s {metrics.get('speed/audio_s_per_s', 0.0):.0f} "
            f"wait {100 * metrics.get('speed/data_wait_frac', 0.0):.0f}% ETA {format_duration(eta_s)}{frozen}"
        )


def hf_exportable(cfg: Config) -> bool:
    """Whether the fine-tuned model goes out as a Hugging Face ``Wav2Vec2(Conformer)ForCTC``
    (a conv front end and a context network Hugging Face has classes for)."""
    from models.hf import hf_unsupported

    return cfg.finetune.frontend == "wav2vec2" and not hf_unsupported(cfg.model)


def save_inference_dir(model: Wav2Vec2ForCTC, cfg: Config, out_dir: str | Path) -> Path:
    """The fine-tuned model for others: a Hugging Face ``Wav2Vec2ForCTC`` directory with
    ``vocab.json`` (conv frontend), or a wavray checkpoint (``config.yaml`` +
    ``model.safetensors``) where Hugging Face cannot represent the encoder (a log-mel front
    end, wav2vec 1.0's, a causal conv or GRU context network: :func:`hf_exportable`)."""
    from models.checkpoint import save_weights
    from models.hf import save_hf_ctc
    from pipeline.config import save_config

    out = Path(out_dir)
    vocab = Vocabulary.from_characters(cfg.finetune.vocab)
    if hf_exportable(cfg):
        save_hf_ctc(model, cfg.model, out, pad_token_id=vocab.blank_id, normalize=cfg.data.normalize)
    else:
        save_weights(model, out)
        save_config(cfg, out / CONFIG_FILE)
    vocab.save(out)
    return out


class FinetuneTask(WorkerTask):
    """CTC fine-tuning; the final model goes to MLflow as an inference directory."""

    hooks_class = FinetuneHooks

    def build_model(self, cfg: Config) -> torch.nn.Module:
        return build_model(cfg, len(Vocabulary.from_characters(cfg.finetune.vocab)))

    def build_step(self, cfg: Config, model: torch.nn.Module) -> Any:
        return FinetuneStep(cfg, model, Targets.read(cfg, Vocabulary.from_characters(cfg.finetune.vocab)))

    def trains_ctc(self, cfg: Config) -> bool:
        return True

    def finish(self, cfg: Config, eng: Any, *, rank: int, tracker: Any) -> None:
        import shutil
        import tempfile

        # The weights are already trained: the architecture alone, no second load of init_from.
        final = consolidated_model(eng, lambda: self.build_model(_without_init(cfg)))
        if rank != 0 or tracker is None or final is None:
            return
        from pipeline.tracking import HF_MODEL_ARTIFACT

        try:
            tmp = Path(tempfile.mkdtemp(prefix="wavray-ctc-"))
            try:
                save_inference_dir(final, cfg, tmp / "model")
                tracker.log_artifacts(tmp / "model", HF_MODEL_ARTIFACT if hf_exportable(cfg) else "model")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception as e:
            log.warning("could not log the final model to MLflow: %s", e)


def finetune_worker(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the fine-tuning ``TorchTrainer`` (keys as for pretraining,
    see :func:`pipeline.train.worker.run_worker`)."""
    run_worker(loop_config, FinetuneTask())


def _without_init(cfg: Config) -> Config:
    return apply_overrides(cfg, {"train.init_from": ""})


# --- the driver -------------------------------------------------------------------------------


def run_finetuning(cfg: Config, *, run_name: str | None = None, verbose: bool = False) -> Any:
    """Fit (or resume) the fine-tuning run of ``cfg`` on the connected Ray cluster.

    Same run identity, storage, failure handling, data factory and MLflow run as
    pretraining (:func:`pipeline.train.trainer.fit_run`); only the worker differs. Returns
    a :class:`pipeline.train.trainer.RunResult`.
    """
    from pipeline.train.trainer import fit_run

    if not cfg.data.train_uri:
        raise ValueError("data.train_uri: expected the prepared labelled dataset (jobs.prepare --output), got ''")
    cfg = resolve_config(cfg)
    Targets.read(cfg, Vocabulary.from_characters(cfg.finetune.vocab))  # fail before starting workers
    tags = {"wavray.task": "finetune", "wavray.init_from": cfg.train.init_from or f"scratch ({cfg.finetune.frontend})"}
    register = bool(cfg.tracking.register_as) and hf_exportable(cfg)
    return fit_run(cfg, finetune_worker, run_name=run_name, tags=tags, register=register, verbose=verbose)
