"""Checkpointed merges: every N partitions committed on their own, re-runs resume.

A checkpointed merge (``merge_into_store(..., checkpoint_every=N)``, ``assign
--checkpoint-every N``) must end in the store an uninterrupted merge gives,
whatever point it was stopped at, and a re-run must not compute again the
partitions whose checkpoints reached the store. Runs are stopped for real: a
partition that raises in-process, and ``SIGKILL`` of a CLI process.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import dask
import dask.dataframe as dd
import orjson
import pandas as pd
import pytest

import pipeline
from pipeline import changelog
from pipeline._atomic import backup_dir
from pipeline.errors import MergeConflictError
from pipeline.testing import assert_store_equal, make_assignments, make_store

AUTHOR = "tester"
STAMP = "2026-01-05T10:00:00+00:00"
INPUTS = {"command": "test", "assignments": "rows"}


# Every test computes with the synchronous scheduler (conftest.sync_scheduler).
pytestmark = pytest.mark.usefixtures("sync_scheduler")


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store.json"
    make_store(
        n_experiments=3, n_embryos=6, n_frames=10, seed=4, dead_fraction=0.3
    ).save(path)
    return path


@pytest.fixture
def rows(store_path):
    return make_assignments(pipeline.read_store(store_path), n_rows=60, seed=1)


def changes_of(store, rows, npartitions=6):
    snips = pipeline.snips_from_store(store, npartitions=npartitions)
    return pipeline.assign_phenotypes(
        snips, rows, author=AUTHOR, vocabulary=store.vocabulary, timestamp=STAMP
    )


def watched(changes, seen, fail_at=None):
    """The same change set, recording which partitions are computed (and failing one)."""

    def watch(part, number):
        seen.append(number)
        if number == fail_at:
            msg = (
                f"partition {number} failed (a real exception in the partition's task)"
            )
            raise RuntimeError(msg)
        return part

    # Each partition its own delayed call with its number baked in, so the
    # number survives Dask selecting partitions.
    parts = [dask.delayed(watch)(p, i) for i, p in enumerate(changes.to_delayed())]
    return dd.from_delayed(parts, meta=changes._meta, verify_meta=False)


def without_last_updated(data: bytes) -> bytes:
    return re.sub(rb'"last_updated": "[^"]*"', b'"last_updated": ""', data)


def uninterrupted(tmp_path, store_path, rows):
    """The store a single-batch merge of the same change set gives."""
    ref = tmp_path / "ref" / "store.json"
    ref.parent.mkdir()
    shutil.copy(store_path, ref)
    store = pipeline.read_store(ref)
    pipeline.merge_into_store(store, changes_of(store, rows))
    return pipeline.read_store(ref)


def checkpoint_records(path):
    return [r for r in changelog.committed_batches(path) if "checkpoint" in r]


# ------------------------------------------------------------ in-process


def test_checkpointed_merge_equals_one_batch_and_logs_each_checkpoint(
    tmp_path, store_path, rows
):
    expected = uninterrupted(tmp_path, store_path, rows)
    store = pipeline.read_store(store_path)
    single = changes_of(store, rows).compute()
    seen = []
    report = pipeline.merge_into_store(
        store,
        changes_of(store, rows),
        checkpoint_every=2,
        inputs=INPUTS,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert_store_equal(pipeline.read_store(store_path), expected)
    records = checkpoint_records(store_path)
    assert [r["checkpoint"]["partitions"] for r in records] == [[0, 1], [2, 3], [4, 5]]
    assert {r["checkpoint"]["run"] for r in records} == {report.run_key}
    assert report.run_key == pipeline.merge.run_key_of("phenotype", INPUTS, 6)
    assert report.batch_ids == [r["batch_id"] for r in records if r["changes"]]
    assert report.batch_id == report.batch_ids[-1]
    assert report.npartitions == 6
    assert report.resumed == 0
    assert seen[-1] == (6, 6)
    # Every checkpoint that reached the store is followed by its "saved" marker.
    kinds = [r["kind"] for r in changelog.iter_records(store_path)]
    assert kinds == ["phenotype", "saved"] * len(report.batch_ids)
    # Counts aggregate over the checkpoints, as one batch would have counted them.
    assert report.counts == {
        str(k): int(v) for k, v in single["status"].value_counts().items()
    }
    assert report.n_written == sum(len(r["changes"]) for r in records) - sum(
        1 for r in records for t, *_ in r["changes"] if t == "embryo"
    )
    assert "3 checkpoint batches" in report.summary()


def test_rerun_after_a_failed_partition_resumes_and_ends_equal(
    tmp_path, store_path, rows
):
    expected = uninterrupted(tmp_path, store_path, rows)
    store = pipeline.read_store(store_path)
    seen = []
    with pytest.raises(RuntimeError, match="partition 3 failed") as info:
        pipeline.merge_into_store(
            store,
            watched(changes_of(store, rows), seen, fail_at=3),
            checkpoint_every=1,
            inputs=INPUTS,
        )
    # The error says what stays in the store.
    (note,) = info.value.__notes__
    assert note.startswith("3 checkpoint(s) of run r-")
    assert "run the same merge again to resume" in note
    committed = sorted(
        p for r in checkpoint_records(store_path) for p in r["checkpoint"]["partitions"]
    )
    assert committed == [0, 1, 2]
    # The store on disk holds exactly the three checkpoints.
    pipeline.read_store(store_path).validate()

    again = pipeline.read_store(store_path)
    seen.clear()
    report = pipeline.merge_into_store(
        again, watched(changes_of(again, rows), seen), checkpoint_every=1, inputs=INPUTS
    )
    assert sorted(seen) == [3, 4, 5]  # committed partitions are not computed again
    assert report.resumed == 3
    assert "resumed: 3 of 6 partition(s)" in report.summary()
    assert_store_equal(pipeline.read_store(store_path), expected)

    # A third run finds everything done and computes nothing.
    seen.clear()
    last = pipeline.read_store(store_path)
    before = store_path.read_bytes()
    report = pipeline.merge_into_store(
        last, watched(changes_of(last, rows), seen), checkpoint_every=1, inputs=INPUTS
    )
    assert seen == []
    assert (report.resumed, report.batch_ids, report.n_written) == (6, [], 0)
    assert store_path.read_bytes() == before


def test_other_inputs_or_partitions_are_another_run(store_path, rows):
    store = pipeline.read_store(store_path)
    first = pipeline.merge_into_store(
        store, changes_of(store, rows), checkpoint_every=3, inputs=INPUTS
    )
    seen = []
    store = pipeline.read_store(store_path)
    other = pipeline.merge_into_store(
        store,
        watched(changes_of(store, rows), seen),
        checkpoint_every=3,
        inputs={**INPUTS, "assignments": "edited"},
    )
    assert other.resumed == 0
    assert sorted(seen) == list(range(6))
    assert other.run_key != first.run_key
    seen.clear()
    store = pipeline.read_store(store_path)
    five = pipeline.merge_into_store(
        store,
        watched(changes_of(store, rows, 5), seen),
        checkpoint_every=3,
        inputs=INPUTS,
    )
    assert five.resumed == 0
    assert len(set(seen)) == 5
    # An explicit run key is used as given; a mismatched partition count is said.
    seen.clear()
    store = pipeline.read_store(store_path)
    keyed = pipeline.merge_into_store(
        store,
        watched(changes_of(store, rows, 5), seen),
        checkpoint_every=3,
        run_key=first.run_key,
    )
    assert keyed.run_key == first.run_key
    assert keyed.resumed == 0
    assert any("another kind or number of partitions" in n for n in keyed.notes)


def test_a_logged_checkpoint_without_saved_marker_is_checked_against_the_store(
    tmp_path, store_path, rows
):
    expected = uninterrupted(tmp_path, store_path, rows)
    store = pipeline.read_store(store_path)
    with pytest.raises(RuntimeError):
        pipeline.merge_into_store(
            store,
            watched(changes_of(store, rows), [], fail_at=2),
            checkpoint_every=1,
            inputs=INPUTS,
        )
    log = changelog.changelog_path(store_path)
    lines = log.read_bytes().splitlines(keepends=True)
    last = checkpoint_records(store_path)[-1]["batch_id"]
    # As if killed after the store write and before the marker: the store holds it.
    unmarked = b"".join(
        x for x in lines if not (b'"saved"' in x and last.encode() in x)
    )
    log.write_bytes(unmarked)
    store = pipeline.read_store(store_path)
    seen = []
    report = pipeline.merge_into_store(
        store, watched(changes_of(store, rows), seen), checkpoint_every=1, inputs=INPUTS
    )
    assert report.resumed == 2
    assert sorted(seen) == [2, 3, 4, 5]
    assert_store_equal(pipeline.read_store(store_path), expected)


def test_a_logged_checkpoint_that_never_reached_the_store_is_computed_again(
    tmp_path, store_path, rows
):
    expected = uninterrupted(tmp_path, store_path, rows)
    store = pipeline.read_store(store_path)
    with pytest.raises(RuntimeError):
        pipeline.merge_into_store(
            store,
            watched(changes_of(store, rows), [], fail_at=2),
            checkpoint_every=1,
            inputs=INPUTS,
        )
    # As if killed after the log line and before the store write: the file is
    # the one before the last checkpoint (its newest backup), no marker.
    last = checkpoint_records(store_path)[-1]
    assert last["checkpoint"]["partitions"] == [1]
    newest = max(backup_dir(store_path).iterdir(), key=lambda p: p.stat().st_mtime_ns)
    shutil.copy(newest, store_path)
    log = changelog.changelog_path(store_path)
    kept = [
        x
        for x in log.read_bytes().splitlines(keepends=True)
        if not (b'"saved"' in x and last["batch_id"].encode() in x)
    ]
    log.write_bytes(b"".join(kept))
    store = pipeline.read_store(store_path)
    seen = []
    report = pipeline.merge_into_store(
        store, watched(changes_of(store, rows), seen), checkpoint_every=1, inputs=INPUTS
    )
    assert report.resumed == 1
    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert_store_equal(pipeline.read_store(store_path), expected)


def test_undo_of_each_checkpoint_restores_the_file_and_reruns_redo_it(store_path, rows):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    report = pipeline.merge_into_store(
        store, changes_of(store, rows), checkpoint_every=2, inputs=INPUTS
    )
    after = pipeline.read_store(store_path, document=True)  # a snapshot: the file changes below
    assert len(report.batch_ids) == 3
    # Checkpoints touch disjoint embryos: any one undoes without force.
    pipeline.undo(store, report.batch_ids[0])
    store = pipeline.read_store(store_path)
    seen = []
    redo = pipeline.merge_into_store(
        store, watched(changes_of(store, rows), seen), checkpoint_every=2, inputs=INPUTS
    )
    assert sorted(seen) == [0, 1]  # the undone checkpoint's partitions only
    assert redo.resumed == 4
    assert_store_equal(pipeline.read_store(store_path), after)
    for batch_id in reversed([*report.batch_ids[1:], *redo.batch_ids]):
        pipeline.undo(store, batch_id)
    assert without_last_updated(store_path.read_bytes()) == without_last_updated(before)


def test_checkpoint_errors_say_what_to_pass(store_path, rows):
    store = pipeline.read_store(store_path)
    changes = changes_of(store, rows)
    with pytest.raises(ValueError, match=r"inputs= .* or run_key="):
        pipeline.merge_into_store(store, changes, checkpoint_every=2)
    with pytest.raises(ValueError, match="at least 1"):
        pipeline.merge_into_store(store, changes, checkpoint_every=0, inputs=INPUTS)
    memory = make_store(n_experiments=1, n_embryos=2, n_frames=4, seed=0)
    with pytest.raises(ValueError, match="read from a file"):
        pipeline.merge_into_store(
            memory,
            changes_of(memory, make_assignments(memory, n_rows=3)),
            checkpoint_every=1,
            inputs=INPUTS,
        )
    flags = pipeline.run_detectors(
        pipeline.snips_from_store(store, npartitions=3),
        [pipeline.detectors.ShortTrack()],
        store=store,
    )
    with pytest.raises(
        ValueError, match="replace_authors cannot be combined with checkpoint_every"
    ):
        pipeline.merge_into_store(
            store,
            flags,
            checkpoint_every=1,
            inputs=INPUTS,
            replace_authors=["auto:ShortTrack"],
        )
    assert not changelog.changelog_path(store_path).exists()


def test_dry_run_with_checkpoints_skips_committed_partitions_and_writes_nothing(
    store_path, rows
):
    store = pipeline.read_store(store_path)
    with pytest.raises(RuntimeError):
        pipeline.merge_into_store(
            store,
            watched(changes_of(store, rows), [], fail_at=4),
            checkpoint_every=2,
            inputs=INPUTS,
        )
    before = store_path.read_bytes()
    log = changelog.changelog_path(store_path).read_bytes()
    store = pipeline.read_store(store_path)
    seen = []
    report = pipeline.merge_into_store(
        store,
        watched(changes_of(store, rows), seen),
        checkpoint_every=2,
        inputs=INPUTS,
        dry_run=True,
    )
    assert report.dry_run
    assert report.resumed == 4
    assert sorted(seen) == [4, 5]
    assert report.n_written > 0
    assert store_path.read_bytes() == before
    assert changelog.changelog_path(store_path).read_bytes() == log


def test_flag_checkpoints_equal_one_batch(tmp_path, store_path):
    ref = tmp_path / "ref.json"
    shutil.copy(store_path, ref)
    detectors = [
        pipeline.detectors.ShortTrack(min_snips=9),
        pipeline.detectors.FrameGap(),
    ]

    def flags(store):
        return pipeline.run_detectors(
            pipeline.snips_from_store(store, npartitions=4), detectors, store=store
        )

    one = pipeline.read_store(ref)
    pipeline.merge_into_store(one, flags(one))
    store = pipeline.read_store(store_path)
    report = pipeline.merge_into_store(
        store, flags(store), checkpoint_every=1, inputs=INPUTS
    )
    assert report.n_written > 0
    assert len(report.batch_ids) >= 1
    assert_store_equal(
        strip_timestamps(pipeline.read_store(store_path)),
        strip_timestamps(pipeline.read_store(ref)),
    )
    again = pipeline.read_store(store_path)
    rerun = pipeline.merge_into_store(
        again, flags(again), checkpoint_every=1, inputs=INPUTS
    )
    assert rerun.resumed == report.npartitions
    assert rerun.batch_ids == []


def test_strict_flag_checkpoints_stop_at_the_failing_one(store_path):
    store = pipeline.read_store(store_path)

    class FailsLate(pipeline.detectors.ShortTrack):
        name = "FailsLate"

        def __call__(self, part):
            if part["experiment_id"].astype(str).str.startswith("20240104").any():
                msg = "broken on the last experiment"
                raise ValueError(msg)
            return super().__call__(part)

    snips = pipeline.snips_from_store(store, npartitions=3)
    flags = pipeline.run_detectors(snips, [FailsLate(min_snips=9)], store=store)
    with pytest.raises(
        MergeConflictError, match=r"checkpoint\(s\) committed before it stay"
    ) as info:
        pipeline.merge_into_store(
            store, flags, checkpoint_every=1, inputs=INPUTS, strict=True
        )
    assert "broken on the last experiment" in info.value.failure_cases["reason"].iloc[0]
    assert checkpoint_records(store_path)


def strip_timestamps(store):
    doc = copy.deepcopy(store.doc)

    def walk(node):
        if isinstance(node, dict):
            node.pop("timestamp", None)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    doc["file_info"].pop("last_updated", None)
    return doc


# ------------------------------------------------------------ distributed


@pytest.fixture(scope="module")
def local_cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def test_distributed_checkpoints_commit_as_partitions_finish(
    tmp_path, store_path, rows, local_cluster
):
    expected = uninterrupted(tmp_path, store_path, rows)
    store = pipeline.read_store(store_path)
    seen = []
    with dask.config.set(scheduler=None), local_cluster.as_current():
        report = pipeline.merge_into_store(
            store,
            changes_of(store, rows),
            checkpoint_every=2,
            inputs=INPUTS,
            progress=lambda d, t: seen.append((d, t)),
        )
    assert seen[0] == (0, 6)
    assert seen[-1] == (6, 6)
    assert report.batch_ids
    assert sorted(
        p for r in checkpoint_records(store_path) for p in r["checkpoint"]["partitions"]
    ) == list(range(6))
    assert all(
        len(r["checkpoint"]["partitions"]) == 2 for r in checkpoint_records(store_path)
    )
    assert_store_equal(pipeline.read_store(store_path), expected)
    # Resume on the cluster too: partitions of an interrupted run are skipped.
    again = pipeline.read_store(store_path)
    with dask.config.set(scheduler=None), local_cluster.as_current():
        rerun = pipeline.merge_into_store(
            again, changes_of(again, rows), checkpoint_every=2, inputs=INPUTS
        )
    assert rerun.resumed == 6
    assert rerun.batch_ids == []


def test_distributed_failure_keeps_the_checkpoints_before_it(
    store_path, rows, local_cluster
):
    store = pipeline.read_store(store_path)
    with (
        dask.config.set(scheduler=None),
        local_cluster.as_current(),
        pytest.raises(RuntimeError, match="partition 5 failed"),
    ):
        pipeline.merge_into_store(
            store,
            watched(changes_of(store, rows), [], fail_at=5),
            checkpoint_every=1,
            inputs=INPUTS,
        )
    done = sorted(
        p for r in checkpoint_records(store_path) for p in r["checkpoint"]["partitions"]
    )
    assert 5 not in done
    pipeline.read_store(store_path).validate()
    store = pipeline.read_store(store_path)
    report = pipeline.merge_into_store(
        store, changes_of(store, rows), checkpoint_every=1, inputs=INPUTS
    )
    assert report.resumed == len(done)


# ------------------------------------------------------------ killed CLI runs

N_PARTS = 16


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    store = make_store(
        n_experiments=4, n_embryos=60, n_frames=40, seed=3, dead_fraction=0.3
    )
    store.save(folder / "store.json")
    make_assignments(store, n_rows=600, seed=1).to_csv(folder / "rows.csv", index=False)
    return folder


def assign_cmd(store, rows):
    return [
        sys.executable,
        "-m",
        "pipeline",
        "assign",
        str(store),
        str(rows),
        "--author",
        AUTHOR,
        "--checkpoint-every",
        "1",
        "--npartitions",
        str(N_PARTS),
        "--scheduler",
        "sync",
        "--quiet",
    ]


def fresh_copy(big_inputs, folder):
    folder.mkdir()
    shutil.copy(big_inputs / "store.json", folder / "store.json")
    return folder / "store.json"


def log_kinds(store):
    path = changelog.changelog_path(store)
    if not path.exists():
        return []
    kinds = []
    for line in path.read_bytes().splitlines():
        try:
            kinds.append(orjson.loads(line)["kind"])
        except orjson.JSONDecodeError:
            continue
    return kinds


def run_and_kill(store, rows, when, timeout=240):
    """Start the CLI, SIGKILL it once ``when(kinds of the log)`` holds; True if killed."""
    proc = subprocess.Popen(
        assign_cmd(store, rows), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if when(log_kinds(store)):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def consistent(store):
    """The store opens and validates, and holds every saved checkpoint's values."""
    opened = pipeline.read_store(store)
    assert opened.validate(raise_on_error=False) == []
    records = list(changelog.iter_records(store))
    saved = {r["batch_id"] for r in records if r["kind"] == "saved"}
    for rec in checkpoint_records(store):
        if rec["batch_id"] not in saved:
            continue
        for target, entity, field, _before, after in rec["changes"]:
            if target == "snip":
                snip = opened.embryos[pipeline.ids.parse_snip_id(entity).embryo_id][
                    "snips"
                ][entity]
                assert snip[field] == after, (rec["batch_id"], entity)
            else:
                assert opened.embryos[entity][field] == after
    return len(saved), len(checkpoint_records(store))


def rerun(store, rows):
    result = subprocess.run(
        assign_cmd(store, rows),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def reference(big_inputs, tmp_path_factory):
    store = fresh_copy(big_inputs, tmp_path_factory.mktemp("ref") / "run")
    out = rerun(store, big_inputs / "rows.csv")
    assert "resumed" not in out
    return strip_timestamps(pipeline.read_store(store))


def test_killed_cli_run_resumes_and_ends_as_an_uninterrupted_run(
    big_inputs, reference, tmp_path
):
    store = fresh_copy(big_inputs, tmp_path / "run")
    rows = big_inputs / "rows.csv"
    killed = run_and_kill(store, rows, lambda kinds: kinds.count("saved") >= 2)
    assert killed, "the run finished before it could be killed: make the store larger"
    saved, logged = consistent(store)
    assert 2 <= saved < N_PARTS
    out = rerun(store, rows)
    resumed = int(re.search(r"resumed: (\d+) of 16 partition", out).group(1))
    assert saved <= resumed <= logged
    assert "0 computed now" not in out
    assert_store_equal(strip_timestamps(pipeline.read_store(store)), reference)
    # And once more: nothing left to do.
    out = rerun(store, rows)
    assert "resumed: 16 of 16 partition(s)" in out
    assert "wrote 0 value(s)" in out


def test_killing_at_several_points_always_leaves_a_consistent_store(
    big_inputs, reference, tmp_path
):
    store = fresh_copy(big_inputs, tmp_path / "run")
    rows = big_inputs / "rows.csv"
    points = [
        ("as soon as the log has a line", bool),
        (
            "mid-commit: logged, not yet saved",
            lambda kinds: kinds[-1:] == ["phenotype"],
        ),
        ("after 4 checkpoints", lambda kinds: kinds.count("saved") >= 4),
        (
            "mid-commit again",
            lambda kinds: kinds[-1:] == ["phenotype"] and kinds.count("saved") >= 6,
        ),
    ]
    killed = []
    for name, when in points:
        if run_and_kill(store, rows, when):
            killed.append(name)
        try:
            consistent(store)
        except AssertionError as err:  # the message names the failing point
            msg = f"inconsistent after a kill {name}: {err}"
            raise AssertionError(msg) from err
    # The mid-commit windows are short: a run may finish before one is seen.
    assert {"as soon as the log has a line", "after 4 checkpoints"} <= set(killed)
    rerun(store, rows)
    consistent(store)
    assert_store_equal(strip_timestamps(pipeline.read_store(store)), reference)
    batches = changelog.committed_batches(store)
    partitions = sorted(
        p for r in batches if "checkpoint" in r for p in r["checkpoint"]["partitions"]
    )
    # Each partition is committed once, except one logged but never stored
    # (a kill between the log line and the store write), which a re-run redoes.
    assert set(partitions) == set(range(N_PARTS))
    assert len(partitions) - N_PARTS <= sum(1 for _ in points)
    assert pd.Series(partitions).value_counts().max() <= 2


# ------------------------------------------------------------ CLI options


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_detect_checkpoint_every_resumes_and_refuses_replace(store_path):
    common = [
        "detect",
        store_path,
        "--detector",
        "ShortTrack:min_snips=9",
        "--npartitions",
        "3",
        "--scheduler",
        "sync",
        "--quiet",
    ]
    first = cli(*common, "--checkpoint-every", "1")
    assert first.returncode == 0, first.stderr
    records = checkpoint_records(store_path)
    assert sorted(p for r in records for p in r["checkpoint"]["partitions"]) == [
        0,
        1,
        2,
    ]
    assert records[0]["inputs"]["command"] == "detect"
    again = cli(*common, "--checkpoint-every", "1")
    assert again.returncode == 0, again.stderr
    assert "resumed: 3 of 3 partition(s)" in again.stdout
    before = store_path.read_bytes()
    refused = cli(*common, "--checkpoint-every", "1", "--replace")
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    assert refused.stderr.startswith(
        "embryo-pipeline: error: --replace cannot be combined with --checkpoint-every"
    )
    assert store_path.read_bytes() == before
    bad = cli(*common, "--checkpoint-every", "0")
    assert bad.returncode == 2
    assert "must be at least 1" in bad.stderr


def test_assign_checkpoint_every_an_edited_file_is_another_run(store_path, tmp_path):
    rows = tmp_path / "rows.csv"
    store = pipeline.read_store(store_path)
    make_assignments(store, n_rows=20, seed=2, bad_fraction=0).to_csv(rows, index=False)
    common = [
        "assign",
        store_path,
        rows,
        "--author",
        AUTHOR,
        "--npartitions",
        "3",
        "--checkpoint-every",
        "2",
        "--scheduler",
        "sync",
    ]
    first = cli(*common)
    assert first.returncode in (0, 1), first.stderr
    assert "checkpoint batches" in first.stdout
    records = checkpoint_records(store_path)
    assert [r["checkpoint"]["partitions"] for r in records] == [[0, 1], [2]]
    assert records[0]["inputs"]["assignments_sha256"]
    # The same file again resumes; an edited file (other content) is a new run.
    assert "resumed: 3 of 3 partition(s)" in cli(*common).stdout
    make_assignments(store, n_rows=20, seed=3, bad_fraction=0).to_csv(rows, index=False)
    edited = cli(*common)
    assert edited.returncode in (0, 1), edited.stderr
    assert "resumed" not in edited.stdout


# Runs the command with SIGINT back to its default: a shell's background job
# inherits it ignored (and exec keeps that), and Python then installs no
# KeyboardInterrupt handler, so the interrupt would not be heard.
_HEAR_INTERRUPTS = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def test_interrupted_cli_run_says_what_it_kept(big_inputs, reference, tmp_path):
    store = fresh_copy(big_inputs, tmp_path / "run")
    rows = big_inputs / "rows.csv"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HEAR_INTERRUPTS, *assign_cmd(store, rows)[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if log_kinds(store).count("saved") >= 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "embryo-pipeline: note: " in err
    assert "checkpoint(s) of run r-" in err
    assert "nothing was written" not in err
    consistent(store)
    rerun(store, rows)
    assert_store_equal(strip_timestamps(pipeline.read_store(store)), reference)
