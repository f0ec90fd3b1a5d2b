"""Change-log lines are written in pieces, byte for byte what one dump gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from pipeline import changelog


def _record(n: int) -> dict:
    entries = [
        ["phenotype", f"20240101_A01_e01_s{i:04d}", "phenotype", {"value": "NONE", "author": 'a"b', "changes": []}, np.float64(i) / 3]
        for i in range(n)
    ]
    return {"batch_id": "b-1", "kind": "phenotype", "inputs": {"changes": "x"}, "changes": entries, "n": np.int64(n)}


@pytest.mark.parametrize("n", [0, 1, changelog._ENTRIES_PER_PIECE, changelog._ENTRIES_PER_PIECE + 1, 3 * changelog._ENTRIES_PER_PIECE + 7])
def test_pieces_join_to_one_dump(n: int) -> None:
    record = _record(n)
    whole = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
    pieces = list(changelog._line_pieces(record))
    assert b"".join(pieces) == whole
    if n > changelog._ENTRIES_PER_PIECE:
        assert len(pieces) > 2


def test_nested_entries_key_is_written_in_one_piece() -> None:
    record = _record(changelog._ENTRIES_PER_PIECE + 1)
    record["inputs"] = {"changes": []}
    pieces = list(changelog._line_pieces(record))
    assert len(pieces) == 1
    assert pieces[0] == orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)


def test_append_record_reads_back(tmp_path: Path) -> None:
    store = tmp_path / "s.json"
    first, second = _record(3), _record(2 * changelog._ENTRIES_PER_PIECE + 5)
    changelog.append_record(store, first)
    changelog.append_record(store, second)
    back = list(changelog.iter_records(store))
    assert back == orjson.loads(orjson.dumps([first, second], option=orjson.OPT_SERIALIZE_NUMPY))
    assert changelog.changelog_path(store).read_bytes().count(b"\n") == 2


def test_a_real_batch_record_is_written_in_pieces(tmp_path: Path) -> None:
    changes = _record(changelog._ENTRIES_PER_PIECE + 1)["changes"]
    record = changelog.batch_record("b-2", "phenotype", "me", tmp_path / "s.json", {"rows": "a.csv"}, changes)
    pieces = list(changelog._line_pieces(record))
    assert len(pieces) > 2
    assert b"".join(pieces) == orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
