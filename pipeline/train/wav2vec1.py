"""The wav2vec (1.0) / vq-wav2vec step: a batch -> (binary cross-entropy summed over true and
distractor pairs, the count of true pairs, metrics).

Distractors are drawn in :meth:`FuturePredictionStep.prepare`, before any forward, from the
generator seeded by (seed, step, rank, micro-step) that also drives the Gumbel noise; the
count of true pairs is a function of the frame lengths alone, so the loop knows every
micro-batch's count up front. A batch may carry ``negative_indices`` (B, T, K), used as given.

Logged per true pair: the binary cross-entropy (``loss/binary_contrastive``; a model that
learned only the base rate sits at (K + 1) H(1 / (K + 1)), the health alarm's chance
level), the accuracy (the true target scored above all K distractors; chance 1 / (K + 1));
for vq-wav2vec the quantizer's loss (k-means: codebook + commitment; Gumbel: diversity, a
batch statistic weighted by true pairs as wav2vec 2.0's), the temperature, and per group
the perplexity of the ids (near 1: the codebook collapsed) and the share of frames whose
id (Gumbel: the argmax, without the noise) is the group's most frequent
(``codes/argmax_share_<g>``): the perplexity can stay above its alarm while most frames
share one target and the rest spread over many codewords; the share sees that, and above
``MAX_ARGMAX_SHARE`` it raises the codebook-collapse alarm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from models.quantizer import GumbelVectorQuantizer
from models.wav2vec1 import Wav2VecModel, binary_chance
from pipeline.config import Config
from pipeline.train import seeding
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import Health, ratio
from pipeline.train.pretrain import audio_inputs

MAX_ARGMAX_SHARE = 0.95
"""Above this share of frames on one codeword of a group the codebook has collapsed. A
learning Gumbel laptop run sits at 0.4-0.6 and passes 0.88 for a few hundred updates on
its way (4-crop batches); a collapsed one is at 1."""


class FuturePredictionStep:
    """wav2vec / vq-wav2vec in the generic loop (:class:`pipeline.train.loop.TrainStep`)."""

    def __init__(self, cfg: Config, model: Wav2VecModel) -> None:
        self.cfg = cfg
        self.model = model  # the unwrapped module: distractors need only its shapes
        self.groups = model.num_groups
        self.gumbel = isinstance(model.quantizer, GumbelVectorQuantizer)
        self._layerdrop_gen: torch.Generator | None = None

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        audio = audio_inputs(batch, self.model.encoder.feature_encoder, device)
        gen = seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device)
        if "negative_indices" in batch:
            negatives = to_device(np.asarray(batch["negative_indices"], dtype=np.int64), device)  # (B, T, K)
        else:
            negatives = self.model.sample_negatives(audio.source.shape[0], audio.frames, audio.lengths, gen)
        inputs: dict[str, Any] = {
            "source": audio.source, "padding_mask": audio.padding_mask, "negative_indices": negatives, "generator": gen,
        }
        return Prepared(inputs=inputs, count=self.model.num_predictions(audio.lengths), num_samples=audio.num_samples)

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        module.set_num_updates(step)
        self._layerdrop_gen = seeding.layerdrop_generator(self.cfg.train.seed, step)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        inp = prepared.inputs
        out = model(inp["source"], inp["padding_mask"], negative_indices=inp["negative_indices"],
                    generator=inp["generator"], layerdrop_generator=self._layerdrop_gen)
        num = out.num_predictions.float()
        metrics: dict[str, torch.Tensor] = {
            "w2v/bce_sum": out.prediction_sum.detach().float(),
            "w2v/num": num,
            "w2v/num_correct": out.num_correct.float(),
        }
        if self.groups:
            metrics["w2v/quantizer_w"] = out.quantizer_loss.detach().float() * num
            code_ppl = out.code_perplexity.detach().float()  # (G,)
            share = out.argmax_share.detach().float()  # (G,)
            for g in range(self.groups):
                metrics[f"w2v/code_ppl_{g}"] = code_ppl[g]
                metrics[f"w2v/argmax_share_{g}"] = share[g]
        if self.gumbel:
            metrics["w2v/temperature"] = out.temperature.float()
            prob_ppl = out.prob_perplexity.detach().float()  # (G,)
            for g in range(self.groups):
                metrics[f"w2v/prob_ppl_{g}"] = prob_ppl[g]
        return StepOutput(loss_sum=out.loss_sum, count=out.num_predictions, metrics=metrics)

    def health(self) -> Health:
        k = self.model.num_negatives
        return Health(
            loss_key="loss/binary_contrastive", chance=binary_chance(k), chance_text=f"({k}+1)*H(1/({k}+1))",
            hint="a model that learned only the share of true pairs sits there; check the learning rate and that "
                 "the features vary (wav2vec's front end can collapse them)",
            collapse_keys=("perplexity/code", "perplexity/prob") if self.groups else (),
            collapse_hint="the quantizer collapsed onto a few codewords (model.vq_wav2vec: the temperature, or "
                          "k-means' gamma)",
            ceilings=(("codes/argmax_share", MAX_ARGMAX_SHARE),) if self.groups else (),
        )

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums.get("w2v/num", 0.0)
        micro = sums.get("num_micro", 0.0)
        out = {
            "loss/binary_contrastive": ratio(sums.get("w2v/bce_sum", 0.0), n),
            "accuracy": ratio(sums.get("w2v/num_correct", 0.0), n),
        }
        if self.groups:
            key = "loss/diversity" if self.gumbel else "loss/kmeans"
            out[key] = ratio(sums.get("w2v/quantizer_w", 0.0), n)
            for g in range(self.groups):
                out[f"perplexity/code_{g}"] = ratio(sums.get(f"w2v/code_ppl_{g}", 0.0), micro)
                out[f"codes/argmax_share_{g}"] = ratio(sums.get(f"w2v/argmax_share_{g}", 0.0), micro)
        if self.gumbel:
            out["temperature"] = ratio(sums.get("w2v/temperature", 0.0), micro)
            for g in range(self.groups):
                out[f"perplexity/prob_{g}"] = ratio(sums.get(f"w2v/prob_ppl_{g}", 0.0), micro)
        return out
