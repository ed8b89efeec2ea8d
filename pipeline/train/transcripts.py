"""Transcripts as CTC targets: the vocabulary a run decodes with and each utterance's token
ids, read from a prepared dataset's manifest. Fine-tuning (:mod:`pipeline.train.finetune`)
and JUST (:mod:`pipeline.train.just`) both train a CTC loss on them."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config, apply_overrides
from pipeline.text import Vocabulary, transcript_characters

log = logging.getLogger("wavray.train")


def resolve_vocab(cfg: Config) -> Config:
    """``cfg`` with ``finetune.vocab`` written out: the default characters when empty, the
    characters of the training transcripts with ``finetune.vocab_from_data`` (then cleared),
    so a checkpoint decodes the same way whatever the code's default or the data become.
    Refuses a batch mode that would crop utterances away from their transcripts. Fine-tuning's
    and JUST's (:mod:`pipeline.train.just`) supervised loss both start here."""
    if cfg.finetune.vocab_from_data:
        characters = transcript_characters(read_transcripts(cfg))
        if not characters:
            raise ValueError(f"finetune.vocab_from_data: {cfg.data.train_uri}'s transcripts have no letters")
        if cfg.finetune.vocab and cfg.finetune.vocab != characters:
            warnings.warn(
                f"finetune.vocab = {cfg.finetune.vocab!r} is replaced by the characters of the transcripts "
                f"(finetune.vocab_from_data): {characters!r}",
                stacklevel=3,
            )
        log.info("finetune.vocab from the transcripts of %s: %s", cfg.data.train_uri, characters)
        cfg = apply_overrides(cfg, {"finetune.vocab": characters, "finetune.vocab_from_data": False})
    if cfg.data.batch_mode != "pad":
        raise ValueError(
            f"data.batch_mode: a CTC loss needs 'pad' (whole utterances: a crop would cut the transcript), "
            f"got {cfg.data.batch_mode!r}"
        )
    return apply_overrides(cfg, {"finetune.vocab": Vocabulary.from_characters(cfg.finetune.vocab).characters})



def read_transcripts(cfg: Config, *, split: str = "train") -> list[str]:
    """The transcripts of ``split`` in ``data.train_uri``'s manifest (the empty ones left out)."""
    from pipeline.data import schema as S
    from pipeline.data import storage

    store = storage.Storage.for_data(cfg.data)
    uri = storage.join(cfg.data.train_uri, S.MANIFEST_FILE)
    if not cfg.data.train_uri or not storage.exists(uri, store):
        raise ValueError(f"data.train_uri: {uri!r} does not exist; prepare the labelled set with jobs.prepare")
    rows = storage.read_table(uri, [S.SPLIT, S.TRANSCRIPT], store).to_pydict()
    return [t for sp, t in zip(rows[S.SPLIT], rows[S.TRANSCRIPT], strict=True) if sp == split and t]


@dataclass
class Targets:
    """Transcripts of a prepared dataset as token ids, keyed by utterance id."""

    ids: dict[str, np.ndarray]
    num_samples: dict[str, int]

    def of_batch(self, ids: Sequence[object], num_samples: Sequence[int], *,
                 where: str | None = None) -> tuple[list[int], list[np.ndarray]]:
        """(rows, token ids of each) of a batch's utterances that have a transcript, each checked
        to have arrived whole (a crop no longer matches its transcript). ``where`` (the
        dataset): every utterance must have one, an error naming it otherwise; None: the
        others are left out (JUST's unlabelled rows)."""
        rows: list[int] = []
        labels: list[np.ndarray] = []
        for b, (utt, n) in enumerate(zip((str(i) for i in ids), num_samples, strict=True)):
            tokens = self.ids.get(utt)
            if tokens is None:
                if where is not None:
                    raise ValueError(f"utterance {utt!r}: no transcript in {where}'s manifest")
                continue
            whole = self.num_samples[utt]
            if int(n) != whole:
                raise ValueError(
                    f"utterance {utt!r}: {n} of its {whole} samples arrived (cropped); its transcript needs the "
                    f"whole utterance: data.batch_mode=pad and data.max_sample_size >= {whole}"
                )
            rows.append(b)
            labels.append(tokens)
        return rows, labels

    @classmethod
    def read(cls, cfg: Config, vocab: Vocabulary, *, split: str = "train", unlabelled: bool = False) -> Targets:
        """From ``data.train_uri``'s manifest; errors name what cannot be trained on.

        ``unlabelled``: utterances without a transcript are left out (JUST trains on them
        without one) instead of refused; at least one must have one."""
        from pipeline.data import schema as S
        from pipeline.data import storage

        store = storage.Storage.for_data(cfg.data)
        uri = storage.join(cfg.data.train_uri, S.MANIFEST_FILE)
        if not storage.exists(uri, store):
            raise ValueError(f"data.train_uri: {uri!r} does not exist; prepare the labelled set with jobs.prepare")
        table = storage.read_table(uri, [S.ID, S.SPLIT, S.NUM_SAMPLES, S.TRANSCRIPT], store)
        rows = table.to_pydict()
        ids: dict[str, np.ndarray] = {}
        lengths: dict[str, int] = {}
        missing, empty = [], []
        longest = 0
        for utt, sp, n, text in zip(rows[S.ID], rows[S.SPLIT], rows[S.NUM_SAMPLES], rows[S.TRANSCRIPT], strict=True):
            if sp != split:
                continue
            if text is None or not text.strip():
                if not unlabelled:
                    missing.append(utt)
                continue
            tokens = vocab.encode(text)
            if not tokens:
                empty.append(utt)
                continue
            ids[utt] = np.asarray(tokens, dtype=np.int64)
            lengths[utt] = int(n)
            longest = max(longest, int(n))
        if missing or empty:
            what = (f"{len(missing)} without a transcript (e.g. {missing[:3]})" if missing else "") + (
                f"{'; ' if missing else ''}{len(empty)} with no character of finetune.vocab "
                f"{vocab.characters!r} (e.g. {empty[:3]})" if empty else "")
            raise ValueError(
                f"data.train_uri: {cfg.data.train_uri}: the {split!r} split has utterances CTC cannot train on: "
                f"{what}; fine-tune on a dataset prepared with transcripts for every file"
            )
        if not ids:
            what = "has no utterance with a transcript" if unlabelled else "is empty"
            raise ValueError(f"data.train_uri: {cfg.data.train_uri}: the {split!r} split {what}")
        if longest > cfg.data.max_sample_size:
            raise ValueError(
                f"data.max_sample_size = {cfg.data.max_sample_size}: the longest {split} utterance has {longest} "
                f"samples and would be cropped away from its transcript; set data.max_sample_size >= {longest} "
                f"(and data.max_samples_per_batch >= it)"
            )
        outside = sorted(set(transcript_characters(t for t in rows[S.TRANSCRIPT] if t)) - set(vocab.characters))
        if outside:
            log.warning("characters of the transcripts outside finetune.vocab %r lose their accents or become word "
                        "breaks: %s; set finetune.vocab_from_data=true for a vocabulary of the data's characters",
                        vocab.characters, "".join(outside))
        short = sum(1 for n in lengths.values() if n < cfg.data.min_sample_size)
        if short:
            log.warning("%d of %d utterances are shorter than data.min_sample_size = %d and are skipped",
                        short, len(lengths), cfg.data.min_sample_size)
        return cls(ids=ids, num_samples=lengths)
