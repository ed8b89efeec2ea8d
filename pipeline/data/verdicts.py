"""Every reason ``prepare`` can give for not taking a file: the ``reason`` column of the
rejects table, defined once.

A reason is a short code to count and filter by; the ``detail`` beside it says what is
wrong with that file in the user's terms (a length in seconds, a level in dBFS, which
part of the file), never a decoder's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- found while listing (stage 1), before anything is read ------------------------------------
REASON_BAD_NAME = "bad_name"
"""The file name is not valid UTF-8 (an old Latin-1 or Shift-JIS name): it cannot be an id or a
manifest entry. The rejects table shows it with ``\\x`` escapes; renaming it (``convmv``) fixes it."""
REASON_BROKEN_LINK = "broken_link"
"""A symbolic link whose target does not exist, or that leads in a loop."""
REASON_DUPLICATE = "duplicate"
"""The same physical file as another listed path (a symbolic or hard link to it): read once,
under the other path."""
REASON_NOT_A_FILE = "not_a_file"
"""A named pipe, socket or device with an audio extension: opening it could block forever."""

# --- found while converting (stage 4) ----------------------------------------------------------
REASON_EMPTY_FILE = "empty_file"
"""Zero bytes."""
REASON_UNREADABLE = "unreadable"
"""Cannot be read, or no decoder (libsndfile, then ffmpeg) recognises it as audio: not audio, an
unknown format, a broken header."""
REASON_NO_SAMPLES = "no_samples"
"""A valid header with no audio after it."""
REASON_DECODE_ERROR = "decode_error"
"""Opens, but the stream is corrupt part-way."""
REASON_TRUNCATED = "truncated"
"""Shorter than its header says (cut-off download or copy)."""
REASON_NON_FINITE = "non_finite"
"""NaN or infinite samples (float formats)."""
REASON_SILENT = "silent"
"""Digital silence (every sample 0): nothing to learn, and it would break per-utterance
normalisation."""
REASON_SIGNAL_LOST = "signal_lost"
"""Converting it would destroy its signal: quieter than 16-bit audio can hold, sound only above
the target rate's Nyquist frequency, or (a safety net) more clipping than the input had. Such a
file is rejected rather than stored damaged."""
REASON_BAD_SAMPLE_RATE = "bad_sample_rate"
REASON_TOO_SHORT = "too_short"
REASON_TOO_LONG = "too_long"
REASON_ERROR = "error"
"""Anything unexpected (a bug); the detail says what."""

LISTING_REASONS = frozenset({REASON_BAD_NAME, REASON_BROKEN_LINK, REASON_DUPLICATE, REASON_NOT_A_FILE})


@dataclass(frozen=True)
class Rejected:
    """A file ``prepare`` does not take: a ``REASON_*`` code and what is wrong, in the user's terms."""

    reason: str
    detail: str


class Unusable(Exception):
    """Raised inside decoding when a verdict is reached; :func:`pipeline.data.audio.convert`
    turns it into a :class:`Rejected`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.rejected = Rejected(reason, detail)
