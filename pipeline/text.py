"""Text for CTC: the character vocabulary, normalisation, encode/decode, greedy decoding, CER/WER.

The vocabulary follows wav2vec 2.0's fine-tuning recipe (SPEC.md): one token per
character, ``|`` between words, and a blank. The blank is index 0 and is called
``<pad>`` in ``vocab.json``, which is what Hugging Face's ``Wav2Vec2CTCTokenizer``
expects (its pad token is the CTC blank, ``pad_token_id`` in ``config.json``).

Error rates come from jiwer: corpus CER/WER are total edits over total reference
characters/words (not a mean of per-utterance rates, which would overweight short
utterances). CER counts the space between words as a character, as jiwer does.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.hf import HF_CONFIG

BLANK = "<pad>"
"""The CTC blank (index 0), named as Hugging Face's tokenizer names its pad token."""
WORD_BOUNDARY = "|"
DEFAULT_CHARACTERS = "abcdefghijklmnopqrstuvwxyz'"
"""English letters and the apostrophe: the vocabulary when ``finetune.vocab`` is empty."""
VOCAB_FILE = "vocab.json"

_SPACE_RE = re.compile(r"\s+")
# Apostrophe look-alikes that transcripts use for the same thing.
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})


def _is_special(token: str) -> bool:
    return len(token) > 2 and token.startswith("<") and token.endswith(">")


@dataclass(frozen=True)
class Vocabulary:
    """CTC tokens in index order: the blank, the word boundary ``|``, the characters.

    Ours (:meth:`from_characters`) is ``<pad>`` (blank, 0), ``|`` (1), then the
    characters. A Hugging Face ``vocab.json`` may order them otherwise and hold special
    tokens (``<s>``, ``</s>``, ``<unk>``): those are never produced by :meth:`encode` and
    dropped by :meth:`decode`; ``blank_id`` is the model's ``pad_token_id``.
    """

    tokens: tuple[str, ...]
    blank_id: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.blank_id < len(self.tokens):
            raise ValueError(f"vocabulary: blank id {self.blank_id} outside {len(self.tokens)} tokens")
        if len(set(self.tokens)) != len(self.tokens):
            dupes = sorted({t for t in self.tokens if self.tokens.count(t) > 1})
            raise ValueError(f"vocabulary: duplicate tokens {dupes}")
        if WORD_BOUNDARY not in self.tokens or self.tokens.index(WORD_BOUNDARY) == self.blank_id:
            raise ValueError(f"vocabulary: expected a word boundary token {WORD_BOUNDARY!r} besides the blank")
        for i, t in enumerate(self.tokens):
            if i == self.blank_id or t == WORD_BOUNDARY or _is_special(t):
                continue
            if len(t) != 1 or t.isspace():
                raise ValueError(f"vocabulary: expected single non-space characters or <special> tokens, got {t!r}")
        chars = [t for i, t in enumerate(self.tokens) if i != self.blank_id and len(t) == 1 and t != WORD_BOUNDARY]
        if not chars:
            raise ValueError("vocabulary: no characters")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens) if t in chars})
        lower = any(c.islower() for c in chars)
        upper = any(c.isupper() for c in chars)
        object.__setattr__(self, "_case", "lower" if lower and not upper else "upper" if upper and not lower else "")

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_characters(cls, characters: str = "") -> Vocabulary:
        """Blank + ``|`` + the distinct characters of ``characters`` (``DEFAULT_CHARACTERS``
        when empty), in their order of first appearance."""
        chars = characters or DEFAULT_CHARACTERS
        seen: list[str] = []
        for c in chars:
            if c.isspace():
                raise ValueError(f"finetune.vocab: whitespace is the word boundary, not a character; got {chars!r}")
            if c == WORD_BOUNDARY:
                raise ValueError(f"finetune.vocab: {WORD_BOUNDARY!r} is added by itself; got {chars!r}")
            if c not in seen:
                seen.append(c)
        return cls((BLANK, WORD_BOUNDARY, *seen))

    @classmethod
    def from_hf_vocab(cls, mapping: dict[str, int], blank_id: int = 0) -> Vocabulary:
        """From a Hugging Face ``vocab.json`` mapping (token -> id); ``blank_id``: ``pad_token_id``."""
        if sorted(mapping.values()) != list(range(len(mapping))):
            raise ValueError(f"{VOCAB_FILE}: ids must be 0..{len(mapping) - 1} without gaps")
        ordered = [t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        return cls(tuple(ordered), blank_id)

    @classmethod
    def load(cls, path: str | Path, blank_id: int | None = None) -> Vocabulary:
        """Read ``vocab.json`` (a file, or a directory holding one). The blank is ``blank_id``,
        else the ``pad_token_id`` of a ``config.json`` beside it, else 0."""
        p = Path(path)
        if p.is_dir():
            p = p / VOCAB_FILE
        if not p.is_file():
            raise ValueError(f"{p}: no {VOCAB_FILE}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a JSON object token -> id")
        if len(data) == 1 and isinstance(next(iter(data.values())), dict):
            data = next(iter(data.values()))  # multilingual tokenizers nest the vocab by language
        if blank_id is None:
            blank_id = 0
            config = p.parent / HF_CONFIG
            if config.is_file():
                pad = json.loads(config.read_text()).get("pad_token_id")
                blank_id = int(pad) if pad is not None else 0
        return cls.from_hf_vocab(data, blank_id)

    def to_hf_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def save(self, directory: str | Path) -> Path:
        """Write ``vocab.json`` into ``directory`` (beside a Hugging Face ``config.json``)."""
        p = Path(directory) / VOCAB_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_hf_vocab(), indent=1, ensure_ascii=False) + "\n")
        return p

    # -- properties --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def boundary_id(self) -> int:
        return self.tokens.index(WORD_BOUNDARY)

    @property
    def characters(self) -> str:
        return "".join(self._index)  # type: ignore[attr-defined]

    # -- text <-> ids ------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """Lower case (unless the vocabulary has capitals), NFKC, apostrophe variants unified,
        accents stripped from letters the vocabulary lacks, any other character outside the
        vocabulary becomes a word break (punctuation separates words), single spaces."""
        text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
        case = self._case  # type: ignore[attr-defined]
        text = text.lower() if case == "lower" else text.upper() if case == "upper" else text
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        kept = []
        for c in text:
            if c not in index:
                # An accented letter outside the vocabulary keeps its base letter (é -> e).
                base = "".join(b for b in unicodedata.normalize("NFKD", c) if not unicodedata.combining(b))
                c = base if base and all(b in index for b in base) else " "
            kept.append(c)
        return _SPACE_RE.sub(" ", "".join(kept)).strip()

    def encode(self, text: str) -> list[int]:
        """Normalised ``text`` -> token ids, ``|`` between words (none at the ends)."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        boundary = self.boundary_id
        return [boundary if c == " " else index[c] for c in self.normalize(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids (already CTC-collapsed) -> text; blank and special tokens are dropped,
        ``|`` becomes a space."""
        out = []
        boundary = self.boundary_id
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"token id {i} is outside the vocabulary of {len(self.tokens)}")
            if i == self.blank_id or _is_special(self.tokens[i]):
                continue
            out.append(" " if i == boundary else self.tokens[i])
        return _SPACE_RE.sub(" ", "".join(out)).strip()


def transcript_characters(texts: Iterable[str]) -> str:
    """The characters a joint grapheme vocabulary needs for ``texts``: every letter (any
    script, accents kept: ``é`` is not ``e``), digit and apostrophe that normalisation keeps
    (NFKC, lower case, apostrophe variants unified), sorted by code point. What
    ``finetune.vocab_from_data`` builds the vocabulary from, so a multilingual dataset's
    German ``ß`` or French ``œ`` get tokens instead of becoming word breaks."""
    seen: set[str] = set()
    for text in texts:
        if text:
            seen.update(unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower())
    return "".join(sorted(c for c in seen if c == "'" or unicodedata.category(c)[0] in "LN"))


def ctc_collapse(ids: Sequence[int] | np.ndarray, blank: int = 0) -> list[int]:
    """Best path -> labels: merge repeated ids, then drop blanks (``a a - a`` -> ``a a``)."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)  # (T,)
    if arr.size == 0:
        return []
    keep = np.ones(arr.shape, dtype=bool)
    keep[1:] = arr[1:] != arr[:-1]
    keep &= arr != blank
    return arr[keep].tolist()


def greedy_decode(
    best_path: np.ndarray | Any, lengths: Sequence[int] | np.ndarray | None = None, blank: int = 0
) -> list[list[int]]:
    """Greedy CTC decoding of a batch: ``best_path`` (B, T) argmax ids (numpy or torch),
    ``lengths`` (B,) valid frames (padding frames are ignored) -> label ids per utterance."""
    arr = np.asarray(best_path.cpu() if hasattr(best_path, "cpu") else best_path)
    if arr.ndim != 2:
        raise ValueError(f"best_path: expected (B, T) ids, got shape {arr.shape}")
    if lengths is None:
        lengths = [arr.shape[1]] * arr.shape[0]
    lens = np.asarray(lengths.cpu() if hasattr(lengths, "cpu") else lengths, dtype=np.int64).reshape(-1)
    if lens.shape[0] != arr.shape[0]:
        raise ValueError(f"lengths: expected {arr.shape[0]} values, got {lens.shape[0]}")
    return [ctc_collapse(arr[b, : int(lens[b])], blank) for b in range(arr.shape[0])]


# --- error rates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UtteranceErrors:
    """Edit counts of one hypothesis against its reference."""

    char_edits: int
    num_chars: int
    word_edits: int
    num_words: int

    @property
    def cer(self) -> float:
        return self.char_edits / self.num_chars if self.num_chars else float("nan")

    @property
    def wer(self) -> float:
        return self.word_edits / self.num_words if self.num_words else float("nan")


def utterance_errors(reference: str, hypothesis: str) -> UtteranceErrors:
    """Character and word edit counts (substitutions + deletions + insertions).

    An empty reference has no rate: every hypothesis character/word is an insertion.
    """
    import jiwer

    ref, hyp = reference.strip(), hypothesis.strip()
    ref_words, hyp_words = ref.split(), hyp.split()
    if not ref:
        return UtteranceErrors(len(hyp), 0, len(hyp_words), 0)
    if not hyp:
        return UtteranceErrors(len(ref), len(ref), len(ref_words), len(ref_words))
    c = jiwer.process_characters(ref, hyp)
    w = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
    return UtteranceErrors(
        char_edits=c.substitutions + c.deletions + c.insertions,
        num_chars=len(ref),
        word_edits=w.substitutions + w.deletions + w.insertions,
        num_words=len(ref_words),
    )


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus CER and WER: total edits / total reference characters (words)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"error_rates: {len(references)} references but {len(hypotheses)} hypotheses")
    per = [utterance_errors(r, h) for r, h in zip(references, hypotheses, strict=True)]
    return summarize_errors(per)


def summarize_errors(per: Sequence[UtteranceErrors]) -> dict[str, float]:
    chars = sum(e.num_chars for e in per)
    words = sum(e.num_words for e in per)
    return {
        "cer": sum(e.char_edits for e in per) / chars if chars else float("nan"),
        "wer": sum(e.word_edits for e in per) / words if words else float("nan"),
        "num_utterances": float(len(per)),
        "num_chars": float(chars),
        "num_words": float(words),
    }
