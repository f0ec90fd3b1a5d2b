"""Columnar view of a store document, and the load-time checks that use it.

Reading a store builds its snip table once: C-level passes (``map`` with
``itemgetter``/``dict.get``), run block by block so each block stays in the CPU
cache, pull each field out of the parsed JSON into a column, and every rule of
the contract that relates values to each other (ids, vocabulary,
``death_frame``, DEAD permanence, duplicate flags) is then checked with
numpy/pyarrow/pandas over whole columns; messages and JSON paths are built only
for the values that fail. The table is cached on the store and is exactly what
:func:`pipeline.snips_from_store` partitions, so validation and flattening cost
one pass together. :func:`build_tables_streamed` does the same for a document
handed over a block of embryos at a time (each block's objects can go once its
part of the table is built).

Structure (types, required and unexpected keys) is checked by cheap set
comparisons in the same comprehensions; an embryo that fails them is re-checked
by the JSON Schema walker in :mod:`pipeline._jsonschema` to say exactly what is
wrong, and is left out of the table. An integer beyond 64 bits (JSON allows it;
the table's int64/float64 columns do not) is looked for only when an Arrow
conversion fails, and its embryo is then checked as malformed, from the start.

A streamed read does not need the dicts at all: :func:`parse_piece` decodes a
block of embryos with msgspec straight into structs whose types are the
common, valid shape, which checks the structure as it parses, and the fields
are taken from the structs. A block outside those types is parsed by orjson
and goes the way above, so both give the same tables and problems
(``tests/test_typed_pieces.py`` holds them together).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import ids
from pipeline._jsonschema import _short, check, json_path, store_schema
from pipeline.schema import RESERVED_COLUMNS, SNIP_COLUMNS, SNIP_INDEX, STRING

__all__ = ["Tables", "build_tables", "build_tables_streamed", "top_problems", "flags_table", "TIMESTAMP_PATTERN"]

TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"

_EMBRYO_KEYS = frozenset(["source", "genotype", "treatments", "death_frame", "flags", "snips"])
_SNIP_REQUIRED = frozenset(["phenotype", "flags"])
_SNIP_KEYS = _SNIP_REQUIRED | {"frame", "measurements"}
_PHENO_REQUIRED = frozenset(["value", "author", "timestamp"])
_PHENO_KEYS = _PHENO_REQUIRED | {"confidence", "notes"}
_FLAG_REQUIRED = _PHENO_REQUIRED
_FLAG_KEYS = _FLAG_REQUIRED | {"severity", "auto_generated", "notes", "confidence"}
_NUMBER = (int, float)
#: The integers the snip table holds (int64): JSON allows any, Arrow does not.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Problem = tuple[str, str]


@dataclass
class Tables:
    """Columnar form of a store: the snip table and per-embryo facts."""

    snips: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    measurement_keys: list[str] = field(default_factory=list)
    #: Whether ``snips`` is known to be sorted by its index (set by the store).
    sorted: bool = False
    #: Embryos in the document (sound or not), and the experiments and
    #: videos of the sound ones: counts without the document.
    n_embryos: int = 0
    experiments: set[str] = field(default_factory=set)
    videos: set[str] = field(default_factory=set)


def vocab_sets(vocab: dict[str, Any]) -> dict[str, Any]:
    return {
        "phenotypes": set(vocab["phenotypes"]),
        "genotypes": set(vocab["genotypes"]),
        "zygosity": set(vocab["zygosity"]),
        "flags": {level: set(values) for level, values in vocab["flags"].items()},
        "severity": set(vocab["severity_levels"]),
    }


def suggest(value: str, choices: set[str] | list[str]) -> str:
    """Say which valid value *value* most likely meant.

    Parameters
    ----------
    value : str
        The unknown value.
    choices : iterable of str
        The valid values.

    Returns
    -------
    str
        ``" (did you mean 'X'?)"`` or an empty string.

    Examples
    --------
    >>> suggest("dead", {"DEAD", "NONE"})
    " (did you mean 'DEAD'?)"
    """
    import difflib

    by_upper = {c.upper(): c for c in choices}
    if isinstance(value, str) and value.strip().upper() in by_upper:
        return f" (did you mean {by_upper[value.strip().upper()]!r}?)"
    close = difflib.get_close_matches(str(value).upper(), list(by_upper), n=1, cutoff=0.6)
    return f" (did you mean {by_upper[close[0]]!r}?)" if close else ""


def _bad_types(values: list[Any], allowed: tuple[type, ...]) -> list[int]:
    # A set of types is one C-level pass; only on failure do we look for where.
    if {v.__class__ for v in values} <= set(allowed):
        return []
    return [i for i, v in enumerate(values) if v.__class__ not in allowed]


def build_tables(doc: dict[str, Any], vocab: dict[str, Any]) -> Tables:
    """Check a store document and build its snip table.

    Parameters
    ----------
    doc : dict
        A parsed single-file store (schema version 1).
    vocab : dict
        The vocabulary in force (the store's ``permitted_values`` or the default).

    Returns
    -------
    Tables
        The snip table (index ``snip_id``, sorted) and every problem found, each
        ``(json_path, message)``. The table leaves out malformed embryos.
    """
    sets = vocab_sets(vocab)
    problems = top_problems(doc)
    embryos = doc.get("embryos")
    if not isinstance(embryos, dict):
        problems.append((json_path("embryos"), "expected an object of embryos keyed by embryo id"))
        embryos = {}
    tables = _embryo_tables(embryos, sets)
    tables.problems[:0] = problems
    tables.problems.extend(_store_flag_checks(doc, sets))
    return tables


def top_problems(doc: dict[str, Any]) -> list[Problem]:
    """Problems of everything but the embryos (small: checked by the schema walker)."""
    problems: list[Problem] = []
    schema = store_schema()
    top = {k: v for k, v in doc.items() if k != "embryos"}
    top_schema = dict(schema, required=[k for k in schema["required"] if k != "embryos"])
    if not _walk(top, top_schema, (), problems):
        problems.extend(_wide_int_problems(top, (), problems))
    return problems


def build_tables_streamed(
    blocks: Iterator[dict[str, Any]], rest: Callable[[], dict[str, Any]], vocab: dict[str, Any]
) -> Tables:
    """Build the tables of a store read a block of embryos at a time.

    Each block's Python objects can be freed as soon as its part of the table
    is built, so the whole document is never in memory: only the table.

    Parameters
    ----------
    blocks : iterator of dict
        The ``"embryos"`` object in consecutive pieces, each ``{embryo_id: embryo}``.
    rest : callable
        Returns the document's other top-level members (``"embryos"``
        empty); called once *blocks* is exhausted (in a file some members
        may follow the embryos).
    vocab : dict
        The vocabulary in force.

    Returns
    -------
    Tables
        As :func:`build_tables` on the whole document (the same table and
        problems; problems come block by block).

    Raises
    ------
    ValueError
        If an embryo id appears in two blocks (a JSON object with a repeated
        key, which a whole-document parse resolves by keeping the last).
    """
    sets = vocab_sets(vocab)
    pieces: list[Tables] = []
    embryo_ids: set[str] = set()
    for block in blocks:
        add_block(pieces, embryo_ids, block, sets)
        del block
    return _combine(pieces, rest(), sets)


def add_block(pieces: list[Tables], embryo_ids: set[str], block: dict[str, Any], sets: dict[str, Any]) -> None:
    """Append the tables of one block of embryos to *pieces* (see :func:`build_tables_streamed`).

    Raises
    ------
    ValueError
        If an embryo id of *block* is already in *embryo_ids* (which gets
        the block's ids).
    """
    before = len(embryo_ids)
    embryo_ids.update(block)
    if len(embryo_ids) != before + len(block):
        msg = "an embryo id appears twice in the embryos object"
        raise ValueError(msg)
    pieces.append(_embryo_tables(block, sets))


def combine_pieces(pieces: list[Tables], head: dict[str, Any], vocab: dict[str, Any]) -> Tables:
    """Join the tables of consecutive blocks into the store's tables.

    Parameters
    ----------
    pieces : list of Tables
        Per block, in file order (emptied here).
    head : dict
        Every top-level member of the document but the embryos.
    vocab : dict
        The vocabulary the pieces were checked with.
    """
    return _combine(pieces, head, vocab_sets(vocab))


def _combine(pieces: list[Tables], head: dict[str, Any], sets: dict[str, Any]) -> Tables:
    seen = sum(piece.n_embryos for piece in pieces)
    problems = top_problems(head)
    problems.extend(p for piece in pieces for p in piece.problems)
    problems.extend(_store_flag_checks(head, sets))
    experiments = set().union(*(piece.experiments for piece in pieces))
    videos = set().union(*(piece.videos for piece in pieces))
    keys = sorted(set().union(*(piece.measurement_keys for piece in pieces)))
    frames = [piece.snips for piece in pieces]
    pieces.clear()
    if frames:
        snips = pd.concat(frames) if len(frames) > 1 else frames[0]
        frames.clear()
        # A block without some measurement key leaves its rows missing (NaN).
        snips = snips[[*SNIP_COLUMNS, *keys]]
    else:
        snips = _embryo_tables({}, sets).snips
    tables = Tables(snips=snips, problems=problems, measurement_keys=keys)
    tables.n_embryos, tables.experiments, tables.videos = seen, experiments, videos
    return tables


def _embryo_tables(embryos: dict[str, Any], sets: dict[str, Any]) -> Tables:
    # The embryos' part of build_tables: their problems and their snip table.
    # In the order of their snip ids ("{embryo_id}_..."), so that a table whose
    # embryos list their snips in order comes out sorted (no sort of 1M ids).
    if embryos.__class__ is TypedPiece or (embryos and next(iter(embryos.values())).__class__ is _Embryo):
        # From parse_piece (or part of what it gave, which then passes too).
        fields = _typed_fields(embryos)
        if fields is None:  # pragma: no cover - a part of a sound piece is sound
            msg = "typed embryos the dict path must read"
            raise ValueError(msg)
        return _check_and_build(sets, *fields, set(), [])
    embryo_ids = sorted(embryos, key=lambda e: f"{e}_")
    embryo_objs = [embryos[e] for e in embryo_ids]
    bad_embryos: set[int] = {
        i
        for i, e in enumerate(embryo_objs)
        if e.__class__ is not dict or e.keys() != _EMBRYO_KEYS or e["snips"].__class__ is not dict
    }
    # Snips of the structurally sound embryos, in one flat list.
    counts = np.zeros(len(embryo_objs), dtype=np.int64)
    snip_ids: list[str] = []
    snip_objs: list[Any] = []
    for i, e in enumerate(embryo_objs):
        if i in bad_embryos:
            continue
        snips = e["snips"]
        counts[i] = len(snips)
        snip_ids.extend(snips)
        snip_objs.extend(snips.values())
    owner = np.repeat(np.arange(len(embryo_objs)), counts)

    columns = _extract_fast(snip_objs)
    if columns is None:
        columns = _extract_robust(snip_objs, owner, bad_embryos)
    args = (sets, embryo_ids, embryo_objs, owner, snip_ids, columns)
    try:
        return _check_and_build(*args, set(bad_embryos), [])
    except (pa.ArrowInvalid, OverflowError):
        # An integer beyond 64 bits (a frame, confidence or measurement) fails
        # the table's Arrow conversions. That is rare, so it is looked for only
        # now: its embryo is checked as malformed, from the start.
        wide = _wide_int_embryos(columns, owner)
        if not wide:
            raise
        return _check_and_build(*args, bad_embryos | wide, [])


def _check_and_build(
    sets: dict[str, Any],
    embryo_ids: list[str],
    embryo_objs: list[Any],
    owner: np.ndarray,
    snip_ids: list[str],
    columns: tuple[Any, ...],
    bad_embryos: set[int],
    problems: list[Problem],
) -> Tables:
    # Everything after the extraction: the walker on the malformed embryos,
    # the table of the others and the checks that use it. Rebinds, never
    # mutates, the extracted columns, so it can run again (see build_tables).
    defs = store_schema()["$defs"]
    values, authors, stamps, confs, frames, flag_lists, keys, n_flags = columns

    # Precise structural messages for the embryos that failed, via the walker.
    for i in sorted(bad_embryos):
        before = len(problems)
        path = ("embryos", embryo_ids[i])
        _walk(embryo_objs[i], defs["embryo"], path, problems)
        problems.extend(_reserved_measurement_problems(embryo_objs[i], embryo_ids[i], problems[before:]))
        problems.extend(_wide_int_problems(embryo_objs[i], path, problems[before:]))
        if len(problems) == before:
            problems.append((json_path("embryos", embryo_ids[i]), "malformed embryo"))
    # Embryo-level fields: a cheap shape test, the walker only where it fails.
    for i, e in enumerate(embryo_objs):
        if i not in bad_embryos and not _embryo_shape_ok(e):
            before = len(problems)
            path = ("embryos", embryo_ids[i])
            shallow = dict(e, snips={})
            _walk(shallow, defs["embryo"], path, problems)
            problems.extend(_wide_int_problems(shallow, path, problems[before:]))
            if len(problems) != before:
                bad_embryos.add(i)

    if bad_embryos:
        keep_snip = ~np.isin(owner, np.fromiter(bad_embryos, dtype=np.int64))
        idx = np.flatnonzero(keep_snip).tolist()
        snip_ids, values, authors, stamps, confs, frames, flag_lists = (
            col.take(pa.array(idx, type=pa.int64())) if isinstance(col, pa.Array) else [col[j] for j in idx]
            for col in (snip_ids, values, authors, stamps, confs, frames, flag_lists)
        )
        owner = owner[keep_snip]
        n_flags = n_flags[keep_snip]
        keys = {k: [col[j] for j in idx] for k, col in keys.items()}

    snips, id_checks = _assemble(
        embryo_ids, embryo_objs, bad_embryos, owner, snip_ids, values, authors, stamps,
        confs, frames, flag_lists, n_flags, keys,
    )
    problems.extend(_semantic_checks(snips, id_checks, embryo_ids, embryo_objs, bad_embryos, owner, sets, flag_lists, snip_ids))
    sources = [e["source"] for i, e in enumerate(embryo_objs) if i not in bad_embryos]
    return Tables(
        snips=snips,
        problems=problems,
        measurement_keys=list(keys),
        n_embryos=len(embryo_objs),
        experiments={s["experiment_id"] for s in sources},
        videos={s["video_id"] for s in sources},
    )


_MISSING = float("nan")  # a unique NaN object: list.count() finds it by identity


#: Snips per block in the fast path: a block's objects (~1 KB per snip) stay
#: in the CPU cache from one pass to the next, where a pass over a million
#: snips would miss the cache at every object (~0.1 s per pass).
_BLOCK = 2048


def _extract_fast(snip_objs: list[Any]) -> tuple[Any, ...] | None:
    # The common case, a valid file, costs one C-level pass per field: map()
    # with itemgetter/dict.get runs no Python bytecode per snip. Unexpected
    # keys show up as a difference in the total number of keys. Anything odd
    # returns None, and the robust path finds exactly where. The passes run
    # block by block (see _BLOCK) and no pass is repeated: a column's set of
    # types tells whether counting its nulls is needed.
    columns = _SnipColumns()
    none = type(None)
    for start in range(0, len(snip_objs), _BLOCK):
        snips = snip_objs[start : start + _BLOCK]
        n = len(snips)
        try:
            phenos = list(map(itemgetter("phenotype"), snips))
            flags = list(map(itemgetter("flags"), snips))
            frame = list(map(dict.get, snips, repeat("frame")))
            measures = list(map(dict.get, snips, repeat("measurements")))
            frame_types = set(map(type, frame))
            measure_types = set(map(type, measures))
            n_no_frame = frame.count(None) if none in frame_types else 0
            n_no_measures = measures.count(None) if none in measure_types else 0
            if sum(map(len, snips)) != 4 * n - n_no_frame - n_no_measures:
                return None
            value = list(map(itemgetter("value"), phenos))
            author = list(map(itemgetter("author"), phenos))
            stamp = list(map(itemgetter("timestamp"), phenos))
            conf = list(map(dict.get, phenos, repeat("confidence"), repeat(_MISSING)))
            n_keys = 4 * n - conf.count(_MISSING)
            n_pheno_keys = sum(map(len, phenos))
            if n_pheno_keys != n_keys:
                # Only then can there be notes (or an unexpected key). Absent
                # notes are _ABSENT, a type of its own: a float note is a float.
                notes = list(map(dict.get, phenos, repeat("notes"), repeat(_ABSENT)))
                if n_pheno_keys != n_keys + n - notes.count(_ABSENT) or not set(map(type, notes)) <= {str, _Absent}:
                    return None
        except (KeyError, TypeError, AttributeError):
            return None
        if not (
            set(map(type, flags)) <= {list}
            and set(map(type, value)) | set(map(type, author)) | set(map(type, stamp)) <= {str}
            and set(map(type, conf)) <= {float, int}
            and frame_types <= {int, none}
            and measure_types <= {dict, none}
        ):
            return None
        if not columns.add(value, author, stamp, conf, frame, flags, measures, n_no_measures):
            return None
    return columns.result()


class _SnipColumns:
    """The snip fields the fast paths take out, a block at a time (see :func:`_extract_fast`)."""

    def __init__(self) -> None:
        self.strings: tuple[list[pa.Array], ...] = ([], [], [])  # value, author, timestamp
        self.confs: list[Any] = []
        self.frames: list[Any] = []
        self.flag_lists: list[Any] = []
        self.n_flags: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self.measurements = _MeasurementColumns()

    def add(
        self,
        value: list[str],
        author: list[str],
        stamp: list[str],
        conf: Iterable[Any],
        frame: Iterable[Any],
        flags: list[Any],
        measures: list[Any],
        n_no_measures: int,
    ) -> bool:
        """Append a block whose types are checked; False when the fast path cannot tell."""
        if not self.measurements.add(measures, n_no_measures):
            return False
        # Most snips have no flags: check shapes only where there are some.
        counts = np.fromiter(map(len, flags), dtype=np.int64, count=len(flags))
        if not all(map(_flags_shape_ok, map(flags.__getitem__, np.flatnonzero(counts).tolist()))):
            return False
        # The phenotype's strings go to Arrow while the block is in the cache.
        for chunks, strings in zip(self.strings, (value, author, stamp), strict=True):
            chunks.append(_strings(strings))
        self.confs += conf
        self.frames += frame
        self.flag_lists += flags
        self.n_flags.append(counts)
        return True

    def result(self) -> tuple[Any, ...]:
        """``(values, authors, stamps, confs, frames, flag_lists, measurement columns, n_flags)``."""
        return (
            *(pa.chunked_array(chunks, type=pa.string()).combine_chunks() for chunks in self.strings),
            self.confs, self.frames, self.flag_lists, self.measurements.columns, np.concatenate(self.n_flags),
        )


class _Absent:
    """Stands for a key a snip does not have (a measurement, a phenotype's notes): a type of its own."""


_ABSENT = _Absent()


# Typed decoding. A block of embryos in the common, valid shape is decoded by
# msgspec straight into small structs (no dict, no key strings per snip, types
# checked as it goes), about twice as fast as a parse into dicts, and its snip
# fields come out of the structs without any of the fast path's counting. The
# types accept only what the fast path accepts and what orjson decodes to the
# same Python values (integers within 64 bits: orjson turns wider ones into
# floats). Anything else, and a block the fast path could not be sure of, is
# parsed by orjson instead, so the result and the messages are those of the
# dict path, always.

_Int = Annotated[int, msgspec.Meta(ge=_INT64_MIN, le=_INT64_MAX)]
_Scalar = str | bool | _Int | float | None
_Objects = list[dict[str, _Scalar]]


class _Phenotype(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    value: str
    author: str
    timestamp: str
    confidence: _Int | float = _MISSING  # absent: as the fast path's dict.get default
    notes: str = _ABSENT


class _Snip(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    phenotype: _Phenotype
    flags: _Objects
    # Absent is None, as dict.get gives; null is refused (None is not in the types).
    frame: _Int = None  # type: ignore[assignment]
    measurements: dict[str, _Int | float | None] = None  # type: ignore[assignment]


class _Embryo(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    source: dict[str, str]
    genotype: dict[str, _Scalar] | None
    treatments: _Objects
    death_frame: _Int | None
    flags: _Objects
    snips: dict[str, _Snip]


_DECODER = msgspec.json.Decoder(dict[str, _Embryo])


class Bounded(dict):  # type: ignore[type-arg]
    """A piece from :func:`parse_piece` whose typed decode passed: every integer in it fits in 64 bits.

    Such bytes decode to the same values with any conforming JSON parser
    (orjson turns wider integers into floats), which lets a reader take the
    document of these embryos from a faster untyped decode.
    """


class TypedPiece(Bounded):
    """Embryos decoded into structs by :func:`parse_piece`, their fields already taken out."""

    __slots__ = ("fields",)


def parse_piece(data: bytes | memoryview) -> dict[str, Any]:
    """Parse a JSON object of embryos (a piece of a store's ``"embryos"``) for the tables.

    Parameters
    ----------
    data : bytes-like
        The piece, ``{"embryo_id": {...}, ...}``.

    Returns
    -------
    dict
        A :class:`TypedPiece` when every embryo is in the common, valid
        shape (the tables of :func:`build_tables_streamed` then cost about
        half as much), otherwise the plain objects ``orjson.loads`` gives
        (in a :class:`Bounded` when the types held but the fast path would
        not take the values). Each gives the same tables and problems.

    Raises
    ------
    orjson.JSONDecodeError
        If *data* is not JSON (as ``orjson.loads``).
    """
    try:
        embryos = _DECODER.decode(data)
    except msgspec.DecodeError:  # another shape, or not JSON: orjson says which
        return orjson.loads(data)
    fields = _typed_fields(embryos)
    if fields is None:
        return Bounded(orjson.loads(data))
    piece = TypedPiece(embryos)
    piece.fields = fields
    return piece


_SNIP_GETTERS = tuple(map(attrgetter, ("phenotype", "flags", "frame", "measurements")))
_PHENOTYPE_GETTERS = tuple(map(attrgetter, ("value", "author", "timestamp", "confidence")))


def _typed_fields(embryos: dict[str, _Embryo]) -> tuple[Any, ...] | None:
    # What _check_and_build needs of typed embryos, as _embryo_tables gives it
    # for their dicts; None when the dict path must decide (a shape the fast
    # path would not take). A TypedPiece has it already.
    if embryos.__class__ is TypedPiece:
        return embryos.fields  # type: ignore[attr-defined]
    embryo_ids = sorted(embryos, key=lambda e: f"{e}_")
    structs = [embryos[e] for e in embryo_ids]
    embryo_objs = [
        {"source": e.source, "genotype": e.genotype, "treatments": e.treatments, "death_frame": e.death_frame, "flags": e.flags, "snips": e.snips}
        for e in structs
    ]
    if not all(map(_embryo_shape_ok, embryo_objs)):
        return None
    counts = np.fromiter((len(e.snips) for e in structs), dtype=np.int64, count=len(structs))
    snip_ids: list[str] = []
    snip_objs: list[_Snip] = []
    for e in structs:
        snip_ids.extend(e.snips)
        snip_objs.extend(e.snips.values())
    columns = _extract_typed(snip_objs)
    if columns is None:
        return None
    owner = np.repeat(np.arange(len(structs)), counts)
    return embryo_ids, embryo_objs, owner, snip_ids, columns


def _extract_typed(snip_objs: list[_Snip]) -> tuple[Any, ...] | None:
    # _extract_fast for structs: the types are checked already; what is left
    # is the flags' shapes and the measurement keys (None when the fast path
    # would have given up). Block by block, as there.
    get_pheno, get_flags, get_frame, get_measures = _SNIP_GETTERS
    get_value, get_author, get_stamp, get_conf = _PHENOTYPE_GETTERS
    columns = _SnipColumns()
    for start in range(0, len(snip_objs), _BLOCK):
        snips = snip_objs[start : start + _BLOCK]
        phenos = list(map(get_pheno, snips))
        measures = list(map(get_measures, snips))
        if not columns.add(
            list(map(get_value, phenos)), list(map(get_author, phenos)), list(map(get_stamp, phenos)),
            map(get_conf, phenos), map(get_frame, snips), list(map(get_flags, snips)),
            measures, measures.count(None),
        ):
            return None
    return columns.result()


class _MeasurementColumns:
    """One list per measurement key, filled block by block by the fast path.

    Usually every snip has the same keys: take the first snip's keys and verify
    by counting that no snip has any other.
    """

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {}
        self.keys: list[str] | None = None
        self.n_before = 0  # snips seen before the first with measurements

    def add(self, measures: list[Any], n_none: int) -> bool:
        """Append a block's measurements; False when the fast path cannot tell."""
        n = len(measures)
        dicts = [m or {} for m in measures] if n_none else measures
        if self.keys is None:
            first = next((m for m in dicts if m), None)
            if first is None:
                self.n_before += n
                return True
            self.keys = sorted(first)
            if RESERVED_COLUMNS.intersection(self.keys):
                return False
            self.columns = {key: [None] * self.n_before for key in self.keys}
        present = 0
        for key in self.keys:
            column = list(map(dict.get, dicts, repeat(key), repeat(_ABSENT)))
            types = set(map(type, column))
            if _Absent in types:
                present += n - column.count(_ABSENT)
                types.discard(_Absent)
                column = [None if v is _ABSENT else v for v in column]
            else:
                present += n
            if not types <= {float, int, type(None)}:
                return False
            self.columns[key] += column
        # Any key beyond the first snip's shows up in the total count.
        return sum(map(len, dicts)) == present


def _extract_robust(snip_objs: list[Any], owner: np.ndarray, bad_embryos: set[int]) -> tuple[Any, ...]:
    """Pull the snip fields out one by one, marking embryos with malformed snips."""

    def mark_bad(positions: list[int] | np.ndarray) -> None:
        bad_embryos.update(int(x) for x in np.unique(owner[np.asarray(positions, dtype=np.int64)]))

    malformed = [
        i
        for i, s in enumerate(snip_objs)
        if s.__class__ is not dict or not (_SNIP_KEYS.issuperset(s) and "phenotype" in s and "flags" in s)
    ]
    mark_bad(malformed)
    snip_objs = _scrub(snip_objs, malformed, {"phenotype": {}, "flags": []})
    phenos = [s["phenotype"] for s in snip_objs]
    malformed = [
        i
        for i, p in enumerate(phenos)
        if p.__class__ is not dict or not (_PHENO_KEYS.issuperset(p) and "value" in p and "author" in p and "timestamp" in p)
    ]
    mark_bad(malformed)
    phenos = _scrub(phenos, malformed, {})
    values = [p.get("value") for p in phenos]
    authors = [p.get("author") for p in phenos]
    stamps = [p.get("timestamp") for p in phenos]
    # Absent is _MISSING; an explicit null is a wrong type (the schema wants a number).
    confs = [p.get("confidence", _MISSING) for p in phenos]
    frames = [s.get("frame") for s in snip_objs]
    flag_lists = [s["flags"] for s in snip_objs]
    measures = [s.get("measurements") for s in snip_objs]
    notes = list(map(dict.get, phenos, repeat("notes"), repeat("")))
    for column, allowed in (
        (values, (str,)),
        (authors, (str,)),
        (stamps, (str,)),
        (notes, (str,)),
        (confs, (float, int)),
        (frames, (int, type(None))),
        (flag_lists, (list,)),
        (measures, (dict, type(None))),
    ):
        mark_bad(_bad_types(column, allowed))
    # Measurements: flat numbers or null, keys must not collide with columns.
    present = [m for m in measures if m and m.__class__ is dict]
    keys: set[str] = set().union(*present) if present else set()
    value_types = {v.__class__ for m in present for v in m.values()}
    if not value_types <= {float, int, type(None)} or keys & RESERVED_COLUMNS:
        mark_bad([i for i, m in enumerate(measures) if m and _bad_measurements(m)])
    # Every snip-level flag list entry must be a well-formed flag object.
    mark_bad([i for i, fl in enumerate(flag_lists) if fl and not _flags_shape_ok(fl)])
    n_flags = np.fromiter((len(fl) if fl.__class__ is list else 0 for fl in flag_lists), dtype=np.int64, count=len(flag_lists))

    dicts = [m if m.__class__ is dict else {} for m in measures]
    columns = {key: [m.get(key) for m in dicts] for key in sorted(keys - RESERVED_COLUMNS)}
    return values, authors, stamps, confs, frames, flag_lists, columns, n_flags


_GENO_REQUIRED = frozenset(["value", "author", "timestamp", "confirmed"])
_GENO_KEYS = _GENO_REQUIRED | {"allele", "zygosity", "confidence", "notes"}
_TREAT_KEYS = _PHENO_REQUIRED | {"concentration", "temperature_celsius", "notes"}


def _flags_shape_ok(flags: Any) -> bool:
    return flags.__class__ is list and all(
        f.__class__ is dict
        and _FLAG_REQUIRED <= f.keys() <= _FLAG_KEYS
        and f["value"].__class__ is str
        and f.get("severity", "").__class__ is str
        and f.get("notes", "").__class__ is str
        and f.get("auto_generated", False).__class__ is bool
        and f.get("confidence", 0.0).__class__ in (int, float)
        and 0 <= f.get("confidence", 0.0) <= 1
        for f in flags
    )


def _embryo_shape_ok(e: dict[str, Any]) -> bool:
    # Mirrors the schema's embryo definition for the common, valid case; any
    # doubt sends the embryo to the schema walker for a precise message.
    src, g, death = e["source"], e["genotype"], e["death_frame"]
    if src.__class__ is not dict or src.keys() != {"experiment_id", "video_id"}:
        return False
    if src["experiment_id"].__class__ is not str or src["video_id"].__class__ is not str:
        return False
    if not (death is None or (death.__class__ is int and 0 <= death <= _INT64_MAX)):
        return False
    if g is not None:
        if g.__class__ is not dict or not (_GENO_REQUIRED <= g.keys() <= _GENO_KEYS):
            return False
        if g["value"].__class__ is not str or g["confirmed"].__class__ is not bool:
            return False
        if g.get("confidence", 0.0).__class__ not in (int, float) or not 0 <= g.get("confidence", 0.0) <= 1:
            return False
        if any(g.get(k, "").__class__ is not str for k in ("allele", "zygosity", "notes")):
            return False
    treatments = e["treatments"]
    if treatments.__class__ is not list or not all(map(_treatment_shape_ok, treatments)):
        return False
    return _flags_shape_ok(e["flags"])


def _treatment_shape_ok(t: Any) -> bool:
    if t.__class__ is not dict or not (_PHENO_REQUIRED <= t.keys() <= _TREAT_KEYS):
        return False
    if t["value"].__class__ is not str or t.get("notes", "").__class__ is not str:
        return False
    # Numbers as the schema has them: not booleans.
    return t.get("temperature_celsius", 0.0).__class__ in (int, float) and t.get(
        "concentration", 0.0
    ).__class__ in (int, float, str)


def _reserved_measurement_problems(embryo: Any, embryo_id: str, found: list[Problem]) -> list[Problem]:
    # The schema lists only the store's own field names; the package's full
    # column list governs, so name the other collisions (e.g. "is_dead") too.
    snips = embryo.get("snips") if embryo.__class__ is dict else None
    if snips.__class__ is not dict:
        return []
    seen = {path for path, _ in found}
    out: list[Problem] = []
    for sid, snip in snips.items():
        m = snip.get("measurements") if snip.__class__ is dict else None
        for key in sorted(RESERVED_COLUMNS.intersection(m)) if m.__class__ is dict else []:
            path = json_path("embryos", embryo_id, "snips", sid, "measurements", key)
            if path not in seen:
                out.append((path, f"measurement key {key!r} collides with the snip table's own column {key!r}; rename it, e.g. {key + '_measured'!r}"))
    return out


def _walk(value: Any, schema: dict[str, Any], path: tuple[str | int, ...], out: list[Problem]) -> bool:
    """Run the schema walker; an integer too large for a float is no crash.

    The walker's NaN test turns a number with a minimum or maximum into a
    float, which overflows for an integer beyond ~1.8e308. Then the value is
    walked again with such integers under the keys that have bounds replaced
    by 0 (valid there), and False is returned: :func:`_wide_int_problems`
    reports them.
    """
    found: list[Problem] = []
    try:
        check(value, schema, path, found)
        whole = True
    except OverflowError:
        found = []
        check(_without_huge_ints(value), schema, path, found)
        whole = False
    out.extend(found)
    return whole


_BOUNDED = frozenset(["frame", "death_frame", "confidence"])


def _without_huge_ints(value: Any) -> Any:
    # A copy of a JSON value with the integers too large for a float that sit
    # under a bounded key replaced by 0.
    if value.__class__ is list:
        return [_without_huge_ints(v) for v in value]
    if value.__class__ is not dict:
        return value
    return {
        k: 0 if k in _BOUNDED and v.__class__ is int and not _fits_float(v) else _without_huge_ints(v)
        for k, v in value.items()
    }


def _fits_float(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _wide_int_problems(value: Any, path: tuple[str | int, ...], found: list[Problem]) -> list[Problem]:
    """Problems for the integers beyond 64 bits in *value* that *found* lacks.

    Only frames, ``death_frame``, confidences and measurements are numbers the
    snip table or the walker's bounds need to hold; the walker accepts, for
    example, an integer frame of 2**63.
    """
    seen = {p for p, _ in found}
    out: list[Problem] = []
    for where, number in _wide_ints(value, path):
        key, parent = where[-1], where[-2] if len(where) > 1 else None
        if parent == "measurements" and isinstance(key, str):
            message = f"expected a float, found the integer {_short(number)}, which does not fit in 64 bits"
        elif key in ("frame", "death_frame"):
            message = f"expected a non-negative integer that fits in 64 bits, found {_short(number)}"
        elif key == "confidence":
            # The walker's words for a confidence out of bounds.
            message = f"expected a number {'>= 0' if number < 0 else '<= 1'}, found {_short(number)}"
        else:
            continue
        text = json_path(*where)
        if text not in seen:
            out.append((text, message))
    return out


def _wide_ints(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], int]]:
    # (path, integer) for every integer outside int64 in a JSON value.
    if value.__class__ is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            yield path, value
    elif value.__class__ is dict:
        for k, v in value.items():
            yield from _wide_ints(v, (*path, k))
    elif value.__class__ is list:
        for k, v in enumerate(value):
            yield from _wide_ints(v, (*path, k))


def _wide_int_embryos(columns: tuple[Any, ...], owner: np.ndarray) -> set[int]:
    """Embryos with a frame, confidence or measurement beyond 64 bits."""
    _, _, _, confs, frames, _, keys, _ = columns
    rows = {
        i
        for column in (confs, frames, *keys.values())
        for i, v in enumerate(column)
        if v.__class__ is int and not _INT64_MIN <= v <= _INT64_MAX
    }
    return {int(owner[i]) for i in rows}


def _scrub(objs: list[Any], positions: list[int], placeholder: Any) -> list[Any]:
    # Malformed entries are replaced so later comprehensions cannot trip on
    # them; their embryos are already marked bad and left out of the table.
    if not positions:
        return objs
    objs = list(objs)
    for i in positions:
        objs[i] = placeholder
    return objs


def _bad_measurements(m: Any) -> bool:
    if m.__class__ is not dict:
        return True
    return any(k in RESERVED_COLUMNS or v.__class__ not in (float, int, type(None)) for k, v in m.items())


def _strings(values: list[Any] | pa.Array) -> pa.Array:
    # The fast path hands over the phenotype's strings already converted.
    return values if isinstance(values, pa.Array) else pa.array(values, type=pa.string())


def _assemble(
    embryo_ids: list[str],
    embryo_objs: list[Any],
    bad: set[int],
    owner: np.ndarray,
    snip_ids: list[str],
    values: list[str] | pa.Array,
    authors: list[str] | pa.Array,
    stamps: list[str] | pa.Array,
    confs: list[Any],
    frames: list[Any],
    flag_lists: list[list[dict[str, Any]]],
    n_flags: np.ndarray,
    keys: dict[str, list[Any]],
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    # Returns the table and, aside from it, the id-check arrays for
    # _semantic_checks. Not in table.attrs: pandas deep-copies attrs on every
    # column access, and they would ride along every partition.
    n_emb = len(embryo_objs)
    ok = [i not in bad for i in range(n_emb)]
    src = [e["source"] if o else {} for e, o in zip(embryo_objs, ok, strict=True)]
    emb_video = pa.array([s.get("video_id") for s in src], type=pa.string())
    emb_exp = pa.array([s.get("experiment_id") for s in src], type=pa.string())
    genos = [e["genotype"] if o else None for e, o in zip(embryo_objs, ok, strict=True)]
    emb_geno = pa.array([g["value"] if g else None for g in genos], type=pa.string())
    emb_conf = np.array([bool(g["confirmed"]) if g else False for g in genos], dtype=bool)
    emb_death = pd.array(
        [e["death_frame"] if o else None for e, o in zip(embryo_objs, ok, strict=True)], dtype="Int64"
    )
    n = len(snip_ids)
    take = pa.array(owner, type=pa.int64())
    sid = _strings(snip_ids)
    emb = pa.array(embryo_ids, type=pa.string()).take(take) if n_emb else pa.array([], pa.string())
    has_suffix, valid, suffix_frame = _split_snip_ids(sid, emb)
    frame_arr = pa.array(frames, type=pa.int64())
    stored_null = frame_arr.is_null().to_numpy(zero_copy_only=False)
    frame = np.where(stored_null, suffix_frame, frame_arr.fill_null(-1).to_numpy())
    video = emb_video.take(take)
    frame_str = pc.utf8_lpad(pc.cast(pa.array(frame), pa.string()), 4, "0")
    image = pc.binary_join_element_wise(video, pa.scalar("_t"), frame_str, pa.scalar(""))
    # frame_index: rank of the frame within its embryo (ids need not sort by
    # frame). Snips come grouped by embryo (owner never decreases); when each
    # embryo's frames are already in order, the stable sort is the identity.
    if n and not np.all((owner[1:] != owner[:-1]) | (frame[1:] >= frame[:-1])):
        order = np.lexsort((frame, owner))
    else:
        order = np.arange(n, dtype=np.int64)
    n_per = np.bincount(owner, minlength=n_emb) if n else np.zeros(n_emb, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(n_per)[:-1]]) if n_emb else np.zeros(0, dtype=np.int64)
    frame_index = np.empty(n, dtype=np.int64)
    frame_index[order] = np.arange(n, dtype=np.int64) - starts[owner[order]]
    pheno = _strings(values)
    conf = _numbers(confs)
    # A NaN confidence would be written as null: report it. Absent ones are the
    # _MISSING object, so the (cheap) counts differ only when there is one.
    nan_conf = np.zeros(n, dtype=bool)
    if np.isnan(conf).sum() != confs.count(_MISSING):
        nan_conf = np.fromiter((c is not _MISSING and isinstance(c, float) and math.isnan(c) for c in confs), dtype=bool, count=n)
    flag_text = np.full(n, "", dtype=object)
    for i in np.flatnonzero(n_flags).tolist():
        flag_text[i] = ",".join(sorted({f["value"] for f in flag_lists[i]}))
    columns: dict[str, Any] = {
        "experiment_id": emb_exp.take(take),
        "video_id": video,
        "embryo_id": emb,
        "image_id": image,
        "frame": frame,
        "frame_index": frame_index,
        "n_frames": n_per[owner] if n else np.zeros(0, dtype=np.int64),
        "phenotype": pheno,
        "phenotype_confidence": conf,
        "phenotype_author": _strings(authors),
        "phenotype_timestamp": _strings(stamps),
        "genotype": emb_geno.take(take),
        "genotype_confirmed": emb_conf[owner] if n else np.zeros(0, dtype=bool),
        "death_frame": emb_death.take(owner) if n else pd.array([], dtype="Int64"),
        "is_dead": pc.equal(pheno, pa.scalar("DEAD")).to_numpy(zero_copy_only=False) if n else np.zeros(0, dtype=bool),
        "n_flags": n_flags,
        "flag_list": pa.array(flag_text, type=pa.string()),
    }
    for key, column in keys.items():
        columns[key] = _numbers(column)
    table = pd.DataFrame(
        {name: _to_pandas(col, SNIP_COLUMNS.get(name, np.float64)) for name, col in columns.items()},
        index=pd.Index(pd.arrays.ArrowStringArray(sid), name=SNIP_INDEX),
        copy=False,
    )
    checks = {
        "valid_id": valid,
        "has_suffix": has_suffix,
        "suffix_frame": suffix_frame,
        "stored_frame": ~stored_null,
        "order": order,
        "nan_confidence": nan_conf,
    }
    return table, checks


def _utf8(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    # A string array's offsets (int64, from 0) and its UTF-8 bytes.
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.cast(pa.large_string()).combine_chunks()
    if len(arr) == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    _, offset_buf, data_buf = arr.buffers()
    kind = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(offset_buf, dtype=kind)[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


def _split_snip_ids(sid: pa.Array, emb: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Find each snip id's suffix and check the id is its embryo id plus it.

    The same as matching ``_[st]?(\d{3,4})$`` on each id and comparing embryo
    id + suffix with the id, but on the UTF-8 bytes with numpy (a regex over a
    million ids cost ~0.35 s): the suffix is ASCII, so it is the id's last 4, 5
    or 6 bytes, and at most one of those lengths can match.

    Returns
    -------
    has_suffix, valid : numpy.ndarray of bool
        Whether the id ends in a suffix; whether it is exactly its embryo id
        followed by that suffix.
    suffix_frame : numpy.ndarray of int64
        The suffix's frame number, -1 where there is no suffix.
    """
    n = len(sid)
    offsets, data = _utf8(sid)
    ends = offsets[1:]
    lens = ends - offsets[:-1]
    if not data.size:
        return np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64)
    # b[k]: the k-th byte from the end (0, matching nothing, where the id is shorter).
    b = [None] + [np.where(lens >= k, data[np.maximum(ends - k, 0)], 0) for k in range(1, 7)]
    digit = [None] + [(x >= 48) & (x <= 57) for x in b[1:5]]
    st = [None] + [(x == 115) | (x == 116) for x in b[1:6]]  # "s", "t"
    under = [None] + [x == 95 for x in b[1:7]]  # "_"
    three = digit[1] & digit[2] & digit[3]
    m4 = three & under[4]  # _ddd
    m5 = three & under[5] & (digit[4] | st[4])  # _dddd or _[st]ddd
    m6 = three & digit[4] & st[5] & under[6]  # _[st]dddd
    has_suffix = m4 | m5 | m6
    four = m6 | (m5 & digit[4])
    value = (b[3].astype(np.int64) - 48) * 100 + (b[2].astype(np.int64) - 48) * 10 + (b[1].astype(np.int64) - 48)
    suffix_frame = np.where(four, value + (b[4].astype(np.int64) - 48) * 1000, np.where(has_suffix, value, -1))
    n_suffix = np.where(m6, 6, np.where(m5, 5, np.where(m4, 4, 0)))
    emb_offsets, _ = _utf8(emb)
    valid = has_suffix & (lens == emb_offsets[1:] - emb_offsets[:-1] + n_suffix)
    rows = np.flatnonzero(valid)
    if len(rows) != n:
        mask = pa.array(valid)
        sid, emb = sid.filter(mask), emb.filter(mask)
        offsets, data = _utf8(sid)
        ends, n_suffix = offsets[1:], n_suffix[rows]
    # The ids' bytes less their suffixes must be the embryo ids' bytes.
    keep = np.ones(data.size, dtype=bool)
    for k in range(1, 7):
        keep[ends[n_suffix >= k] - k] = False
    emb_offsets, emb_data = _utf8(emb)
    differ = np.flatnonzero(data[keep] != emb_data)
    if differ.size:
        valid[rows[np.unique(np.searchsorted(emb_offsets, differ, side="right") - 1)]] = False
    return has_suffix, valid, suffix_frame


def _numbers(values: list[Any]) -> np.ndarray:
    # Types were checked before: numbers or None, None becomes NaN.
    return pa.array(values, type=pa.float64()).to_numpy(zero_copy_only=False)


def _to_pandas(col: Any, dtype: Any) -> Any:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if isinstance(col, pa.Array) and dtype is STRING:
        return pd.arrays.ArrowStringArray(col)
    return pd.array(col, dtype=dtype, copy=False)


def _semantic_checks(
    snips: pd.DataFrame,
    chk: dict[str, np.ndarray],
    embryo_ids: list[str],
    embryo_objs: list[Any],
    bad: set[int],
    owner: np.ndarray,
    sets: dict[str, Any],
    flag_lists: list[list[dict[str, Any]]],
    sid: list[str],
) -> list[Problem]:
    out: list[Problem] = []

    def snip_path(i: int, *rest: str | int) -> str:
        return json_path("embryos", embryo_ids[owner[i]], "snips", sid[i], *rest)

    # Embryo ids and sources.
    for i, eid in enumerate(embryo_ids):
        if i in bad:
            continue
        src = embryo_objs[i]["source"]
        try:
            exp, video = ids.parse_embryo_id(eid)
        except ValueError as err:
            out.append((json_path("embryos", eid), f"bad key: {err}"))
            continue
        if src["video_id"] != video or src["experiment_id"] != exp:
            out.append((
                json_path("embryos", eid, "source"),
                (
                    f"embryo id {eid!r} implies video_id {video!r} and experiment_id {exp!r}, "
                    f"found {src['video_id']!r} and {src['experiment_id']!r}"
                ),
            ))
    # Snip ids: form, prefix, frame agreement.
    emb_of_snip = snips["embryo_id"]
    for i in np.flatnonzero(~chk["has_suffix"]):
        out.append((snip_path(i), f"bad snip id {sid[i]!r}; expected '{{embryo_id}}_{{s|t|}}NNNN' (3 or 4 digits)"))
    for i in np.flatnonzero(chk["has_suffix"] & ~chk["valid_id"]):
        out.append((snip_path(i), f"snip id {sid[i]!r} does not start with its embryo id {emb_of_snip.iat[i]!r}"))
    frame = snips["frame"].to_numpy()
    for i in np.flatnonzero(chk["valid_id"] & chk["stored_frame"] & (frame != chk["suffix_frame"])):
        out.append((snip_path(i, "frame"), f"frame {frame[i]} disagrees with the snip id suffix (frame {chk['suffix_frame'][i]})"))
    order = chk["order"]
    same = (owner[order][1:] == owner[order][:-1]) & (frame[order][1:] == frame[order][:-1])
    for i in order[1:][same]:
        out.append((snip_path(i), f"frame {frame[i]} occurs twice in embryo {emb_of_snip.iat[i]!r}; one snip per frame"))
    # Phenotypes.
    pheno = snips["phenotype"]
    for i in np.flatnonzero(~pheno.isin(sets["phenotypes"]).to_numpy()):
        val = pheno.iat[i]
        out.append((snip_path(i, "phenotype", "value"), f"unknown phenotype {val!r}{suggest(val, sets['phenotypes'])}; permitted: {', '.join(sorted(sets['phenotypes']))}"))
    out.extend(_author_time_checks(snips["phenotype_author"], snips["phenotype_timestamp"], lambda i, k: snip_path(i, "phenotype", k)))
    conf = snips["phenotype_confidence"].to_numpy()
    for i in np.flatnonzero((conf < 0) | (conf > 1) | chk["nan_confidence"]):
        out.append((snip_path(i, "phenotype", "confidence"), f"confidence must be within [0, 1], found {conf[i]}"))
    # death_frame is a cache of the snips: it must equal the smallest DEAD frame,
    # and every later snip must be DEAD (permanence).
    dead = snips["is_dead"].to_numpy()
    n_emb = len(embryo_ids)
    first_dead = np.full(n_emb, np.iinfo(np.int64).max)
    np.minimum.at(first_dead, owner[dead], frame[dead])
    for i in range(n_emb):
        if i in bad:
            continue
        stored_death = embryo_objs[i]["death_frame"]
        actual = None if first_dead[i] == np.iinfo(np.int64).max else int(first_dead[i])
        if stored_death != actual:
            what = "null (no DEAD snip)" if actual is None else f"{actual} (its smallest DEAD frame)"
            out.append((json_path("embryos", embryo_ids[i], "death_frame"), f"death_frame is {stored_death!r} but must be {what}; death_frame is a cache of the snips"))
    alive_after = (~dead) & (frame > first_dead[owner])
    for i in np.flatnonzero(alive_after):
        out.append((snip_path(i, "phenotype", "value"), f"{pheno.iat[i]!r} at frame {frame[i]} after death at frame {first_dead[owner[i]]}: DEAD is permanent and must fill forward"))
    # Embryo-level flags, genotypes and treatments, then snip-level flags (only
    # snips that have any). Flags are checked as whole lists first; messages
    # are built only for the flag lists that fail, in the original order.
    good = [i for i in range(n_emb) if i not in bad]
    flagged = np.flatnonzero(snips["n_flags"].to_numpy() > 0).tolist()
    failing_embryo = _failing_flag_lists([embryo_objs[i]["flags"] for i in good], "embryo", sets)
    # Every author/timestamp-bearing object in check order, and where each
    # embryo's block starts (paths are built only for the failing ones).
    stamp_objs: list[Any] = []
    block_starts: list[int] = []
    for j, i in enumerate(good):
        eid = embryo_ids[i]
        e = embryo_objs[i]
        block_starts.append(len(stamp_objs))
        if j in failing_embryo:
            out.extend(_flag_list_checks(e["flags"], "embryo", sets, ("embryos", eid, "flags")))
        stamp_objs.extend(e["flags"])
        g = e["genotype"]
        if g:
            if g["value"] not in sets["genotypes"]:
                out.append((json_path("embryos", eid, "genotype", "value"), f"unknown genotype {g['value']!r}{suggest(g['value'], sets['genotypes'])}; permitted: {', '.join(sorted(sets['genotypes']))}"))
            if "zygosity" in g and g["zygosity"] not in sets["zygosity"]:
                out.append((json_path("embryos", eid, "genotype", "zygosity"), f"unknown zygosity {g['zygosity']!r}{suggest(g['zygosity'], sets['zygosity'])}"))
            stamp_objs.append(g)
        stamp_objs.extend(e["treatments"])
    n_embryo_stamps = len(stamp_objs)
    snip_flags = [flag_lists[i] for i in flagged]
    for j in sorted(_failing_flag_lists(snip_flags, "snip", sets)):
        i = flagged[j]
        out.extend(_flag_list_checks(flag_lists[i], "snip", sets, ("embryos", embryo_ids[owner[i]], "snips", sid[i], "flags")))
    stamp_objs.extend(chain.from_iterable(snip_flags))
    flag_starts = np.cumsum([0, *map(len, snip_flags)])

    def stamp_path(pos: int, key: str) -> str:
        pos = int(pos)
        if pos >= n_embryo_stamps:
            j = int(np.searchsorted(flag_starts, pos - n_embryo_stamps, side="right")) - 1
            i = flagged[j]
            k = pos - n_embryo_stamps - int(flag_starts[j])
            return json_path("embryos", embryo_ids[owner[i]], "snips", sid[i], "flags", k, key)
        j = bisect_right(block_starts, pos) - 1
        e = embryo_objs[good[j]]
        where: tuple[str | int, ...]
        k = pos - block_starts[j]
        if k < len(e["flags"]):
            where = ("flags", k)
        elif e["genotype"] and k == len(e["flags"]):
            where = ("genotype",)
        else:
            where = ("treatments", k - len(e["flags"]) - bool(e["genotype"]))
        return json_path("embryos", embryo_ids[good[j]], *where, key)

    out.extend(_stamp_checks(stamp_objs, stamp_path))
    return out


def _failing_flag_lists(flag_lists: list[list[dict[str, Any]]], level: str, sets: dict[str, Any]) -> set[int]:
    """Positions of the flag lists with any problem _flag_list_checks reports."""
    lens = np.fromiter(map(len, flag_lists), dtype=np.int64, count=len(flag_lists))
    if not lens.any():
        return set()
    flat = list(chain.from_iterable(flag_lists))
    values = [f.get("value") for f in flat]
    permitted = sets["flags"].get(level, set())
    severity = sets["severity"]
    bad = np.fromiter((v not in permitted for v in values), dtype=bool, count=len(flat))
    bad |= np.fromiter(("severity" in f and f["severity"] not in severity for f in flat), dtype=bool, count=len(flat))
    list_of = np.repeat(np.arange(len(flag_lists)), lens)
    failing = set(list_of[bad].tolist())
    # Duplicates: only lists with more than one flag can have any.
    starts = np.cumsum(lens) - lens
    for j in np.flatnonzero(lens > 1).tolist():
        vals = values[starts[j] : starts[j] + lens[j]]
        if len(set(vals)) != len(vals):
            failing.add(j)
    return failing


def _stamp_checks(objs: list[dict[str, Any]], where: Any) -> list[Problem]:
    # Authors and timestamps of many small objects, checked as two columns.
    if not objs:
        return []
    if {o.__class__ for o in objs} == {dict}:
        authors = list(map(dict.get, objs, repeat("author")))
        stamps = list(map(dict.get, objs, repeat("timestamp")))
    else:
        authors = [o.get("author") for o in objs]
        stamps = [o.get("timestamp") for o in objs]
    return _author_time_checks(_text_series(authors), _text_series(stamps), where)


def _text_series(values: list[Any]) -> pd.Series:
    # A missing or non-string value counts as empty: a blank author or a bad
    # timestamp is reported for it.
    if not {v.__class__ for v in values} <= {str}:
        values = [v if isinstance(v, str) else "" for v in values]
    return pd.Series(pd.arrays.ArrowStringArray(_strings(values)), copy=False)


def _author_time_checks(author: pd.Series, stamp: pd.Series, where: Any) -> list[Problem]:
    out: list[Problem] = []
    # Authors and timestamps repeat a lot: check each distinct value once.
    codes, uniques = pd.factorize(author)
    blank = (pd.Series(uniques, dtype=STRING).str.strip().str.len().to_numpy() == 0)[codes]
    for i in np.flatnonzero(blank):
        out.append((where(i, "author"), "author must be a non-empty name"))
    codes, uniques = pd.factorize(stamp)
    bad = (~pd.Series(uniques, dtype=STRING).str.match(TIMESTAMP_PATTERN).to_numpy(dtype=bool, na_value=False))[codes]
    for i in np.flatnonzero(bad):
        out.append((where(i, "timestamp"), f"timestamp {stamp.iat[i]!r} is not ISO 8601 with a UTC offset, e.g. '2026-01-05T10:00:00+00:00'"))
    return out


class _Stamps:
    """Authors and timestamps of many small objects, checked in one pass."""

    def __init__(self) -> None:
        self.paths: list[tuple[str | int, ...]] = []
        self.authors: list[Any] = []
        self.stamps: list[Any] = []

    def add(self, obj: dict[str, Any], path: tuple[str | int, ...]) -> None:
        self.paths.append(path)
        self.authors.append(obj.get("author") if isinstance(obj.get("author"), str) else "")
        self.stamps.append(obj.get("timestamp") if isinstance(obj.get("timestamp"), str) else "")

    def problems(self) -> list[Problem]:
        if not self.paths:
            return []
        return _author_time_checks(
            pd.Series(self.authors, dtype=STRING),
            pd.Series(self.stamps, dtype=STRING),
            lambda i, k: json_path(*self.paths[i], k),
        )


def _flag_list_checks(flags: list[dict[str, Any]], level: str, sets: dict[str, Any], path: tuple[str | int, ...], stamps: _Stamps | None = None) -> list[Problem]:
    out: list[Problem] = []
    seen: set[str] = set()
    permitted = sets["flags"].get(level, set())
    for k, f in enumerate(flags):
        value = f.get("value")
        if value not in permitted:
            out.append((json_path(*path, k, "value"), f"flag {value!r} is not permitted at level {level!r}{suggest(value, permitted)}; permitted: {', '.join(sorted(permitted))}"))
        if value in seen:
            out.append((json_path(*path, k, "value"), f"flag {value!r} occurs twice; a flag value appears at most once per entity"))
        seen.add(value)
        if "severity" in f and f["severity"] not in sets["severity"]:
            out.append((json_path(*path, k, "severity"), f"unknown severity {f['severity']!r}{suggest(f['severity'], sets['severity'])}; permitted: {', '.join(sorted(sets['severity']))}"))
        if stamps is not None:
            stamps.add(f, (*path, k))
    return out


def _store_flag_checks(doc: dict[str, Any], sets: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = []
    stamps = _Stamps()
    flags = doc.get("flags")
    if not isinstance(flags, dict):
        return out
    for level in ("experiment", "video", "image"):
        entries = flags.get(level)
        if not isinstance(entries, dict):
            continue
        for entity, flag_list in entries.items():
            if isinstance(flag_list, list) and all(isinstance(f, dict) for f in flag_list):
                out.extend(_flag_list_checks(flag_list, level, sets, ("flags", level, entity), stamps))
    out.extend(stamps.problems())
    return out


def flags_table(doc: dict[str, Any]) -> pd.DataFrame:
    """Every flag of a (valid) store in long format, one row per flag.

    Parameters
    ----------
    doc : dict
        A valid store document.

    Returns
    -------
    pandas.DataFrame
        Columns ``level``, ``entity_id``, ``flag``, ``severity``, ``author``,
        ``timestamp``, ``auto_generated``, ``notes``, ``confidence``.
    """
    rows: list[tuple[Any, ...]] = []

    def add(level: str, entity: str, flags: list[dict[str, Any]]) -> None:
        rows.extend(
            (level, entity, f["value"], f.get("severity"), f["author"], f["timestamp"],
             bool(f.get("auto_generated", False)), f.get("notes"), f.get("confidence"))
            for f in flags
        )

    for level in ("experiment", "video", "image"):
        for entity, flags in doc["flags"][level].items():
            add(level, entity, flags)
    for eid, e in doc["embryos"].items():
        add("embryo", eid, e["flags"])
        for sid, s in e["snips"].items():
            if s["flags"]:
                add("snip", sid, s["flags"])
    columns = ["level", "entity_id", "flag", "severity", "author", "timestamp", "auto_generated", "notes", "confidence"]
    table = pd.DataFrame(rows, columns=columns)
    for name in ("level", "entity_id", "flag", "severity", "author", "timestamp", "notes"):
        table[name] = table[name].astype(STRING)
    table["auto_generated"] = table["auto_generated"].astype(bool)
    table["confidence"] = pd.to_numeric(table["confidence"]).astype(np.float64)
    return table
