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
UTF-8 (an old Latin-1 archive) must be reported, not end the walk; s3:// prefixes
through pyarrow (S3 keys are UTF-8).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

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
    entries: list[Entry]
    """Every path with an audio extension, sorted by ``rel``."""
    not_audio: dict[str, int] = field(default_factory=dict)
    """Other files by extension (lower case; ``""`` for none)."""
    repeated_dirs: list[str] = field(default_factory=list)
    """Directories reached again through a link (a loop, or two links to one directory):
    walked once, under their first path."""
    unreadable_dirs: list[str] = field(default_factory=list)
    """``"<rel>: <why>"`` for directories that could not be listed."""


def audio_extension(name: str) -> str | None:
    """The audio extension ``name`` ends with (lower case), or None."""
    lower = name.lower()
    return next((e for e in _EXTENSIONS if lower.endswith(e)), None)


def strip_audio_extension(rel: str) -> str:
    ext = audio_extension(rel)
    return rel[: len(rel) - len(ext)] if ext else rel


def list_input(input_uri: str, store: storage.Storage | None = None) -> Listing:
    """Everything under ``input_uri`` (a directory or s3:// prefix); raises ValueError when it
    is missing or a file."""
    fs, root = storage.resolve(input_uri, store)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"--input: {input_uri!r} does not exist")
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"--input: {input_uri!r} is a file; expected a directory or prefix of audio files")
    listing = _walk_s3(fs, root) if storage.is_s3(input_uri) else _walk_local(root)
    listing.entries.sort(key=lambda e: e.rel)
    listing.not_audio = dict(sorted(listing.not_audio.items()))
    return listing


def _other_extension(name: str) -> str:
    ext = posixpath.splitext(name)[1].lower()
    return ext if ext != name.lower() else ""


def _walk_s3(fs: pafs.FileSystem, root: str) -> Listing:
    out = Listing(entries=[])
    not_audio: Counter[str] = Counter()
    for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if f.type != pafs.FileType.File:
            continue
        rel = storage.relative(root, f.path)
        name = posixpath.basename(rel)
        if audio_extension(name) is None:
            not_audio[_other_extension(name)] += 1
            continue
        out.entries.append(Entry(rel=rel, size=int(f.size or 0), mtime_ns=int(f.mtime_ns or 0)))
    out.not_audio = dict(not_audio)
    return out


@dataclass
class _Found:
    rel: str
    size: int = 0
    mtime_ns: int = 0
    problem: Rejected | None = None
    identity: tuple[int, int] | None = None
    via_link: bool = False


def _walk_local(root: str) -> Listing:
    out = Listing(entries=[])
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
    out.entries = _one_path_per_file(found)
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


def assign_ids(rels: list[str]) -> list[str]:
    """Utterance ids, unique by construction: the relative path without its audio extension,
    in Unicode NFC (macOS writes names in NFD; a corpus keeps its ids wherever it is copied).

    The whole path is the id where the short one would be ambiguous: two files with one
    stem (``a/y.wav``, ``a/y.flac``), a stem that is another file's path (``a/y.wav.ogg``
    beside ``a/y.wav``), or no stem (a file named ``.wav``). Two paths that are one name
    once normalised are an error naming both, raised before anything is converted.
    """
    norm = [unicodedata.normalize("NFC", r) for r in rels]
    by_norm: dict[str, str] = {}
    for rel, n in zip(rels, norm, strict=True):
        if n in by_norm:
            raise ValueError(f"--input: {by_norm[n]!r} and {rel!r} are the same name written in two Unicode "
                             "forms (NFC and NFD), so they would get one id; rename one of them")
        by_norm[n] = rel
    stems = [strip_audio_extension(n) for n in norm]
    counts = Counter(stems)
    ids = [s if s and not s.endswith("/") and counts[s] == 1 and s not in by_norm else n
           for n, s in zip(norm, stems, strict=True)]
    owner: dict[str, str] = {}
    for rel, utt in zip(rels, ids, strict=True):
        if utt in owner:  # cannot happen by the rule above; a transcript landing on the wrong file would be worse
            raise ValueError(f"--input: {owner[utt]!r} and {rel!r} would get the same id {utt!r}")
        owner[utt] = rel
    return ids
