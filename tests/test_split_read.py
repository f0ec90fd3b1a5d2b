"""Large stores read with a helper process: same store, same errors, never a second run of the caller.

A store file of at least ``_split_read.MIN_BYTES`` is cut in two at an
embryo boundary; a helper interpreter builds the tables of the embryos after
the cut while this process builds the others (and parses the document when
asked to). These tests lower the threshold and the read block so that small
stores take that path, and hold it to the one-process read. Every split read
starts a real helper process (about 1.5 s each).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest

import pipeline
from pipeline import _jsonfile, _split_read, store
from pipeline._jsonfile import DUMP_OPTIONS, split_point
from pipeline.errors import StoreFormatError
from pipeline.testing import make_document


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Split every read (2 KB blocks); the list receives what each helper sent."""
    monkeypatch.setattr(_split_read, "MIN_BYTES", 0)
    monkeypatch.setattr(_jsonfile, "BLOCK", 2048)
    sent: list[Any] = []
    result = _split_read.Helper.result

    def spy(self: _split_read.Helper) -> Any:
        got = result(self)
        sent.append(got)
        return got

    monkeypatch.setattr(_split_read.Helper, "result", spy)
    return sent


@pytest.fixture
def doc() -> dict[str, Any]:
    return make_document(n_experiments=3, n_embryos=10, n_frames=12, seed=11)


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_bytes(orjson.dumps(doc, option=DUMP_OPTIONS))
    return path


def one_process(path: Path, document: bool) -> pipeline.Store:
    """The same read without a helper."""
    saved = _split_read.MIN_BYTES
    _split_read.MIN_BYTES = 1 << 62
    try:
        return pipeline.read_store(path, document=document)
    finally:
        _split_read.MIN_BYTES = saved


def assert_same(got: pipeline.Store, want: pipeline.Store) -> None:
    pd.testing.assert_frame_equal(got.snip_table(), want.snip_table())
    assert got.counts() == want.counts()
    assert got.video_ids() == want.video_ids()
    assert got.vocabulary == want.vocabulary
    assert got.head == want.head


def test_split_point_is_an_embryo_boundary(tmp_path, doc):
    path = write(tmp_path / "store.json", doc)
    text = path.read_bytes()
    ids = list(doc["embryos"])
    for fraction in (0.0, 0.3, 0.7):
        offset, key = split_point(path, fraction)
        assert text[offset : offset + 7] == b',\n    "'
        assert key in ids[1:]
        assert text[offset + 6 :].startswith(orjson.dumps(key))
    compact = tmp_path / "compact.json"
    compact.write_bytes(orjson.dumps(doc))
    assert split_point(compact, 0.5) is None  # not the layout this package writes


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("document", [False, True])
def test_a_split_read_equals_the_one_process_read(tmp_path, doc, split, monkeypatch, fraction, document):
    monkeypatch.setattr(_split_read, "SHARE_TABLES_ONLY", fraction)
    monkeypatch.setattr(_split_read, "SHARE_WITH_DOCUMENT", fraction)
    path = write(tmp_path / "store.json", doc)
    got = pipeline.read_store(path, document=document)
    assert split, "the read was split"
    assert split[-1] is not None, "the helper sent its pieces"
    _, ids, rest, _, bounded = split[-1]
    assert bounded  # every integer of the helper's part fits in 64 bits
    assert 0 < len(ids) < len(doc["embryos"])
    assert ids == list(doc["embryos"])[-len(ids) :]  # the embryos after the cut, in file order
    assert rest["embryos"] == {}
    assert got.has_document is document
    assert_same(got, one_process(path, document))
    assert got.doc == doc


@pytest.mark.parametrize("where", ["mine", "theirs", "both"])
def test_a_document_with_integers_wider_than_64_bits_is_orjsons(tmp_path, doc, split, monkeypatch, where):
    # The document is decoded untyped (msgspec), which keeps such integers as
    # they are where orjson (and so every other read) gives floats: only parts
    # whose typed decode found none may come from it.
    monkeypatch.setattr(_split_read, "SHARE_WITH_DOCUMENT", 0.5)
    embryos = list(doc["embryos"].values())
    marked = {"mine": [embryos[0]], "theirs": [embryos[-1]], "both": [embryos[0], embryos[-1]]}[where]
    for embryo in marked:
        next(iter(embryo["snips"].values()))["measurements"]["area_um2"] = 123.456789
    path = write(tmp_path / "store.json", doc)
    path.write_bytes(path.read_bytes().replace(b"123.456789", b"1" + b"0" * 30))
    got = pipeline.read_store(path, document=True)
    assert got.doc == orjson.loads(path.read_bytes())
    for embryo in marked:
        got_embryo = got.doc["embryos"][next(k for k, v in doc["embryos"].items() if v is embryo)]
        wide = next(iter(got_embryo["snips"].values()))["measurements"]["area_um2"]
        assert isinstance(wide, float)
        assert wide == 1e30
    assert split
    assert split[-1] is not None
    assert split[-1][4] is (where == "mine")  # the helper saw the wide integer in its part
    assert_same(got, one_process(path, True))


def test_a_helper_that_fails_after_the_cut_leaves_the_document_to_orjson(tmp_path, doc, split, monkeypatch):
    # This process decoded the helper's part untyped; with no word from the
    # helper on its integers, that part cannot be trusted and is parsed again.
    monkeypatch.setattr(_split_read, "SHARE_WITH_DOCUMENT", 0.05)
    last = list(doc["embryos"].values())[-1]
    next(iter(last["snips"].values()))["measurements"]["area_um2"] = 123.456789
    path = write(tmp_path / "store.json", doc)
    path.write_bytes(path.read_bytes().replace(b"123.456789", b"1" + b"0" * 30))
    result = _split_read.Helper.result
    monkeypatch.setattr(_split_read.Helper, "result", lambda self: result(self) and None)
    got = pipeline.read_store(path, document=True)
    assert got.doc == orjson.loads(path.read_bytes())
    wide = next(iter(got.doc["embryos"][next(reversed(doc["embryos"]))]["snips"].values()))["measurements"]["area_um2"]
    assert isinstance(wide, float)
    assert_same(got, one_process(path, True))


def test_an_invalid_store_gives_the_one_process_errors(tmp_path, doc, split):
    embryos = list(doc["embryos"].values())
    first_snip = next(iter(embryos[0]["snips"].values()))
    first_snip["phenotype"]["value"] = "NOT_A_PHENOTYPE"
    embryos[-1]["death_frame"] = 3
    path = write(tmp_path / "store.json", doc)
    for document in (False, True):
        with pytest.raises(StoreFormatError) as helped:
            pipeline.read_store(path, document=document)
        with pytest.raises(StoreFormatError) as alone:
            one_process(path, document)
        assert helped.value.problems == alone.value.problems
        assert str(helped.value) == str(alone.value)
    assert len(split) == 2  # both reads were split, and fell back for the messages


def test_a_helper_that_fails_changes_nothing(tmp_path, doc, split, monkeypatch):
    path = write(tmp_path / "store.json", doc)
    # The helper is given an offset that is no embryo boundary: it sends None.
    monkeypatch.setattr(_jsonfile, "split_point", lambda p, share: (5, next(reversed(doc["embryos"]))))
    for document in (False, True):
        got = pipeline.read_store(path, document=document)
        assert split[-1] is None
        assert_same(got, one_process(path, document))


def test_a_cut_past_the_embryos_is_not_trusted(tmp_path, doc, split, monkeypatch):
    # The flags section follows the embryos; a cut there names no embryo.
    path = write(tmp_path / "store.json", doc)
    text = path.read_bytes()
    offset = text.index(b',\n    "video"', text.index(b'\n  "flags"'))
    monkeypatch.setattr(_jsonfile, "split_point", lambda p, share: (offset, "video"))
    for document in (False, True):
        assert_same(pipeline.read_store(path, document=document), one_process(path, document))


def test_a_script_without_a_main_guard_is_not_run_again(tmp_path, doc):
    # A multiprocessing child would import the caller's main script again;
    # the helper is a fresh interpreter that imports only the package.
    path = write(tmp_path / "store.json", doc)
    marks = tmp_path / "marks.txt"
    script = tmp_path / "script.py"
    script.write_text(
        "from pipeline import _jsonfile, _split_read, read_store\n"
        "_split_read.MIN_BYTES = 0\n"
        "_jsonfile.BLOCK = 2048\n"
        "result = _split_read.Helper.result\n"
        "_split_read.Helper.result = lambda self: print('helped', result(self) is not None) or None\n"
        f"open({str(marks)!r}, 'a').write('ran\\n')\n"
        f"print(read_store({str(path)!r}).counts()['snips'])\n"
    )
    root = Path(pipeline.__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, cwd=tmp_path,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    helped, snips = done.stdout.splitlines()
    assert helped == "helped True"  # the helper read its part (its result is then dropped)
    assert int(snips) == pipeline.read_store(path).counts()["snips"]
    assert marks.read_text() == "ran\n"


def test_finish_runs_the_callers_work_once_its_own_part_is_sound(tmp_path, doc, split):
    path = write(tmp_path / "store.json", doc)
    calls: list[str] = []
    with store.SplitRead.start(path, document=True) as started:
        got = started.finish(lambda: calls.append("meanwhile"))
    assert calls == ["meanwhile"]
    assert split[-1] is not None
    assert_same(got, one_process(path, True))
    # A problem in this process's part: the read falls back before the work.
    first = next(iter(doc["embryos"].values()))
    next(iter(first["snips"].values()))["phenotype"]["value"] = "NOT_A_PHENOTYPE"
    write(path, doc)
    with store.SplitRead.start(path, document=True) as started, pytest.raises(StoreFormatError):
        started.finish(lambda: calls.append("meanwhile"))
    assert calls == ["meanwhile"]


@pytest.mark.parametrize("document", [True, False])
@pytest.mark.parametrize("helper_done", [True, False])
def test_finish_takes_a_finished_helpers_part_before_the_callers_work(tmp_path, doc, split, monkeypatch, helper_done, document):
    # Unpickling the helper's part and the caller's work (a cluster's start)
    # both hold the interpreter lock: a part that is ready is taken first,
    # and a helper still at work is waited for after the caller's work.
    path = write(tmp_path / "store.json", doc)
    seen: list[bool] = []
    with store.SplitRead.start(path, document=document) as started:
        helper = started._helper
        if helper_done:
            deadline = time.monotonic() + 60
            while not helper.finished() and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            monkeypatch.setattr(helper, "finished", lambda: False)
        got = started.finish(lambda: seen.append(helper.received))
    assert seen == [helper_done]
    assert split[-1] is not None
    assert_same(got, one_process(path, document))


@pytest.mark.parametrize("where", [["--scheduler", "sync"], ["--dashboard-address", "none"]])
def test_the_assign_command_writes_the_same_store_with_a_helper(tmp_path, doc, split, where):
    # The default (an embedded cluster) opens its runtime while the helper
    # finishes; the store written is the one-process read's.
    from pipeline.cli import main

    rows = tmp_path / "rows.csv"
    ids = list(doc["embryos"])
    pd.DataFrame({
        "embryo_id": [ids[0], ids[-1], ids[len(ids) // 2], "20990101_A01_e01"],
        "phenotype": ["EDEMA", "BODY_AXIS", "DEAD", "EDEMA"],
        "frames": ["[0:3]", "last", "[5:]", "all"],
    }).to_csv(rows, index=False)
    written = []
    for name, helped in (("helped.json", True), ("alone.json", False)):
        path = write(tmp_path / name, doc)
        if not helped:
            _split_read.MIN_BYTES = 1 << 62
        code = main(["assign", str(path), str(rows), "--author", "tester", "--quiet", *where])
        assert code == 1  # the unknown embryo's row failed, the others applied
        saved = orjson.loads(path.read_bytes())
        saved["file_info"].pop("last_updated")
        written.append(orjson.dumps(saved).decode())
    assert len(split) == 1
    assert split[0] is not None
    stamp = r'"timestamp":"[^"]*"'
    assert re.sub(stamp, "", written[0]) == re.sub(stamp, "", written[1])
    assert '"BODY_AXIS"' in written[0]


def test_the_export_command_writes_the_same_table_with_a_helper(tmp_path, doc, split):
    from pipeline.cli import main

    path = write(tmp_path / "store.json", doc)
    outs = []
    for name, helped in (("helped", True), ("alone", False)):
        if not helped:
            _split_read.MIN_BYTES = 1 << 62
        out = tmp_path / name
        assert main(["export", str(path), str(out), "--quiet", "--dashboard-address", "none"]) == 0
        outs.append(pd.read_parquet(out).sort_index())
    assert len(split) == 1
    assert split[0] is not None
    pd.testing.assert_frame_equal(outs[0], outs[1])
    assert len(outs[0]) == pipeline.read_store(path).counts()["snips"]


def test_unusable_assignments_stop_a_split_read_before_any_cluster(tmp_path, doc, split, capsys):
    from pipeline.cli import main

    path = write(tmp_path / "store.json", doc)
    before = path.read_bytes()
    missing = tmp_path / "no-such-rows.csv"
    assert main(["assign", str(path), str(missing), "--author", "tester"]) == 2
    err = capsys.readouterr().err
    assert "no-such-rows.csv" in err
    assert "dashboard" not in err  # read before the runtime opens
    assert path.read_bytes() == before
    assert split == []  # the helper was stopped, its result never taken


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> list[_split_read.Helper]:
    """Every helper started (the real ones), in order."""
    started: list[_split_read.Helper] = []
    init = _split_read.Helper.__init__

    def record(self: _split_read.Helper, *args: Any) -> None:
        init(self, *args)
        started.append(self)

    monkeypatch.setattr(_split_read.Helper, "__init__", record)
    return started


@pytest.mark.parametrize("command", ["assign", "export"])
def test_the_command_line_starts_the_helper_first_and_takes_it_over(tmp_path, doc, split, helpers, command):
    from pipeline.cli import main

    path = write(tmp_path / "store.json", doc)
    rows = tmp_path / "rows.csv"
    alive = next(e for e, embryo in doc["embryos"].items() if embryo["death_frame"] is None)
    pd.DataFrame({"embryo_id": [alive], "phenotype": ["EDEMA"], "frames": ["[0:2]"]}).to_csv(rows, index=False)
    argv = [str(path), str(rows), "--author", "t"] if command == "assign" else [str(path), str(tmp_path / "out")]
    assert main([command, *argv, "--quiet", "--scheduler", "sync"]) == 0
    # One helper, started by main before the command ran, and its result taken.
    assert len(helpers) == 1
    assert split[-1] is not None
    assert helpers[0]._process.returncode == 0


def test_a_command_that_fails_first_stops_the_early_helper(tmp_path, doc, split, helpers, capsys):
    from pipeline.cli import main

    path = write(tmp_path / "store.json", doc)
    assert main(["export", str(path), str(tmp_path / "out"), "--npartitions", "0", "--quiet"]) == 2
    assert "--npartitions" in capsys.readouterr().err
    assert len(helpers) == 1
    assert helpers[0]._process.returncode is not None  # stopped (or done) and waited for
    assert split == []  # its result was never taken


def test_the_export_commands_early_read_keeps_the_document_when_the_export_needs_it(tmp_path, doc, split, helpers):
    # cli/export.py decides without importing pipeline.export: the same rule.
    import argparse
    import contextlib

    from pipeline import export
    from pipeline.cli import export as cli_export

    path = write(tmp_path / "store.json", doc)
    for what in export.WHAT:
        args = argparse.Namespace(store=str(path), what=what, scheduler="sync")
        with contextlib.ExitStack() as stack:
            cli_export._early_read(args, stack)
            early = getattr(args, "started_read", None)
            if what == "changes":
                assert early is None
            else:
                assert early[0] == export._needs_document(what)


def test_the_program_starts_the_helper_before_importing_pandas(tmp_path, doc):
    # The point of the early start: the helper's interpreter starts and
    # imports while the program imports pandas and Dask, not after.
    path = write(tmp_path / "store.json", doc)
    script = (
        "import sys\n"
        "from pipeline import _split_read\n"
        "_split_read.MIN_BYTES = 0\n"
        "init = _split_read.Helper.__init__\n"
        "def record(self, *args):\n"
        "    print('helper started; pandas imported:', 'pandas' in sys.modules, flush=True)\n"
        "    init(self, *args)\n"
        "_split_read.Helper.__init__ = record\n"
        "sys.argv = ['embryo-pipeline', *sys.argv[1:]]\n"
        "from pipeline.cli import main\n"
        "main()\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", script, "export", str(path), str(out), "--quiet", "--scheduler", "sync"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["helper started; pandas imported: False"]
    assert len(pd.read_parquet(out)) == pipeline.read_store(path).counts()["snips"]
