"""Stage 2: the snip table, and its partitions (no video spans two)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.schema import SNIP_COLUMNS, SNIP_INDEX, STRING
from pipeline.snips import partition_bounds, snip_meta, snips_from_store
from pipeline.store import Store, read_store
from pipeline.testing import make_store

MINIMAL = Path(__file__).parent / "data" / "store_minimal.json"

MEASUREMENTS = ["area_um2", "length_um"]
NPARTITIONS = [1, 2, 3, 7, 50]
NPARTITION_IDS = ["one", "two", "three", "seven", "more-than-videos"]


def reference_table(doc: dict[str, Any]) -> pd.DataFrame:
    """The snip table written out from the JSON, one snip at a time, in plain Python."""
    keys = sorted(
        {
            k
            for e in doc["embryos"].values()
            for s in e["snips"].values()
            for k in s.get("measurements") or {}
        }
    )
    rows = {}
    for eid, e in doc["embryos"].items():
        frames = {
            sid: s["frame"] if "frame" in s else int(re.search(r"(\d+)$", sid)[1])
            for sid, s in e["snips"].items()
        }
        ordered = sorted(frames.values())
        video = e["source"]["video_id"]
        g = e["genotype"]
        for sid, s in e["snips"].items():
            p, f = s["phenotype"], frames[sid]
            m = s.get("measurements") or {}
            rows[sid] = {
                "experiment_id": e["source"]["experiment_id"],
                "video_id": video,
                "embryo_id": eid,
                "image_id": f"{video}_t{f:04d}",
                "frame": f,
                "frame_index": ordered.index(f),
                "n_frames": len(ordered),
                "phenotype": p["value"],
                "phenotype_confidence": p.get("confidence", math.nan),
                "phenotype_author": p["author"],
                "phenotype_timestamp": p["timestamp"],
                "genotype": g["value"] if g else None,
                "genotype_confirmed": bool(g and g["confirmed"]),
                "death_frame": e["death_frame"],
                "is_dead": p["value"] == "DEAD",
                "n_flags": len(s["flags"]),
                "flag_list": ",".join(sorted(fl["value"] for fl in s["flags"])),
                **{k: math.nan if m.get(k) is None else m[k] for k in keys},
            }
    dtypes = {**SNIP_COLUMNS, **dict.fromkeys(keys, np.dtype("float64"))}
    table = pd.DataFrame(
        {c: pd.array([r[c] for r in rows.values()], dtype=t) for c, t in dtypes.items()}
    )
    table.index = pd.Index(list(rows), dtype=STRING, name=SNIP_INDEX)
    return table.sort_index()


@pytest.fixture(scope="module")
def minimal() -> Store:
    return read_store(MINIMAL)


# ------------------------------------------------------------------ the table
def test_columns_and_dtypes(minimal: Store) -> None:
    table = minimal.snip_table()
    assert list(table.columns) == [*SNIP_COLUMNS, *MEASUREMENTS]
    assert table.index.name == SNIP_INDEX
    assert table.index.dtype == STRING
    for name, dtype in SNIP_COLUMNS.items():
        assert table[name].dtype == dtype, name
    for name in MEASUREMENTS:
        assert table[name].dtype == np.float64
    assert table.index.is_monotonic_increasing
    assert table.index.is_unique
    assert table.attrs == {}


def test_table_equals_the_json_written_out_by_hand(minimal: Store) -> None:
    expected = reference_table(orjson.loads(MINIMAL.read_bytes()))
    pd.testing.assert_frame_equal(minimal.snip_table(), expected)


def test_hand_checked_values(minimal: Store) -> None:
    t = minimal.snip_table()
    e2 = t[t["embryo_id"] == "20240411_A01_e02"]
    # A gap at frame 2: frame_index counts snips, not frames.
    assert e2["frame"].tolist() == [0, 1, 3, 4]
    assert e2["frame_index"].tolist() == [0, 1, 2, 3]
    assert e2["n_frames"].tolist() == [4] * 4
    assert e2["is_dead"].tolist() == [False, False, True, True]
    assert e2["death_frame"].tolist() == [3] * 4
    assert e2["image_id"].tolist() == [f"20240411_A01_t000{f}" for f in (0, 1, 3, 4)]
    assert e2["genotype"].isna().all()
    assert not e2["genotype_confirmed"].any()
    assert t.loc["20240411_A01_e02_t0001", "flag_list"] == "MOTION_BLUR"
    assert t.loc["20240411_A01_e02_t0001", "n_flags"] == 1

    s1 = t.loc["20240411_A01_e01_s0001"]
    assert s1["flag_list"] == "MASK_ON_EDGE,OUT_OF_FOCUS"  # sorted, not file order
    assert s1["n_flags"] == 2
    assert s1["phenotype"] == "NORMAL"
    assert s1["phenotype_confidence"] == 0.8
    assert s1["phenotype_timestamp"] == "2026-01-05T11:00:00+01:00"
    assert s1["genotype"] == "WT"
    assert s1["genotype_confirmed"]
    assert pd.isna(s1["death_frame"])
    assert s1["area_um2"] == 71000.5
    assert t.loc["20240411_A01_e01_s0000", "flag_list"] == ""
    assert math.isnan(t.loc["20240411_A01_e01_s0000", "phenotype_confidence"])
    assert math.isnan(t.loc["20240411_A01_e01_s0002", "length_um"])  # null in the file

    under = t[t["experiment_id"] == "20250624_chem02_28C_T00_1356"]
    assert sorted(under["video_id"].unique()) == [
        "20250624_chem02_28C_T00_1356_H01",
        "20250624_chem02_28C_T00_1356_H02",
    ]
    h02 = under[under["embryo_id"] == "20250624_chem02_28C_T00_1356_H02_e1"]
    # No frame field: parsed from 3-digit bare suffixes.
    assert h02["frame"].tolist() == [5, 7, 8, 9]
    assert h02["frame_index"].tolist() == [0, 1, 2, 3]
    assert h02["image_id"].iloc[0] == "20250624_chem02_28C_T00_1356_H02_t0005"
    assert h02[MEASUREMENTS].isna().all().all()  # no measurements object
    h01 = under[under["embryo_id"] == "20250624_chem02_28C_T00_1356_H01_e01"]
    assert h01["genotype"].unique().tolist() == ["lmx1b"]
    assert not h01["genotype_confirmed"].any()


def test_table_follows_the_document_after_an_edit(minimal_doc: dict[str, Any]) -> None:
    store = Store(minimal_doc)
    store.add_phenotype("20240411_A01_e01_s0002", "DEAD", "cruiz")
    pd.testing.assert_frame_equal(store.snip_table(), reference_table(store.doc))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_table_equals_the_json(seed: int) -> None:
    store = make_store(
        n_experiments=4,
        n_embryos=5,
        n_frames=9,
        seed=seed,
        dead_fraction=0.4,
        flag_fraction=0.2,
        gap_fraction=0.2,
    )
    pd.testing.assert_frame_equal(store.snip_table(), reference_table(store.doc))


def test_snip_meta(minimal: Store) -> None:
    meta = snip_meta(minimal)
    assert len(meta) == 0
    pd.testing.assert_series_equal(meta.dtypes, minimal.snip_table().dtypes)
    assert meta.index.dtype == STRING


# ---------------------------------------------------------------- partitions
def partitions(snips: dd.DataFrame) -> list[pd.DataFrame]:
    return [
        snips.get_partition(i).compute(scheduler="sync")
        for i in range(snips.npartitions)
    ]


def check_partitioning(store: Store, npartitions: int) -> None:
    table = store.snip_table()
    snips = snips_from_store(store, npartitions=npartitions)
    n_videos = table["video_id"].nunique()
    assert 1 <= snips.npartitions <= max(1, min(npartitions, n_videos))
    assert snips.known_divisions
    parts = partitions(snips)
    # No video (hence no embryo) spans two partitions.
    videos = [set(p["video_id"]) for p in parts]
    assert sum(map(len, videos)) == n_videos
    embryos = [set(p["embryo_id"]) for p in parts]
    assert sum(map(len, embryos)) == table["embryo_id"].nunique()
    # Divisions bound each partition; the index is sorted throughout.
    divisions = snips.divisions
    for i, p in enumerate(parts):
        assert len(p) > 0
        assert p.index.is_monotonic_increasing
        assert p.index[0] == divisions[i]
        assert p.index[-1] < divisions[i + 1] or (
            i == len(parts) - 1 and p.index[-1] == divisions[-1]
        )
        pd.testing.assert_series_equal(p.dtypes, table.dtypes)
    # The Dask result, computed, is the pandas table.
    pd.testing.assert_frame_equal(snips.compute(scheduler="sync"), table)
    pd.testing.assert_frame_equal(pd.concat(parts), table)


@pytest.mark.parametrize("npartitions", NPARTITIONS, ids=NPARTITION_IDS)
def test_partition_invariant_minimal(minimal: Store, npartitions: int) -> None:
    check_partitioning(minimal, npartitions)


@pytest.mark.parametrize("npartitions", NPARTITIONS, ids=NPARTITION_IDS)
def test_partition_invariant_synthetic(npartitions: int) -> None:
    check_partitioning(
        make_store(n_experiments=3, n_embryos=8, n_frames=6, seed=5), npartitions
    )


def test_more_partitions_than_videos_gives_one_per_video(minimal: Store) -> None:
    snips = snips_from_store(minimal, npartitions=50)
    assert snips.npartitions == 3
    assert [set(p["video_id"]) for p in partitions(snips)] == [
        {"20240411_A01"},
        {"20250624_chem02_28C_T00_1356_H01"},
        {"20250624_chem02_28C_T00_1356_H02"},
    ]


def test_default_npartitions_and_sync_scheduler_fixture(
    minimal: Store, sync_scheduler: None
) -> None:
    snips = pipeline.snips_from_store(minimal)
    assert snips.npartitions == 1
    pd.testing.assert_frame_equal(snips.compute(), minimal.snip_table())


def test_npartitions_must_be_positive(minimal: Store) -> None:
    with pytest.raises(ValueError, match="npartitions must be at least 1, got 0"):
        snips_from_store(minimal, npartitions=0)


def test_empty_store(minimal_doc: dict[str, Any]) -> None:
    minimal_doc["embryos"] = {}
    store = Store(minimal_doc)
    snips = snips_from_store(store, npartitions=4)
    assert snips.npartitions == 1
    result = snips.compute(scheduler="sync")
    assert len(result) == 0
    assert list(result.columns) == list(SNIP_COLUMNS)


def test_partition_bounds_cut_only_between_videos() -> None:
    videos = np.array(["a"] * 5 + ["b"] * 1 + ["c"] * 3 + ["d"] * 7)
    for k in range(1, 10):
        bounds = partition_bounds(videos, k)
        assert bounds[0][0] == 0
        assert bounds[-1][1] == len(videos)
        assert all(b[1] == c[0] for b, c in itertools.pairwise(bounds))
        assert len(bounds) <= min(k, 4)
        for start, stop in bounds:
            assert stop > start
            assert start == 0 or videos[start] != videos[start - 1]
    assert partition_bounds(np.array([], dtype=object), 3) == [(0, 0)]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    n_experiments=st.integers(1, 3),
    n_embryos=st.integers(1, 6),
    n_frames=st.integers(1, 8),
    npartitions=st.integers(1, 12),
)
def test_partition_invariant_property(
    seed: int, n_experiments: int, n_embryos: int, n_frames: int, npartitions: int
) -> None:
    store = make_store(
        n_experiments=n_experiments, n_embryos=n_embryos, n_frames=n_frames, seed=seed
    )
    check_partitioning(store, npartitions)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    npartitions=st.integers(1, 40),
)
def test_partition_bounds_property(sizes: list[int], npartitions: int) -> None:
    videos = np.repeat(np.arange(len(sizes)).astype(str), sizes)
    bounds = partition_bounds(videos, npartitions)
    assert [a for a, _ in bounds[1:]] == [b for _, b in bounds[:-1]]
    assert (bounds[0][0], bounds[-1][1]) == (0, len(videos))
    assert 1 <= len(bounds) <= min(npartitions, len(sizes))
    starts = set(np.cumsum([0, *sizes[:-1]]).tolist())
    assert all(a in starts for a, _ in bounds)


def test_store_on_disk_reads_to_the_same_partitions(tmp_path: Path) -> None:
    store = make_store(n_experiments=2, n_embryos=6, n_frames=5, seed=9)
    again = read_store(store.save(tmp_path / "s.json"))
    for k in (1, 3):
        pd.testing.assert_frame_equal(
            snips_from_store(again, npartitions=k).compute(scheduler="sync"),
            snips_from_store(store, npartitions=k).compute(scheduler="sync"),
        )


def test_sorting_moves_whole_embryos_or_sorts_every_id():
    import pyarrow as pa

    from pipeline.store import _embryo_order

    # Embryos in the wrong order, each in order: moved as blocks (runs of
    # rows of one embryo, whatever their number).
    ids = pa.array(["b_0", "b_1", "a_0", "c_0", "a_1x"])
    embryos = pa.array(["b", "b", "a", "c", "a"])
    assert _embryo_order(ids, embryos).tolist() == [2, 4, 0, 1, 3]
    ids = pa.array(["b_0", "b_1", "a_0", "c_0"])
    embryos = pa.array(["b", "b", "a", "c"])
    assert _embryo_order(ids, embryos).tolist() == [2, 0, 1, 3]
    # An embryo's snips out of order: the caller sorts every id.
    assert _embryo_order(pa.array(["a_1", "a_0", "b_0"]), pa.array(["a", "a", "b"])) is None
    # Embryos whose ids interleave, or repeat across embryos, or a missing id: the same.
    assert _embryo_order(pa.array(["a_0", "a_9", "b_5"]), pa.array(["a", "a", "b"])).tolist() == [0, 1, 2]
    assert _embryo_order(pa.array(["b_5", "a_0", "a_9"]), pa.array(["b", "a", "a"])).tolist() == [1, 2, 0]
    assert _embryo_order(pa.array(["b_5", "a_0", "c_9"]), pa.array(["b", "a", "a"])) is None
    assert _embryo_order(pa.array(["b_0", "a_0", "b_0"]), pa.array(["b", "a", "c"])) is None
    assert _embryo_order(pa.array(["b_0", None, "a_0"]), pa.array(["b", "b", "a"])) is None


def test_the_order_found_by_moving_embryos_is_the_sorted_order_whenever_there_is_one():
    import pyarrow as pa

    from pipeline.store import _embryo_order

    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        ids = [f"e{int(x):03d}" for x in rng.choice(60 if rng.random() < 0.5 else 1000, size=n)]
        embryos = [f"m{int(x)}" for x in np.sort(rng.integers(0, 6, size=n))]
        if rng.random() < 0.5:  # usually each embryo's snips in order
            for m in set(embryos):
                where = [i for i, e in enumerate(embryos) if e == m]
                for i, v in zip(where, sorted(ids[i] for i in where), strict=True):
                    ids[i] = v
        order = _embryo_order(pa.array(ids), pa.array(embryos))
        expected = sorted(ids)
        unique = len(set(ids)) == n
        if order is not None:
            assert sorted(order.tolist()) == list(range(n))
            assert [ids[i] for i in order] == expected
            assert unique
        else:
            # No order of whole embryo runs (each kept as it is) sorts the ids strictly.
            starts = [0] + [i for i in range(1, n) if embryos[i] != embryos[i - 1]]
            runs = [ids[a:b] for a, b in zip(starts, [*starts[1:], n], strict=True)]
            joined = [v for run in sorted(runs) for v in run]
            assert not unique or joined != expected


def test_a_store_listing_embryos_and_snips_out_of_order_gives_the_sorted_table(tmp_path):
    from pipeline.testing import make_document

    doc = make_document(n_experiments=2, n_embryos=6, n_frames=5, seed=3)
    doc["embryos"] = dict(reversed(list(doc["embryos"].items())))
    first = next(iter(doc["embryos"].values()))
    first["snips"] = dict(reversed(list(first["snips"].items())))
    table = Store(doc).snip_table()
    assert table.index.is_monotonic_increasing
    assert table.index.is_unique
    expected = Store(make_document(n_experiments=2, n_embryos=6, n_frames=5, seed=3)).snip_table()
    pd.testing.assert_frame_equal(table, expected)
