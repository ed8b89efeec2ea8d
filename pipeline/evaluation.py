"""Greedy CTC scoring of a model on transcribed speech: one implementation for
``jobs.evaluate`` (a checkpoint on a dataset) and the dev CER a CTC-trained run logs at its
checkpoints (:mod:`pipeline.train.dev`).

The corpus CER and WER are total edits over total reference characters (words), the
references normalised like the training targets; on utterances that name languages each
language also gets its own rates (``cer/lang/<code>``, ...): a multilingual model's overall
rate hides which languages it fails on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.batching import normalize as normalized


@dataclass
class Scored:
    """What :func:`score` found: the corpus summary and each utterance's hypothesis and errors."""

    summary: dict[str, float]
    hypotheses: list[str]
    references: list[str]
    errors: list[Any]
    """:class:`pipeline.text.UtteranceErrors` per utterance, in input order."""

    @property
    def languages(self) -> list[str]:
        """The languages reported one by one (metric-name form), in the summary's order."""
        prefix = "cer/lang/"
        return [k[len(prefix):] for k in self.summary if k.startswith(prefix)]


def per_language(languages: list[str], errors: list[Any]) -> dict[str, float]:
    """``cer/lang/<code>``, ``wer/lang/<code>``, ``num_utterances/lang/<code>`` and
    ``num_chars/lang/<code>`` of each language (sorted; "" named ``none``), each corpus
    rate over that language's utterances alone; empty when no utterance names a language."""
    from pipeline.text import summarize_errors
    from pipeline.train.metrics import language_metric_name

    if not any(languages):
        return {}
    out: dict[str, float] = {}
    for lang in sorted(set(languages)):
        s = summarize_errors([e for e, x in zip(errors, languages, strict=True) if x == lang])
        name = language_metric_name(lang)
        for key in ("cer", "wer", "num_utterances", "num_chars"):
            out[f"{key}/lang/{name}"] = s[key]
    return out


def transcribe(model: Any, audio: list[np.ndarray], vocab: Any, *, normalize: bool = False,
               max_samples_per_batch: int = 16000 * 120) -> list[str]:
    """Greedy CTC transcripts of ``audio`` (float32 16 kHz arrays), in input order.

    ``model``: a CTC model (``model(source, padding_mask)`` gives ``logits`` and
    ``output_lengths``), put in eval mode here. Utterances are batched by length (little
    padding), so a group-norm feature encoder sees nearly what it saw in fine-tuning
    (``pad`` batches from length buckets).
    """
    import torch

    from pipeline.probe import batches_by_length, pad_batch
    from pipeline.text import greedy_decode

    model.eval()
    device = next(model.parameters()).device
    out = [""] * len(audio)
    with torch.no_grad():
        for group in batches_by_length([len(a) for a in audio], max_samples_per_batch):
            items = [audio[i] for i in group]
            if normalize:
                items = [normalized(a) for a in items]
            source, pad = pad_batch(items, device)
            res = model(source, pad)
            for i, ids in zip(group, greedy_decode(res.logits.argmax(-1), res.output_lengths, vocab.blank_id),
                              strict=True):
                out[i] = vocab.decode(ids)
    return out


def score(model: Any, audio: list[np.ndarray], transcripts: list[str], vocab: Any, *,
          languages: list[str] | None = None, normalize: bool = False) -> Scored:
    """Transcribe ``audio`` greedily and score it against ``transcripts`` (raw; normalised
    with ``vocab`` as the training targets are): corpus ``cer``, ``wer``, counts, and per
    language where ``languages`` names them."""
    from pipeline.text import summarize_errors, utterance_errors

    hyps = transcribe(model, audio, vocab, normalize=normalize)
    refs = [vocab.normalize(t) for t in transcripts]
    errors = [utterance_errors(r, h) for r, h in zip(refs, hyps, strict=True)]
    summary = summarize_errors(errors)
    summary.update(per_language(list(languages or [""] * len(errors)), errors))
    return Scored(summary=summary, hypotheses=hyps, references=refs, errors=errors)
