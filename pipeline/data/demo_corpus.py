"""A synthetic speech corpus made on this machine, with nothing downloaded.

Debian's speech synthesisers speak sentences generated from small word lists:
espeak-ng with many accent/voice variants (robotic but varied) and flite's four
diphone/unit-selection voices (closer to natural). Each (engine, voice, speed, pitch)
is one speaker; every utterance gets a small random change of rate. Output::

    <out>/wav/<speaker>/<speaker>-NNNN.wav     mono, the engine's own rate (8-22.05 kHz)
    <out>/transcripts.tsv                      id, path, transcript, speaker[, language]
    <out>/speakers.tsv                         speaker, engine, voice, speed, pitch, heldout[, language]

``transcripts.tsv`` is the sidecar ``jobs.prepare`` picks up by itself. Speakers marked
``heldout`` are for evaluations that need voices never heard in training: their files
are generated like the others and the column says which to leave out.

By default the corpus is English. ``languages`` (``--languages en,de,fr,es,it``) makes it
multilingual, for XLSR-style pretraining and per-language metrics: German, French,
Spanish and Italian sentences come from small built-in phrase lists (with their accented
letters: the transcripts exercise a joint grapheme vocabulary), spoken by espeak-ng's
voices of that language, four speakers each with one held out; English keeps its voices
above. Utterances go round-robin over the languages, so each gets about the same
minutes, and both tables gain a ``language`` column, which ``jobs.prepare`` writes into
every row (``pipeline/data/schema.py``, ``LANGUAGE``).

``labelled_fraction`` (``--labelled-fraction``) leaves part of the corpus unlabelled, the
data of a semi-supervised objective such as JUST (``data.labelled_ratio``): only that
share of the training speakers' utterances keep their transcript in ``transcripts.tsv``
(which ones: a seeded hash of the id, :func:`keeps_transcript`), the others get an empty
one. Held-out speakers keep every transcript: they are what evaluations score.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Phrases:
    """A language's sentence material: ``<subject> <predicate>[ <time>]``, each a whole
    phrase, so every combination is grammatical without agreement rules."""

    subjects: tuple[str, ...]
    predicates: tuple[str, ...]
    times: tuple[str, ...]

    @property
    def num_sentences(self) -> int:
        return len(self.subjects) * len(self.predicates) * (len(self.times) + 1)


PHRASES: dict[str, Phrases] = {
    "de": Phrases(
        subjects=(
            "der alte fischer", "die junge ärztin", "ein müder bäcker", "die kleine schülerin",
            "der fröhliche gärtner", "eine große köchin", "der stille lehrer", "die schöne tänzerin",
            "mein älterer bruder", "unsere nachbarin", "der grüne vogel", "ein höflicher kellner",
            "die müde königin", "der schnelle läufer",
        ),
        predicates=(
            "öffnet das fenster", "liest ein buch über straßen", "trägt einen schweren korb",
            "kocht eine süße suppe", "malt die weiße brücke", "grüßt die fremden gäste",
            "zählt die äpfel im garten", "schließt die tür der küche", "hört die vögel im wald",
            "sucht den schlüssel", "fährt über den fluss", "füttert die hungrige katze",
            "baut ein hölzernes boot", "schreibt einen langen brief",
        ),
        times=("am morgen", "jeden abend", "im frühling", "nach dem essen", "heute früh", "während des regens",
               "vor dem frühstück", "am späten nachmittag"),
    ),
    "fr": Phrases(
        subjects=(
            "le vieux pêcheur", "la jeune étudiante", "un boulanger fatigué", "la petite fille",
            "le médecin du village", "une cuisinière célèbre", "le garçon têtu", "la reine âgée",
            "mon frère aîné", "notre voisine", "le maître d'école", "un élève curieux", "la sœur de pierre",
            "le marchand de fruits",
        ),
        predicates=(
            "ouvre la fenêtre", "lit un livre très épais", "porte un panier léger", "prépare une soupe chaude",
            "peint le pont de la forêt", "salue les invités étrangers", "compte les pommes du jardin",
            "ferme la porte de la cuisine", "écoute les oiseaux", "cherche la clé perdue", "traverse la rivière",
            "nourrit le chat affamé", "construit un bateau en bois", "écrit une longue lettre",
        ),
        times=("le matin", "chaque soir", "au printemps", "après le déjeuner", "à midi", "pendant l'été",
               "avant la fête", "en hiver"),
    ),
    "es": Phrases(
        subjects=(
            "el viejo pescador", "la joven médica", "un panadero cansado", "la niña pequeña",
            "el maestro del pueblo", "una cocinera famosa", "el señor alegre", "la reina anciana",
            "mi hermano mayor", "nuestra vecina", "el músico tímido", "un estudiante curioso",
            "la dueña del café", "el campesino fuerte",
        ),
        predicates=(
            "abre la ventana", "lee un libro antiguo", "lleva una cesta pesada", "prepara una sopa caliente",
            "pinta el puente del río", "saluda a los huéspedes", "cuenta las manzanas del jardín",
            "cierra la puerta de la cocina", "escucha los pájaros", "busca la llave perdida",
            "cruza la montaña", "canta una canción", "construye un barco pequeño", "escribe una carta larga",
        ),
        times=("por la mañana", "cada noche", "en otoño", "después de la cena", "al mediodía",
               "durante el verano", "antes de la fiesta", "el miércoles"),
    ),
    "it": Phrases(
        subjects=(
            "il vecchio pescatore", "la giovane dottoressa", "un fornaio stanco", "la bambina piccola",
            "il maestro del paese", "una cuoca famosa", "il ragazzo allegro", "la regina anziana",
            "mio fratello maggiore", "la nostra vicina", "il musicista timido", "uno studente curioso",
            "la padrona del caffè", "il contadino forte",
        ),
        predicates=(
            "apre la finestra", "legge un libro antico", "porta un cesto pesante", "prepara una zuppa calda",
            "dipinge il ponte sul fiume", "saluta gli ospiti", "conta le mele del giardino",
            "chiude la porta della cucina", "ascolta gli uccelli", "cerca la chiave perduta",
            "attraversa la città", "dà da mangiare al gatto", "costruisce una barca di legno",
            "scrive una lettera lunga",
        ),
        times=("la mattina", "ogni sera", "in autunno", "dopo la cena", "a mezzogiorno", "durante l'estate",
               "il lunedì", "più tardi"),
    ),
}
"""Built-in sentence material of the languages besides English (``sentences(language=...)``)."""

LANGUAGES: tuple[str, ...] = ("en", *sorted(PHRASES))
"""Languages the demo corpus can speak."""


def sentences(n: int, seed: int = 0, *, language: str = "en") -> list[str]:
    """``n`` distinct sentences of ``language`` (lower case, letters, accents, apostrophes
    and spaces only: ready for CTC). English comes from templates over word lists; the
    others from :data:`PHRASES`, which bound how many distinct sentences there are."""
    if language != "en":
        return _phrase_sentences(n, seed, language)
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


def _phrase_sentences(n: int, seed: int, language: str) -> list[str]:
    if language not in PHRASES:
        raise ValueError(f"language: no built-in sentences for {language!r}; known: {', '.join(LANGUAGES)}")
    phrases = PHRASES[language]
    if n > phrases.num_sentences:
        raise ValueError(f"sentences: {language!r} has {phrases.num_sentences} distinct sentences, {n} were asked for")
    rng = np.random.default_rng([seed, *language.encode()])
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        subject = phrases.subjects[int(rng.integers(len(phrases.subjects)))]
        predicate = phrases.predicates[int(rng.integers(len(phrases.predicates)))]
        t = int(rng.integers(len(phrases.times) + 1))  # the last draw: no time phrase
        text = f"{subject} {predicate}" + (f" {phrases.times[t]}" if t < len(phrases.times) else "")
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
    language: str = "en"


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


def _espeak(language: str, variants: tuple[tuple[str, str, int, int], ...]) -> tuple[Voice, ...]:
    """One language's espeak-ng speakers: (espeak voice, variant, speed, pitch) each, the last held out."""
    return tuple(
        Voice(f"{language}-espeak-{variant}", "espeak-ng", f"{voice}+{variant}", speed, pitch,
              heldout=i == len(variants) - 1, language=language)
        for i, (voice, variant, speed, pitch) in enumerate(variants)
    )


OTHER_VOICES: tuple[Voice, ...] = (
    *_espeak("de", (("de", "m1", 160, 45), ("de", "f2", 150, 62), ("de", "m3", 170, 40), ("de", "f4", 155, 70))),
    *_espeak("fr", (("fr-fr", "m1", 165, 48), ("fr-fr", "f2", 150, 64), ("fr-be", "m3", 160, 42),
                    ("fr-ch", "f4", 155, 68))),
    *_espeak("es", (("es", "m1", 160, 46), ("es", "f2", 150, 60), ("es-419", "m3", 170, 40), ("es-419", "f4", 150, 72))),
    *_espeak("it", (("it", "m1", 160, 44), ("it", "f2", 150, 63), ("it", "m3", 165, 38), ("it", "f5", 160, 74))),
)
"""Speakers of the languages besides English (espeak-ng only: flite speaks English)."""


def available_voices() -> list[Voice]:
    """The English voices whose engine is installed (``infra/setup.sh`` installs both)."""
    have = {engine for engine in ("espeak-ng", "flite") if shutil.which(engine)}
    if not have:
        raise RuntimeError(
            "demo corpus: neither espeak-ng nor flite is installed; run infra/setup.sh "
            "(or apt-get install espeak-ng flite)"
        )
    return [v for v in VOICES if v.engine in have]


def parse_languages(text: str) -> list[str]:
    """``en,de,fr`` -> the codes, checked against :data:`LANGUAGES` (order kept, no repeats)."""
    codes = [c.strip() for c in text.split(",") if c.strip()]
    if not codes:
        raise ValueError(f"--languages: expected comma-separated codes of {', '.join(LANGUAGES)}, got {text!r}")
    unknown = [c for c in codes if c not in LANGUAGES]
    if unknown:
        raise ValueError(f"--languages: no built-in sentences for {unknown}; known: {', '.join(LANGUAGES)}")
    if len(set(codes)) != len(codes):
        raise ValueError(f"--languages: {text!r} names a language twice")
    return codes


def espeak_voice_names(language: str) -> set[str]:
    """The voice names ``espeak-ng --voices=<language>`` lists here (its own voices, not
    mbrola's, which need the separately installed mbrola synthesiser); a language it has
    none for is an error naming it."""
    if not shutil.which("espeak-ng"):
        raise RuntimeError("demo corpus: espeak-ng is not installed; run infra/setup.sh (or apt-get install espeak-ng)")
    listing = subprocess.run(["espeak-ng", f"--voices={language}"], check=True, capture_output=True, text=True,
                             timeout=30).stdout
    names = set()
    for line in listing.splitlines()[1:]:  # Pty Language Age/Gender VoiceName File Other-languages
        fields = line.split()
        if len(fields) >= 5 and not fields[4].startswith("mb/"):
            names.add(fields[1].lower())
    if not names:
        raise ValueError(f"--languages: espeak-ng has no voice for {language!r} here "
                         f"(`espeak-ng --voices={language}` lists none)")
    return names


def voices_for(languages: Sequence[str]) -> list[Voice]:
    """The speakers of a multilingual corpus: English's installed voices, and for every other
    language the :data:`OTHER_VOICES` whose espeak-ng voice exists here. Each language needs
    a held-out speaker and one to train on; the error names a language that lacks them."""
    out: list[Voice] = []
    for language in languages:
        if language not in LANGUAGES:
            raise ValueError(f"--languages: no built-in sentences for {language!r}; known: {', '.join(LANGUAGES)}")
        if language == "en":
            found = available_voices()
        else:
            installed = espeak_voice_names(language)
            found = [v for v in OTHER_VOICES if v.language == language and v.voice.split("+")[0].lower() in installed]
        if not any(v.heldout for v in found) or all(v.heldout for v in found):
            raise ValueError(
                f"--languages: {language!r} has {len(found)} usable voices here ({[v.voice for v in found]}); "
                "a held-out speaker and at least one to train on are needed"
            )
        out.extend(found)
    return out


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


def keeps_transcript(utterance_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a training speaker's utterance keeps its transcript when only ``fraction``
    of them do: a hash of ``seed`` and the id, so the same corpus is labelled the same way
    on every machine and run, whatever order the files were made in."""
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"{seed}\0{utterance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def make_corpus(
    out_dir: str | Path,
    *,
    minutes: float = 15.0,
    seed: int = 0,
    voices: list[Voice] | None = None,
    languages: Sequence[str] | None = None,
    workers: int | None = None,
    labelled_fraction: float = 1.0,
    progress: Callable[[str], None] = print,
) -> dict[str, float]:
    """Synthesise about ``minutes`` of speech into ``out_dir``; returns counts and minutes.

    ``languages``: codes of :data:`LANGUAGES` for a multilingual corpus (the speakers of
    :func:`voices_for` unless ``voices`` are given); None: English, as it always was.
    Utterances go round-robin over the languages and, within each, over its voices, so
    every language and speaker gets about the same share; the same seed gives the same
    sentences, voices and rates. The tables carry a ``language`` column when the corpus
    was asked for languages or its voices speak more than one. ``labelled_fraction``: the
    share of the training (not held-out) speakers' utterances whose transcript is kept
    (:func:`keeps_transcript`); the rest are written with an empty transcript.
    """
    if minutes <= 0:
        raise ValueError(f"--minutes: expected > 0, got {minutes}")
    if not 0.0 <= labelled_fraction <= 1.0:
        raise ValueError(f"--labelled-fraction: expected a value in [0, 1], got {labelled_fraction}")
    out = Path(out_dir)
    if voices is None:
        voices = voices_for(languages) if languages is not None else available_voices()
    order = list(dict.fromkeys(v.language for v in voices))
    by_language = {lang: [v for v in voices if v.language == lang] for lang in order}
    tagged = languages is not None or len(order) > 1
    rng = np.random.default_rng(seed)
    # About 3 s per utterance; sentences are drawn generously and reused across voices.
    wanted = max(200, int(minutes * 60 / 3 / len(order)) + 50)
    texts = {lang: sentences(min(wanted, PHRASES[lang].num_sentences) if lang in PHRASES else wanted, seed=seed,
                             language=lang) for lang in order}
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, ...]] = []
    total_s = 0.0
    batch = max(8, 4 * (workers or os.cpu_count() or 2))
    index = 0
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        while total_s < minutes * 60:
            jobs = []
            for _ in range(batch):
                # One language: voices[index % len(voices)], as the English corpus always went.
                lang_voices = by_language[order[index % len(order)]]
                voice = lang_voices[(index // len(order)) % len(lang_voices)]
                pool_texts = texts[voice.language]
                text = pool_texts[int(rng.integers(len(pool_texts)))]
                scale = float(rng.uniform(0.85, 1.15))
                rel = f"wav/{voice.name}/{voice.name}-{index:05d}.wav"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                jobs.append((rel, text, voice, pool.submit(_make_one, voice, text, out / rel, scale)))
                index += 1
            for rel, text, voice, fut in jobs:
                seconds = fut.result()
                total_s += seconds
                utt = rel[: -len(".wav")]
                kept = voice.heldout or keeps_transcript(utt, labelled_fraction, seed)
                rows.append((utt, rel, text if kept else "", voice.name) + ((voice.language,) if tagged else ()))
            progress(f"demo corpus: {len(rows)} utterances, {total_s / 60:.1f} of {minutes:g} min")
    extra = ["language"] if tagged else []
    with open(out / "transcripts.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writerow(["id", "path", "transcript", "speaker", *extra])
        w.writerows(rows)
    with open(out / "speakers.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        w.writerow(["speaker", "engine", "voice", "speed", "pitch", "heldout", *extra])
        for v in voices:
            w.writerow([v.name, v.engine, v.voice, v.speed, v.pitch, str(v.heldout).lower()]
                       + ([v.language] if tagged else []))
    return {"utterances": len(rows), "minutes": total_s / 60, "speakers": len(voices), "languages": len(order),
            "labelled": sum(1 for r in rows if r[2])}


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
