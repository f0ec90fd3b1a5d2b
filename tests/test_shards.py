"""Sharded stores: lossless conversion, same results as a single file, crash safety."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
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
