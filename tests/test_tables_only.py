"""Stores read as tables only: the document is parsed on first use.

``read_store(path, document=False)`` (the default for files larger than one
read block) builds the snip table and runs every check a block of embryos at
a time, without keeping the JSON document; these tests shrink the block so
that small stores take that path, and hold it to the whole-document read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

import pipeline
from pipeline import _jsonfile
from pipeline._jsonfile import DUMP_OPTIONS
from pipeline.errors import MergeConflictError, StoreFormatError
from pipeline.testing import make_document

AUTHOR = "tester"


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Read stores 2 KB at a time, so a store of a few embryos streams."""
    monkeypatch.setattr(_jsonfile, "BLOCK", 2048)
    return 2048


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_bytes(orjson.dumps(doc, option=DUMP_OPTIONS))
    return path


@pytest.fixture
def doc() -> dict[str, Any]:
    return make_document(n_experiments=3, n_embryos=12, n_frames=14, seed=7)


def assert_same_store(lazy: pipeline.Store, eager: pipeline.Store) -> None:
    pd.testing.assert_frame_equal(lazy.snip_table(), eager.snip_table())
    assert lazy.counts() == eager.counts()
    assert lazy.video_ids() == eager.video_ids()
    assert lazy.vocabulary == eager.vocabulary
    assert sorted(lazy.problems()) == sorted(eager.problems())


@pytest.mark.parametrize("block", [1, 700, 2048, 1 << 20])
def test_tables_only_read_equals_the_whole_document_read(tmp_path, doc, monkeypatch, block):
    path = write(tmp_path / "store.json", doc)
    eager = pipeline.read_store(path, document=True)
    monkeypatch.setattr(_jsonfile, "BLOCK", block)
    lazy = pipeline.read_store(path, document=False)
    assert eager.has_document
    assert not lazy.has_document
    assert_same_store(lazy, eager)
    assert not lazy.has_document  # tables, counts, videos and problems never parse it
    assert lazy.doc == eager.doc  # parsed on first use, from the same file
    assert lazy.has_document


def test_large_files_are_read_as_tables_by_default(tmp_path, doc, small_blocks):
    path = write(tmp_path / "store.json", doc)
    assert path.stat().st_size > small_blocks
    assert not pipeline.read_store(path).has_document
    tiny = write(tmp_path / "tiny.json", make_document(n_experiments=1, n_embryos=1, n_frames=2, seed=1))
    assert tiny.stat().st_size < 20 * small_blocks
    _jsonfile.BLOCK = 1 << 20
    assert pipeline.read_store(tiny).has_document  # small files: the whole document at once


def test_the_shared_examples_read_the_same_either_way(examples_dir, small_blocks):
    for name in ("small_store.json",):
        eager = pipeline.read_store(examples_dir / name, document=True)
        lazy = pipeline.read_store(examples_dir / name, document=False)
        assert not lazy.has_document
        assert_same_store(lazy, eager)


def test_an_invalid_store_reports_every_problem_either_way(tmp_path, doc, small_blocks):
    embryos = list(doc["embryos"].values())
    embryos[0]["snips"][next(iter(embryos[0]["snips"]))]["phenotype"]["value"] = "NOT_A_PHENOTYPE"
    embryos[-1]["death_frame"] = "soon"
    doc["file_info"]["created"] = 7
    path = write(tmp_path / "store.json", doc)
    with pytest.raises(StoreFormatError) as whole:
        pipeline.read_store(path, document=True)
    with pytest.raises(StoreFormatError) as streamed:
        pipeline.read_store(path, document=False)
    assert sorted(streamed.value.problems) == sorted(whole.value.problems)
    assert len(whole.value.problems) >= 3


def test_a_vocabulary_after_the_embryos_is_applied(tmp_path, doc, small_blocks):
    # permitted_values is read after the embryos here: the blocks are checked
    # again with it (a store's own vocabulary may permit more than the default).
    vocab = pipeline.schema.default_vocabulary()
    vocab["phenotypes"]["CURLY"] = {}
    first = next(iter(doc["embryos"].values()))
    next(iter(first["snips"].values()))["phenotype"]["value"] = "CURLY"
    doc = {k: v for k, v in doc.items() if k != "permitted_values"} | {"permitted_values": vocab}
    assert list(doc)[-1] == "permitted_values"
    path = write(tmp_path / "store.json", doc)
    lazy = pipeline.read_store(path, document=False)
    assert not lazy.has_document
    assert_same_store(lazy, pipeline.read_store(path, document=True))
    assert "CURLY" in set(lazy.snip_table()["phenotype"])


def test_an_embryo_id_given_twice_reads_as_the_whole_parse_does(tmp_path, doc, small_blocks):
    # A JSON object with a repeated key: the parse keeps the last. Streamed
    # blocks would hold both, so such a file is read whole.
    path = write(tmp_path / "store.json", doc)
    text = path.read_bytes()
    eid = next(iter(doc["embryos"]))
    body = orjson.dumps({"embryos": {eid: doc["embryos"][eid]}}, option=orjson.OPT_INDENT_2)
    member = body[body.index(b"\n    "): body.rindex(b"\n  }")]
    end = text.rindex(b"\n  }\n  ,") if b"\n  }\n  ," in text else text.index(b"\n  },\n  \"flags\"")
    path.write_bytes(text[:end] + b"," + member + text[end:])
    assert orjson.loads(path.read_bytes())["embryos"][eid] == doc["embryos"][eid]
    store = pipeline.read_store(path, document=False)
    assert store.has_document
    assert_same_store(store, pipeline.read_store(path, document=True))


def test_legacy_files_are_always_read_whole(legacy_path, small_blocks):
    with pytest.warns(pipeline.errors.UpgradeWarning):
        store = pipeline.read_store(legacy_path, document=False)
    assert store.has_document
    assert store.upgrade_report


def test_edits_and_merges_parse_the_document_on_demand(tmp_path, doc, small_blocks):
    eager_path = write(tmp_path / "eager.json", doc)
    lazy_path = write(tmp_path / "lazy.json", doc)
    rows = [{"embryo_id": eid, "phenotype": "EDEMA", "frames": "[0:3]"} for eid in list(doc["embryos"])[:5]]
    reports = []
    for path, document in ((eager_path, True), (lazy_path, False)):
        store = pipeline.read_store(path, document=document)
        changes = pipeline.assign_phenotypes(pipeline.snips_from_store(store), rows, author=AUTHOR)
        reports.append(pipeline.merge_into_store(store, changes))
        assert store.has_document
    assert reports[0].counts == reports[1].counts
    eager, lazy = (orjson.loads(p.read_bytes()) for p in (eager_path, lazy_path))
    for d in (eager, lazy):
        d["file_info"].pop("last_updated")
    assert _without_stamps(eager) == _without_stamps(lazy)


def _without_stamps(doc: dict[str, Any]) -> dict[str, Any]:
    text = orjson.dumps(doc).decode()
    import re

    return orjson.loads(re.sub(r'"timestamp":"[^"]*"', '"timestamp":""', text))


def test_a_file_replaced_since_the_read_is_not_mixed_with_the_tables(tmp_path, doc, small_blocks):
    path = write(tmp_path / "store.json", doc)
    store = pipeline.read_store(path, document=False)
    other = make_document(n_experiments=1, n_embryos=5, n_frames=9, seed=99)
    write(tmp_path / "other.json", other)
    os.replace(tmp_path / "other.json", path)
    with pytest.raises(MergeConflictError, match="changed by another writer"):
        store.doc  # noqa: B018 - the access is what is tested
    # A merge re-reads a store changed on disk and applies its batch on top.
    eid = next(iter(other["embryos"]))
    fresh = pipeline.read_store(path, document=False)
    write(tmp_path / "again.json", other)
    os.replace(tmp_path / "again.json", path)
    changes = pipeline.assign_phenotypes(
        pipeline.snips_from_store(fresh), [{"embryo_id": eid, "phenotype": "EDEMA", "frames": "first"}], author=AUTHOR
    )
    report = pipeline.merge_into_store(fresh, changes)
    assert report.counts["assigned"] == 1
    saved = orjson.loads(path.read_bytes())
    assert next(iter(saved["embryos"][eid]["snips"].values()))["phenotype"]["value"] == "EDEMA"


def test_reading_the_table_and_exporting_never_parse_the_document(tmp_path, doc, small_blocks):
    path = write(tmp_path / "store.json", doc)
    store = pipeline.read_store(path)
    assert not store.has_document
    snips = pipeline.snips_from_store(store, npartitions=3).compute()
    pd.testing.assert_frame_equal(snips, pipeline.read_store(path, document=True).snip_table())
    pipeline.export_store(store, tmp_path / "out", scheduler="sync", progress=False)
    assert not store.has_document
    assert store.head["file_info"] == doc["file_info"]
