"""Typed decoding of a store's embryos (``pipeline._tables.parse_piece``).

The streamed readers decode a block of embryos with msgspec straight into
structs when it has the common, valid shape, and fall back to orjson's dicts
otherwise. Whichever path a block takes, its tables and problems must be those
of the dict path, and a block that is not JSON must fail as orjson fails.
These tests hold the two paths together on valid blocks, on every kind of
oddity the types have to refuse, and on random edits of a real-shaped store.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import _tables
from pipeline._tables import TypedPiece, parse_piece
from pipeline.store import Store
from pipeline.testing import make_document


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    doc = make_document(n_experiments=2, n_embryos=6, n_frames=9, seed=3, flag_fraction=0.2)
    # Every optional field somewhere: notes and an int confidence on a phenotype,
    # a snip without frame or measurements.
    embryo = next(iter(doc["embryos"].values()))
    snips = list(embryo["snips"].values())
    snips[0]["phenotype"] |= {"notes": "curved", "confidence": 1}
    snips[1]["phenotype"]["confidence"] = 0.25
    del snips[2]["frame"], snips[3]["measurements"]
    return doc


def sets_of(doc: dict[str, Any]) -> dict[str, Any]:
    return _tables.vocab_sets(Store(copy.deepcopy(doc)).vocabulary)


def encode(embryos: dict[str, Any]) -> bytes:
    # As the streamer hands a piece over: a JSON object of embryo members
    # (by the standard library, which writes integers of any size).
    return json.dumps(embryos, indent=2).encode()


def assert_same_tables(data: bytes, sets: dict[str, Any]) -> dict[str, Any]:
    """Tables of *data* through parse_piece equal those of orjson's dicts; returns the piece."""
    piece = parse_piece(data)
    typed = _tables._embryo_tables(piece, sets)
    plain = _tables._embryo_tables(orjson.loads(data), sets)
    pd.testing.assert_frame_equal(typed.snips, plain.snips)
    assert typed.problems == plain.problems
    assert typed.measurement_keys == plain.measurement_keys
    assert (typed.n_embryos, typed.experiments, typed.videos) == (plain.n_embryos, plain.experiments, plain.videos)
    return piece


def test_a_valid_piece_is_decoded_typed_with_the_dict_paths_tables(document):
    piece = assert_same_tables(encode(document["embryos"]), sets_of(document))
    assert isinstance(piece, TypedPiece)
    assert list(piece) == list(document["embryos"])


def test_part_of_a_typed_piece_gives_the_dict_paths_tables(document):
    # The split read cuts the piece holding the first embryo of the helper's part.
    piece = parse_piece(encode(document["embryos"]))
    names = list(piece)[:4]
    part = _tables._embryo_tables({k: piece[k] for k in names}, sets_of(document))
    plain = _tables._embryo_tables({k: document["embryos"][k] for k in names}, sets_of(document))
    pd.testing.assert_frame_equal(part.snips, plain.snips)
    assert part.problems == plain.problems


def first_snip(doc: dict[str, Any]) -> dict[str, Any]:
    return next(iter(next(iter(doc["embryos"].values()))["snips"].values()))


def first_embryo(doc: dict[str, Any]) -> dict[str, Any]:
    return next(iter(doc["embryos"].values()))


# Edits the types must refuse (the block goes to orjson): each names what the
# dict path then reports, or accepts, in its own words.
REFUSED = {
    "int beyond 64 bits (orjson: a float)": lambda d: first_snip(d).update(frame=2**70),
    "unsigned 64-bit frame": lambda d: first_snip(d).update(frame=2**63),
    "int beyond 64 bits in a genotype": lambda d: first_embryo(d).update(genotype={**(first_embryo(d)["genotype"] or {"value": "wt", "author": "a", "timestamp": "2026-01-05T10:00:00+00:00", "confirmed": False}), "confidence": -(2**64)}),
    "boolean frame": lambda d: first_snip(d).update(frame=True),
    "null frame": lambda d: first_snip(d).update(frame=None),
    "float frame": lambda d: first_snip(d).update(frame=3.0),
    "null measurements": lambda d: first_snip(d).update(measurements=None),
    "string measurement": lambda d: first_snip(d)["measurements"].update(area_um2="big"),
    "boolean confidence": lambda d: first_snip(d)["phenotype"].update(confidence=True),
    "numeric notes": lambda d: first_snip(d)["phenotype"].update(notes=3),
    "unknown snip key": lambda d: first_snip(d).update(colour="red"),
    "unknown phenotype key": lambda d: first_snip(d)["phenotype"].update(colour="red"),
    "missing flags": lambda d: first_snip(d).pop("flags"),
    "missing phenotype author": lambda d: first_snip(d)["phenotype"].pop("author"),
    "phenotype as a list": lambda d: first_snip(d).update(phenotype=["NONE"]),
    "unknown embryo key": lambda d: first_embryo(d).update(colour="red"),
    "missing death_frame": lambda d: first_embryo(d).pop("death_frame"),
    "snips as a list": lambda d: first_embryo(d).update(snips=[]),
    "source with a number": lambda d: first_embryo(d)["source"].update(video_id=7),
    "nested value in a flag": lambda d: first_snip(d).update(flags=[{"value": "BLUR", "author": "a", "timestamp": "2026-01-05T10:00:00+00:00", "notes": ["x"]}]),
}

# Edits the types take but the fast path does not: found after decoding.
SECOND_LOOK = {
    "malformed flag": lambda d: first_snip(d).update(flags=[{"value": 3, "author": "a", "timestamp": "t"}]),
    "flag confidence above 1": lambda d: first_snip(d).update(flags=[{"value": "BLUR", "author": "a", "timestamp": "2026-01-05T10:00:00+00:00", "confidence": 2}]),
    "a measurement key the first snip lacks": lambda d: list(first_embryo(d)["snips"].values())[1]["measurements"].update(extra=1.5),
    "a reserved measurement name": lambda d: first_snip(d)["measurements"].update(is_dead=1.0),
    "source without video_id": lambda d: first_embryo(d)["source"].pop("video_id"),
    "negative death frame": lambda d: first_embryo(d).update(death_frame=-1),
}


@pytest.mark.parametrize("edit", [*REFUSED, *SECOND_LOOK])
def test_an_odd_block_is_read_as_dicts_with_the_same_result(document, edit):
    doc = copy.deepcopy(document)
    (REFUSED | SECOND_LOOK)[edit](doc)
    piece = assert_same_tables(encode(doc["embryos"]), sets_of(document))
    assert not isinstance(piece, TypedPiece)
    assert all(isinstance(e, dict) for e in piece.values())


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: first_snip(d)["phenotype"].update(value="WOBBLY"),  # unknown phenotype
        lambda d: first_snip(d)["phenotype"].update(timestamp="yesterday"),
        lambda d: first_snip(d).update(frame=-4),
        lambda d: first_embryo(d).update(death_frame=10**6),
        lambda d: first_snip(d)["measurements"].update(area_um2=None),
        lambda d: first_snip(d)["measurements"].update(extra=1.5),  # only the first snip has it
    ],
)
def test_semantic_problems_of_a_typed_block_are_those_of_the_dict_path(document, edit):
    doc = copy.deepcopy(document)
    edit(doc)
    piece = assert_same_tables(encode(doc["embryos"]), sets_of(document))
    assert isinstance(piece, TypedPiece)


def test_duplicate_keys_resolve_as_orjson_resolves_them(document):
    data = encode(document["embryos"])
    # A phenotype value given twice (the last wins) and a snip id given twice.
    data = data.replace(b'"value": "NONE"', b'"value": "DEAD", "value": "NONE"', 1)
    sid = next(iter(first_embryo(document)["snips"]))
    snip = orjson.dumps(first_snip(document))
    data = data.replace(f'"{sid}": {{'.encode(), f'"{sid}": {snip.decode()}, "{sid}": {{'.encode(), 1)
    assert_same_tables(data, sets_of(document))


@pytest.mark.parametrize(
    "data",
    [
        b'{"e": {"source": {}',  # cut short
        b'{"e": 1} trailing',
        b'{"e": "\xff"}',  # not UTF-8
        b'{"e": "\\ud800"}',  # a lone surrogate
        b'{"e": NaN}',
        b'{"e": 1e400}',
        b"",
    ],
)
def test_what_is_not_json_fails_as_orjson_fails(data):
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(data)
    with pytest.raises(orjson.JSONDecodeError):
        parse_piece(data)


def test_a_memoryview_piece_is_decoded(document):
    data = bytearray(encode(document["embryos"]))
    assert isinstance(parse_piece(memoryview(data)), TypedPiece)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(["NONE", "DEAD", "BLUR", "wt", "2026-01-05T10:00:00+00:00", "area_um2"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["value", "author", "timestamp", "frame", "x"]), inner, max_size=3)),
    max_leaves=6,
)


def _places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _places(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _places(v, (*path, i))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_edits_give_the_dict_paths_tables(document, data):
    embryos = copy.deepcopy(document["embryos"])
    small = dict(list(embryos.items())[:3])
    places = [p for p in _places(small) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(places))
        owner = small
        for key in path[:-1]:
            owner = owner[key]
        if isinstance(owner, dict) and data.draw(st.booleans()) and len(path) > 1:
            owner.pop(path[-1], None)
        else:
            try:
                owner[path[-1]] = data.draw(json_values)
            except (IndexError, KeyError, TypeError):
                continue
        places = [p for p in _places(small) if p]
    assert_same_tables(encode(small), sets_of(document))
