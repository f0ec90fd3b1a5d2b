"""Progress callbacks: ``progress(done, total)`` on every long-running function.

Each function runs twice where work runs (the synchronous scheduler and a real
in-process ``distributed.LocalCluster``; one test uses worker processes):
once without progress and once with a callback that records its calls. The
calls must be non-decreasing, keep one ``total``, end with ``done == total``
and ``total`` must be what :func:`pipeline.cluster.compute` documents (the
output partitions); the results must be the same with and without progress.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path

import dask
import pandas as pd
import pytest

import pipeline
from pipeline import cluster
from pipeline.batch import map_snips
from pipeline.detectors import FrameGap, IncompleteExperiment, ShortTrack, run_detectors
from pipeline.export import (
    export_store,
    read_table,
    write_csv,
    write_feather,
    write_hdf5,
    write_parquet,
)
from pipeline.testing import make_store

NPARTITIONS = 4


class Recorder:
    """A progress callable that keeps its calls, and checks them."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self, total: int) -> None:
        assert self.calls, "progress was never called"
        assert {t for _, t in self.calls} == {total}, self.calls
        done = [d for d, _ in self.calls]
        assert done == sorted(done), self.calls
        assert all(0 <= d <= total for d in done), self.calls
        assert self.calls[-1] == (total, total), self.calls


def area(part: pd.DataFrame) -> pd.Series:
    return part["area_um2"] / 1000


def n_snips(embryo_id: str, group: pd.DataFrame) -> int:
    return len(group)


@pytest.fixture(scope="module")
def store() -> pipeline.Store:
    return make_store(n_experiments=3, n_embryos=4, n_frames=8, seed=5)


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[object]:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as running:
        yield running


@pytest.fixture(params=["sync", "local-cluster"])
def where(request: pytest.FixtureRequest, local_cluster: object) -> Iterator[str]:
    """Run the test body on the sync scheduler, or with a client of a real LocalCluster."""
    if request.param == "sync":
        with dask.config.set(scheduler="sync"):
            yield request.param
        return
    from distributed import Client

    with Client(local_cluster) as client:
        assert cluster.get_client() is client
        yield request.param


def sorted_frame(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return frame.sort_values(by).reset_index(drop=True)


# ------------------------------------------------------------------ map_snips
@pytest.mark.parametrize("level", ["snip", "embryo"])
def test_map_snips(where: str, store: pipeline.Store, level: str) -> None:
    func = area if level == "snip" else n_snips
    snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
    expected = cluster.compute(map_snips(snips, func, level=level, meta="float64"))
    seen = Recorder()
    got = map_snips(snips, func, level=level, meta="float64", progress=seen)
    assert isinstance(got, pd.DataFrame)
    seen.check(snips.npartitions)
    pd.testing.assert_frame_equal(sorted_frame(got, ["entity_id"]), sorted_frame(expected, ["entity_id"]))


def test_threads_scheduler_counts_partitions_not_tasks(store: pipeline.Store) -> None:
    with dask.config.set(scheduler="threads"):
        snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
        seen = Recorder()
        got = map_snips(snips, area, meta="float64", progress=seen)
    # The graph has more tasks (flatten, map, the final concatenation) than
    # partitions; only the partitions count.
    seen.check(NPARTITIONS)
    assert seen.calls[0] == (0, NPARTITIONS)
    assert len(got) == store.counts()["snips"]


# -------------------------------------------------------------- run_detectors
DETECTORS = (ShortTrack(min_snips=6), FrameGap(), IncompleteExperiment())


def test_run_detectors(where: str, store: pipeline.Store) -> None:
    snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
    expected = cluster.compute(run_detectors(snips, DETECTORS, store=store))
    seen = Recorder()
    got = run_detectors(snips, DETECTORS, store=store, progress=seen)
    assert isinstance(got, pd.DataFrame)
    # One per snip partition (the per-partition detectors), one for the
    # reducing detector's final step.
    seen.check(NPARTITIONS + 1)
    assert len(got) > 0
    by = ["detector", "entity_id"]
    pd.testing.assert_frame_equal(sorted_frame(got, by), sorted_frame(expected, by))


# --------------------------------------------------------------------- export
def test_write_parquet(where: str, store: pipeline.Store, tmp_path: Path) -> None:
    snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
    plain = write_parquet(snips, tmp_path / "plain", store=store)
    seen = Recorder()
    result = write_parquet(snips, tmp_path / "watched", store=store, progress=seen)
    seen.check(NPARTITIONS)
    assert (result.rows, result.files) == (plain.rows, plain.files)
    pd.testing.assert_frame_equal(read_table(tmp_path / "watched"), read_table(tmp_path / "plain"))


@pytest.mark.parametrize(
    ("writer", "suffix"),
    [(write_feather, "feather"), (write_hdf5, "h5"), (write_csv, "csv")],
    ids=["feather", "hdf5", "csv"],
)
def test_single_file_writers(where: str, store: pipeline.Store, tmp_path: Path, writer, suffix: str) -> None:
    snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
    writer(snips, tmp_path / f"plain.{suffix}", store=store)
    seen = Recorder()
    result = writer(snips, tmp_path / f"watched.{suffix}", store=store, progress=seen)
    seen.check(NPARTITIONS)
    assert result.rows == store.counts()["snips"]
    pd.testing.assert_frame_equal(read_table(tmp_path / f"watched.{suffix}"), read_table(tmp_path / f"plain.{suffix}"))


def test_pandas_table_reports_one_partition(store: pipeline.Store, tmp_path: Path) -> None:
    table = store.snip_table()
    for writer, name in ((write_feather, "t.feather"), (write_parquet, "t")):
        seen = Recorder()
        writer(table, tmp_path / name, progress=seen)
        seen.check(1)


def test_export_store(where: str, store: pipeline.Store, tmp_path: Path) -> None:
    seen = Recorder()
    result = export_store(store, tmp_path / "out", npartitions=NPARTITIONS, progress=seen)
    seen.check(NPARTITIONS)
    assert result.rows == store.counts()["snips"]


# --------------------------------------------------------- worker processes
def test_worker_processes(store: pipeline.Store, tmp_path: Path) -> None:
    """A LocalCluster with two worker processes: every partition reported from as_completed."""
    with cluster.open_runtime("local", workers=2, threads_per_worker=1, dashboard_address=None, quiet=True) as client:
        assert client is not None
        snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
        # operator.itemgetter pickles by reference, so worker processes can load it.
        seen = Recorder()
        mapped = map_snips(snips, operator.itemgetter("area_um2"), meta="float64", progress=seen)
        seen.check(NPARTITIONS)
        seen = Recorder()
        flags = run_detectors(snips, DETECTORS, store=store, progress=seen)
        seen.check(NPARTITIONS + 1)
        seen = Recorder()
        write_parquet(snips, tmp_path / "out", store=store, progress=seen)
        seen.check(NPARTITIONS)
    with dask.config.set(scheduler="sync"):
        snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
        expected_flags = run_detectors(snips, DETECTORS, store=store).compute()
    table = store.snip_table()
    assert mapped.set_index("entity_id")["value"].sort_index().tolist() == table["area_um2"].sort_index().tolist()
    by = ["detector", "entity_id"]
    pd.testing.assert_frame_equal(sorted_frame(flags, by), sorted_frame(expected_flags, by))
    pd.testing.assert_frame_equal(read_table(tmp_path / "out"), table.loc[:, read_table(tmp_path / "out").columns])


def test_progress_errors_propagate(where: str, store: pipeline.Store) -> None:
    """A callback that raises stops the computation with its own error."""

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        if done:
            raise Stop

    snips = pipeline.snips_from_store(store, npartitions=NPARTITIONS)
    with pytest.raises(Stop):
        map_snips(snips, area, meta="float64", progress=stop)
