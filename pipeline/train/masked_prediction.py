"""The masked-prediction pretraining step (BEST-RQ, HuBERT, WavLM): a batch -> (cross-entropy
summed over masked frames, their count, metrics).

Masks are drawn in :meth:`MaskedPredictionStep.prepare`, before any forward, from a
generator seeded by (seed, step, rank, micro-step), as for wav2vec 2.0: the loop needs
every micro-batch's count of masked frames up front. BEST-RQ's targets are a pure
function of the audio (a frozen quantizer of its log-mel frames), computed in the forward
on the training device; HuBERT's are the k-means labels the loader joins with the batch
(``target_ids`` (B, T) at the model's frame rate, :mod:`pipeline.data.labels`), checked
here: every frame the front end gives must have its label. WavLM's mixing
(:mod:`pipeline.train.mixing`) overlays other speech or noise on the audio here too,
before it goes to the device; the targets stay the primary utterance's. A batch may carry
``mask_time_indices`` (B, T), used as given.

Logged per masked frame: the cross-entropy (``loss/masked_ce``, chance ln(codebook_size)),
the accuracy, and per codebook the perplexity of the target ids (how many codewords the
data uses: near 1, the targets say nothing) and of the averaged prediction. On a
multilingual batch each language's cross-entropy: ``loss/lang/<code>`` and, under its part
name, ``loss/masked_ce/lang/<code>`` (the same values).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.masked_prediction import MaskedPredictionModel
from pipeline.config import Config
from pipeline.data.loader import LANGUAGES
from pipeline.train import seeding
from pipeline.train.loop import Prepared, StepOutput, to_device
from pipeline.train.metrics import Health, ratio
from pipeline.train.mixing import load_noise, mix_batch
from pipeline.train.pretrain import AudioInputs, audio_inputs

TARGET_IDS = "target_ids"
"""The batch's labels at the model's frame rate (``pipeline.data.labels.TARGET_IDS``)."""


def _num_samples(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """(B,) valid samples of each row: the batch's ``num_samples``, else from its padding."""
    if "num_samples" in batch:
        return np.asarray(batch["num_samples"], dtype=np.int64)
    source, pad = batch["source"], batch.get("padding_mask")
    return np.full(len(source), source.shape[1]) if pad is None else (~np.asarray(pad, dtype=bool)).sum(axis=1)


def row_cross_entropy(
    logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B,), masked frames (B,)) of each utterance: the cross-entropy over codebooks
    summed over its masked frames, as the model sums it over the batch (``loss/masked_ce``),
    for the per-language losses of a multilingual batch."""
    with torch.no_grad():
        batch, time, groups, size = logits.shape  # (B, T, G, V)
        ce = F.cross_entropy(logits.reshape(-1, size).float(), target_ids.reshape(-1), reduction="none")
        ce = ce.view(batch, time, groups).mean(dim=-1)  # (B, T)
        weights = mask.to(ce.dtype)
        return (ce * weights).sum(dim=1), weights.sum(dim=1)


class MaskedPredictionStep:
    """Masked prediction of discrete targets in the generic loop (:class:`pipeline.train.loop.TrainStep`)."""

    row_losses = True
    """Gives each utterance's loss (``StepOutput.row_loss``) on a batch with languages."""
    row_part_names: tuple[str, ...] = ("masked_ce",)
    """The loss parts given per utterance (``StepOutput.row_parts``): ``loss/<part>/lang/<code>``."""

    def __init__(self, cfg: Config, model: MaskedPredictionModel) -> None:
        self.cfg = cfg
        self.model = model  # the unwrapped module: masks need only its shapes, no parameters
        self.codebooks = model.codebooks
        self._layerdrop_gen: torch.Generator | None = None
        self.mixing = cfg.model.mixing
        self._noise: list[np.ndarray] | None = None
        if self.mixing.prob > 0 and self.mixing.noise_uri:
            self._noise = load_noise(self.mixing.noise_uri, s3_endpoint=cfg.data.s3_endpoint,
                                     s3_region=cfg.data.s3_region)

    def mix(self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int) -> tuple[dict, float]:
        """(the batch with WavLM's overlays, the share of its utterances mixed) (``model.mixing``)."""
        rng = np.random.default_rng([self.cfg.train.seed, step, rank, micro, 0x6D6978])  # "mix"
        mixed, which = mix_batch(batch["source"], _num_samples(batch), self.mixing, rng, noise=self._noise,
                                 normalize=self.cfg.data.normalize)
        return {**batch, "source": mixed}, float(which.mean()) if len(which) else 0.0

    def given_targets(self, batch: Mapping[str, np.ndarray], audio: AudioInputs, device: torch.device) -> torch.Tensor:
        """(B, T, 1) long: the batch's labels for every frame the front end gives; padded
        frames get 0 (they are never masked). A valid frame without its label is an error:
        labels and audio would be out of line."""
        raw = batch.get(TARGET_IDS)
        if raw is None:
            raise ValueError(
                "batch: no 'target_ids': model.objective=hubert trains on k-means labels that the loader joins "
                "with each batch (make them with jobs.label; pretraining opens the set the run's settings name)"
            )
        raw = np.asarray(raw, dtype=np.int64)  # (B, W)
        frames = audio.frames
        if raw.shape[1] < frames:
            raw = np.pad(raw, ((0, 0), (0, frames - raw.shape[1])), constant_values=-1)
        ids = raw[:, :frames]  # (B, T)
        lengths = np.full(len(ids), frames)
        if audio.padding_mask is not None:  # the front end's frame counts, on the host (no device sync)
            valid_samples = torch.from_numpy(np.asarray(_num_samples(batch), dtype=np.int64))
            lengths = self.model.encoder.feature_encoder.output_lengths(valid_samples).clamp(max=frames).numpy()
        valid = np.arange(frames)[None, :] < lengths[:, None]  # (B, T)
        missing = valid & (ids < 0)
        if missing.any():
            b, t = (int(i) for i in np.argwhere(missing)[0])
            who = str(batch["ids"][b]) if "ids" in batch else f"row {b}"
            raise ValueError(
                f"batch: utterance {who!r} has no label for frame {t} of its {int(lengths[b])}: the labels do not "
                "line up with the model's frames (a label set of another frame rate or another version of the shards?)"
            )
        if (ids >= self.model.codebook_size).any():
            raise ValueError(f"batch: label {int(ids.max())} is outside the model's {self.model.codebook_size} "
                             "clusters (model.hubert.clusters)")
        return to_device(np.where(valid, ids, 0)[..., None], device)  # (B, T, 1)

    def prepare(
        self, batch: Mapping[str, np.ndarray], *, step: int, micro: int, rank: int, device: torch.device
    ) -> Prepared:
        mixed_share = None
        per_row = LANGUAGES in batch  # asked before mixing, which builds a new batch
        if self.mixing.prob > 0:
            batch, mixed_share = self.mix(batch, step=step, micro=micro, rank=rank)
        audio = audio_inputs(batch, self.model.encoder.feature_encoder, device)
        gen = seeding.mask_generator(self.cfg.train.seed, step, rank, micro, device)
        if "mask_time_indices" in batch:
            mask = to_device(np.asarray(batch["mask_time_indices"], dtype=bool), device)  # (B, T)
            mask = mask & (torch.arange(audio.frames, device=device).unsqueeze(0) < audio.lengths.unsqueeze(1))
        else:
            mask = self.model.sample_masks(audio.source.shape[0], audio.frames, audio.lengths, gen)
        inputs: dict[str, Any] = {
            "source": audio.source, "padding_mask": audio.padding_mask, "mask_time_indices": mask, "generator": gen,
            "per_row": per_row,
        }
        if self.model.given_targets:
            inputs["target_ids"] = self.given_targets(batch, audio, device)
        if mixed_share is not None:
            inputs["mixed_share"] = to_device(np.asarray(mixed_share, dtype=np.float32), device)
        return Prepared(inputs=inputs, count=mask.sum(), num_samples=audio.num_samples)

    def begin_update(self, module: torch.nn.Module, step: int) -> None:
        self._layerdrop_gen = seeding.layerdrop_generator(self.cfg.train.seed, step)

    def forward(self, model: Callable[..., Any], prepared: Prepared, *, step: int) -> StepOutput:
        inp = prepared.inputs
        out = model(
            inp["source"], inp["padding_mask"], mask_time_indices=inp["mask_time_indices"],
            target_ids=inp.get("target_ids"), generator=inp["generator"], layerdrop_generator=self._layerdrop_gen,
        )
        num_masked = out.num_masked.float()
        ce_sum = out.loss_sum if out.ce_sum is None else out.ce_sum
        metrics: dict[str, torch.Tensor] = {
            "mp/ce_sum": ce_sum.detach().float(),
            "mp/num_masked": num_masked,
            "mp/num_correct": out.num_correct.detach().float(),
        }
        if self.model.feature_penalty_weight > 0 and out.feature_penalty is not None:
            metrics["mp/penalty_w"] = out.feature_penalty.detach().float() * num_masked
        if "mixed_share" in inp:
            metrics["mp/mixed_share"] = inp["mixed_share"]
        target_ppl = out.target_perplexity.detach().float()  # (G,)
        pred_ppl = out.prediction_perplexity.detach().float()  # (G,)
        for g in range(self.codebooks):
            metrics[f"mp/target_ppl_{g}"] = target_ppl[g]
            metrics[f"mp/pred_ppl_{g}"] = pred_ppl[g]
        row_loss = row_count = None
        row_parts = {}
        if inp.get("per_row"):
            row_loss, row_count = row_cross_entropy(out.logits, out.target_ids, out.mask_time_indices)
            row_parts["masked_ce"] = (row_loss, row_count)
        return StepOutput(loss_sum=out.loss_sum, count=out.num_masked, metrics=metrics, row_loss=row_loss,
                          row_count=row_count, row_parts=row_parts)

    def health(self) -> Health:
        size = self.model.codebook_size
        collapse = (
            "the labels use a few clusters only: check the label set's summary.json (usage) and its features "
            "(label.features, label.layer)" if self.model.given_targets else
            "the targets collapsed onto a few codewords: the quantizer's input carries no signal "
            "(check model.frontend / model.best_rq and the audio)"
        )
        return Health(
            loss_key="loss/masked_ce", chance=math.log(size), chance_text=f"ln({size})",
            hint="check masking, the learning rate and that the targets vary (perplexity/target_*)",
            collapse_keys=("perplexity/target",), collapse_hint=collapse,
        )

    def summarize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums.get("mp/num_masked", 0.0)
        micro = sums.get("num_micro", 0.0)
        out = {
            "loss/masked_ce": ratio(sums.get("mp/ce_sum", 0.0), n),
            "accuracy": ratio(sums.get("mp/num_correct", 0.0), n),
        }
        for g in range(self.codebooks):
            out[f"perplexity/target_{g}"] = ratio(sums.get(f"mp/target_ppl_{g}", 0.0), micro)
            out[f"perplexity/prediction_{g}"] = ratio(sums.get(f"mp/pred_ppl_{g}", 0.0), micro)
        if "mp/penalty_w" in sums:
            out["loss/feature_penalty"] = ratio(sums["mp/penalty_w"], n)
        if "mp/mixed_share" in sums:
            out["mixing/share"] = ratio(sums["mp/mixed_share"], micro)
        return out
