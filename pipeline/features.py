"""The log-mel baseline: what a downstream model sees without pretraining.

CPC's and wav2vec's tables compare learned features against classic ones (MFCC,
filterbanks). To compare like with like, the baseline's filterbanks have the conv feature
encoder's frame rate (one frame per 20 ms from a 25 ms window, ``models.frontends``), and
:func:`build_logmel_ctc_model` puts them in the conv encoder's place: the same projection,
Transformer and CTC head then train on filterbanks instead of learned latents
(``finetune.frontend=logmel``).
"""

from __future__ import annotations

import dataclasses

from models.config import FrontendConfig, ModelConfig
from models.factory import build_ctc_model
from models.frontends import LogMelFrontend, mel_filterbank
from models.wav2vec2 import Wav2Vec2ForCTC

__all__ = ["LogMelFrontend", "baseline_frontend", "build_logmel_ctc_model", "mel_filterbank"]


def baseline_frontend(n_mels: int = 80) -> FrontendConfig:
    """``n_mels`` log-mel filterbanks at the conv encoder's frame rate (20 ms hop, 25 ms window),
    unstacked and unnormalised (the projection's LayerNorm scales them)."""
    return FrontendConfig(kind="logmel", n_mels=n_mels, hop=320, window=400, stack=1, normalize=False)


def build_logmel_ctc_model(cfg: ModelConfig, vocab_size: int, n_mels: int = 80) -> Wav2Vec2ForCTC:
    """The CTC model of ``cfg`` with the conv feature encoder replaced by log-mel filterbanks.

    Projection, Transformer, masking and head are exactly those of
    :func:`models.factory.build_ctc_model` (same sizes, fresh weights); only the input
    features differ, so the comparison isolates what the learned features bring.
    """
    return build_ctc_model(dataclasses.replace(cfg, frontend=baseline_frontend(n_mels)), vocab_size)
