"""Merging measurement change sets into ``snip["measurements"]``.

Change sets are built directly (pandas frames with the dtypes of
:data:`pipeline.schema.MEASUREMENT_CHANGE_COLUMNS`), and once through
``map_snips`` and ``to_changes``; stores are real files, single-file and
sharded, written once by our own writer so byte comparisons hold.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import pipeline
from pipeline import changelog
from pipeline.errors import MergeConflictError
from pipeline.schema import MEASUREMENT_CHANGE_COLUMNS
from pipeline.shards import shard_store
from pipeline.testing import make_store

AUTHOR = "auto:area_mm2"
STAMP = "2026-01-05T10:00:00+00:00"


# Every test computes with the synchronous scheduler (conftest.sync_scheduler).
pytestmark = pytest.mark.usefixtures("sync_scheduler")


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store.json"
    store = make_store(n_experiments=2, n_embryos=3, n_frames=6, seed=4)
    # One snip without a measurements object, one with an explicit null value.
    bare, nulled = sorted(store.snip_table().index)[:2]
    del snip_obj(store, bare)["measurements"]
    snip_obj(store, nulled)["measurements"]["length_um"] = None
    store.save(path)
    return path


def snip_obj(store, snip_id):
    return store.embryos[pipeline.ids.parse_snip_id(snip_id).embryo_id]["snips"][
        snip_id
    ]


def measurement_changes(rows):
    """A measurement change set from (snip_id, column, old, new[, status]) tuples."""
    frame = pd.DataFrame(
        {
            "snip_id": [r[0] for r in rows],
            "embryo_id": [pipeline.ids.parse_snip_id(r[0]).embryo_id for r in rows],
            "column": [r[1] for r in rows],
            "old_value": [r[2] for r in rows],
            "new_value": [r[3] for r in rows],
            "status": [r[4] if len(r) > 4 else "assigned" for r in rows],
            "reason": [None] * len(rows),
            "author": [AUTHOR] * len(rows),
            "timestamp": [STAMP] * len(rows),
        }
    )
    return frame.astype(MEASUREMENT_CHANGE_COLUMNS)


def current(store, snip_id, column):
    value = snip_obj(store, snip_id).get("measurements", {}).get(column)
    return np.nan if value is None else float(value)


def without_last_updated(data: bytes) -> bytes:
    return re.sub(rb'"last_updated": "[^"]*"', b'"last_updated": ""', data)


def new_column_changes(store, snip_ids, column="area_mm2"):
    return measurement_changes(
        [(s, column, np.nan, 0.5 + i) for i, s in enumerate(snip_ids)]
    )


# ------------------------------------------------------------ single file


def test_a_new_column_is_written_logged_read_back_and_undone_byte_identical(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    sids = sorted(store.snip_table().index)[:5]  # the first has no measurements object
    assert "measurements" not in snip_obj(store, sids[0])
    changes = new_column_changes(store, sids)
    assert pipeline.merge.kind_of(changes) == "measurement"
    report = pipeline.merge_into_store(store, changes)
    assert report.kind == "measurement"
    assert report.n_written == 5
    assert report.counts == {"assigned": 5}
    again = pipeline.read_store(store_path)
    assert snip_obj(again, sids[0])["measurements"] == {"area_mm2": 0.5}
    assert [snip_obj(again, s)["measurements"]["area_mm2"] for s in sids] == [
        0.5,
        1.5,
        2.5,
        3.5,
        4.5,
    ]
    table = pipeline.snips_from_store(again, npartitions=2).compute()
    assert table["area_mm2"].dtype == np.float64
    assert table.loc[sids, "area_mm2"].tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert table["area_mm2"].drop(index=sids).isna().all()

    (record,) = changelog.committed_batches(store_path)
    assert record["kind"] == "measurement"
    assert record["author"] == AUTHOR
    assert record["values_timestamp"] == STAMP
    first, second = record["changes"][:2]
    assert first == [
        "snip",
        sids[0],
        "measurements.area_mm2",
        changelog.ABSENT_OBJECT,
        0.5,
    ]
    assert second == [
        "snip",
        sids[1],
        "measurements.area_mm2",
        changelog.ABSENT_KEY,
        1.5,
    ]
    log = pipeline.read_changelog(store_path)
    assert set(log["field"]) == {"measurements.area_mm2"}
    assert set(log["target"]) == {"snip"}

    undone = pipeline.undo(store, report.batch_id)
    assert undone.counts == {"restored": 5}
    assert without_last_updated(store_path.read_bytes()) == without_last_updated(before)
    # And the undo is itself undoable.
    pipeline.undo(store, undone.batch_id)
    assert snip_obj(pipeline.read_store(store_path), sids[0])["measurements"] == {
        "area_mm2": 0.5
    }


def test_existing_values_are_replaced_and_nan_writes_null(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    sids = sorted(store.snip_table().index)
    nulled, a, b = sids[1], sids[2], sids[3]
    changes = measurement_changes(
        [
            (nulled, "length_um", np.nan, 3000.0),  # null before: NaN matches it
            (a, "area_um2", current(store, a, "area_um2"), np.nan),  # NaN writes null
            (b, "area_um2", current(store, b, "area_um2"), 12.25),
            (b, "length_um", current(store, b, "length_um"), 7.0, "unchanged"),
            (b, "mask_confidence", np.nan, 0.1, "failed"),
        ]
    )
    report = pipeline.merge_into_store(store, changes)
    assert report.n_written == 3
    assert report.counts == {"assigned": 3, "unchanged": 1, "failed": 1}
    on_disk = pipeline.read_store(store_path)
    assert snip_obj(on_disk, nulled)["measurements"]["length_um"] == 3000.0
    assert "area_um2" in snip_obj(on_disk, a)["measurements"]
    assert snip_obj(on_disk, a)["measurements"]["area_um2"] is None
    assert snip_obj(on_disk, b)["measurements"]["area_um2"] == 12.25
    assert (
        snip_obj(on_disk, b)["measurements"]["length_um"]
        == snip_obj(store, b)["measurements"]["length_um"]
    )
    table = on_disk.snip_table()
    assert np.isnan(table.loc[a, "area_um2"])
    pipeline.undo(store, report.batch_id)
    assert without_last_updated(store_path.read_bytes()) == without_last_updated(before)


def test_a_value_changed_since_is_a_conflict_unless_forced(store_path):
    store = pipeline.read_store(store_path)
    sid = sorted(store.snip_table().index)[3]
    old = current(store, sid, "area_um2")
    changes = measurement_changes([(sid, "area_um2", old, 1.0)])
    other = pipeline.read_store(store_path)
    snip_obj(other, sid)["measurements"]["area_um2"] = old + 1
    other.save()
    theirs = store_path.read_bytes()
    with pytest.raises(
        MergeConflictError, match="changed since the change set was computed"
    ) as info:
        pipeline.merge_into_store(store, changes)
    assert sid in str(info.value)
    assert "'area_um2'" in str(info.value)
    assert info.value.failure_cases["snip_id"].tolist() == [sid]
    assert store_path.read_bytes() == theirs
    assert changelog.committed_batches(store_path) == []
    pipeline.merge_into_store(store, changes, force=True)
    assert (
        snip_obj(pipeline.read_store(store_path), sid)["measurements"]["area_um2"]
        == 1.0
    )
    # A value where the change set expected none is stale too.
    fresh = pipeline.read_store(store_path)
    with pytest.raises(
        MergeConflictError, match=r"expected no value \(absent or null\), found 1.0"
    ):
        pipeline.merge_into_store(
            fresh, measurement_changes([(sid, "area_um2", np.nan, 2.0)])
        )


@pytest.mark.parametrize(
    "column", ["phenotype", "frame", "is_dead", "snip_id", "measurements", "flag_list"]
)
def test_a_column_named_like_the_snip_table_own_columns_is_refused(store_path, column):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    sid = sorted(store.snip_table().index)[2]
    with pytest.raises(
        ValueError, match=f"measurement column '{column}'.*collides.*{column}_measured"
    ) as info:
        pipeline.merge_into_store(
            store, measurement_changes([(sid, column, np.nan, 1.0)])
        )
    assert sid in str(info.value)
    assert store_path.read_bytes() == before
    assert not changelog.changelog_path(store_path).exists()


def test_bad_rows_say_what_where_and_how_to_fix(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    sid = sorted(store.snip_table().index)[2]
    with pytest.raises(ValueError, match=r"not a valid measurement key.*non-blank"):
        pipeline.merge_into_store(
            store, measurement_changes([(sid, "  ", np.nan, 1.0)])
        )
    with pytest.raises(ValueError, match=f"infinite.*{sid}.*'area_mm2'.*Write NaN"):
        pipeline.merge_into_store(
            store, measurement_changes([(sid, "area_mm2", np.nan, np.inf)])
        )
    missing = "20240102_A01_e01_s9999"
    with pytest.raises(
        MergeConflictError, match=f"{missing}.*not in the store.*another store"
    ):
        pipeline.merge_into_store(
            store,
            measurement_changes(
                [(sid, "area_mm2", np.nan, 1.0), (missing, "area_mm2", np.nan, 2.0)]
            ),
        )
    assert store_path.read_bytes() == before
    assert not changelog.changelog_path(store_path).exists()
    with pytest.raises(
        ValueError, match="merge flag and measurement change sets with merge_into_store"
    ):
        pipeline.merge.merge_many(
            store, [measurement_changes([(sid, "area_mm2", np.nan, 1.0)])]
        )


def test_dry_run_and_a_change_set_without_writes(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    sid = sorted(store.snip_table().index)[2]
    report = pipeline.merge_into_store(
        store, measurement_changes([(sid, "area_mm2", np.nan, 1.0)]), dry_run=True
    )
    assert report.dry_run
    assert report.n_written == 1
    nothing = pipeline.merge_into_store(
        store, measurement_changes([(sid, "area_mm2", np.nan, 1.0, "failed")])
    )
    assert nothing.batch_id is None
    assert nothing.exit_code == 1
    assert store_path.read_bytes() == before


def test_map_snips_to_changes_merge_with_checkpoints(store_path):
    store = pipeline.read_store(store_path)
    snips = pipeline.snips_from_store(store, npartitions=3)

    def area_mm2(part):
        return part["area_um2"] / 1e6

    result = pipeline.map_snips(snips, area_mm2, meta="float64")
    changes = pipeline.to_changes(
        result, "measurement", column="area_mm2", author=AUTHOR, snips=snips
    )
    report = pipeline.merge_into_store(
        store, changes, checkpoint_every=1, inputs={"measure": "area_mm2"}
    )
    assert len(report.batch_ids) == 3
    table = pipeline.read_store(store_path).snip_table()
    expected = table["area_um2"] / 1e6
    pd.testing.assert_series_equal(table["area_mm2"], expected, check_names=False)
    again = pipeline.read_store(store_path)
    snips = pipeline.snips_from_store(again, npartitions=3)
    rerun = pipeline.merge_into_store(
        again,
        pipeline.to_changes(
            pipeline.map_snips(snips, area_mm2, meta="float64"),
            "measurement",
            column="area_mm2",
            author=AUTHOR,
            snips=snips,
        ),
        checkpoint_every=1,
        inputs={"measure": "area_mm2"},
    )
    assert rerun.resumed == 3


# ------------------------------------------------------------ sharded


@pytest.fixture
def sharded(tmp_path, store_path):
    return shard_store(store_path, tmp_path / "sharded").root


def folder_bytes(root):
    return {
        p.relative_to(root).as_posix(): without_last_updated(p.read_bytes())
        for p in sorted(root.rglob("*.json"))
        # Not the backups and temporary files (hidden names).
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    }


def test_sharded_store_new_column_read_back_and_undone_byte_identical(sharded):
    before = folder_bytes(sharded)
    store = pipeline.read_store(sharded)
    table = store.snip_table()
    # Every snip, so that every shard has the column (the sharded snip table
    # takes its measurement columns from one shard).
    changes = measurement_changes(
        [(s, "area_mm2", np.nan, float(i)) for i, s in enumerate(table.index)]
    )
    report = pipeline.merge_into_store(store, changes)
    assert report.n_written == len(table)
    again = pipeline.read_store(sharded)
    lazy = pipeline.snips_from_store(again)
    assert "area_mm2" in lazy.columns
    computed = lazy.compute()
    assert computed.loc[table.index, "area_mm2"].tolist() == [
        float(i) for i in range(len(table))
    ]
    record = changelog.committed_batches(again.path)[0]
    assert record["kind"] == "measurement"
    assert record["author"] == AUTHOR
    pipeline.undo(again, report.batch_id)
    assert folder_bytes(sharded) == before


def test_sharded_store_touches_only_the_shard_it_changes(sharded):
    store = pipeline.read_store(sharded)
    shards = {e: store.shard_path(e).read_bytes() for e in store.shards}
    experiment = min(store.shards)
    sid = next(
        s
        for s in sorted(
            store.shard(experiment)[next(iter(store.shard(experiment)))]["snips"]
        )
    )
    old = current(store, sid, "area_um2")
    pipeline.merge_into_store(
        store, measurement_changes([(sid, "area_um2", old, 42.0)])
    )
    after = pipeline.read_store(sharded)
    assert snip_obj(after, sid)["measurements"]["area_um2"] == 42.0
    changed = [e for e in store.shards if store.shard_path(e).read_bytes() != shards[e]]
    assert changed == [experiment]
    table = pipeline.snips_from_store(after).compute()
    assert table.loc[sid, "area_um2"] == 42.0
    # A stale value on a sharded store is a conflict too, and writes nothing.
    snapshot = folder_bytes(sharded)
    with pytest.raises(MergeConflictError, match=sid):
        pipeline.merge_into_store(
            after, measurement_changes([(sid, "area_um2", old, 43.0)])
        )
    assert folder_bytes(sharded) == snapshot
