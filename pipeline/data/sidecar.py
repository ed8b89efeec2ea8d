"""Stage 2 of ``prepare``: transcripts and speakers from a sidecar table, matched to the files.

The sidecar is a table whose header names ``path`` (relative to the input root) and/or
``id``, and any of ``transcript``, ``speaker`` and ``language``; other columns are ignored. It is read the
way spreadsheet tools and scripts write it: tab-separated, or comma- or semicolon-separated
(CSV as Excel writes it in English or in European locales); UTF-8 with or without a
byte-order mark, UTF-16 with one (Excel's "Unicode text"); CRLF, LF or CR line ends;
cells quoted because they hold a quote or a separator (``"a ""b"" c"``). Keys match in
Unicode NFC and with ``/`` for a backslash, so a name macOS wrote in NFD, or a path typed on
Windows, finds its row.

Nothing is dropped in silence: rows that match no file, files that match no row and
rows repeating an earlier key are counted in the summary, with examples.
"""

from __future__ import annotations

import codecs
import csv
import io
import posixpath
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pipeline.data import storage

EXAMPLES = 10
"""Unmatched rows and files named in the summary (the counts are complete)."""


@dataclass(frozen=True)
class Label:
    transcript: str | None
    speaker: str | None
    line: int
    """Line of the sidecar it came from."""
    language: str | None = None
    """The row's ``language`` cell, trimmed; None where the column is absent or the cell empty
    (the folder or ``data.prepare_language`` may name it then)."""


@dataclass
class Sidecar:
    uri: str
    labels: dict[str, Label]
    """By key: a path (normalised) or an id, in NFC."""
    rows: list[tuple[int, str]]
    """``(line, first key)`` of every row, for the report."""
    duplicates: list[int]
    """Lines whose key an earlier row already had (the earlier row wins)."""


def key_of(text: str, *, path: bool) -> str:
    """How a sidecar key and a file are compared: NFC, trimmed, paths with ``/`` and without ``./``."""
    key = unicodedata.normalize("NFC", text.strip())
    return posixpath.normpath(key.replace("\\", "/")) if path and key else key


def read_sidecar(uri: str, store: storage.Storage | None = None) -> Sidecar:
    """The sidecar at ``uri`` (local or s3://); ValueError naming the file and line when it
    cannot be read as a table."""
    return parse_sidecar(storage.read_bytes(uri, store), uri)


def decode_text(data: bytes, uri: str) -> str:
    """Text of a sidecar as spreadsheet tools save it: UTF-8 (with or without a byte-order
    mark) or UTF-16 with a byte-order mark."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"sidecar {uri}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8 "
            "(spreadsheets: 'CSV UTF-8' or 'Unicode text')"
        ) from None


def _cell(text: str) -> str:
    """A cell as written, or unquoted when it is a whole quoted cell (``"a ""b"" c"``)."""
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1].replace('""', ""):
        return text[1:-1].replace('""', '"')
    return text


def _table(text: str) -> list[tuple[int, list[str]]]:
    """``(line, cells)`` of every row: tab-separated lines, or CSV when the header has no tab."""
    header = re.split(r"\r\n|\n|\r", text, maxsplit=1)[0]
    if "\t" in header or ("," not in header and ";" not in header):
        return [(n, [_cell(c) for c in line.split("\t")])
                for n, line in enumerate(re.split(r"\r\n|\n|\r", text), start=1)]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=";" if header.count(";") > header.count(",") else ",")
    rows, line = [], 1
    for cells in reader:
        rows.append((line, cells))
        line = reader.line_num + 1
    return rows


def parse_sidecar(data: bytes, uri: str) -> Sidecar:
    rows = _table(decode_text(data, uri))
    header = [c.strip().strip("\ufeff").lower() for c in rows[0][1]] if rows else []
    keys = [k for k in ("path", "id") if k in header]
    if not keys or not ({"transcript", "speaker", "language"} & set(header)):
        raise ValueError(f"sidecar {uri}: header {rows[0][1] if rows else []} must name 'path' or 'id', and "
                         "'transcript', 'speaker' and/or 'language' (tab-, comma- or semicolon-separated)")
    col = {name: header.index(name) for name in header}
    labels: dict[str, Label] = {}
    listed: list[tuple[int, str]] = []
    duplicates: list[int] = []
    for line_no, cells in rows[1:]:
        while len(cells) > len(header) and not cells[-1].strip():
            cells.pop()  # empty cells a spreadsheet adds past the last column
        if all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise ValueError(f"sidecar {uri}, line {line_no}: {len(cells)} columns, the header has {len(header)}")
        label = Label(
            transcript=cells[col["transcript"]] if "transcript" in col else None,
            speaker=cells[col["speaker"]].strip() if "speaker" in col else None,
            line=line_no,
            language=(cells[col["language"]].strip() or None) if "language" in col else None,
        )
        row_keys = [key_of(cells[col[k]], path=k == "path") for k in keys]
        listed.append((line_no, row_keys[0]))
        if any(k in labels for k in row_keys if k):
            duplicates.append(line_no)
            continue
        for k in row_keys:
            if k:
                labels[k] = label
    return Sidecar(uri=uri, labels=labels, rows=listed, duplicates=duplicates)


def match(sidecar: Sidecar | None, rels: list[str], ids: list[str]) -> tuple[list[Label | None], dict[str, Any] | None]:
    """Each file's label (by its path, then its id) and the summary's report of what matched."""
    if sidecar is None:
        return [None] * len(rels), None
    found: list[Label | None] = []
    used: set[int] = set()
    for rel, utt in zip(rels, ids, strict=True):
        label = sidecar.labels.get(key_of(rel, path=True)) or sidecar.labels.get(utt)
        found.append(label)
        if label is not None:
            used.add(label.line)
    duplicate = set(sidecar.duplicates)
    unmatched = [(line, key) for line, key in sidecar.rows if line not in used and line not in duplicate]
    without = [rel for rel, label in zip(rels, found, strict=True) if label is None]
    report = {
        "uri": sidecar.uri,
        "rows": len(sidecar.rows),
        "rows_matched": len(used),
        "rows_unmatched": len(unmatched),
        "rows_unmatched_examples": [f"line {line}: {key}" for line, key in unmatched[:EXAMPLES]],
        "rows_duplicate": len(sidecar.duplicates),
        "files_without_row": len(without),
        "files_without_row_examples": without[:EXAMPLES],
    }
    return found, report
