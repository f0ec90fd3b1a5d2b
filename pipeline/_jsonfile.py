"""Reading and writing a store file without holding its bytes and its parse at once.

``orjson.loads`` of a whole file needs the file's bytes, the parser's own tree
of them and the Python objects it builds, all at the same time: about 5.3x the
file size for a store, of which the Python document is only 2.7x. Files in the
layout this package writes (orjson, two-space indent) are read here a block at
a time instead: the ``"embryos"`` object, which is nearly all of a store, is
parsed a few embryos at a time, each piece from a reused buffer, so the peak is
the document plus one block.

The cuts rely on a property of JSON: a raw newline can only be whitespace
between tokens, never inside a string. In the two-space layout a line that
starts with exactly four spaces and a quote, after a comma, starts the next
member of a depth-2 object, and the first line that is two spaces and ``}``
after ``"embryos": {`` closes it. Every piece must parse on its own as a JSON
object, ``"embryos"`` must be a key of the top-level object, and the file
without its embryos must parse to an object whose ``"embryos"`` is empty;
anything else (another layout, a legacy file, a syntax error anywhere) falls
back to one whole-file parse, which also gives the precise error. The
document is then checked as a whole by the store's validation, as any parse
is.

Writing is the mirror image: :func:`dump_chunks` serialises the embryos a
group at a time, each group at its depth in the file, and the pieces join to
exactly what one ``orjson.dumps`` of the document gives.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

__all__ = ["load_json_file", "stream_embryos", "split_point", "dump_chunks", "DUMP_OPTIONS", "OtherLayout"]

#: How store files are written: orjson, two-space indent, a final newline.
DUMP_OPTIONS = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE
#: Embryos serialised per piece by :func:`dump_chunks`.
EMBRYOS_PER_CHUNK = 256

_OPEN = b'\n  "embryos": {'
_NEXT = b',\n    "'
_CLOSE = b"\n  }"
_BRACE_OPEN, _BRACE_CLOSE, _COMMA = 0x7B, 0x7D, 0x2C
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_MAX_HEAD = 1 << 24
#: Bytes read at a time (the buffer grows if one embryo is larger).
BLOCK = 16 << 20


class OtherLayout(Exception):
    """The file is not in the layout the streamed reader follows."""


def load_json_file(path: Path, *, block: int = BLOCK) -> Any:
    """Parse a JSON file, a block at a time when it is a store in our layout.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    block : int, default BLOCK
        Bytes read at a time by the streamed reader.

    Returns
    -------
    object
        The parsed JSON, equal (keys in the same order) to
        ``orjson.loads(path.read_bytes())``.

    Raises
    ------
    orjson.JSONDecodeError
        If the file is not valid JSON (from the whole-file parse, so the
        position is the file's).
    """
    if path.stat().st_size > block:
        try:
            return _load_streamed(path, block)
        except (OtherLayout, orjson.JSONDecodeError):
            pass
    return orjson.loads(path.read_bytes())


def _depth(text: bytes) -> int:
    """Nesting depth at the end of *text*, a prefix of a JSON document."""
    bare = _STRING.sub(b"", text)
    return bare.count(b"{") + bare.count(b"[") - bare.count(b"}") - bare.count(b"]")


def _load_streamed(path: Path, block: int) -> dict[str, Any]:
    embryos: dict[str, Any] = {}
    found: dict[str, Any] = {}
    for piece in stream_embryos(path, block, found):
        embryos.update(piece)
    doc = found["rest"]
    doc["embryos"] = embryos
    return doc


def stream_embryos(
    path: Path,
    block: int,
    found: dict[str, Any],
    *,
    skip_to: int | None = None,
    parse: Callable[[memoryview], Any] = orjson.loads,
) -> Iterator[dict[str, Any]]:
    """Parse the ``"embryos"`` of a store file in our layout a few at a time.

    Parameters
    ----------
    path : pathlib.Path
        The file.
    block : int
        Bytes read at a time.
    found : dict
        Receives ``"stat"`` (``os.stat_result`` of the file read) and
        ``"head"`` (the members before the embryos, ``"embryos"`` empty) as
        soon as the first piece is ready, and ``"rest"`` (every member but
        the embryos, ``"embryos"`` empty) once the pieces are exhausted.
    skip_to : int, optional
        Start at the embryo whose separating comma is at this byte offset
        (an offset from :func:`split_point`) instead of the first embryo.
    parse : callable, default orjson.loads
        Parses a piece (a bytes-like ``{...}`` of embryo members) and
        raises ``orjson.JSONDecodeError`` if it is not JSON, as
        ``orjson.loads`` (e.g. :func:`pipeline._tables.parse_piece`). The
        bytes are only valid during the call.

    Yields
    ------
    dict
        Consecutive pieces of the ``"embryos"`` object, in file order.

    Raises
    ------
    OtherLayout
        If the file is not in the layout this reader follows (at any point,
        possibly after some pieces were yielded).
    orjson.JSONDecodeError
        If a piece that must be JSON is not.
    """
    with open(path, "rb", buffering=0) as f:
        found["stat"] = os.fstat(f.fileno())
        buf = bytearray(block)
        filled = f.readinto(buf) or 0
        # The top-level members before "embryos" are small; read on until it.
        while (at := buf.find(_OPEN, 0, filled)) < 0 or filled <= at + len(_OPEN):
            if filled < len(buf) or len(buf) >= _MAX_HEAD:
                raise OtherLayout
            buf.extend(bytes(len(buf)))
            with memoryview(buf) as rest:
                filled += f.readinto(rest[filled:]) or 0
        if buf[at + len(_OPEN)] == _BRACE_CLOSE:
            raise OtherLayout  # "embryos": {} : nothing to stream
        head = bytes(buf[: at + len(_OPEN)])
        if _depth(head) != 2:
            raise OtherLayout  # "embryos" is not a key of the top-level object
        found["head"] = orjson.loads(head + b"}}")
        # `start` is the byte just before the next piece: the object's "{" at
        # first, then the comma that ended the previous piece. Each piece is
        # parsed in place by overwriting that byte with "{" and the byte
        # after it with "}".
        start = at + len(_OPEN) - 1
        if skip_to is not None:
            if skip_to <= start:
                raise OtherLayout
            f.seek(skip_to)
            filled = f.readinto(buf) or 0
            if not buf.startswith(_NEXT):
                raise OtherLayout  # not the comma before an embryo
            start = 0
        view = memoryview(buf)
        eof = False
        try:
            while True:
                # Parse up to the last member start in the buffer. Past the
                # end of "embryos" (its closing line, then other top-level
                # members) that piece cannot parse: only then look for the
                # closing line, so the bulk is never searched for it.
                cut = buf.rfind(_NEXT, start, filled)
                ended = eof
                if cut > start:
                    buf[start], buf[cut] = _BRACE_OPEN, _BRACE_CLOSE
                    try:
                        piece = parse(view[start : cut + 1])
                    except orjson.JSONDecodeError:
                        buf[cut] = _COMMA
                        ended = True
                    else:
                        start = cut
                        yield piece
                        del piece
                if ended:
                    end = buf.find(_CLOSE, start, filled)
                    if end < 0:
                        raise OtherLayout  # no closing line: not our layout
                    buf[start], buf[end] = _BRACE_OPEN, _BRACE_CLOSE
                    last = parse(view[start : end + 1])
                    tail = bytes(view[end + len(_CLOSE) : filled]) + f.read()
                    yield last
                    del last
                    break
                # Keep the unparsed rest (from `start`) and read more after it.
                rest = filled - start
                if start > 0:
                    buf[:rest] = bytes(view[start:filled])  # a copy: the ranges may overlap
                    start = 0
                elif filled == len(buf):
                    view.release()
                    buf.extend(bytes(len(buf)))  # one embryo larger than the buffer
                    view = memoryview(buf)
                got = f.readinto(view[rest:]) or 0
                eof = got == 0
                filled = rest + got
        finally:
            view.release()
    rest = orjson.loads(head + b"}" + tail)
    if not isinstance(rest, dict) or rest.get("embryos") != {}:
        raise OtherLayout
    found["rest"] = rest


def split_point(path: Path, fraction: float) -> tuple[int, str] | None:
    """Where to cut a store file's embryos in two, about *fraction* of the way through.

    Parameters
    ----------
    path : pathlib.Path
        A store file in the layout this package writes.
    fraction : float
        How far into the file (from the start of ``"embryos"``) to look.

    Returns
    -------
    (int, str) or None
        The byte offset of the comma before the first embryo member that
        starts there or later (for :func:`stream_embryos`'s *skip_to*) and
        that embryo's id; None when the file is not in the layout or no
        member start is found nearby. The offset may lie past the end of
        ``"embryos"`` (in a member that follows it): a reader that never
        meets the id among the embryos must not trust the cut.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(1 << 20)
        at = head.find(_OPEN)
        if at < 0:
            return None
        target = at + len(_OPEN) + int((size - at - len(_OPEN)) * fraction)
        f.seek(target)
        window = f.read(1 << 20)
    cut = window.find(_NEXT)
    if cut < 0:
        return None
    key = _STRING.match(window, cut + len(_NEXT) - 1)
    if key is None:
        return None
    return target + cut, orjson.loads(key.group())


def dump_chunks(doc: Any, *, per_chunk: int = EMBRYOS_PER_CHUNK) -> Iterator[bytes | memoryview]:
    """Serialise a store document in pieces whose concatenation is its file.

    Parameters
    ----------
    doc : object
        A store document (any JSON value is accepted).
    per_chunk : int, default EMBRYOS_PER_CHUNK
        Embryos serialised per piece.

    Yields
    ------
    bytes or memoryview
        Pieces; ``b"".join(dump_chunks(doc)) == orjson.dumps(doc,
        option=DUMP_OPTIONS)``. The embryos are serialised a few at a time,
        so a writer never holds the whole file in memory.
    """
    embryos = doc.get("embryos") if isinstance(doc, dict) else None
    if not isinstance(embryos, dict) or not embryos:
        yield orjson.dumps(doc, option=DUMP_OPTIONS)
        return
    skeleton = orjson.dumps({**doc, "embryos": {}}, option=DUMP_OPTIONS)
    mark = b'\n  "embryos": {}'
    # In two-space output a line indented by two spaces is a top-level member.
    at = skeleton.index(mark) + len(mark) - 1
    yield skeleton[:at]
    items = iter(embryos.items())
    # Each group is dumped as {"embryos": {...}}, which puts its members at
    # their depth in the file; the wrapper's own lines are cut off.
    start, end = len(b'{\n  "embryos": {'), -len(b"\n  }\n}")
    first = True
    while part := dict(islice(items, per_chunk)):
        if not first:
            yield b","
        first = False
        yield memoryview(orjson.dumps({"embryos": part}, option=orjson.OPT_INDENT_2))[start:end]
    yield b"\n  }" + skeleton[at + 1 :]
