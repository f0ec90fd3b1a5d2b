from __future__ import annotations

import pickle
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import RangeSyntaxError
from pipeline.ranges import (
    EMPTY_SELECTION,
    FRAME_NOT_FOUND,
    INDEX_OUT_OF_RANGE,
    MAX_INT,
    NO_DEATH_FRAME,
    REASONS,
    UNKNOWN_SNIP_ID,
    Bound,
    FrameInterval,
    FrameRange,
    Named,
    Position,
    SnipId,
    Span,
    _resolve_one,
    expand_ranges,
    parse_range,
    select_positions,
)

SETTINGS = settings(
    deadline=None,
    max_examples=150,
    database=None,  # keep the shared working tree free of .hypothesis/
    suppress_health_check=[HealthCheck.too_slow],
)

# The spec's example embryo: n = 10, a gap at frame 3, death at frame 7.
FRAMES = np.array([0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
DEATH = 7

SPEC_TABLE = [
    ("[5]", [5], None),
    ("[5:8]", [5, 6, 7], None),
    ("[5::]", [5, 6, 7, 8, 9], None),
    ("[::3]", [0, 3, 6, 9], None),
    ("[-3:]", [7, 8, 9], None),
    ("[::-1]", list(range(10)), None),
    ("[8:2:-2]", [8, 6, 4], None),
    ("[0:3, -1]", [0, 1, 2, 9], None),
    ("[12]", [], INDEX_OUT_OF_RANGE),
    ("death", [6], None),
    ("death:", [6, 7, 8, 9], None),
    ("death-2:death+2", [4, 5, 6, 7], None),
    ("death-9:death", [0, 1, 2, 3, 4, 5], None),
    ("death+1", [7], None),
    ("t2..t5", [2, 3, 4], None),
    ("t3", [], FRAME_NOT_FOUND),
]


def snip_id(embryo: int, frame: int) -> str:
    return f"20240411_A01_e{embryo:02d}_s{frame:04d}"


def embryo_id(embryo: int) -> str:
    return f"20240411_A01_e{embryo:02d}"


def one_embryo_part(frames, death_frame, embryo=1) -> pd.DataFrame:
    frames = np.asarray(frames, dtype=np.int64)
    n = len(frames)
    return pd.DataFrame(
        {
            "embryo_id": [embryo_id(embryo)] * n,
            "frame": frames,
            "frame_index": np.arange(n, dtype=np.int64),
            "n_frames": np.full(n, n, dtype=np.int64),
            "death_frame": pd.array([death_frame] * n, dtype="Int64"),
        },
        index=pd.Index([snip_id(embryo, f) for f in frames], name="snip_id"),
    )


def rows_frame(entries) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row": np.array([r for r, _, _ in entries], dtype=np.int64),
            "embryo_id": [e for _, e, _ in entries],
            "spec": pd.Series([parse_range(s) for _, _, s in entries], dtype=object),
        }
    )


# ------------------------------------------------------------ spec examples


@pytest.mark.parametrize(
    ("spec", "expected", "reason"), SPEC_TABLE, ids=[s for s, _, _ in SPEC_TABLE]
)
def test_spec_table_select_positions(spec, expected, reason):
    got = select_positions(spec, FRAMES, death_frame=DEATH)
    assert got.dtype == np.int64
    assert got.tolist() == sorted(expected)  # a mask: positions come ascending


@pytest.mark.parametrize(
    ("spec", "expected", "reason"), SPEC_TABLE, ids=[s for s, _, _ in SPEC_TABLE]
)
def test_spec_table_expand_ranges(spec, expected, reason):
    part = one_embryo_part(FRAMES, DEATH)
    pairs, outcomes = expand_ranges(part, rows_frame([(0, embryo_id(1), spec)]))
    assert pairs["pos"].tolist() == sorted(expected)
    assert (pairs["row"] == 0).all()
    expected_reasons = [] if reason is None else [reason]
    assert outcomes["reason"].tolist() == expected_reasons


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(10))),
        ("first", [0]),
        ("LAST", [9]),
        ("5:8", [5, 6, 7]),
        ("-1", [9]),
        ("[death-3:]", [3, 4, 5, 6, 7, 8, 9]),
        (":death", [0, 1, 2, 3, 4, 5]),
        ("death:death+10:2", [6, 8]),
        ("death-20", []),
        ("death+4", []),
        ("t10..", [9]),
        ("..t1", [0, 1]),
        ("t0004", [3]),
        ("[t0, t10, death]", [0, 6, 9]),
        ("[a::c]".replace("a", "2").replace("c", "3"), [2, 5, 8]),
        ("[8::-3]", [2, 5, 8]),
        ("[death-20:death-10:-1]", []),
        ("[death:0:-1]", [1, 2, 3, 4, 5, 6]),
        ("", []),
        ("[ ]", []),
    ],
)
def test_more_forms(spec, expected):
    assert select_positions(spec, FRAMES, death_frame=DEATH).tolist() == expected


def test_death_without_death_frame_selects_nothing():
    assert select_positions("death:", FRAMES).tolist() == []
    assert select_positions("death", FRAMES, death_frame=pd.NA).tolist() == []
    assert select_positions("[0, death]", FRAMES, death_frame=np.nan).tolist() == [0]


def test_select_positions_accepts_lists_and_ints():
    assert select_positions([0, -1, 0], FRAMES).tolist() == [0, 9]
    assert select_positions(3, list(FRAMES)).tolist() == [3]
    assert select_positions(parse_range("[1:3]"), FRAMES).tolist() == [1, 2]
    assert select_positions("all", []).tolist() == []


def test_select_positions_snip_ids():
    ids = [snip_id(1, f) for f in FRAMES]
    spec = [snip_id(1, 4), snip_id(1, 3), snip_id(2, 4)]
    assert select_positions(spec, FRAMES, snip_ids=ids).tolist() == [3]
    with pytest.raises(ValueError, match="snip_ids="):
        select_positions(spec, FRAMES)


def test_select_positions_rejects_unsorted_frames():
    with pytest.raises(ValueError, match="sorted"):
        select_positions("all", [3, 1, 2])
    with pytest.raises(ValueError, match="sorted"):
        select_positions("all", [1, 1, 2])


# ------------------------------------------------------ parsing, canonical


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("[5]", "[5]"),
        ("5", "[5]"),
        (" - 5 ", "[-5]"),
        ("5:10", "[5:10]"),
        ("[5::]", "[5:]"),
        ("[::1]", "[:]"),
        ("[:]", "[:]"),
        (":", "[:]"),
        ("[0:10:2]", "[0:10:2]"),
        (" ALL ", "all"),
        ("First", "first"),
        ("DEATH + 3", "death+3"),
        ("death-0", "death"),
        ("death+0", "death"),
        ("Death - 2 : DEATH + 2", "[death-2:death+2]"),
        ("[death-3:]", "[death-3:]"),
        ("T0010..t20", "t10..t20"),
        ("t10..t10", "t10"),
        ("..t20", "..t20"),
        ("t10 ..", "t10.."),
        ("[0:3, -1, 0:3]", "[0:3, -1]"),
        ("[all,first ,last]", "[all, first, last]"),
        ("", "[]"),
        ("  ", "[]"),
        ("[]", "[]"),
        ("\u00a0[1]\t", "[1]"),
        ("[20240411_A01_e01_s0001]", "[20240411_A01_e01_s0001]"),
        ("20240411_A01_e01_s0001", "[20240411_A01_e01_s0001]"),
        (
            "[20240411_A01_e01_s0002,20240411_A01_e01_s0001, 3]",
            "[20240411_A01_e01_s0002, 20240411_A01_e01_s0001, 3]",
        ),
    ],
)
def test_canonical_form(spec, canonical):
    fr = parse_range(spec)
    assert str(fr) == canonical
    assert fr.canonical == canonical
    assert parse_range(canonical) == fr


def test_frame_range_value_object():
    a = parse_range("[0:3, -1]")
    b = parse_range(" [ 0 : 3 , -1 ] ")
    assert a == b
    assert a is not b
    assert hash(a) == hash(b)
    assert len({a, b, parse_range("[0:3]")}) == 2
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a) == "FrameRange('[0:3, -1]')"
    assert parse_range(a) is a
    assert a != "[0:3, -1]"
    with pytest.raises(AttributeError):
        a.parts = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("", "empty"),
        ("[1, 2]", "position"),
        ("first", "position"),
        ("all", "slice"),
        ("[::2]", "slice"),
        ("death+1", "death"),
        ("death:", "death_slice"),
        ("[2:death]", "death_slice"),
        ("t1..t5", "frames"),
        (["20240411_A01_e01_s0001"], "snip_id"),
        ("[0, t3]", "mixed"),
    ],
)
def test_kind(spec, kind):
    assert parse_range(spec).kind == kind


def test_properties():
    fr = parse_range("[death:, 20240411_A01_e01_s0001]")
    assert fr.uses_death
    assert fr.snip_ids == ("20240411_A01_e01_s0001",)
    assert not fr.is_empty
    assert parse_range([]).is_empty
    assert not parse_range("t3").uses_death


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        (3, "[3]"),
        (-1, "[-1]"),
        (np.int64(3), "[3]"),
        (np.uint8(3), "[3]"),
        (3.0, "[3]"),
        (np.float32(4.0), "[4]"),
        ([], "[]"),
        ((), "[]"),
        ([1, 2, 1], "[1, 2]"),
        ((1, -2), "[1, -2]"),
        ([1.0, np.int32(2)], "[1, 2]"),
        (np.array([4, 5]), "[4, 5]"),
        (
            ["20240411_A01_e01_s0002", "20240411_A01_e01_s0001"],
            "[20240411_A01_e01_s0002, 20240411_A01_e01_s0001]",
        ),
    ],
)
def test_parse_non_strings(value, canonical):
    fr = parse_range(value)
    assert str(fr) == canonical
    assert parse_range(str(fr)) == fr


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        np.bool_(True),
        3.5,
        float("nan"),
        float("inf"),
        None,
        pd.NA,
        {"a": 1},
        {1, 2},
        10**10,
        -(10**10),
        1e300,
        [True],
        [1.5],
        [1, "20240411_A01_e01_s0001"],
        ["all"],
        ["5"],
        ["20240411"],
        [[1]],
        [10**12],
        np.zeros((2, 2), dtype=int),
    ],
    ids=repr,
)
def test_parse_rejects_bad_values(value):
    with pytest.raises(RangeSyntaxError):
        parse_range(value)


@pytest.mark.parametrize(
    ("spec", "column", "fragment"),
    [
        ("[1:2:3:4]", 7, "a slice has at most 3 parts (start:stop:step)"),
        ("[5::0]", 5, "step cannot be zero"),
        ("[::death]", 4, "plain integer"),
        ("[1,000]", 4, "leading zeros"),
        ("007", 1, "leading zeros"),
        ("1, 2", 2, "needs brackets"),
        ("[[1]]", 2, "nested"),
        ("t10..t5", 4, "reversed"),
        ("death+", 7, "expected an integer after 'death+'"),
        ("death+-1", 7, "expected an integer"),
        ("-", 2, "expected an integer after '-'"),
        ("3.0", 2, "unexpected character '.'"),
        ("1e309", 2, "expected the end"),
        ("t10:t20", 4, "cannot be slice bounds"),
        ("5:t20", 3, "cannot be slice bounds"),
        ("..", 3, "expected a frame like t20"),
        ("t", 1, "unknown word 't'"),
        ("t 10", 1, "unknown word"),
        ("[1 2]", 4, "expected ',' or ']'"),
        ("[1", 3, "expected ',' or ']'"),
        ("[]]", 3, "expected the end"),
        ("[1,]", 4, "expected a position"),
        ("[,]", 2, "expected a position"),
        ("foo", 1, "unknown word 'foo'"),
        ("[__class__]", 2, "unknown word '__class__'"),
        ("all:5", 4, "expected the end"),
        ("+3", 1, "expected a position"),
        ("9999999999999999999999", 1, "too large"),
        ("[0:1000000001]", 4, "too large"),
        ("death+1000000001", 7, "too large"),
        ("t99999999999", 1, "too large"),
        ("5 6", 3, "expected the end"),
    ],
)
def test_syntax_errors(spec, column, fragment):
    with pytest.raises(RangeSyntaxError, match=re.escape(fragment)) as info:
        parse_range(spec)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.spec == spec
    assert err.column == column
    assert str(err).startswith(
        f"cannot parse frame range {spec!r} at column {column}: "
    )
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
    assert again.column == column


def test_syntax_error_message_matches_spec():
    with pytest.raises(RangeSyntaxError) as info:
        parse_range("[1:2:3:4]")
    assert str(info.value) == (
        "cannot parse frame range '[1:2:3:4]' at column 7: "
        "a slice has at most 3 parts (start:stop:step)"
    )


def test_limits_are_inclusive():
    assert str(parse_range(f"[-{MAX_INT}:{MAX_INT}]")) == f"[-{MAX_INT}:{MAX_INT}]"
    assert select_positions(f"[-{MAX_INT}:{MAX_INT}:-{MAX_INT}]", FRAMES).tolist() == []
    assert (
        select_positions(f"death-{MAX_INT}:death+{MAX_INT}", FRAMES, DEATH).size == 10
    )


@pytest.mark.parametrize(
    "spec",
    [
        "death+__import__('os').system('x')",
        "[__class__]",
        "1e309",
        "9999999999999999999999",
        "9" * 5000,
        "t" + "9" * 5000,
        "__import__('os')",
        "[0:len(x)]",
        "=1+1",
        "lambda: 0",
        "[0:3]; print(1)",
        "{0}",
        "[0:3] or 1",
    ],
)
def test_code_is_rejected(spec, tmp_path):
    marker = tmp_path / "pwned"
    spec = spec.replace("'x'", f"'touch {marker}'")
    with pytest.raises(RangeSyntaxError):
        parse_range(spec)
    assert not marker.exists()


# ------------------------------------------------------ property tests

small = st.integers(-40, 40)
edge = st.sampled_from([-MAX_INT, MAX_INT, -(MAX_INT - 1), MAX_INT - 1])
slice_bound = st.one_of(st.none(), small, edge)
steps = st.one_of(
    st.none(), st.integers(-7, 7).filter(bool), st.sampled_from([-MAX_INT, MAX_INT])
)


@SETTINGS
@given(
    n=st.integers(0, 30), a=slice_bound, b=slice_bound, c=steps, brackets=st.booleans()
)
def test_slices_match_python(n, a, b, c, brackets):
    assume_spec = "" if a is None else str(a)
    assume_spec += ":" + ("" if b is None else str(b))
    if c is not None:
        assume_spec += f":{c}"
    spec = f"[{assume_spec}]" if brackets else assume_spec
    frames = np.arange(n) * 3 + 1
    expected = sorted(list(range(n))[slice(a, b, c)])
    assert select_positions(spec, frames).tolist() == expected
    part = one_embryo_part(frames, None) if n else None
    if part is not None:
        pairs, _ = expand_ranges(part, rows_frame([(0, embryo_id(1), spec)]))
        assert pairs["pos"].tolist() == sorted(expected)


@SETTINGS
@given(n=st.integers(0, 30), i=st.one_of(small, edge))
def test_indices_match_python(n, i):
    frames = np.arange(n)
    items = list(range(n))
    expected = [items[i]] if -n <= i < n else []
    assert select_positions(f"[{i}]", frames).tolist() == expected
    assert select_positions(i, frames).tolist() == expected
    reasons = [
        r for _, r in _resolve_one(parse_range(i), frames.tolist(), None, None)[1]
    ]
    assert reasons == ([] if expected else [INDEX_OUT_OF_RANGE])


def sorted_frames(draw_list):
    return np.unique(np.asarray(draw_list, dtype=np.int64))


frame_lists = st.lists(st.integers(0, 60), min_size=0, max_size=25).map(sorted_frames)


@SETTINGS
@given(frames=frame_lists, k=st.integers(-30, 30), data=st.data())
def test_death_relative_matches_definition(frames, k, data):
    n = len(frames)
    if n == 0:
        return
    d = data.draw(st.integers(0, n - 1))
    death_frame = int(frames[d])
    spec = "death" if k == 0 else f"death{k:+d}"
    expected = [d + k] if 0 <= d + k < n else []
    assert select_positions(spec, frames, death_frame).tolist() == expected
    # A death-relative slice clamps below 0 and then follows Python.
    lo, hi = data.draw(st.integers(-30, 30)), data.draw(st.integers(-30, 30))
    step = data.draw(st.one_of(st.none(), st.integers(-4, 4).filter(bool)))
    spec = f"death{lo:+d}:death{hi:+d}" + ("" if step is None else f":{step}")
    expected = sorted(list(range(n))[max(d + lo, 0) : max(d + hi, 0) : step])
    assert select_positions(spec, frames, death_frame).tolist() == expected


@SETTINGS
@given(
    frames=frame_lists,
    lo=st.one_of(st.none(), st.integers(0, 70)),
    hi=st.one_of(st.none(), st.integers(0, 70)),
)
def test_frame_intervals_match_definition(frames, lo, hi):
    if lo is None and hi is None:
        return
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    fr = FrameRange((FrameInterval(lo, hi),))
    expected = [
        i
        for i, f in enumerate(frames.tolist())
        if (lo is None or f >= lo) and (hi is None or f <= hi)
    ]
    assert select_positions(str(fr), frames).tolist() == expected
    reasons = [r for _, r in _resolve_one(fr, frames.tolist(), None, None)[1]]
    assert reasons == ([] if expected else [FRAME_NOT_FOUND])


# Strategies for whole ranges: every kind of part, plain and death-relative.
offsets = st.integers(-15, 15)
bounds = st.one_of(
    st.none(),
    offsets.map(Bound),
    offsets.map(lambda k: Bound(k, death=True)),
)
parts = st.one_of(
    st.sampled_from(["all", "first", "last"]).map(Named),
    offsets.map(lambda i: Position(Bound(i))),
    offsets.map(lambda k: Position(Bound(k, death=True))),
    st.builds(
        Span, bounds, bounds, st.one_of(st.none(), st.integers(-5, 5).filter(bool))
    ),
    st.tuples(
        st.one_of(st.none(), st.integers(0, 60)),
        st.one_of(st.none(), st.integers(0, 60)),
    )
    .filter(lambda t: t != (None, None))
    .map(lambda t: FrameInterval(*sorted(t)) if None not in t else FrameInterval(*t)),
    st.builds(
        lambda e, f: SnipId(snip_id(e, f)), st.integers(0, 7), st.integers(0, 60)
    ),
)
frame_ranges = st.lists(parts, max_size=4).map(lambda ps: FrameRange(tuple(ps)))


@SETTINGS
@given(fr=frame_ranges)
def test_canonical_round_trip(fr):
    text = str(fr)
    again = parse_range(text)
    assert again == fr
    assert again.parts == fr.parts
    assert str(again) == text
    assert hash(again) == hash(fr)
    assert pickle.loads(pickle.dumps(fr)) == fr
    # Whitespace and keyword case do not matter (snip ids are case-sensitive).
    spaced = re.sub(r"([\[\],:+\-]|\.\.)", r" \1 ", text)
    if not fr.snip_ids:
        spaced = spaced.upper()
    assert parse_range(spaced) == fr


@SETTINGS
@given(fr=frame_ranges, frames=frame_lists, data=st.data())
def test_union_equals_union_of_parts(fr, frames, data):
    n = len(frames)
    death_frame = data.draw(
        st.one_of(st.none(), st.sampled_from(frames.tolist() or [None]))
    )
    ids = [snip_id(1, f) for f in frames.tolist()]
    whole = select_positions(fr, frames, death_frame, snip_ids=ids)
    union: set[int] = set()
    for part in fr.parts:
        union.update(
            select_positions(
                FrameRange((part,)), frames, death_frame, snip_ids=ids
            ).tolist()
        )
    assert whole.tolist() == sorted(union)
    assert all(0 <= p < n for p in whole.tolist())


FUZZ_TOKENS = ["death", "DEATH", "all", "first", "last", "t1", "20240411_A01_e01_s0001"]
fuzz_alphabet = st.sampled_from([*"[]:,-+.. 0123456789tTe_()'x\t", *FUZZ_TOKENS])


def check_fuzz(text):
    """Parse or raise RangeSyntaxError, never anything else; parsed specs run."""
    error = None
    try:
        fr = parse_range(text)
    except RangeSyntaxError as err:
        error = err
    if error is not None:
        assert error.spec == text
        assert error.column is not None
        assert 1 <= error.column <= len(text) + 1
        return
    assert parse_range(str(fr)) == fr
    frames = np.array([0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
    ids = [snip_id(1, f) for f in frames.tolist()]
    for death in (None, 7, 3):
        positions = select_positions(fr, frames, death, snip_ids=ids)
        assert np.all(np.diff(positions) > 0)


@SETTINGS
@given(
    text=st.lists(fuzz_alphabet, max_size=20)
    .map("".join)
    .filter(lambda s: len(s) <= 40)
)
def test_fuzz_grammar_alphabet(text):
    check_fuzz(text)


@SETTINGS
@given(text=st.text(max_size=40))
def test_fuzz_any_text(text):
    check_fuzz(text)


# ------------------------------------------------ the vectorised core


def make_partitions(rng: np.random.Generator, n_embryos: int, npartitions: int):
    """Random embryos (gaps, death frames) split into partitions by embryo."""
    embryos = []
    for e in range(n_embryos):
        n = int(rng.integers(1, 16))
        frames = np.sort(
            rng.choice(np.arange(int(rng.integers(0, 3)), 50), size=n, replace=False)
        )
        choice = rng.random()
        if choice < 0.35:
            death = None
        elif choice < 0.9:
            death = int(rng.choice(frames))
        else:
            # A death frame that is not one of the snips (integrity problem).
            missing = np.setdiff1d(np.arange(60), frames)
            death = int(rng.choice(missing))
        embryos.append((e, frames, death))
    order = rng.permutation(n_embryos)  # partitions are not sorted by embryo
    groups = np.array_split(order, npartitions)
    parts = []
    for group in groups:
        blocks = [
            one_embryo_part(embryos[e][1], embryos[e][2], embryo=e) for e in group
        ]
        if blocks:
            parts.append(pd.concat(blocks))
    return embryos, parts


def expected_for(part: pd.DataFrame, embryos, rows: pd.DataFrame):
    """Apply select_positions embryo by embryo: the reference for the core."""
    by_id = {embryo_id(e): (e, frames, death) for e, frames, death in embryos}
    first_pos = {}
    for pos, (emb, fi) in enumerate(
        zip(part["embryo_id"], part["frame_index"], strict=True)
    ):
        if fi == 0:
            first_pos[emb] = pos
    pairs, reasons = [], []
    for row, emb, spec in zip(
        rows["row"], rows["embryo_id"], rows["spec"], strict=True
    ):
        if emb not in first_pos:
            continue
        e, frames, death = by_id[emb]
        ids = [snip_id(e, f) for f in frames.tolist()]
        positions = select_positions(spec, frames, death, snip_ids=ids)
        pairs.extend((int(row), first_pos[emb] + int(p)) for p in positions)
        _, outcomes = _resolve_one(spec, frames.tolist(), death, ids)
        reasons.extend((int(row), number, reason) for number, reason in outcomes)
    return sorted(pairs), sorted(reasons)


@pytest.mark.parametrize("npartitions", [1, 2, 3, 5], ids=lambda k: f"{k}-parts")
@settings(
    deadline=None,
    max_examples=40,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    specs=st.lists(frame_ranges, min_size=1, max_size=40),
)
def test_core_matches_select_positions(npartitions, seed, specs):
    rng = np.random.default_rng(seed)
    n_embryos = int(rng.integers(1, 9))
    embryos, partitions = make_partitions(rng, n_embryos, npartitions)
    # Embryo 8 is unknown to every partition: its rows are ignored.
    row_numbers = rng.permutation(len(specs) * 3)[: len(specs)]
    rows = pd.DataFrame(
        {
            "row": row_numbers.astype(np.int64),
            "embryo_id": [
                embryo_id(int(e))
                for e in rng.integers(0, n_embryos + 1, size=len(specs))
            ],
            "spec": pd.Series(specs, dtype=object),
        }
    )
    for part in partitions:
        pairs, outcomes = expand_ranges(part, rows)
        assert list(pairs.columns) == ["row", "pos"]
        assert pairs.dtypes.tolist() == [np.int64, np.int64]
        assert list(outcomes.columns) == ["row", "reason", "detail"]
        assert outcomes["row"].dtype == np.int64
        expected_pairs, expected_reasons = expected_for(part, embryos, rows)
        assert list(zip(pairs["row"], pairs["pos"], strict=True)) == expected_pairs
        got_reasons = sorted(
            (row, reason)
            for row, reason in zip(outcomes["row"], outcomes["reason"], strict=True)
        )
        assert got_reasons == sorted(
            (row, reason) for row, _, reason in expected_reasons
        )
        assert set(outcomes["reason"]) <= set(REASONS)
        assert outcomes["row"].is_monotonic_increasing
        assert all(isinstance(d, str) and d for d in outcomes["detail"])


def test_core_union_reports_and_selects():
    part = one_embryo_part(FRAMES, DEATH)
    rows = rows_frame([(4, embryo_id(1), "[0:3, 12]")])
    pairs, outcomes = expand_ranges(part, rows)
    assert pairs.to_numpy().tolist() == [[4, 0], [4, 1], [4, 2]]
    assert outcomes["reason"].tolist() == [INDEX_OUT_OF_RANGE]
    assert "position 12 is outside [-10, 10)" in outcomes["detail"][0]


@pytest.mark.parametrize(
    ("spec", "death", "reasons"),
    [
        ("[]", DEATH, [EMPTY_SELECTION]),
        ("[5:2]", DEATH, [EMPTY_SELECTION]),
        ("death", None, [NO_DEATH_FRAME]),
        ("[death:, 12]", None, [NO_DEATH_FRAME, INDEX_OUT_OF_RANGE]),
        ("death", 3, [FRAME_NOT_FOUND]),
        ("death+5", DEATH, [INDEX_OUT_OF_RANGE]),
        ("[t3, t50..]", DEATH, [FRAME_NOT_FOUND, FRAME_NOT_FOUND]),
        (
            ["20240411_A01_e02_s0004", "20240411_A01_e01_s0003"],
            DEATH,
            [UNKNOWN_SNIP_ID, UNKNOWN_SNIP_ID],
        ),
    ],
)
def test_core_reasons(spec, death, reasons):
    part = pd.concat(
        [
            one_embryo_part(FRAMES, death, embryo=1),
            one_embryo_part(FRAMES, None, embryo=2),
        ]
    )
    pairs, outcomes = expand_ranges(part, rows_frame([(0, embryo_id(1), spec)]))
    assert pairs.empty
    assert outcomes["reason"].tolist() == reasons
    assert (outcomes["row"] == 0).all()


def test_core_snip_ids_of_the_right_embryo():
    part = pd.concat(
        [
            one_embryo_part(FRAMES, None, embryo=1),
            one_embryo_part(FRAMES, None, embryo=2),
        ]
    )
    spec = [snip_id(2, 4), snip_id(2, 10), snip_id(1, 5)]
    pairs, outcomes = expand_ranges(part, rows_frame([(7, embryo_id(2), spec)]))
    assert pairs["pos"].tolist() == [13, 19]
    assert outcomes["reason"].tolist() == [UNKNOWN_SNIP_ID]
    assert snip_id(1, 5) in outcomes["detail"][0]


def test_core_orders_rows_and_ignores_unknown_embryos():
    part = pd.concat(
        [
            one_embryo_part(FRAMES, DEATH, embryo=2),
            one_embryo_part([3, 4], None, embryo=1),
        ]
    )
    rows = rows_frame(
        [
            (9, embryo_id(1), "last"),
            (2, embryo_id(2), "[1, 0]"),
            (5, embryo_id(7), "all"),
            (3, embryo_id(1), "[::-1]"),
        ]
    )
    pairs, outcomes = expand_ranges(part, rows)
    assert pairs.to_numpy().tolist() == [[2, 0], [2, 1], [3, 10], [3, 11], [9, 11]]
    assert outcomes.empty


def test_core_empty_inputs():
    part = one_embryo_part(FRAMES, DEATH)
    for p, r in [
        (part, rows_frame([])),
        (part.iloc[:0], rows_frame([(0, embryo_id(1), "all")])),
    ]:
        pairs, outcomes = expand_ranges(p, r)
        assert pairs.empty
        assert outcomes.empty
        assert pairs.dtypes.tolist() == [np.int64, np.int64]


def test_core_accepts_string_specs():
    part = one_embryo_part(FRAMES, DEATH)
    rows = pd.DataFrame(
        {
            "row": [0],
            "embryo_id": [embryo_id(1)],
            "spec": pd.Series(["death:"], dtype=object),
        }
    )
    pairs, _ = expand_ranges(part, rows)
    assert pairs["pos"].tolist() == [6, 7, 8, 9]


def test_core_rejects_duplicate_rows_and_broken_parts():
    part = one_embryo_part(FRAMES, DEATH)
    rows = rows_frame([(0, embryo_id(1), "all"), (0, embryo_id(1), "first")])
    with pytest.raises(ValueError, match="row 0 appears twice"):
        expand_ranges(part, rows)
    rows = rows_frame([(0, embryo_id(1), "all")])
    with pytest.raises(ValueError, match="contiguous"):
        expand_ranges(part.iloc[2:], rows)
    split = pd.concat(
        [part.iloc[:5], one_embryo_part([1], None, embryo=2), part.iloc[5:]]
    )
    with pytest.raises(ValueError, match="contiguous"):
        expand_ranges(split, rows)
    twice = pd.concat([part, part])
    with pytest.raises(ValueError, match="not contiguous"):
        expand_ranges(twice, rows)


# ------------------------------------------------ fast paths of the core


def test_core_snip_ids_need_an_exact_match_not_a_fingerprint():
    # Same byte length and same last 8 bytes as the wanted id, other date:
    # the fingerprint passes, the exact comparison must still tell them apart.
    part = one_embryo_part(FRAMES, None)
    ids = part.index.tolist()
    ids[2] = "20240412_A01_e01_s0002"
    for index in (pd.Index(ids, dtype="str"), pd.Index(ids, dtype=object)):
        twin = part.set_axis(index.rename("snip_id"))
        spec = ["20240412_A01_e01_s0002", "20240411_A01_e01_s0002"]
        pairs, outcomes = expand_ranges(twin, rows_frame([(0, embryo_id(1), spec)]))
        assert pairs["pos"].tolist() == [2]
        assert outcomes["reason"].tolist() == [UNKNOWN_SNIP_ID]
        assert outcomes["detail"][0].startswith("20240411_A01_e01_s0002 is not")


def test_core_snip_ids_repeated_in_an_embryo_take_the_first():
    # Not a valid store, but the core must agree with the reference.
    part = one_embryo_part(FRAMES, None)
    ids = part.index.tolist()
    ids[7] = ids[3]
    for index in (pd.Index(ids, dtype="str"), pd.Index(ids, dtype=object)):
        twin = part.set_axis(index.rename("snip_id"))
        pairs, _ = expand_ranges(twin, rows_frame([(0, embryo_id(1), [ids[3]])]))
        expected = select_positions([ids[3]], FRAMES, snip_ids=ids)
        assert pairs["pos"].tolist() == expected.tolist() == [3]


def test_core_snip_ids_in_a_sliced_partition():
    # A partition cut out of a larger frame: its arrow strings start at an
    # offset inside shared buffers.
    whole = pd.concat([one_embryo_part(FRAMES, None, embryo=e) for e in (1, 2, 3)])
    part = whole.iloc[10:20]
    spec = [snip_id(2, 5), snip_id(2, 0), snip_id(3, 5)]
    pairs, outcomes = expand_ranges(part, rows_frame([(0, embryo_id(2), spec)]))
    assert pairs["pos"].tolist() == [0, 4]
    assert outcomes["reason"].tolist() == [UNKNOWN_SNIP_ID]


def test_core_unions_of_adjacent_rows_stay_apart():
    # Row 0 ends on its embryo's last snip and row 1 starts on the first one:
    # laid end to end, their masks touch, yet each row keeps its own pairs.
    part = pd.concat(
        [
            one_embryo_part(FRAMES, DEATH, embryo=1),
            one_embryo_part([3, 4], None, embryo=2),
        ]
    )
    rows = rows_frame(
        [
            (0, embryo_id(1), "[-1, 0]"),
            (1, embryo_id(1), "[0, 2:4, -1]"),
            (2, embryo_id(2), "[0, 1]"),
            (3, embryo_id(2), "[1, -1]"),
            (4, embryo_id(1), "[::-3, -1, 12]"),
        ]
    )
    pairs, outcomes = expand_ranges(part, rows)
    assert pairs.to_numpy().tolist() == [
        [0, 0], [0, 9], [1, 0], [1, 2], [1, 3], [1, 9], [2, 10], [2, 11],
        [3, 11], [4, 0], [4, 3], [4, 6], [4, 9],
    ]  # fmt: skip
    assert outcomes["row"].tolist() == [4]


def test_core_outcome_details_name_the_problem():
    part = pd.concat(
        [one_embryo_part(FRAMES, 3, embryo=1), one_embryo_part(FRAMES, None, embryo=2)]
    )
    rows = rows_frame(
        [
            (0, embryo_id(1), "[death, 12, -11]"),
            (1, embryo_id(2), "[death+2, t3..t3, t11..]"),
            (2, embryo_id(2), "[5:2]"),
            (3, embryo_id(1), ["20240411_A01_e01_s0099"]),
        ]
    )
    _, outcomes = expand_ranges(part, rows)
    assert outcomes.to_numpy().tolist() == [
        [0, FRAME_NOT_FOUND, f"death frame 3 of embryo {embryo_id(1)} is not one of its snips, needed by '[death, 12, -11]'"],
        [0, INDEX_OUT_OF_RANGE, f"position 12 is outside [-10, 10) for embryo {embryo_id(1)}"],
        [0, INDEX_OUT_OF_RANGE, f"position -11 is outside [-10, 10) for embryo {embryo_id(1)}"],
        [1, NO_DEATH_FRAME, f"embryo {embryo_id(2)} has no death frame, needed by '[death+2, t3, t11..]'"],
        [1, FRAME_NOT_FOUND, f"embryo {embryo_id(2)} has no snip at t3 (its frames are t0..t10)"],
        [1, FRAME_NOT_FOUND, f"embryo {embryo_id(2)} has no snip at t11.. (its frames are t0..t10)"],
        [2, EMPTY_SELECTION, f"'[5:2]' selects no snip of embryo {embryo_id(2)} (10 snips)"],
        [3, UNKNOWN_SNIP_ID, f"20240411_A01_e01_s0099 is not a snip of embryo {embryo_id(1)}"],
    ]  # fmt: skip
    assert outcomes["detail"].dtype == pd.Series([], dtype=str).dtype


def test_core_death_position_outside_the_embryo_is_described():
    part = one_embryo_part(FRAMES, DEATH)
    rows = rows_frame([(0, embryo_id(1), "[death+5, death-7]")])
    _, outcomes = expand_ranges(part, rows)
    assert outcomes["detail"].tolist() == [
        f"death+5 is position 11, outside [0, 10) for embryo {embryo_id(1)}",
        f"death-7 is position -1, outside [0, 10) for embryo {embryo_id(1)}",
    ]


@pytest.mark.parametrize("layout", ["one chunk", "chunks", "int32 offsets"])
def test_core_snip_ids_whatever_the_arrow_layout(layout):
    part = pd.concat(
        [one_embryo_part(FRAMES, None, embryo=e) for e in (1, 2, 3)]
    ).reset_index()
    ids = part["snip_id"].tolist()
    text = pd.Series([], dtype=str).dtype
    if layout == "chunks":
        data = pa.chunked_array([pa.array(ids[:13]), pa.array(ids[13:])])
    else:
        kind = pa.string() if layout == "int32 offsets" else pa.large_string()
        data = pa.array(ids, type=kind)
    try:
        index = pd.Index(pd.arrays.ArrowStringArray(data, dtype=text), name="snip_id")
    except TypeError:  # pandas 2
        index = pd.Index(ids, name="snip_id")
    part = part.drop(columns="snip_id").set_axis(index)
    spec = [snip_id(2, 10), snip_id(2, 0), snip_id(3, 0)]
    pairs, outcomes = expand_ranges(part, rows_frame([(0, embryo_id(2), spec)]))
    assert pairs["pos"].tolist() == [10, 19]
    assert outcomes["reason"].tolist() == [UNKNOWN_SNIP_ID]
