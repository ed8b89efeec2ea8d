"""The demo corpus: synthesised speech with transcripts, made here, ready for prepare;
English by default, several languages with ``--languages``, partly unlabelled with
``--labelled-fraction``."""

from __future__ import annotations

import csv
import json
import shutil
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.demo_corpus import main
from pipeline.data import schema as S
from pipeline.data.demo_corpus import (
    OTHER_VOICES,
    PHRASES,
    VOICES,
    espeak_voice_names,
    keeps_transcript,
    make_corpus,
    parse_languages,
    sentences,
)

needs_espeak = pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed")


def test_sentences_are_distinct_plain_text_and_reproducible() -> None:
    a = sentences(300, seed=1)
    assert len(set(a)) == 300 and a == sentences(300, seed=1) and a != sentences(300, seed=2)
    assert all(s == s.lower() and set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in a)


# The letters each language's sentences must use (its accents: the joint vocabulary's reason).
ACCENTS = {"de": "äöüß", "fr": "éèàçêœ", "es": "ñáéíóú", "it": "àèìù"}


def test_each_languages_sentences_are_distinct_reproducible_and_use_its_accents() -> None:
    for language, letters in ACCENTS.items():
        a = sentences(300, seed=1, language=language)
        assert len(set(a)) == 300 and a == sentences(300, seed=1, language=language), language
        assert a != sentences(300, seed=2, language=language)
        text = " ".join(a)
        assert text == text.lower() and all(c == " " or c == "'" or unicodedata.category(c) == "Ll" for c in text)
        assert set(letters) <= set(text), (language, set(letters) - set(text))
    assert not set(" ".join(sentences(300, seed=1))) - set("abcdefghijklmnopqrstuvwxyz "), "English stays a-z"
    with pytest.raises(ValueError, match="'de' has 1764 distinct sentences"):
        sentences(PHRASES["de"].num_sentences + 1, language="de")
    with pytest.raises(ValueError, match="no built-in sentences for 'xx'"):
        sentences(3, language="xx")


def test_languages_are_checked_by_name() -> None:
    assert parse_languages(" en, de ,fr") == ["en", "de", "fr"]
    for bad, message in (("en,xx", r"\['xx'\]"), ("de,de", "twice"), (" , ", "expected")):
        with pytest.raises(ValueError, match=message):
            parse_languages(bad)
    assert main(["--output", "/nonexistent/never", "--languages", "en,zz"]) == 1
    # Every language has speakers to train on and exactly one held out.
    for language in ACCENTS:
        held = [v.heldout for v in OTHER_VOICES if v.language == language]
        assert held.count(True) == 1 and len(held) >= 3, language


@needs_espeak
def test_a_language_espeak_ng_has_no_voice_for_is_named() -> None:
    assert {"de"} <= espeak_voice_names("de") and {"fr-fr", "fr-be", "fr-ch"} <= espeak_voice_names("fr")
    with pytest.raises(ValueError, match="espeak-ng has no voice for 'qq'"):
        espeak_voice_names("qq")


@needs_espeak
def test_multilingual_corpus_prepares_with_each_rows_language(tmp_path: Path, ray_local: None) -> None:
    """``--languages de,fr,es``: every language speaks its own sentences with its own
    voices, one held out each; the sidecar's language column reaches every prepared row,
    the transcripts arrive with their accents, and the summary counts each language."""
    from jobs.prepare import main as prepare_main

    corpus = tmp_path / "corpus"
    assert main(["--output", str(corpus), "--minutes", "0.4", "--languages", "de,fr,es"]) == 0
    with open(corpus / "transcripts.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    with open(corpus / "speakers.tsv", encoding="utf-8") as f:
        speakers = {s["speaker"]: s for s in csv.DictReader(f, delimiter="\t")}
    per_language = [sum(r["language"] == lang for r in rows) for lang in ("de", "fr", "es")]
    assert min(per_language) > 0 and max(per_language) - min(per_language) <= 1, "round-robin over languages"
    own = {lang: set(sentences(400, seed=0, language=lang)) for lang in ("de", "fr", "es")}
    for r in rows:
        assert r["transcript"] in own[r["language"]], r
        assert speakers[r["speaker"]]["language"] == r["language"]
    for lang in ("de", "fr", "es"):
        mine = [s for s in speakers.values() if s["language"] == lang]
        assert [s["heldout"] for s in mine].count("true") == 1 and len(mine) >= 3, lang
        assert all(s["engine"] == "espeak-ng" for s in mine)

    out = tmp_path / "shards"
    assert prepare_main(["--input", str(corpus), "--output", str(out), "--preset", "tiny",
                         "data.valid_fraction=0"]) == 0
    manifest = {m[S.ID]: m for m in pq.read_table(out / S.MANIFEST_FILE).to_pylist()}
    assert len(manifest) == len(rows)
    for r in rows:
        m = manifest[r["id"]]
        assert (m[S.LANGUAGE], m[S.TRANSCRIPT], m[S.SPEAKER]) == (r["language"], r["transcript"], r["speaker"])
    summary = json.loads((out / S.SUMMARY_FILE).read_text())
    assert set(summary["splits"]["train"]["languages"]) == {"de", "fr", "es"}


@pytest.mark.skipif(not (shutil.which("espeak-ng") or shutil.which("flite")), reason="no TTS engine installed")
def test_corpus_has_files_transcripts_and_held_out_voices(tmp_path: Path) -> None:
    assert main(["--output", str(tmp_path), "--minutes", "0.3"]) == 0
    with open(tmp_path / "transcripts.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows and set(rows[0]) == {"id", "path", "transcript", "speaker"}
    seconds = 0.0
    for row in rows:
        info = sf.info(str(tmp_path / row["path"]))
        assert info.channels == 1 and info.duration > 0.5 and row["transcript"]
        assert row["id"] == row["path"].removesuffix(".wav")
        seconds += info.duration
    assert seconds >= 0.3 * 60
    assert len({r["speaker"] for r in rows}) > 4
    with open(tmp_path / "speakers.tsv") as f:
        speakers = list(csv.DictReader(f, delimiter="\t"))
    assert any(s["heldout"] == "true" for s in speakers) and any(s["heldout"] == "false" for s in speakers)
    assert {s["speaker"] for s in speakers} <= {v.name for v in VOICES}
    assert "language" not in rows[0] and "language" not in speakers[0], "the English corpus is as it always was"
    assert main(["--output", str(tmp_path / "x"), "--minutes", "0"]) == 1


def test_the_kept_transcripts_are_a_seeded_share_of_the_ids() -> None:
    """Over 4000 ids the kept share is within 0.03 of the fraction (4 standard deviations
    of a fair draw: 0.029); the choice depends on the id and the seed alone."""
    ids = [f"wav/s{i % 7}/s{i % 7}-{i:05d}" for i in range(4000)]
    kept = [keeps_transcript(u, 0.3, seed=0) for u in ids]
    assert sum(kept) / len(ids) == pytest.approx(0.3, abs=0.03)
    assert kept == [keeps_transcript(u, 0.3, seed=0) for u in reversed(ids)][::-1]
    assert kept != [keeps_transcript(u, 0.3, seed=1) for u in ids]
    assert all(keeps_transcript(u, 1.0) for u in ids) and not any(keeps_transcript(u, 0.0) for u in ids)
    assert main(["--output", "/nonexistent/never", "--labelled-fraction", "1.5"]) == 1


@needs_espeak
def test_a_partly_labelled_corpus_prepares_with_empty_transcripts_and_mixes(tmp_path: Path, ray_local: None) -> None:
    """``labelled_fraction=0.5``: the training speakers' utterances keep their transcript
    exactly where :func:`keeps_transcript` says so, the held-out speaker's all of theirs;
    ``jobs.prepare`` writes the others' as empty, its summary still reads, and the training
    input finds both kinds to mix."""
    from jobs.prepare import main as prepare_main
    from pipeline.config import DataConfig
    from pipeline.data import storage
    from pipeline.data.loader import labelled_rows, plan_resampling, read_dataset_info

    voices = [v for v in VOICES if v.name in ("espeak-us-m1", "espeak-us-f2", "espeak-us-f5")]
    assert [v.heldout for v in voices] == [False, False, True]
    corpus = tmp_path / "corpus"
    stats = make_corpus(corpus, minutes=0.5, voices=voices, workers=2, labelled_fraction=0.5, progress=lambda _: None)
    with open(corpus / "transcripts.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    held = [r for r in rows if r["speaker"] == "espeak-us-f5"]
    trained = [r for r in rows if r["speaker"] != "espeak-us-f5"]
    assert held and all(r["transcript"] for r in held)
    assert [bool(r["transcript"]) for r in trained] == [keeps_transcript(r["id"], 0.5) for r in trained]
    assert 0 < sum(bool(r["transcript"]) for r in trained) < len(trained)
    assert stats["labelled"] == sum(bool(r["transcript"]) for r in rows)

    out = tmp_path / "shards"
    assert prepare_main(["--input", str(corpus), "--output", str(out), "--preset", "tiny",
                         "data.valid_fraction=0"]) == 0
    manifest = {m[S.ID]: m[S.TRANSCRIPT] for m in pq.read_table(out / S.MANIFEST_FILE).to_pylist()}
    assert manifest == {r["id"]: r["transcript"] for r in rows}  # the empty ones stay empty (not blank text)
    info = read_dataset_info(str(out))
    assert info.summary["splits"]["train"]
    assert labelled_rows(pq.read_table(out / S.MANIFEST_FILE).column(S.TRANSCRIPT)).sum() == stats["labelled"]
    cfg = DataConfig(train_uri=str(out), min_sample_size=0, labelled_ratio=0.5)
    share = stats["labelled"] / len(rows)  # one language: every row counts once
    assert plan_resampling(cfg, info, "train", storage.Storage.for_data(cfg)).labels == \
        pytest.approx((0.5 / share, 0.5 / (1 - share)))
