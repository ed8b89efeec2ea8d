"""A synthetic English speech corpus made on this machine, with nothing downloaded.

Debian's speech synthesisers speak sentences generated from small word lists:
espeak-ng with many accent/voice variants (robotic but varied) and flite's four
diphone/unit-selection voices (closer to natural). Each (engine, voice, speed, pitch)
is one speaker; every utterance gets a small random change of rate. Output::

    <out>/wav/<speaker>/<speaker>-NNNN.wav     mono, the engine's own rate (8-22.05 kHz)
    <out>/transcripts.tsv                      id, path, transcript, speaker
    <out>/speakers.tsv                         speaker, engine, voice, speed, pitch, heldout

``transcripts.tsv`` is the sidecar ``jobs.prepare`` picks up by itself. Speakers marked
``heldout`` are for evaluations that need voices never heard in training: their files
are generated like the others and the column says which to leave out.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

_ADJECTIVES = (
    "quiet", "bright", "heavy", "little", "ancient", "yellow", "careful", "distant", "gentle", "noisy",
    "clever", "empty", "golden", "hidden", "narrow", "patient", "rapid", "silver", "tired", "wooden",
)
_NOUNS = (
    "river", "teacher", "garden", "window", "engine", "village", "letter", "mountain", "farmer", "kitchen",
    "station", "doctor", "bridge", "market", "painter", "forest", "harbor", "candle", "sailor", "library",
    "machine", "island", "student", "basket", "tower", "valley", "musician", "ladder", "orchard", "captain",
)
_VERBS = (
    "watched", "carried", "followed", "painted", "opened", "repaired", "visited", "described", "found",
    "cleaned", "counted", "remembered", "crossed", "measured", "answered", "welcomed", "moved", "tested",
)
_ADVERBS = ("slowly", "quickly", "again", "early", "yesterday", "together", "carefully", "at night", "every morning")
_PLACES = (
    "near the old bridge", "in the small village", "behind the station", "under the tall trees",
    "beside the river", "across the busy market", "on the top floor", "at the end of the road",
)
_NUMBERS = ("two", "three", "four", "five", "seven", "nine", "ten", "twelve", "twenty")


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences (lower case, letters and spaces only: ready for CTC)."""
    rng = np.random.default_rng(seed)

    def pick(words: tuple[str, ...]) -> str:
        return words[int(rng.integers(len(words)))]

    def a(word: str) -> str:
        return ("an " if word[0] in "aeiou" else "a ") + word

    templates: list[Callable[[], str]] = [
        lambda: f"the {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_VERBS)} the {pick(_NOUNS)} {pick(_ADVERBS)}",
        lambda: f"{a(pick(_NOUNS))} {pick(_PLACES)} {pick(_VERBS)} {pick(_NUMBERS)} {pick(_NOUNS)}s",
        lambda: f"{pick(_ADVERBS)} the {pick(_NOUNS)} {pick(_VERBS)} {a(pick(_ADJECTIVES))} {pick(_NOUNS)} {pick(_PLACES)}",
        lambda: f"the {pick(_NOUNS)} and the {pick(_NOUNS)} {pick(_VERBS)} the {pick(_ADJECTIVES)} {pick(_NOUNS)}",
        lambda: f"{pick(_NUMBERS)} {pick(_ADJECTIVES)} {pick(_NOUNS)}s were {pick(_VERBS)} {pick(_PLACES)}",
    ]
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        text = " ".join(templates[int(rng.integers(len(templates)))]().split())
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


@dataclass(frozen=True)
class Voice:
    name: str
    engine: str
    voice: str
    speed: int = 100
    """espeak-ng: words per minute; flite: percent of its normal rate."""
    pitch: int = 0
    """espeak-ng: pitch 0-99; flite has no pitch setting (0)."""
    heldout: bool = False


VOICES: tuple[Voice, ...] = (
    Voice("flite-slt", "flite", "slt"),
    Voice("flite-awb", "flite", "awb"),
    Voice("flite-kal16", "flite", "kal16"),
    Voice("flite-kal", "flite", "kal"),  # 8 kHz
    Voice("flite-rms", "flite", "rms", heldout=True),
    Voice("espeak-us-m1", "espeak-ng", "en-us+m1", 165, 45),
    Voice("espeak-us-f2", "espeak-ng", "en-us+f2", 150, 62),
    Voice("espeak-gb-m3", "espeak-ng", "en+m3", 175, 40),
    Voice("espeak-gb-f4", "espeak-ng", "en+f4", 155, 70),
    Voice("espeak-rp-m5", "espeak-ng", "en-gb-x-rp+m5", 145, 50),
    Voice("espeak-scot-f1", "espeak-ng", "en-gb-scotland+f1", 160, 58),
    Voice("espeak-carib-m2", "espeak-ng", "en-029+m2", 170, 48),
    Voice("espeak-lanc-m7", "espeak-ng", "en-gb-x-gbclan+m7", 140, 35),
    Voice("espeak-wmid-f3", "espeak-ng", "en-gb-x-gbcwmd+f3", 165, 66),
    Voice("espeak-us-klatt", "espeak-ng", "en-us+klatt", 155, 52),
    Voice("espeak-us-f5", "espeak-ng", "en-us+f5", 185, 75, heldout=True),
)


def available_voices() -> list[Voice]:
    """The voices whose engine is installed (``infra/setup.sh`` installs both)."""
    have = {engine for engine in ("espeak-ng", "flite") if shutil.which(engine)}
    if not have:
        raise RuntimeError(
            "demo corpus: neither espeak-ng nor flite is installed; run infra/setup.sh "
            "(or apt-get install espeak-ng flite)"
        )
    return [v for v in VOICES if v.engine in have]


def synthesize(voice: Voice, text: str, path: Path, rate_scale: float = 1.0) -> None:
    """Speak ``text`` with ``voice`` into a wav file at ``path``."""
    if voice.engine == "espeak-ng":
        cmd = ["espeak-ng", "-v", voice.voice, "-s", str(round(voice.speed * rate_scale)), "-p", str(voice.pitch),
               "-w", str(path), text]
    else:
        # flite's duration_stretch: > 1 is slower.
        stretch = 100.0 / (voice.speed * rate_scale)
        cmd = ["flite", "-voice", voice.voice, "--setf", f"duration_stretch={stretch:.3f}",
               "-t", text, "-o", str(path)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)


def make_corpus(
    out_dir: str | Path,
    *,
    minutes: float = 15.0,
    seed: int = 0,
    voices: list[Voice] | None = None,
    workers: int | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, float]:
    """Synthesise about ``minutes`` of speech into ``out_dir``; returns counts and minutes.

    Utterances go round-robin over the voices, so every speaker gets about the same
    share; the same seed gives the same sentences, voices and rates.
    """
    if minutes <= 0:
        raise ValueError(f"--minutes: expected > 0, got {minutes}")
    out = Path(out_dir)
    voices = voices or available_voices()
    rng = np.random.default_rng(seed)
    # About 3 s per utterance; sentences are drawn generously and reused across voices.
    texts = sentences(max(200, int(minutes * 60 / 3) + 50), seed=seed)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    total_s = 0.0
    batch = max(8, 4 * (workers or os.cpu_count() or 2))
    index = 0
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        while total_s < minutes * 60:
            jobs = []
            for _ in range(batch):
                voice = voices[index % len(voices)]
                text = texts[int(rng.integers(len(texts)))]
                scale = float(rng.uniform(0.85, 1.15))
                rel = f"wav/{voice.name}/{voice.name}-{index:05d}.wav"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                jobs.append((rel, text, voice, pool.submit(_make_one, voice, text, out / rel, scale)))
                index += 1
            for rel, text, voice, fut in jobs:
                seconds = fut.result()
                total_s += seconds
                rows.append((rel[: -len(".wav")], rel, text, voice.name))
            progress(f"demo corpus: {len(rows)} utterances, {total_s / 60:.1f} of {minutes:g} min")
    with open(out / "transcripts.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writerow(["id", "path", "transcript", "speaker"])
        w.writerows(rows)
    with open(out / "speakers.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writerow(["speaker", "engine", "voice", "speed", "pitch", "heldout"])
        for v in voices:
            w.writerow([v.name, v.engine, v.voice, v.speed, v.pitch, str(v.heldout).lower()])
    return {"utterances": len(rows), "minutes": total_s / 60, "speakers": len(voices)}


def _make_one(voice: Voice, text: str, path: Path, scale: float) -> float:
    # Write beside the target and rename, so an interrupted run never leaves half a file.
    with tempfile.NamedTemporaryFile(suffix=".wav", dir=path.parent, delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        synthesize(voice, text, tmp_path, scale)
        info = sf.info(str(tmp_path))
        tmp_path.replace(path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return info.frames / info.samplerate
