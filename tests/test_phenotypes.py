"""Batch phenotype assignment (issue 4): the lazy change set against a slow reference.

The reference below applies the sequential semantics of ``spec/range-grammar.md``
("Within a batch") embryo by embryo with the store's scalar primitive
``Store.add_phenotype``, on a deep copy of the document. The vectorised path
(``assign_phenotypes`` then ``merge_into_store``) must leave the same phenotype
values on every snip and the same death frame on every embryo, for random
stores and random assignment tables, at several partitionings, on the
synchronous scheduler and on a real ``LocalCluster``.

Decisions of the implementation that the tests pin down (their names say which):

- selections resolve against the store as it was before the batch;
- DEAD rows always apply: ``on_existing`` governs only non-DEAD rows;
- a DEAD row's first selected frame F fills every later snip (its explicitly
  selected snips are ``assigned``, the others ``backfilled``);
- snips that were DEAD before the batch and that a DEAD row selects are ``unchanged``;
- an earlier write superseded by a later row is ``skipped``, reason ``overridden...``;
- a write identical in value and confidence to the stored one is ``unchanged``;
- "already holds a different non-default phenotype" (``on_existing``) is judged
  on the store before the batch, on the snips the row would otherwise write;
- a failed row is one change-set line with status ``failed``, no ``snip_id``,
  and a ``reason`` starting with the reason's name.
"""

from __future__ import annotations

import copy
import math
import pickle

import dask
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.errors import AnnotationError, RangeSyntaxError
from pipeline.phenotypes import (
    AssignmentInputError,
    assign_phenotypes_partition,
    prepare_phenotype_rows,
    read_assignments,
)
from pipeline.ranges import parse_range, select_positions
from pipeline.schema import PHENOTYPE_CHANGE_COLUMNS, empty_frame
from pipeline.store import Store
from pipeline.testing import make_document, make_store

AUTHOR = "tester"
STAMP = "2026-01-05T10:00:00+00:00"
RANGE_REASONS = {
    "empty_selection",
    "index_out_of_range",
    "frame_not_found",
    "no_death_frame",
    "unknown_snip_id",
}
LIVE = ["NORMAL", "EDEMA", "HEART_DEFECT", "BODY_AXIS", "TBD", "BLUR"]


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


# ----------------------------------------------------------------- reference


def _missing(value):
    return (
        value is None
        or value is pd.NA
        or (isinstance(value, float) and math.isnan(value))
    )


def _embryo_view(embryo):
    """The embryo's snip ids and frames in frame order (the positions of the grammar)."""
    items = sorted(embryo["snips"].items(), key=lambda kv: kv[1]["frame"])
    return [sid for sid, _ in items], [s["frame"] for _, s in items]


def reference_assign(
    doc, assignments, *, on_existing="overwrite", overwrite_dead=False
):
    """Apply *assignments* row by row with the scalar primitives; the slow meaning.

    Returns the new document and ``{row: reason name}`` of the rows that failed
    as a whole. Empty selections fail with the reason ``"range"`` (any of
    :data:`RANGE_REASONS`).
    """
    store = Store(copy.deepcopy(doc), validate=False)
    phenotypes = store.vocabulary["phenotypes"]
    by_upper = {p.upper(): p for p in phenotypes}
    default = next(k for k, v in phenotypes.items() if v.get("is_default"))
    # Everything a selection needs comes from the store before the batch.
    before = {
        eid: (*_embryo_view(e), e["death_frame"]) for eid, e in store.embryos.items()
    }
    old_value = {
        sid: s["phenotype"]["value"]
        for e in store.embryos.values()
        for sid, s in e["snips"].items()
    }
    failed = {}
    for i, row in enumerate(assignments):
        eid, pheno = row.get("embryo_id"), row.get("phenotype")
        conf = row.get("confidence")
        spec = row.get("frames", "all")
        if _missing(eid) or not str(eid).strip():
            failed[i] = "missing_embryo_id"
            continue
        if _missing(pheno) or not str(pheno).strip():
            failed[i] = "missing_phenotype"
            continue
        value = by_upper.get(str(pheno).strip().upper())
        if value is None:
            failed[i] = "unknown_phenotype"
            continue
        try:
            parse_range(spec)
        except RangeSyntaxError:
            failed[i] = "bad_range"
            continue
        if not _missing(conf) and not (
            isinstance(conf, int | float) and 0 <= conf <= 1
        ):
            failed[i] = "bad_confidence"
            continue
        conf = None if _missing(conf) else float(conf)
        if eid not in before:
            failed[i] = "unknown_embryo"
            continue
        sids, frames, death0 = before[eid]
        chosen = [
            sids[p] for p in select_positions(spec, frames, death0, snip_ids=sids)
        ]
        if not chosen:
            failed[i] = "range"
            continue
        embryo = store.embryos[eid]
        if value == "DEAD":
            # DEAD always applies: the primitive fills forward from the first frame.
            store.add_phenotype(chosen[0], value, AUTHOR, confidence=conf)
            continue
        death = embryo["death_frame"]
        would_write = [
            s
            for s in chosen
            if overwrite_dead or death is None or embryo["snips"][s]["frame"] < death
        ]
        held = [s for s in would_write if old_value[s] not in (default, value, "DEAD")]
        if held and on_existing == "error":
            failed[i] = "existing_value"
            continue
        if on_existing == "skip":
            chosen = [s for s in chosen if s not in held]
        saved = copy.deepcopy(embryo)
        try:
            for sid in chosen:
                try:
                    store.add_phenotype(
                        sid,
                        value,
                        AUTHOR,
                        confidence=conf,
                        overwrite_dead=overwrite_dead,
                    )
                except AnnotationError as err:
                    if err.reason != "after_death":
                        raise
        except AnnotationError as err:
            # With overwrite_dead, a row that would break permanence fails whole.
            if err.reason != "breaks_permanence":
                raise
            store.embryos[eid] = saved
            failed[i] = "breaks_permanence"
    return store.doc, failed


def vectorised_assign(
    doc, assignments, *, npartitions=1, on_existing="overwrite", overwrite_dead=False
):
    """The code under test: lazy change set, then an in-memory merge."""
    store = Store(copy.deepcopy(doc))
    snips = pipeline.snips_from_store(store, npartitions=npartitions)
    changes = pipeline.assign_phenotypes(
        snips,
        pd.DataFrame(assignments),
        author=AUTHOR,
        on_existing=on_existing,
        overwrite_dead=overwrite_dead,
        vocabulary=store.vocabulary,
    )
    report = pipeline.merge_into_store(store, changes)
    return store, report


def final_state(doc):
    """Phenotype value (and confidence, for live values) per snip; death frame per embryo."""
    values = {}
    deaths = {}
    for eid, embryo in doc["embryos"].items():
        deaths[eid] = embryo["death_frame"]
        for sid, snip in embryo["snips"].items():
            p = snip["phenotype"]
            # The DEAD fill's provenance differs by design (the vectorised path
            # credits the first DEAD row); the value is what permanence is about.
            values[sid] = (
                p["value"]
                if p["value"] == "DEAD"
                else (p["value"], p.get("confidence"))
            )
    return values, deaths


def failed_reasons(report):
    failed = report.changes.loc[report.changes["status"] == "failed"]
    out = {}
    for row, reason in zip(failed["row"], failed["reason"], strict=True):
        name = str(reason).split(":", 1)[0]
        out[int(row)] = "range" if name in RANGE_REASONS else name
    return out


def assert_same_as_reference(doc, assignments, **options):
    npartitions = options.pop("npartitions", 1)
    expected_doc, expected_failed = reference_assign(doc, assignments, **options)
    store, report = vectorised_assign(
        doc, assignments, npartitions=npartitions, **options
    )
    exp_values, exp_deaths = final_state(expected_doc)
    got_values, got_deaths = final_state(store.doc)
    wrong = {
        s: (exp_values[s], got_values[s])
        for s in exp_values
        if exp_values[s] != got_values[s]
    }
    assert not wrong, (
        f"{len(wrong)} snip(s) differ (reference, vectorised), e.g. {sorted(wrong.items())[:5]}"
    )
    bad_deaths = {
        e: (exp_deaths[e], got_deaths[e])
        for e in exp_deaths
        if exp_deaths[e] != got_deaths[e]
    }
    assert not bad_deaths, f"death frames differ (reference, vectorised): {bad_deaths}"
    assert failed_reasons(report) == expected_failed
    # Every assignment row appears in the change set (as writes, skips, or a failure).
    changes = report.changes
    assert set(changes["row"]) == set(range(len(assignments)))
    # At most one write per snip, and it is what the snip holds afterwards.
    writes = changes.loc[changes["status"].isin(["assigned", "backfilled"])]
    assert writes["snip_id"].is_unique
    for sid, value, conf in zip(
        writes["snip_id"], writes["new_value"], writes["confidence"], strict=True
    ):
        assert got_values[sid] == (
            value if value == "DEAD" else (value, None if np.isnan(conf) else conf)
        )
    assert report.overrides == int(
        changes["reason"].fillna("").str.startswith("overridden").sum()
    )
    assert (changes.loc[changes["status"] == "failed", "snip_id"].isna()).all()
    return store, report


# ------------------------------------------------------------ random inputs


def _random_spec(rng, sids, frames):
    n = len(frames)
    kind = rng.integers(0, 12)

    def idx(lo=-n - 2, hi=n + 2):
        return int(rng.integers(lo, hi + 1))

    def opt(x):
        return "" if rng.random() < 0.3 else str(x)

    def slice_text():
        step = rng.choice(["", "1", "2", "3", "-1", "-2", "-3"])
        return f"{opt(idx())}:{opt(idx())}" + (f":{step}" if step else "")

    def death_bound():
        k = int(rng.integers(0, 5))
        return "death" if k == 0 else f"death{rng.choice(['+', '-'])}{k}"

    if kind == 0:
        return str(rng.choice(["all", "first", "last", "ALL", "Last"]))
    if kind == 1:
        return f"[{idx()}]" if rng.random() < 0.7 else str(idx())
    if kind == 2:
        return f"[{slice_text()}]"
    if kind == 3:
        parts = [
            slice_text() if rng.random() < 0.5 else str(idx())
            for _ in range(rng.integers(2, 4))
        ]
        return "[" + ", ".join(parts) + "]"
    if kind == 4:
        return death_bound()
    if kind == 5:
        form = rng.integers(0, 5)
        if form == 0:
            return f"{death_bound()}:"
        if form == 1:
            return f":{death_bound()}"
        if form == 2:
            return f"{death_bound()}:{death_bound()}"
        if form == 3:
            return f"{death_bound()}:{death_bound()}:{rng.choice([1, 2, -1])}"
        return f"[{death_bound()}:]"
    if kind == 6:
        lo = int(rng.integers(0, frames[-1] + 3))
        hi = lo + int(rng.integers(0, 6))
        return str(rng.choice([f"t{lo}", f"t{lo}..t{hi}", f"t{lo}..", f"..t{hi}"]))
    if kind == 7:
        # death-relative and position parts in one union
        return f"[{death_bound()}, {idx(0, n - 1)}]"
    if kind == 8:
        chosen = list(
            rng.choice(
                sids, size=min(len(sids), int(rng.integers(1, 3))), replace=False
            )
        )
        if rng.random() < 0.2:
            chosen.append(sids[0][:-4] + "9999")  # not a snip of this embryo
        return chosen
    if kind == 9:
        return [idx(-n, n - 1) for _ in range(rng.integers(1, 4))]
    if kind == 10:
        return f"[{idx()}:{idx()}:-{rng.integers(1, 3)}]"
    return "all"


BAD_CELLS = [
    ("embryo_id", "20990101_A01_e01", "unknown_embryo"),
    ("embryo_id", None, "missing_embryo_id"),
    ("phenotype", "EDMEA", "unknown_phenotype"),
    ("phenotype", None, "missing_phenotype"),
    ("frames", "[1:2:3:4]", "bad_range"),
    ("frames", "[::0]", "bad_range"),
    ("frames", "t9..t2", "bad_range"),
    ("confidence", 1.7, "bad_confidence"),
    ("confidence", -0.2, "bad_confidence"),
]


def random_assignments(
    doc, n_rows, seed, *, bad_fraction=0.08, dead_fraction=0.2, few_embryos=4
):
    """Random rows, concentrated on a few embryos so that rows interact."""
    rng = np.random.default_rng(seed)
    embryos = sorted(doc["embryos"])
    hot = list(rng.choice(embryos, size=min(few_embryos, len(embryos)), replace=False))
    rows = []
    for _ in range(n_rows):
        eid = str(rng.choice(hot)) if rng.random() < 0.8 else str(rng.choice(embryos))
        sids, frames = _embryo_view(doc["embryos"][eid])
        value = "DEAD" if rng.random() < dead_fraction else str(rng.choice(LIVE))
        if rng.random() < 0.2:
            value = value.lower()
        conf = float(rng.choice([np.nan, 0.5, 0.9, 1.0]))
        rows.append(
            {
                "embryo_id": eid,
                "phenotype": value,
                "frames": _random_spec(rng, sids, frames),
                "confidence": conf,
            }
        )
    for i in np.flatnonzero(rng.random(n_rows) < bad_fraction):
        column, cell, _ = BAD_CELLS[int(rng.integers(0, len(BAD_CELLS)))]
        rows[i][column] = cell
    return rows


def random_document(seed, **kwargs):
    doc = make_document(
        n_experiments=2,
        n_embryos=5,
        n_frames=12,
        seed=seed,
        dead_fraction=0.5,
        **kwargs,
    )
    # Some snips already hold a live phenotype, so on_existing has work to do.
    rng = np.random.default_rng(seed + 1000)
    for embryo in doc["embryos"].values():
        for snip in embryo["snips"].values():
            if snip["phenotype"]["value"] != "DEAD" and rng.random() < 0.25:
                snip["phenotype"] = {
                    "value": str(rng.choice(LIVE[:3])),
                    "author": "old",
                    "timestamp": STAMP,
                    "confidence": 0.9,
                }
    return doc


# ------------------------------------------------------- reference comparison


@pytest.mark.parametrize(
    "npartitions", [1, 2, 5], ids=["one-part", "two-parts", "five-parts"]
)
@pytest.mark.parametrize("seed", range(3))
def test_matches_sequential_reference_overwrite(seed, npartitions):
    doc = random_document(seed)
    rows = random_assignments(doc, 80, seed)
    assert_same_as_reference(doc, rows, npartitions=npartitions)


@pytest.mark.parametrize("npartitions", [1, 5], ids=["one-part", "five-parts"])
@pytest.mark.parametrize(
    ("on_existing", "overwrite_dead"),
    [
        ("skip", False),
        ("error", False),
        ("overwrite", True),
        ("skip", True),
        ("error", True),
    ],
    ids=[
        "skip",
        "error",
        "overwrite-dead",
        "skip-overwrite-dead",
        "error-overwrite-dead",
    ],
)
@pytest.mark.parametrize("seed", [100, 101])
def test_matches_sequential_reference_options(
    seed, on_existing, overwrite_dead, npartitions
):
    doc = random_document(seed)
    rows = random_assignments(doc, 60, seed, dead_fraction=0.3, few_embryos=3)
    assert_same_as_reference(
        doc,
        rows,
        npartitions=npartitions,
        on_existing=on_existing,
        overwrite_dead=overwrite_dead,
    )


def test_matches_reference_on_a_wider_store_with_every_suffix_style():
    # Three experiments use the s####, t#### and bare #### suffixes; a 3-digit width too.
    doc = make_document(
        n_experiments=4, n_embryos=6, n_frames=15, seed=7, dead_fraction=0.4
    )
    rows = random_assignments(doc, 120, 7, few_embryos=10)
    assert_same_as_reference(doc, rows, npartitions=3)


_SPEC_STRATEGY = st.one_of(
    st.sampled_from(
        [
            "all",
            "first",
            "last",
            "death",
            "death:",
            ":death",
            "death-2:death+2",
            "death+1",
            "[death-3:]",
            "[::-1]",
            "[8:2:-2]",
            "[-3:]",
            "[0:3, -1]",
            "t2..t5",
            "t4..",
            "..t3",
            "[12]",
            "t3",
        ]
    ),
    st.builds(
        lambda a, b, c: f"[{a}:{b}:{c}]",
        st.integers(-12, 12),
        st.integers(-12, 12),
        st.sampled_from([1, 2, -1, -3]),
    ),
    st.lists(st.integers(-9, 8), min_size=1, max_size=3),
)


@settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.sampled_from(["DEAD", "NORMAL", "EDEMA", "NONE"]),
            _SPEC_STRATEGY,
        ),
        min_size=1,
        max_size=8,
    ),
    on_existing=st.sampled_from(["overwrite", "skip", "error"]),
    overwrite_dead=st.booleans(),
)
def test_property_sequential_meaning_on_one_video(rows, on_existing, overwrite_dead):
    # Few embryos, many interacting rows: DEAD then live, live then DEAD, DEAD moved earlier.
    doc = random_document(5)
    embryos = sorted(doc["embryos"])[:4]
    table = [{"embryo_id": embryos[e], "phenotype": p, "frames": s} for e, p, s in rows]
    assert_same_as_reference(
        doc, table, on_existing=on_existing, overwrite_dead=overwrite_dead
    )


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_matches_reference_on_a_local_cluster():
    distributed = pytest.importorskip("distributed")
    doc = random_document(11)
    rows = random_assignments(doc, 60, 11)
    expected_doc, expected_failed = reference_assign(doc, rows)
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
        dask.config.set(scheduler=None),
    ):
        store = Store(copy.deepcopy(doc))
        snips = pipeline.snips_from_store(store, npartitions=3)
        changes = pipeline.assign_phenotypes(snips, pd.DataFrame(rows), author=AUTHOR)
        report = pipeline.merge_into_store(store, changes)
    assert final_state(store.doc) == final_state(expected_doc)
    assert failed_reasons(report) == expected_failed


# ------------------------------------------------------- hand-made statuses


def tiny_store():
    """Two embryos of 10 snips (frames 0,1,2,4,...,10: the spec's example), one dead at frame 7."""
    frames = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    embryos = {}
    for eid, death in (("20240411_A01_e01", 7), ("20240411_A01_e02", None)):
        snips = {}
        for f in frames:
            value = "DEAD" if death is not None and f >= death else "NONE"
            snips[f"{eid}_s{f:04d}"] = {
                "frame": f,
                "phenotype": {"value": value, "author": "init", "timestamp": STAMP},
                "flags": [],
            }
        embryos[eid] = {
            "source": {"experiment_id": "20240411", "video_id": "20240411_A01"},
            "genotype": None,
            "treatments": [],
            "death_frame": death,
            "flags": [],
            "snips": snips,
        }
    embryos["20240411_A01_e02"]["snips"]["20240411_A01_e02_s0001"]["phenotype"] = {
        "value": "EDEMA",
        "author": "init",
        "timestamp": STAMP,
        "confidence": 0.8,
    }
    doc = {
        "file_info": {
            "schema_version": 1,
            "created": STAMP,
            "last_updated": STAMP,
            "source": "test",
        },
        "embryos": embryos,
        "flags": {"experiment": {}, "video": {}, "image": {}},
    }
    return Store(doc)


DEAD_E = "20240411_A01_e01"
LIVE_E = "20240411_A01_e02"


def changes_of(rows, store=None, **options):
    store = store or tiny_store()
    snips = pipeline.snips_from_store(store, npartitions=options.pop("npartitions", 1))
    table = pipeline.assign_phenotypes(
        snips, rows, author=AUTHOR, timestamp=STAMP, **options
    ).compute()
    return table.sort_values(["row", "frame"], kind="stable", ignore_index=True)


def lines(table, row):
    part = table.loc[table["row"] == row]
    return list(zip(part["frame"].tolist(), part["status"].tolist(), strict=True))


def test_change_set_has_the_schema_columns_and_dtypes():
    table = changes_of(
        [{"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[0:2]"}]
    )
    assert list(table.columns) == list(PHENOTYPE_CHANGE_COLUMNS)
    pd.testing.assert_series_equal(
        table.dtypes, empty_frame(PHENOTYPE_CHANGE_COLUMNS).dtypes
    )
    assert table["author"].unique().tolist() == [AUTHOR]
    assert table["timestamp"].unique().tolist() == [STAMP]


def test_assign_phenotypes_is_lazy_and_matches_its_pandas_twin():
    store = tiny_store()
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "edema", "frames": "[::3]"},
        {"embryo_id": DEAD_E, "phenotype": "DEAD", "frames": "t4"},
    ]
    snips = pipeline.snips_from_store(store, npartitions=1)
    lazy = pipeline.assign_phenotypes(snips, rows, author=AUTHOR, timestamp=STAMP)
    assert isinstance(lazy, dask.dataframe.DataFrame)
    part = snips.get_partition(0).compute()
    twin = assign_phenotypes_partition(
        part, prepare_phenotype_rows(rows), author=AUTHOR, timestamp=STAMP
    )
    pd.testing.assert_frame_equal(
        lazy.compute().reset_index(drop=True), twin.reset_index(drop=True)
    )


def test_assigned_in_canonical_case():
    table = changes_of(
        [{"embryo_id": LIVE_E, "phenotype": "heart_defect", "frames": "first"}]
    )
    assert table[["frame", "new_value", "status"]].values.tolist() == [
        [0, "HEART_DEFECT", "assigned"]
    ]


def test_dead_fills_forward_explicit_snips_assigned_later_ones_backfilled():
    table = changes_of([{"embryo_id": LIVE_E, "phenotype": "DEAD", "frames": "[4:6]"}])
    assert lines(table, 0) == [
        (5, "assigned"),
        (6, "assigned"),
        (7, "backfilled"),
        (8, "backfilled"),
        (9, "backfilled"),
        (10, "backfilled"),
    ]


def test_dead_row_selecting_snips_dead_before_the_batch_reports_them_unchanged():
    # Frames 8 and 9 were DEAD already; frame 4 is the new death frame.
    table = changes_of(
        [{"embryo_id": DEAD_E, "phenotype": "DEAD", "frames": "[3, 7, 8]"}]
    )
    assert lines(table, 0) == [
        (4, "assigned"),
        (5, "backfilled"),
        (6, "backfilled"),
        (8, "unchanged"),
        (9, "unchanged"),
    ]


def test_dead_row_moves_the_death_frame_earlier_and_merge_updates_it():
    store = tiny_store()
    pipeline.merge_into_store(
        store,
        changes_of([{"embryo_id": DEAD_E, "phenotype": "DEAD", "frames": "t4"}], store),
    )
    assert store.embryos[DEAD_E]["death_frame"] == 4
    values = [s["phenotype"]["value"] for s in store.embryos[DEAD_E]["snips"].values()]
    assert values == ["NONE"] * 3 + ["DEAD"] * 7


def test_live_value_at_or_after_death_is_skipped_after_death():
    table = changes_of(
        [{"embryo_id": DEAD_E, "phenotype": "NORMAL", "frames": "death-1:death+2"}]
    )
    assert lines(table, 0) == [(6, "assigned"), (7, "skipped"), (8, "skipped")]
    assert table.loc[table["status"] == "skipped", "reason"].tolist() == [
        "after_death",
        "after_death",
    ]


def test_after_death_uses_the_death_frame_as_it_stands_after_earlier_rows():
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "DEAD", "frames": "t5"},
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "t2..t6"},
    ]
    table = changes_of(rows)
    assert lines(table, 1) == [
        (2, "assigned"),
        (4, "assigned"),
        (5, "skipped"),
        (6, "skipped"),
    ]
    assert set(
        table.loc[(table["row"] == 1) & (table["status"] == "skipped"), "reason"]
    ) == {"after_death"}


def test_selections_resolve_against_the_death_frame_before_the_batch():
    # Row 0 moves death to frame 2; "death" in row 1 still means frame 7 (before the batch).
    rows = [
        {"embryo_id": DEAD_E, "phenotype": "DEAD", "frames": "t2"},
        {"embryo_id": DEAD_E, "phenotype": "DEAD", "frames": "death"},
    ]
    table = changes_of(rows)
    assert lines(table, 1) == [(7, "unchanged")]
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "DEAD", "frames": "t5"},
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "death"},
    ]
    table = changes_of(rows)
    assert table.loc[table["row"] == 1, "status"].tolist() == ["failed"]
    assert table.loc[table["row"] == 1, "reason"].str.startswith("no_death_frame").all()


def test_earlier_write_superseded_by_a_later_row_is_skipped_overridden_and_counted():
    store = tiny_store()
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[0:4]"},
        {"embryo_id": LIVE_E, "phenotype": "BODY_AXIS", "frames": "[2:3]"},
    ]
    table = changes_of(rows, store)
    skipped = table.loc[table["status"] == "skipped"]
    assert skipped[["row", "frame"]].values.tolist() == [[0, 2]]
    assert skipped["reason"].iloc[0].startswith("overridden")
    report = pipeline.merge_into_store(store, table)
    assert report.overrides == 1
    assert (
        store.embryos[LIVE_E]["snips"]["20240411_A01_e02_s0002"]["phenotype"]["value"]
        == "BODY_AXIS"
    )


def test_live_write_killed_by_a_later_dead_row_is_skipped_overridden():
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "EDEMA", "frames": "t8"},
        {"embryo_id": LIVE_E, "phenotype": "DEAD", "frames": "t6"},
    ]
    table = changes_of(rows)
    assert lines(table, 0) == [(8, "skipped")]
    assert table.loc[table["row"] == 0, "reason"].iloc[0].startswith("overridden")


def test_write_identical_in_value_and_confidence_is_unchanged():
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "EDEMA", "frames": "t1", "confidence": 0.8},
        {
            "embryo_id": LIVE_E,
            "phenotype": "EDEMA",
            "frames": "t1..t2",
            "confidence": 0.9,
        },
    ]
    table = changes_of(rows[:1])
    assert lines(table, 0) == [(1, "unchanged")]
    # A different confidence is a real write.
    table = changes_of(rows[1:])
    assert lines(table, 0) == [(1, "assigned"), (2, "assigned")]


def test_on_existing_skip_keeps_other_values_and_writes_the_rest():
    row = {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[0:3]"}
    table = changes_of([row], on_existing="skip")
    assert lines(table, 0) == [(0, "assigned"), (1, "skipped"), (2, "assigned")]
    assert table.loc[table["frame"] == 1, "reason"].iloc[0].startswith("existing_value")


def test_on_existing_error_fails_the_whole_row_only():
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[0:3]"},
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[4:6]"},
    ]
    table = changes_of(rows, on_existing="error")
    assert table.loc[table["row"] == 0, "status"].tolist() == ["failed"]
    assert table.loc[table["row"] == 0, "snip_id"].isna().all()
    assert table.loc[table["row"] == 0, "reason"].iloc[0].startswith("existing_value")
    assert lines(table, 1) == [(5, "assigned"), (6, "assigned")]


def test_on_existing_does_not_count_the_default_value_the_same_value_or_dead():
    rows = [
        {
            "embryo_id": LIVE_E,
            "phenotype": "EDEMA",
            "frames": "[0:3]",
        },  # NONE, EDEMA (same), NONE
        {
            "embryo_id": DEAD_E,
            "phenotype": "NORMAL",
            "frames": "death-1:",
        },  # DEAD snips: after_death, not existing
    ]
    table = changes_of(rows, on_existing="error")
    assert "failed" not in set(table["status"])


def test_dead_rows_always_apply_whatever_on_existing_says():
    table = changes_of(
        [{"embryo_id": LIVE_E, "phenotype": "DEAD", "frames": "t1"}],
        on_existing="error",
    )
    assert set(table["status"]) == {"assigned", "backfilled"}
    assert lines(table, 0)[0] == (1, "assigned")


def test_overwrite_dead_corrects_a_death_call_keeping_permanence():
    store = tiny_store()
    # death:death+1 → frames 7 and 8 live, 9 and 10 DEAD: permanence holds, death moves to 9.
    table = changes_of(
        [{"embryo_id": DEAD_E, "phenotype": "NORMAL", "frames": "death:death+2"}],
        store,
        overwrite_dead=True,
    )
    assert lines(table, 0) == [(7, "assigned"), (8, "assigned")]
    pipeline.merge_into_store(store, table)
    assert store.embryos[DEAD_E]["death_frame"] == 9


def test_overwrite_dead_removes_a_death_entirely():
    store = tiny_store()
    table = changes_of(
        [{"embryo_id": DEAD_E, "phenotype": "NORMAL", "frames": "death:"}],
        store,
        overwrite_dead=True,
    )
    pipeline.merge_into_store(store, table)
    assert store.embryos[DEAD_E]["death_frame"] is None


def test_overwrite_dead_row_breaking_permanence_fails_and_writes_nothing():
    store = tiny_store()
    rows = [
        {
            "embryo_id": DEAD_E,
            "phenotype": "NORMAL",
            "frames": "[0, death+1]",
        },  # frame 8 live, 7 still DEAD
        {"embryo_id": DEAD_E, "phenotype": "EDEMA", "frames": "first"},
    ]
    table = changes_of(rows, store, overwrite_dead=True)
    assert table.loc[table["row"] == 0, "status"].tolist() == ["failed"]
    assert (
        table.loc[table["row"] == 0, "reason"].iloc[0].startswith("breaks_permanence")
    )
    assert lines(table, 1) == [(0, "assigned")]
    pipeline.merge_into_store(store, table)
    assert store.embryos[DEAD_E]["death_frame"] == 7
    assert (
        store.embryos[DEAD_E]["snips"]["20240411_A01_e01_s0000"]["phenotype"]["value"]
        == "EDEMA"
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"embryo_id": "20990101_A01_e01", "phenotype": "NORMAL"}, "unknown_embryo"),
        ({"embryo_id": LIVE_E, "phenotype": "EDMEA"}, "unknown_phenotype"),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "confidence": 1.5},
            "bad_confidence",
        ),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "confidence": "high"},
            "bad_confidence",
        ),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[1:2:3:4]"},
            "bad_range",
        ),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[]"},
            "empty_selection",
        ),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[5:2]"},
            "empty_selection",
        ),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[12]"},
            "index_out_of_range",
        ),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "t3"},
            "frame_not_found",
        ),
        (
            {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "death"},
            "no_death_frame",
        ),
        (
            {
                "embryo_id": LIVE_E,
                "phenotype": "NORMAL",
                "frames": ["20240411_A01_e02_s0003"],
            },
            "unknown_snip_id",
        ),
        ({"embryo_id": "", "phenotype": "NORMAL"}, "missing_embryo_id"),
        ({"embryo_id": LIVE_E, "phenotype": None}, "missing_phenotype"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_failed_row_reason(row, reason):
    table = changes_of([row])
    assert table["status"].tolist() == ["failed"]
    assert table["snip_id"].isna().all()
    assert table["reason"].iloc[0].split(":", 1)[0] == reason
    assert table["row"].tolist() == [0]


def test_every_bad_row_is_reported_at_once_and_good_rows_still_apply():
    rows = [
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "first"},
        {"embryo_id": "20990101_A01_e01", "phenotype": "NORMAL"},
        {"embryo_id": LIVE_E, "phenotype": "EDMEA"},
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[1:2:3:4]"},
        {"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "last", "confidence": 2},
        {"embryo_id": DEAD_E, "phenotype": "TBD", "frames": "t0..t1"},
    ]
    table = changes_of(rows, npartitions=2)
    failed = table.loc[table["status"] == "failed"].sort_values("row")
    assert failed["row"].tolist() == [1, 2, 3, 4]
    assert [r.split(":")[0] for r in failed["reason"]] == [
        "unknown_embryo",
        "unknown_phenotype",
        "bad_range",
        "bad_confidence",
    ]
    assert lines(table, 0) == [(0, "assigned")]
    assert lines(table, 5) == [(0, "assigned"), (1, "assigned")]


def test_row_with_one_part_out_of_range_keeps_its_writes_and_notes_the_problem():
    table = changes_of(
        [{"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[0, 42]"}]
    )
    assert lines(table, 0) == [(0, "assigned")]
    assert table["reason"].iloc[0].startswith("index_out_of_range")


def test_snip_id_lists_select_those_snips():
    table = changes_of(
        [
            {
                "embryo_id": LIVE_E,
                "phenotype": "NORMAL",
                "frames": ["20240411_A01_e02_s0010", "20240411_A01_e02_s0004"],
            }
        ]
    )
    assert lines(table, 0) == [(4, "assigned"), (10, "assigned")]


def test_negative_step_and_union_select_like_the_grammar():
    table = changes_of(
        [{"embryo_id": LIVE_E, "phenotype": "NORMAL", "frames": "[8:2:-2, 0]"}]
    )
    # positions 8, 6, 4 and 0 -> frames 9, 7, 5 and 0
    assert [f for f, _ in lines(table, 0)] == [0, 5, 7, 9]


def test_result_does_not_depend_on_npartitions():
    doc = random_document(3)
    rows = random_assignments(doc, 50, 3)
    tables = []
    for n in (1, 2, 5):
        store = Store(copy.deepcopy(doc))
        table = changes_of(pd.DataFrame(rows), store, npartitions=n)
        tables.append(
            table.drop(columns=["timestamp"]).sort_values(
                ["row", "frame", "snip_id"], ignore_index=True
            )
        )
    pd.testing.assert_frame_equal(tables[0], tables[1])
    pd.testing.assert_frame_equal(tables[0], tables[2])


def test_missing_frames_cell_means_all():
    table = changes_of(
        pd.DataFrame({"embryo_id": [LIVE_E], "phenotype": ["NORMAL"], "frames": [None]})
    )
    assert len(lines(table, 0)) == 10


# ----------------------------------------------------------- input handling


def test_bad_author_and_on_existing_raise():
    snips = pipeline.snips_from_store(tiny_store())
    with pytest.raises(ValueError, match="author"):
        pipeline.assign_phenotypes(snips, [], author=" ")
    with pytest.raises(ValueError, match="on_existing"):
        pipeline.assign_phenotypes(snips, [], author=AUTHOR, on_existing="replace")


def test_missing_columns_raise_assignment_input_error():
    snips = pipeline.snips_from_store(tiny_store())
    with pytest.raises(AssignmentInputError, match="phenotype"):
        pipeline.assign_phenotypes(snips, [{"embryo_id": LIVE_E}], author=AUTHOR)
    assert issubclass(AssignmentInputError, ValueError)


def test_empty_assignments_give_an_empty_change_set():
    table = changes_of(pd.DataFrame({"embryo_id": [], "phenotype": []}))
    assert len(table) == 0
    assert list(table.columns) == list(PHENOTYPE_CHANGE_COLUMNS)


def test_read_assignments_from_csv_json_and_missing_file(tmp_path):
    rows = pd.DataFrame(
        {
            "embryo_id": [LIVE_E],
            "phenotype": ["NORMAL"],
            "frames": ["[0:2]"],
            "confidence": ["0.5"],
        }
    )
    rows.to_csv(tmp_path / "a.csv", index=False)
    rows.to_json(tmp_path / "a.json", orient="records")
    for name in ("a.csv", "a.json"):
        table = read_assignments(tmp_path / name)
        assert table["embryo_id"].tolist() == [LIVE_E]
        assert lines(changes_of(table), 0) == [(0, "assigned"), (1, "assigned")]
    with pytest.raises(AssignmentInputError, match="does not exist"):
        read_assignments(tmp_path / "nope.csv")
    (tmp_path / "a.parquet").write_bytes(b"")
    with pytest.raises(AssignmentInputError, match=r"expected a \.csv"):
        read_assignments(tmp_path / "a.parquet")


def test_shared_example_csv_applies_to_the_shared_example_store(tmp_path):
    from pathlib import Path

    examples = Path("/work/shared/examples")
    if not (examples / "small_store.json").exists():
        pytest.skip("shared examples not available")
    store = pipeline.read_store(examples / "small_store.json")
    snips = pipeline.snips_from_store(store, npartitions=2)
    table = pipeline.assign_phenotypes(
        snips,
        examples / "small_assignments.csv",
        author=AUTHOR,
        vocabulary=store.vocabulary,
    ).compute()
    assert len(table) > 0
    assert set(table["status"]) <= {
        "assigned",
        "backfilled",
        "unchanged",
        "skipped",
        "failed",
    }


def test_prepared_rows_pickle_for_workers():
    rows = prepare_phenotype_rows(
        [{"embryo_id": LIVE_E, "phenotype": "normal", "frames": "death-2:death+2"}]
    )
    again = pickle.loads(pickle.dumps(rows))
    assert again["spec"].iloc[0] == rows["spec"].iloc[0]
    assert again["phenotype"].tolist() == ["NORMAL"]


def test_random_store_fixture_is_valid_and_has_dead_embryos():
    doc = random_document(0)
    store = Store(copy.deepcopy(doc))
    assert any(e["death_frame"] is not None for e in store.embryos.values())
    assert (
        make_store(n_experiments=1, n_embryos=2, n_frames=4, seed=0).counts()["embryos"]
        == 2
    )


def test_repeated_cells_are_checked_once_and_every_row_keeps_its_outcome():
    from pipeline.phenotypes import prepare_phenotype_rows

    text = pd.DataFrame(
        {
            "embryo_id": ["e1", "e2", "e1", "e3"],
            "phenotype": ["edema", "EDEMA", "nope", "edema"],
            "frames": ["[0:3]", "[0:", "[0:3]", "[0:"],
            "confidence": ["0.5", "2", "0.5", ""],
        }
    )
    rows = prepare_phenotype_rows(text)
    assert rows["phenotype"].tolist()[:2] == ["EDEMA", "EDEMA"]
    assert rows["spec"].iat[0] is rows["spec"].iat[2]  # parsed once
    assert rows["error"].isna().tolist() == [True, False, False, False]
    errors = rows["error"].tolist()
    assert errors[1].startswith("bad_range")
    assert errors[3].startswith("bad_range")
    assert errors[2].startswith("unknown_phenotype")
    # Values of other types are never grouped: True is not the number 1.
    mixed = prepare_phenotype_rows(
        [{"embryo_id": "e1", "phenotype": "EDEMA", "confidence": c} for c in (1, 1.0, True)]
    )
    assert mixed["error"].isna().tolist() == [True, True, False]
    assert "confidence must be a number" in mixed["error"].iat[2]
