"""Generic batch operations: map_snips and to_changes."""

from __future__ import annotations

import pandas as pd
import pytest

import pipeline
from pipeline.batch import map_snips, map_snips_partition, to_changes
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
