"""The append-only change log beside a store, and undo.

Every merged batch appends one JSON line to ``<store stem>.changes.jsonl``
beside the store: its ``batch_id``, kind, author, time, inputs and the exact
``before`` and ``after`` JSON of every value it changed (snip phenotypes,
embryo genotypes, ``death_frame`` and flag lists). The line is written and
fsynced *before* the store is replaced, so a crash can leave a logged batch
that never reached the store, never the opposite; a batch whose store write
failed is followed by an ``aborted`` line. :func:`undo` puts back the
``before`` values of exactly one batch, as a new batch of its own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from pipeline.errors import MergeConflictError, PipelineError

__all__ = ["changelog_path", "append_record", "iter_records", "read_changelog", "new_batch_id", "committed_batches"]


def changelog_path(store_path: str | os.PathLike[str]) -> Path:
    """The change log of the store at *store_path*."""
    path = Path(store_path)
    return path.with_name(f"{path.stem}.changes.jsonl")


def new_batch_id() -> str:
    """A fresh, sortable-enough batch id, e.g. ``b-20260105T100000-1a2b3c4d``."""
    from datetime import UTC, datetime

    return f"b-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def append_record(store_path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one record to the change log and make it durable.

    Parameters
    ----------
    store_path : path-like
        The store whose log it is.
    record : dict
        JSON-serialisable record (one line).
    """
    line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
    path = changelog_path(store_path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_records(store_path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield the records of the change log, oldest first (a torn last line is ignored)."""
    path = changelog_path(store_path)
    if not path.exists():
        return
    with path.open("rb") as handle:
        for line in handle:
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                # Only a crash mid-append can leave a partial last line.
                continue


def committed_batches(store_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The batch records that reached the store (not aborted), oldest first."""
    records = list(iter_records(store_path))
    aborted = {r["batch_id"] for r in records if r.get("kind") == "aborted"}
    return [r for r in records if r.get("kind") != "aborted" and r["batch_id"] not in aborted]


def read_changelog(store_path: str | os.PathLike[str]) -> pd.DataFrame:
    """The change log as a table: one row per changed value.

    Parameters
    ----------
    store_path : path-like
        The store.

    Returns
    -------
    pandas.DataFrame
        Columns ``batch_id``, ``kind``, ``author``, ``timestamp``, ``target``
        (``snip``, ``embryo``, ``store_flags``), ``entity_id``, ``field``,
        ``before`` and ``after`` (JSON text).
    """
    rows = []
    for rec in committed_batches(store_path):
        for target, entity, field, before, after in rec.get("changes", []):
            rows.append(
                (rec["batch_id"], rec["kind"], rec["author"], rec["timestamp"], target, entity, field,
                 orjson.dumps(before).decode(), orjson.dumps(after).decode())
            )
    columns = ["batch_id", "kind", "author", "timestamp", "target", "entity_id", "field", "before", "after"]
    return pd.DataFrame(rows, columns=columns).astype("string[pyarrow]")


def find_batch(store_path: str | os.PathLike[str], batch_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The record of *batch_id* and the committed batches after it.

    Raises
    ------
    PipelineError
        If no committed batch has that id.
    """
    batches = committed_batches(store_path)
    for i, rec in enumerate(batches):
        if rec["batch_id"] == batch_id:
            return rec, batches[i + 1 :]
    known = ", ".join(r["batch_id"] for r in batches[-5:]) or "none"
    msg = f"no committed batch {batch_id!r} in {str(changelog_path(store_path))!r}; latest batches: {known}"
    raise PipelineError(msg)


def later_conflicts(record: dict[str, Any], later: list[dict[str, Any]]) -> list[str]:
    """Entities that a later batch changed too (undo would clobber their work)."""
    mine = {(t, e, f) for t, e, f, _b, _a in record.get("changes", [])}
    hits = []
    for rec in later:
        for t, e, f, _b, _a in rec.get("changes", []):
            if (t, e, f) in mine:
                hits.append(f"{e} ({f}, batch {rec['batch_id']})")
    return hits


def conflict_error(batch_id: str, hits: list[str]) -> MergeConflictError:
    """The error for an undo that later batches would make lossy."""
    shown = "; ".join(hits[:10]) + (f"; and {len(hits) - 10} more" if len(hits) > 10 else "")
    msg = (
        f"cannot undo batch {batch_id}: later batches changed the same values ({shown}). "
        "Undo those batches first (newest first), or pass force=True (--force) to restore this "
        "batch's earlier values anyway, overwriting the later changes."
    )
    return MergeConflictError(msg)
