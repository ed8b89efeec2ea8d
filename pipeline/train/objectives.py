"""Each pretraining objective's step for the generic loop, by ``model.objective``.

An objective is a model (``models.factory.build_pretraining_model`` picks it from the same
field) and a step here: how a batch becomes masks, a loss sum and its count, which metrics
it logs and what its health alarms watch. Adding an objective adds one line.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import Config
from pipeline.train.data2vec import Data2VecStep
from pipeline.train.just import JustStep
from pipeline.train.masked_prediction import MaskedPredictionStep
from pipeline.train.pretrain import PretrainStep
from pipeline.train.reconstruction import ApcStep, TeraStep
from pipeline.train.vq_bert import VqBertStep
from pipeline.train.w2v_bert import W2vBertStep
from pipeline.train.wav2vec1 import FuturePredictionStep

STEPS: dict[str, type] = {"wav2vec2": PretrainStep, "best_rq": MaskedPredictionStep,
                          "hubert": MaskedPredictionStep}
STEPS.update({"wav2vec": FuturePredictionStep, "vq_wav2vec": FuturePredictionStep, "apc": ApcStep, "tera": TeraStep,
              "vq_bert": VqBertStep})
STEPS.update(data2vec=Data2VecStep, data2vec2=Data2VecStep, w2v_bert=W2vBertStep, just=JustStep)


def pretraining_step(cfg: Config, model: torch.nn.Module) -> Any:
    """The step of ``cfg.model.objective`` for ``model`` (unwrapped: masks need its shapes)."""
    try:
        step_class = STEPS[cfg.model.objective]
    except KeyError:
        raise ValueError(f"model.objective: no training step for {cfg.model.objective!r}; known: {sorted(STEPS)}") from None
    return step_class(cfg, model)
