"""Generic batch operations: run any function over snips, embryos, videos or experiments.

:func:`map_snips` runs a user function inside ``map_partitions`` (through
:func:`pipeline._partitions.map_parts`) and returns a lazy result with one row
per entity: ``entity_id``, ``level``, ``status`` (``successful``, ``skipped``,
``failed``), ``value`` and ``error``. One failing item never stops the batch.
:func:`to_changes` turns such a result into a change set that
:func:`pipeline.merge_into_store` accepts (phenotypes or flags), so user computations land in the store with provenance.

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
from collections.abc import Callable
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

from pipeline._partitions import map_parts
from pipeline.schema import FLAG_CHANGE_COLUMNS, LEVELS, STRING, empty_frame

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


def map_snips(snips: dd.DataFrame, func: Callable[..., Any], *, level: str = "snip", meta: Any = None, per_item: bool | None = None) -> dd.DataFrame:
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

    Returns
    -------
    dask.dataframe.DataFrame
        One row per item: ``entity_id``, ``level``, ``status``
        (``successful``, ``skipped``, ``failed``), ``value``, ``error``.

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
    return map_parts(
        snips,
        map_snips_partition,
        _result_meta(value_dtype),
        stage="map",
        function=func,
        level=level,
        value_dtype=value_dtype,
        per_item=per_item,
    )


def to_changes(
    result: pd.DataFrame | dd.DataFrame,
    kind: str,
    *,
    author: str,
    snips: dd.DataFrame | None = None,
    flag: str | None = None,
    severity: str = "warning",
    vocabulary: dict[str, Any] | None = None,
) -> pd.DataFrame | dd.DataFrame:
    """Turn a :func:`map_snips` result into a change set for :func:`pipeline.merge_into_store`.

    Parameters
    ----------
    result : pandas.DataFrame or dask.dataframe.DataFrame
        From :func:`map_snips`; only ``successful`` rows become changes.
    kind : {"phenotype", "flag"}
        What to write: the value as a snip's phenotype (snip level), or a flag
        raised on each successful entity (any level; the value becomes the
        flag's notes unless it is a bool).
    author : str
        Who makes the changes (e.g. ``"auto:my_check"``).
    snips : dask.dataframe.DataFrame, optional
        The snip table the result came from: needed for ``phenotype`` (the DEAD
        rules need each embryo's snips).
    flag : str, optional
        For ``kind="flag"``: the flag value to raise.
    severity : str, default "warning"
        For ``kind="flag"``.
    vocabulary : dict, optional
        For ``kind="phenotype"``: the store's vocabulary.

    Returns
    -------
    pandas.DataFrame or dask.dataframe.DataFrame
        A phenotype or flag change set.

    Notes
    -----
    ``kind="phenotype"`` computes *result* once: its rows become assignment
    rows, which are routed to partitions on the client. ``kind="flag"`` stays lazy.
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
    msg = f"kind must be 'phenotype' or 'flag', got {kind!r} (measurement columns cannot be merged yet)"
    raise ValueError(msg)


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
