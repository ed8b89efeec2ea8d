"""The demo corpus: synthesised speech with transcripts, made here, ready for prepare."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from jobs.demo_corpus import main
from pipeline.data.demo_corpus import VOICES, sentences


def test_sentences_are_distinct_plain_text_and_reproducible() -> None:
    a = sentences(300, seed=1)
    assert len(set(a)) == 300 and a == sentences(300, seed=1) and a != sentences(300, seed=2)
    assert all(s == s.lower() and set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in a)


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
    assert main(["--output", str(tmp_path / "x"), "--minutes", "0"]) == 1
