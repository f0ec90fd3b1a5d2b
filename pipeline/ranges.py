"""Stage 3: frame ranges, from a spec string to the snips it selects.

Consumes frame-range specs (strings typed in notebooks and spreadsheet cells,
lists of positions, lists of snip ids) and the snip table; produces positions
for one embryo (:func:`select_positions`) or, for a whole batch of assignment
rows at once, the selected ``(row, snip)`` pairs plus one outcome line per
problem (:func:`expand_ranges`). The grammar is ``spec/range-grammar.md``; a
spec is parsed once, by a hand-written recursive-descent parser, into an
immutable :class:`FrameRange`. Nothing is ever evaluated as code.

Semantics, stated once here:

- A spec selects snips of **one embryo**, by *position* in the embryo's
  frame-sorted snips: position 0 is the earliest snip, n-1 the latest, and
  missing frames leave no holes in positions.
- ``[i]`` (or ``i``) is one position; negative ``i`` counts from the end. A
  position outside ``[-n, n)`` selects nothing and reports
  ``index_out_of_range``. ``first`` is ``[0]``, ``last`` is ``[-1]``.
- ``[a:b:c]`` is a Python slice over positions: ``b`` is exclusive, bounds
  clamp, ``c`` may be negative but not 0. Brackets are optional (``5:10``).
- ``death`` is the position d of the snip whose frame is the embryo's
  ``death_frame``; ``death+k`` / ``death-k`` are d+k / d-k and select nothing
  outside ``[0, n)`` (``index_out_of_range``; they never count from the end).
  In a slice, a bound ``death±k`` is resolved to d±k first, clamped to 0 if
  negative, and Python slice rules apply after. An embryo without a death frame
  reports ``no_death_frame``; one whose death frame is not among its snips
  reports ``frame_not_found``.
- ``tA..tB`` are **frame numbers**, a closed interval (``tA``, ``tA..`` and
  ``..tB`` too); an interval holding no snip reports ``frame_not_found``.
- ``[x, y, ...]`` is the union of its parts; a list of ints is a list of
  positions, a list of strings a list of snip ids (an id that is not a snip of
  the embryo reports ``unknown_snip_id``). ``""`` and ``[]`` select nothing.
- Keywords are case-insensitive and whitespace is ignored. Integers are at
  most ``10**9`` in magnitude, and positions take no leading zeros, so that
  ``[1,000]`` is an error rather than positions 1 and 0.

Examples
--------
>>> frames = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
>>> select_positions("[8:2:-2]", frames)
array([4, 6, 8])
>>> select_positions("death-2:death+2", frames, death_frame=7)
array([4, 5, 6, 7])
>>> select_positions("t2..t5", frames)
array([2, 3, 4])
>>> str(parse_range(" [ 0:3 , LAST ] "))
'[0:3, last]'
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import RangeSyntaxError

__all__ = [
    "EMPTY_SELECTION",
    "FRAME_NOT_FOUND",
    "INDEX_OUT_OF_RANGE",
    "MAX_INT",
    "NO_DEATH_FRAME",
    "REASONS",
    "UNKNOWN_SNIP_ID",
    "Bound",
    "FrameInterval",
    "FrameRange",
    "Named",
    "Position",
    "SnipId",
    "Span",
    "expand_ranges",
    "parse_range",
    "select_positions",
]

EMPTY_SELECTION = "empty_selection"
INDEX_OUT_OF_RANGE = "index_out_of_range"
FRAME_NOT_FOUND = "frame_not_found"
NO_DEATH_FRAME = "no_death_frame"
UNKNOWN_SNIP_ID = "unknown_snip_id"
#: Every outcome reason :func:`expand_ranges` reports, most specific last.
REASONS = (
    EMPTY_SELECTION,
    INDEX_OUT_OF_RANGE,
    FRAME_NOT_FOUND,
    NO_DEATH_FRAME,
    UNKNOWN_SNIP_ID,
)

#: Largest magnitude of any integer in a spec. Keeping every value far below
#: 2**62 means no arithmetic in the vectorised core can overflow int64.
MAX_INT = 10**9

# A snip id starts with an 8-digit date then "_" (store.schema.json), so it can
# never be mistaken for an integer or a keyword.
_SNIP_ID = re.compile(r"[0-9]{8}_[A-Za-z0-9_]+")
_FRAME_WORD = re.compile(r"[tT]([0-9]+)")
_KEYWORDS = ("all", "first", "last")


# --------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Bound:
    """A position, or a slice bound: a plain integer or ``death±k``.

    Parameters
    ----------
    value : int
        The position (negative counts from the end), or the offset k from the
        death position when *death* is true.
    death : bool, default False
        Whether the bound is relative to the death position.
    """

    value: int
    death: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            msg = f"Bound value must be an int, got {self.value!r}"
            raise TypeError(msg)
        if abs(self.value) > MAX_INT:
            msg = f"Bound value {self.value} is larger than 10**9 in magnitude"
            raise ValueError(msg)

    def __str__(self) -> str:
        if not self.death:
            return str(self.value)
        if self.value == 0:
            return "death"
        return f"death{self.value:+d}"


@dataclass(frozen=True)
class Named:
    """One of the keywords ``all``, ``first`` or ``last``.

    Parameters
    ----------
    name : str
        ``"all"``, ``"first"`` or ``"last"`` (lower case).
    """

    name: str

    def __post_init__(self) -> None:
        if self.name not in _KEYWORDS:
            msg = f"Named part must be one of {_KEYWORDS}, got {self.name!r}"
            raise ValueError(msg)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Position:
    """A single position: ``[i]``, ``i``, ``death`` or ``death±k``.

    Parameters
    ----------
    at : Bound
        The position.
    """

    at: Bound

    def __str__(self) -> str:
        return str(self.at)


@dataclass(frozen=True)
class Span:
    """A Python slice over positions whose bounds may be ``death±k``.

    Parameters
    ----------
    start, stop : Bound or None
        Slice bounds; None leaves that end open.
    step : int or None
        Slice step, never 0; a step of 1 is stored as None.
    """

    start: Bound | None = None
    stop: Bound | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if self.step == 0:
            msg = "slice step cannot be zero"
            raise ValueError(msg)
        if self.step == 1:
            # [a:b:1] and [a:b] are the same slice: one canonical form.
            object.__setattr__(self, "step", None)

    def __str__(self) -> str:
        start = "" if self.start is None else str(self.start)
        stop = "" if self.stop is None else str(self.stop)
        if self.step is None:
            return f"{start}:{stop}"
        return f"{start}:{stop}:{self.step}"


@dataclass(frozen=True)
class FrameInterval:
    """Snips whose frame number lies in the closed interval ``[lo, hi]``.

    Parameters
    ----------
    lo, hi : int or None
        Interval ends (frame numbers, inclusive); None leaves that end open.
    """

    lo: int | None = None
    hi: int | None = None

    def __post_init__(self) -> None:
        for end in (self.lo, self.hi):
            if end is not None and not (isinstance(end, int) and 0 <= end <= MAX_INT):
                msg = f"frame numbers must be ints in [0, 10**9], got {end!r}"
                raise ValueError(msg)
        if self.lo is None and self.hi is None:
            msg = "a frame interval needs at least one end"
            raise ValueError(msg)
        if self.lo is not None and self.hi is not None and self.lo > self.hi:
            msg = f"frame interval t{self.lo}..t{self.hi} is reversed"
            raise ValueError(msg)

    def __str__(self) -> str:
        if self.lo == self.hi:
            return f"t{self.lo}"
        lo = "" if self.lo is None else f"t{self.lo}"
        hi = "" if self.hi is None else f"t{self.hi}"
        return f"{lo}..{hi}"


@dataclass(frozen=True)
class SnipId:
    """One snip named by its id.

    Parameters
    ----------
    snip_id : str
        The id, e.g. ``"20240411_A01_e01_s0042"``.
    """

    snip_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.snip_id, str) or not _SNIP_ID.fullmatch(self.snip_id):
            msg = (
                f"{self.snip_id!r} is not a snip id (8-digit date, '_', then the rest)"
            )
            raise ValueError(msg)

    def __str__(self) -> str:
        return self.snip_id


Part = Named | Position | Span | FrameInterval | SnipId

# Kinds of the vectorised core. Every part compiles to one numeric record
# (kind, a, a_mode, b, b_mode, step, id_len, id_tail) so that rows are grouped
# by kind and computed with whole-array operations. A snip id part also
# records a fingerprint of its id: the UTF-8 length and the last 8 bytes read
# as a little-endian int64, which rule out almost every candidate snip before
# an exact comparison.
_K_SPAN, _K_POINT, _K_FRAMES, _K_SNIP = 0, 1, 2, 3
_M_NONE, _M_PLAIN, _M_DEATH = 0, 1, 2
_N_FIELDS = 8
_TAIL = 8  # bytes in a fingerprint's tail


def _mode(bound: Bound | None) -> tuple[int, int]:
    if bound is None:
        return 0, _M_NONE
    return bound.value, _M_DEATH if bound.death else _M_PLAIN


def _fingerprint(text: str) -> tuple[int, int]:
    """UTF-8 length of *text* and its last 8 bytes as a little-endian int64."""
    data = text.encode()
    tail = int.from_bytes(data[-_TAIL:].rjust(_TAIL, b"\0"), "little", signed=True)
    return len(data), tail


def _record(part: Part) -> tuple[int, ...]:
    if isinstance(part, Named):
        if part.name == "all":
            return (_K_SPAN, 0, _M_NONE, 0, _M_NONE, 1, 0, 0)
        first = 0 if part.name == "first" else -1
        return (_K_POINT, first, _M_PLAIN, 0, _M_NONE, 1, 0, 0)
    if isinstance(part, Position):
        return (_K_POINT, *_mode(part.at), 0, _M_NONE, 1, 0, 0)
    if isinstance(part, Span):
        return (_K_SPAN, *_mode(part.start), *_mode(part.stop), part.step or 1, 0, 0)
    if isinstance(part, FrameInterval):
        lo = (0, _M_NONE) if part.lo is None else (part.lo, _M_PLAIN)
        hi = (0, _M_NONE) if part.hi is None else (part.hi, _M_PLAIN)
        return (_K_FRAMES, *lo, *hi, 1, 0, 0)
    return (_K_SNIP, 0, _M_NONE, 0, _M_NONE, 1, *_fingerprint(part.snip_id))


def _part_kind(part: Part) -> str:
    if isinstance(part, Named):
        return "slice" if part.name == "all" else "position"
    if isinstance(part, Position):
        return "death" if part.at.death else "position"
    if isinstance(part, Span):
        death = any(b is not None and b.death for b in (part.start, part.stop))
        return "death_slice" if death else "slice"
    if isinstance(part, FrameInterval):
        return "frames"
    return "snip_id"


@dataclass(frozen=True, eq=False)
class FrameRange:
    """A parsed frame-range spec: the union of its parts.

    Immutable, hashable and picklable. ``str(fr)`` (or ``fr.canonical``) is the
    canonical spec, and ``parse_range(str(fr)) == fr``. Two ranges are equal
    when their canonical specs are equal. Build one with :func:`parse_range`.

    Parameters
    ----------
    parts : tuple of Part
        Parts of the union, in the order written; exact duplicates are dropped.

    Attributes
    ----------
    canonical : str
        The canonical spec: no whitespace except after commas, lower-case
        keywords, brackets around positions and slices, e.g. ``"[0:3, -1]"``,
        ``"death"``, ``"t10..t20"``, ``"all"``, ``"[]"`` for the empty range,
        ``"[20240411_A01_e01_s0001, 20240411_A01_e01_s0002]"`` for snip ids.
    kind : str
        ``"empty"``, ``"mixed"``, or the one kind all parts share:
        ``"position"``, ``"slice"``, ``"death"``, ``"death_slice"``,
        ``"frames"`` or ``"snip_id"``.

    Examples
    --------
    >>> fr = parse_range("[0:3,-1]")
    >>> fr
    FrameRange('[0:3, -1]')
    >>> fr == parse_range(str(fr)), fr.kind
    (True, 'mixed')
    """

    parts: tuple[Part, ...] = ()
    canonical: str = field(init=False, repr=False)
    # Precompiled for the vectorised core: the bytes of one row of int64
    # fields per part (see _record), and the UTF-8 bytes of the snip ids
    # named, one after the other (a part's record holds its id's length).
    _records: bytes = field(init=False, repr=False)
    _snip_bytes: bytes = field(init=False, repr=False)

    _types: ClassVar[tuple[type, ...]] = (Named, Position, Span, FrameInterval, SnipId)

    def __post_init__(self) -> None:
        parts = tuple(dict.fromkeys(self.parts))
        for part in parts:
            if not isinstance(part, self._types):
                msg = f"FrameRange parts must be Named, Position, Span, FrameInterval or SnipId, got {part!r}"
                raise TypeError(msg)
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "canonical", _format(parts))
        records = np.array([_record(p) for p in parts], dtype=np.int64)
        object.__setattr__(self, "_records", records.tobytes())
        snips = (p.snip_id for p in parts if isinstance(p, SnipId))
        object.__setattr__(self, "_snip_bytes", "".join(snips).encode())

    def __str__(self) -> str:
        return self.canonical

    def __repr__(self) -> str:
        return f"FrameRange({self.canonical!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrameRange):
            return NotImplemented
        return self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrameRange, (self.parts,))

    @property
    def kind(self) -> str:
        """Kind shared by all parts, ``"empty"`` or ``"mixed"``."""
        kinds = {_part_kind(p) for p in self.parts}
        if not kinds:
            return "empty"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def is_empty(self) -> bool:
        """True for ``""`` / ``[]``, which select nothing."""
        return not self.parts

    @property
    def uses_death(self) -> bool:
        """True if any part is relative to the death position."""
        return any(_part_kind(p) in ("death", "death_slice") for p in self.parts)

    @property
    def snip_ids(self) -> tuple[str, ...]:
        """The snip ids named by the range, in order."""
        return tuple(p.snip_id for p in self.parts if isinstance(p, SnipId))


def _format(parts: tuple[Part, ...]) -> str:
    if not parts:
        return "[]"
    if len(parts) == 1:
        (part,) = parts
        # Keywords, death and frame intervals read naturally without brackets.
        if isinstance(part, Named | FrameInterval) or (
            isinstance(part, Position) and part.at.death
        ):
            return str(part)
    return "[" + ", ".join(str(p) for p in parts) + "]"


# -------------------------------------------------------------------- parser

_TOKEN = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<snip>[0-9]{8}_[A-Za-z0-9_]+)"
    r"|(?P<int>[0-9]+)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<dots>\.\.)"
    r"|(?P<punct>[\[\],:+\-])"
)
_END = "end"
_EXPECT_ITEM = (
    "expected a position, a slice, all, first, last, death or a frame like t10"
)


@dataclass(frozen=True)
class _Token:
    kind: str  # snip, int, word, dots, punct, end
    text: str
    column: int  # one-based


def _syntax_error(spec: str, column: int, what: str) -> RangeSyntaxError:
    msg = f"cannot parse frame range {spec!r} at column {column}: {what}"
    return RangeSyntaxError(msg, spec=spec, column=column)


def _tokenize(spec: str) -> list[_Token]:
    tokens = []
    pos = 0
    while pos < len(spec):
        match = _TOKEN.match(spec, pos)
        if match is None:
            char = spec[pos]
            hint = " (decimals are not positions)" if char == "." else ""
            raise _syntax_error(spec, pos + 1, f"unexpected character {char!r}{hint}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append(_Token(kind, match.group(), pos + 1))
        pos = match.end()
    tokens.append(_Token(_END, "", len(spec) + 1))
    return tokens


class _Parser:
    """Recursive descent over the token list; see the module docstring."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.tokens = _tokenize(spec)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def next(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def is_punct(self, text: str) -> bool:
        tok = self.peek()
        return tok.kind == "punct" and tok.text == text

    def error(self, tok: _Token, what: str) -> RangeSyntaxError:
        return _syntax_error(self.spec, tok.column, what)

    def describe(self, tok: _Token) -> str:
        return "the end of the spec" if tok.kind == _END else repr(tok.text)

    def integer(self, tok: _Token, *, leading_zeros: bool = False) -> int:
        digits = tok.text
        if not leading_zeros and len(digits) > 1 and digits[0] == "0":
            raise self.error(
                tok,
                f"leading zeros are not allowed in {digits!r} "
                "(a comma is not a thousands separator)",
            )
        # Check the length before int() so a 10,000-digit string costs nothing.
        if len(digits.lstrip("0")) > len(str(MAX_INT)) or int(digits) > MAX_INT:
            raise self.error(tok, f"integer {digits} is too large (the limit is 10**9)")
        return int(digits)

    def parse(self) -> FrameRange:
        tok = self.peek()
        if tok.kind == _END:
            return FrameRange(())
        if self.is_punct("["):
            self.next()
            parts: list[Part] = []
            if self.is_punct("]"):
                self.next()
            else:
                parts.append(self.item())
                while self.is_punct(","):
                    self.next()
                    parts.append(self.item())
                tok = self.peek()
                if not self.is_punct("]"):
                    raise self.error(
                        tok, f"expected ',' or ']', found {self.describe(tok)}"
                    )
                self.next()
        else:
            parts = [self.item()]
            if self.is_punct(","):
                raise self.error(
                    self.peek(),
                    "a list of several parts needs brackets, e.g. '[0:5, 10]'",
                )
        tok = self.peek()
        if tok.kind != _END:
            raise self.error(tok, f"expected the end of the spec, found {tok.text!r}")
        return FrameRange(tuple(parts))

    def item(self) -> Part:
        tok = self.peek()
        if tok.kind == "snip":
            self.next()
            return SnipId(tok.text)
        if tok.kind == "dots":
            return self.frames()
        if tok.kind == "word":
            word = tok.text.lower()
            if word in _KEYWORDS:
                self.next()
                return Named(word)
            if _FRAME_WORD.fullmatch(tok.text):
                return self.frames()
            if word != "death":
                raise self.error(
                    tok,
                    f"unknown word {tok.text!r}; expected all, first, last, death "
                    "or a frame like t10",
                )
        if self.is_punct("["):
            raise self.error(tok, "brackets cannot be nested")
        return self.slice_or_position()

    def frame_number(self) -> int:
        tok = self.next()
        match = _FRAME_WORD.fullmatch(tok.text) if tok.kind == "word" else None
        if match is None:
            raise self.error(
                tok, f"expected a frame like t20, found {self.describe(tok)}"
            )
        return self.integer(
            _Token("int", match.group(1), tok.column), leading_zeros=True
        )

    def frames(self) -> FrameInterval:
        lo = hi = None
        if self.peek().kind != "dots":
            lo = hi = self.frame_number()
        if self.peek().kind == "dots":
            dots = self.next()
            tok = self.peek()
            if tok.kind == "word" and _FRAME_WORD.fullmatch(tok.text):
                hi = self.frame_number()
            elif lo is None:
                raise self.error(
                    tok,
                    f"expected a frame like t20 after '..', found {self.describe(tok)}",
                )
            else:
                hi = None
            if lo is not None and hi is not None and lo > hi:
                raise self.error(
                    dots, f"frame interval t{lo}..t{hi} is reversed; write t{hi}..t{lo}"
                )
        if self.is_punct(":"):
            raise self.error(
                self.peek(), "frames (tN) cannot be slice bounds; use t10..t20"
            )
        return FrameInterval(lo, hi)

    def bound(self) -> Bound | None:
        tok = self.peek()
        if tok.kind == _END or (tok.kind == "punct" and tok.text in ":,]"):
            return None
        if tok.kind == "int":
            self.next()
            return Bound(self.integer(tok))
        if self.is_punct("-"):
            self.next()
            num = self.next()
            if num.kind != "int":
                raise self.error(
                    num, f"expected an integer after '-', found {self.describe(num)}"
                )
            return Bound(-self.integer(num))
        if tok.kind == "word" and tok.text.lower() == "death":
            self.next()
            if self.peek().kind == "punct" and self.peek().text in "+-":
                sign = -1 if self.next().text == "-" else 1
                num = self.next()
                if num.kind != "int":
                    raise self.error(
                        num,
                        f"expected an integer after 'death{'-' if sign < 0 else '+'}', "
                        f"found {self.describe(num)}",
                    )
                return Bound(sign * self.integer(num), death=True)
            return Bound(0, death=True)
        if tok.kind == "word" and _FRAME_WORD.fullmatch(tok.text):
            raise self.error(tok, "frames (tN) cannot be slice bounds; use t10..t20")
        raise self.error(tok, f"{_EXPECT_ITEM}, found {self.describe(tok)}")

    def slice_or_position(self) -> Position | Span:
        first = self.bound()
        if not self.is_punct(":"):
            if first is None:
                raise self.error(
                    self.peek(), f"{_EXPECT_ITEM}, found {self.describe(self.peek())}"
                )
            return Position(first)
        bounds: list[Bound | None] = [first]
        step_tok = self.peek()
        while self.is_punct(":"):
            if len(bounds) == 3:
                raise self.error(
                    self.peek(), "a slice has at most 3 parts (start:stop:step)"
                )
            self.next()
            step_tok = self.peek()
            bounds.append(self.bound())
        start, stop, step = (*bounds, None, None)[:3]
        if step is not None and step.death:
            raise self.error(
                step_tok, "the step of a slice must be a plain integer, not death"
            )
        if step is not None and step.value == 0:
            raise self.error(step_tok, "slice step cannot be zero")
        return Span(start, stop, None if step is None else step.value)


# ---------------------------------------------------------------- parse_range


def _as_int(value: Any) -> int | None:
    """Return the integer *value* stands for, or None if it is not integral."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    # A position typed in Excel arrives as 3.0; 3.5, nan and inf are errors.
    if (
        isinstance(value, float | np.floating)
        and np.isfinite(value)
        and float(value).is_integer()
    ):
        return int(value)
    return None


def _list_error(spec: Any, what: str) -> RangeSyntaxError:
    msg = f"cannot use {spec!r} as a frame range: {what}"
    return RangeSyntaxError(msg, spec=repr(spec))


def _parse_list(spec: Sequence[Any]) -> FrameRange:
    items = list(spec)
    if all(isinstance(x, str) for x in items):
        for k, item in enumerate(items):
            if not _SNIP_ID.fullmatch(item):
                what = (
                    f"item {k} ({item!r}) is not a snip id; a list of strings names "
                    "snip ids like '20240411_A01_e01_s0042' (write other specs as one string)"
                )
                raise _list_error(spec, what)
        return FrameRange(tuple(SnipId(x) for x in items))
    parts: list[Part] = []
    for k, item in enumerate(items):
        value = _as_int(item)
        if value is None:
            what = f"item {k} ({item!r}) is not an integer position; expected a list of ints or a list of snip ids"
            raise _list_error(spec, what)
        if abs(value) > MAX_INT:
            raise _list_error(
                spec, f"item {k} ({value}) is too large (the limit is 10**9)"
            )
        parts.append(Position(Bound(value)))
    return FrameRange(tuple(parts))


@functools.lru_cache(maxsize=2**16)
def _parse_string(spec: str) -> FrameRange:
    # Cached: a batch repeats the same few spec strings, and sharing one
    # immutable object per string lets expand_ranges group rows by identity.
    return _Parser(spec).parse()


def parse_range(
    spec: str | Sequence[int] | Sequence[str] | float | FrameRange,
) -> FrameRange:
    """
    Parse a frame-range spec into a :class:`FrameRange`.

    Parameters
    ----------
    spec : str, list or tuple of int, list or tuple of str, int, float or FrameRange
        A spec in the grammar of ``spec/range-grammar.md`` (e.g. ``"[5:10:2]"``,
        ``"death-2:death+2"``, ``"t10..t20"``); a list of positions; a list of
        snip ids; a single position (an int, or an integral float as read from
        a spreadsheet cell); or an already parsed range, returned as is.

    Returns
    -------
    FrameRange
        The parsed range; ``""`` and ``[]`` give the empty range.

    Raises
    ------
    RangeSyntaxError
        If *spec* is malformed, of an unsupported type (None, bool, a
        non-integral float), mixes ints and strings, or holds an integer
        larger than ``10**9`` in magnitude. The error names the spec, the
        column and what was expected.

    Examples
    --------
    >>> parse_range("Death - 2 : DEATH + 2")
    FrameRange('[death-2:death+2]')
    >>> parse_range([0, -1]), parse_range(3.0)
    (FrameRange('[0, -1]'), FrameRange('[3]'))
    >>> parse_range("[1:2:3:4]")
    Traceback (most recent call last):
    ...
    pipeline.errors.RangeSyntaxError: cannot parse frame range '[1:2:3:4]' at column 7: a slice has at most 3 parts (start:stop:step)
    """
    if isinstance(spec, FrameRange):
        return spec
    if isinstance(spec, str):
        return _parse_string(spec)
    if isinstance(spec, list | tuple | np.ndarray):
        if isinstance(spec, np.ndarray) and spec.ndim != 1:
            raise _list_error(spec, "expected a one-dimensional list")
        return _parse_list(spec)
    value = _as_int(spec)
    if value is None:
        what = "expected a string spec, an integer position, a list of positions or a list of snip ids"
        raise _list_error(spec, what)
    if abs(value) > MAX_INT:
        raise _list_error(spec, f"integer {value} is too large (the limit is 10**9)")
    return FrameRange((Position(Bound(value)),))


# ------------------------------------------------------- one embryo (reference)


def _core_part(part: Part) -> Part:
    """Rewrite keywords as the position or slice they stand for."""
    if isinstance(part, Named):
        if part.name == "all":
            return Span()
        return Position(Bound(0 if part.name == "first" else -1))
    return part


def _resolve_one(
    fr: FrameRange,
    frames: list[int],
    death_frame: int | None,
    snip_ids: Sequence[str] | None,
) -> tuple[list[int], list[tuple[int, str]]]:
    """Positions selected in one embryo and ``(part number, reason)`` outcomes.

    Plain Python on purpose: it is the reference the vectorised core is tested
    against, so it follows the grammar's wording rather than sharing code.
    """
    n = len(frames)
    death_pos: int | None = None
    death_reason = NO_DEATH_FRAME
    if death_frame is not None:
        k = bisect.bisect_left(frames, death_frame)
        if k < n and frames[k] == death_frame:
            death_pos = k
        else:
            death_reason = FRAME_NOT_FOUND
    selected: set[int] = set()
    outcomes: list[tuple[int, str]] = []
    for number, raw in enumerate(fr.parts):
        part = _core_part(raw)
        if isinstance(part, Position):
            if part.at.death:
                if death_pos is None:
                    outcomes.append((number, death_reason))
                    continue
                pos = death_pos + part.at.value
                ok = 0 <= pos < n
            else:
                pos = part.at.value
                ok = -n <= pos < n
            if ok:
                selected.add(pos % n)
            else:
                outcomes.append((number, INDEX_OUT_OF_RANGE))
        elif isinstance(part, Span):
            bounds = []
            for bound in (part.start, part.stop):
                if bound is None or not bound.death:
                    bounds.append(None if bound is None else bound.value)
                elif death_pos is None:
                    break
                else:
                    bounds.append(max(death_pos + bound.value, 0))
            if len(bounds) < 2:
                outcomes.append((number, death_reason))
                continue
            selected.update(range(n)[slice(bounds[0], bounds[1], part.step)])
        elif isinstance(part, FrameInterval):
            lo = 0 if part.lo is None else bisect.bisect_left(frames, part.lo)
            hi = n if part.hi is None else bisect.bisect_right(frames, part.hi)
            if lo >= hi:
                outcomes.append((number, FRAME_NOT_FOUND))
            selected.update(range(lo, hi))
        else:
            assert isinstance(part, SnipId)
            if snip_ids is None:
                msg = (
                    f"{fr.canonical!r} names snip ids; pass snip_ids= (the embryo's ids, "
                    "in frame order) to resolve them"
                )
                raise ValueError(msg)
            try:
                selected.add(list(snip_ids).index(part.snip_id))
            except ValueError:
                outcomes.append((number, UNKNOWN_SNIP_ID))
    if not selected and not outcomes:
        outcomes.append((len(fr.parts), EMPTY_SELECTION))
    return sorted(selected), outcomes


def _death_or_none(death_frame: Any) -> int | None:
    if death_frame is None or pd.isna(death_frame):
        return None
    value = _as_int(death_frame)
    if value is None:
        msg = (
            f"death_frame must be an integer frame number or None, got {death_frame!r}"
        )
        raise TypeError(msg)
    return value


def select_positions(
    spec: str | Sequence[int] | Sequence[str] | int | FrameRange,
    frames: Iterable[int],
    death_frame: int | None = None,
    *,
    snip_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """
    Select the snips of one embryo that a frame-range spec names.

    Parameters
    ----------
    spec : str, list of int, int or FrameRange
        A spec in the grammar of ``spec/range-grammar.md``, e.g. ``"[5:10:2]"``,
        ``"death-2:death+2"`` or ``"t10..t20"``, or anything
        :func:`parse_range` accepts.
    frames : array-like of int
        The embryo's frame numbers, sorted ascending, no duplicates.
    death_frame : int or None, default None
        The embryo's death frame; None (or ``pd.NA``) if it has none.
    snip_ids : sequence of str, optional
        The embryo's snip ids in the order of *frames*; needed only when
        *spec* names snip ids.

    Returns
    -------
    numpy.ndarray of int64
        Selected positions, ascending and unique; empty if the spec selects
        nothing (the reason is reported by :func:`expand_ranges`).

    Raises
    ------
    RangeSyntaxError
        If *spec* is malformed.
    ValueError
        If *frames* is not strictly increasing, or *spec* names snip ids and
        *snip_ids* is not given.

    Examples
    --------
    >>> frames = np.array([0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
    >>> select_positions("[::3]", frames)
    array([0, 3, 6, 9])
    >>> select_positions("[0:3, -1]", frames)
    array([0, 1, 2, 9])
    >>> select_positions("death-9:death", frames, death_frame=7)
    array([0, 1, 2, 3, 4, 5])
    >>> select_positions("[12]", frames)
    array([], dtype=int64)
    """
    fr = parse_range(spec)
    frame_array = np.asarray(frames if isinstance(frames, np.ndarray) else list(frames))
    if frame_array.size and frame_array.dtype.kind not in "iu":
        msg = f"frames must be integers, got dtype {frame_array.dtype}"
        raise TypeError(msg)
    frame_list = frame_array.ravel().tolist()  # Python ints
    if any(b <= a for a, b in itertools.pairwise(frame_list)):
        msg = "frames must be sorted ascending without duplicates"
        raise ValueError(msg)
    positions, _ = _resolve_one(fr, frame_list, _death_or_none(death_frame), snip_ids)
    return np.array(positions, dtype=np.int64)


# ---------------------------------------------------------- vectorised core

_ROW = "row"
_POS = "pos"
#: Column type of outcome texts: pandas' default string type.
_TEXT = pd.Series([], dtype=str).dtype


def _segmented_searchsorted(
    values: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    targets: np.ndarray,
    side: str,
) -> np.ndarray:
    """``np.searchsorted`` within many sorted segments of *values* at once.

    Binary lifting run in lock step for every query: for each power of two p,
    from the largest not above the longest segment down to 1, a count grows
    by p when the value just before the grown count still precedes the target
    (``<`` for ``side="left"``, ``<=`` for ``"right"``). That is
    ``log2(max length) + 1`` rounds of a few whole-array operations.

    Returns
    -------
    numpy.ndarray of int64
        Offsets within each segment.
    """
    count = np.zeros(seg_start.shape, dtype=np.int64)
    longest = int(seg_len.max()) if seg_len.size else 0
    if values.size == 0 or longest <= 0:
        return count
    before = seg_start - 1
    last = values.size - 1
    precedes = np.less if side == "left" else np.less_equal
    step = 1 << (longest.bit_length() - 1)
    while step:
        grown = count + step
        probe = values[np.minimum(before + grown, last)]
        count = np.where(precedes(probe, targets) & (grown <= seg_len), grown, count)
        step >>= 1
    return count


def _ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each i, the run ``starts[i] + arange(counts[i])``, concatenated.

    Returns ``(owner, value)``: which run each element belongs to and its value.
    """
    total = int(counts.sum())
    owner = np.repeat(np.arange(counts.size), counts)
    first = np.cumsum(counts) - counts
    value = np.arange(total, dtype=np.int64) - (first - starts)[owner]
    return owner, value


def _progressions(
    first: np.ndarray, step: np.ndarray | int, count: np.ndarray
) -> np.ndarray:
    """Concatenate the runs ``first[i] + step[i] * arange(count[i])``.

    One ``repeat`` and one ``cumsum``: the increments are the steps, except at
    the head of each run, where they jump from the previous run's last value.
    """
    keep = count > 0
    step = np.broadcast_to(step, count.shape)
    if not keep.all():
        first, step, count = first[keep], step[keep], count[keep]
    if count.size == 0:
        return np.empty(0, dtype=np.int64)
    increments = np.repeat(step, count)
    heads = np.cumsum(count) - count
    last = first + step * (count - 1)
    increments[heads[1:]] = first[1:] - last[:-1]
    increments[0] = first[0]
    return np.cumsum(increments)


def _slice_indices(
    a: np.ndarray,
    a_mode: np.ndarray,
    b: np.ndarray,
    b_mode: np.ndarray,
    step: np.ndarray,
    n: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``slice(a, b, step).indices(n)``: ``(start, count)``.

    Bounds with mode ``_M_NONE`` are open. Death-relative bounds must already
    be resolved to non-negative positions (which Python rules then clamp).
    """
    neg = step < 0
    lower = np.where(neg, -1, 0)
    upper = np.where(neg, n - 1, n)

    def clamp(v: np.ndarray) -> np.ndarray:
        return np.where(v < 0, np.maximum(v + n, lower), np.minimum(v, upper))

    start = np.where(a_mode == _M_NONE, np.where(neg, upper, lower), clamp(a))
    stop = np.where(b_mode == _M_NONE, np.where(neg, lower, upper), clamp(b))
    span = np.where(neg, start - stop, stop - start)
    size = np.abs(step)
    count = np.where(span > 0, (span + size - 1) // size, 0)
    return start, count


def _text_column(values: pa.Array) -> Any:
    """An arrow ``string`` array as a pandas array of the default string type.

    Wrapped without a copy or a check of every value when pandas keeps its
    strings in arrow (pandas 3); converted otherwise.
    """
    if isinstance(_TEXT, pd.StringDtype) and _TEXT.storage == "pyarrow":
        try:
            return pd.arrays.ArrowStringArray(values, dtype=_TEXT)
        except TypeError:  # pandas 2: no dtype argument
            pass
    return pd.array(values.to_pylist(), dtype=_TEXT)


def _text(piece: str | np.ndarray | pa.Array) -> str | pa.Array:
    """A piece of an outcome message as a string or an arrow ``string`` array."""
    if isinstance(piece, str):
        return piece
    if isinstance(piece, np.ndarray):
        piece = pa.array(piece)  # integers; arrow prints them as str() does
    return piece if piece.type == pa.string() else piece.cast(pa.string())


def _details(*pieces: str | np.ndarray | pa.Array) -> pa.Array:
    """Concatenate strings and arrays element-wise, in arrow (no Python loop)."""
    return pc.binary_join_element_wise(*map(_text, pieces), "")


def _empty_outputs() -> tuple[pd.DataFrame, pd.DataFrame]:
    pairs = pd.DataFrame(
        {_ROW: np.empty(0, dtype=np.int64), _POS: np.empty(0, dtype=np.int64)}
    )
    return pairs, _empty_outcomes()


def _empty_outcomes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            _ROW: np.empty(0, dtype=np.int64),
            "reason": pd.Series([], dtype=str),
            "detail": pd.Series([], dtype=str),
        }
    )


def _arrow_strings(
    values: pd.Series | pd.Index, positions: np.ndarray | None = None
) -> pa.Array:
    """*values* (at *positions*) as an arrow ``large_string`` array.

    Zero-copy over pyarrow-backed strings, the pandas 3 default, so taking
    20,000 embryo ids out of a million-row column costs only the take.
    """
    if _is_arrow_text(values):
        data = pa.array(values.array)
        taken = data if positions is None else data.take(pa.array(positions))
    else:
        picked = values if positions is None else values.take(positions)
        taken = pa.array(np.asarray(picked, dtype=object), from_pandas=True)
    if isinstance(taken, pa.ChunkedArray):
        taken = taken.combine_chunks()
    if pa.types.is_dictionary(taken.type):
        taken = taken.dictionary_decode()
    return taken.cast(pa.large_string())


def _is_arrow_text(values: pd.Series | pd.Index) -> bool:
    """True if *values* are strings held by arrow (readable without copying)."""
    dtype = values.dtype
    return isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"


def _whole_strings(values: pd.Index) -> pa.Array | None:
    """The one arrow string array holding *values*, if there is one.

    None when *values* are not arrow strings or are split into several chunks
    (joining them would copy every string).
    """
    if not _is_arrow_text(values):
        return None
    data = pa.array(values.array)
    if isinstance(data, pa.ChunkedArray):
        if data.num_chunks != 1:
            return None
        data = data.chunk(0)
    if data.type not in (pa.string(), pa.large_string()):
        return None
    return data


def _string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy views of a string array: offsets (as int64) and UTF-8 bytes.

    String i is ``data[offsets[i]:offsets[i + 1]]``.
    """
    _, offsets, data = strings.buffers()
    width = np.int64 if strings.type == pa.large_string() else np.int32
    count = strings.offset + len(strings) + 1
    offsets = np.frombuffer(offsets, dtype=width, count=count)[strings.offset :]
    offsets = offsets.astype(np.int64, copy=False)
    if data is None:
        return offsets, np.empty(0, dtype=np.uint8)
    return offsets, np.frombuffer(data, dtype=np.uint8)


def _find_snip_ids(
    index: pd.Index,
    block_start: np.ndarray,
    block_len: np.ndarray,
    block_of: np.ndarray,
    wanted_len: np.ndarray,
    wanted_tail: np.ndarray,
    wanted: pa.Array,
) -> np.ndarray:
    """Where each wanted snip id first occurs in its block of *index*.

    Wanted id i (*wanted*, with its fingerprint *wanted_len*, *wanted_tail*
    from :func:`_fingerprint`) is looked for among the snips of block
    ``b = block_of[i]`` only: ``index[block_start[b]:block_start[b] +
    block_len[b]]``. The fingerprints of a block's snips are read once, from
    the arrow buffers without building a string (the byte length, and the last
    8 bytes as one int64), and compared with those of every id wanted in the
    block. Only candidates that pass are compared as strings, so an exact
    comparison decides every match.

    Returns
    -------
    numpy.ndarray of int64
        The ``index`` position of each wanted id's first match, -1 if none.
    """
    result = np.full(block_of.size, -1, dtype=np.int64)
    # Fingerprints of every snip of the blocks, block after block.
    heads = np.cumsum(block_len) - block_len
    snips = np.arange(int(block_len.sum()), dtype=np.int64)
    snips += np.repeat(block_start - heads, block_len)
    whole = _whole_strings(index)
    if whole is not None:
        strings, at = whole, snips
    else:
        strings, at = _arrow_strings(index, snips), None
    offsets, data = _string_buffers(strings)
    if at is None:
        ends, lengths = offsets[1:], np.diff(offsets)
    else:
        ends = offsets[at + 1]
        lengths = ends - offsets[at]
    tails = None
    if data.size >= _TAIL:
        window = np.ndarray(
            (data.size - _TAIL + 1,), dtype="<i8", buffer=data, strides=(1,)
        )
        tails = window[np.maximum(ends - _TAIL, 0)]
    # Pairs (wanted id, snip of its block): compare the fingerprints.
    counts = block_len[block_of]
    firsts = np.cumsum(counts) - counts
    link = np.arange(int(counts.sum()), dtype=np.int64)
    link += np.repeat(heads[block_of] - firsts, counts)
    ok = lengths[link] == np.repeat(wanted_len, counts)
    if tails is not None:
        same = tails[link] == np.repeat(wanted_tail, counts)
        short = wanted_len < _TAIL
        ok &= same | np.repeat(short, counts) if short.any() else same
    maybe = np.flatnonzero(ok)
    if maybe.size == 0:
        return result
    owner = np.searchsorted(firsts, maybe, side="right") - 1
    found = snips[link[maybe]]
    mine = pa.array(link[maybe] if at is None else found)
    exact = pc.equal(strings.take(mine).cast(wanted.type), wanted.take(pa.array(owner)))
    hits = np.flatnonzero(pc.fill_null(exact, False).to_numpy(zero_copy_only=False))
    # Hits ascend, so the first hit of each id is its first match.
    owner, found = owner[hits], found[hits]
    earliest = np.ones(hits.size, dtype=bool)
    earliest[1:] = owner[1:] != owner[:-1]
    result[owner[earliest]] = found[earliest]
    return result


def _blocks(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Start offset and length of every embryo's block of snips."""
    frame_index = part["frame_index"].to_numpy(dtype=np.int64)
    starts = np.flatnonzero(frame_index == 0)
    lengths = part["n_frames"].to_numpy(dtype=np.int64)[starts]
    if (
        starts.size == 0
        or starts[0] != 0
        or not np.array_equal(np.diff(starts, append=len(part)), lengths)
    ):
        msg = (
            "expand_ranges needs a partition of the snip table where each embryo's "
            "snips are contiguous and sorted by frame, with frame_index 0..n_frames-1; "
            "frame ranges are positions among all of an embryo's snips, so filter "
            "snips after selecting, not before"
        )
        raise ValueError(msg)
    return starts, lengths


class _Addresses:
    """Expose an object array's pointers as an array of ``uintp``."""

    def __init__(self, objects: np.ndarray) -> None:
        self.keep_alive = objects
        self.__array_interface__ = {
            "shape": objects.shape,
            "typestr": np.dtype(np.uintp).str,
            "data": (objects.ctypes.data, True),
            "version": 3,
        }


def _distinct_specs(
    specs: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, list[FrameRange]]:
    """Factorise ``specs[rows]`` by identity: ``(code per row, objects)``.

    Rows of a batch share parsed objects (:func:`parse_range` caches strings),
    so identity is the grouping, and an object array already holds it: its
    items are pointers, read here as integers (in CPython, ``id``) without a
    Python call per row. Equal specs held by distinct objects are merely
    compiled twice, which changes no result.
    """
    specs = np.ascontiguousarray(specs, dtype=object)
    identity = np.array(_Addresses(specs), copy=True)[rows]
    codes, distinct = pd.factorize(identity)
    first = np.empty(distinct.size, dtype=np.int64)
    first[codes[::-1]] = rows[::-1]
    objects = specs[first].tolist()
    if set(map(type, objects)) != {FrameRange}:
        objects = [parse_range(s) for s in objects]
    return codes, objects


def _interval_text(
    lo: np.ndarray, lo_mode: np.ndarray, hi: np.ndarray, hi_mode: np.ndarray
) -> pa.Array:
    """Spec text of frame intervals (``t3``, ``t2..t5``, ``t7..``), vectorised."""
    lo_text = pc.if_else(pa.array(lo_mode == _M_NONE), "", _details("t", lo))
    hi_text = pc.if_else(pa.array(hi_mode == _M_NONE), "", _details("t", hi))
    single = (lo_mode != _M_NONE) & (hi_mode != _M_NONE) & (lo == hi)
    return pc.if_else(pa.array(single), lo_text, _details(lo_text, "..", hi_text))


class _Report:
    """Outcome lines, collected per kind and assembled once at the end."""

    def __init__(self) -> None:
        self.items: list[np.ndarray] = []
        self.reasons: list[np.ndarray] = []
        self.details: list[pa.Array] = []

    def add(self, items: np.ndarray, reason: str, *pieces: Any) -> None:
        if items.size:
            self.items.append(items)
            self.reasons.append(np.full(items.size, REASONS.index(reason), np.int8))
            self.details.append(_details(*pieces))


def _runs_of(mask: np.ndarray, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximal stretches of True in *mask*, never across a segment head.

    *heads* are the offsets where segments begin. Returns ``(begin, length)``
    of every stretch, in order.
    """
    before = np.empty_like(mask)
    before[0] = False
    before[1:] = mask[:-1]
    before[heads] = False
    after = np.empty_like(mask)
    after[-1] = False
    after[:-1] = mask[1:]
    after[heads[1:] - 1] = False
    begin = np.flatnonzero(mask & ~before)
    end = np.flatnonzero(mask & ~after) + 1
    return begin, end - begin


def expand_ranges(
    part: pd.DataFrame, rows: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """
    Resolve many assignment rows' frame ranges against one snip partition.

    Vectorised: rows are grouped by the kind of each part of their spec
    (position, slice, death-relative, frame interval, snip id), and each group
    costs a handful of whole-array operations, whatever the number of rows or
    of distinct specs. Memory is proportional to the rows times their embryos'
    snip counts, never rows times all snips.

    Parameters
    ----------
    part : pandas.DataFrame
        One partition of the snip table, indexed by ``snip_id``, with columns
        ``embryo_id``, ``frame``, ``frame_index``, ``n_frames`` and
        ``death_frame`` (nullable ``Int64``). Each embryo's snips are contiguous
        and sorted by frame, and all of them are present.
    rows : pandas.DataFrame
        Columns ``row`` (int, unique), ``embryo_id`` and ``spec`` (parsed
        :class:`FrameRange` objects; strings are parsed too). Rows whose embryo
        is not in *part* are ignored: the caller routes rows to partitions.
        Rows sharing a spec should share the parsed object (as
        :func:`parse_range` does for equal strings): specs are grouped by
        identity, and each distinct object costs a little Python.

    Returns
    -------
    pairs : pandas.DataFrame
        int64 columns ``row`` and ``pos`` (``part.iloc`` position of a selected
        snip), one line per selected pair, sorted by ``(row, pos)``.
    outcomes : pandas.DataFrame
        Columns ``row`` (int64), ``reason`` (one of :data:`REASONS`) and
        ``detail`` (a message naming the embryo and the index, frame or id).
        Every part that reports gives one line, even when the row selects
        other snips (``[0:3, 12]``). A row that selects nothing gets exactly
        one ``empty_selection`` line if none of its parts reported, and only
        its specific reasons otherwise. Sorted by row, then part.

    Raises
    ------
    ValueError
        If *part* breaks the layout above, or *rows* repeats a row number.
    RangeSyntaxError
        If a spec in *rows* is a malformed string.

    Examples
    --------
    >>> part = pd.DataFrame(
    ...     {"embryo_id": ["e1"] * 4, "frame": [0, 1, 3, 4], "frame_index": [0, 1, 2, 3],
    ...      "n_frames": 4, "death_frame": pd.array([3, 3, 3, 3], dtype="Int64")},
    ...     index=[f"20240411_A01_e01_s000{f}" for f in (0, 1, 3, 4)])
    >>> rows = pd.DataFrame({"row": [0, 1], "embryo_id": ["e1", "e1"],
    ...                      "spec": [parse_range("death:"), parse_range("[1, t2]")]})
    >>> pairs, outcomes = expand_ranges(part, rows)
    >>> pairs.to_numpy().tolist()
    [[0, 2], [0, 3], [1, 1]]
    >>> outcomes.to_numpy().tolist()
    [[1, 'frame_not_found', 'embryo e1 has no snip at t2 (its frames are t0..t4)']]
    """
    if len(part) == 0 or len(rows) == 0:
        return _empty_outputs()
    starts, lengths = _blocks(part)
    n_blocks = starts.size

    # The embryo of each row, in one hash pass over block ids then row ids:
    # codes follow first appearance, so block ids are unique iff theirs are
    # 0..n_blocks-1, and a row's code is its block (>= n_blocks: not here).
    # (Encoding a chunked array shares one dictionary between the chunks and
    # saves copying the ids into one array.)
    block_ids = _arrow_strings(part["embryo_id"], starts)
    both = pa.chunked_array([block_ids, _arrow_strings(rows["embryo_id"])])
    encoded = pc.dictionary_encode(both, null_encoding="encode").chunks
    codes = np.concatenate(
        [chunk.indices.to_numpy(zero_copy_only=False) for chunk in encoded]
    ).astype(np.int64)
    misplaced = codes[:n_blocks] != np.arange(n_blocks)
    if misplaced.any():
        dup = block_ids[int(np.argmax(misplaced))]
        msg = (
            f"embryo {dup} is not contiguous in the partition (no embryo may be split)"
        )
        raise ValueError(msg)
    block_of_row = codes[n_blocks:]

    # Entries: the rows of this partition, sorted by row number, so that the
    # pairs come out already sorted by (row, pos).
    keep = np.flatnonzero(block_of_row < n_blocks)
    if keep.size == 0:
        return _empty_outputs()
    row_numbers = rows["row"].to_numpy(dtype=np.int64)[keep]
    if (row_numbers[1:] < row_numbers[:-1]).any():
        order = np.argsort(row_numbers, kind="stable")
        keep, row_numbers = keep[order], row_numbers[order]
    repeated = row_numbers[1:] == row_numbers[:-1]
    if repeated.any():
        msg = f"rows must have unique row numbers; row {row_numbers[1:][repeated][0]} appears twice"
        raise ValueError(msg)
    e_block = block_of_row[keep]
    e_start = starts[e_block]
    e_n = lengths[e_block]
    n_entries = keep.size

    def embryo_of(entries: np.ndarray) -> pa.Array:
        return block_ids.take(pa.array(e_block[entries]))

    # One C-speed step per *distinct* spec object: its precompiled records,
    # as bytes joined once, then one column per field.
    spec_code, specs = _distinct_specs(rows["spec"].to_numpy(dtype=object), keep)
    blobs = list(map(operator.attrgetter("_records"), specs))
    n_parts = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    n_parts //= _N_FIELDS * 8
    records = np.frombuffer(b"".join(blobs), dtype=np.int64)
    records = np.ascontiguousarray(records.reshape(-1, _N_FIELDS).T)
    record_first = np.cumsum(n_parts) - n_parts

    @functools.cache
    def spec_texts() -> pa.Array:
        texts = map(operator.attrgetter("canonical"), specs)
        return pa.array(list(texts), type=pa.string())

    # Items: one per (entry, part of its spec), with the part's record.
    entry_parts = n_parts[spec_code]
    if (entry_parts == 1).all():
        item_entry = np.arange(n_entries)
        item_number = np.zeros(n_entries, dtype=np.int64)
        item_rec = record_first[spec_code]
    else:
        item_entry, item_number = _ranges(np.zeros(n_entries, np.int64), entry_parts)
        item_rec = record_first[spec_code[item_entry]] + item_number
    fields = np.take(records, item_rec, axis=1)
    kind, a, a_mode, b, b_mode, step = fields[:6]
    n = e_n[item_entry]
    start0 = e_start[item_entry]
    frame = part["frame"].to_numpy(dtype=np.int64)
    report = _Report()

    def spec_of(items: np.ndarray) -> pa.Array:
        return spec_texts().take(pa.array(spec_code[item_entry[items]]))

    # Death position per item, only where a part refers to death.
    uses_death = (a_mode == _M_DEATH) | (b_mode == _M_DEATH)
    death_pos = np.full(item_entry.size, -1, dtype=np.int64)
    death_bad = np.zeros(item_entry.size, dtype=bool)
    need = np.flatnonzero(uses_death)
    if need.size:
        at, span = start0[need], n[need]
        death_col = part["death_frame"].array.take(at)
        has = ~np.asarray(death_col.isna(), dtype=bool)
        death_val = np.asarray(death_col.to_numpy(dtype=np.int64, na_value=0))
        offset = _segmented_searchsorted(frame, at, span, death_val, "left")
        found = has & (offset < span)
        found[found] = frame[at[found] + offset[found]] == death_val[found]
        death_pos[need] = np.where(found, offset, -1)
        death_bad[need] = ~found
        none, missing = need[~has], need[has & ~found]
        report.add(
            none, NO_DEATH_FRAME, "embryo ", embryo_of(item_entry[none]),
            " has no death frame, needed by '", spec_of(none), "'",
        )  # fmt: skip
        report.add(
            missing, FRAME_NOT_FOUND, "death frame ", death_val[has & ~found],
            " of embryo ", embryo_of(item_entry[missing]),
            " is not one of its snips, needed by '", spec_of(missing), "'",
        )  # fmt: skip

    # Every item becomes an arithmetic run (first, step, count) of positions.
    first = np.zeros(item_entry.size, dtype=np.int64)
    run_step = np.ones(item_entry.size, dtype=np.int64)
    count = np.zeros(item_entry.size, dtype=np.int64)

    # Slices (with plain or resolved death bounds), `all` included.
    sel = np.flatnonzero((kind == _K_SPAN) & ~death_bad)
    if sel.size:
        d = death_pos[sel]
        av = np.where(a_mode[sel] == _M_DEATH, np.maximum(d + a[sel], 0), a[sel])
        bv = np.where(b_mode[sel] == _M_DEATH, np.maximum(d + b[sel], 0), b[sel])
        start, size = _slice_indices(
            av, a_mode[sel], bv, b_mode[sel], step[sel], n[sel]
        )
        # Runs go ascending whatever the step: the result is a mask.
        backwards = step[sel] < 0
        first[sel] = np.where(backwards, start + step[sel] * (size - 1), start)
        run_step[sel] = np.abs(step[sel])
        count[sel] = size

    # Single positions: plain ones count from the end, death ones never do.
    sel = np.flatnonzero((kind == _K_POINT) & ~death_bad)
    if sel.size:
        v, ns, is_death = a[sel], n[sel], a_mode[sel] == _M_DEATH
        pos = np.where(is_death, death_pos[sel] + v, np.where(v < 0, v + ns, v))
        ok = (pos >= 0) & (pos < ns)
        first[sel], count[sel] = pos, ok
        miss = sel[~ok]
        plain, dead = miss[a_mode[miss] == _M_PLAIN], miss[a_mode[miss] == _M_DEATH]
        report.add(
            plain, INDEX_OUT_OF_RANGE, "position ", a[plain], " is outside [-",
            n[plain], ", ", n[plain], ") for embryo ", embryo_of(item_entry[plain]),
        )  # fmt: skip
        report.add(
            dead, INDEX_OUT_OF_RANGE, "death",
            pc.if_else(pa.array(a[dead] < 0), "-", "+"),
            np.abs(a[dead]), " is position ", death_pos[dead] + a[dead],
            ", outside [0, ", n[dead], ") for embryo ", embryo_of(item_entry[dead]),
        )  # fmt: skip

    # Frame intervals: segmented binary searches (for the ends that are not
    # open) give a contiguous run.
    sel = np.flatnonzero(kind == _K_FRAMES)
    if sel.size:
        left = np.zeros(sel.size, dtype=np.int64)
        right = n[sel].copy()
        for side, mode, value, out in (
            ("left", a_mode, a, left),
            ("right", b_mode, b, right),
        ):
            bounded = np.flatnonzero(mode[sel] != _M_NONE)
            if bounded.size:
                its = sel[bounded]
                out[bounded] = _segmented_searchsorted(
                    frame, start0[its], n[its], value[its], side
                )
        first[sel], count[sel] = left, np.maximum(right - left, 0)
        miss = sel[count[sel] == 0]
        report.add(
            miss, FRAME_NOT_FOUND, "embryo ", embryo_of(item_entry[miss]),
            " has no snip at ", _interval_text(a[miss], a_mode[miss], b[miss], b_mode[miss]),
            " (its frames are t", frame[start0[miss]], "..t",
            frame[start0[miss] + n[miss] - 1], ")",
        )  # fmt: skip

    # Snip ids: each wanted id against its own embryo's snips only (never the
    # whole partition), by fingerprint over the arrow buffers, then exactly.
    sel = np.flatnonzero(kind == _K_SNIP)
    if sel.size:
        # Every record's snip id ("" for other parts) as one arrow array, from
        # the specs' id bytes laid end to end and the lengths in the records.
        ends = np.cumsum(records[6])
        snip_ids = pa.LargeStringArray.from_buffers(
            ends.size,
            pa.py_buffer(np.concatenate([np.zeros(1, np.int64), ends])),
            pa.py_buffer(b"".join(map(operator.attrgetter("_snip_bytes"), specs))),
        )
        wanted = snip_ids.take(pa.array(item_rec[sel]))
        # The ids wanted in one entry share its block: items of an entry are
        # consecutive, so the blocks are the entries' runs in sel.
        new_entry = np.ones(sel.size, dtype=bool)
        new_entry[1:] = item_entry[sel[1:]] != item_entry[sel[:-1]]
        heads = sel[new_entry]
        where = _find_snip_ids(
            part.index, start0[heads], n[heads], np.cumsum(new_entry) - 1,
            fields[6][sel], fields[7][sel], wanted,
        )  # fmt: skip
        found = where >= 0
        first[sel[found]] = where[found] - start0[sel[found]]
        count[sel[found]] = 1
        lost = np.flatnonzero(count[sel] == 0)
        report.add(
            sel[lost], UNKNOWN_SNIP_ID, wanted.take(pa.array(lost)),
            " is not a snip of embryo ", embryo_of(item_entry[sel[lost]]),
        )  # fmt: skip

    # Pairs, sorted by (row, pos) and unique. Runs are ascending, so an entry
    # with one run (most rows) is done; entries with several go through a
    # mask over their blocks laid end to end, whose stretches of set bits are
    # their union, sorted and de-duplicated without a sort. Then each entry's
    # runs, in entry order, expand in one pass.
    nonempty = count > 0
    runs_per_entry = np.bincount(item_entry[nonempty], minlength=n_entries)
    several = runs_per_entry > 1
    single = np.flatnonzero(nonempty & ~several[item_entry])
    per_entry = np.zeros(n_entries, dtype=np.int64)
    per_entry[item_entry[single]] = count[single]
    if several.any():
        merged = np.flatnonzero(several)
        merged_first = np.cumsum(e_n[merged]) - e_n[merged]
        slot = np.zeros(n_entries, dtype=np.int64)
        slot[merged] = merged_first
        runs = np.flatnonzero(nonempty & several[item_entry])
        flat = _progressions(
            slot[item_entry[runs]] + first[runs], run_step[runs], count[runs]
        )
        mask = np.zeros(int(e_n[merged].sum()), dtype=bool)
        mask[flat] = True
        begin, length = _runs_of(mask, merged_first)
        # Every merged entry has at least one stretch (its runs are not empty).
        stretch_of = np.searchsorted(merged_first, begin, side="right") - 1
        stretches = np.bincount(stretch_of, minlength=merged.size)
        stretch_first = np.cumsum(stretches) - stretches
        per_entry[merged] = np.add.reduceat(length, stretch_first)
        runs_per_entry[merged] = stretches
        out_runs = np.cumsum(runs_per_entry) - runs_per_entry
        total = int(runs_per_entry.sum())
        out_first = np.empty(total, dtype=np.int64)
        out_step = np.ones(total, dtype=np.int64)
        out_count = np.empty(total, dtype=np.int64)
        dest = out_runs[item_entry[single]]
        out_first[dest] = e_start[item_entry[single]] + first[single]
        out_step[dest] = run_step[single]
        out_count[dest] = count[single]
        dest = _progressions(out_runs[merged], 1, stretches)
        out_first[dest] = begin + (e_start[merged] - merged_first)[stretch_of]
        out_count[dest] = length
        pos = _progressions(out_first, out_step, out_count)
    else:
        pos = _progressions(
            e_start[item_entry[single]] + first[single], run_step[single], count[single]
        )
    pairs = pd.DataFrame(
        {_ROW: np.repeat(row_numbers, per_entry), _POS: pos}, copy=False
    )

    # empty_selection only for rows with nothing more specific to say.
    reported = np.zeros(n_entries, dtype=bool)
    if report.items:
        reported[item_entry[np.concatenate(report.items)]] = True
    empty = np.flatnonzero((per_entry == 0) & ~reported)
    out_entry = [item_entry[i] for i in report.items]
    out_rank = [item_number[i] for i in report.items]
    if empty.size:
        out_entry.append(empty)
        out_rank.append(n_parts[spec_code[empty]])
        report.reasons.append(
            np.full(empty.size, REASONS.index(EMPTY_SELECTION), np.int8)
        )
        report.details.append(
            _details(
                "'", spec_texts().take(pa.array(spec_code[empty])),
                "' selects no snip of embryo ", embryo_of(empty), " (", e_n[empty],
                " snips)",
            )
        )  # fmt: skip
    if not out_entry:
        return pairs, _empty_outcomes()
    entry_all = np.concatenate(out_entry)
    sort = pa.array(np.lexsort((np.concatenate(out_rank), entry_all)))
    reasons = pa.array(REASONS, type=pa.string())
    reasons = reasons.take(pa.array(np.concatenate(report.reasons))).take(sort)
    details = pa.concat_arrays(report.details).take(sort)
    outcomes = pd.DataFrame(
        {
            _ROW: row_numbers[entry_all[sort.to_numpy()]],
            "reason": _text_column(reasons),
            "detail": _text_column(details),
        },
        copy=False,
    )
    return pairs, outcomes
