"""Sharded stores: lossless conversion, same results as a single file, crash safety."""

from __future__ import annotations

import contextlib
import copy
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import orjson
import pandas as pd
import pytest

import pipeline
from pipeline import changelog
from pipeline.errors import MergeConflictError
from pipeline.schema import FLAG_CHANGE_COLUMNS, MEASUREMENT_CHANGE_COLUMNS
from pipeline.shards import (
    JOURNAL,
    ShardedStore,
    apply_sharded,
    shard_store,
    unshard_store,
)
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
    # in the client (before merge_into_store dispatched to apply_sharded) or none
    assert set(store._loaded) <= {experiments[1]}
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


# ------------------------------------------------ merging shard by shard (apply_sharded)
_FIXED_STAMPS = {STAMP, "2026-01-05T10:00:00+00:00"}  # the batches' and make_store's


def _normalised(value: object) -> object:
    """*value* with every timestamp a batch made up itself replaced by "NOW"."""
    if isinstance(value, dict):
        return {
            k: ("NOW" if k == "timestamp" and v not in _FIXED_STAMPS else _normalised(v))
            for k, v in value.items()
            if k != "last_updated"
        }
    if isinstance(value, list):
        return [_normalised(v) for v in value]
    return value


def _writes(changes: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The rows merge_into_store writes."""
    if kind == "flag":
        return changes.loc[changes["status"] == "raised"]
    if kind == "measurement":
        return changes.loc[changes["status"] == "assigned"]
    return changes.loc[changes["status"].isin(["assigned", "backfilled"])]


def _apply(store: ShardedStore, changes: pd.DataFrame, kind: str, **kwargs) -> tuple[str | None, int]:
    with store.locked():
        return apply_sharded(store, kind, _writes(changes, kind), **kwargs)


def _last_record(path: Path) -> dict:
    return list(changelog.iter_records(path))[-1]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".backups" not in str(p) and not p.name.endswith((".lock", ".jsonl"))
    }


def _phenotype_changes(single: Path) -> pd.DataFrame:
    store = pipeline.read_store(single)
    rows = make_assignments(store, n_rows=80, seed=3)
    # where work runs: the active client if there is one (it holds the pieces)
    return pipeline.assign_phenotypes(
        pipeline.snips_from_store(store), rows, author="alee", timestamp=STAMP
    ).compute()


def _genotype_changes(single: Path) -> pd.DataFrame:
    store = pipeline.read_store(single)
    embryos = sorted(store.embryos)[::3]
    rows = [
        {"embryo_id": e, "genotype": ("WT", "lmx1b", "sox9a")[i % 3], "confirmed": i % 2 == 0}
        for i, e in enumerate(embryos)
    ]
    rows.append({"embryo_id": embryos[0], "genotype": "shh", "allele": "a1"})  # overrides row 0
    return pipeline.assign_genotypes(store, rows, author="gene", timestamp=STAMP)


def _flag_changes(single: Path) -> pd.DataFrame:
    """Hits at every level, some repeating flags the store has exactly."""
    store = pipeline.read_store(single)
    embryos = sorted(store.embryos)
    blurred = [
        (sid, s["flags"][0])
        for e in embryos
        for sid, s in store.embryos[e]["snips"].items()
        if s["flags"] and s["flags"][0]["value"] == "MOTION_BLUR"
    ]
    video = store.embryos[embryos[-1]]["source"]["video_id"]
    experiment = store.embryos[embryos[0]]["source"]["experiment_id"]
    rows = [
        # the same flag as the store has: kept as it was (its timestamp too)
        (blurred[0][0], "snip", "MOTION_BLUR", blurred[0][1]["severity"], blurred[0][1]["notes"], blurred[0][1]["confidence"], "motion_blur"),
        # the same value, other figures: replaced
        (blurred[1][0], "snip", "MOTION_BLUR", "warning", "var=0.5 > 0.2", 0.9, "motion_blur"),
        (f"{embryos[5]}", "embryo", "SHORT_TRACK", "warning", None, None, "ShortTrack"),
        (f"{embryos[-2]}", "embryo", "SHORT_TRACK", "warning", "3 snips", 0.7, "ShortTrack"),
        (video, "video", "FOCUS_DRIFT", "error", None, 0.6, "focus"),
        (experiment, "experiment", "INCOMPLETE", "info", None, None, "ShortTrack"),
        (next(iter(store.embryos[embryos[9]]["snips"])), "snip", "OUT_OF_FOCUS", "warning", None, 0.8, "focus"),
    ]
    table = pd.DataFrame(
        [
            {"entity_id": e, "level": lv, "flag": f, "severity": sev, "notes": no, "confidence": c,
             "detector": d, "author": f"auto:{d}", "status": "raised", "reason": None}
            for e, lv, f, sev, no, c, d in rows
        ]
    )
    return table.astype(FLAG_CHANGE_COLUMNS)


def _measurement_changes(single: Path) -> pd.DataFrame:
    """A new measurement on every 7th snip and a changed one on every 11th (some without embryo_id)."""
    table = pipeline.read_store(single).snip_table()
    fresh = table.index[::7]
    changed = table.index[::11]
    frame = pd.DataFrame(
        {
            "snip_id": [*fresh, *changed],
            "embryo_id": [*table.loc[fresh, "embryo_id"], *([None] * len(changed))],
            "column": ["area_mm2"] * len(fresh) + ["length_um"] * len(changed),
            "old_value": [np.nan] * len(fresh) + list(table.loc[changed, "length_um"]),
            "new_value": [i / 10 for i in range(len(fresh))] + [np.nan if i % 4 == 0 else 500.0 + i for i in range(len(changed))],
            "status": "assigned",
            "reason": None,
            "author": "auto:area",
            "timestamp": STAMP,
        }
    )
    return frame.astype(MEASUREMENT_CHANGE_COLUMNS)


_CASES = {
    "phenotype": (_phenotype_changes, {}),
    "genotype": (_genotype_changes, {}),
    "measurement": (_measurement_changes, {}),
    "flag": (_flag_changes, {}),
    "flag-replace": (
        _flag_changes,
        {"replace_authors": ["auto:motion_blur", "auto:focus", "auto:death_detector"]},
    ),
}


def _check_same_as_single_file(single: Path, sharded: Path, case: str) -> tuple[ShardedStore, str]:
    """Merge one case into the single file (merge_into_store) and the shards (apply_sharded)."""
    make, options = _CASES[case]
    changes = make(single)
    kind = pipeline.merge.kind_of(changes)
    report = pipeline.merge_into_store(pipeline.read_store(single), changes, **options)
    store = pipeline.read_store(sharded)
    batch_id, n = _apply(store, changes, kind, replace=options.get("replace_authors", ()), inputs={"case": case})
    assert batch_id is not None
    assert n == len(_last_record(single)["changes"])
    assert n == (report.n_written if kind == "flag" else n)
    # The store the single-file merge wrote, value for value.
    reread = pipeline.read_store(sharded)
    assert _normalised(reread._full_doc()) == _normalised(pipeline.read_store(single).doc)
    # The same change-log record, entries in the same order.
    ours, theirs = _last_record(sharded / "store.json"), _last_record(single)
    assert ours["batch_id"] == batch_id
    assert (ours["kind"], ours["author"], ours["inputs"]) == (kind, theirs["author"], {"case": case})
    assert _normalised(ours["changes"]) == _normalised(theirs["changes"])
    # Consistent in memory: nothing loaded, the index as written, no stray files.
    assert store._loaded == {}
    assert not store.changed_on_disk()
    assert _normalised(store._full_doc()) == _normalised(reread._full_doc())
    assert not list(sharded.rglob("*.new"))
    assert not (sharded / JOURNAL).exists()
    return store, batch_id


@pytest.mark.parametrize("case", list(_CASES))
def test_apply_sharded_writes_what_the_single_file_merge_writes(
    single: Path, sharded: Path, case: str
) -> None:
    with dask.config.set(scheduler="sync"):
        _check_same_as_single_file(single, sharded, case)


def test_apply_sharded_records_extra_keys_and_marks_checkpoints_saved(
    single: Path, sharded: Path
) -> None:
    changes = _flag_changes(single)
    checkpoint = {"run": "r-0123456789abcdef", "partitions": [0], "npartitions": 1}
    batch_id, _n = _apply(pipeline.read_store(sharded), changes, "flag", extra={"checkpoint": checkpoint})
    records = list(changelog.iter_records(sharded / "store.json"))
    assert records[-2]["batch_id"] == batch_id
    assert records[-2]["checkpoint"] == checkpoint
    assert (records[-1]["batch_id"], records[-1]["kind"]) == (batch_id, changelog.SAVED)
    # Nothing changed: nothing recorded (the caller records an empty checkpoint).
    assert _apply(pipeline.read_store(sharded), changes, "flag", extra={"checkpoint": checkpoint}) == (None, 0)
    assert len(list(changelog.iter_records(sharded / "store.json"))) == len(records)


def test_apply_sharded_flag_batch_has_one_timestamp_and_keeps_identical_flags(
    single: Path, sharded: Path
) -> None:
    changes = _flag_changes(single)
    before = pipeline.read_store(sharded)
    kept = changes["entity_id"].iloc[0]
    old_entry = before.embryos[kept.rsplit("_", 1)[0]]["snips"][kept]["flags"][0]
    store = pipeline.read_store(sharded)
    _apply(store, changes, "flag")
    after = pipeline.read_store(sharded)
    assert after.embryos[kept.rsplit("_", 1)[0]]["snips"][kept]["flags"][0] == old_entry
    stamps = {
        f["timestamp"]
        for _t, _e, _f, _b, flags in _last_record(sharded / "store.json")["changes"]
        for f in flags or []
        if f["timestamp"] not in _FIXED_STAMPS
    }
    assert len(stamps) == 1
    # Raising the same again changes nothing: no batch.
    assert _apply(pipeline.read_store(sharded), changes, "flag") == (None, 0)


def test_apply_sharded_rewrites_only_touched_shards_and_the_index(sharded: Path) -> None:
    store = pipeline.read_store(sharded)
    experiments = sorted(store.shards)
    target = next(iter(store.shard(experiments[2])))
    store = pipeline.read_store(sharded)
    changes = pipeline.assign_phenotypes(
        pipeline.snips_from_store(store),
        [{"embryo_id": target, "phenotype": "EDEMA", "frames": "first"}],
        author="alee",
    ).compute(scheduler="sync")
    before = _files(sharded)
    assert _apply(store, changes, "phenotype")[1] == 1
    after = _files(sharded)
    # store.json is written too (its last_updated may well be the same second)
    changed = sorted(k for k in after if after[k] != before.get(k) and k != "store.json")
    assert changed == [f"experiments/{experiments[2]}.json"]


@pytest.fixture
def local_client() -> Iterator[object]:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.mark.distributed
def test_apply_sharded_on_a_local_cluster(single: Path, sharded: Path, tmp_path: Path, local_client) -> None:
    assert pipeline.cluster.get_client() is local_client
    _check_same_as_single_file(single, sharded, "phenotype")
    assert "merge-shard" in local_client.cluster.scheduler.task_prefixes
    # flags with replace, on a fresh pair of stores
    make_store(n_experiments=4, n_embryos=6, n_frames=12, seed=7).save(tmp_path / "f.json")
    shard_store(tmp_path / "f.json", tmp_path / "f")
    _check_same_as_single_file(tmp_path / "f.json", tmp_path / "f", "flag-replace")
    # the videos, listed by the workers
    store = pipeline.read_store(tmp_path / "f")
    assert store.video_ids() == pipeline.read_store(tmp_path / "f.json").video_ids()
    assert store._loaded == {}


def _stale_on_disk(sharded: Path, changes: pd.DataFrame) -> str:
    """Change, on disk, one snip the change set writes (in the third shard)."""
    store = pipeline.read_store(sharded)
    experiment = sorted(store.shards)[2]
    rows = _writes(changes, "phenotype")
    rows = rows.loc[rows["embryo_id"].str.startswith(experiment + "_") & (rows["old_value"] != "DEAD")]
    for _, row in rows.iterrows():
        if store.embryos[row["embryo_id"]]["death_frame"] is None:
            store.add_phenotype(row["snip_id"], "TBD" if row["old_value"] != "TBD" else "BLUR", "other")
            store.save()
            return experiment
    msg = "no live snip to change"
    raise AssertionError(msg)


@pytest.mark.parametrize("failure", ["stale", "check"])
def test_a_failing_shard_leaves_every_file_byte_identical(
    single: Path, sharded: Path, failure: str
) -> None:
    changes = _phenotype_changes(single)
    store = pipeline.read_store(sharded)
    if failure == "stale":
        _stale_on_disk(sharded, changes)
        expected = MergeConflictError
    else:
        # A value the vocabulary does not know, in the last shard: the
        # others are staged first, then all must go.
        last = max(store.shards)
        bad = changes["embryo_id"].str.startswith(last + "_") & changes["status"].eq("assigned")
        changes.loc[bad[bad].index[:1], "new_value"] = "NOT_A_PHENOTYPE"
        expected = pipeline.errors.StoreFormatError
    store = pipeline.read_store(sharded)
    index_before = copy.deepcopy(store.index)
    before = _files(sharded)
    records = len(list(changelog.iter_records(sharded / "store.json")))
    with pytest.raises(expected):
        _apply(store, changes, "phenotype")
    assert _files(sharded) == before
    assert not list(sharded.rglob("*.new"))
    assert len(list(changelog.iter_records(sharded / "store.json"))) == records
    assert store.index == index_before
    # With force, the stale value is overwritten.
    if failure == "stale":
        assert _apply(store, changes, "phenotype", force=True)[0]


@pytest.mark.distributed
def test_a_failing_shard_on_a_cluster_leaves_every_file_byte_identical(
    single: Path, sharded: Path, local_client
) -> None:
    changes = _flag_changes(single)
    # A flag the vocabulary does not permit, on an embryo of the last shard.
    store = pipeline.read_store(sharded)
    last = max(store.shards)
    bad = changes["entity_id"].str.startswith(last + "_") & changes["level"].eq("embryo")
    changes.loc[bad[bad].index[:1], "flag"] = "NOT_A_FLAG"
    before = _files(sharded)
    index_before = copy.deepcopy(store.index)
    with pytest.raises(MergeConflictError, match="NOT_A_FLAG"):
        _apply(store, changes, "flag", replace=["auto:motion_blur", "auto:focus"])
    assert _files(sharded) == before
    assert not list(sharded.rglob("*.new"))
    # the video and experiment flags applied in the client were put back
    assert store.index == index_before


@pytest.mark.parametrize("case", ["phenotype", "flag-replace"])
def test_undo_of_a_batch_merged_shard_by_shard(single: Path, sharded: Path, case: str) -> None:
    original = pipeline.read_store(single)
    make, options = _CASES[case]
    changes = make(single)
    batch_id, _n = _apply(
        pipeline.read_store(sharded), changes, pipeline.merge.kind_of(changes),
        replace=options.get("replace_authors", ()),
    )
    pipeline.undo(pipeline.read_store(sharded), batch_id)
    assert_store_equal(pipeline.read_store(sharded)._full_doc(), original.doc)


def test_apply_sharded_refuses_unsaved_edits_and_unknown_embryos(single: Path, sharded: Path) -> None:
    changes = _phenotype_changes(single)
    store = pipeline.read_store(sharded)
    snip = _writes(changes, "phenotype")["snip_id"].iloc[0]
    store.add_flag(snip, "OUT_OF_FOCUS", "snip", "me")
    with pytest.raises(MergeConflictError, match="not saved"):
        _apply(store, changes, "phenotype")
    store = pipeline.read_store(sharded)
    stranger = changes.copy()
    stranger["embryo_id"] = stranger["embryo_id"].astype(str).str.replace(r"^\d+", "19990101", regex=True)
    with pytest.raises(MergeConflictError, match="not in the store"):
        _apply(store, stranger, "phenotype")


def test_stray_staged_files_are_removed_on_open(sharded: Path) -> None:
    rel = next(iter(pipeline.read_store(sharded).shards.values()))
    stray = sharded / f"{rel}.0123abcd.new"
    stray.write_bytes(b"{}")
    pipeline.read_store(sharded)
    assert not stray.exists()


_CRASHING_SHARDED_BATCH = textwrap.dedent(
    """
    import functools, sys
    import pipeline, pipeline.shards as shards
    from pipeline.testing import make_assignments
    root, crash_after = sys.argv[1], int(sys.argv[2])
    shards.journaled_write = functools.partial(shards.journaled_write, _crash_after=crash_after)
    store = pipeline.read_store(root)
    rows = make_assignments(store, n_rows=80, seed=11, bad_fraction=0)
    changes = pipeline.assign_phenotypes(pipeline.snips_from_store(store), rows, author="crash", timestamp="2026-01-01T00:00:00+00:00").compute(scheduler="sync")
    store = pipeline.read_store(root)
    with store.locked():
        shards.apply_sharded(store, "phenotype", changes.loc[changes["status"].isin(["assigned", "backfilled"])])
    """
)


@pytest.mark.parametrize(
    "crash_after", [-1, 0, 1, 2, 4, 999], ids=lambda k: f"crash-after-{k}-files"
)
def test_killed_apply_sharded_opens_to_old_or_new_state(
    crash_case: tuple[Path, pd.DataFrame, pd.DataFrame],
    tmp_path: Path,
    crash_after: int,
) -> None:
    pristine, old, new = crash_case
    store_dir = tmp_path / "store"
    shutil.copytree(pristine, store_dir)
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_SHARDED_BATCH, str(store_dir), str(crash_after)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert crashed.returncode == (0 if crash_after == 999 else 9), crashed.stderr
    journal_was_written = (store_dir / JOURNAL).exists()
    assert journal_was_written == (0 <= crash_after < 999)
    if crash_after == -1:
        assert list(store_dir.rglob("*.new"))  # staged, not committed
    reopened = pipeline.snips_from_store(pipeline.read_store(store_dir)).compute(
        scheduler="sync"
    )
    assert not (store_dir / JOURNAL).exists()
    assert not list(store_dir.rglob("*.new"))
    pd.testing.assert_frame_equal(reopened, old if crash_after == -1 else new)


def test_video_ids_stream_the_shards_without_keeping_them(single: Path, sharded: Path) -> None:
    store = pipeline.read_store(sharded)
    with dask.config.set(scheduler="sync"):
        assert store.video_ids() == pipeline.read_store(single).video_ids()
    assert store._loaded == {}
    # a loaded (edited) shard is read from memory
    experiment = min(store.shards)
    embryo = next(iter(store.shard(experiment).values()))
    embryo["source"]["video_id"] = "in-memory"
    with dask.config.set(scheduler="sync"):
        assert "in-memory" in store.video_ids()


def test_extending_experiment_ids_are_refused_in_linear_time(tmp_path: Path) -> None:
    from pipeline.shards import _extending_pair, sharded_snips

    assert _extending_pair(["a", "b_c", "c_d_e"]) is None
    assert _extending_pair(["x_1", "a_b_c", "a", "a_b"]) == ("a", "a_b")
    ids = [f"2024{i:05d}" for i in range(20_000)] + ["202400017_late"]
    assert _extending_pair(sorted(ids)) == ("202400017", "202400017_late")
    index = {"file_info": {}, "flags": {}, "shards": {e: f"experiments/{e}.json" for e in ("20240102", "20240102_b")}}
    with pytest.raises(pipeline.errors.StoreFormatError, match="'20240102' and '20240102_b'"):
        sharded_snips(ShardedStore(tmp_path, index), measurements=[])


# ------------------------------- undo, merge_many and checkpoint checks shard by shard
def _merged_pair(single: Path, sharded: Path, case: str) -> tuple[str, str]:
    """Merge one case into both layouts with merge_into_store; the two batch ids."""
    make, options = _CASES[case]
    changes = make(single)
    ids_ = []
    for path in (single, sharded):
        report = pipeline.merge_into_store(pipeline.read_store(path), changes, **options)
        assert report.batch_id
        ids_.append(report.batch_id)
    return ids_[0], ids_[1]


def _same_record(ours: dict, theirs: dict) -> None:
    assert (ours["kind"], ours["author"]) == (theirs["kind"], theirs["author"])
    assert _normalised(ours["changes"]) == _normalised(theirs["changes"])


def _check_sharded_undo(single: Path, sharded: Path, tmp_path: Path, case: str) -> None:
    original = pipeline.read_store(single).doc
    first, second = _merged_pair(single, sharded, case)
    pipeline.undo(pipeline.read_store(single), first)
    store = pipeline.read_store(sharded)
    report = pipeline.undo(store, second)
    # Nothing loaded in this process; the index as written; no stray files.
    assert store._loaded == {}
    assert not store.changed_on_disk()
    assert not list(sharded.rglob("*.new"))
    assert not (sharded / JOURNAL).exists()
    ours, theirs = _last_record(sharded / "store.json"), _last_record(single)
    assert ours["batch_id"] == report.batch_id
    assert ours["inputs"] == {"undo_of": second, "force": False}
    _same_record(ours, theirs)
    assert report.n_written == len(theirs["changes"])
    back = tmp_path / f"back-{case}.json"
    unshard_store(sharded, back)
    assert_store_equal(pipeline.read_store(back), pipeline.read_store(single))
    assert_store_equal(pipeline.read_store(back), original)
    # The undo is a batch of its own: undoing it redoes the merge, on both layouts.
    pipeline.undo(pipeline.read_store(single), theirs["batch_id"])
    pipeline.undo(pipeline.read_store(sharded), report.batch_id)
    _same_record(_last_record(sharded / "store.json"), _last_record(single))
    assert _normalised(pipeline.read_store(sharded)._full_doc()) == _normalised(pipeline.read_store(single).doc)


@pytest.mark.parametrize("case", list(_CASES))
def test_sharded_undo_equals_single_file_undo(single: Path, sharded: Path, tmp_path: Path, case: str) -> None:
    with dask.config.set(scheduler="sync"):
        _check_sharded_undo(single, sharded, tmp_path, case)


@pytest.mark.distributed
def test_sharded_undo_on_a_local_cluster(single: Path, sharded: Path, tmp_path: Path, local_client) -> None:
    _check_sharded_undo(single, sharded, tmp_path, "phenotype")
    assert "merge-shard" in local_client.cluster.scheduler.task_prefixes
    make_store(n_experiments=4, n_embryos=6, n_frames=12, seed=7).save(tmp_path / "f.json")
    shard_store(tmp_path / "f.json", tmp_path / "f")
    _check_sharded_undo(tmp_path / "f.json", tmp_path / "f", tmp_path, "flag-replace")


def test_sharded_undo_refuses_later_conflicts_unless_forced(single: Path, sharded: Path) -> None:
    _first, batch = _merged_pair(single, sharded, "genotype")
    store = pipeline.read_store(sharded)
    embryo = _last_record(sharded / "store.json")["changes"][0][1]
    store.add_genotype(embryo, "sox9a", author="later", overwrite=True)
    store.save()
    later = pipeline.merge_into_store(
        pipeline.read_store(sharded),
        pipeline.assign_genotypes(pipeline.read_store(sharded), [{"embryo_id": embryo, "genotype": "WT"}], author="later"),
    )
    assert later.batch_id
    before = _files(sharded)
    records = len(list(changelog.iter_records(sharded / "store.json")))
    with pytest.raises(MergeConflictError, match=embryo):
        pipeline.undo(pipeline.read_store(sharded), batch)
    assert _files(sharded) == before
    assert len(list(changelog.iter_records(sharded / "store.json"))) == records
    store = pipeline.read_store(sharded)
    report = pipeline.undo(store, batch, force=True)
    assert _last_record(sharded / "store.json")["inputs"] == {"undo_of": batch, "force": True}
    assert store._loaded == {}
    assert report.batch_id in changelog.in_effect(changelog.committed_batches(sharded / "store.json"))


def test_a_failing_sharded_undo_leaves_every_file_byte_identical(single: Path, sharded: Path) -> None:
    _first, batch = _merged_pair(single, sharded, "flag-replace")
    log = changelog.changelog_path(sharded / "store.json")
    records = list(changelog.iter_records(sharded / "store.json"))
    record = next(r for r in records if r["batch_id"] == batch)
    assert any(e[1].split(":")[0] in ("video", "experiment") for e in record["changes"])  # some in the index
    # The batch's before value of an embryo of the last shard breaks the
    # vocabulary: that shard's task fails after the others staged theirs.
    store = pipeline.read_store(sharded)
    last = max(store.shards)
    entry = next(e for e in reversed(record["changes"]) if e[1].startswith(f"embryo:{last}_"))
    entry[3] = [{"value": "NOT_A_FLAG", "author": "x", "timestamp": STAMP, "severity": "info", "auto_generated": True}]
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    before = _files(sharded)
    n_records = len(records)
    store = pipeline.read_store(sharded)
    index_before = copy.deepcopy(store.index)
    with pytest.raises(pipeline.errors.StoreFormatError, match="NOT_A_FLAG"):
        pipeline.undo(store, batch)
    assert _files(sharded) == before
    assert not list(sharded.rglob("*.new"))
    assert len(list(changelog.iter_records(sharded / "store.json"))) == n_records
    assert store.index == index_before
    assert store._loaded == {}


def _pheno_and_geno(single: Path) -> list[pd.DataFrame]:
    return [_phenotype_changes(single), _genotype_changes(single)]


@pytest.mark.parametrize("where", ["here", "cluster"])
def test_sharded_merge_many_equals_single_file(single: Path, sharded: Path, tmp_path: Path, where: str, request) -> None:
    if where == "cluster":
        client = request.getfixturevalue("local_client")
    sets = _pheno_and_geno(single)
    original = pipeline.read_store(single).doc
    theirs = pipeline.merge.merge_many(pipeline.read_store(single), sets, kind="import", inputs={"sheet": "x"})
    store = pipeline.read_store(sharded)
    with dask.config.set(scheduler="sync") if where == "here" else contextlib.nullcontext():
        ours = pipeline.merge.merge_many(store, sets, kind="import", inputs={"sheet": "x"})
    if where == "cluster":
        assert "merge-shard" in client.cluster.scheduler.task_prefixes
    assert store._loaded == {}
    assert ours.counts == theirs.counts
    assert ours.n_written == theirs.n_written
    assert ours.batch_ids == [ours.batch_id]
    record = _last_record(sharded / "store.json")
    assert (record["batch_id"], record["kind"], record["inputs"]) == (ours.batch_id, "import", {"sheet": "x"})
    _same_record(record, _last_record(single))
    assert {e[2] for e in record["changes"]} >= {"phenotype", "genotype"}  # both kinds, one batch
    back = tmp_path / "back.json"
    unshard_store(sharded, back)
    assert_store_equal(pipeline.read_store(back), pipeline.read_store(single))
    # One undo restores both kinds.
    pipeline.undo(pipeline.read_store(sharded), ours.batch_id)
    assert_store_equal(pipeline.read_store(sharded)._full_doc(), original)


def test_a_failing_sharded_merge_many_leaves_every_file_byte_identical(single: Path, sharded: Path) -> None:
    pheno, geno = _pheno_and_geno(single)
    # Another writer changes a genotype the batch replaces, in the first shard.
    store = pipeline.read_store(sharded)
    first = min(store.shards)
    row = geno.loc[geno["embryo_id"].str.startswith(first + "_") & geno["status"].eq("assigned")].iloc[0]
    store.add_genotype(row["embryo_id"], "sox9a" if row["old_value"] != "sox9a" else "WT", author="other", overwrite=True)
    store.save()
    before = _files(sharded)
    records = len(list(changelog.iter_records(sharded / "store.json")))
    store = pipeline.read_store(sharded)
    index_before = copy.deepcopy(store.index)
    with pytest.raises(MergeConflictError, match=row["embryo_id"]):
        pipeline.merge.merge_many(store, [pheno, geno], kind="import")
    assert _files(sharded) == before
    assert not list(sharded.rglob("*.new"))
    assert len(list(changelog.iter_records(sharded / "store.json"))) == records
    assert store.index == index_before
    assert store._loaded == {}


_FAILING_UNDO = textwrap.dedent(
    """
    import sys
    import pipeline, pipeline.shards as shards
    root, batch, times = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real, calls = shards._replace_new, []
    def failing(target, backups):
        # A rename that fails once the journal is durable (a full disk, say).
        calls.append(target)
        if len(calls) <= times:
            raise OSError(28, "No space left on device")
        real(target, backups)
    shards._replace_new = failing
    try:
        pipeline.undo(pipeline.read_store(root), batch)
    except OSError:
        sys.exit(3)
    """
)


@pytest.mark.parametrize("times", [1, 99], ids=["finished-in-process", "finished-on-open"])
def test_a_sharded_undo_failing_past_the_commit_point_is_not_logged_aborted(
    single: Path, sharded: Path, times: int
) -> None:
    _first, batch = _merged_pair(single, sharded, "phenotype")
    pipeline.undo(pipeline.read_store(single), _first)
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_UNDO, str(sharded), batch, str(times)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == (0 if times == 1 else 3), done.stderr
    assert (sharded / JOURNAL).exists() == (times == 99)
    kinds = [r["kind"] for r in changelog.iter_records(sharded / "store.json")]
    assert kinds[-1] == "undo"
    assert "aborted" not in kinds
    # Opening completes it: the store holds the undo the log says it does.
    store = pipeline.read_store(sharded)
    assert not (sharded / JOURNAL).exists()
    assert _normalised(store._full_doc()) == _normalised(pipeline.read_store(single).doc)


def _watched(changes: dd.DataFrame, fail_at: int | None = None) -> tuple[dd.DataFrame, list[int]]:
    """The same change set, recording the partitions computed (and failing one)."""
    seen: list[int] = []

    def watch(part: pd.DataFrame, number: int) -> pd.DataFrame:
        seen.append(number)
        if number == fail_at:
            msg = f"partition {number} failed"
            raise RuntimeError(msg)
        return part

    parts = [dask.delayed(watch)(p, i) for i, p in enumerate(changes.to_delayed())]
    return dd.from_delayed(parts, meta=changes._meta, verify_meta=False), seen


def _checkpointed(root: Path, rows: list, fail_at: int | None = None) -> tuple[pipeline.merge.MergeReport | None, list[int]]:
    store = pipeline.read_store(root)
    snips = pipeline.snips_from_store(store)
    changes, seen = _watched(
        pipeline.assign_phenotypes(snips, rows, author="ck", vocabulary=store.vocabulary, timestamp=STAMP), fail_at
    )
    try:
        return pipeline.merge_into_store(store, changes, checkpoint_every=1, inputs={"rows": "r"}), seen
    except RuntimeError:
        return None, seen


def _drop_last_saved_marker(root: Path) -> dict:
    log = changelog.changelog_path(root / "store.json")
    records = list(changelog.iter_records(root / "store.json"))
    last = [r for r in records if "checkpoint" in r][-1]
    kept = [r for r in records if not (r["kind"] == changelog.SAVED and r["batch_id"] == last["batch_id"])]
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kept))
    return last


@pytest.mark.parametrize("reached", [True, False], ids=["in-the-store", "never-written"])
def test_a_checkpoint_without_saved_marker_is_judged_shard_by_shard(sharded: Path, tmp_path: Path, reached: bool) -> None:
    with dask.config.set(scheduler="sync"):
        rows = make_assignments(pipeline.read_store(sharded), n_rows=60, seed=1)
        reference = tmp_path / "reference"
        shutil.copytree(sharded, reference)
        assert _checkpointed(reference, rows)[0].npartitions == 4
        if not reached:
            # The store as it was after checkpoint 0 only; the log of a run
            # that also logged checkpoint 1 (then died before writing it).
            other = tmp_path / "other"
            shutil.copytree(sharded, other)
            assert _checkpointed(other, rows, fail_at=2)[0] is None
        assert _checkpointed(sharded, rows, fail_at=1 if not reached else 2)[0] is None
        if not reached:
            shutil.copy(changelog.changelog_path(other / "store.json"), changelog.changelog_path(sharded / "store.json"))
        last = _drop_last_saved_marker(sharded)
        assert last["checkpoint"]["partitions"] == [1]
        store = pipeline.read_store(sharded)
        key = last["checkpoint"]["run"]
        notes: list[str] = []
        done = pipeline.merge._resumable(store, key, "phenotype", 4, notes, 10.0, True)
        assert done == ({0, 1} if reached else {0})
        assert store._loaded == {}
        report, seen = _checkpointed(sharded, rows)
    assert report.resumed == (2 if reached else 1)
    assert sorted(seen) == ([2, 3] if reached else [1, 2, 3])
    if not reached:
        aborted = [r for r in changelog.iter_records(sharded / "store.json") if r["kind"] == "aborted"]
        assert [r["batch_id"] for r in aborted] == [last["batch_id"]]
    assert _normalised(pipeline.read_store(sharded)._full_doc()) == _normalised(pipeline.read_store(reference)._full_doc())


@pytest.mark.distributed
def test_holds_sharded_reads_the_shards_on_the_workers(single: Path, sharded: Path, local_client) -> None:
    from pipeline.shards import holds_sharded

    _first, batch = _merged_pair(single, sharded, "flag-replace")
    changes = _last_record(sharded / "store.json")["changes"]
    stranger = [["embryo", "19990101_A01_e01", "genotype", None, None]]
    store = pipeline.read_store(sharded)
    assert holds_sharded(store, [changes, stranger, []]) == [(True, False), (False, False), (True, True)]
    assert "holds-shard" in local_client.cluster.scheduler.task_prefixes
    assert store._loaded == {}
    pipeline.undo(store, batch)
    assert holds_sharded(pipeline.read_store(sharded), [changes]) == [(False, True)]


def test_store_level_flags_are_checked_once_when_the_index_is_read(tmp_path):
    # Shards are checked without the store-level flags (they would be walked
    # again for every shard); read_store checks them, with their JSON path.
    store = pipeline.testing.make_store(n_experiments=2, n_embryos=2, n_frames=3, seed=0)
    store.save(tmp_path / "s.json", backups=0)
    pipeline.shards.shard_store(tmp_path / "s.json", tmp_path / "sh")
    index_path = tmp_path / "sh" / "store.json"
    index = orjson.loads(index_path.read_bytes())
    video = pipeline.read_store(tmp_path / "sh").video_ids()[0]
    bad = {"value": "NOT_A_FLAG", "author": "someone", "timestamp": "2026-01-05T10:00:00+00:00", "severity": "warning"}
    index["flags"]["video"][video] = [bad]
    index_path.write_bytes(orjson.dumps(index))
    with pytest.raises(pipeline.errors.StoreFormatError) as err:
        pipeline.read_store(tmp_path / "sh")
    assert any(path.startswith("$.flags.video") and "NOT_A_FLAG" in message for path, message in err.value.problems)
    # What each shard is checked against carries the levels but not the entries.
    index["flags"]["video"][video] = [dict(bad, value="NO_EMBRYO")]
    index_path.write_bytes(orjson.dumps(index))
    good = pipeline.read_store(tmp_path / "sh")
    assert good.index["flags"]["video"][video][0]["value"] == "NO_EMBRYO"
    assert pipeline.shards._top(good)["flags"] == {level: {} for level in good.index["flags"]}
    assert pipeline.snips_from_store(good).compute(scheduler="sync").shape[0] == store.counts()["snips"]


def test_a_shard_is_read_typed_with_the_whole_parses_table_and_errors(sharded: Path, monkeypatch) -> None:
    from pipeline import shards

    store = pipeline.read_store(sharded)
    args = (str(store.root), shards._top(store), store.vocabulary)
    typed = {exp: shards._shard_table(rel, *args) for exp, rel in store.shards.items()}
    assert all(shards._typed_shard_tables(sharded / rel, *args[1:]) is not None for rel in store.shards.values())
    # A shard with a problem: the typed read steps aside and the whole parse words it.
    rel = next(iter(store.shards.values()))
    text = (sharded / rel).read_bytes()
    (sharded / rel).write_bytes(text.replace(b'"value": "NONE"', b'"value": "WOBBLY"', 1))
    assert shards._typed_shard_tables(sharded / rel, *args[1:]) is None
    with pytest.raises(pipeline.errors.StoreFormatError) as typed_error:
        shards._shard_table(rel, *args)
    (sharded / rel).write_bytes(text)
    monkeypatch.setattr(shards, "_typed_shard_tables", lambda *a: None)
    for other, other_rel in store.shards.items():
        pd.testing.assert_frame_equal(typed[other], shards._shard_table(other_rel, *args))
    (sharded / rel).write_bytes(text.replace(b'"value": "NONE"', b'"value": "WOBBLY"', 1))
    with pytest.raises(pipeline.errors.StoreFormatError) as whole_error:
        shards._shard_table(rel, *args)
    assert str(typed_error.value) == str(whole_error.value)
    assert "WOBBLY" in str(whole_error.value)
