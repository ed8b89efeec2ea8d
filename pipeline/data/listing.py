"""Stage 1 of ``prepare``: what is under the input root, and what each audio file is called.

- Every path with an audio extension (any case; a file named just ``.wav`` is one) is an
  :class:`Entry` and ends in the manifest or the rejects exactly once. What stops one
  from being read is known here already, and it becomes a reject with a reason rather
  than an error that ends the run: a name that is not UTF-8, a link to nothing, a
  second path to a file already listed, a pipe.
- Everything else is counted by extension for the summary, so a corpus of ``.m4a`` files
  shows up as such instead of as "no audio".
- Local directories are walked with their links followed, each physical directory once,
  so a link loop cannot list a file dozens of times; each physical file is listed under
  one path (a real path before a link to it) and the other paths to it are rejected as
  duplicates, so it is read once. Real directories are walked before linked ones.
- :func:`assign_ids` gives ids that are unique by construction.

Local directories are walked with ``os.scandir`` on bytes, since a name that is not
UTF-8 (an old Latin-1 archive) must be reported, not end the walk. s3:// prefixes are
listed a page of 1,000 keys at a time (``ListObjectsV2``, in key order); given a
``resume_uri``, every ten pages are saved there as they come, so a listing of millions of
keys cut short (the job killed, the store gone for longer than ``data.s3_retry_seconds``)
continues after its last saved key instead of from the start.

The listing is held as one Arrow table (:data:`LISTING_SCHEMA`, about 100 bytes a file
for typical paths) rather than an object per file: 10^7 files fit in a driver's memory.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import stat
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.data import schema as S
from pipeline.data import storage
from pipeline.data.verdicts import (
    REASON_BAD_NAME,
    REASON_BROKEN_LINK,
    REASON_DUPLICATE,
    REASON_NOT_A_FILE,
    REASON_UNREADABLE,
    Rejected,
)

# Longest first, so that ".aifc" is not taken for ".aif" + "c" by a shorter suffix match.
_EXTENSIONS = sorted(S.AUDIO_EXTENSIONS, key=len, reverse=True)
_EXTENSIONS_B = [e.encode() for e in _EXTENSIONS]
# The same rule for Arrow's regular expressions: anchored at the end, so the alternation
# can only match a whole suffix.
_EXTENSION_RE = r"\.(?:" + "|".join(e[1:] for e in _EXTENSIONS) + ")$"

LISTING_SCHEMA = pa.schema([
    pa.field("rel", pa.string(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("mtime_ns", pa.int64(), nullable=False),
    pa.field(S.REASON, pa.string()),
    pa.field(S.DETAIL, pa.string()),
])
"""One row per path with an audio extension; ``reason``/``detail`` set when the listing
alone says it will not be read."""
KEYS_PER_SAVED_PAGE = 10_000
"""Keys listed between two saves of a resumable s3:// listing."""
LISTING_DONE = "done.json"


@dataclass(frozen=True)
class Entry:
    """One path with an audio extension."""

    rel: str
    """Relative to the input root, ``/``-separated, as listed (a name that is not UTF-8 with
    ``\\x`` escapes)."""
    size: int
    mtime_ns: int
    problem: Rejected | None = None
    """Why it will not be read, when that is known from the listing alone."""


@dataclass
class Listing:
    table: pa.Table
    """Every path with an audio extension, sorted by ``rel`` (:data:`LISTING_SCHEMA`)."""
    not_audio: dict[str, int] = field(default_factory=dict)
    """Other files by extension (lower case; ``""`` for none)."""
    repeated_dirs: list[str] = field(default_factory=list)
    """Directories reached again through a link (a loop, or two links to one directory):
    walked once, under their first path."""
    unreadable_dirs: list[str] = field(default_factory=list)
    """``"<rel>: <why>"`` for directories that could not be listed."""

    @property
    def entries(self) -> list[Entry]:
        """The rows as :class:`Entry` objects (for small listings and tests)."""
        return [
            Entry(rel=r["rel"], size=r["size"], mtime_ns=r["mtime_ns"],
                  problem=Rejected(r[S.REASON], r[S.DETAIL]) if r[S.REASON] else None)
            for r in self.table.to_pylist()
        ]

    @property
    def readable(self) -> pa.Table:
        """The rows the listing found no problem with."""
        return self.table.filter(pc.is_null(self.table.column(S.REASON)))

    @property
    def rejected(self) -> pa.Table:
        return self.table.filter(pc.is_valid(self.table.column(S.REASON)))


def _table(entries: list[Entry]) -> pa.Table:
    return pa.table({
        "rel": [e.rel for e in entries], "size": [e.size for e in entries], "mtime_ns": [e.mtime_ns for e in entries],
        S.REASON: [e.problem.reason if e.problem else None for e in entries],
        S.DETAIL: [e.problem.detail if e.problem else None for e in entries],
    }, schema=LISTING_SCHEMA)


def audio_extension(name: str) -> str | None:
    """The audio extension ``name`` ends with (lower case), or None."""
    lower = name.lower()
    return next((e for e in _EXTENSIONS if lower.endswith(e)), None)


def list_input(
    input_uri: str, store: storage.Storage | None = None, *, resume_uri: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Listing:
    """Everything under ``input_uri`` (a directory or s3:// prefix); raises ValueError when it
    is missing or a file.

    ``resume_uri``: where an s3:// listing saves its pages as it goes and finds those of an
    earlier call that was cut short (see the module's docstring); local walks take seconds
    and are not saved.
    """
    fs, root = storage.resolve(input_uri, store)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"--input: {input_uri!r} does not exist")
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"--input: {input_uri!r} is a file; expected a directory or prefix of audio files")
    if storage.is_s3(input_uri):
        listing = _list_s3(input_uri, store, resume_uri, progress or (lambda _: None))
    else:
        listing = _walk_local(root)
    listing.table = listing.table.take(pc.sort_indices(listing.table, [("rel", "ascending")]))
    listing.not_audio = dict(sorted(listing.not_audio.items()))
    return listing


def _other_extension(name: str) -> str:
    ext = posixpath.splitext(name)[1].lower()
    return ext if ext != name.lower() else ""


def _list_s3(input_uri: str, store: storage.Storage | None, resume_uri: str | None,
             progress: Callable[[str], None]) -> Listing:
    """The keys under an s3:// prefix, page by page, saved to and resumed from ``resume_uri``."""
    saved: list[str] = []
    after = ""
    not_audio: Counter[str] = Counter()
    if resume_uri:
        if storage.exists(storage.join(resume_uri, LISTING_DONE), store):
            done = storage.read_json(storage.join(resume_uri, LISTING_DONE), store)
            progress(f"prepare: listing of {input_uri} taken from the interrupted run ({done['keys']} keys)")
            tables = [storage.read_table(storage.join(resume_uri, name), None, store) for name in done["pages"]]
            return Listing(table=_concat(tables), not_audio=dict(done["not_audio"]))
        saved = sorted(i.base_name for i in storage.list_dir(resume_uri, store) if i.base_name.startswith("page-"))
    tables = []
    for name in saved:
        table = storage.read_table(storage.join(resume_uri or "", name), None, store)
        meta = json.loads(table.schema.metadata[b"wavray"])
        after = meta["last_key"]
        not_audio.update(meta["not_audio"])
        tables.append(table.replace_schema_metadata(None))
    if saved:
        progress(f"prepare: listing {input_uri} resumes after {after!r} ({sum(t.num_rows for t in tables)} "
                 "audio keys listed before)")
    keys = sum(not_audio.values()) + sum(t.num_rows for t in tables)
    rows: list[tuple[str, int, int]] = []
    page_not_audio: Counter[str] = Counter()

    def save(last_key: str) -> None:
        table = pa.table({"rel": [r[0] for r in rows], "size": [r[1] for r in rows],
                          "mtime_ns": [r[2] for r in rows], S.REASON: pa.nulls(len(rows), pa.string()),
                          S.DETAIL: pa.nulls(len(rows), pa.string())}, schema=LISTING_SCHEMA)
        if resume_uri:
            name = f"page-{len(saved):07d}.parquet"
            meta = {"last_key": last_key, "not_audio": dict(page_not_audio)}
            storage.write_table(storage.join(resume_uri, name),
                                table.replace_schema_metadata({"wavray": json.dumps(meta)}), store)
            saved.append(name)
        tables.append(table)
        not_audio.update(page_not_audio)
        rows.clear()
        page_not_audio.clear()

    last = after
    pending = 0
    for page in storage.list_keys(input_uri, store, start_after=after):
        for rel, size, mtime_ns in page:
            name = posixpath.basename(rel)
            if audio_extension(name) is None:
                page_not_audio[_other_extension(name)] += 1
            else:
                rows.append((rel, size, mtime_ns))
            last = rel
        keys += len(page)
        pending += len(page)
        if pending >= KEYS_PER_SAVED_PAGE:
            save(last)
            pending = 0
            progress(f"prepare: listed {keys} keys under {input_uri}")
    if rows or page_not_audio or not tables:
        save(last)
    if resume_uri:
        storage.write_json(storage.join(resume_uri, LISTING_DONE),
                           {"keys": keys, "pages": saved, "not_audio": dict(not_audio)}, store)
    return Listing(table=_concat(tables), not_audio=dict(not_audio))


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables).combine_chunks() if tables else LISTING_SCHEMA.empty_table()


@dataclass
class _Found:
    rel: str
    size: int = 0
    mtime_ns: int = 0
    problem: Rejected | None = None
    identity: tuple[int, int] | None = None
    via_link: bool = False


def _walk_local(root: str) -> Listing:
    out = Listing(table=LISTING_SCHEMA.empty_table())
    not_audio: Counter[str] = Counter()
    found: list[_Found] = []
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}
    real: list[tuple[bytes, bytes]] = [(os.fsencode(root), b"")]
    linked: list[tuple[bytes, bytes]] = []
    while real or linked:
        # Real directories first: a directory reached by a real path and by a link is
        # walked under its real path, whatever the names sort like.
        if real:
            path, rel = real.pop()
        else:
            path, rel = linked.pop(0)
            if not _first_visit(path, seen):
                out.repeated_dirs.append(_show(rel))
                continue
        try:
            with os.scandir(path) as it:
                children = sorted(it, key=lambda e: e.name, reverse=True)  # popped in name order
        except OSError as e:
            out.unreadable_dirs.append(f"{_show(rel) or '.'}: {e.strerror or e}")
            continue
        for child in children:
            child_rel = rel + b"/" + child.name if rel else child.name
            if _is_dir(child):
                if child.is_symlink():
                    linked.append((child.path, child_rel))
                elif _first_visit(child.path, seen):
                    real.append((child.path, child_rel))
                else:
                    out.repeated_dirs.append(_show(child_rel))
                continue
            name = _show(child.name)
            if audio_extension(name) is None:
                not_audio[_other_extension(name)] += 1
                continue
            found.append(_describe(child, child_rel))
        linked.sort(key=lambda d: d[1])
    out.table = _table(_one_path_per_file(found))
    out.not_audio = dict(not_audio)
    return out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _first_visit(path: bytes, seen: set[tuple[int, int]]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return False
    seen.add(key)
    return True


def _show(name: bytes) -> str:
    """A name as text: itself when it is UTF-8, else with ``\\x`` escapes for the bytes that are not."""
    return name.decode("utf-8", "backslashreplace")


def _describe(entry: os.DirEntry, rel: bytes) -> _Found:
    """What the listing knows about one file with an audio extension."""
    try:
        text = rel.decode("utf-8")
        problem = None
    except UnicodeDecodeError:
        text = _show(rel)
        problem = Rejected(REASON_BAD_NAME, "its name is not valid UTF-8 (shown with \\x escapes); rename it, "
                                            "e.g. with convmv, to UTF-8")
    link = entry.is_symlink()
    try:
        st = entry.stat(follow_symlinks=True)
    except OSError as e:
        if not link:
            return _Found(text, problem=problem or Rejected(REASON_UNREADABLE, f"cannot be read: {e.strerror or e}"))
        try:
            target = os.fsdecode(os.readlink(entry.path))
        except OSError:
            target = "?"
        why = "which leads back to itself" if e.errno == errno.ELOOP else "which does not exist"
        return _Found(text, problem=problem or Rejected(REASON_BROKEN_LINK, f"a symbolic link to {target!r}, {why}"))
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        problem = problem or Rejected(REASON_NOT_A_FILE, f"{kind}, not a file: it is not read")
    return _Found(text, size=st.st_size, mtime_ns=st.st_mtime_ns, problem=problem,
                  identity=(st.st_dev, st.st_ino), via_link=link)


def _one_path_per_file(found: list[_Found]) -> list[Entry]:
    """One path per physical file is read; the others are duplicates naming it. The one read
    is a path without problems, a real path before a link, then the first by name."""
    keeper: dict[tuple[int, int], str] = {}
    for f in sorted(found, key=lambda f: (f.problem is not None, f.via_link, f.rel)):
        if f.identity is not None and f.problem is None:
            keeper.setdefault(f.identity, f.rel)
    entries = []
    for f in found:
        problem = f.problem
        first = keeper.get(f.identity) if f.identity is not None else None
        if problem is None and first is not None and first != f.rel:
            problem = Rejected(REASON_DUPLICATE, f"the same file as {first!r} (a link to it): read once, there")
        entries.append(Entry(rel=f.rel, size=f.size, mtime_ns=f.mtime_ns, problem=problem))
    return entries


def extensions(rels: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The audio extension of each path, lower case ("" for none): :func:`audio_extension`
    over a column."""
    found = pc.extract_regex(pc.utf8_lower(rels), "(?P<ext>" + _EXTENSION_RE + ")")
    return pc.fill_null(pc.struct_field(found, [0]), "")


def assign_ids(rels: list[str]) -> list[str]:
    """:func:`assign_id_column` for a list of paths."""
    return assign_id_column(pa.array(rels, pa.string())).to_pylist()


def assign_id_column(rels: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Utterance ids, unique by construction: the relative path without its audio extension,
    in Unicode NFC (macOS writes names in NFD; a corpus keeps its ids wherever it is copied).

    The whole path is the id where the short one would be ambiguous: two files with one
    stem (``a/y.wav``, ``a/y.flac``), a stem that is another file's path (``a/y.wav.ogg``
    beside ``a/y.wav``), or no stem (a file named ``.wav``). Two paths that are one name
    once normalised are an error naming both, raised before anything is converted.
    """
    norm = _nfc(rels)
    twice = _repeated(norm)
    if len(twice):
        first = pc.indices_nonzero(pc.equal(norm, twice[0])).to_pylist()
        a, b = (rels[i].as_py() for i in first[:2])
        raise ValueError(f"--input: {a!r} and {b!r} are the same name written in two Unicode "
                         "forms (NFC and NFD), so they would get one id; rename one of them")
    stems = pc.replace_substring_regex(norm, pattern="(?i)" + _EXTENSION_RE, replacement="")
    shared = pc.is_in(stems, value_set=_repeated(stems))
    short = pc.and_(pc.and_(pc.not_equal(stems, ""), pc.invert(pc.ends_with(stems, "/"))),
                    pc.invert(pc.or_(shared, pc.is_in(stems, value_set=norm))))
    ids = pc.if_else(short, stems, norm)
    if len(_repeated(ids)):  # cannot happen by the rule above; a transcript landing on the wrong file would be worse
        raise ValueError(f"--input: two files would get the same id {_repeated(ids)[0].as_py()!r}")
    return ids


def _nfc(values: pa.Array | pa.ChunkedArray, rows: int = 1 << 16) -> pa.Array:
    """Unicode NFC of each string, a chunk at a time (Arrow's ``utf8_normalize`` leaves some
    decomposed names as they are, so Python's is used; ASCII names are already NFC)."""
    out = []
    for start in range(0, len(values), rows):
        chunk = values.slice(start, rows)
        if isinstance(chunk, pa.ChunkedArray):
            chunk = chunk.combine_chunks()
        if pc.all(pc.string_is_ascii(chunk)).as_py() is not False:
            out.append(chunk)
            continue
        out.append(pa.array([v if v.isascii() else unicodedata.normalize("NFC", v) for v in chunk.to_pylist()],
                            pa.string()))
    return pa.chunked_array(out, pa.string()).combine_chunks()


def _repeated(values: pa.Array) -> pa.Array:
    """The values that occur more than once."""
    counts = pc.value_counts(values)
    return counts.field(0).filter(pc.greater(counts.field(1), 1))
