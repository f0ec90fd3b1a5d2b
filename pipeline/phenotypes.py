"""Stage 4: batch phenotype and genotype assignment, as lazy change sets.

:func:`assign_phenotypes` takes assignment rows (embryo, phenotype, frame range,
confidence, notes), checks each row once on the client (vocabulary, confidence,
range syntax), routes it to the one partition that holds its embryo (the snip
table's divisions say which, without computing anything) and expands it there
with the vectorised range masks of :mod:`pipeline.ranges`. The result is the
**change set**: one row per affected snip, plus one per failed assignment row,
with the columns of :data:`pipeline.schema.PHENOTYPE_CHANGE_COLUMNS`.
:func:`pipeline.merge_into_store` writes it back.

Semantics (``spec/store-schema.md`` and ``spec/range-grammar.md``): selections
are resolved against the store as it was before the batch; rows apply in order
and a later row wins on the same snip (the earlier write is reported as
``skipped`` with reason ``overridden``). DEAD fills forward from the first frame
its row selects (``backfilled``) and moves the death frame earlier; a later
non-DEAD row is ``skipped`` (``after_death``) on every frame at or after the
death frame as it stands after the rows before it — a running minimum of death
frames per embryo, in row order. ``on_existing`` decides what happens to snips
that already hold a different non-default phenotype (DEAD rows always apply:
permanence demands it). With ``overwrite_dead`` a non-DEAD row may replace DEAD,
as long as DEAD stays permanent afterwards, or the row fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.compute as pc

from pipeline._arrow import arrow_strings, differs_from_previous, repeated
from pipeline._partitions import from_pieces, map_parts
from pipeline._tables import suggest
from pipeline.errors import PipelineError, RangeSyntaxError
from pipeline.ranges import FrameRange, expand_ranges, parse_range
from pipeline.schema import (
    DEFAULT_VOCABULARY,
    GENOTYPE_CHANGE_COLUMNS,
    PHENOTYPE_CHANGE_COLUMNS,
    STRING,
    empty_frame,
)
from pipeline.store import Store, now

__all__ = [
    "assign_phenotypes",
    "assign_phenotypes_partition",
    "assign_genotypes",
    "read_assignments",
    "prepare_phenotype_rows",
    "ON_EXISTING",
]

ON_EXISTING = ("overwrite", "skip", "error")
_DEAD = "DEAD"
_ROW_COLUMNS = ["row", "embryo_id", "phenotype", "spec", "confidence", "notes", "error"]


class AssignmentInputError(PipelineError, ValueError):
    """The assignments as a whole are unusable (missing file or columns)."""


def read_assignments(source: Any, *, sheet_name: str | int | None = None) -> pd.DataFrame:
    """Turn assignments given in any accepted form into a pandas DataFrame.

    Parameters
    ----------
    source : list of dict, pandas.DataFrame, or path-like
        The rows, or a CSV, XLSX or JSON (a list of objects) file.
    sheet_name : str or int, optional
        Sheet of an XLSX file (default the first).

    Returns
    -------
    pandas.DataFrame
        One row per assignment, in order, columns as given (names stripped).

    Raises
    ------
    AssignmentInputError
        If the file is missing, unreadable or of an unknown kind.
    """
    if isinstance(source, pd.DataFrame):
        table = source.copy()
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            msg = f"assignments file {str(path)!r} does not exist"
            raise AssignmentInputError(msg)
        suffix = path.suffix.lower()
        try:
            if suffix in (".csv", ".tsv", ".txt"):
                table = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
            elif suffix in (".xlsx", ".xlsm"):
                table = pd.read_excel(path, sheet_name=sheet_name or 0, dtype=object)
            elif suffix == ".json":
                table = pd.DataFrame(pd.read_json(path, orient="records", dtype=False))
            else:
                msg = f"cannot read assignments from {str(path)!r}: expected a .csv, .tsv, .xlsx or .json file"
                raise AssignmentInputError(msg)
        except (ValueError, UnicodeDecodeError, OSError) as err:
            if isinstance(err, AssignmentInputError):
                raise
            msg = f"cannot read assignments from {str(path)!r}: {err}"
            raise AssignmentInputError(msg) from None
    elif isinstance(source, Iterable) and not isinstance(source, str | bytes | Mapping):
        table = pd.DataFrame(list(source))
    else:
        msg = f"assignments must be a list of dicts, a pandas DataFrame or a file path, got {type(source).__name__}"
        raise AssignmentInputError(msg)
    table.columns = [str(c).strip() for c in table.columns]
    return table.reset_index(drop=True)


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _spec_input(value: Any) -> Any:
    # Spreadsheet cells: a missing cell means "all"; an Excel number 3.0 means [3].
    if isinstance(value, list | tuple | FrameRange):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "all"
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and not value.strip():
        return "all"
    return value


def _confidence(value: Any) -> tuple[float, str | None]:
    if value is None or value is pd.NA or (isinstance(value, str) and not value.strip()):
        return np.nan, None
    if isinstance(value, bool):
        return np.nan, f"confidence must be a number within [0, 1], got {value!r}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return np.nan, f"confidence must be a number within [0, 1], got {value!r}"
    if np.isnan(number):
        return np.nan, None
    if not 0 <= number <= 1:
        return np.nan, f"confidence must be within [0, 1], got {number:g}"
    return number, None


def _spec_or_error(value: Any) -> tuple[FrameRange | None, str | None]:
    try:
        return parse_range(_spec_input(value)), None
    except RangeSyntaxError as err:
        return None, f"bad_range: {err}"


def _per_distinct(values: np.ndarray, check: Callable[[Any], Any]) -> list[Any]:
    """``[check(v) for v in values]``, calling *check* once per distinct string.

    Only columns of strings (as CSV files give) are grouped: elsewhere equal
    values of different types (``1``, ``1.0``, ``True``) must stay apart.
    """
    if len(values) and all(v.__class__ is str for v in values):
        codes, uniques = pd.factorize(values)
        results = [check(u) for u in uniques]
        return [results[c] for c in codes.tolist()]
    return [check(v) for v in values]


def prepare_phenotype_rows(assignments: Any, vocabulary: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Check every assignment row once, before any partition sees it.

    Parameters
    ----------
    assignments : list of dict, pandas.DataFrame or path-like
        Columns ``embryo_id``, ``phenotype``, optional ``frames`` (default
        ``all``), ``confidence``, ``notes``.
    vocabulary : mapping, optional
        The store's vocabulary (default the package default).

    Returns
    -------
    pandas.DataFrame
        Columns ``row``, ``embryo_id``, ``phenotype`` (canonical case),
        ``spec`` (:class:`~pipeline.ranges.FrameRange`), ``confidence``,
        ``notes`` and ``error`` (why the row fails, or missing).

    Raises
    ------
    AssignmentInputError
        If a required column is missing.
    """
    table = read_assignments(assignments)
    missing = [c for c in ("embryo_id", "phenotype") if c not in table.columns]
    if missing:
        msg = (
            f"assignments lack the column(s) {', '.join(missing)}; found {', '.join(map(str, table.columns)) or 'none'}. "
            "Expected embryo_id, phenotype and optionally frames, confidence, notes"
        )
        raise AssignmentInputError(msg)
    phenotypes = (vocabulary or DEFAULT_VOCABULARY)["phenotypes"]
    by_upper = {p.upper(): p for p in phenotypes}
    n = len(table)

    def cells(name: str, default: Any) -> np.ndarray:
        return table[name].to_numpy(dtype=object) if name in table.columns else np.full(n, default, dtype=object)

    # Each distinct cell is checked once (a spreadsheet repeats its specs,
    # phenotypes and confidences); every row still gets its own outcome.
    embryo = _per_distinct(cells("embryo_id", None), _text)
    raw_pheno = _per_distinct(cells("phenotype", None), _text)
    pheno = [by_upper.get(p.upper()) if p else None for p in raw_pheno]
    parsed = _per_distinct(cells("frames", "all"), _spec_or_error)
    checked = _per_distinct(cells("confidence", None), _confidence)
    notes = _per_distinct(cells("notes", None), _text)
    specs: list[FrameRange | None] = []
    errors: list[str | None] = []
    confs: list[float] = []
    for i in range(n):
        # One pass over the assignment rows (not over snips): every failure
        # is collected, nothing stops early.
        conf, conf_error = checked[i]
        confs.append(conf)
        spec, spec_error = parsed[i]
        if embryo[i] is None:
            error = "missing_embryo_id: the embryo_id cell is empty"
        elif raw_pheno[i] is None:
            error = "missing_phenotype: the phenotype cell is empty"
        elif pheno[i] is None:
            error = f"unknown_phenotype: {raw_pheno[i]!r}{suggest(raw_pheno[i], set(phenotypes))}; permitted: {', '.join(sorted(phenotypes))}"
        else:
            error = spec_error or (f"bad_confidence: {conf_error}" if conf_error else None)
        specs.append(spec)
        errors.append(error)
    rows = pd.DataFrame(
        {
            "row": np.arange(n, dtype=np.int64),
            "embryo_id": pd.array(embryo, dtype=STRING),
            "phenotype": pd.array(pheno, dtype=STRING),
            "spec": pd.Series(specs, dtype=object),
            "confidence": np.asarray(confs, dtype=np.float64),
            "notes": pd.array(notes, dtype=STRING),
            "error": pd.array(errors, dtype=STRING),
        }
    )
    return rows


def _route(rows: pd.DataFrame, divisions: tuple[Any, ...], npartitions: int) -> list[pd.DataFrame]:
    """Split rows by the partition whose index range holds their embryo."""
    if npartitions == 1 or divisions[0] is None:
        return [rows] + [rows.iloc[:0]] * (npartitions - 1)
    # Snip ids of an embryo are "{embryo_id}_{s|t|}NNNN": all of them sort
    # below "{embryo_id}_z", and partitions hold whole embryos, so the
    # embryo's block lies in the last partition starting at or below that key.
    keys = (rows["embryo_id"].fillna("") + "_z").to_numpy(dtype=object)
    bounds = np.asarray(divisions[1:-1], dtype=object)
    where = np.searchsorted(bounds, keys, side="right")
    return [rows.loc[where == i] for i in range(npartitions)]


def _change_frame(data: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(data)
    return frame.astype(PHENOTYPE_CHANGE_COLUMNS)[list(PHENOTYPE_CHANGE_COLUMNS)]


def _failed_rows(rows: pd.DataFrame, reasons: pd.Series, author: str, timestamp: str) -> pd.DataFrame:
    n = len(rows)
    return _change_frame(
        {
            "snip_id": [None] * n,
            "embryo_id": rows["embryo_id"].to_numpy(),
            "frame": pd.array([None] * n, dtype="Int64"),
            "row": rows["row"].to_numpy(),
            "old_value": [None] * n,
            "new_value": rows["phenotype"].to_numpy(),
            "status": ["failed"] * n,
            "reason": reasons.to_numpy(dtype=object),
            "author": [author] * n,
            "timestamp": [timestamp] * n,
            "confidence": rows["confidence"].to_numpy(),
            "notes": rows["notes"].to_numpy(),
        }
    )


def assign_phenotypes_partition(
    part: pd.DataFrame,
    rows: pd.DataFrame,
    *,
    author: str,
    timestamp: str,
    on_existing: str = "overwrite",
    overwrite_dead: bool = False,
    default_value: str = "NONE",
) -> pd.DataFrame:
    """Compute the phenotype change set of one partition (the pandas twin).

    Parameters
    ----------
    part : pandas.DataFrame
        One partition of the snip table (whole videos).
    rows : pandas.DataFrame
        Prepared rows (:func:`prepare_phenotype_rows`) routed to this partition.
    author : str
        Who makes the changes.
    timestamp : str
        When (one timestamp for the whole batch).
    on_existing : {"overwrite", "skip", "error"}, default "overwrite"
        What to do with snips that hold a different non-default phenotype.
    overwrite_dead : bool, default False
        Allow non-DEAD values at or after death, keeping DEAD permanent.
    default_value : str, default "NONE"
        The vocabulary's default phenotype (never counts as "existing").

    Returns
    -------
    pandas.DataFrame
        Columns of :data:`pipeline.schema.PHENOTYPE_CHANGE_COLUMNS`.
    """
    out: list[pd.DataFrame] = []
    bad = rows["error"].notna().to_numpy()
    if bad.any():
        out.append(_failed_rows(rows.loc[bad], rows.loc[bad, "error"], author, timestamp))
    rows = rows.loc[~bad]
    known = _is_in(rows["embryo_id"], part["embryo_id"])
    if (~known).any():
        unknown = rows.loc[~known]
        reasons = "unknown_embryo: " + unknown["embryo_id"].astype(object) + " is not in this store"
        out.append(_failed_rows(unknown, reasons, author, timestamp))
    rows = rows.loc[known]
    if len(rows):
        out.append(_apply_rows(part, rows, author, timestamp, on_existing, overwrite_dead, default_value))
    if not out:
        return empty_frame(PHENOTYPE_CHANGE_COLUMNS)
    return pd.concat(out, ignore_index=True).sort_values(["row", "frame"], kind="stable", ignore_index=True)


def _is_in(values: pd.Series, universe: pd.Series) -> np.ndarray:
    """``values.isin(universe)`` for string columns, hashed in Arrow.

    pandas builds one Arrow scalar per element of the value set (0.2 s per
    1M-snip batch); Arrow hashes the distinct embryos of the partition once.
    """
    if len(values) == 0 or len(universe) == 0:
        return np.zeros(len(values), dtype=bool)
    found = pc.is_in(arrow_strings(values), value_set=pc.unique(arrow_strings(universe)))
    return found.to_numpy(zero_copy_only=False).astype(bool, copy=False)


def _frame_sorted(part: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The partition with each embryo's snips in frame order, and the map back."""
    fi = part["frame_index"].to_numpy()
    ordered = len(part) < 2 or bool(np.all(differs_from_previous(part["embryo_id"]) | (fi[1:] == fi[:-1] + 1)))
    if ordered:
        return part, np.arange(len(part))
    order = np.lexsort((fi, pd.factorize(part["embryo_id"])[0]))
    return part.iloc[order], order


def _apply_rows(
    part: pd.DataFrame,
    rows: pd.DataFrame,
    author: str,
    timestamp: str,
    on_existing: str,
    overwrite_dead: bool,
    default_value: str,
) -> pd.DataFrame:
    sorted_part, back = _frame_sorted(part)
    pairs, outcomes = expand_ranges(sorted_part, rows[["row", "embryo_id", "spec"]])
    pos = back[pairs["pos"].to_numpy()]
    row_ids = pairs["row"].to_numpy()
    out: list[pd.DataFrame] = []
    # Rows that select nothing fail with their most specific reason.
    selected = np.unique(row_ids)
    empty = ~rows["row"].isin(selected).to_numpy()
    notes_by_row = outcomes.groupby("row")["reason"].first() if len(outcomes) else pd.Series(dtype=object)
    details_by_row = outcomes.groupby("row")["detail"].first() if len(outcomes) else pd.Series(dtype=object)
    if empty.any():
        failed = rows.loc[empty]
        reason = failed["row"].map(notes_by_row).fillna("empty_selection").astype(object)
        detail = failed["row"].map(details_by_row).fillna("the spec selects no snip of this embryo").astype(object)
        out.append(_failed_rows(failed, reason + ": " + detail, author, timestamp))
    if len(pairs) == 0:
        return pd.concat(out, ignore_index=True) if out else empty_frame(PHENOTYPE_CHANGE_COLUMNS)

    # Per-snip arrays of the partition.
    emb_code, _ = pd.factorize(part["embryo_id"])
    frame = part["frame"].to_numpy()
    # The few distinct phenotypes as objects, spread by code: no string per snip.
    pheno_code, pheno_uniques = pd.factorize(part["phenotype"], use_na_sentinel=False)
    old = np.asarray(pheno_uniques, dtype=object)[pheno_code]
    old_conf = part["phenotype_confidence"].to_numpy()
    inf = np.iinfo(np.int64).max
    death0 = part["death_frame"].fillna(inf).to_numpy(dtype=np.int64)

    row_info = rows.set_index("row")
    value_of = row_info["phenotype"].astype(object)
    is_dead_row = (value_of == _DEAD)
    p_row = row_ids
    p_value = value_of.reindex(p_row).to_numpy(dtype=object)
    p_dead = is_dead_row.reindex(p_row).to_numpy(dtype=bool)
    p_emb = emb_code[pos]
    p_frame = frame[pos]

    if overwrite_dead:
        result = _sequential(pairs=(p_row, pos), rows=row_info, emb_code=emb_code, frame=frame, old=old,
                             death0=death0, on_existing=on_existing, default_value=default_value)
    else:
        result = _vectorised(p_row, pos, p_value, p_dead, p_emb, p_frame, emb_code, frame, old, death0,
                             on_existing, default_value)
    r_row, r_pos, r_value, r_status, r_reason = result
    # Failed rows (on_existing="error", or permanence broken) become failed lines.
    is_row_fail = r_pos < 0
    if is_row_fail.any():
        failed = rows.set_index("row").loc[np.unique(r_row[is_row_fail])].reset_index()
        reason = pd.Series(r_reason[is_row_fail], index=r_row[is_row_fail]).groupby(level=0).first()
        out.append(_failed_rows(failed, failed["row"].map(reason).astype(object), author, timestamp))
    keep = ~is_row_fail
    r_row, r_pos, r_value, r_status, r_reason = (a[keep] for a in (r_row, r_pos, r_value, r_status, r_reason))
    conf = row_info["confidence"].reindex(r_row).to_numpy(dtype=np.float64)
    notes = row_info["notes"].astype(object).reindex(r_row).to_numpy(dtype=object)
    # A write that changes nothing is reported as unchanged and not written.
    same_conf = (conf == old_conf[r_pos]) | (np.isnan(conf) & np.isnan(old_conf[r_pos]))
    unchanged = np.isin(r_status, ["assigned", "backfilled"]) & (r_value == old[r_pos]) & same_conf
    r_status = np.where(unchanged, "unchanged", r_status)
    out.append(
        _change_frame(
            {
                "snip_id": part.index.array.take(r_pos),
                "embryo_id": part["embryo_id"].array.take(r_pos),
                "frame": frame[r_pos],
                "row": r_row,
                "old_value": part["phenotype"].array.take(r_pos),
                "new_value": r_value,
                "status": r_status,
                "reason": r_reason,
                "author": repeated(author, len(r_row)),
                "timestamp": repeated(timestamp, len(r_row)),
                "confidence": conf,
                "notes": notes,
            }
        )
    )
    partial = outcomes.loc[~outcomes["row"].isin(rows.loc[empty, "row"])] if len(outcomes) else outcomes
    if len(partial):
        # A row that selected snips but also had a part selecting nothing
        # (e.g. "[0:3, 12]") keeps its writes; the problem is noted on them.
        note = (partial["reason"] + ": " + partial["detail"]).groupby(partial["row"]).first()
        frame_out = out[-1]
        extra = frame_out["row"].map(note)
        frame_out["reason"] = frame_out["reason"].fillna(extra.astype(STRING))
    return pd.concat(out, ignore_index=True)


def _vectorised(
    p_row: np.ndarray,
    p_pos: np.ndarray,
    p_value: np.ndarray,
    p_dead: np.ndarray,
    p_emb: np.ndarray,
    p_frame: np.ndarray,
    emb_code: np.ndarray,
    frame: np.ndarray,
    old: np.ndarray,
    death0: np.ndarray,
    on_existing: str,
    default_value: str,
) -> tuple[np.ndarray, ...]:
    """Row-ordered semantics over whole arrays: no loop over rows or snips."""
    inf = np.iinfo(np.int64).max
    n_emb = int(emb_code.max()) + 1 if len(emb_code) else 0
    emb_death0 = np.full(n_emb, inf, dtype=np.int64)
    np.minimum.at(emb_death0, emb_code, death0)
    # One line per row: its embryo, whether it is DEAD, the first frame it selects.
    rows_tbl = pd.DataFrame({"row": p_row, "emb": p_emb, "frame": p_frame, "dead": p_dead})
    per_row = rows_tbl.groupby("row", sort=True).agg(emb=("emb", "first"), dead=("dead", "first"), first=("frame", "min"))
    start = np.where(per_row["dead"].to_numpy(), per_row["first"].to_numpy(), inf)
    per_row["start"] = start
    # Death frame after each row = running minimum per embryo, in row order;
    # the death frame a row sees is the one after the rows before it.
    per_row = per_row.sort_values(["emb"], kind="stable")
    running = per_row.groupby("emb", sort=False)["start"].cummin().to_numpy()
    embs = per_row["emb"].to_numpy()
    before = np.empty_like(running)
    first_of_emb = np.r_[True, embs[1:] != embs[:-1]]
    before[1:] = running[:-1]
    before[first_of_emb] = inf
    before = np.minimum(before, emb_death0[embs])
    per_row["death_before"] = before
    per_row["death_after"] = np.minimum(running, emb_death0[embs])
    final_death = emb_death0.copy()
    np.minimum.at(final_death, embs, per_row["death_after"].to_numpy())

    death_before = per_row["death_before"].reindex(p_row).to_numpy()
    lines_row: list[np.ndarray] = []
    lines_pos: list[np.ndarray] = []
    lines_value: list[np.ndarray] = []
    lines_status: list[np.ndarray] = []
    lines_reason: list[np.ndarray] = []

    def emit(r: np.ndarray, p: np.ndarray, v: np.ndarray, status: str | np.ndarray, reason: Any) -> None:
        lines_row.append(r)
        lines_pos.append(p)
        lines_value.append(v)
        lines_status.append(np.broadcast_to(np.asarray(status, dtype=object), r.shape).copy())
        lines_reason.append(np.broadcast_to(np.asarray(reason, dtype=object), r.shape).copy())

    # Non-DEAD pairs: skipped at or after the death frame they see.
    alive = ~p_dead
    after_death = alive & (p_frame >= death_before)
    emit(p_row[after_death], p_pos[after_death], p_value[after_death], "skipped", "after_death")
    cand = alive & ~after_death
    existing = cand & (old[p_pos] != default_value) & (old[p_pos] != p_value) & (old[p_pos] != _DEAD)
    if on_existing == "skip":
        emit(p_row[existing], p_pos[existing], p_value[existing], "skipped", "existing_value: the snip already holds another phenotype (on_existing='skip')")
        cand &= ~existing
    elif on_existing == "error":
        failing_rows = np.unique(p_row[existing])
        in_failing = np.isin(p_row, failing_rows)
        held = pd.Series(old[p_pos][existing]).groupby(p_row[existing]).first()
        reason_of = {r: f"existing_value: snip(s) already hold another phenotype (e.g. {held[r]!r}) and on_existing='error'" for r in failing_rows}
        emit(failing_rows, np.full(failing_rows.shape, -1), np.full(failing_rows.shape, None, dtype=object), "failed",
             np.array([reason_of[r] for r in failing_rows], dtype=object))
        cand &= ~in_failing
    # A live write is lost when a later DEAD row kills that frame.
    killed = cand & (p_frame >= final_death[p_emb])
    emit(p_row[killed], p_pos[killed], p_value[killed], "skipped", "overridden: a later DEAD row fills this frame")
    cand &= ~killed
    # Among live writes of one snip, the last row wins.
    c_row, c_pos, c_value = p_row[cand], p_pos[cand], p_value[cand]
    order = np.lexsort((c_row, c_pos))
    c_row, c_pos, c_value = c_row[order], c_pos[order], c_value[order]
    last = np.r_[c_pos[1:] != c_pos[:-1], True] if len(c_pos) else np.zeros(0, dtype=bool)
    emit(c_row[last], c_pos[last], c_value[last], "assigned", None)
    lost = ~last
    if lost.any():
        # c_pos is sorted, so each snip's winner is the last entry of its run.
        winner = c_row[last][np.searchsorted(c_pos[last], c_pos[lost])]
        reason = np.array([f"overridden: a later row ({w}) wins on this snip" for w in winner.tolist()], dtype=object)
        emit(c_row[lost], c_pos[lost], c_value[lost], "skipped", reason)

    # DEAD: every snip at or after the final death frame is DEAD; credit the
    # first DEAD row (in order) whose fill reaches it.
    dead_rows = per_row.loc[per_row["dead"]]
    if len(dead_rows):
        newly = np.flatnonzero(frame >= final_death[emb_code])
        newly = newly[(old[newly] != _DEAD)]
        table = dead_rows.reset_index()[["row", "emb", "death_after"]].sort_values(["emb", "death_after", "row"])
        table = table.drop_duplicates(["emb", "death_after"], keep="first")
        # For each snip, the earliest row whose running death reaches its frame.
        table = table.sort_values("death_after", kind="stable")
        snips_tbl = pd.DataFrame({"pos": newly, "emb": emb_code[newly], "frame": frame[newly]}).sort_values("frame", kind="stable")
        matched = pd.merge_asof(snips_tbl, table.rename(columns={"death_after": "frame"}), on="frame", by="emb", direction="backward")
        m_row = matched["row"].to_numpy(dtype=np.int64)
        m_pos = matched["pos"].to_numpy(dtype=np.int64)
        width = len(frame) + 1
        dead_keys = p_row[p_dead] * width + p_pos[p_dead]
        chosen = np.isin(m_row * width + m_pos, dead_keys)
        emit(m_row, m_pos, np.full(len(m_pos), _DEAD, dtype=object), np.where(chosen, "assigned", "backfilled").astype(object), None)
        # Explicit DEAD selections of snips that were DEAD already.
        was_dead = p_dead & (old[p_pos] == _DEAD)
        emit(p_row[was_dead], p_pos[was_dead], p_value[was_dead], "unchanged", None)
        # DEAD pairs of a row whose snips an earlier DEAD row already filled.
        rest_idx = np.flatnonzero(p_dead & (old[p_pos] != _DEAD))
        dup = ~np.isin(p_row[rest_idx] * width + p_pos[rest_idx], m_row * width + m_pos)
        if dup.any():
            idx = rest_idx[dup]
            emit(p_row[idx], p_pos[idx], p_value[idx], "unchanged", "already filled by an earlier DEAD row of this batch")
    return tuple(np.concatenate(x) if x else np.zeros(0) for x in (lines_row, lines_pos, lines_value, lines_status, lines_reason))


def _sequential(
    *,
    pairs: tuple[np.ndarray, np.ndarray],
    rows: pd.DataFrame,
    emb_code: np.ndarray,
    frame: np.ndarray,
    old: np.ndarray,
    death0: np.ndarray,
    on_existing: str,
    default_value: str,
) -> tuple[np.ndarray, ...]:
    """Row-by-row semantics per embryo, for ``overwrite_dead`` corrections.

    Corrections of death calls are rare and small; each step is a numpy
    operation over one embryo's snips, never a loop over snips.
    """
    p_row, p_pos = pairs
    out_row: list[int] = []
    out_pos: list[int] = []
    out_val: list[Any] = []
    out_status: list[str] = []
    out_reason: list[Any] = []
    # Positions per row as a dict: Series.groupby(...).get_group fails on a
    # single (row, pos) pair under pandas 3 (KeyError), so no groupby here.
    order = np.argsort(p_row, kind="stable")
    keys, starts = np.unique(p_row[order], return_index=True)
    by_row = dict(zip(keys.tolist(), np.split(p_pos[order], starts[1:]), strict=True))
    emb_of_row = pd.Series(emb_code[p_pos]).groupby(p_row).first()

    def superseded(idx: np.ndarray, snips: np.ndarray, value: np.ndarray, writer: np.ndarray, reason: str) -> None:
        # An earlier write of the batch that a later row replaces: skipped, overridden.
        for i in idx[writer[idx] >= 0]:
            out_row.append(int(writer[i]))
            out_pos.append(int(snips[i]))
            out_val.append(value[i])
            out_status.append("skipped")
            out_reason.append(reason)

    for emb in np.unique(emb_of_row.to_numpy()):
        snips = np.flatnonzero(emb_code == emb)
        snips = snips[np.argsort(frame[snips], kind="stable")]
        value = old[snips].copy()
        writer = np.full(len(snips), -1)
        explicit = np.zeros(len(snips), dtype=bool)
        local = {p: i for i, p in enumerate(snips.tolist())}
        for r in emb_of_row.index[emb_of_row.to_numpy() == emb]:
            sel = np.array([local[p] for p in by_row[r].tolist()])
            new = rows.at[r, "phenotype"]
            if new == _DEAD:
                start = sel.min()
                fill = np.arange(start, len(snips))
                for i in sel[value[sel] == _DEAD]:
                    out_row.append(r)
                    out_pos.append(int(snips[i]))
                    out_val.append(new)
                    out_status.append("unchanged")
                    out_reason.append(None if writer[i] < 0 else "already filled by an earlier DEAD row of this batch")
                changed = fill[value[fill] != _DEAD]
                superseded(changed, snips, value, writer, "overridden: a later DEAD row fills this frame")
                value[fill] = _DEAD
                writer[changed] = r
                explicit[changed] = np.isin(changed, sel)
                continue
            if on_existing != "overwrite":
                held = (old[snips][sel] != default_value) & (old[snips][sel] != new) & (old[snips][sel] != _DEAD)
                if held.any() and on_existing == "error":
                    out_row.append(r)
                    out_pos.append(-1)
                    out_val.append(None)
                    out_status.append("failed")
                    out_reason.append("existing_value: snip(s) already hold another phenotype and on_existing='error'")
                    continue
                for i in sel[held]:
                    out_row.append(r)
                    out_pos.append(int(snips[i]))
                    out_val.append(new)
                    out_status.append("skipped")
                    out_reason.append("existing_value: the snip already holds another phenotype (on_existing='skip')")
                sel = sel[~held]
            trial = value.copy()
            trial[sel] = new
            dead = trial == _DEAD
            if dead.any() and not dead[np.argmax(dead):].all():
                out_row.append(r)
                out_pos.append(-1)
                out_val.append(None)
                out_status.append("failed")
                out_reason.append("breaks_permanence: the row would leave DEAD followed by a live frame; include every later DEAD frame in the range")
                continue
            superseded(sel, snips, value, writer, f"overridden: a later row ({r}) wins on this snip")
            value = trial
            writer[sel] = r
            explicit[sel] = True
        changed = np.flatnonzero(writer >= 0)
        for i in changed:
            out_row.append(int(writer[i]))
            out_pos.append(int(snips[i]))
            out_val.append(value[i])
            out_status.append("assigned" if explicit[i] or value[i] != _DEAD else "backfilled")
            out_reason.append(None)
    return (
        np.asarray(out_row, dtype=np.int64),
        np.asarray(out_pos, dtype=np.int64),
        np.asarray(out_val, dtype=object),
        np.asarray(out_status, dtype=object),
        np.asarray(out_reason, dtype=object),
    )


def assign_phenotypes(
    snips: dd.DataFrame,
    assignments: Any,
    *,
    author: str,
    on_existing: str = "overwrite",
    overwrite_dead: bool = False,
    vocabulary: Mapping[str, Any] | None = None,
    timestamp: str | None = None,
) -> dd.DataFrame:
    """Assign phenotypes to frame ranges of many embryos: a lazy change set.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame
        The snip table from :func:`pipeline.snips_from_store`.
    assignments : list of dict, pandas.DataFrame or path-like
        Columns ``embryo_id``, ``phenotype``, optional ``frames`` (default
        ``all``; any spec of ``spec/range-grammar.md``), ``confidence``, ``notes``.
        A path may name a CSV, XLSX or JSON file.
    author : str
        Who makes the changes (non-empty).
    on_existing : {"overwrite", "skip", "error"}, default "overwrite"
        What happens to snips that already hold a different non-default
        phenotype: replace it, skip the snip, or fail the whole row.
    overwrite_dead : bool, default False
        Allow non-DEAD values at or after death, as long as DEAD stays
        permanent (else the row fails with ``breaks_permanence``).
    vocabulary : mapping, optional
        The store's vocabulary (``store.vocabulary``); default the package's.
    timestamp : str, optional
        One timestamp for the batch (default now).

    Returns
    -------
    dask.dataframe.DataFrame
        The change set, columns :data:`pipeline.schema.PHENOTYPE_CHANGE_COLUMNS`;
        statuses ``assigned``, ``backfilled``, ``unchanged``, ``skipped`` and
        ``failed`` (rows that fail as a whole: unknown embryo or phenotype, bad
        confidence or range, empty selection).

    Raises
    ------
    AssignmentInputError
        If the assignments are unusable as a whole (missing file or columns).
    ValueError
        If *author* is empty or *on_existing* unknown.

    Examples
    --------
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=2, n_frames=6, seed=3)
    >>> snips = pipeline.snips_from_store(store)
    >>> embryo = store.snip_table()["embryo_id"].iloc[0]
    >>> changes = assign_phenotypes(snips, [{"embryo_id": embryo, "phenotype": "edema", "frames": "[0:2]"}], author="alee")
    >>> changes.compute()[["row", "new_value", "status"]].to_dict("list")
    {'row': [0, 0], 'new_value': ['EDEMA', 'EDEMA'], 'status': ['assigned', 'assigned']}
    """
    if not isinstance(author, str) or not author.strip():
        msg = f"author must be a non-empty name, got {author!r}"
        raise ValueError(msg)
    if on_existing not in ON_EXISTING:
        msg = f"on_existing must be one of {', '.join(ON_EXISTING)}, got {on_existing!r}"
        raise ValueError(msg)
    vocab = vocabulary or DEFAULT_VOCABULARY
    rows = prepare_phenotype_rows(assignments, vocab)
    default_value = next((k for k, v in vocab["phenotypes"].items() if v.get("is_default")), "NONE")
    pieces = _route(rows, tuple(snips.divisions), snips.npartitions)
    row_meta = rows.iloc[:0]
    rows_dd = from_pieces(pieces, row_meta, [None] * (len(pieces) + 1), label="assignment-rows")
    return map_parts(
        snips,
        assign_phenotypes_partition,
        empty_frame(PHENOTYPE_CHANGE_COLUMNS),
        rows_dd,
        stage="assign",
        author=author.strip(),
        timestamp=timestamp or now(),
        on_existing=on_existing,
        overwrite_dead=overwrite_dead,
        default_value=default_value,
    )


def assign_genotypes(
    store: Store,
    assignments: Any,
    *,
    author: str,
    overwrite: bool = True,
    timestamp: str | None = None,
) -> pd.DataFrame:
    """Assign genotypes to embryos: the genotype change set.

    Parameters
    ----------
    store : Store
        The store (genotypes are one per embryo: no Dask needed).
    assignments : list of dict, pandas.DataFrame or path-like
        Columns ``embryo_id``, ``genotype``, optional ``allele``,
        ``zygosity``, ``confirmed``, ``confidence``, ``notes``.
    author : str
        Who makes the changes.
    overwrite : bool, default True
        Replace existing genotypes (else such rows are ``skipped``).
    timestamp : str, optional
        One timestamp for the batch (default now).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`pipeline.schema.GENOTYPE_CHANGE_COLUMNS`, one line per
        row; a later row for the same embryo wins (the earlier is ``skipped``
        with reason ``overridden``).

    Raises
    ------
    AssignmentInputError
        If the assignments lack ``embryo_id`` or ``genotype``.
    """
    if not isinstance(author, str) or not author.strip():
        msg = f"author must be a non-empty name, got {author!r}"
        raise ValueError(msg)
    table = read_assignments(assignments)
    missing = [c for c in ("embryo_id", "genotype") if c not in table.columns]
    if missing:
        msg = f"genotype assignments lack the column(s) {', '.join(missing)}; expected embryo_id, genotype and optionally allele, zygosity, confirmed, notes"
        raise AssignmentInputError(msg)
    vocab = store.vocabulary
    genos = {g.upper(): g for g in vocab["genotypes"]}
    zygs = {z.upper(): z for z in vocab["zygosity"]}
    stamp = timestamp or now()
    n = len(table)

    def column(name: str) -> list[Any]:
        return [_text(v) for v in table[name]] if name in table.columns else [None] * n

    embryo, geno, allele, zyg, notes = (column(c) for c in ("embryo_id", "genotype", "allele", "zygosity", "notes"))
    confirmed_raw = table["confirmed"] if "confirmed" in table.columns else pd.Series([False] * n)
    conf_raw = table["confidence"] if "confidence" in table.columns else pd.Series([None] * n)
    records = []
    last_row_of: dict[str, int] = {}
    for i in range(n):
        eid = embryo[i]
        status, reason, new = "assigned", None, None
        conf, conf_error = _confidence(conf_raw[i])
        confirmed, confirmed_error = _boolean(confirmed_raw.iat[i])
        z = zygs.get(zyg[i].upper()) if zyg[i] else None
        if eid is None:
            status, reason = "failed", "missing_embryo_id: the embryo_id cell is empty"
        elif eid not in store.embryos:
            status, reason = "failed", f"unknown_embryo: {eid} is not in this store"
        elif geno[i] is None:
            status, reason = "failed", "missing_genotype: the genotype cell is empty"
        elif geno[i].upper() not in genos:
            status, reason = "failed", f"unknown_genotype: {geno[i]!r}{suggest(geno[i], set(vocab['genotypes']))}; permitted: {', '.join(vocab['genotypes'])}"
        elif zyg[i] and z is None:
            status, reason = "failed", f"unknown_zygosity: {zyg[i]!r}{suggest(zyg[i], set(vocab['zygosity']))}; permitted: {', '.join(vocab['zygosity'])}"
        elif conf_error:
            status, reason = "failed", f"bad_confidence: {conf_error}"
        elif confirmed_error:
            status, reason = "failed", f"bad_confirmed: {confirmed_error}"
        else:
            new = genos[geno[i].upper()]
        old = store.embryos[eid]["genotype"] if eid in store.embryos else None
        old_value = old["value"] if old else None
        if status == "assigned":
            if old is not None and not overwrite:
                status, reason = "skipped", "has_genotype: the embryo already has a genotype (overwrite=False)"
            elif old is not None and old_value == new and old.get("allele") == allele[i] and old.get("zygosity") == z and old.get("confirmed") == confirmed:
                status = "unchanged"
            if status in ("assigned", "unchanged"):
                if eid in last_row_of:
                    prev = records[last_row_of[eid]]
                    if prev["status"] in ("assigned", "unchanged"):
                        prev["status"], prev["reason"] = "skipped", f"overridden: a later row ({i}) wins on this embryo"
                last_row_of[eid] = i
        records.append({
            "embryo_id": eid, "row": i, "old_value": old_value, "new_value": new if new else (geno[i] or None),
            "status": status, "reason": reason, "author": author.strip(), "timestamp": stamp,
            "allele": allele[i], "zygosity": z or zyg[i], "confirmed": confirmed, "confidence": conf, "notes": notes[i],
        })
    frame = pd.DataFrame(records, columns=list(GENOTYPE_CHANGE_COLUMNS))
    if not len(frame):
        return empty_frame(GENOTYPE_CHANGE_COLUMNS)
    return frame.astype(GENOTYPE_CHANGE_COLUMNS)


def _boolean(value: Any) -> tuple[bool, str | None]:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return False, None
    if isinstance(value, bool | np.bool_):
        return bool(value), None
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value), None
    text = str(value).strip().lower()
    if text in ("", "false", "no", "n", "0"):
        return False, None
    if text in ("true", "yes", "y", "1", "confirmed"):
        return True, None
    return False, f"expected yes/no (true/false), got {value!r}"
