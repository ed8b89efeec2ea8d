"""Stages 1 and 2 of prepare without Ray: every path listed once with its verdict, ids unique
by construction, sidecars read the way spreadsheet tools write them."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.data import hostile as H
from pipeline.data.listing import assign_ids, audio_extension, list_input
from pipeline.data.sidecar import match, parse_sidecar


def write_names(root: Path) -> None:
    for case in H.name_cases():
        path = root / case.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(case.data)


def test_every_audio_path_is_listed_once_with_what_stops_it(tmp_path: Path) -> None:
    root = tmp_path / "in"
    expected = H.write_link_cases(root, tmp_path / "outside")
    write_names(root)
    listing = list_input(str(root))
    rels = [e.rel for e in listing.entries]
    assert len(rels) == len(set(rels))
    by_rel = {e.rel: e for e in listing.entries}
    names = {c.rel: c for c in H.name_cases()}
    assert set(by_rel) == set(expected) | {r for r, c in names.items() if c.id is not None}
    for rel, reason in expected.items():
        problem = by_rel[rel].problem
        assert (problem.reason if problem else None) == reason, (rel, problem)
        if problem:
            assert problem.detail
    # the loop and the second link to links/real are walked once; a.wav is listed once
    assert sorted(listing.repeated_dirs) == ["links/alias", "links/loop"]
    assert sum(r.startswith("links/") and r.endswith("/a.wav") for r in rels) == 1
    assert "same file as 'links/real/a.wav'" in by_rel["links/ln.wav"].problem.detail
    assert listing.not_audio == {"": 2, ".md": 1, ".textgrid": 1, ".txt": 2}  # dangling.txt is a name too


def test_ids_are_unique_by_construction() -> None:
    rels = ["a/y.wav", "a/y.flac", "a/y.wav.ogg", "a/z.wav", ".wav", "b/.flac", "b/UP.WAV", "c/x.wav", "c/x.wav.flac",
            "d/e\u0301.wav"]
    ids = assign_ids(rels)
    # c/x.wav keeps its short id: only the other file's would have been "c/x.wav"
    assert ids == ["a/y.wav", "a/y.flac", "a/y.wav.ogg", "a/z", ".wav", "b/.flac", "b/UP", "c/x",
                   "c/x.wav.flac", "d/\u00e9"]
    assert len(set(ids)) == len(ids)
    with pytest.raises(ValueError, match=r"'d/\u00e9.wav' and 'd/e\u0301.wav'"):
        assign_ids(["d/\u00e9.wav", "d/e\u0301.wav"])


def test_audio_extensions_in_any_case_and_without_a_stem() -> None:
    assert audio_extension(".wav") == ".wav"
    assert audio_extension("A.FLAC") == ".flac"
    assert audio_extension("x.aifc") == ".aifc"
    assert audio_extension("x.wav.txt") is None and audio_extension("wav") is None


def _rows(*lines: str) -> str:
    return "\n".join(["path\ttranscript\tspeaker", *lines])


@pytest.mark.parametrize("encode", [
    lambda t: t.encode(),
    lambda t: codecs.BOM_UTF8 + t.replace("\n", "\r\n").encode(),  # Excel, "CSV UTF-8"
    lambda t: t.replace("\n", "\r").encode(),  # classic Mac line ends
    lambda t: codecs.BOM_UTF16_LE + t.replace("\n", "\r\n").encode("utf-16-le"),  # Excel, "Unicode text"
], ids=["utf8", "bom_crlf", "cr", "utf16"])
def test_sidecars_as_spreadsheets_write_them(encode: Callable[[str], bytes]) -> None:
    text = _rows("a/b.wav\thello\tspk1", "a/c.wav\t\"say \"\"hi\"\"\"\tspk2", "", "a/d.wav\tlast\tspk3\t\t")
    sidecar = parse_sidecar(encode(text), "t.tsv")
    labels, report = match(sidecar, ["a/b.wav", "a/c.wav", "a/d.wav"], ["a/b", "a/c", "a/d"])
    assert [(x.transcript, x.speaker) for x in labels] == [("hello", "spk1"), ('say "hi"', "spk2"), ("last", "spk3")]
    assert report["rows_unmatched"] == 0 and report["files_without_row"] == 0


@pytest.mark.parametrize("text", [
    'path,transcript,speaker\r\na\\b.wav,"hello, world",spk1\r\n"a/c.wav","say ""hi""",spk2\r\n',
    'Path;Transcript;Speaker\na/b.wav;hello, world;spk1\na/c.wav;"say ""hi""";spk2\na/d.wav;"two\nlines";spk3\n',
], ids=["csv_windows_paths", "semicolons"])
def test_csv_sidecars_as_excel_writes_them(text: str) -> None:
    sidecar = parse_sidecar(codecs.BOM_UTF8 + text.encode(), "t.csv")
    labels, report = match(sidecar, ["a/b.wav", "a/c.wav"], ["a/b", "a/c"])
    assert [(x.transcript, x.speaker) for x in labels] == [("hello, world", "spk1"), ('say "hi"', "spk2")]
    assert report["rows_unmatched"] == text.count("a/d.wav")
    assert report["rows_unmatched_examples"] == (["line 4: a/d.wav"] if "a/d.wav" in text else [])


def test_sidecar_keys_match_in_nfc_and_the_rest_is_reported() -> None:
    sidecar = parse_sidecar(H.name_sidecar(), "names.tsv")
    readable = [c for c in H.name_cases() if c.id is not None]
    labels, report = match(sidecar, [c.rel for c in readable], [c.id for c in readable])
    for case, label in zip(readable, labels, strict=True):
        assert (label.transcript if label else None) == case.transcript, case.rel
    assert report["rows_unmatched"] == H.NAME_SIDECAR_UNMATCHED
    assert report["rows_duplicate"] == H.NAME_SIDECAR_DUPLICATE
    assert report["rows_unmatched_examples"] == ["line 12: names/missing.wav", "line 13: names/a/y"]
    assert report["files_without_row"] == sum(c.transcript is None for c in readable)


def test_a_sidecar_that_is_not_a_table_is_an_error_naming_the_line() -> None:
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        parse_sidecar("path\ttranscript\na/b.wav\tcaf\u00e9\n".encode("latin-1"), "x.tsv")
    with pytest.raises(ValueError, match="must name 'path' or 'id'"):
        parse_sidecar(b"file,text\na.wav,hi\n", "x.tsv")
    with pytest.raises(ValueError, match="line 3: 2 columns, the header has 3"):
        parse_sidecar(_rows("a.wav\thi\ts", "b.wav\tho").encode(), "x.tsv")
