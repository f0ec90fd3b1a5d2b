"""Merging change sets into the store (issue 4): all-or-nothing, logged, undoable.

Every test works on a store file in a temporary folder, written once by our own
writer (``Store.save``) so that byte comparisons are not disturbed by a first
reformatting save.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time

import dask
import numpy as np
import orjson
import pandas as pd
import pytest

import pipeline
from pipeline import changelog
from pipeline._atomic import backup_dir
from pipeline._jsonschema import json_path
from pipeline.errors import (
    MergeConflictError,
    PipelineError,
    StoreFormatError,
    StoreLockedError,
)
from pipeline.testing import assert_store_equal, make_assignments, make_store

AUTHOR = "tester"


@pytest.fixture(autouse=True)
def _sync_scheduler():
    with dask.config.set(scheduler="sync"):
        yield


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "store.json"
    make_store(
        n_experiments=2, n_embryos=5, n_frames=10, seed=4, dead_fraction=0.4
    ).save(path)
    return path


def without_last_updated(data: bytes) -> bytes:
    return re.sub(rb'"last_updated": "[^"]*"', b'"last_updated": ""', data)


def first_live_embryo(store):
    return next(
        e for e in sorted(store.embryos) if store.embryos[e]["death_frame"] is None
    )


def phenotype_changes(store, rows, **options):
    snips = pipeline.snips_from_store(store, npartitions=2)
    return pipeline.assign_phenotypes(
        snips, rows, author=AUTHOR, vocabulary=store.vocabulary, **options
    )


def snip_value(store, snip_id):
    embryo = store.embryos[pipeline.ids.parse_snip_id(snip_id).embryo_id]
    return embryo["snips"][snip_id]["phenotype"]["value"]


def first_snips(store, embryo_id, n=1):
    snips = store.embryos[embryo_id]["snips"]
    return sorted(snips, key=lambda s: snips[s]["frame"])[:n]


# ------------------------------------------------------------- all or nothing


def test_merge_writes_logs_and_keeps_a_backup(store_path):
    store = pipeline.read_store(store_path)
    rows = make_assignments(store, n_rows=30, seed=1)
    report = pipeline.merge_into_store(store, phenotype_changes(store, rows))
    assert report.batch_id is not None
    assert not report.dry_run
    assert (
        report.n_written
        == report.counts.get("assigned", 0) + report.counts.get("backfilled", 0)
        > 0
    )
    again = pipeline.read_store(store_path)
    assert_store_equal(again, store)
    assert [r["batch_id"] for r in changelog.committed_batches(store_path)] == [
        report.batch_id
    ]
    assert len(list(backup_dir(store_path).iterdir())) == 1


def test_failure_during_save_leaves_the_file_byte_identical(store_path, monkeypatch):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    doc_before = copy.deepcopy(store.doc)
    eid = first_live_embryo(store)
    changes = phenotype_changes(
        store, [{"embryo_id": eid, "phenotype": "DEAD", "frames": "[2]"}]
    ).compute()

    def boom(src, dst):
        msg = "disk full (injected)"
        raise OSError(msg)

    monkeypatch.setattr("pipeline._atomic.os.replace", boom)
    with pytest.raises(OSError, match="injected"):
        pipeline.merge_into_store(store, changes)
    monkeypatch.undo()
    assert store_path.read_bytes() == before
    assert not list(store_path.parent.glob(".store.json.*.tmp"))
    # The document in memory is restored (death frame included); only the
    # in-memory last_updated stamp may have moved.
    assert_store_equal(store, doc_before)
    assert store.embryos[eid]["death_frame"] is None
    assert changelog.committed_batches(store_path) == []
    kinds = [r["kind"] for r in changelog.iter_records(store_path)]
    assert kinds == ["phenotype", "aborted"]
    assert len(pipeline.read_changelog(store_path)) == 0
    # The same change set merges cleanly afterwards.
    report = pipeline.merge_into_store(store, changes)
    assert (
        pipeline.read_store(store_path).embryos[eid]["death_frame"]
        == store.embryos[eid]["death_frame"]
        is not None
    )
    assert [r["batch_id"] for r in changelog.committed_batches(store_path)] == [
        report.batch_id
    ]


def test_failure_while_applying_restores_the_document_and_writes_nothing(
    store_path, monkeypatch
):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    doc_before = copy.deepcopy(store.doc)
    changes = phenotype_changes(
        store, make_assignments(store, n_rows=40, seed=2)
    ).compute()

    def boom(*args):
        msg = "check failed (injected)"
        raise RuntimeError(msg)

    # The post-write check of a phenotype batch, the last step before the log.
    monkeypatch.setattr(pipeline.merge, "_check_phenotype_batch", boom)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.merge_into_store(store, changes)
    assert store_path.read_bytes() == before
    assert_store_equal(store, doc_before, ignore_last_updated=False)
    assert list(changelog.iter_records(store_path)) == []


def test_a_written_entry_that_breaks_the_contract_is_refused_and_nothing_is_written(store_path):
    # A change set edited by hand after it was computed: an unknown value, a
    # blank author and a confidence above 1 are caught after applying, with
    # the JSON path of each, and the document and file are left as they were.
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    doc_before = copy.deepcopy(store.doc)
    changes = phenotype_changes(store, make_assignments(store, n_rows=40, seed=2)).compute()
    written = changes.index[changes["status"] == "assigned"][:3]
    changes.loc[written[0], "new_value"] = "NOT_A_PHENOTYPE"
    changes.loc[written[1], "author"] = " "
    changes.loc[written[2], "confidence"] = 1.5
    with pytest.raises(StoreFormatError) as err:
        pipeline.merge_into_store(store, changes)
    paths = [p for p, _ in err.value.problems]
    assert any(p.endswith(".phenotype.value") for p in paths)
    assert any(p.endswith(".phenotype.author") for p in paths)
    assert any(p.endswith(".phenotype.confidence") for p in paths)
    assert "NOT_A_PHENOTYPE" in str(err.value)
    assert store_path.read_bytes() == before
    assert_store_equal(store, doc_before, ignore_last_updated=False)
    assert list(changelog.iter_records(store_path)) == []


def test_a_forced_write_that_breaks_dead_permanence_is_refused(store_path):
    store = pipeline.read_store(store_path)
    table = store.snip_table()
    after_death = table.loc[table["frame"] > table["death_frame"].fillna(10**9)]
    later = after_death.index[0]
    dead, frame = after_death["embryo_id"].iat[0], int(after_death["frame"].iat[0])
    before = store_path.read_bytes()
    changes = pd.DataFrame(
        {
            "snip_id": [later], "embryo_id": [dead], "frame": [frame], "row": [0], "old_value": ["DEAD"],
            "new_value": ["NONE"], "status": ["assigned"], "reason": [None], "author": ["someone"],
            "timestamp": [pipeline.store.now()], "confidence": [np.nan], "notes": [None],
        }
    ).astype(pipeline.schema.PHENOTYPE_CHANGE_COLUMNS)
    with pytest.raises(StoreFormatError, match="DEAD is permanent"):
        pipeline.merge_into_store(store, changes)
    assert store_path.read_bytes() == before


def test_change_set_naming_an_unknown_snip_is_a_conflict_and_writes_nothing(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    eid = first_live_embryo(store)
    changes = phenotype_changes(
        store, [{"embryo_id": eid, "phenotype": "EDEMA", "frames": "all"}]
    ).compute()
    changes.loc[changes.index[-1], "snip_id"] = f"{eid}_s9999"
    with pytest.raises(MergeConflictError, match="not in the store"):
        pipeline.merge_into_store(store, changes)
    assert store_path.read_bytes() == before


def test_dry_run_writes_nothing(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    report = pipeline.merge_into_store(
        store,
        phenotype_changes(store, make_assignments(store, n_rows=20, seed=3)),
        dry_run=True,
    )
    assert report.dry_run
    assert report.batch_id is None
    assert report.n_written > 0
    assert "would write" in report.summary()
    assert store_path.read_bytes() == before
    assert not changelog.changelog_path(store_path).exists()
    assert not backup_dir(store_path).exists()


def test_merging_a_recomputed_change_set_again_writes_nothing(store_path):
    store = pipeline.read_store(store_path)
    rows = make_assignments(store, n_rows=25, seed=5, bad_fraction=0)
    pipeline.merge_into_store(store, phenotype_changes(store, rows))
    after_first = store_path.read_bytes()
    report = pipeline.merge_into_store(store, phenotype_changes(store, rows))
    assert report.n_written == 0
    assert report.batch_id is None
    assert store_path.read_bytes() == after_first


# -------------------------------------------------------- concurrent writers

_OTHER_WRITER = """
import sys
import pipeline
store = pipeline.read_store(sys.argv[1])
store.add_phenotype(sys.argv[2], sys.argv[3], "other_writer")
store.save()
"""


def other_process_sets(path, snip_id, value):
    subprocess.run(
        [sys.executable, "-c", _OTHER_WRITER, str(path), snip_id, value],
        check=True,
        timeout=120,
    )


def test_other_writer_on_different_snips_is_reread_and_kept(store_path):
    store = pipeline.read_store(store_path)
    eids = [
        e for e in sorted(store.embryos) if store.embryos[e]["death_frame"] is None
    ][:2]
    mine = first_snips(store, eids[0])[0]
    theirs = first_snips(store, eids[1])[0]
    changes = phenotype_changes(
        store, [{"embryo_id": eids[0], "phenotype": "EDEMA", "frames": "first"}]
    ).compute()
    other_process_sets(store_path, theirs, "HEART_DEFECT")
    report = pipeline.merge_into_store(store, changes)
    assert any("another writer" in n for n in report.notes)
    on_disk = pipeline.read_store(store_path)
    assert snip_value(on_disk, mine) == "EDEMA"
    assert snip_value(on_disk, theirs) == "HEART_DEFECT"


def test_other_writer_on_the_same_snips_is_a_conflict_and_nothing_is_written(
    store_path,
):
    store = pipeline.read_store(store_path)
    eid = first_live_embryo(store)
    mine = first_snips(store, eid)[0]
    changes = phenotype_changes(
        store, [{"embryo_id": eid, "phenotype": "EDEMA", "frames": "[0:3]"}]
    ).compute()
    other_process_sets(store_path, mine, "BODY_AXIS")
    theirs = store_path.read_bytes()
    with pytest.raises(
        MergeConflictError, match="changed since the change set was computed"
    ) as info:
        pipeline.merge_into_store(store, changes)
    assert info.value.failure_cases["snip_id"].tolist() == [mine]
    assert store_path.read_bytes() == theirs
    assert changelog.committed_batches(store_path) == []


_LOCK_HOLDER = """
import sys, time
from pipeline._atomic import store_lock
with store_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_held_lock_times_out_and_nothing_is_written(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    changes = phenotype_changes(
        store, make_assignments(store, n_rows=10, seed=6)
    ).compute()
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(store_path), "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match="locked by another writer"):
            pipeline.merge_into_store(store, changes, lock_timeout=0.5)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert store_path.read_bytes() == before


# ------------------------------------------------------------------ undo


def test_assign_then_undo_is_byte_identical_modulo_last_updated(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    rows = make_assignments(store, n_rows=60, seed=7)
    report = pipeline.merge_into_store(store, phenotype_changes(store, rows))
    assert report.n_written > 0
    assert any(
        t == "embryo" for t, *_ in changelog.committed_batches(store_path)[0]["changes"]
    )  # death frames moved
    undone = pipeline.undo(store, report.batch_id)
    assert undone.kind == "undo"
    assert undone.counts["restored"] > 0
    assert without_last_updated(store_path.read_bytes()) == without_last_updated(before)


def test_undo_with_overwrite_dead_corrections_is_byte_identical(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    dead = [
        e for e in sorted(store.embryos) if store.embryos[e]["death_frame"] is not None
    ]
    rows = [{"embryo_id": e, "phenotype": "NORMAL", "frames": "death-1:"} for e in dead]
    report = pipeline.merge_into_store(
        store, phenotype_changes(store, rows, overwrite_dead=True)
    )
    assert all(store.embryos[e]["death_frame"] is None for e in dead)
    pipeline.undo(store, report.batch_id)
    assert without_last_updated(store_path.read_bytes()) == without_last_updated(before)


def test_undo_refuses_when_a_later_batch_touched_the_same_snips_unless_forced(
    store_path,
):
    store = pipeline.read_store(store_path)
    eid = first_live_embryo(store)
    snip = first_snips(store, eid)[0]
    first = pipeline.merge_into_store(
        store,
        phenotype_changes(
            store, [{"embryo_id": eid, "phenotype": "EDEMA", "frames": "[0:2]"}]
        ),
    )
    second = pipeline.merge_into_store(
        store,
        phenotype_changes(
            store, [{"embryo_id": eid, "phenotype": "NORMAL", "frames": "first"}]
        ),
    )
    before = store_path.read_bytes()
    with pytest.raises(MergeConflictError, match=re.escape(second.batch_id)):
        pipeline.undo(store, first.batch_id)
    assert store_path.read_bytes() == before
    pipeline.undo(store, first.batch_id, force=True)
    assert snip_value(pipeline.read_store(store_path), snip) == "NONE"


def test_undo_of_a_batch_with_unrelated_later_batches_needs_no_force(store_path):
    store = pipeline.read_store(store_path)
    e1, e2 = [
        e for e in sorted(store.embryos) if store.embryos[e]["death_frame"] is None
    ][:2]
    first = pipeline.merge_into_store(
        store, phenotype_changes(store, [{"embryo_id": e1, "phenotype": "EDEMA"}])
    )
    pipeline.merge_into_store(
        store, phenotype_changes(store, [{"embryo_id": e2, "phenotype": "NORMAL"}])
    )
    pipeline.undo(store, first.batch_id)
    on_disk = pipeline.read_store(store_path)
    assert {s["phenotype"]["value"] for s in on_disk.embryos[e1]["snips"].values()} == {
        "NONE"
    }
    assert {s["phenotype"]["value"] for s in on_disk.embryos[e2]["snips"].values()} == {
        "NORMAL"
    }


def test_undo_of_an_unknown_batch_and_of_an_in_memory_store_raise(store_path):
    store = pipeline.read_store(store_path)
    with pytest.raises(PipelineError, match="no committed batch"):
        pipeline.undo(store, "b-00000000T000000-deadbeef")
    with pytest.raises(ValueError, match="read from a file"):
        pipeline.undo(make_store(n_experiments=1, n_embryos=1, n_frames=3), "b-x")


def test_undo_is_itself_undoable(store_path):
    store = pipeline.read_store(store_path)
    eid = first_live_embryo(store)
    report = pipeline.merge_into_store(
        store,
        phenotype_changes(
            store, [{"embryo_id": eid, "phenotype": "DEAD", "frames": "[3]"}]
        ),
    )
    after = store_path.read_bytes()
    undone = pipeline.undo(store, report.batch_id)
    assert store.embryos[eid]["death_frame"] is None
    pipeline.undo(store, undone.batch_id)
    assert without_last_updated(store_path.read_bytes()) == without_last_updated(after)


# -------------------------------------------------------------- genotypes


def test_genotypes_merge_and_undo(store_path):
    before = store_path.read_bytes()
    store = pipeline.read_store(store_path)
    e1, e2, e3 = sorted(store.embryos)[:3]
    rows = [
        {
            "embryo_id": e1,
            "genotype": "lmx1b",
            "zygosity": "Homozygous",
            "confirmed": "yes",
            "allele": "sa123",
        },
        {"embryo_id": e2, "genotype": "wt"},
        {"embryo_id": e2, "genotype": "TBD", "notes": "second look"},
        {"embryo_id": "20990101_A01_e01", "genotype": "WT"},
        {"embryo_id": e3, "genotype": "not_a_gene"},
    ]
    changes = pipeline.assign_genotypes(store, rows, author=AUTHOR)
    assert changes["status"].tolist()[:3] in (
        ["assigned", "skipped", "assigned"],
        ["unchanged", "skipped", "assigned"],
        ["assigned", "skipped", "unchanged"],
    )
    assert changes["reason"].iloc[1].startswith("overridden")
    assert [r.split(":")[0] for r in changes["reason"].iloc[3:]] == [
        "unknown_embryo",
        "unknown_genotype",
    ]
    report = pipeline.merge_into_store(store, changes)
    assert report.kind == "genotype"
    assert report.exit_code == 1
    on_disk = pipeline.read_store(store_path)
    g1 = on_disk.embryos[e1]["genotype"]
    assert (
        g1["value"],
        g1["zygosity"],
        g1["confirmed"],
        g1["allele"],
        g1["author"],
    ) == ("lmx1b", "homozygous", True, "sa123", AUTHOR)
    assert on_disk.embryos[e2]["genotype"]["value"] == "TBD"
    pipeline.undo(store, report.batch_id)
    assert without_last_updated(store_path.read_bytes()) == without_last_updated(before)


def test_genotypes_without_overwrite_skip_embryos_that_have_one(store_path):
    store = pipeline.read_store(store_path)
    has = next(
        e for e in sorted(store.embryos) if store.embryos[e]["genotype"] is not None
    )
    changes = pipeline.assign_genotypes(
        store, [{"embryo_id": has, "genotype": "shh"}], author=AUTHOR, overwrite=False
    )
    assert changes["status"].tolist() == ["skipped"]
    assert changes["reason"].iloc[0].startswith("has_genotype")


def test_genotype_changed_by_another_writer_is_a_conflict(store_path):
    store = pipeline.read_store(store_path)
    eid = min(store.embryos)
    changes = pipeline.assign_genotypes(
        store, [{"embryo_id": eid, "genotype": "sox9a"}], author=AUTHOR
    )
    other = pipeline.read_store(store_path)
    other.add_genotype(eid, "cep290", "other_writer", overwrite=True)
    time.sleep(0.01)  # a distinct mtime for the fingerprint
    other.save()
    with pytest.raises(MergeConflictError, match=eid):
        pipeline.merge_into_store(store, changes)


# ------------------------------------------------------ change log and report


def test_read_changelog_lists_every_changed_value(store_path):
    store = pipeline.read_store(store_path)
    eid = first_live_embryo(store)
    report = pipeline.merge_into_store(
        store,
        phenotype_changes(
            store, [{"embryo_id": eid, "phenotype": "DEAD", "frames": "[-2]"}]
        ),
    )
    table = pipeline.read_changelog(store_path)
    assert list(table.columns) == [
        "batch_id",
        "kind",
        "author",
        "timestamp",
        "target",
        "entity_id",
        "field",
        "before",
        "after",
    ]
    assert set(table["batch_id"]) == {report.batch_id}
    assert table["author"].unique().tolist() == [AUTHOR]
    snips = table.loc[table["target"] == "snip"]
    assert len(snips) == 2
    assert all(orjson.loads(a)["value"] == "DEAD" for a in snips["after"])
    assert all(orjson.loads(b)["value"] == "NONE" for b in snips["before"])
    death = table.loc[table["field"] == "death_frame"]
    assert death[["entity_id", "before"]].values.tolist() == [[eid, "null"]]
    undone = pipeline.undo(store, report.batch_id)
    table = pipeline.read_changelog(store_path)
    assert table.loc[
        table["batch_id"] == undone.batch_id, "kind"
    ].unique().tolist() == ["undo"]


def test_merge_report_counts_summary_html_and_exit_code(store_path):
    store = pipeline.read_store(store_path)
    eid = first_live_embryo(store)
    rows = [
        {"embryo_id": eid, "phenotype": "NORMAL", "frames": "[0:4]"},
        {"embryo_id": eid, "phenotype": "EDEMA", "frames": "[2:3]"},
        {"embryo_id": eid, "phenotype": "EDMEA"},
    ]
    report = pipeline.merge_into_store(store, phenotype_changes(store, rows))
    assert report.counts == {"assigned": 4, "skipped": 1, "failed": 1}
    assert report.overrides == 1
    assert report.n_written == 4
    assert report.failed["row"].tolist() == [2]
    assert not report.ok
    assert report.exit_code == 1
    text = repr(report)
    assert text.startswith("<MergeReport phenotype batch ")
    assert report.batch_id in text
    assert "1 write(s) overridden" in text
    assert "row 2:" in text
    assert "unknown_phenotype" in text
    page = report._repr_html_()
    assert "<table" in page
    assert report.batch_id in page
    assert "EDMEA" in page
    clean = pipeline.merge_into_store(
        store,
        phenotype_changes(
            store, [{"embryo_id": eid, "phenotype": "TBD", "frames": "last"}]
        ),
    )
    assert clean.ok
    assert clean.exit_code == 0
    assert "<p>no failed rows</p>" in clean._repr_html_()


def test_report_lists_at_most_twenty_failed_rows(store_path):
    store = pipeline.read_store(store_path)
    rows = [{"embryo_id": "20990101_A01_e01", "phenotype": "NORMAL"}] * 25
    report = pipeline.merge_into_store(
        store, phenotype_changes(store, rows), dry_run=True
    )
    assert report.counts == {"failed": 25}
    assert "... and 5 more" in report.summary()


def test_merge_rejects_a_table_that_is_not_a_change_set(store_path):
    store = pipeline.read_store(store_path)
    with pytest.raises(ValueError, match="not a change set"):
        pipeline.merge_into_store(store, pd.DataFrame({"snip_id": ["x"]}))


def test_in_memory_store_merges_without_a_file():
    store = make_store(n_experiments=1, n_embryos=3, n_frames=6, seed=2)
    eid = first_live_embryo(store)
    report = pipeline.merge_into_store(
        store, phenotype_changes(store, [{"embryo_id": eid, "phenotype": "TBD"}])
    )
    assert report.batch_id is not None
    assert report.path is None
    assert {s["phenotype"]["value"] for s in store.embryos[eid]["snips"].values()} == {
        "TBD"
    }


def test_written_snips_of_embryos_without_dead_writes_are_checked_against_their_death_frame(store_path):
    # Only a written snip can break the DEAD rule in an embryo whose DEAD
    # snips a batch leaves alone: those are checked over whole arrays. The
    # death frame is corrupted by hand here (as a script editing store.doc
    # might) so that the check has something to find.
    store = pipeline.read_store(store_path)
    eid = first_live_embryo(store)
    before = store_path.read_bytes()
    changes = phenotype_changes(store, [{"embryo_id": eid, "phenotype": "EDEMA", "frames": "last"}]).compute()
    assert (changes["old_value"] != "DEAD").all()
    store.embryos[eid]["death_frame"] = int(changes["frame"].iat[0]) - 1
    with pytest.raises(StoreFormatError, match="after death at frame") as err:
        pipeline.merge_into_store(store, changes)
    assert [p for p, _ in err.value.problems] == [
        json_path("embryos", eid, "snips", changes["snip_id"].iat[0], "phenotype", "value")
    ]
    assert store_path.read_bytes() == before
