"""Stage 5: merge change sets back into the JSON store, in safe, logged batches.

:func:`merge_into_store` computes a change set (phenotypes, genotypes, flags or
measurements; lazy or already computed) once, then, under the store's
cross-process lock: re-reads the file if another writer replaced it, checks
that every value it is about to replace is still the value the change set was
computed against, applies the changes, logs the exact before/after values of
the batch to the change log, and replaces the file atomically. Any failure
before the final rename restores the document in memory and leaves the file
byte-identical.

With ``checkpoint_every=N`` a long run commits the changes of every N
finished partitions as a batch of its own (a *checkpoint*), so a run killed
after hours loses at most N partitions of work; running it again with the same
inputs skips the partitions whose checkpoints are in the change log.

Notes: triggers computation.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dask.dataframe as dd
import numpy as np
import orjson
import pandas as pd

from pipeline import changelog, ids
from pipeline._arrow import release_unused_memory
from pipeline._atomic import LOCK_TIMEOUT
from pipeline._jsonschema import json_path
from pipeline._tables import TIMESTAMP_PATTERN
from pipeline.errors import MergeConflictError, StoreFormatError
from pipeline.schema import (
    FLAG_CHANGE_COLUMNS,
    GENOTYPE_CHANGE_COLUMNS,
    MEASUREMENT_CHANGE_COLUMNS,
    PHENOTYPE_CHANGE_COLUMNS,
    RESERVED_COLUMNS,
    STRING,
    empty_frame,
)
from pipeline.store import Store, _format_problems, now, paused_gc

__all__ = ["MergeReport", "merge_into_store", "merge_many", "undo", "kind_of", "run_key_of"]

_WRITE = ("assigned", "backfilled")


def kind_of(changes: pd.DataFrame | dd.DataFrame) -> str:
    """Tell which kind of change set *changes* is.

    Parameters
    ----------
    changes : pandas.DataFrame or dask.dataframe.DataFrame
        A change set.

    Returns
    -------
    str
        ``phenotype``, ``flag``, ``genotype`` or ``measurement``.

    Raises
    ------
    ValueError
        If the columns are those of no change set.
    """
    cols = set(changes.columns)
    if set(PHENOTYPE_CHANGE_COLUMNS) <= cols:
        return "phenotype"
    if set(FLAG_CHANGE_COLUMNS) <= cols:
        return "flag"
    if set(GENOTYPE_CHANGE_COLUMNS) <= cols:
        return "genotype"
    if set(MEASUREMENT_CHANGE_COLUMNS) <= cols:
        return "measurement"
    msg = (
        "not a change set: expected the columns of PHENOTYPE_CHANGE_COLUMNS, GENOTYPE_CHANGE_COLUMNS, "
        f"FLAG_CHANGE_COLUMNS or MEASUREMENT_CHANGE_COLUMNS (pipeline.schema), got {sorted(cols)}"
    )
    raise ValueError(msg)


@dataclass
class MergeReport:
    """What a merge did: counts per status, failed rows, overrides, the batch ids.

    Attributes
    ----------
    batch_id : str or None
        Id of the batch in the change log (None for a dry run or no change);
        for a checkpointed run, the last checkpoint that changed the store.
    kind : str
        ``phenotype``, ``genotype``, ``flag`` or ``measurement``.
    counts : dict of str to int
        Change-set rows per status (over every checkpoint of a run; rows of
        resumed partitions are not computed and not counted).
    n_written : int
        Values written to the store.
    overrides : int
        Writes superseded by a later row of the same batch.
    failed : pandas.DataFrame
        The failed rows with their reasons.
    changes : pandas.DataFrame
        The whole computed change set.
    dry_run : bool
        True when nothing was written.
    path : str or None
        The store file.
    notes : list of str
        What else happened (a re-read store, resumed partitions).
    batch_ids : list of str
        Every batch this call committed that changed the store, oldest first
        (one per checkpoint of a checkpointed run; undo each, newest first, to
        undo the run).
    resumed : int
        Checkpointed runs: partitions skipped because an earlier run of the
        same inputs had committed them.
    npartitions : int or None
        Checkpointed runs: partitions of the change set.
    run_key : str or None
        Checkpointed runs: the key the checkpoints are recorded under.
    """

    batch_id: str | None
    kind: str
    counts: dict[str, int]
    n_written: int
    overrides: int
    failed: pd.DataFrame
    changes: pd.DataFrame
    dry_run: bool = False
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    batch_ids: list[str] = field(default_factory=list)
    resumed: int = 0
    npartitions: int | None = None
    run_key: str | None = None

    @property
    def ok(self) -> bool:
        """True when no row failed or was skipped."""
        return not self.counts.get("failed") and not self.counts.get("skipped")

    @property
    def exit_code(self) -> int:
        """0 when every row applied, 1 when some failed or were skipped."""
        return 0 if self.ok else 1

    def summary(self) -> str:
        """A few readable lines."""
        verb = "would write" if self.dry_run else "wrote"
        if len(self.batch_ids) > 1:
            head = (
                f"{self.kind} run {self.run_key}: {verb} {self.n_written} value(s) in "
                f"{len(self.batch_ids)} checkpoint batches, {self.batch_ids[0]} .. {self.batch_id}"
            )
        else:
            label = self.batch_id or ("(dry run)" if self.dry_run else "(nothing to write)")
            head = f"{self.kind} batch {label}: {verb} {self.n_written} value(s)"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "no changes"
        lines = [head, f"  {counts}"]
        if self.overrides:
            lines.append(f"  {self.overrides} write(s) overridden by a later row of the batch")
        lines += [f"  {n}" for n in self.notes]
        if len(self.failed):
            lines.append(f"  failed rows ({len(self.failed)}):")
            for _, r in self.failed.head(20).iterrows():
                lines.append(f"    row {r.get('row', '-')}: {_where(r)}: {r['reason']}")
            if len(self.failed) > 20:
                lines.append(f"    ... and {len(self.failed) - 20} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<MergeReport {self.summary()}>"

    def _repr_html_(self) -> str:
        counts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(self.counts.items()))
        failed = self.failed.head(10).to_html(index=False) if len(self.failed) else "<p>no failed rows</p>"
        verb = "dry run" if self.dry_run else f"batch <code>{html.escape(str(self.batch_id))}</code>"
        return (
            f"<div><b>MergeReport</b> ({html.escape(self.kind)}, {verb}): "
            f"{self.n_written} value(s) {'would be ' if self.dry_run else ''}written, {self.overrides} override(s)"
            f"<table><tr><th>status</th><th>rows</th></tr>{counts}</table>{failed}</div>"
        )


def _where(row: pd.Series) -> str:
    """The entity a failed row is about, for the summary."""
    for key in ("entity_id", "snip_id", "embryo_id"):
        value = row.get(key)
        if value is not None and not pd.isna(value):
            return str(value)
    return ""


def _compute(changes: pd.DataFrame | dd.DataFrame, progress: Callable[[int, int], None] | None) -> pd.DataFrame:
    if isinstance(changes, pd.DataFrame):
        return changes
    from pipeline.cluster import compute

    # Distributed: progress per finished partition, in a "merge" span; local
    # schedulers: per finished task.
    table = compute(changes, progress=progress, stage="merge")
    # The tasks' Arrow temporaries are freed but kept by Arrow's allocator;
    # hand them back before the document grows with the batch's entries.
    release_unused_memory()
    return table


def _writes(kind: str, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a computed change set that write to the store."""
    if kind == "flag":
        return table.loc[table["status"] == "raised"]
    if kind == "measurement":
        return table.loc[table["status"] == "assigned"]
    return table.loc[table["status"].isin(_WRITE)]


def _make_report(kind: str, table: pd.DataFrame, store: Store, dry_run: bool) -> MergeReport:
    counts = {str(k): int(v) for k, v in table["status"].value_counts().items()}
    failed = table.loc[table["status"] == "failed"]
    failed = (failed.sort_values("row", kind="stable") if "row" in failed else failed).reset_index(drop=True)
    overrides = int(table["reason"].fillna("").str.startswith("overridden").sum())
    return MergeReport(
        batch_id=None, kind=kind, counts=counts, n_written=len(_writes(kind, table)), overrides=overrides,
        failed=failed, changes=table, dry_run=dry_run, path=str(store.path) if store.path else None,
    )


def _strict_error(failed: pd.DataFrame, committed: int = 0) -> MergeConflictError:
    msg = f"{len(failed)} detector failure(s) and strict=True: nothing written. First: {failed['reason'].iloc[0]}"
    if committed:
        msg = (
            f"{len(failed)} detector failure(s) and strict=True: the failing checkpoint was not written; the "
            f"{committed} checkpoint(s) committed before it stay, and re-running the same command resumes "
            f"after them. First: {failed['reason'].iloc[0]}"
        )
    return MergeConflictError(msg, failure_cases=failed.reset_index(drop=True))


def merge_into_store(
    store: Store,
    changes: pd.DataFrame | dd.DataFrame,
    *,
    dry_run: bool = False,
    replace_authors: Iterable[str] | None = None,
    strict: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    inputs: dict[str, Any] | None = None,
    checkpoint_every: int | None = None,
    run_key: str | None = None,
) -> MergeReport:
    """Write a change set back into the store in atomic, logged batches.

    Parameters
    ----------
    store : Store
        The store the change set was computed from.
    changes : pandas.DataFrame or dask.dataframe.DataFrame
        From :func:`pipeline.assign_phenotypes`, :func:`pipeline.assign_genotypes`,
        :func:`pipeline.run_detectors` or ``pipeline.to_changes(...,
        "measurement", column=...)``.
    dry_run : bool, default False
        Compute and report, write nothing.
    replace_authors : iterable of str, optional
        Flag change sets only: first clear the flags these authors (e.g.
        ``"auto:ShortTrack"``) raised earlier and that the change set does not
        raise again. Not with *checkpoint_every* (see Notes).
    strict : bool, default False
        Flag change sets only: refuse to write anything if a detector failed
        (with *checkpoint_every*: the failing checkpoint and what follows).
    lock_timeout : float, default LOCK_TIMEOUT
        Seconds to wait for another writer's lock.
    force : bool, default False
        Write even where the store changed since the change set was computed.
    progress : callable, optional
        ``progress(done, total)`` as partitions (or, on a local scheduler
        without checkpoints, tasks) complete.
    inputs : dict, optional
        What produced the batch (file names, options, content hashes),
        recorded in the log; with *checkpoint_every* it also identifies the
        run (see *run_key*).
    checkpoint_every : int, optional
        Commit the changes of every this many finished partitions as a batch
        of its own (a checkpoint) instead of one batch at the end. A re-run
        with the same inputs skips the partitions already committed.
    run_key : str, optional
        With *checkpoint_every*: the key checkpoints are recorded and found
        under. Default :func:`run_key_of` (kind, *inputs*, number of
        partitions), so the same command on the same files resumes.

    Returns
    -------
    MergeReport
        Counts per status, failed rows, overrides, ``batch_id`` and
        ``batch_ids``; for a checkpointed run also ``resumed``, ``npartitions``
        and ``run_key``.

    Raises
    ------
    MergeConflictError
        If values changed on disk since the change set was computed (another
        writer), a change names a snip the store lacks, or a detector failed
        with *strict*. Nothing of that batch is written.
    StoreLockedError
        If another writer holds the lock past *lock_timeout*.
    ValueError
        For a measurement change set naming a column the store cannot hold,
        or *checkpoint_every* without *inputs* or *run_key*, with
        *replace_authors*, or on a store not read from a file.

    Notes
    -----
    Triggers computation.

    **Checkpoints.** Each checkpoint is a normal batch (lock, stale check,
    apply, check the touched embryos, change-log record, atomic save) whose
    record also names the run and the partitions it covers; a checkpoint whose
    partitions changed nothing is recorded too (no store write), so a re-run
    does not compute them again. Partitions never split an embryo (they hold
    whole videos), so the checkpoints of a run touch disjoint snips, embryos,
    images and videos; only an experiment-level flag raised by several
    partitions is written by several checkpoints, the last committed one
    winning (on a distributed client, the order partitions finish in). With a
    distributed client every remaining partition is submitted
    at once and a checkpoint is committed each time *checkpoint_every* more
    have finished; on Dask's local schedulers groups of *checkpoint_every*
    partitions are computed one after the other (in parallel within a group).
    A re-run skips the partitions of the run's checkpoints that are in effect
    (committed, not aborted, not undone) and that reached the store (a
    ``saved`` marker, or else the store still holds their values), and
    computes the others against the store as it now is; ``resumed`` counts the
    skipped ones. ``replace_authors`` is refused with checkpoints: clearing
    a detector's old flags needs every partition's new flags first, and
    experiment-level and reducing detectors' flags do not belong to one
    partition, so a checkpoint cannot know what is safe to clear. Each
    checkpoint batch undoes on its own (:func:`undo`); undo a whole run by
    undoing ``batch_ids`` newest first. An undone checkpoint's partitions are
    computed again by the next re-run.

    **Measurements.** Rows with status ``assigned`` write ``new_value`` into
    ``snip["measurements"][column]`` (NaN writes null; the object is created
    when absent). ``old_value`` must equal the current value (NaN matches an
    absent key or null) unless *force*. The store holds no author for
    measurements: author and timestamp go to the change-log record only
    (``author``, ``values_timestamp``).
    """
    kind = kind_of(changes)
    replace = sorted(set(replace_authors or ()))
    if checkpoint_every is not None:
        return _merge_checkpointed(
            store, changes, kind, every=checkpoint_every, run_key=run_key, inputs=inputs, dry_run=dry_run,
            replace=replace, strict=strict, lock_timeout=lock_timeout, force=force, progress=progress,
        )
    table = _compute(changes, progress)
    report = _make_report(kind, table, store, dry_run)
    if kind == "flag" and strict and len(report.failed):
        raise _strict_error(report.failed)
    writes = _writes(kind, table)
    if kind == "measurement":
        _check_measurement_rows(writes)
    if dry_run or (len(writes) == 0 and not replace):
        return report
    batch_id, n_written = _write_batch(store, kind, writes, replace, force, inputs, lock_timeout, report.notes)
    if kind == "flag":
        report.n_written = n_written
    report.batch_id = batch_id
    report.batch_ids = [batch_id] if batch_id else []
    return report


def _write_batch(
    store: Store,
    kind: str,
    writes: pd.DataFrame,
    replace: list[str],
    force: bool,
    inputs: dict[str, Any] | None,
    lock_timeout: float,
    notes: list[str],
    checkpoint: dict[str, Any] | None = None,
) -> tuple[str | None, int]:
    """Apply one batch under the lock: its batch id (None if nothing changed) and values written."""
    with store.locked(lock_timeout):
        if store.changed_on_disk():
            store.reload()
            note = "the store was changed by another writer: re-read, and the batch applied on top"
            if note not in notes:
                notes.append(note)
        # Imported here, not at the top: shards uses this module's helpers.
        from pipeline import shards

        if isinstance(store, shards.ShardedStore):
            # Shard by shard, in tasks (on the workers when a client is
            # active): this process never holds the touched shards.
            extra = _record_extra(kind, writes, checkpoint)
            batch_id, n_entries = shards.apply_sharded(
                store, kind, writes, replace=replace, force=force, inputs=inputs, extra=extra
            )
            if batch_id is None:
                if checkpoint is not None and store.path is not None:
                    _record_empty(store, kind, writes, inputs, extra)
                return None, 0
            return batch_id, n_entries if kind == "flag" else len(writes)
        log: list[list[Any]] = []
        undo_ops: list[Callable[[], None]] = []
        try:
            # The writes build many small containers next to a document of
            # millions: collections would walk the document over and over
            # while nothing can be freed (as when parsing it).
            with paused_gc():
                if kind == "phenotype":
                    dead_touched, frames = _apply_phenotypes(store, writes, log, undo_ops, force)
                elif kind == "genotype":
                    _apply_genotypes(store, writes, log, undo_ops, force)
                elif kind == "measurement":
                    _apply_measurements(store, writes, log, undo_ops, force)
                else:
                    _apply_flags(store, writes, replace, log, undo_ops)
            n_written = len(log) if kind == "flag" else len(writes)
            store.invalidate()
            extra = _record_extra(kind, writes, checkpoint)
            if not log:
                if checkpoint is not None and store.path is not None:
                    # Nothing to write, but the partitions are done: record
                    # it so a re-run does not compute them again.
                    _record_empty(store, kind, writes, inputs, extra)
                return None, 0
            if kind == "phenotype":
                # Only phenotype entries and death_frame changed: check those
                # (the written entries and the DEAD invariants of the touched
                # embryos) instead of rebuilding the touched embryos' tables.
                _check_phenotype_batch(store, writes, dead_touched, frames)
            elif kind != "flag":
                # Flag entries were checked one by one as they were built
                # (vocabulary, severity, author, confidence): re-checking every
                # touched embryo would cost a table rebuild for nothing.
                store.check_embryos(_touched_embryos(log))
            batch_id = _commit(store, kind, writes, log, inputs, extra=extra)
        except BaseException:
            for op in reversed(undo_ops):
                op()
            store.invalidate()
            raise
    return batch_id, n_written


def _record_extra(kind: str, writes: pd.DataFrame, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if checkpoint is not None:
        extra["checkpoint"] = checkpoint
    if kind == "measurement" and len(writes):
        # Measurements carry no author or time in the store: the log keeps them.
        authors = sorted(set(writes["author"].dropna().astype(str)))
        stamps = sorted(set(writes["timestamp"].dropna().astype(str)))
        extra["author"] = ", ".join(authors)
        extra["values_timestamp"] = stamps[0] if len(stamps) == 1 else stamps
    return extra


def _record_empty(store: Store, kind: str, writes: pd.DataFrame, inputs: dict[str, Any] | None, extra: dict[str, Any]) -> None:
    author = str(writes["author"].iloc[0]) if len(writes) and "author" in writes else ""
    record = changelog.batch_record(changelog.new_batch_id(), kind, author, store.path, inputs, [], extra)
    changelog.append_record(store.path, record)


# ---------------------------------------------------------------- checkpoints
def run_key_of(kind: str, inputs: dict[str, Any], npartitions: int) -> str:
    """The key a checkpointed run is recorded under: same inputs, same key.

    Parameters
    ----------
    kind : str
        The change set's kind.
    inputs : dict
        What produced it (file names, options, content hashes); JSON-able
        values (others are taken by their ``str``).
    npartitions : int
        Partitions of the change set (checkpoints name partition indices).

    Returns
    -------
    str
        ``r-`` and 16 hex digits.

    Examples
    --------
    >>> run_key_of("phenotype", {"rows": "a.csv"}, 4) == run_key_of("phenotype", {"rows": "a.csv"}, 4)
    True
    >>> run_key_of("phenotype", {"rows": "a.csv"}, 4) == run_key_of("phenotype", {"rows": "a.csv"}, 5)
    False
    """
    payload = orjson.dumps(
        {"kind": kind, "inputs": inputs, "npartitions": int(npartitions)}, option=orjson.OPT_SORT_KEYS, default=str
    )
    return "r-" + hashlib.sha256(payload).hexdigest()[:16]


def _merge_checkpointed(
    store: Store,
    changes: pd.DataFrame | dd.DataFrame,
    kind: str,
    *,
    every: int,
    run_key: str | None,
    inputs: dict[str, Any] | None,
    dry_run: bool,
    replace: list[str],
    strict: bool,
    lock_timeout: float,
    force: bool,
    progress: Callable[[int, int], None] | None,
) -> MergeReport:
    if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
        msg = f"checkpoint_every must be a whole number of partitions, at least 1; got {every!r}"
        raise ValueError(msg)
    if replace:
        msg = (
            "replace_authors cannot be combined with checkpoint_every: clearing the flags a detector no longer "
            "raises needs the new flags of every partition first, and a checkpoint commits only some. Run the "
            "replacing merge without checkpoints (detect --replace without --checkpoint-every)"
        )
        raise ValueError(msg)
    if store.path is None:
        msg = "checkpoint_every needs a store read from a file: checkpoints are recorded in the change log beside it"
        raise ValueError(msg)
    if run_key is None and inputs is None:
        msg = (
            "checkpoint_every needs inputs= (what produced the change set: file names, options, content hashes) "
            "or run_key=, so that a re-run can tell its own checkpoints from other runs'"
        )
        raise ValueError(msg)
    lazy = isinstance(changes, dd.DataFrame)
    nparts = changes.npartitions if lazy else 1
    key = run_key or run_key_of(kind, inputs or {}, nparts)
    notes: list[str] = []
    done = _resumable(store, key, kind, nparts, notes, lock_timeout, dry_run)
    todo = [i for i in range(nparts) if i not in done]
    pieces: dict[int, pd.DataFrame] = {}
    batch_ids: list[str] = []
    n_written = 0
    committed = 0

    def commit(partitions: list[int], table: pd.DataFrame) -> None:
        nonlocal n_written, committed
        pieces[min(partitions)] = table
        if kind == "flag" and strict:
            failed = table.loc[table["status"] == "failed"]
            if len(failed):
                raise _strict_error(failed, committed)
        writes = _writes(kind, table)
        if kind == "measurement":
            _check_measurement_rows(writes)
        if dry_run:
            return
        checkpoint = {"run": key, "partitions": sorted(partitions), "npartitions": nparts}
        batch_id, n = _write_batch(store, kind, writes, [], force, inputs, lock_timeout, notes, checkpoint)
        n_written += n
        committed += 1
        if batch_id is not None:
            batch_ids.append(batch_id)

    try:
        if todo and not lazy:
            commit([0], changes)
        elif todo:
            from pipeline.cluster import get_client

            client = get_client()
            if client is None:
                _checkpoint_local(changes, todo, every, commit, progress)
            else:
                _checkpoint_distributed(client, changes, todo, every, commit, progress)
    except BaseException as err:
        if committed and not dry_run:
            # Whatever the error says, this run's earlier checkpoints are in
            # the store (e.g. a ClusterError's "nothing was written" is not).
            err.add_note(
                f"{committed} checkpoint(s) of run {key} were committed before this and stay in the store"
                + (f" (last batch {batch_ids[-1]})" if batch_ids else "")
                + "; run the same merge again to resume after them"
            )
        raise
    table = _concat([pieces[i] for i in sorted(pieces)], changes)
    report = _make_report(kind, table, store, dry_run)
    if kind == "flag" and not dry_run:
        report.n_written = n_written
    report.batch_ids = batch_ids
    report.batch_id = batch_ids[-1] if batch_ids else None
    report.resumed, report.npartitions, report.run_key = len(done), nparts, key
    if done:
        notes.append(
            f"resumed: {len(done)} of {nparts} partition(s) were committed by an earlier run of these inputs "
            f"(run {key}) and were skipped; {len(todo)} computed now"
        )
    if len(batch_ids) > 1:
        notes.append(f"{len(batch_ids)} checkpoint batches: undo them newest first to undo the run")
    report.notes = notes
    return report


def _concat(tables: list[pd.DataFrame], changes: pd.DataFrame | dd.DataFrame) -> pd.DataFrame:
    if not tables:
        meta = changes._meta if isinstance(changes, dd.DataFrame) else changes.iloc[:0]
        return meta.copy()
    if len(tables) == 1:
        return tables[0]
    return pd.concat(tables, ignore_index=True)


def _resumable(
    store: Store, key: str, kind: str, nparts: int, notes: list[str], lock_timeout: float, dry_run: bool
) -> set[int]:
    """Partitions an earlier run under *key* committed and the store holds."""
    done: set[int] = set()
    ignored = 0
    # Under the lock: a checkpoint another process is committing right now is
    # judged only once its store write is done.
    with store.locked(lock_timeout):
        if store.changed_on_disk():
            store.reload()
        candidates = []
        for record, saved in changelog.run_checkpoints(store.path, key):
            checkpoint = record["checkpoint"]
            if record.get("kind") != kind or checkpoint.get("npartitions") != nparts:
                ignored += 1
                continue
            candidates.append((record, saved))
        # Without the "saved" marker the process may have died between the
        # log line and the store write: trust the store's values.
        judged = iter(_judge(store, [r.get("changes", []) for r, saved in candidates if not saved]))
        for record, saved in candidates:
            checkpoint = record["checkpoint"]
            has_after, has_before = (True, True) if saved else next(judged)
            if saved or has_after:
                done.update(int(i) for i in checkpoint.get("partitions", []) if 0 <= int(i) < nparts)
            elif not dry_run and has_before:
                # Logged, never written: say so in the log, so that neither
                # undo nor read_changelog takes it for a batch of the store.
                changelog.mark_aborted(
                    store.path, record["batch_id"], record.get("author", ""),
                    reason="checkpoint logged but its store write never happened (killed?)",
                )
    if ignored:
        notes.append(
            f"{ignored} checkpoint(s) of run {key} were for another kind or number of partitions and were not "
            "resumed; their partitions were computed again"
        )
    return done


def _judge(store: Store, batches: list[list[list[Any]]]) -> list[tuple[bool, bool]]:
    """Per batch: whether the store holds every ``after`` value, and every ``before`` value.

    A sharded store is read shard by shard (:func:`pipeline.shards.holds_sharded`,
    on the workers when a client is active), never loading the shards here.
    """
    if not batches:
        return []
    from pipeline import shards

    if isinstance(store, shards.ShardedStore):
        return shards.holds_sharded(store, batches)
    return [(_holds(store, c, after=True), _holds(store, c, after=False)) for c in batches]


def _holds(store: Store, changes: list[list[Any]], *, after: bool) -> bool:
    """Whether the store holds every ``after`` (or every ``before``) value of a batch's changes."""
    for target, entity, fieldname, before, new in changes:
        try:
            if _current_value(store, target, entity, fieldname) != (new if after else before):
                return False
        except (KeyError, ValueError):
            return False
    return True


def _current_value(store: Store, target: str, entity: str, fieldname: str) -> Any:
    if target == "snip":
        snip = store.embryos[ids.parse_snip_id(entity).embryo_id]["snips"][entity]
        if fieldname.startswith("measurements."):
            return _get_measurement(snip, fieldname.split(".", 1)[1])
        return snip[fieldname]
    if target == "embryo":
        return store.embryos[entity][fieldname]
    level, name = entity.split(":", 1)
    owner, key, existed = _flag_owner(store, level, name)
    return owner[key] if existed else None


def _group_progress(
    progress: Callable[[int, int], None] | None, base: int, size: int, total: int
) -> Callable[[int, int], None] | None:
    """Task progress within a group of *size* partitions, as partitions of the run."""
    if progress is None:
        return None

    def report(done: int, tasks: int) -> None:
        progress(base + (done * size) // max(tasks, 1), total)

    return report


def _checkpoint_local(
    changes: dd.DataFrame,
    todo: list[int],
    every: int,
    commit: Callable[[list[int], pd.DataFrame], None],
    progress: Callable[[int, int], None] | None,
) -> None:
    """Groups of *every* partitions, one after the other, each computed in parallel."""
    from pipeline.cluster import compute

    total = len(todo)
    for start in range(0, total, every):
        group = todo[start : start + every]
        table = compute(changes.partitions[group], progress=_group_progress(progress, start, len(group), total))
        commit(group, table)
        if progress is not None:
            progress(start + len(group), total)


def _checkpoint_distributed(
    client: Any,
    changes: dd.DataFrame,
    todo: list[int],
    every: int,
    commit: Callable[[list[int], pd.DataFrame], None],
    progress: Callable[[int, int], None] | None,
) -> None:
    """Every partition submitted at once; a checkpoint each time *every* more finished."""
    from distributed import as_completed

    from pipeline.cluster import _cluster_failures, _span

    parts = changes.to_delayed(optimize_graph=True)
    total = len(todo)
    with _span("merge"), _cluster_failures():
        futures = client.compute([parts[i] for i in todo])
        index = {f.key: i for f, i in zip(futures, todo, strict=True)}
        try:
            if progress is not None:
                progress(0, total)
            finished: dict[int, pd.DataFrame] = {}
            for done, future in enumerate(as_completed(futures), start=1):
                finished[index[future.key]] = future.result()
                future.release()
                if progress is not None:
                    progress(done, total)
                if len(finished) >= every or done == total:
                    order = sorted(finished)
                    commit(order, _concat([finished[i] for i in order], changes))
                    finished = {}
        except BaseException:
            client.cancel(futures)
            raise


def merge_many(
    store: Store,
    change_sets: Iterable[pd.DataFrame | dd.DataFrame],
    *,
    dry_run: bool = False,
    kind: str | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    force: bool = False,
    inputs: dict[str, Any] | None = None,
) -> MergeReport:
    """Write several phenotype and genotype change sets as ONE atomic, logged batch.

    The same write as :func:`merge_into_store`, for a batch that changes both
    snip phenotypes and embryo genotypes (a spreadsheet import): one lock, one
    change-log record with one ``batch_id`` (so one :func:`undo` restores
    everything), one atomic replace of the file, and on any failure nothing
    written and the document restored in memory.

    Parameters
    ----------
    store : Store
        The store the change sets were computed from.
    change_sets : iterable of pandas.DataFrame or dask.dataframe.DataFrame
        Phenotype change sets (:func:`pipeline.assign_phenotypes`) and genotype
        change sets (:func:`pipeline.assign_genotypes`); lazy ones are computed
        together, once.
    dry_run : bool, default False
        Compute and report, write nothing.
    kind : str, optional
        The kind recorded in the report and the change log, e.g. ``"import"``;
        default the change sets' kind when they are all of one kind, else ``"mixed"``.
    lock_timeout : float, default LOCK_TIMEOUT
        Seconds to wait for another writer's lock.
    force : bool, default False
        Write even where the store changed since the change sets were computed.
    inputs : dict, optional
        What produced the batch (file names, options), recorded in the log.

    Returns
    -------
    MergeReport
        Counts per status over all change sets; ``changes`` and ``failed`` hold
        the rows of every change set with a ``kind`` column (``phenotype`` or
        ``genotype``) and the union of their columns.

    Raises
    ------
    MergeConflictError
        If values changed on disk since the change sets were computed. Nothing
        is written.
    StoreLockedError
        If another writer holds the lock past *lock_timeout*.
    ValueError
        If a change set is a flag change set (use :func:`merge_into_store`).

    Notes
    -----
    Triggers computation. On a sharded store the batch is applied shard by
    shard (:func:`pipeline.shards.merge_many_sharded`, on the workers when a
    client is active), never loading the touched shards in this process,
    with the same result and change-log record.
    """
    sets = list(change_sets)
    kinds = [kind_of(c) for c in sets]
    if "flag" in kinds or "measurement" in kinds:
        msg = "merge_many takes phenotype and genotype change sets; merge flag and measurement change sets with merge_into_store()"
        raise ValueError(msg)
    lazy = [i for i, c in enumerate(sets) if isinstance(c, dd.DataFrame)]
    if lazy:
        import dask

        # One compute for every lazy change set, so shared inputs run once.
        for i, table in zip(lazy, dask.compute(*(sets[i] for i in lazy)), strict=True):
            sets[i] = table
    tables: list[pd.DataFrame] = sets
    label = kind or (kinds[0] if len(set(kinds)) == 1 else "mixed")
    combined = _combine(tables, kinds)
    counts = {str(k): int(v) for k, v in combined["status"].value_counts().items()}
    failed = combined.loc[combined["status"] == "failed"]
    failed = failed.sort_values("row", kind="stable").reset_index(drop=True)
    overrides = int(combined["reason"].fillna("").str.startswith("overridden").sum())
    writes = [t.loc[t["status"].isin(_WRITE)] for t in tables]
    report = MergeReport(
        batch_id=None, kind=label, counts=counts, n_written=sum(len(w) for w in writes), overrides=overrides,
        failed=failed, changes=combined, dry_run=dry_run, path=str(store.path) if store.path else None,
    )
    if dry_run or report.n_written == 0:
        return report
    with store.locked(lock_timeout):
        if store.changed_on_disk():
            store.reload()
            report.notes.append("the store was changed by another writer: re-read, and the batch applied on top")
        from pipeline import shards

        if isinstance(store, shards.ShardedStore):
            # One batch, shard by shard (on the workers when a client is
            # active): this process never holds the touched shards.
            batch_id, _n = shards.merge_many_sharded(
                store, list(zip(kinds, writes, strict=True)), kind=label, force=force, inputs=inputs
            )
            if batch_id is not None:
                report.batch_id, report.batch_ids = batch_id, [batch_id]
            return report
        log: list[list[Any]] = []
        undo_ops: list[Callable[[], None]] = []
        try:
            dead_rules: set[str] = set()
            rebuilt: set[str] = set()
            frames_of: dict[int, np.ndarray] = {}
            for i, (k, w) in enumerate(zip(kinds, writes, strict=True)):
                if not len(w):
                    continue
                start = len(log)
                if k == "phenotype":
                    touched_dead, frames_of[i] = _apply_phenotypes(store, w, log, undo_ops, force)
                    dead_rules |= touched_dead
                else:
                    _apply_genotypes(store, w, log, undo_ops, force)
                    rebuilt.update(_touched_embryos(log[start:]))
            if not log:
                store.invalidate()
                return report
            store.invalidate()
            # Phenotype sets: their entries and the DEAD rules of their embryos
            # (as merge_into_store); genotype changes: the full embryo check.
            for i, (k, w) in enumerate(zip(kinds, writes, strict=True)):
                if k == "phenotype" and len(w):
                    _check_phenotype_batch(store, w, dead_rules, frames_of[i])
                    dead_rules = set()
            if rebuilt:
                store.check_embryos(rebuilt)
            first = next(w for w in writes if len(w))
            report.batch_id = _commit(store, label, first, log, inputs)
            report.batch_ids = [report.batch_id]
        except BaseException:
            for op in reversed(undo_ops):
                op()
            store.invalidate()
            raise
    return report


def _combine(tables: list[pd.DataFrame], kinds: list[str]) -> pd.DataFrame:
    """Stack change sets of different kinds: a ``kind`` column, the union of columns."""
    columns = {"kind": STRING}
    for k in dict.fromkeys(kinds):
        columns.update(PHENOTYPE_CHANGE_COLUMNS if k == "phenotype" else GENOTYPE_CHANGE_COLUMNS)
    if "confirmed" in columns and "phenotype" in kinds:
        columns["confirmed"] = "boolean"  # missing on phenotype rows
    pieces = [t.assign(kind=k) for t, k in zip(tables, kinds, strict=True) if len(t)]
    if not pieces:
        return empty_frame(columns)
    out = pd.concat(pieces, ignore_index=True).reindex(columns=list(columns))
    return out.astype(columns)

def _commit(
    store: Store,
    kind: str,
    writes: pd.DataFrame,
    log: list[list[Any]],
    inputs: dict[str, Any] | None,
    *,
    extra: dict[str, Any] | None = None,
) -> str:
    """Log the batch, then save the store (an ``aborted`` line if the save fails).

    *extra* adds keys to the record (``checkpoint``, a measurement batch's
    ``author`` and ``values_timestamp``); a checkpoint's record is followed by
    a ``saved`` marker once the store write returned.
    """
    batch_id = changelog.new_batch_id()
    if store.path is None:
        return batch_id
    author = str(writes["author"].iloc[0]) if len(writes) and "author" in writes else ""
    record = changelog.batch_record(batch_id, kind, author, store.path, inputs, log, extra)
    author = record["author"]
    changelog.append_record(store.path, record)
    try:
        store.save(_locked=True, force=True, _checked=True)
    except BaseException:
        # A sharded store whose journal is durable completes the batch when
        # opened: it is not aborted (sharded batches normally go through
        # pipeline.shards, which knows this too).
        if not _completes_on_open(store):
            changelog.mark_aborted(store.path, batch_id, author)
        raise
    if extra and "checkpoint" in extra:
        # The batch is in the store now: a marker that cannot be written only
        # makes a re-run check the store's values instead of trusting it.
        with contextlib.suppress(OSError):
            changelog.mark_saved(store.path, batch_id)
    return batch_id


def _touched_embryos(log: list[list[Any]]) -> set[str]:
    """Embryos whose JSON a batch changed: only those need re-checking."""
    # Logged snips exist in the store, whose snip ids are checked to be
    # "{embryo_id}_{s|t|}NNNN": the embryo id is everything before the last "_".
    touched = set()
    for target, entity, *_ in log:
        if target == "snip":
            touched.add(entity.rpartition("_")[0])
        elif target == "embryo":
            touched.add(entity)
        elif entity.startswith(("snip:", "embryo:")):
            level, name = entity.split(":", 1)
            touched.add(name.rpartition("_")[0] if level == "snip" else name)
    return touched


def _check_phenotype_batch(
    store: Store, writes: pd.DataFrame, embryo_ids: set[str], frames: np.ndarray | None = None
) -> None:
    """Check what a phenotype batch changed: its entries and the DEAD rules of its embryos.

    Every snip of the embryos in *embryo_ids* is checked against its embryo's
    death frame. With *frames* (the written snips' frames, from
    :func:`_apply_phenotypes`), the written snips of the other embryos are
    checked too, over whole arrays: in an embryo whose DEAD snips the batch
    left alone, only a written snip can break the rule.

    Raises
    ------
    StoreFormatError
        Listing every problem with its JSON path; the caller restores the
        document and writes nothing.
    """
    problems: list[tuple[str, str]] = []
    permitted = set(store.vocabulary["phenotypes"])

    def where(i: int, key: str) -> str:
        return json_path("embryos", writes["embryo_id"].iat[i], "snips", writes["snip_id"].iat[i], "phenotype", key)

    values = writes["new_value"]
    for i in np.flatnonzero(~values.isin(permitted).to_numpy(dtype=bool, na_value=False)):
        problems.append((where(i, "value"), f"unknown phenotype {values.iat[i]!r}; permitted: {', '.join(sorted(permitted))}"))
    blank = writes["author"].fillna("").str.strip().str.len().to_numpy() == 0
    for i in np.flatnonzero(blank):
        problems.append((where(i, "author"), "author must be a non-empty name"))
    stamps = writes["timestamp"].astype(STRING)
    bad_stamp = ~stamps.str.match(TIMESTAMP_PATTERN).to_numpy(dtype=bool, na_value=False)
    for i in np.flatnonzero(bad_stamp):
        problems.append((where(i, "timestamp"), f"timestamp {stamps.iat[i]!r} is not ISO 8601 with a UTC offset"))
    conf = writes["confidence"].to_numpy(dtype=np.float64)
    for i in np.flatnonzero((conf < 0) | (conf > 1)):
        problems.append((where(i, "confidence"), f"confidence must be within [0, 1], found {conf[i]}"))
    embryos = store.embryos
    if frames is not None and len(writes):
        codes, uniques = pd.factorize(writes["embryo_id"])
        never = np.iinfo(np.int64).max
        deaths = np.array(
            [never if e in embryo_ids or embryos[e]["death_frame"] is None else embryos[e]["death_frame"] for e in uniques],
            dtype=np.int64,
        )
        after = (frames > deaths[codes]) & (values != "DEAD").to_numpy(dtype=bool, na_value=True)
        for i in np.flatnonzero(after):
            death = deaths[codes[i]]
            problems.append((
                where(i, "value"),
                f"{values.iat[i]!r} after death at frame {death}: DEAD is permanent and must fill forward",
            ))
    for eid in sorted(embryo_ids):
        embryo = embryos[eid]
        death = embryo["death_frame"]
        if death is None:
            continue
        for sid, snip in embryo["snips"].items():
            value = snip["phenotype"]["value"]
            if value != "DEAD" and _frame_of(sid, snip) > death:
                problems.append((
                    json_path("embryos", eid, "snips", sid, "phenotype", "value"),
                    f"{value!r} after death at frame {death}: DEAD is permanent and must fill forward",
                ))
    if problems:
        where_ = str(store.path) if store.path else "store"
        raise StoreFormatError(_format_problems(problems, where_), problems=problems, path=where_)


def _apply_phenotypes(
    store: Store, writes: pd.DataFrame, log: list[list[Any]], undo_ops: list[Callable[[], None]], force: bool
) -> tuple[set[str], np.ndarray]:
    """Write a phenotype change set into the document; see :func:`_write_batch`.

    Returns
    -------
    set of str, numpy.ndarray
        The embryos whose DEAD snips the batch touched (a DEAD value written
        or overwritten: their ``death_frame`` was recomputed and all their
        snips need the DEAD check), and the frame of each written snip (for
        :func:`_check_phenotype_batch`).
    """
    sids = writes["snip_id"].to_numpy(dtype=object)
    emb = writes["embryo_id"].to_numpy(dtype=object)
    embryos = store.embryos
    # Look each snip up in the document itself: this works the same for a
    # single file and for the shards of a sharded store (only touched shards load).
    try:
        snip_objs = [embryos[e]["snips"][s] for e, s in zip(emb, sids, strict=True)]
    except KeyError as err:
        msg = f"the change set names {err} which is not in the store; was it computed from another store?"
        raise MergeConflictError(msg) from None
    current = np.array([s["phenotype"]["value"] for s in snip_objs], dtype=object)
    if not force:
        stale = current != writes["old_value"].to_numpy(dtype=object)
        if stale.any():
            bad = writes.loc[stale, ["snip_id", "old_value"]].assign(now=current[stale])
            msg = (
                f"{int(stale.sum())} snip(s) changed since the change set was computed (another writer?), "
                f"e.g. {bad['snip_id'].iloc[0]}: expected {bad['old_value'].iloc[0]!r}, found {bad['now'].iloc[0]!r}. "
                "Nothing was written; recompute the change set from the store as it is now."
            )
            raise MergeConflictError(msg, failure_cases=bad)
    values, authors, stamps, notes = (_shared_objects(writes[c]) for c in ("new_value", "author", "timestamp", "notes"))
    confs = writes["confidence"].to_numpy(dtype=np.float64)
    has_conf = ~np.isnan(confs)
    has_notes = pd.notna(writes["notes"]).to_numpy()
    # Writing JSON objects is a loop over changed snips (the store is a dict),
    # kept to comprehensions; one undo step restores them all.
    entries = [{"value": v, "author": a, "timestamp": t} for v, a, t in zip(values, authors, stamps, strict=True)]
    for i in np.flatnonzero(has_conf).tolist():
        entries[i]["confidence"] = float(confs[i])
    for i in np.flatnonzero(has_notes).tolist():
        entries[i]["notes"] = notes[i]
    befores = [snip["phenotype"] for snip in snip_objs]

    def restore() -> None:
        for snip, before in zip(snip_objs, befores, strict=True):
            snip["phenotype"] = before

    undo_ops.append(restore)
    for snip, entry in zip(snip_objs, entries, strict=True):
        snip["phenotype"] = entry
    log.extend(["snip", sid, "phenotype", before, entry] for sid, before, entry in zip(sids, befores, entries, strict=True))
    frames = np.array(
        [f if (f := snip.get("frame")) is not None else _frame_of(sid, snip) for sid, snip in zip(sids, snip_objs, strict=True)],
        dtype=np.int64,
    )
    # death_frame is a cache of the DEAD snips: recompute it for the embryos
    # where a DEAD value was written or overwritten (no other can change).
    dead_touched = set(pd.unique(emb[(values == "DEAD") | (current == "DEAD")]).tolist())
    for eid in (e for e in pd.unique(emb).tolist() if e in dead_touched):  # in order of the writes
        embryo = embryos[eid]
        dead = [_frame_of(sid, s) for sid, s in embryo["snips"].items() if s["phenotype"]["value"] == "DEAD"]
        new_death = min(dead) if dead else None
        if embryo["death_frame"] != new_death:
            before = embryo["death_frame"]
            embryo["death_frame"] = new_death
            log.append(["embryo", eid, "death_frame", before, new_death])
            undo_ops.append(lambda embryo=embryo, before=before: embryo.__setitem__("death_frame", before))
    return dead_touched, frames


def _shared_objects(column: pd.Series) -> np.ndarray:
    """A column as Python objects, one object per distinct value (None for missing).

    Values, authors and timestamps repeat across a batch: the entries written
    into the document share a handful of strings instead of holding a copy
    each (about 55 MB fewer for 300k entries), and it is faster than
    ``to_numpy(dtype=object)``.
    """
    codes, uniques = pd.factorize(column)
    lookup = np.empty(len(uniques) + 1, dtype=object)
    lookup[:-1] = np.asarray(uniques, dtype=object)
    lookup[-1] = None  # code -1: missing
    return lookup[codes]


def _frame_of(snip_id: str, snip: dict[str, Any]) -> int:
    frame = snip.get("frame")
    return ids.parse_snip_id(snip_id).frame if frame is None else frame


def _apply_genotypes(store: Store, writes: pd.DataFrame, log: list[list[Any]], undo_ops: list[Callable[[], None]], force: bool) -> None:
    for _, r in writes.iterrows():
        embryo = store.embryos[r["embryo_id"]]
        before = embryo["genotype"]
        if not force and (before["value"] if before else None) != (None if pd.isna(r["old_value"]) else r["old_value"]):
            msg = f"embryo {r['embryo_id']} changed since the change set was computed: expected genotype {r['old_value']!r}, found {before and before['value']!r}; nothing was written"
            raise MergeConflictError(msg)
        entry: dict[str, Any] = {"value": r["new_value"], "author": r["author"], "timestamp": r["timestamp"], "confirmed": bool(r["confirmed"])}
        for key in ("allele", "zygosity"):
            if pd.notna(r[key]):
                entry[key] = r[key]
        if pd.notna(r["confidence"]):
            entry["confidence"] = float(r["confidence"])
        if pd.notna(r["notes"]):
            entry["notes"] = r["notes"]
        embryo["genotype"] = entry
        log.append(["embryo", r["embryo_id"], "genotype", before, entry])
        undo_ops.append(lambda embryo=embryo, before=before: embryo.__setitem__("genotype", before))


def _check_measurement_rows(writes: pd.DataFrame) -> None:
    """Refuse measurement rows the store cannot hold, saying what, where and how to fix."""
    if not len(writes):
        return
    columns = writes["column"].astype(object)
    for col in pd.unique(columns):
        same = columns.isna() if col is None or col is pd.NA else (columns == col).fillna(False)
        rows = writes.loc[same.to_numpy(dtype=bool)]
        where = f"{len(rows)} row(s) of the change set, e.g. snip {rows['snip_id'].iloc[0]}"
        if not isinstance(col, str) or not col.strip():
            msg = (
                f"measurement column {col!r} ({where}) is not a valid measurement key: it must be a non-empty, "
                "non-blank name; nothing was written. Pass e.g. to_changes(..., column='area_um2')"
            )
            raise ValueError(msg)
        if col in RESERVED_COLUMNS:
            msg = (
                f"measurement column {col!r} ({where}) collides with the snip table's own column {col!r} "
                f"(pipeline.schema.RESERVED_COLUMNS); nothing was written. Rename it, e.g. "
                f"to_changes(..., column={col + '_measured'!r})"
            )
            raise ValueError(msg)
    new = writes["new_value"].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = np.isinf(new)
    if bad.any():
        first = writes.loc[bad].iloc[0]
        msg = (
            f"{int(bad.sum())} measurement value(s) are infinite, which JSON cannot hold, e.g. snip "
            f"{first['snip_id']}, column {first['column']!r}: {first['new_value']}; nothing was written. Write NaN "
            "(null) for a value that could not be measured, or mark the row failed"
        )
        raise ValueError(msg)
    missing = writes["snip_id"].isna().to_numpy()
    if missing.any():
        msg = (
            f"{int(missing.sum())} measurement row(s) with status 'assigned' name no snip_id (column "
            f"{writes.loc[missing, 'column'].iloc[0]!r}); nothing was written. Give every assigned row its snip_id, "
            "or mark it failed"
        )
        raise ValueError(msg)


def _get_measurement(snip: dict[str, Any], column: str) -> Any:
    """A snip's measurement value, or the change log's absent markers."""
    measures = snip.get("measurements")
    if measures is None:
        return changelog.ABSENT_OBJECT
    return measures.get(column, changelog.ABSENT_KEY)


def _set_measurement(snip: dict[str, Any], column: str, value: Any) -> None:
    """Set (or, for an absent marker, remove) a snip's measurement value."""
    if isinstance(value, dict):
        measures = snip.get("measurements")
        if measures is not None:
            measures.pop(column, None)
            # The object goes only if the change created it and nothing else
            # was added to it since.
            if not measures and value == changelog.ABSENT_OBJECT:
                del snip["measurements"]
        return
    snip.setdefault("measurements", {})[column] = value


def _apply_measurements(store: Store, writes: pd.DataFrame, log: list[list[Any]], undo_ops: list[Callable[[], None]], force: bool) -> None:
    """Write measurement values into ``snip["measurements"][column]``."""
    _check_measurement_rows(writes)
    sids = writes["snip_id"].to_numpy(dtype=object)
    emb = writes["embryo_id"].astype(object).to_numpy(dtype=object)
    cols = writes["column"].to_numpy(dtype=object)
    embryos = store.embryos
    try:
        snip_objs = [
            embryos[e if isinstance(e, str) else ids.parse_snip_id(s).embryo_id]["snips"][s]
            for e, s in zip(emb, sids, strict=True)
        ]
    except (KeyError, ValueError) as err:
        msg = f"the measurement change set names {err} which is not in the store; was it computed from another store?"
        raise MergeConflictError(msg) from None
    old = writes["old_value"].to_numpy(dtype=np.float64, na_value=np.nan)
    new = writes["new_value"].to_numpy(dtype=np.float64, na_value=np.nan)
    if not force:
        current = np.array(
            [_as_number(_get_measurement(s, c)) for s, c in zip(snip_objs, cols, strict=True)], dtype=np.float64
        )
        stale = ~((np.isnan(current) & np.isnan(old)) | (current == old))
        if stale.any():
            bad = writes.loc[stale, ["snip_id", "column", "old_value"]].assign(now=current[stale])
            first = bad.iloc[0]
            msg = (
                f"{int(stale.sum())} measurement(s) changed since the change set was computed (another writer?), "
                f"e.g. {first['snip_id']} {first['column']!r}: expected {_shown(first['old_value'])}, found "
                f"{_shown(first['now'])}. Nothing was written; recompute the change set from the store as it is now."
            )
            raise MergeConflictError(msg, failure_cases=bad.reset_index(drop=True))
    for snip, sid, col, value in zip(snip_objs, sids, cols, new, strict=True):
        before = _get_measurement(snip, col)
        after = None if np.isnan(value) else float(value)
        _set_measurement(snip, col, after)
        log.append(["snip", sid, f"measurements.{col}", before, after])
        undo_ops.append(lambda snip=snip, col=col, before=before: _set_measurement(snip, col, before))


def _as_number(value: Any) -> float:
    """A measurement as a float: NaN for absent or null."""
    return np.nan if value is None or isinstance(value, dict) else float(value)


def _shown(value: float) -> str:
    return "no value (absent or null)" if pd.isna(value) else repr(float(value))


def _flag_owner(store: Store, level: str, entity: str) -> tuple[dict[str, Any], str, bool]:
    """The dict holding the entity's flag list, its key, and whether it exists."""
    if level == "snip":
        # A snip id is its embryo id, "_" and a suffix without underscores
        # (checked at load); parse fully only to explain an unknown id.
        embryo = store.embryos.get(entity.rpartition("_")[0])
        if embryo is None or entity not in embryo["snips"]:
            embryo = store.embryos[ids.parse_snip_id(entity).embryo_id]
        return embryo["snips"][entity], "flags", True
    if level == "embryo":
        return store.embryos[entity], "flags", True
    table = store.doc["flags"][level]
    return table, entity, entity in table


def _apply_flags(store: Store, writes: pd.DataFrame, replace: list[str], log: list[list[Any]], undo_ops: list[Callable[[], None]]) -> None:
    vocab = store.vocabulary
    severities = set(vocab["severity_levels"])
    stamp = now()
    # Check every row at once (columns, not rows), then build one entry per
    # hit from plain arrays: flags are sparse next to snips.
    cols = {c: writes[c].to_numpy(dtype=object, na_value=None) for c in ("entity_id", "level", "flag", "severity", "notes", "author", "detector")}
    conf = writes["confidence"].to_numpy(dtype=np.float64, na_value=np.nan)
    permitted = {(lv, f) for lv, fs in vocab["flags"].items() for f in fs}
    bad_flag = np.fromiter(((lv, f) not in permitted for lv, f in zip(cols["level"], cols["flag"], strict=True)), dtype=bool, count=len(conf))
    if bad_flag.any():
        i = int(np.flatnonzero(bad_flag)[0])
        level, flag = cols["level"][i], cols["flag"][i]
        msg = f"detector {cols['detector'][i]} raised {flag!r}, which is not permitted at level {level!r}; permitted: {', '.join(vocab['flags'].get(level, []))}"
        raise MergeConflictError(msg)
    bad_severity = ~writes["severity"].isin(severities).to_numpy(dtype=bool, na_value=False)
    if bad_severity.any():
        i = int(np.flatnonzero(bad_severity)[0])
        msg = f"detector {cols['detector'][i]} used severity {cols['severity'][i]!r}; expected one of {', '.join(sorted(severities))}"
        raise MergeConflictError(msg)
    blank = writes["author"].fillna("").astype(str).str.strip().str.len().to_numpy() == 0
    if blank.any():
        i = int(np.flatnonzero(blank)[0])
        msg = f"detector {cols['detector'][i]} gave no author for {cols['entity_id'][i]}; flags need an author such as 'auto:{cols['detector'][i]}'"
        raise MergeConflictError(msg)
    has_conf = ~np.isnan(conf)
    out_of_range = has_conf & ((conf < 0) | (conf > 1))
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range)[0])
        msg = f"detector {cols['detector'][i]} gave confidence {conf[i]} for {cols['entity_id'][i]}; confidence must be within [0, 1]"
        raise MergeConflictError(msg)
    by_entity: dict[tuple[str, str], list[dict[str, Any]]] = {}
    rows = zip(cols["entity_id"], cols["level"], cols["flag"], cols["severity"], cols["author"], cols["notes"], conf.tolist(), has_conf.tolist(), strict=True)
    for entity, level, flag, severity, author, notes, confidence, known in rows:
        entry: dict[str, Any] = {"value": flag, "author": author, "timestamp": stamp, "severity": severity, "auto_generated": True}
        if notes is not None:
            entry["notes"] = notes
        if known:
            entry["confidence"] = confidence
        by_entity.setdefault((level, entity), []).append(entry)
    targets: dict[tuple[str, str], None] = dict.fromkeys(by_entity)
    if replace:
        for (level, entity) in _entities_with_flags_by(store, set(replace)):
            targets.setdefault((level, entity), None)
    for level, entity in targets:
        owner, key, existed = _flag_owner(store, level, entity)
        before = owner[key] if existed else None
        flags = [f for f in (before or []) if not (replace and f.get("author") in replace)]
        for entry in by_entity.get((level, entity), []):
            # A flag raised again exactly as before keeps its entry (and its
            # timestamp): re-running a detector that finds the same is a no-op.
            entry = next((f for f in before or [] if _same_flag(f, entry)), entry)
            same = next((i for i, f in enumerate(flags) if f["value"] == entry["value"]), None)
            if same is None:
                flags.append(entry)
            else:
                flags[same] = entry
        if flags == (before or []):
            continue
        if not flags and level in ("experiment", "video", "image"):
            del owner[key]
        else:
            owner[key] = flags
        log.append(["flags", f"{level}:{entity}", "flags", before, flags if flags or level in ("snip", "embryo") else None])

        def restore(owner: dict[str, Any] = owner, key: str = key, before: Any = before, existed: bool = existed) -> None:
            if existed:
                owner[key] = before
            else:
                owner.pop(key, None)

        undo_ops.append(restore)


def _same_flag(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return {k: v for k, v in old.items() if k != "timestamp"} == {k: v for k, v in new.items() if k != "timestamp"}


def _entities_with_flags_by(store: Store, authors: set[str]) -> list[tuple[str, str]]:
    found = []
    for level in ("experiment", "video", "image"):
        for entity, flags in store.doc["flags"][level].items():
            if any(f.get("author") in authors for f in flags):
                found.append((level, entity))
    for eid, e in store.embryos.items():
        if any(f.get("author") in authors for f in e["flags"]):
            found.append(("embryo", eid))
        for sid, s in e["snips"].items():
            if s["flags"] and any(f.get("author") in authors for f in s["flags"]):
                found.append(("snip", sid))
    return found


def undo(store: Store, batch_id: str, *, force: bool = False, lock_timeout: float = LOCK_TIMEOUT) -> MergeReport:
    """Restore the values a batch replaced, exactly, as a new logged batch.

    Parameters
    ----------
    store : Store
        The store (read from a file: the change log lives beside it).
    batch_id : str
        The batch to undo (from a :class:`MergeReport` or the change log).
    force : bool, default False
        Undo even if later batches changed the same values (their changes to
        those values are lost).
    lock_timeout : float, default LOCK_TIMEOUT
        Seconds to wait for another writer's lock.

    Returns
    -------
    MergeReport
        Kind ``undo``; its ``batch_id`` is the undo's own batch.

    Raises
    ------
    MergeConflictError
        If later batches changed the same values and not *force*.
    PipelineError
        If the batch is not in the change log.

    Notes
    -----
    A checkpointed run (``merge_into_store(..., checkpoint_every=N)``) is one
    batch per checkpoint, listed in its report's ``batch_ids``: undo each, newest
    first, to undo the whole run (its checkpoints touch disjoint snips and
    embryos, so any single one also undoes on its own). A re-run of the same
    inputs computes an undone checkpoint's partitions again. Measurement
    values that did not exist before the batch are removed again (and a
    ``measurements`` object the batch created, once empty).

    On a sharded store the values are restored shard by shard
    (:func:`pipeline.shards.undo_sharded`, on the workers when a client is
    active), never loading the touched shards in this process, with the same
    result, change-log record and all-or-nothing commit.
    """
    if store.path is None:
        msg = "undo needs a store read from a file (the change log lives beside it)"
        raise ValueError(msg)
    with store.locked(lock_timeout):
        if store.changed_on_disk():
            store.reload()
        record, later = changelog.find_batch(store.path, batch_id)
        hits = changelog.later_conflicts(record, later)
        if hits and not force:
            raise changelog.conflict_error(batch_id, hits)
        from pipeline import shards

        if isinstance(store, shards.ShardedStore):
            # Shard by shard, in tasks (on the workers when a client is
            # active): this process never holds the touched shards.
            new_id, log = shards.undo_sharded(store, record, force=force)
            return _undo_report(store, new_id, log)
        log: list[list[Any]] = []
        undo_ops: list[Callable[[], None]] = []
        try:
            for target, entity, fieldname, before, after in reversed(record["changes"]):
                _restore(store, target, entity, fieldname, before, after, log, undo_ops)
            store.invalidate()
            store.check_embryos(_touched_embryos(log))
            new_id = changelog.new_batch_id()
            changelog.append_record(
                store.path,
                changelog.batch_record(new_id, "undo", "undo", store.path, {"undo_of": batch_id, "force": force}, log),
            )
            try:
                store.save(_locked=True, force=True, _checked=True)
            except BaseException:
                if not _completes_on_open(store):
                    changelog.mark_aborted(store.path, new_id, "undo")
                raise
        except BaseException:
            for op in reversed(undo_ops):
                op()
            store.invalidate()
            raise
    return _undo_report(store, new_id, log)


def _undo_report(store: Store, new_id: str, log: list[list[Any]]) -> MergeReport:
    """The report of an undo batch that restored the values of *log*."""
    table = pd.DataFrame({"status": ["assigned"] * len(log)})
    return MergeReport(batch_id=new_id, kind="undo", counts={"restored": len(log)}, n_written=len(log), overrides=0,
                       failed=table.iloc[:0], changes=table, path=str(store.path), batch_ids=[new_id])


def _completes_on_open(store: Store) -> bool:
    """Whether a failed save is past a sharded store's commit point (then it is not aborted)."""
    from pipeline import shards

    return shards.committed_on_open(store)


def _restore(store: Store, target: str, entity: str, fieldname: str, before: Any, after: Any, log: list[list[Any]], undo_ops: list[Callable[[], None]]) -> None:
    if target == "snip" and fieldname.startswith("measurements."):
        snip = store.embryos[ids.parse_snip_id(entity).embryo_id]["snips"][entity]
        column = fieldname.split(".", 1)[1]
        current = _get_measurement(snip, column)
        _set_measurement(snip, column, before)
        log.append([target, entity, fieldname, current, before])
        undo_ops.append(lambda snip=snip, column=column, current=current: _set_measurement(snip, column, current))
        return
    if target == "snip":
        owner = store.embryos[ids.parse_snip_id(entity).embryo_id]["snips"][entity]
        key, existed = fieldname, True
    elif target == "embryo":
        owner, key, existed = store.embryos[entity], fieldname, True
    else:
        level, name = entity.split(":", 1)
        owner, key, existed = _flag_owner(store, level, name)
    current = owner[key] if existed else None
    if before is None and target == "flags" and level in ("experiment", "video", "image"):
        owner.pop(key, None)
    else:
        owner[key] = before
    log.append([target, entity, fieldname, current, before])

    def back(owner: dict[str, Any] = owner, key: str = key, current: Any = current, existed: bool = existed) -> None:
        if existed:
            owner[key] = current
        else:
            owner.pop(key, None)

    undo_ops.append(back)
