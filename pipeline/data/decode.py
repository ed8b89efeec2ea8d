"""The samples of one audio file as float64 blocks: libsndfile first, helped over the valid
files it misreads, then PyAV (ffmpeg) for the ones it refuses.

:func:`open_streams` turns a file's bytes (or a seekable stream) into one or more
:class:`Stream` s; each decodes from the start every time it is asked, so the converter
can take a second pass when the first one shows the plan was wrong (a down-mix that
cancels, a level above full scale).

What libsndfile gets wrong on valid files, and what is done about it here:

- a WAV whose data chunk size is a streaming marker (0 or 0xFFFFFFFF: the recorder never
  went back to fill it in) reads as empty or as cut off;
- a WAV with a malformed chunk before the audio (a size running past the next chunk or
  the end of the file, an odd size without its pad byte, ``fmt`` after ``data``) is
  refused outright. Both are read through a rebuilt header in front of the untouched
  audio bytes (:class:`_Spliced`), so nothing is copied;
- a FLAC whose STREAMINFO leaves the length at 0 ("unknown", as the format allows)
  reports 2^63 frames and fails in the seek soundfile makes after every read: blocks are
  read through libsndfile's own read call, which does not seek, and the length counts as
  unknown;
- a chained Ogg (several streams one after another: concatenated recordings, radio rips)
  decodes only its first link: each link is decoded on its own, in order.

A file libsndfile cannot open after that goes to PyAV before it is called unreadable.
Whatever is wrong is said in the user's terms (:func:`user_terms`), never as a decoder's
internals.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import soundfile as sf

from pipeline.data.verdicts import (
    REASON_DECODE_ERROR,
    REASON_NO_SAMPLES,
    REASON_TRUNCATED,
    REASON_UNREADABLE,
    Unusable,
)

BLOCK_FRAMES = 1 << 18
# A header that claims more frames than the decoder delivers by more than this is lying,
# or the data was cut.
TRUNCATION_TOLERANCE = 0.01
# libsndfile's "length unknown" (FLAC with total_samples 0).
_UNKNOWN_FRAMES = 2**62
# How far into a file the RIFF chunk walk looks for the audio (headers with long metadata
# chunks before it still fit).
_HEAD_BYTES = 1 << 20
_WAV_MARKERS = (0, 0xFFFFFFFF)
_PCM_WIDTH = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8,
              "ULAW": 1, "ALAW": 1}


@dataclass(frozen=True)
class Stream:
    """One decodable stream of a file (a file has several only when it is a chained Ogg)."""

    rate: int
    channels: int
    frames: int | None
    """Frames its header declares; None when it does not say (streaming marker, FLAC length 0,
    what ffmpeg reads)."""
    what: str
    """How to name it in a message: ``"the WAV audio"``, ``"link 2 of 3 of the chained Ogg"``."""
    decode: Callable[[], Iterator[np.ndarray]]
    """A fresh pass over the samples: float64 blocks of shape (frames, channels)."""


def open_streams(data: bytes | BinaryIO) -> list[Stream]:
    """The streams of a whole file (bytes) or a seekable binary stream; raises :class:`Unusable`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data)
        size = len(data)
        head = data  # the whole file is at hand: a chunk walk may look anywhere
        links = ogg_links(data) if data[:4] == b"OggS" else []
        if any(not link.complete for link in links):
            raise Unusable(REASON_TRUNCATED, "the Ogg stream stops before its last page: the file was cut "
                                             "(an incomplete copy or download)")
        if len(links) > 1:
            return [
                _sndfile_stream(lambda a=link.start, b=link.end: io.BytesIO(data[a:b]), link.end - link.start,
                                what=f"link {i + 1} of {len(links)} of the chained Ogg", seconds=link.seconds)
                for i, link in enumerate(links)
            ]

        def reopen() -> BinaryIO:
            return io.BytesIO(data)
    else:
        links = []  # a stream too big to hold is not walked page by page
        handle = data
        handle.seek(0, io.SEEK_END)
        size = handle.tell()
        handle.seek(0)
        head = handle.read(_HEAD_BYTES)

        def reopen() -> BinaryIO:
            handle.seek(0)
            return handle

    layout = riff_layout(head, size)
    opener = reopen
    if layout is not None and (not layout.regular or layout.marker) and layout.data_length(size) < 0xFFFFFFF0:
        def opener() -> BinaryIO:
            return _Spliced(layout.header(size), reopen(), layout.data_offset, layout.data_length(size))
    try:
        stream = _sndfile_stream(opener, size, seconds=links[0].seconds if links else None)
    except Unusable as refused:
        if refused.rejected.reason != REASON_UNREADABLE:
            raise
        stream = _ffmpeg_stream(reopen, refused)
    if stream.frames == 0:  # a size field left at 0 by a streaming writer (RF64 ds64, ...): ffmpeg reads on
        try:
            stream = _ffmpeg_stream(reopen, Unusable(REASON_NO_SAMPLES, "its header declares no audio"))
        except Unusable:
            pass
    if layout is not None:
        _check_wav_complete(layout, size, stream)
    return [stream]


# --- libsndfile -------------------------------------------------------------------------------


def _sndfile_stream(opener: Callable[[], BinaryIO], size: int, what: str = "", seconds: float | None = None) -> Stream:
    """A stream libsndfile decodes; ``seconds``: the length the container says, when libsndfile
    does not check it (an Ogg's last granule position)."""
    try:
        with sf.SoundFile(opener()) as snd:
            rate, channels, frames = snd.samplerate, snd.channels, snd.frames
            fmt, subtype = snd.format, snd.subtype
            log = snd.extra_info
    except Exception as e:  # libsndfile's errors and anything its Python binding raises
        raise Unusable(REASON_UNREADABLE, user_terms(e)) from None
    known: int | None = frames if 0 <= frames < _UNKNOWN_FRAMES else None
    name = what or f"the {fmt} audio"
    width = _PCM_WIDTH.get(subtype)
    if known is not None and width and fmt not in ("FLAC", "OGG", "MPEG") and known * width * channels > size:
        raise Unusable(REASON_TRUNCATED, f"its header declares more audio than its {size} bytes can hold")
    if fmt in ("RF64", "W64") and _log_says_cut(log):
        raise Unusable(REASON_TRUNCATED, "its data chunk is shorter than its header declares")

    def decode() -> Iterator[np.ndarray]:
        with sf.SoundFile(opener()) as snd:
            decoded = 0
            while True:
                block = np.empty((BLOCK_FRAMES, channels), np.float64)  # (frames, channels)
                try:
                    got = read_into(snd, block)
                    failed = _decoder_error(snd) if got < len(block) else None
                except Exception as e:
                    failed = str(e) or type(e).__name__
                if failed:
                    raise Unusable(REASON_DECODE_ERROR, _corrupt_at(decoded, known, rate, name, RuntimeError(failed)))
                if got <= 0:
                    break
                decoded += got
                yield block[:got]
            if known is not None and decoded < known * (1.0 - TRUNCATION_TOLERANCE):
                raise Unusable(REASON_TRUNCATED, f"decoded {_seconds(decoded, rate)} of the "
                               f"{_seconds(known, rate)} its header declares")
            if seconds is not None and decoded / rate < seconds * (1.0 - TRUNCATION_TOLERANCE):
                raise Unusable(REASON_DECODE_ERROR, f"the audio data is corrupt: decoded {_seconds(decoded, rate)} "
                               f"of the {seconds:.2f} s {name} holds by its page positions")

    return Stream(rate=rate, channels=channels, frames=known, what=name, decode=decode)


# soundfile's read() seeks to the position it computed after every call: on a FLAC of
# unknown length that seek fails, and on any FLAC it costs about as much as decoding a
# second of audio. Reading through libsndfile directly does neither; the fallback keeps
# working should soundfile's internals move.
_RAW_READ = all(hasattr(sf, a) for a in ("_snd", "_ffi")) and hasattr(sf._snd, "sf_readf_double")


def read_into(snd: sf.SoundFile, out: np.ndarray) -> int:
    """Decode up to ``len(out)`` frames into ``out``: float32 or float64, C-contiguous,
    (frames, channels) or (frames,) for mono. Returns the frames decoded."""
    if _RAW_READ:
        read, ctype = ((sf._snd.sf_readf_float, "float *") if out.dtype == np.float32
                       else (sf._snd.sf_readf_double, "double *"))
        return int(read(snd._file, sf._ffi.cast(ctype, out.ctypes.data), len(out)))
    return len(snd.read(len(out), dtype=out.dtype.name, out=out))


def _decoder_error(snd: sf.SoundFile) -> str | None:
    """What libsndfile says went wrong in the last read, if anything."""
    if not _RAW_READ:
        return None
    code = sf._snd.sf_error(snd._file)
    return sf._ffi.string(sf._snd.sf_error_number(code)).decode(errors="replace") if code else None


def _log_says_cut(log: str) -> bool:
    """libsndfile silently shortens a RIFF-family file whose data chunk was cut; its log says so."""
    return any(line.startswith("data") and "should be" in line for line in log.splitlines())


# --- WAV: the chunk walk libsndfile does not forgive ------------------------------------------


@dataclass(frozen=True)
class RiffLayout:
    """Where a RIFF/WAVE (or RF64) file's ``fmt`` and audio are, found by a forgiving chunk walk."""

    fmt: bytes
    data_offset: int
    data_declared: int
    regular: bool
    """Laid out as the format says: libsndfile reads the file as it is."""

    @property
    def marker(self) -> bool:
        """The data size is a streaming marker: the audio runs to the end of the file."""
        return self.data_declared in _WAV_MARKERS

    @property
    def block_align(self) -> int:
        return max(1, struct.unpack_from("<H", self.fmt, 12)[0]) if len(self.fmt) >= 14 else 1

    def data_length(self, size: int) -> int:
        available = max(0, size - self.data_offset)
        if self.marker:
            return available - available % self.block_align
        return min(self.data_declared, available)

    def header(self, size: int) -> bytes:
        """A clean RIFF header (``fmt`` then ``data``) for the audio this file holds."""
        fmt = self.fmt + (b"\0" if len(self.fmt) % 2 else b"")
        n = self.data_length(size)
        body = b"WAVE" + b"fmt " + struct.pack("<I", len(self.fmt)) + fmt + b"data" + struct.pack("<I", n)
        return b"RIFF" + struct.pack("<I", len(body) + n) + body


def _chunk_id(b: bytes) -> bool:
    return len(b) == 4 and all(0x20 <= c <= 0x7E for c in b)


def riff_layout(head: bytes, size: int) -> RiffLayout | None:
    """``fmt`` and ``data`` of a RIFF/WAVE file from its first bytes, or None when it is not one
    or they are not there.

    Forgives what libsndfile refuses: a chunk whose size runs past the next chunk or the
    end of the file, an odd-sized chunk without its pad byte, ``fmt`` after ``data``.
    Where the walk loses its way it takes the first plausible ``fmt `` and ``data``
    headers instead (:func:`_resync`).
    """
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64", b"BW64") or head[8:12] != b"WAVE":
        return None
    pos, fmt, data, regular = 12, None, None, True
    last_odd = False  # whether the chunk before had an odd size (and so a pad byte)
    ds64: int | None = None  # RF64: the real data size, from the ds64 chunk
    while pos + 8 <= len(head) and (fmt is None or data is None):
        cid, n = head[pos:pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if not _chunk_id(cid):
            if last_odd and _chunk_id(head[pos - 1:pos + 3]):
                pos -= 1  # the chunk before has an odd size and no pad byte
                regular, last_odd = False, False
                continue
            return _resync(head, size)
        last_odd = bool(n & 1)
        if cid == b"ds64" and n >= 16 and pos + 24 <= len(head):
            ds64 = struct.unpack_from("<Q", head, pos + 16)[0]
        if cid == b"data":
            if n == 0xFFFFFFFF and ds64 is not None:
                n = ds64  # 0 when the recorder never went back to fill it in: a streaming marker
                regular = regular and n != 0
            data = (pos + 8, n)
            if fmt is None:
                regular = False  # fmt after data: libsndfile refuses it
            if n in _WAV_MARKERS or pos + 8 + n > size:
                break
        elif cid == b"fmt ":
            if pos + 8 + n > len(head) or not 14 <= n <= 1024:
                return _resync(head, size)
            fmt = head[pos + 8:pos + 8 + n]
        elif pos + 8 + n > size:
            return _resync(head, size)  # a chunk running past the end of the file
        pos += 8 + n + (n & 1)
    if fmt is None or data is None:
        return _resync(head, size) if data is not None else None
    return RiffLayout(fmt=fmt, data_offset=data[0], data_declared=data[1], regular=regular)


def _resync(head: bytes, size: int) -> RiffLayout | None:
    """The chunk walk lost its way (some chunk's size is wrong): the first ``fmt `` header of a
    format's size, and after it the first ``data`` header whose size fits the file (or is a
    streaming marker); the word "data" in a text chunk before the audio does not fit."""
    at = head.find(b"fmt ", 12)
    while at >= 0:
        n = struct.unpack_from("<I", head, at + 4)[0] if at + 8 <= len(head) else 0
        if 14 <= n <= 1024 and at + 8 + n <= len(head):
            break
        at = head.find(b"fmt ", at + 1)
    if at < 0:
        return None
    fmt = head[at + 8:at + 8 + n]
    first, found = None, head.find(b"data", 12)
    while found >= 0 and found + 8 <= len(head):
        declared = struct.unpack_from("<I", head, found + 4)[0]
        if first is None:
            first = (found + 8, declared)
        if declared in _WAV_MARKERS or found + 8 + declared <= size:
            return RiffLayout(fmt=fmt, data_offset=found + 8, data_declared=declared, regular=False)
        found = head.find(b"data", found + 1)
    if first is None:
        return None
    return RiffLayout(fmt=fmt, data_offset=first[0], data_declared=first[1], regular=False)


def _check_wav_complete(layout: RiffLayout, size: int, stream: Stream) -> None:
    """A data chunk cut short by more than the tolerance is a truncated file (a streaming
    marker is not: it never said how long the audio is)."""
    if layout.marker:
        return
    available = max(0, size - layout.data_offset)
    if layout.data_declared > available * (1.0 + TRUNCATION_TOLERANCE) + layout.block_align:
        per_frame = layout.block_align
        held, declared = available // per_frame, layout.data_declared // per_frame
        if held == 0:
            raise Unusable(REASON_NO_SAMPLES, f"a header with no audio after it (it declares "
                           f"{_seconds(declared, stream.rate)})")
        raise Unusable(REASON_TRUNCATED, f"holds {_seconds(held, stream.rate)} of the "
                       f"{_seconds(declared, stream.rate)} its header declares")


class _Spliced(io.RawIOBase):
    """A rebuilt header followed by ``length`` bytes of ``source`` from ``offset``: a repaired
    file without copying its audio."""

    def __init__(self, header: bytes, source: BinaryIO, offset: int, length: int):
        self._header, self._source, self._offset, self._length = header, source, offset, length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        end = len(self._header) + self._length
        self._pos = max(0, {io.SEEK_SET: pos, io.SEEK_CUR: self._pos + pos, io.SEEK_END: end + pos}[whence])
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        if self._pos < len(self._header):
            piece = self._header[self._pos:self._pos + len(out)]
            out[:len(piece)] = piece
            done = len(piece)
        body_pos = self._pos + done - len(self._header)
        want = min(len(out) - done, self._length - body_pos)
        if want > 0:
            self._source.seek(self._offset + body_pos)
            piece = self._source.read(want)
            out[done:done + len(piece)] = piece
            done += len(piece)
        self._pos += done
        return done


# --- Ogg: one stream per link of a chain -------------------------------------------------------


@dataclass(frozen=True)
class OggLink:
    """One link of an Ogg file: its bytes, whether it ends with its last page, and its length
    by the granule position of that page (Vorbis and Opus; None for other codecs)."""

    start: int
    end: int
    complete: bool
    seconds: float | None


def ogg_links(data: bytes) -> list[OggLink]:
    """The links of an Ogg file, one after another (one link when it is not chained).

    A link starts at a beginning-of-stream page that follows pages of the link before
    (several such pages together at the start are streams multiplexed in one link). Only
    page headers are read: a few microseconds a page.
    """
    links: list[OggLink] = []
    start, pos = 0, 0
    open_serials: set[bytes] = set()
    first_serial, head, granule, seen_data, cut = b"", b"", -1, False, False

    def close(end: int) -> None:
        links.append(OggLink(start, end, complete=seen_data and not open_serials and not cut,
                             seconds=_ogg_seconds(head, granule)))

    while pos + 27 <= len(data):
        if data[pos:pos + 4] != b"OggS":
            nxt = data.find(b"OggS", pos + 1)  # damage: the next page, if any
            if nxt < 0:
                break
            pos = nxt
            continue
        flags, serial = data[pos + 5], data[pos + 14:pos + 18]
        nseg = data[pos + 26]
        body_at = pos + 27 + nseg
        body = sum(data[pos + 27:body_at])
        if body_at + body > len(data):  # the file ends inside this page
            cut = True
            break
        if flags & 0x02:  # beginning of a stream
            if seen_data:
                close(pos)
                start, open_serials, granule, seen_data = pos, set(), -1, False
            if not open_serials:
                first_serial, head = serial, data[body_at:body_at + min(body, 64)]
            open_serials.add(serial)
        else:
            seen_data = True
        if serial == first_serial:
            value = struct.unpack_from("<q", data, pos + 6)[0]
            granule = value if value >= 0 else granule
        if flags & 0x04:  # end of a stream
            open_serials.discard(serial)
        pos = body_at + body
    close(len(data))
    return links


def _ogg_seconds(head: bytes, granule: int) -> float | None:
    """Length of a Vorbis or Opus stream from its identification header and last granule position."""
    if granule < 0:
        return None
    if head[:7] == b"\x01vorbis" and len(head) >= 16:
        rate = struct.unpack_from("<I", head, 12)[0]
        return granule / rate if rate else None
    if head[:8] == b"OpusHead" and len(head) >= 12:
        return max(0, granule - struct.unpack_from("<H", head, 10)[0]) / 48000
    return None


# --- ffmpeg (PyAV): what libsndfile refuses ------------------------------------------------------

_AV_SCALE = {"u8": (128.0, 128.0), "s16": (0.0, 32768.0), "s32": (0.0, 2.0**31), "s64": (0.0, 2.0**63)}


def _ffmpeg_stream(reopen: Callable[[], BinaryIO], refused: Unusable) -> Stream:
    """The file's first audio stream through ffmpeg, or ``refused`` when ffmpeg cannot read it either."""
    import av

    try:
        with av.open(reopen(), mode="r") as container:
            if not container.streams.audio:
                raise refused
            first = container.streams.audio[0]
            rate, channels = int(first.codec_context.sample_rate or 0), int(first.codec_context.channels or 0)
            what = f"the {first.codec_context.name} audio (read by ffmpeg)"
    except Unusable:
        raise
    except Exception:
        raise refused from None
    if rate <= 0 or channels <= 0:
        raise refused

    def decode() -> Iterator[np.ndarray]:
        decoded = 0
        try:
            with av.open(reopen(), mode="r") as container:
                for frame in container.decode(container.streams.audio[0]):
                    if frame.sample_rate != rate or frame.layout.nb_channels != channels:
                        raise Unusable(REASON_DECODE_ERROR, f"its sample rate or channels change after "
                                       f"{_seconds(decoded, rate)}; split it into one file per part")
                    block = _av_block(frame, channels)
                    decoded += len(block)
                    yield block
        except Unusable:
            raise
        except Exception as e:
            raise Unusable(REASON_DECODE_ERROR, _corrupt_at(decoded, None, rate, what, e)) from None
        if decoded == 0:
            raise Unusable(REASON_NO_SAMPLES, "no audio after the header")

    return Stream(rate=rate, channels=channels, frames=None, what=what, decode=decode)


def _av_block(frame: Any, channels: int) -> np.ndarray:
    """A PyAV audio frame as float64 (frames, channels) at full scale 1.0."""
    x = frame.to_ndarray()
    x = x.T if frame.format.is_planar else x.reshape(-1, channels)  # (frames, channels)
    offset, scale = _AV_SCALE.get(frame.format.name.rstrip("p"), (0.0, 1.0))
    out = x.astype(np.float64)
    if scale != 1.0:
        out = (out - offset) / scale
    return np.ascontiguousarray(out)


# --- the user's terms ---------------------------------------------------------------------------

# What decoders say, and what it means to someone with a folder of recordings.
_PLAIN = (
    (r"no 'data' chunk", "a WAV file without an audio ('data') chunk"),
    (r"'fmt ' chunk", "a WAV file without a usable format ('fmt ') chunk"),
    (r"format not recognised|invalid data found|bad data offset|bad resource fork|unknown format",
     "not a recognised audio format"),
    (r"end of file|unexpected eof|truncat", "the file ends in the middle of the audio"),
    (r"unsupported|not supported|not yet implemented|patches welcome", "an audio encoding this system cannot decode"),
    (r"malformed|header", "its header is broken"),
)
_UNKNOWN = "not a recognised audio format, or a broken one"


def user_terms(e: BaseException) -> str:
    """What a decoder's exception means for the file, without the decoder's internals."""
    text = str(e).lower()
    return next((plain for pattern, plain in _PLAIN if re.search(pattern, text)), _UNKNOWN)


def _corrupt_at(decoded: int, frames: int | None, rate: int, what: str, e: BaseException) -> str:
    plain = user_terms(e)
    if plain == _UNKNOWN:
        plain = "the audio data is corrupt"
    of = f" of its {_seconds(frames, rate)}" if frames else ""
    return f"{plain}: decoding {what} stopped after {_seconds(decoded, rate)}{of}"


def _seconds(frames: int, rate: int) -> str:
    """A length for messages, in the unit that reads best (never more digits than it means)."""
    s = frames / rate
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s"
