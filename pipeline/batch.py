"""Generic batch operations: run any function over snips, embryos, videos or experiments.

:func:`map_snips` runs a user function inside ``map_partitions`` (through
:func:`pipeline._partitions.map_parts`) and returns a lazy result with one row
per entity: ``entity_id``, ``level``, ``status`` (``successful``, ``skipped``,
``failed``), ``value`` and ``error``. One failing item never stops the batch.
:func:`to_changes` turns such a result into a change set that
:func:`pipeline.merge_into_store` accepts (phenotypes, flags or measurement
columns), so user computations land in the store with provenance.

Order and locality: the snip table's partitions are already ordered by
experiment, video, embryo and frame (they are sorted by ``snip_id``, which
starts with those ids), and a partition holds whole videos. Every group a
function sees is therefore partition-local and read in storage order: there is
no need to reorder a batch for locality, as the earlier tool did by hand.

Two kinds of function are accepted:

- **vectorised** (one parameter): ``func(part)`` gets a pandas partition. At
  ``level="snip"`` it returns a Series (or one-column DataFrame) aligned to the
  partition's index; at a group level it returns a Series indexed by the group
  id (e.g. ``part.groupby("embryo_id")["area_um2"].mean()``). Fast.
- **per item** (two parameters): ``func(entity_id, item)`` gets one snip (a
  row, as a Series) or one group (a DataFrame). ``None`` or ``False`` means
  skipped; an exception means failed (its message is kept). A Python call per
  item: slower, for code that cannot be vectorised.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

from pipeline._partitions import map_parts
from pipeline.schema import (
    FLAG_CHANGE_COLUMNS,
    LEVELS,
    MEASUREMENT_CHANGE_COLUMNS,
    RESERVED_COLUMNS,
    SNIP_COLUMNS,
    SNIP_INDEX,
    STRING,
    empty_frame,
)

__all__ = ["map_snips", "map_snips_partition", "to_changes", "BATCH_STATUSES"]

BATCH_STATUSES = ("successful", "skipped", "failed")
_GROUP_COLUMN = {"snip": None, "image": "image_id", "embryo": "embryo_id", "video": "video_id", "experiment": "experiment_id"}

def _result_meta(value_dtype: Any) -> pd.DataFrame:
    return empty_frame({"entity_id": STRING, "level": STRING, "status": STRING, "value": value_dtype, "error": STRING})


def _is_per_item(func: Callable[..., Any]) -> bool:
    try:
        params = [
            p
            for p in inspect.signature(func).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def map_snips_partition(part: pd.DataFrame, function: Callable[..., Any], *, level: str = "snip", value_dtype: Any = object, per_item: bool | None = None) -> pd.DataFrame:
    """Run *func* over one partition (the pandas twin of :func:`map_snips`).

    Parameters
    ----------
    part : pandas.DataFrame
        One partition of the snip table.
    function : callable
        Vectorised ``function(part)`` or per-item ``function(entity_id, item)``.
    level : str, default "snip"
        ``snip``, ``image``, ``embryo``, ``video`` or ``experiment``.
    value_dtype : dtype, default object
        dtype of the ``value`` column.
    per_item : bool, optional
        Force the kind of *func* (default: two required parameters mean per item).

    Returns
    -------
    pandas.DataFrame
        ``entity_id``, ``level``, ``status``, ``value``, ``error``.
    """
    func = function
    column = _GROUP_COLUMN[level]
    per_item = _is_per_item(func) if per_item is None else per_item
    if column is None:
        keys = part.index.to_numpy(dtype=object)
    else:
        keys = pd.unique(part[column].to_numpy(dtype=object))
    if per_item:
        items = part.iterrows() if column is None else part.groupby(column, sort=False, observed=True)
        ids_, status, values, errors = [], [], [], []
        for key, item in items:
            # A Python call per item is what per-item functions ask for.
            try:
                value = func(key, item)
            except Exception as err:  # noqa: BLE001 - a failing item is reported, never fatal
                ids_.append(key)
                status.append("failed")
                values.append(None)
                errors.append(f"{type(err).__name__}: {err}")
                continue
            skipped = value is None or (isinstance(value, bool | np.bool_) and not value)
            ids_.append(key)
            status.append("skipped" if skipped else "successful")
            values.append(None if skipped else value)
            errors.append(None)
        return _frame(ids_, level, status, values, errors, value_dtype)
    try:
        out = func(part)
    except Exception as err:  # noqa: BLE001 - the whole partition fails, reported per entity
        message = f"{type(err).__name__}: {err} (partition {part.index[0] if len(part) else '-'}..{part.index[-1] if len(part) else '-'})"
        return _frame(list(keys), level, ["failed"] * len(keys), [None] * len(keys), [message] * len(keys), value_dtype)
    if isinstance(out, pd.DataFrame):
        if out.shape[1] != 1:
            msg = f"a vectorised function must return a Series or a one-column DataFrame, got columns {list(out.columns)}"
            raise TypeError(msg)
        out = out.iloc[:, 0]
    if not isinstance(out, pd.Series):
        out = pd.Series(out, index=part.index if column is None else keys)
    out = out.reindex(pd.Index(keys, dtype=object))
    skipped = out.isna().to_numpy() | out.map(lambda v: v is False).to_numpy(dtype=bool)
    status = np.where(skipped, "skipped", "successful")
    values = out.where(~skipped, None).to_numpy(dtype=object)
    return _frame(list(keys), level, status, values, [None] * len(keys), value_dtype)


def _frame(ids_: list[Any], level: str, status: Any, values: Any, errors: list[Any], value_dtype: Any) -> pd.DataFrame:
    n = len(ids_)
    frame = pd.DataFrame(
        {
            "entity_id": pd.array([str(i) for i in ids_], dtype=STRING),
            "level": pd.array([level] * n, dtype=STRING),
            "status": pd.array(list(status), dtype=STRING),
            "value": pd.Series(list(values), dtype=object),
            "error": pd.array(errors, dtype=STRING),
        }
    )
    frame["value"] = frame["value"].astype(value_dtype) if value_dtype is not object else frame["value"]
    return frame


def map_snips(
    snips: dd.DataFrame,
    func: Callable[..., Any],
    *,
    level: str = "snip",
    meta: Any = None,
    per_item: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dd.DataFrame | pd.DataFrame:
    """Run a function over every snip, image, embryo, video or experiment: lazy.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame
        The snip table (:func:`pipeline.snips_from_store`).
    func : callable
        Vectorised ``func(part)`` or per-item ``func(entity_id, item)`` (see the
        module docstring). A top-level function, so it pickles to workers.
    level : str, default "snip"
        What an item is: ``snip``, ``image``, ``embryo``, ``video`` or ``experiment``.
        Partitions hold whole videos, so only ``experiment`` groups can span
        partitions; an experiment-level function sees one partition's part of
        an experiment at a time (reduce the results yourself).
    meta : dtype, optional
        dtype of the ``value`` column (e.g. ``"float64"``); default object.
    per_item : bool, optional
        Force the kind of *func*; default: two required parameters mean per item.
    progress : callable, optional
        ``progress(done, total)``: compute the result here, calling it as
        partitions finish (``total`` is ``snips.npartitions``, see
        :func:`pipeline.cluster.compute`), and return it computed. Default:
        compute nothing and return the lazy result.

    Returns
    -------
    dask.dataframe.DataFrame or pandas.DataFrame
        One row per item: ``entity_id``, ``level``, ``status``
        (``successful``, ``skipped``, ``failed``), ``value``, ``error``.
        Lazy, unless *progress* is given: then a pandas DataFrame.

    Notes
    -----
    Lazy without *progress*; with it, triggers computation on the active
    client (:func:`pipeline.cluster.get_client`) or Dask's local scheduler.

    Examples
    --------
    >>> import pipeline
    >>> snips = pipeline.snips_from_store(pipeline.testing.make_store(n_experiments=1, n_embryos=2, n_frames=4, seed=0))
    >>> def mean_area(embryo_id, group):
    ...     return float(group["area_um2"].mean())
    >>> result = map_snips(snips, mean_area, level="embryo", meta="float64").compute()
    >>> result["status"].tolist()
    ['successful', 'successful']
    """
    if level not in LEVELS:
        msg = f"level must be one of {', '.join(LEVELS)}, got {level!r}"
        raise ValueError(msg)
    value_dtype = np.dtype(object) if meta is None else (pd.api.types.pandas_dtype(meta))
    result = map_parts(
        snips,
        map_snips_partition,
        _result_meta(value_dtype),
        stage="map",
        function=func,
        level=level,
        value_dtype=value_dtype,
        per_item=per_item,
    )
    if progress is None:
        return result
    from pipeline.cluster import compute

    return compute(result, progress=progress, stage="map")


def to_changes(
    result: pd.DataFrame | dd.DataFrame,
    kind: str,
    *,
    author: str,
    snips: dd.DataFrame | pd.DataFrame | None = None,
    flag: str | None = None,
    severity: str = "warning",
    vocabulary: dict[str, Any] | None = None,
    column: str | None = None,
) -> pd.DataFrame | dd.DataFrame:
    """Turn a :func:`map_snips` result into a change set for :func:`pipeline.merge_into_store`.

    Parameters
    ----------
    result : pandas.DataFrame or dask.dataframe.DataFrame
        From :func:`map_snips`; only ``successful`` rows become changes
        (skipped and failed items change nothing).
    kind : {"phenotype", "flag", "measurement"}
        What to write: the value as a snip's phenotype (snip level); a flag
        raised on each successful entity (any level; the value becomes the
        flag's notes unless it is a bool); or the value as the snip's
        measurement *column* (snip level, numbers).
    author : str
        Who makes the changes (e.g. ``"auto:my_check"``).
    snips : dask.dataframe.DataFrame or pandas.DataFrame, optional
        The snip table the result came from. Needed for ``phenotype`` (the
        DEAD rules need each embryo's snips) and ``measurement`` (each snip's
        embryo and current value).
    flag : str, optional
        For ``kind="flag"``: the flag value to raise.
    severity : str, default "warning"
        For ``kind="flag"``.
    vocabulary : dict, optional
        For ``kind="phenotype"``: the store's vocabulary.
    column : str, optional
        For ``kind="measurement"``: the measurement key to write (a new or an
        existing measurement column); not one of the snip table's own columns
        (:data:`pipeline.schema.RESERVED_COLUMNS`).

    Returns
    -------
    pandas.DataFrame or dask.dataframe.DataFrame
        A phenotype, flag or measurement change set. The measurement change
        set has exactly :data:`pipeline.schema.MEASUREMENT_CHANGE_COLUMNS`,
        one row per successful snip, in the result's order: ``old_value`` is
        the snip's current value of *column* (NaN if the table has no such
        column or the snip no value), ``new_value`` the result's value as a
        float; ``status`` is ``assigned``, ``unchanged`` (the same value, or
        both missing) or ``failed`` (``reason`` names the snip and the value:
        not a real number, not finite, or a snip the table lacks), and every
        row carries *author* and one ISO-8601 UTC ``timestamp`` for the batch.

    Raises
    ------
    ValueError
        For an empty *author*, an unknown *kind*, a missing argument the kind
        needs, a *column* that is one of the snip table's own columns, a
        result of another level than ``snip`` for ``measurement`` (for a lazy
        result, raised when it is computed), or a lazy result whose
        partitions do not match the lazy *snips*.

    Notes
    -----
    ``kind="phenotype"`` computes *result* once: its rows become assignment
    rows, which are routed to partitions on the client. ``kind="flag"`` stays
    lazy. ``kind="measurement"`` stays lazy for a lazy result: partition *i*
    of the result is matched, by snip id, with partition *i* of *snips* (as
    :func:`map_snips` leaves them); for a computed result, the two columns it
    needs of a lazy *snips* are computed here.

    Examples
    --------
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=2, n_frames=3, seed=0)
    >>> snips = pipeline.snips_from_store(store)
    >>> def length_mm(part):
    ...     return part["length_um"] / 1000
    >>> result = map_snips(snips, length_mm, meta="float64")
    >>> changes = to_changes(result, "measurement", column="length_mm", author="me", snips=snips)
    >>> computed = changes.compute(scheduler="sync")
    >>> len(computed) == store.counts()["snips"], set(computed["status"])
    (True, {'assigned'})
    """
    if not isinstance(author, str) or not author.strip():
        msg = f"author must be a non-empty name, got {author!r}"
        raise ValueError(msg)
    if kind == "flag":
        if not flag:
            msg = "to_changes(kind='flag') needs flag=<value>, e.g. flag='LOW_CONFIDENCE'"
            raise ValueError(msg)
        return _apply(result, _flag_changes, empty_frame(FLAG_CHANGE_COLUMNS), flag=flag, severity=severity, author=author)
    if kind == "phenotype":
        from pipeline.phenotypes import assign_phenotypes

        if snips is None:
            msg = "to_changes(kind='phenotype') needs snips=<the snip table> to apply the DEAD rules"
            raise ValueError(msg)
        done = result.compute() if isinstance(result, dd.DataFrame) else result
        done = done.loc[(done["status"] == "successful") & (done["level"] == "snip")]
        embryo = done["entity_id"].str.replace(r"_[st]?\d{3,4}$", "", regex=True)
        rows = pd.DataFrame({"embryo_id": embryo.to_numpy(dtype=object), "phenotype": done["value"].astype(str).to_numpy(dtype=object),
                             "frames": [[s] for s in done["entity_id"].to_numpy(dtype=object)]})
        return assign_phenotypes(snips, rows, author=author, vocabulary=vocabulary)
    if kind == "measurement":
        return _measurement_changes(result, snips, column, author)
    msg = f"kind must be 'phenotype', 'flag' or 'measurement', got {kind!r}"
    raise ValueError(msg)


def _check_column(column: Any) -> str:
    """The measurement key *column*, or a ValueError saying what is wrong and how to fix it."""
    if not isinstance(column, str) or not column.strip():
        msg = f"to_changes(kind='measurement') needs column=<the measurement key to write>, e.g. column='length_mm'; got {column!r}"
        raise ValueError(msg)
    if column in RESERVED_COLUMNS or column in SNIP_COLUMNS or column == SNIP_INDEX:
        msg = (
            f"column {column!r} is one of the snip table's own columns (or a field of the store), "
            f"so a measurement cannot take that name; pick another name, e.g. {column + '_measured'!r}"
        )
        raise ValueError(msg)
    return column


def _measurement_changes(
    result: pd.DataFrame | dd.DataFrame,
    snips: dd.DataFrame | pd.DataFrame | None,
    column: Any,
    author: str,
) -> pd.DataFrame | dd.DataFrame:
    from pipeline.store import now

    column = _check_column(column)
    if snips is None:
        msg = "to_changes(kind='measurement') needs snips=<the snip table> for each snip's embryo and current value"
        raise ValueError(msg)
    wanted = ["embryo_id", column] if column in snips.columns else ["embryo_id"]
    table = snips[wanted]
    meta = empty_frame(MEASUREMENT_CHANGE_COLUMNS)
    options = {"column": column, "author": author, "timestamp": now()}
    if not isinstance(result, dd.DataFrame):
        lookup = table.compute() if isinstance(table, dd.DataFrame) else table
        return _measurement_part(result, lookup, **options)
    if not isinstance(table, dd.DataFrame):
        return map_parts(result, _measurement_part, meta, stage="changes", table=table, **options)
    if table.npartitions != result.npartitions:
        msg = (
            f"the result has {result.npartitions} partition(s) but snips has {table.npartitions}: pass the snip "
            "table the result was computed from (map_snips keeps its partitions), or compute the result first"
        )
        raise ValueError(msg)
    return map_parts(result, _measurement_part, meta, table, stage="changes", **options)


def _as_number(value: Any) -> tuple[float, str | None]:
    """*value* as a float, or NaN and why it is not a measurement."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return np.nan, f"{value!r} ({type(value).__name__}) is not a number"
    number = float(value)
    if np.isinf(number):
        return np.nan, f"{value!r} is not a finite number (the store holds JSON numbers)"
    return number, None


def _measurement_part(
    part: pd.DataFrame,
    table: pd.DataFrame | None = None,
    *,
    column: str,
    author: str,
    timestamp: str,
) -> pd.DataFrame:
    levels = part["level"].dropna().unique().tolist()
    if any(level != "snip" for level in levels):
        msg = (
            f"to_changes(kind='measurement') writes snip measurements, but the result is at level "
            f"{', '.join(sorted(map(str, levels)))}: run map_snips(..., level='snip')"
        )
        raise ValueError(msg)
    ok = part.loc[(part["status"] == "successful").to_numpy(dtype=bool)]
    ids = ok["entity_id"].to_numpy(dtype=object)
    found = table.reindex(pd.Index(ids, dtype=table.index.dtype)) if table is not None else None
    known = found["embryo_id"].notna().to_numpy(dtype=bool) if found is not None else np.zeros(len(ids), dtype=bool)
    old = (
        found[column].to_numpy(dtype=np.float64, na_value=np.nan)
        if found is not None and column in found.columns
        else np.full(len(ids), np.nan)
    )
    values = ok["value"]
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        new = values.to_numpy(dtype=np.float64, na_value=np.nan)
        problems: list[str | None] = [
            None if np.isfinite(v) or np.isnan(v) else f"{float(v)!r} is not a finite number (the store holds JSON numbers)" for v in new
        ]
        new = np.where(np.isinf(new), np.nan, new)
    else:
        parsed = [_as_number(v) for v in values.to_numpy(dtype=object)]
        new = np.array([p[0] for p in parsed], dtype=np.float64)
        problems = [p[1] for p in parsed]
    status, reasons = [], []
    for i, snip in enumerate(ids):
        if not known[i]:
            status.append("failed")
            reasons.append(f"snip {snip}: not in the snip table (pass the snips the result was computed from)")
        elif problems[i] is not None:
            status.append("failed")
            reasons.append(f"snip {snip}: value {problems[i]}; a measurement must be a real number")
        elif new[i] == old[i] or (np.isnan(new[i]) and np.isnan(old[i])):
            status.append("unchanged")
            reasons.append(None)
        else:
            status.append("assigned")
            reasons.append(None)
    n = len(ids)
    embryo = found["embryo_id"].to_numpy(dtype=object) if found is not None else [None] * n
    return pd.DataFrame(
        {
            "snip_id": pd.array(ids, dtype=STRING),
            "embryo_id": pd.array(embryo, dtype=STRING),
            "column": pd.array([column] * n, dtype=STRING),
            "old_value": old,
            "new_value": np.where(np.array([s == "failed" for s in status], dtype=bool), np.nan, new),
            "status": pd.array(status, dtype=STRING),
            "reason": pd.array(reasons, dtype=STRING),
            "author": pd.array([author] * n, dtype=STRING),
            "timestamp": pd.array([timestamp] * n, dtype=STRING),
        }
    ).astype(MEASUREMENT_CHANGE_COLUMNS)


def _apply(result: pd.DataFrame | dd.DataFrame, func: Callable[..., pd.DataFrame], meta: pd.DataFrame, **kwargs: Any) -> pd.DataFrame | dd.DataFrame:
    if isinstance(result, dd.DataFrame):
        return map_parts(result, func, meta, stage="changes", **kwargs)
    return func(result, **kwargs)


def _flag_changes(part: pd.DataFrame, *, flag: str, severity: str, author: str) -> pd.DataFrame:
    ok = part.loc[part["status"] == "successful"]
    values = ok["value"].to_numpy(dtype=object)
    notes = [None if isinstance(v, bool | np.bool_) else str(v) for v in values]
    n = len(ok)
    return pd.DataFrame(
        {
            "entity_id": ok["entity_id"].to_numpy(),
            "level": ok["level"].to_numpy(),
            "flag": [flag] * n,
            "severity": [severity] * n,
            "notes": notes,
            "confidence": np.full(n, np.nan),
            "detector": [author.removeprefix("auto:")] * n,
            "author": [author] * n,
            "status": ["raised"] * n,
            "reason": [None] * n,
        }
    ).astype(FLAG_CHANGE_COLUMNS)
