"""The append-only change log beside a store, and undo.

Every merged batch appends one JSON line to ``<store stem>.changes.jsonl``
beside the store: its ``batch_id``, kind, author, time, inputs and the exact
``before`` and ``after`` JSON of every value it changed (snip phenotypes,
embryo genotypes, ``death_frame`` and flag lists). The line is written and
fsynced *before* the store is replaced, so a crash can leave a logged batch
that never reached the store, never the opposite; a batch whose store write
failed is followed by an ``aborted`` line. :func:`undo` puts back the
``before`` values of exactly one batch, as a new batch of its own.

Checkpointed merges (``merge_into_store(..., checkpoint_every=N)``) write one
batch per checkpoint; each record also carries ``"checkpoint": {"run": KEY,
"partitions": [...], "npartitions": M}``, and once its store write returned a
``{"batch_id": ..., "kind": "saved"}`` line follows it. A re-run of the same
inputs reads :func:`run_checkpoints` to skip the partitions already committed.
``saved`` lines are markers, not batches: :func:`committed_batches` leaves them
out.

A measurement value that did not exist before (or after) a change is logged as
:data:`ABSENT_KEY` (the snip's ``measurements`` object lacked the key) or
:data:`ABSENT_OBJECT` (the snip had no ``measurements`` object at all), so that
an undo restores the file byte for byte.
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

__all__ = [
    "changelog_path",
    "append_record",
    "iter_records",
    "read_changelog",
    "new_batch_id",
    "committed_batches",
    "mark_saved",
    "batch_record",
    "mark_aborted",
    "in_effect",
    "run_checkpoints",
    "ABSENT_KEY",
    "ABSENT_OBJECT",
]

#: Kind of the marker line that follows a checkpoint batch once the store
#: file holding it was written (not a batch of its own).
SAVED = "saved"

#: Logged ``before``/``after`` of a measurement whose key was missing from the
#: snip's ``measurements`` object (measurement values are numbers or null, so
#: an object is never a value).
ABSENT_KEY: dict[str, str] = {"$absent": "key"}

#: Logged ``before``/``after`` of a measurement of a snip that had no
#: ``measurements`` object at all.
ABSENT_OBJECT: dict[str, str] = {"$absent": "object"}


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
    path = changelog_path(store_path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for piece in _line_pieces(record):
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


_ENTRIES_PER_PIECE = 4096


def _line_pieces(record: dict[str, Any]) -> Iterator[bytes]:
    """The record's line in pieces, so a batch of many changes is never one huge bytes object.

    Compact JSON has no whitespace, so ``[a,b]`` is ``"[" + "a" + "," + "b" +
    "]"``: the ``changes`` entries (see :func:`batch_record`) are serialised a
    group at a time and spliced into the record's own serialisation, byte for
    byte what one ``orjson.dumps`` gives.
    """
    options = orjson.OPT_SERIALIZE_NUMPY
    entries = record.get("changes")
    if not isinstance(entries, list) or len(entries) <= _ENTRIES_PER_PIECE:
        yield orjson.dumps(record, option=options | orjson.OPT_APPEND_NEWLINE)
        return
    skeleton = orjson.dumps({**record, "changes": []}, option=options | orjson.OPT_APPEND_NEWLINE)
    # A quote inside a string is escaped, so this can only be a key; if it
    # also names a nested key, write the line in one piece.
    mark = b'"changes":[]'
    if skeleton.count(mark) != 1:
        yield orjson.dumps(record, option=options | orjson.OPT_APPEND_NEWLINE)
        return
    at = skeleton.index(mark) + len(mark) - 1
    yield skeleton[:at]
    for start in range(0, len(entries), _ENTRIES_PER_PIECE):
        group = orjson.dumps(entries[start : start + _ENTRIES_PER_PIECE], option=options)
        yield (b"," if start else b"") + group[1:-1]
    yield skeleton[at:]


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
    """The batch records that reached the store (not aborted), oldest first.

    ``saved`` marker lines (see :func:`mark_saved`) are not batches and are
    left out.
    """
    records = list(iter_records(store_path))
    aborted = {r["batch_id"] for r in records if r.get("kind") == "aborted"}
    return [r for r in records if r.get("kind") not in ("aborted", SAVED) and r["batch_id"] not in aborted]


def batch_record(
    batch_id: str,
    kind: str,
    author: str,
    store_path: str | os.PathLike[str],
    inputs: dict[str, Any] | None,
    changes: list[list[Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The change-log record of one batch (the one shape every writer uses).

    Parameters
    ----------
    batch_id, kind, author : str
        The batch's id, kind (``phenotype``, ``flag``, ``undo``, ...) and author.
    store_path : path-like
        The store the batch changes.
    inputs : dict or None
        What produced the batch.
    changes : list
        ``[target, entity, field, before, after]`` entries.
    extra : dict, optional
        More keys (``checkpoint``, a measurement batch's ``values_timestamp``).

    Returns
    -------
    dict
        Ready for :func:`append_record`.
    """
    from pipeline.store import now

    return {
        "batch_id": batch_id, "kind": kind, "author": author, "timestamp": now(),
        "store": str(store_path), "inputs": inputs or {}, "changes": changes, **(extra or {}),
    }


def mark_aborted(store_path: str | os.PathLike[str], batch_id: str, author: str, reason: str | None = None) -> None:
    """Record that the logged batch *batch_id* never reached the store (and why, if known)."""
    from pipeline.store import now

    record = {"batch_id": batch_id, "kind": "aborted", "author": author, "timestamp": now()}
    append_record(store_path, record if reason is None else {**record, "reason": reason})


def mark_saved(store_path: str | os.PathLike[str], batch_id: str) -> None:
    """Record that the store file holding *batch_id* was written.

    Parameters
    ----------
    store_path : path-like
        The store whose log it is.
    batch_id : str
        A batch whose record is already in the log.

    Notes
    -----
    A batch's record is made durable *before* the store is replaced, so a
    process killed in between leaves a record whose values never reached the
    store. Checkpointed merges append this marker after the write returned: a
    checkpoint with its marker is certainly in the store; one without is
    checked against the store's values before a re-run skips its partitions.
    """
    from pipeline.store import now

    append_record(store_path, {"batch_id": batch_id, "kind": SAVED, "timestamp": now()})


def in_effect(records: list[dict[str, Any]]) -> set[str]:
    """The batch ids whose changes are in effect: committed and not undone.

    Parameters
    ----------
    records : list of dict
        Committed batch records, oldest first (:func:`committed_batches`).

    Returns
    -------
    set of str
        Every batch id except those undone by an undo that is itself in
        effect (undoing an undo puts its target back in effect).
    """
    state: dict[str, bool] = {}
    target: dict[str, str] = {}
    for rec in records:
        if rec.get("kind") == "undo":
            undone = (rec.get("inputs") or {}).get("undo_of")
            if isinstance(undone, str):
                target[rec["batch_id"]] = undone
    for rec in records:
        # An undo U of T: U in effect means T is not; U undone brings T back.
        bid, value, seen = rec["batch_id"], True, set()
        while bid is not None and bid not in seen:
            seen.add(bid)
            state[bid] = value
            bid, value = target.get(bid), not value
    return {b for b, on in state.items() if on}


def run_checkpoints(store_path: str | os.PathLike[str], run_key: str) -> list[tuple[dict[str, Any], bool]]:
    """The checkpoint batches of one run that are in effect, oldest first.

    Parameters
    ----------
    store_path : path-like
        The store.
    run_key : str
        The run (see :func:`pipeline.merge.merge_into_store`, ``run_key``).

    Returns
    -------
    list of (dict, bool)
        Each checkpoint record (its ``checkpoint`` entry names the partitions
        it covers) and whether a ``saved`` marker confirms it reached the store.
        Aborted and undone checkpoints are left out.
    """
    records = list(iter_records(store_path))
    saved = {r["batch_id"] for r in records if r.get("kind") == SAVED}
    batches = committed_batches(store_path)
    live = in_effect(batches)
    out = []
    for rec in batches:
        checkpoint = rec.get("checkpoint")
        if isinstance(checkpoint, dict) and checkpoint.get("run") == run_key and rec["batch_id"] in live:
            out.append((rec, rec["batch_id"] in saved))
    return out


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
