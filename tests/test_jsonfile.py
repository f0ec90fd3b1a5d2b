"""The block-at-a-time store reader gives exactly what a whole-file parse gives."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

import pipeline
from pipeline._atomic import atomic_write_bytes
from pipeline._jsonfile import (
    DUMP_OPTIONS,
    OtherLayout,
    _load_streamed,
    dump_chunks,
    load_json_file,
)
from pipeline.errors import StoreFormatError
from pipeline.testing import make_store

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module")
def store_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jsonfile") / "store.json"
    make_store(n_experiments=3, n_embryos=6, n_frames=12, seed=3).save(path, backups=0)
    return path


@pytest.mark.parametrize("block", [64, 1000, 4096, 1 << 20])
def test_streamed_equals_whole_parse(store_file: Path, block: int) -> None:
    whole = orjson.loads(store_file.read_bytes())
    streamed = _load_streamed(store_file, block)
    assert streamed == whole
    # Same key order at every level that matters for a byte-identical save.
    assert list(streamed) == list(whole)
    assert list(streamed["embryos"]) == list(whole["embryos"])
    assert orjson.dumps(streamed) == orjson.dumps(whole)


def test_small_blocks_are_used_by_load_json_file(store_file: Path) -> None:
    # A block smaller than the file takes the streamed path.
    assert load_json_file(store_file, block=512) == orjson.loads(store_file.read_bytes())


def test_read_store_gives_the_same_store_and_table(store_file: Path, tmp_path: Path) -> None:
    store = pipeline.read_store(store_file)
    assert store.doc == orjson.loads(store_file.read_bytes())
    # Saving what was read writes the same bytes back (but the save time).
    out = tmp_path / "again.json"
    store.save(out, backups=0)
    saved, original = orjson.loads(out.read_bytes()), orjson.loads(store_file.read_bytes())
    original["file_info"]["last_updated"] = saved["file_info"]["last_updated"]
    assert out.read_bytes() == orjson.dumps(original, option=DUMP_OPTIONS)


def test_an_embryo_larger_than_the_block(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    make_store(n_experiments=1, n_embryos=2, n_frames=60, seed=5).save(path, backups=0)
    assert _load_streamed(path, 256) == orjson.loads(path.read_bytes())


def test_empty_embryos_is_not_streamed(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    doc = orjson.loads(orjson.dumps(make_store(n_experiments=1, n_embryos=1, n_frames=2, seed=1).doc))
    doc["embryos"] = {}
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    with pytest.raises(OtherLayout):
        _load_streamed(path, 16)
    assert load_json_file(path, block=16) == doc


@pytest.mark.parametrize(
    "dump",
    [
        lambda doc: orjson.dumps(doc),  # minified
        lambda doc: (orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode().replace("\n  ", "\n    ")).encode(),
    ],
    ids=["minified", "four-space"],
)
def test_other_layouts_fall_back_to_one_parse(store_file: Path, tmp_path: Path, dump) -> None:
    doc = orjson.loads(store_file.read_bytes())
    path = tmp_path / "other.json"
    path.write_bytes(dump(doc))
    assert load_json_file(path, block=256) == doc


def test_embryos_key_nested_elsewhere_is_not_mistaken(tmp_path: Path) -> None:
    # "embryos" on a two-space line, but as a key of a nested object.
    text = b'{"meta": {\n  "embryos": {\n    "x": {}\n  }\n}, "embryos": {}}'
    path = tmp_path / "nested.json"
    path.write_bytes(text)
    with pytest.raises(OtherLayout):
        _load_streamed(path, 16)
    assert load_json_file(path, block=16) == orjson.loads(text)


def test_syntax_error_deep_in_the_embryos_reports_the_files_position(store_file: Path, tmp_path: Path) -> None:
    text = store_file.read_bytes()
    # Break a value far into the embryos object.
    at = text.index(b'"author"', len(text) * 2 // 3)
    broken = text[:at] + b'"author" "x",' + text[at + len(b'"author":') :]
    path = tmp_path / "broken.json"
    path.write_bytes(broken)
    with pytest.raises(orjson.JSONDecodeError) as whole:
        orjson.loads(broken)
    with pytest.raises(StoreFormatError) as err:
        pipeline.read_store(path)
    assert f"line {whole.value.lineno}, column {whole.value.colno}" in str(err.value)


def test_truncated_file_is_an_error(store_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.json"
    path.write_bytes(store_file.read_bytes()[: store_file.stat().st_size // 2])
    with pytest.raises(StoreFormatError, match="not valid JSON"):
        pipeline.read_store(path)


def test_shared_examples_read_the_same(tmp_path: Path) -> None:
    examples = sorted((SHARED / "examples").glob("*.json"))
    if not examples:
        pytest.skip("no shared examples next to the repository")
    for example in examples:
        copy = tmp_path / example.name
        shutil.copy(example, copy)
        assert load_json_file(copy, block=64) == orjson.loads(example.read_bytes()), example.name


# ------------------------------------------------------------------ writing
@pytest.mark.parametrize("per_chunk", [1, 2, 5, 1000])
def test_dump_chunks_join_to_the_whole_dump(store_file: Path, per_chunk: int) -> None:
    doc = orjson.loads(store_file.read_bytes())
    pieces = list(dump_chunks(doc, per_chunk=per_chunk))
    assert b"".join(pieces) == orjson.dumps(doc, option=DUMP_OPTIONS) == store_file.read_bytes()
    n_embryos = len(doc["embryos"])
    # The skeleton, the groups with commas between them, the tail.
    n_groups = -(-n_embryos // per_chunk)
    assert len(pieces) == 2 + 2 * n_groups - 1


@pytest.mark.parametrize(
    "doc",
    [
        {"file_info": {"schema_version": 1}, "embryos": {}, "flags": {}},
        {"experiments": {"20240101": {"videos": {}}}},  # legacy shape: no embryos
        [1, 2, {"embryos": {"a": 1}}],
        {"embryos": {"a": {"embryos": {"b": "\n  }"}}}, "z": "\n  \"embryos\": {}"},
    ],
    ids=["empty", "legacy", "not-an-object", "tricky-strings"],
)
def test_dump_chunks_other_shapes(doc: object) -> None:
    assert b"".join(dump_chunks(doc, per_chunk=1)) == orjson.dumps(doc, option=DUMP_OPTIONS)


def test_a_failing_piece_leaves_the_file_as_it_was(store_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "store.json"
    shutil.copy(store_file, target)
    before = target.read_bytes()

    def pieces():
        yield b"{\n"
        msg = "serialisation failed half way"
        raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="half way"):
        atomic_write_bytes(target, pieces(), backups=0)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.json"]


def test_save_writes_in_pieces_and_reads_back(store_file: Path, tmp_path: Path) -> None:
    store = pipeline.read_store(store_file)
    store.add_phenotype(next(iter(next(iter(store.embryos.values()))["snips"])), "NONE", author="t")
    out = tmp_path / "saved.json"
    store.save(out, backups=0)
    assert out.read_bytes() == store.to_bytes()
    assert pipeline.read_store(out).doc == store.doc


@pytest.mark.parametrize("block", [32, 200, 5000])
@pytest.mark.parametrize("after", ["flags", "long-string", "nothing"])
def test_what_follows_the_embryos(store_file: Path, tmp_path: Path, block: int, after: str) -> None:
    doc = orjson.loads(store_file.read_bytes())
    if after == "flags":
        # Many indent-4 members after "embryos" (the pieces must stop at its end).
        doc["flags"]["video"] = {f"20240101_A{i:02d}": [] for i in range(300)}
    elif after == "long-string":
        doc["zz"] = "x" * 20_000  # no member separators at all after "embryos"
    else:
        doc = {k: doc[k] for k in doc if k != "flags"}
        doc["embryos"] = doc.pop("embryos")  # "embryos" last
    path = tmp_path / "after.json"
    path.write_bytes(orjson.dumps(doc, option=DUMP_OPTIONS))
    streamed = _load_streamed(path, block)
    assert streamed == doc
    assert list(streamed) == list(doc)


# ----------------------------------------------------- the command's own process
def test_parse_file_can_freeze_what_it_parsed(store_file: Path) -> None:
    import gc

    from pipeline.store import _KEPT, _parse_file

    gc.unfreeze()
    try:
        doc = _parse_file(store_file, freeze=True)
        assert gc.get_freeze_count() > 0
        assert doc == orjson.loads(store_file.read_bytes())
        assert len(_KEPT) == 1
        assert _KEPT[0] is doc  # not freed when the command returns
    finally:
        gc.unfreeze()
        _KEPT.clear()
    assert _parse_file(store_file) == doc
    assert gc.get_freeze_count() == 0


def test_only_the_program_freezes_parsed_stores(store_file: Path) -> None:
    import subprocess
    import sys

    from pipeline import store
    from pipeline.cli import main

    # Called with arguments (from Python, tests, notebooks): never.
    assert main(["info", str(store_file)]) == 0
    assert store._FREEZE_PARSED is False
    # Run as the program: the store it reads is frozen and kept, and the
    # process ends with os._exit once the exit handlers ran (main never returns).
    code = (
        "import atexit, gc, sys; from pipeline.cli import main; from pipeline import store; "
        "atexit.register(lambda: print('exit handlers ran', store._FREEZE_PARSED, "
        "gc.get_freeze_count() > 0, len(store._KEPT))); "
        f"sys.argv = ['embryo-pipeline', 'info', {str(store_file)!r}]; main(); "
        "print('main returned')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "experiments" in done.stdout  # the command's own output was flushed
    assert done.stdout.strip().splitlines()[-1] == "exit handlers ran True True 1"
    assert "main returned" not in done.stdout


def test_the_program_exits_with_the_command_status(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1}')
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(bad)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "embryos" in done.stdout + done.stderr


def test_under_a_profiler_the_program_returns_normally(store_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    # os._exit would skip cProfile's own write of its statistics.
    stats = tmp_path / "profile.out"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "pipeline", "info", str(store_file)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert stats.stat().st_size > 0
