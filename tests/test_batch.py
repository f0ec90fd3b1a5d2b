"""Generic batch operations: map_snips and to_changes."""

from __future__ import annotations

from datetime import datetime, timedelta

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import pipeline
from pipeline.batch import map_snips, map_snips_partition, to_changes
from pipeline.schema import MEASUREMENT_CHANGE_COLUMNS
from pipeline.testing import make_store


def big_area(part: pd.DataFrame) -> pd.Series:
    return part["area_um2"] > 75_000


def cursed(snip_id: str, row: pd.Series) -> float | None:
    if row["frame"] == 3:
        msg = "frame 3 is cursed"
        raise ValueError(msg)
    return row["area_um2"] / 1000 if row["frame"] % 2 else None


def n_snips(embryo_id: str, group: pd.DataFrame) -> int:
    return len(group)


@pytest.fixture(scope="module")
def store() -> pipeline.Store:
    return make_store(n_experiments=2, n_embryos=4, n_frames=8, seed=1)


@pytest.mark.parametrize("npartitions", [1, 3], ids=["one-part", "three-parts"])
def test_map_snips_matches_its_pandas_twin(store: pipeline.Store, npartitions: int) -> None:
    snips = pipeline.snips_from_store(store, npartitions=npartitions)
    lazy = map_snips(snips, cursed, meta="float64").compute(scheduler="sync").reset_index(drop=True)
    twin = map_snips_partition(store.snip_table(), cursed, value_dtype="float64")
    pd.testing.assert_frame_equal(lazy, twin)


def test_per_item_statuses(store: pipeline.Store) -> None:
    table = store.snip_table()
    result = map_snips(pipeline.snips_from_store(store), cursed, meta="float64").compute(scheduler="sync")
    by_id = result.set_index("entity_id")
    assert len(result) == len(table)
    assert (by_id.loc[table.index[table["frame"] == 3], "status"] == "failed").all()
    assert by_id.loc[table.index[table["frame"] == 3], "error"].str.contains("frame 3 is cursed").all()
    assert (by_id.loc[table.index[(table["frame"] % 2 == 0) & (table["frame"] != 3)], "status"] == "skipped").all()
    odd = table.index[(table["frame"] % 2 == 1) & (table["frame"] != 3)]
    assert (by_id.loc[odd, "value"].to_numpy() == (table.loc[odd, "area_um2"] / 1000).to_numpy()).all()


def test_vectorised_and_group_levels(store: pipeline.Store) -> None:
    snips = pipeline.snips_from_store(store, npartitions=2)
    flags = map_snips(snips, big_area).compute(scheduler="sync")
    table = store.snip_table()
    assert int((flags["status"] == "successful").sum()) == int((table["area_um2"] > 75_000).sum())
    per_embryo = map_snips(snips, n_snips, level="embryo").compute(scheduler="sync").set_index("entity_id")
    assert per_embryo["value"].astype(int).to_dict() == table.groupby("embryo_id").size().to_dict()
    with pytest.raises(ValueError, match="level must be one of"):
        map_snips(snips, n_snips, level="plate")


def test_to_changes_flags_merge_with_provenance(store: pipeline.Store, tmp_path) -> None:
    path = tmp_path / "store.json"
    make_store(n_experiments=2, n_embryos=4, n_frames=8, seed=1).save(path)
    disk = pipeline.read_store(path)
    snips = pipeline.snips_from_store(disk)
    changes = to_changes(map_snips(snips, big_area), "flag", author="auto:big_area", flag="HIGHLY_VAR_MASK")
    report = pipeline.merge_into_store(disk, changes)
    assert report.batch_id
    flags = pipeline.read_store(path).flags_table()
    mine = flags.loc[flags["author"] == "auto:big_area"]
    assert len(mine) == int((store.snip_table()["area_um2"] > 75_000).sum())
    assert set(mine["flag"]) == {"HIGHLY_VAR_MASK"}


def test_to_changes_phenotype_goes_through_the_dead_rules(tmp_path) -> None:
    path = tmp_path / "store.json"
    make_store(n_experiments=1, n_embryos=3, n_frames=6, seed=2).save(path)
    disk = pipeline.read_store(path)
    snips = pipeline.snips_from_store(disk)

    result = map_snips(snips, big_area)
    changes = to_changes(result.assign(value="EDEMA"), "phenotype", author="me", snips=snips)
    report = pipeline.merge_into_store(disk, changes)
    table = pipeline.read_store(path).snip_table()
    big_alive = (disk.snip_table()["area_um2"] > 75_000) & ~disk.snip_table()["is_dead"]
    assert (table.loc[big_alive[big_alive].index, "phenotype"] == "EDEMA").all()
    assert report.counts.get("skipped", 0) == int(((disk.snip_table()["area_um2"] > 75_000) & disk.snip_table()["is_dead"]).sum())


# ---------------------------------------------------------------- measurements
def scaled_area(part: pd.DataFrame) -> pd.Series:
    """Area in mm2 (a new column), NaN-free."""
    return part["area_um2"] / 1e6


def area_or_text(snip_id: str, row: pd.Series) -> object:
    """Same area for even frames, doubled for odd ones, text for frame 5, inf for frame 6."""
    if row["frame"] == 5:
        return "big"
    if row["frame"] == 6:
        return float("inf")
    return row["area_um2"] * (2 if row["frame"] % 2 else 1)


def check_columns(changes: pd.DataFrame) -> None:
    assert changes.dtypes.to_dict() == MEASUREMENT_CHANGE_COLUMNS
    assert list(changes.columns) == list(MEASUREMENT_CHANGE_COLUMNS)


@pytest.mark.parametrize("npartitions", [1, 3], ids=["one-part", "three-parts"])
def test_measurement_changes_for_a_new_column(store: pipeline.Store, npartitions: int) -> None:
    snips = pipeline.snips_from_store(store, npartitions=npartitions)
    lazy = to_changes(map_snips(snips, cursed, meta="float64"), "measurement", column="area_mm", author="me", snips=snips)
    assert isinstance(lazy, dd.DataFrame)
    changes = lazy.compute(scheduler="sync")
    check_columns(changes)
    table = store.snip_table()
    ok = table.loc[(table["frame"] % 2 == 1) & (table["frame"] != 3)]
    # Only successful items: skipped (even frames) and failed (frame 3) change nothing.
    assert changes["snip_id"].tolist() == ok.index.tolist()
    assert changes["embryo_id"].tolist() == ok["embryo_id"].tolist()
    assert set(changes["status"]) == {"assigned"}
    assert changes["old_value"].isna().all()
    np.testing.assert_array_equal(changes["new_value"].to_numpy(), (ok["area_um2"] / 1000).to_numpy())
    assert set(changes["column"]) == {"area_mm"}
    assert set(changes["author"]) == {"me"}
    assert changes["reason"].isna().all()
    (stamp,) = set(changes["timestamp"])  # one timestamp for the batch
    assert datetime.fromisoformat(stamp).utcoffset() == timedelta(0)


def test_measurement_changes_of_an_existing_column(store: pipeline.Store) -> None:
    snips = pipeline.snips_from_store(store, npartitions=2)
    result = map_snips(snips, area_or_text)
    changes = to_changes(result, "measurement", column="area_um2", author="me", snips=snips).compute(scheduler="sync")
    check_columns(changes)
    table = store.snip_table()
    assert changes["snip_id"].tolist() == table.index.tolist()
    by_id = changes.set_index("snip_id")
    np.testing.assert_array_equal(by_id["old_value"].to_numpy(), table["area_um2"].to_numpy())
    frame = table["frame"]
    same, doubled = frame.index[(frame % 2 == 0) & (frame != 6)], frame.index[(frame % 2 == 1) & (frame != 5)]
    assert (by_id.loc[same, "status"] == "unchanged").all()
    assert (by_id.loc[doubled, "status"] == "assigned").all()
    np.testing.assert_array_equal(by_id.loc[doubled, "new_value"].to_numpy(), 2 * table.loc[doubled, "area_um2"].to_numpy())
    text, inf = frame.index[frame == 5], frame.index[frame == 6]
    assert len(text)
    assert len(inf)
    assert (by_id.loc[text.union(inf), "status"] == "failed").all()
    assert by_id.loc[text.union(inf), "new_value"].isna().all()
    first = text[0]
    assert by_id.loc[first, "reason"] == f"snip {first}: value 'big' (str) is not a number; a measurement must be a real number"
    assert "not a finite number" in by_id.loc[inf[0], "reason"]
    assert inf[0] in by_id.loc[inf[0], "reason"]


def test_measurement_changes_computed_and_lazy_inputs_agree(store: pipeline.Store) -> None:
    snips = pipeline.snips_from_store(store, npartitions=3)
    result = map_snips(snips, area_or_text)
    kwargs = {"column": "area_um2", "author": "me"}
    lazy = to_changes(result, "measurement", snips=snips, **kwargs).compute(scheduler="sync")
    computed = result.compute(scheduler="sync")
    table = store.snip_table()
    for changes in (
        to_changes(computed, "measurement", snips=snips, **kwargs),  # pandas result, lazy snips
        to_changes(computed, "measurement", snips=table, **kwargs),  # both pandas
        to_changes(result, "measurement", snips=table, **kwargs).compute(scheduler="sync"),  # lazy result, pandas snips
    ):
        assert isinstance(changes, pd.DataFrame)
        pd.testing.assert_frame_equal(
            changes.drop(columns="timestamp").reset_index(drop=True), lazy.drop(columns="timestamp").reset_index(drop=True)
        )


def test_measurement_snips_not_in_the_table_fail(store: pipeline.Store) -> None:
    result = map_snips_partition(store.snip_table(), scaled_area, value_dtype="float64")
    other = make_store(n_experiments=1, n_embryos=2, n_frames=4, seed=9).snip_table()
    changes = to_changes(result, "measurement", column="area_mm2", author="me", snips=other)
    missing = ~result["entity_id"].isin(other.index)
    assert missing.any()
    failed = changes.loc[missing.to_numpy()]
    assert (failed["status"] == "failed").all()
    assert failed["reason"].str.contains("not in the snip table").all()
    assert failed["embryo_id"].isna().all()


@pytest.mark.parametrize("column", ["frame", "snip_id", "measurements", "phenotype", "flag_list"])
def test_measurement_column_may_not_be_a_table_column(store: pipeline.Store, column: str) -> None:
    snips = pipeline.snips_from_store(store)
    with pytest.raises(ValueError, match=rf"column '{column}' is one of the snip table's own columns.*pick another name"):
        to_changes(map_snips(snips, scaled_area), "measurement", column=column, author="me", snips=snips)


def test_measurement_argument_errors(store: pipeline.Store) -> None:
    snips = pipeline.snips_from_store(store, npartitions=2)
    result = map_snips(snips, scaled_area)
    with pytest.raises(ValueError, match="needs column="):
        to_changes(result, "measurement", author="me", snips=snips)
    with pytest.raises(ValueError, match="needs snips="):
        to_changes(result, "measurement", column="area_mm2", author="me")
    with pytest.raises(ValueError, match="result has 2 partition"):
        to_changes(result, "measurement", column="area_mm2", author="me", snips=pipeline.snips_from_store(store, npartitions=3))
    with pytest.raises(ValueError, match="'phenotype', 'flag' or 'measurement'"):
        to_changes(result, "measurements", author="me")
    per_embryo = map_snips(snips, n_snips, level="embryo")
    with pytest.raises(ValueError, match="result is at level embryo"):
        to_changes(per_embryo.compute(scheduler="sync"), "measurement", column="n", author="me", snips=snips)
    lazy = to_changes(per_embryo, "measurement", column="n", author="me", snips=snips)
    with pytest.raises(ValueError, match="result is at level embryo"):
        lazy.compute(scheduler="sync")


def test_measurement_merges_into_the_store(tmp_path) -> None:
    path = tmp_path / "store.json"
    make_store(n_experiments=2, n_embryos=3, n_frames=5, seed=4).save(path)
    disk = pipeline.read_store(path)
    snips = pipeline.snips_from_store(disk, npartitions=2)
    changes = to_changes(map_snips(snips, scaled_area, meta="float64"), "measurement", column="area_mm2", author="me", snips=snips)
    report = pipeline.merge_into_store(disk, changes)
    assert report.batch_id
    assert report.counts == {"assigned": disk.counts()["snips"]}
    again = pipeline.read_store(path)
    table = pipeline.snips_from_store(again).compute(scheduler="sync")
    np.testing.assert_allclose(table["area_mm2"].to_numpy(), table["area_um2"].to_numpy() / 1e6)
    # The same measurement again: nothing changes.
    snips = pipeline.snips_from_store(again, npartitions=2)
    rerun = to_changes(map_snips(snips, scaled_area, meta="float64"), "measurement", column="area_mm2", author="me", snips=snips)
    assert set(rerun.compute(scheduler="sync")["status"]) == {"unchanged"}


def inf_for_frame_two(part: pd.DataFrame) -> pd.Series:
    return (part["area_um2"] / 1e6).where(part["frame"] != 2, np.inf)


def test_measurement_infinite_float_values_fail(store: pipeline.Store) -> None:
    table = store.snip_table()
    result = map_snips_partition(table, inf_for_frame_two, value_dtype="float64")
    changes = to_changes(result, "measurement", column="area_mm2", author="me", snips=table)
    check_columns(changes)
    by_id = changes.set_index("snip_id")
    two = table.index[table["frame"] == 2]
    assert len(two)
    assert (by_id.loc[two, "status"] == "failed").all()
    assert by_id.loc[two[0], "reason"] == f"snip {two[0]}: value inf is not a finite number (the store holds JSON numbers); a measurement must be a real number"
    assert (by_id.drop(index=two)["status"] == "assigned").all()
