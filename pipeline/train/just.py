"""The JUST training step (:class:`models.just.JustModel`): w2v-BERT's step
(:class:`pipeline.train.w2v_bert.W2vBertStep`: masks, distractors, Gumbel temperature,
contrastive and masked-LM metrics) plus a CTC loss on the batch's labelled utterances.

Labelled utterances are the rows of ``data.train_uri`` whose manifest has a transcript
(:class:`pipeline.train.transcripts.Targets`, read with ``unlabelled=True``); each batch's
ids say which of its rows they are. The other rows train the self-supervised losses
only: the CTC loss never reads them. How many labelled rows a batch holds is the data's
mix, or ``data.labelled_ratio`` where the loader resamples it.

Loss. The loop divides a micro-batch's loss sum by the global count of masked frames (the
w2v-BERT losses' unit). The CTC loss is per character, so the step adds it as
``ctc_weight x (CTC summed over the labelled rows / their characters) x the batch's masked
frames``: after the loop's division, ``loss`` = the w2v-BERT loss per masked frame +
``ctc_weight`` x the CTC loss per character (batches weighted by their masked frames).

Logged: w2v-BERT's metrics (``loss/contrastive``, ``loss/mlm``, ``accuracy``, ...),
``loss/ctc`` (per character of the labelled rows, the fine-tuning runs' unit),
``labelled_share`` (labelled rows among all rows) and ``frames_per_token`` of the labelled
rows (CTC needs at least one frame per character). On a multilingual batch,
``loss/lang/<code>`` is the contrastive module's per-language loss, as w2v-BERT's, and each
part has its own: ``loss/contrastive/lang/<code>`` and ``loss/mlm/lang/<code>`` per masked
frame, ``loss/ctc/lang/<code>`` per character of that language's labelled utterances (an
unlabelled row adds neither loss nor characters, so a language none of whose utterances
has a transcript logs NaN there: no characters were counted, not a loss of 0).

Its checkpoints log the dev CER of its CTC half per language, as fine-tuning's do
(:mod:`pipeline.train.dev`; the CTC model is the encoder and the head).

Resolution before a run (:func:`resolve_config`): ``finetune.vocab`` is written out as for
fine-tuning (``finetune.vocab_from_data``: the characters of the transcripts, a joint
grapheme vocabulary over the languages), ``model.just.vocab_size`` from it, and the
labelled utterances are checked: each must arrive whole (``data.batch_mode`` pad,
``data.max_sample_size`` at least the longest).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config, apply_overrides
from pipeline.text import Vocabulary
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import ratio
from pipeline.train.transcripts import Targets, resolve_vocab
from pipeline.train.w2v_bert import W2vBertStep


def resolve_config(cfg: Config) -> Config:
    """The JUST run's config as it will run and be saved (module doc); refuses, before any
    worker starts, a dataset without transcripts or one whose labelled utterances would be
    cropped."""
    if cfg.model.objective != "just":
        return cfg
    cfg = resolve_vocab(cfg)
    vocab = Vocabulary.from_characters(cfg.finetune.vocab)
    if cfg.model.just.vocab_size not in (0, len(vocab)):
        raise ValueError(
            f"model.just.vocab_size = {cfg.model.just.vocab_size}, but finetune.vocab {cfg.finetune.vocab!r} makes "
            f"{len(vocab)} tokens; leave model.just.vocab_size 0 (set from the vocabulary)"
        )
    Targets.read(cfg, vocab, unlabelled=True)  # fail here, not in every worker
    return apply_overrides(cfg, {"model.just.vocab_size": len(vocab)})


class JustStep(W2vBertStep):
    """JUST (:class:`models.just.JustModel`) in the generic loop (module doc)."""

    row_part_names: tuple[str, ...] = ("contrastive", "mlm", "ctc")

    def __init__(self, cfg: Config, model: Any, targets: Targets | None = None) -> None:
        """``targets``: the transcripts by utterance id; by default read from ``data.train_uri``."""
        super().__init__(cfg, model)
        self.vocab = Vocabulary.from_characters(cfg.finetune.vocab)
        if len(self.vocab) != cfg.model.just.vocab_size:
            raise ValueError(f"model.just.vocab_size = {cfg.model.just.vocab_size}, finetune.vocab makes "
                             f"{len(self.vocab)} tokens: resolve the config first (pipeline.train.just.resolve_config)")
        self.targets = targets if targets is not None else Targets.read(cfg, self.vocab, unlabelled=True)
        self.ctc_weight = cfg.model.just.ctc_weight

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        prepared = super().prepare(batch, step=step, micro=micro, rank=rank, device=device)
        rows, labels = self.targets.of_batch(batch["ids"], np.asarray(batch["num_samples"]).tolist())
        lengths = np.asarray([len(x) for x in labels], dtype=np.int64)  # (L,)
        prepared.inputs["ctc"] = {
            "rows": to_device(np.asarray(rows, dtype=np.int64), device),  # (L,)
            "targets": to_device(np.concatenate(labels) if labels else np.zeros(0, np.int64), device),  # (sum U,)
            "target_lengths": to_device(lengths, device),  # (L,)
            "num_tokens": int(lengths.sum()),
            "num_rows": len(np.asarray(batch["num_samples"])),
        }
        return prepared

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        out = self.run(model, prepared)
        w2v = out.w2v_bert
        ctc = prepared.inputs["ctc"]
        device = prepared.count.device
        base = self.step_output(w2v, prepared)
        metrics = base.metrics
        num_tokens = ctc["num_tokens"]
        zero = torch.zeros((), device=device)
        ctc_sum, num_frames, too_short = zero, zero, zero
        if num_tokens:
            rows = ctc["rows"]
            log_probs = F.log_softmax(out.ctc_logits[rows], dim=-1).transpose(0, 1)  # (T, L, V)
            frames = out.output_lengths[rows]  # (L,)
            # Per utterance, then summed: bit for bit what reduction="sum" gives.
            per_utterance = F.ctc_loss(log_probs, ctc["targets"], frames, ctc["target_lengths"],
                                       blank=self.vocab.blank_id, reduction="none", zero_infinity=True)  # (L,)
            ctc_sum = per_utterance.sum()
            if base.row_parts:  # a multilingual batch: each labelled utterance's loss, for loss/ctc/lang/<code>
                # Unlabelled rows: no loss, no characters. A batch without labelled rows
                # gives no ctc part at all, which the loop counts the same.
                zeros = torch.zeros(out.ctc_logits.shape[0], device=device)  # (B,)
                base.row_parts["ctc"] = (zeros.index_copy(0, rows, per_utterance.detach().float()),
                                         zeros.index_copy(0, rows, ctc["target_lengths"].float()))
            # Per character of this batch, in units of its masked frames (module doc).
            base.loss_sum = base.loss_sum + self.ctc_weight * ctc_sum * (base.count.float() / num_tokens)
            num_frames = frames.float().sum()
            too_short = (frames < ctc["target_lengths"]).float().sum()
        # Every key on every micro-batch: the loop reduces the same metrics on every rank.
        metrics["ctc/loss_sum"] = ctc_sum.detach().float()
        metrics["ctc/num_frames"] = num_frames
        metrics["ctc/too_short"] = too_short
        metrics["ctc/num_tokens"] = torch.tensor(float(num_tokens), device=device)
        metrics["ctc/labelled_rows"] = torch.tensor(float(len(ctc["target_lengths"])), device=device)
        metrics["ctc/rows"] = torch.tensor(float(ctc["num_rows"]), device=device)
        return base

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        out = super().summarize(sums)
        tokens = sums.get("ctc/num_tokens", 0.0)
        out["loss/ctc"] = ratio(sums.get("ctc/loss_sum", 0.0), tokens)
        out["labelled_share"] = ratio(sums.get("ctc/labelled_rows", 0.0), sums.get("ctc/rows", 0.0))
        out["frames_per_token"] = ratio(sums.get("ctc/num_frames", 0.0), tokens)
        out["too_short_utterances"] = sums.get("ctc/too_short", 0.0)
        return out
