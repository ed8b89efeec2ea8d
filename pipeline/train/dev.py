"""The dev CER of a run that trains a CTC head (fine-tuning, JUST), logged at its checkpoints.

A CTC run's loss says little about how it transcribes; its users watch the error rate on
held-out speech as it trains, per language on a multilingual corpus. At every checkpoint,
rank 0 transcribes ``finetune.dev_minutes`` of ``data.train_uri``'s valid split (its
transcribed utterances; the languages take turns, so every language is in a small set) with
greedy CTC (:func:`pipeline.evaluation.score`, what ``jobs.evaluate`` reports) and logs::

    dev/cer, dev/wer, dev/num_utterances       every language together
    dev/cer/lang/<code>, dev/wer/lang/<code>   each language (a split that names languages)

The set is read once, on rank 0, when the worker starts. A split with no transcribed
utterance turns the dev CER off with a warning: the run trains as it would without it.

The model scored is the CTC model of the engine's weights (JUST: its encoder and CTC head,
:func:`pipeline.model_io.ctc_state`), a copy on rank 0, so training mode, ZeRO partitions
and the global RNG are as they were (gathering ZeRO-3's weights is collective: every rank
calls :meth:`DevScorer.score`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.text import Vocabulary
from pipeline.train.deepspeed_compat import consolidated_state_dict

log = logging.getLogger("wavray.train")

PREFIX = "dev/"


def dev_scoring(cfg: Config) -> bool:
    """Whether a run of ``cfg`` scores a dev CER: a CTC-trained task with ``finetune.dev_minutes`` > 0."""
    return cfg.finetune.dev_minutes > 0


class DevScorer:
    """Scores the engine's CTC model on the dev set at each checkpoint (module doc)."""

    def __init__(self, cfg: Config, *, rank: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.vocab = Vocabulary.from_characters(cfg.finetune.vocab)
        self.labelled: Any = None
        self._model: torch.nn.Module | None = None
        found = torch.tensor([0], dtype=torch.long)
        if rank == 0:
            self.labelled = self._read()
            found[0] = int(self.labelled is not None)
        if dist.is_initialized():  # every rank must agree before the collective gather
            dist.broadcast(found, src=0)
        self.active = bool(found[0])

    def _read(self) -> Any:
        from pipeline.probe import load_labelled_set

        d = self.cfg.data
        try:
            picked = load_labelled_set(d.train_uri, split="valid", s3_endpoint=d.s3_endpoint, s3_region=d.s3_region,
                                       minutes=self.cfg.finetune.dev_minutes, seed=self.cfg.train.seed,
                                       by_language=True)
        except ValueError as e:
            log.warning("no dev CER (finetune.dev_minutes = %g): %s", self.cfg.finetune.dev_minutes, e)
            return None
        log.info("dev CER at every checkpoint: %d utterances (%.1f min) of %s [valid]",
                 len(picked), picked.minutes, d.train_uri)
        return picked

    def score(self, engine: Any, zero_stage: int) -> dict[str, float]:
        """``dev/*`` metrics of the engine's current weights on rank 0 ({} elsewhere, or when off)."""
        if not self.active:
            return {}
        from pipeline.evaluation import score
        from pipeline.model_io import architecture, ctc_state

        state = consolidated_state_dict(engine, zero_stage)  # collective under ZeRO-3
        if self.rank != 0 or state is None:
            return {}
        t0 = time.perf_counter()
        state = ctc_state(self.cfg, state)
        with torch.random.fork_rng(devices=[]):  # a fresh model's initialisation draws from the global RNG
            if self._model is None:
                self._model = architecture(self.cfg, "ctc", int(state["head.weight"].shape[0]))
            self._model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
            lab = self.labelled
            scored = score(self._model, lab.audio, lab.transcripts, self.vocab, languages=lab.languages,
                           normalize=self.cfg.data.normalize)
        keep = ("cer", "wer", "num_utterances")
        out = {f"{PREFIX}{k}": v for k, v in scored.summary.items() if k.split("/")[0] in keep}
        out[f"{PREFIX}seconds"] = time.perf_counter() - t0
        return out


def dev_line(step: int, metrics: dict[str, float]) -> str:
    """``[wavray] dev CER 57.2% (de 45.1%, en 63.0%) WER 98.0% at step 400``."""
    langs = [k.rsplit("/", 1)[-1] for k in metrics if k.startswith(f"{PREFIX}cer/lang/")]
    per = ", ".join(f"{lang} {100 * metrics[f'{PREFIX}cer/lang/{lang}']:.1f}%" for lang in langs)
    return (f"[wavray] dev CER {100 * metrics.get(f'{PREFIX}cer', float('nan')):.1f}%"
            + (f" ({per})" if per else "")
            + f" WER {100 * metrics.get(f'{PREFIX}wer', float('nan')):.1f}% at step {step}")
