"""The w2v-BERT pretraining step: wav2vec 2.0's step (:class:`pipeline.train.pretrain.PretrainStep`:
the same masks, distractors, Gumbel temperature schedule and contrastive metrics) plus the
masked-LM loss of :class:`models.w2v_bert.W2vBertModel`.

Logged per masked frame, unweighted: ``loss/contrastive``, ``loss/diversity`` and
``loss/feature_penalty`` (the contrastive module's, as wav2vec 2.0 logs them; ``accuracy``
is its contrastive accuracy), ``loss/mlm`` (the masked-LM cross-entropy, chance
ln(entries)) and ``accuracy/mlm``; per quantizer group the code and softmax perplexities
(the MLM's targets are those codes: a codebook that collapses leaves the MLM nothing to
predict). ``loss`` is the weighted total. On a multilingual batch ``loss/lang/<code>`` is
the contrastive module's loss per language, and each part's is logged too:
``loss/contrastive/lang/<code>`` (the same) and ``loss/mlm/lang/<code>`` (the masked-LM
cross-entropy per masked frame of that language's utterances; weighted by
``lang_share/<code>`` they pool back into ``loss/mlm``: both parts count the same masked
frames). The health alarms are wav2vec 2.0's: the contrastive loss at chance or a
collapsed codebook.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from models.w2v_bert import W2vBertOutput
from pipeline.train.loop import Prepared, StepOutput
from pipeline.train.masked_prediction import row_cross_entropy
from pipeline.train.metrics import ratio
from pipeline.train.pretrain import PretrainStep


class W2vBertStep(PretrainStep):
    """w2v-BERT (:class:`models.w2v_bert.W2vBertModel`) in the generic loop
    (:class:`pipeline.train.loop.TrainStep`)."""

    row_part_names: tuple[str, ...] = ("contrastive", "mlm")

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        return self.step_output(self.run(model, prepared), prepared)

    def step_output(self, out: W2vBertOutput, prepared: Prepared) -> StepOutput:
        """The loss, metrics and per-utterance parts of a w2v-BERT output (JUST adds its CTC
        loss to them)."""
        metrics = self.metrics(out.contrastive)
        metrics["w2v/mlm_sum"] = out.mlm_sum.detach().float()
        metrics["w2v/mlm_correct"] = out.mlm_correct.detach().float()
        return StepOutput(loss_sum=out.loss_sum, count=out.contrastive.num_masked, metrics=metrics,
                          **self.w2v_bert_rows(out, prepared))

    def w2v_bert_rows(self, out: W2vBertOutput, prepared: Prepared) -> dict[str, Any]:
        """wav2vec 2.0's per-utterance losses (:meth:`row_losses_of`) plus the masked-LM
        part (from the head's scores the model returns, as the model sums it); nothing on a
        batch without languages."""
        rows = self.row_losses_of(out.contrastive, prepared)
        if rows:
            rows["row_parts"]["mlm"] = row_cross_entropy(out.mlm_logits, out.target_ids,
                                                         out.contrastive.mask_time_indices)
        return rows

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        out = super().summarize(sums)
        n = sums.get("pt/num_masked", 0.0)
        out["loss/mlm"] = ratio(sums.get("w2v/mlm_sum", 0.0), n)
        out["accuracy/mlm"] = ratio(sums.get("w2v/mlm_correct", 0.0), n)
        return out
