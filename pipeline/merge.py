"""Stage 5: merge change sets back into the JSON store, in one safe write.

:func:`merge_into_store` computes a change set (phenotypes, genotypes or
flags; lazy or already computed) once, then, under the store's cross-process
lock: re-reads the file if another writer replaced it, checks that every value
it is about to replace is still the value the change set was computed against,
applies the changes, logs the exact before/after values of the batch to the
change log, and replaces the file atomically. Any failure before the final
rename restores the document in memory and leaves the file byte-identical.

Notes: triggers computation.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask.callbacks import Callback

from pipeline import changelog, ids
from pipeline._atomic import LOCK_TIMEOUT
from pipeline.errors import MergeConflictError
from pipeline.schema import (
    FLAG_CHANGE_COLUMNS,
    GENOTYPE_CHANGE_COLUMNS,
    PHENOTYPE_CHANGE_COLUMNS,
    STRING,
    empty_frame,
)
from pipeline.store import Store, now

__all__ = ["MergeReport", "merge_into_store", "merge_many", "undo", "kind_of"]

_WRITE = ("assigned", "backfilled")


def kind_of(changes: pd.DataFrame | dd.DataFrame) -> str:
    """Tell which kind of change set *changes* is: phenotype, genotype or flag."""
    cols = set(changes.columns)
    if set(PHENOTYPE_CHANGE_COLUMNS) <= cols:
        return "phenotype"
    if set(FLAG_CHANGE_COLUMNS) <= cols:
        return "flag"
    if set(GENOTYPE_CHANGE_COLUMNS) <= cols:
        return "genotype"
    msg = (
        "not a change set: expected the columns of PHENOTYPE_CHANGE_COLUMNS, GENOTYPE_CHANGE_COLUMNS "
        f"or FLAG_CHANGE_COLUMNS (pipeline.schema), got {sorted(cols)}"
    )
    raise ValueError(msg)


@dataclass
class MergeReport:
    """What a merge did: counts per status, failed rows, overrides, the batch id.

    Attributes
    ----------
    batch_id : str or None
        Id of the batch in the change log (None for a dry run or no change).
    kind : str
        ``phenotype``, ``genotype`` or ``flag``.
    counts : dict of str to int
        Change-set rows per status.
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
        head = f"{self.kind} batch {self.batch_id or '(dry run)'}: {verb} {self.n_written} value(s)"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "no changes"
        lines = [head, f"  {counts}"]
        if self.overrides:
            lines.append(f"  {self.overrides} write(s) overridden by a later row of the batch")
        lines += [f"  {n}" for n in self.notes]
        if len(self.failed):
            lines.append(f"  failed rows ({len(self.failed)}):")
            for _, r in self.failed.head(20).iterrows():
                where = r.get("entity_id", r.get("embryo_id", ""))
                lines.append(f"    row {r.get('row', '-')}: {where}: {r['reason']}")
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


class _Progress(Callback):
    """Report ``progress(done, total)`` as tasks finish on a local scheduler."""

    def __init__(self, progress: Callable[[int, int], None]) -> None:
        super().__init__()
        self.progress = progress
        self.total = 0
        self.done = 0

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        self.total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished") if k in state)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self.done += 1
        self.progress(self.done, max(self.total, self.done))


def _compute(changes: pd.DataFrame | dd.DataFrame, progress: Callable[[int, int], None] | None) -> pd.DataFrame:
    if isinstance(changes, pd.DataFrame):
        return changes
    from pipeline.cluster import compute, get_client

    if get_client() is not None:
        # distributed: progress per finished partition, in a "merge" span
        return compute(changes, progress=progress, stage="merge")
    if progress is None:
        return changes.compute()
    with _Progress(progress):
        return changes.compute()


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
) -> MergeReport:
    """Write a change set back into the store in one atomic, logged batch.

    Parameters
    ----------
    store : Store
        The store the change set was computed from.
    changes : pandas.DataFrame or dask.dataframe.DataFrame
        From :func:`pipeline.assign_phenotypes`, :func:`pipeline.assign_genotypes`
        or :func:`pipeline.run_detectors`.
    dry_run : bool, default False
        Compute and report, write nothing.
    replace_authors : iterable of str, optional
        Flag change sets only: first clear the flags these authors (e.g.
        ``"auto:ShortTrack"``) raised earlier and that the change set does not
        raise again.
    strict : bool, default False
        Flag change sets only: refuse to write anything if a detector failed.
    lock_timeout : float, default LOCK_TIMEOUT
        Seconds to wait for another writer's lock.
    force : bool, default False
        Write even where the store changed since the change set was computed.
    progress : callable, optional
        ``progress(done, total)`` as partitions complete.
    inputs : dict, optional
        What produced the batch (file names, options), recorded in the log.

    Returns
    -------
    MergeReport
        Counts per status, failed rows, overrides and the ``batch_id``.

    Raises
    ------
    MergeConflictError
        If values changed on disk since the change set was computed (another
        writer), or a detector failed with *strict*. Nothing is written.
    StoreLockedError
        If another writer holds the lock past *lock_timeout*.

    Notes
    -----
    Triggers computation.
    """
    kind = kind_of(changes)
    table = _compute(changes, progress)
    counts = {str(k): int(v) for k, v in table["status"].value_counts().items()}
    failed = table.loc[table["status"] == "failed"]
    failed = (failed.sort_values("row", kind="stable") if "row" in failed else failed).reset_index(drop=True)
    overrides = int(table["reason"].fillna("").str.startswith("overridden").sum())
    if kind == "flag":
        writes = table.loc[table["status"] == "raised"]
    else:
        writes = table.loc[table["status"].isin(_WRITE)]
    report = MergeReport(
        batch_id=None, kind=kind, counts=counts, n_written=len(writes), overrides=overrides,
        failed=failed, changes=table, dry_run=dry_run, path=str(store.path) if store.path else None,
    )
    if kind == "flag" and strict and len(failed):
        msg = f"{len(failed)} detector failure(s) and strict=True: nothing written. First: {failed['reason'].iloc[0]}"
        raise MergeConflictError(msg, failure_cases=failed)
    replace = sorted(set(replace_authors or ()))
    if dry_run or (len(writes) == 0 and not replace):
        report.dry_run = dry_run
        return report
    with store.locked(lock_timeout):
        if store.changed_on_disk():
            store.reload()
            report.notes.append("the store was changed by another writer: re-read, and the batch applied on top")
        log: list[list[Any]] = []
        undo_ops: list[Callable[[], None]] = []
        try:
            if kind == "phenotype":
                _apply_phenotypes(store, writes, log, undo_ops, force)
            elif kind == "genotype":
                _apply_genotypes(store, writes, log, undo_ops, force)
            else:
                _apply_flags(store, writes, replace, log, undo_ops)
            if kind == "flag":
                report.n_written = len(log)
            if not log:
                store.invalidate()
                return report
            store.invalidate()
            if kind != "flag":
                # Flag entries were checked one by one as they were built
                # (vocabulary, severity, author, confidence): re-checking every
                # touched embryo would cost a table rebuild for nothing.
                store.check_embryos(_touched_embryos(log))
            report.batch_id = _commit(store, kind, writes, log, inputs)
        except BaseException:
            for op in reversed(undo_ops):
                op()
            store.invalidate()
            raise
    return report


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
    Triggers computation.
    """
    sets = list(change_sets)
    kinds = [kind_of(c) for c in sets]
    if "flag" in kinds:
        msg = "merge_many takes phenotype and genotype change sets; merge flag change sets with merge_into_store()"
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
        log: list[list[Any]] = []
        undo_ops: list[Callable[[], None]] = []
        try:
            for k, w in zip(kinds, writes, strict=True):
                if not len(w):
                    continue
                if k == "phenotype":
                    _apply_phenotypes(store, w, log, undo_ops, force)
                else:
                    _apply_genotypes(store, w, log, undo_ops, force)
            if not log:
                store.invalidate()
                return report
            store.invalidate()
            store.check_embryos(_touched_embryos(log))
            first = next(w for w in writes if len(w))
            report.batch_id = _commit(store, label, first, log, inputs)
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

def _commit(store: Store, kind: str, writes: pd.DataFrame, log: list[list[Any]], inputs: dict[str, Any] | None) -> str:
    batch_id = changelog.new_batch_id()
    if store.path is None:
        return batch_id
    author = str(writes["author"].iloc[0]) if len(writes) and "author" in writes else ""
    record = {
        "batch_id": batch_id,
        "kind": kind,
        "author": author,
        "timestamp": now(),
        "store": str(store.path),
        "inputs": inputs or {},
        "changes": log,
    }
    changelog.append_record(store.path, record)
    try:
        store.save(_locked=True, force=True, _checked=True)
    except BaseException:
        changelog.append_record(store.path, {"batch_id": batch_id, "kind": "aborted", "author": author, "timestamp": now()})
        raise
    return batch_id


def _touched_embryos(log: list[list[Any]]) -> set[str]:
    """Embryos whose JSON a batch changed: only those need re-checking."""
    touched = set()
    for target, entity, *_ in log:
        if target == "snip":
            touched.add(ids.parse_snip_id(entity).embryo_id)
        elif target == "embryo":
            touched.add(entity)
        elif entity.startswith(("snip:", "embryo:")):
            level, name = entity.split(":", 1)
            touched.add(ids.parse_snip_id(name).embryo_id if level == "snip" else name)
    return touched


def _apply_phenotypes(store: Store, writes: pd.DataFrame, log: list[list[Any]], undo_ops: list[Callable[[], None]], force: bool) -> None:
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
    if not force:
        current = np.array([s["phenotype"]["value"] for s in snip_objs], dtype=object)
        stale = current != writes["old_value"].to_numpy(dtype=object)
        if stale.any():
            bad = writes.loc[stale, ["snip_id", "old_value"]].assign(now=current[stale])
            msg = (
                f"{int(stale.sum())} snip(s) changed since the change set was computed (another writer?), "
                f"e.g. {bad['snip_id'].iloc[0]}: expected {bad['old_value'].iloc[0]!r}, found {bad['now'].iloc[0]!r}. "
                "Nothing was written; recompute the change set from the store as it is now."
            )
            raise MergeConflictError(msg, failure_cases=bad)
    values = writes["new_value"].to_numpy(dtype=object)
    authors = writes["author"].to_numpy(dtype=object)
    stamps = writes["timestamp"].to_numpy(dtype=object)
    confs = writes["confidence"].to_numpy(dtype=np.float64)
    notes = writes["notes"].to_numpy(dtype=object)
    has_conf = ~np.isnan(confs)
    has_notes = pd.notna(writes["notes"]).to_numpy()
    # Writing JSON objects is a loop over changed snips: the store is a dict.
    for i, snip in enumerate(snip_objs):
        before = snip["phenotype"]
        entry = {"value": values[i], "author": authors[i], "timestamp": stamps[i]}
        if has_conf[i]:
            entry["confidence"] = float(confs[i])
        if has_notes[i]:
            entry["notes"] = notes[i]
        snip["phenotype"] = entry
        log.append(["snip", sids[i], "phenotype", before, entry])
        undo_ops.append(lambda snip=snip, before=before: snip.__setitem__("phenotype", before))
    # death_frame is a cache of the snips: recompute it for touched embryos.
    for eid in pd.unique(emb):
        embryo = embryos[eid]
        dead = [_frame_of(sid, s) for sid, s in embryo["snips"].items() if s["phenotype"]["value"] == "DEAD"]
        new_death = min(dead) if dead else None
        if embryo["death_frame"] != new_death:
            before = embryo["death_frame"]
            embryo["death_frame"] = new_death
            log.append(["embryo", eid, "death_frame", before, new_death])
            undo_ops.append(lambda embryo=embryo, before=before: embryo.__setitem__("death_frame", before))


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


def _flag_owner(store: Store, level: str, entity: str) -> tuple[dict[str, Any], str, bool]:
    """The dict holding the entity's flag list, its key, and whether it exists."""
    if level == "snip":
        embryo = store.embryos[ids.parse_snip_id(entity).embryo_id]
        return embryo["snips"][entity], "flags", True
    if level == "embryo":
        return store.embryos[entity], "flags", True
    table = store.doc["flags"][level]
    return table, entity, entity in table


def _apply_flags(store: Store, writes: pd.DataFrame, replace: list[str], log: list[list[Any]], undo_ops: list[Callable[[], None]]) -> None:
    vocab = store.vocabulary
    severities = set(vocab["severity_levels"])
    by_entity: dict[tuple[str, str], list[dict[str, Any]]] = {}
    stamp = now()
    for r in writes.itertuples(index=False):
        # One entry per hit: flags are sparse next to snips.
        if r.flag not in vocab["flags"].get(r.level, []):
            msg = f"detector {r.detector} raised {r.flag!r}, which is not permitted at level {r.level!r}; permitted: {', '.join(vocab['flags'].get(r.level, []))}"
            raise MergeConflictError(msg)
        if r.severity not in severities:
            msg = f"detector {r.detector} used severity {r.severity!r}; expected one of {', '.join(sorted(severities))}"
            raise MergeConflictError(msg)
        if not isinstance(r.author, str) or not r.author.strip():
            msg = f"detector {r.detector} gave no author for {r.entity_id}; flags need an author such as 'auto:{r.detector}'"
            raise MergeConflictError(msg)
        entry: dict[str, Any] = {"value": r.flag, "author": r.author, "timestamp": stamp, "severity": r.severity, "auto_generated": True}
        if pd.notna(r.notes):
            entry["notes"] = r.notes
        if pd.notna(r.confidence):
            if not 0 <= r.confidence <= 1:
                msg = f"detector {r.detector} gave confidence {r.confidence} for {r.entity_id}; confidence must be within [0, 1]"
                raise MergeConflictError(msg)
            entry["confidence"] = float(r.confidence)
        by_entity.setdefault((r.level, r.entity_id), []).append(entry)
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
        log: list[list[Any]] = []
        undo_ops: list[Callable[[], None]] = []
        try:
            for target, entity, fieldname, before, after in reversed(record["changes"]):
                _restore(store, target, entity, fieldname, before, after, log, undo_ops)
            store.invalidate()
            store.check_embryos(_touched_embryos(log))
            new_id = changelog.new_batch_id()
            changelog.append_record(store.path, {
                "batch_id": new_id, "kind": "undo", "author": "undo", "timestamp": now(),
                "store": str(store.path), "inputs": {"undo_of": batch_id, "force": force}, "changes": log,
            })
            try:
                store.save(_locked=True, force=True, _checked=True)
            except BaseException:
                changelog.append_record(store.path, {"batch_id": new_id, "kind": "aborted", "author": "undo", "timestamp": now()})
                raise
        except BaseException:
            for op in reversed(undo_ops):
                op()
            store.invalidate()
            raise
    table = pd.DataFrame({"status": ["assigned"] * len(log)})
    return MergeReport(batch_id=new_id, kind="undo", counts={"restored": len(log)}, n_written=len(log), overrides=0,
                       failed=table.iloc[:0], changes=table, path=str(store.path))


def _restore(store: Store, target: str, entity: str, fieldname: str, before: Any, after: Any, log: list[list[Any]], undo_ops: list[Callable[[], None]]) -> None:
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
