"""Sharded stores: lossless conversion, same results as a single file, crash safety."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import pipeline
from pipeline.shards import JOURNAL, ShardedStore, shard_store, unshard_store
from pipeline.testing import assert_store_equal, make_assignments, make_store

STAMP = "2026-01-01T00:00:00+00:00"


@pytest.fixture
def single(tmp_path: Path) -> Path:
    path = tmp_path / "single.json"
    make_store(n_experiments=4, n_embryos=6, n_frames=12, seed=7).save(path)
    return path


@pytest.fixture
def sharded(single: Path, tmp_path: Path) -> Path:
    shard_store(single, tmp_path / "sharded")
    return tmp_path / "sharded"


def test_shard_then_unshard_is_lossless(
    single: Path, sharded: Path, tmp_path: Path
) -> None:
    store = pipeline.read_store(sharded)
    assert isinstance(store, ShardedStore)
    assert sorted(store.shards) == sorted(
        {
            e["source"]["experiment_id"]
            for e in pipeline.read_store(single).embryos.values()
        }
    )
    for exp, rel in store.shards.items():
        assert rel == f"experiments/{exp}.json"
        assert (sharded / rel).is_file()
    unshard_store(sharded, tmp_path / "back.json")
    assert_store_equal(
        pipeline.read_store(single), pipeline.read_store(tmp_path / "back.json")
    )


def test_snip_table_is_read_by_workers_one_partition_per_experiment(
    single: Path, sharded: Path
) -> None:
    store = pipeline.read_store(sharded)
    snips = pipeline.snips_from_store(store)
    assert snips.npartitions == len(store.shards)
    assert snips.known_divisions
    # Nothing was parsed in this process to build the graph but the smallest shard's schema.
    assert len(store._loaded) == 0
    pd.testing.assert_frame_equal(
        snips.compute(scheduler="sync"), pipeline.read_store(single).snip_table()
    )
    for i in range(snips.npartitions):
        part = snips.get_partition(i).compute(scheduler="sync")
        assert part["experiment_id"].nunique() == 1


def test_assign_gives_the_same_store_on_both_layouts(
    single: Path, sharded: Path
) -> None:
    rows = make_assignments(pipeline.read_store(single), n_rows=60, seed=3)
    reports = []
    for path in (single, sharded):
        store = pipeline.read_store(path)
        changes = pipeline.assign_phenotypes(
            pipeline.snips_from_store(store), rows, author="alee", timestamp=STAMP
        )
        reports.append(pipeline.merge_into_store(store, changes))
    assert reports[0].counts == reports[1].counts
    a = pipeline.read_store(single).snip_table()
    b = pipeline.snips_from_store(pipeline.read_store(sharded)).compute(
        scheduler="sync"
    )
    pd.testing.assert_frame_equal(a, b)


def test_a_batch_touching_one_experiment_rewrites_only_its_shard(sharded: Path) -> None:
    store = pipeline.read_store(sharded)
    experiments = sorted(store.shards)
    before = {e: (sharded / store.shards[e]).stat().st_mtime_ns for e in experiments}
    target = next(eid for eid in store.shard(experiments[1]))
    store = pipeline.read_store(sharded)
    changes = pipeline.assign_phenotypes(
        pipeline.snips_from_store(store),
        [{"embryo_id": target, "phenotype": "EDEMA", "frames": "first"}],
        author="alee",
    )
    report = pipeline.merge_into_store(store, changes)
    assert report.n_written == 1
    assert list(store._loaded) == [experiments[1]]
    after = {e: (sharded / store.shards[e]).stat().st_mtime_ns for e in experiments}
    assert [e for e in experiments if before[e] != after[e]] == [experiments[1]]


def test_undo_on_a_sharded_store_restores_every_shard(sharded: Path) -> None:
    store = pipeline.read_store(sharded)
    original = pipeline.snips_from_store(store).compute(scheduler="sync")
    rows = make_assignments(store, n_rows=40, seed=9)
    report = pipeline.merge_into_store(
        store,
        pipeline.assign_phenotypes(pipeline.snips_from_store(store), rows, author="x"),
    )
    assert report.batch_id
    pipeline.undo(pipeline.read_store(sharded), report.batch_id)
    restored = pipeline.snips_from_store(pipeline.read_store(sharded)).compute(
        scheduler="sync"
    )
    pd.testing.assert_frame_equal(original, restored)


_CRASHING_BATCH = textwrap.dedent(
    """
    import functools, sys
    import pipeline, pipeline.shards as shards
    from pipeline.testing import make_assignments
    root, crash_after = sys.argv[1], int(sys.argv[2])
    shards.journaled_write = functools.partial(shards.journaled_write, _crash_after=crash_after)
    store = pipeline.read_store(root)
    rows = make_assignments(store, n_rows=80, seed=11, bad_fraction=0)
    changes = pipeline.assign_phenotypes(pipeline.snips_from_store(store), rows, author="crash", timestamp="2026-01-01T00:00:00+00:00")
    pipeline.merge_into_store(store, changes)
    """
)


@pytest.fixture(scope="module")
def crash_case(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """A pristine sharded store, its snip table, and the table after the batch completes."""
    base = tmp_path_factory.mktemp("crash")
    make_store(n_experiments=4, n_embryos=6, n_frames=12, seed=7).save(
        base / "single.json"
    )
    pristine = base / "pristine"
    shard_store(base / "single.json", pristine)
    old = pipeline.snips_from_store(pipeline.read_store(pristine)).compute(
        scheduler="sync"
    )
    reference = base / "reference"
    shutil.copytree(pristine, reference)
    done = subprocess.run(
        [sys.executable, "-c", _CRASHING_BATCH, str(reference), "999"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    new = pipeline.snips_from_store(pipeline.read_store(reference)).compute(
        scheduler="sync"
    )
    return pristine, old, new


@pytest.mark.parametrize(
    "crash_after", [-1, 0, 1, 2, 4], ids=lambda k: f"crash-after-{k}-files"
)
def test_killed_between_shard_writes_opens_to_old_or_new_state(
    crash_case: tuple[Path, pd.DataFrame, pd.DataFrame],
    tmp_path: Path,
    crash_after: int,
) -> None:
    pristine, old, new = crash_case
    assert not old.equals(new)
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_BATCH, str(store_dir), str(crash_after)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert crashed.returncode == 9, crashed.stderr
    journal_was_written = (store_dir / JOURNAL).exists()
    assert journal_was_written == (crash_after >= 0)
    reopened = pipeline.snips_from_store(pipeline.read_store(store_dir)).compute(
        scheduler="sync"
    )
    assert not (store_dir / JOURNAL).exists()
    assert not list(store_dir.rglob("*.new"))
    pd.testing.assert_frame_equal(reopened, new if journal_was_written else old)


def test_cli_shard_validate_and_unshard(single: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            capture_output=True,
            text=True,
            check=False,
        )

    out = tmp_path / "cli-sharded"
    assert run("shard", str(single), str(out)).returncode == 0
    checked = run("validate", str(out))
    assert checked.returncode == 0
    assert checked.stdout.startswith("valid: 4 experiments")
    assert (
        run("shard", str(single), str(out)).returncode == 2
    )  # never into a non-empty folder
    assert run("unshard", str(out), str(tmp_path / "back.json")).returncode == 0
    assert_store_equal(
        pipeline.read_store(single), pipeline.read_store(tmp_path / "back.json")
    )
