"""The one place where pandas code is lifted onto Dask.

Every stage that works partition by partition goes through :func:`map_parts`,
which always passes an explicit ``meta`` and checks each partition's result
against it, so a schema slip surfaces as a :class:`MetaMismatchError` naming the
stage instead of a confusing failure later. :func:`from_pieces` turns pandas
pieces into a Dask DataFrame with known divisions and a cheap token (the pieces
are never hashed value by value). With a ``distributed`` client active, the
pieces are scattered to the workers first and the graph holds only their
futures, so it stays small however large the table (no "Sending large graph").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import dask.dataframe as dd
import pandas as pd

from pipeline.errors import MetaMismatchError

__all__ = ["from_pieces", "map_parts", "check_meta"]


class _Piece:
    """A pandas piece with a cheap Dask token (hashing a million rows is not)."""

    __slots__ = ("frame", "token")

    def __init__(self, frame: pd.DataFrame, token: str) -> None:
        self.frame = frame
        self.token = token

    def __dask_tokenize__(self) -> str:
        return self.token


def _unwrap(piece: _Piece) -> pd.DataFrame:
    return piece.frame


def _identity(part: pd.DataFrame) -> pd.DataFrame:
    return part


def from_pieces(
    pieces: Sequence[pd.DataFrame],
    meta: pd.DataFrame,
    divisions: Sequence[Any],
    *,
    label: str = "flatten",
) -> dd.DataFrame:
    """Build a Dask DataFrame from in-memory pandas pieces.

    Parameters
    ----------
    pieces : sequence of pandas.DataFrame
        The partitions, in index order.
    meta : pandas.DataFrame
        Empty frame with the columns and dtypes of every piece.
    divisions : sequence
        ``len(pieces) + 1`` index boundaries (first of each piece, then the last).
    label : str, default "flatten"
        Task-name prefix shown on the dashboard.

    Returns
    -------
    dask.dataframe.DataFrame
        Lazy frame over the pieces.

    Notes
    -----
    With an active ``distributed`` client (:func:`pipeline.cluster.get_client`)
    the pieces are scattered to its workers now, and the collection must be
    computed on that client. A worker that dies takes its pieces with it: a
    computation that needs them then fails with
    :class:`pipeline.cluster.ClusterError` (nothing is written), rather than
    the table being copied into every task.
    """
    from pipeline.cluster import get_client, scatter_pieces

    client = get_client()
    if client is not None and len(pieces):
        futures = scatter_pieces(client, pieces, label)
        return dd.from_map(
            _identity,
            futures,
            meta=meta,
            divisions=tuple(divisions),
            label=label,
            enforce_metadata=False,
        )
    token = uuid.uuid4().hex
    wrapped = [_Piece(p, f"{token}-{i}") for i, p in enumerate(pieces)]
    return dd.from_map(
        _unwrap,
        wrapped,
        meta=meta,
        divisions=tuple(divisions),
        label=label,
        enforce_metadata=False,
    )


def check_meta(part: pd.DataFrame, meta: pd.DataFrame, stage: str) -> pd.DataFrame:
    """Raise :class:`MetaMismatchError` unless *part* matches *meta*.

    Parameters
    ----------
    part : pandas.DataFrame
        A computed partition.
    meta : pandas.DataFrame
        The promised schema.
    stage : str
        Name of the stage, for the message.

    Returns
    -------
    pandas.DataFrame
        *part*, unchanged.
    """
    got = part.dtypes.to_dict()
    want = meta.dtypes.to_dict()
    if list(got) != list(want) or any(str(got[c]) != str(want[c]) for c in want):
        diff = {
            c: (str(got.get(c)), str(want.get(c)))
            for c in set(got) | set(want)
            if str(got.get(c)) != str(want.get(c))
        }
        msg = f"stage {stage!r} produced columns/dtypes that differ from its meta: {diff} (got, expected)"
        raise MetaMismatchError(msg)
    return part


def _apply(
    part: pd.DataFrame,
    *others: pd.DataFrame,
    _func: Callable[..., pd.DataFrame],
    _meta: pd.DataFrame,
    _stage: str,
    **kwargs: Any,
) -> pd.DataFrame:
    return check_meta(_func(part, *others, **kwargs), _meta, _stage)


def map_parts(
    snips: dd.DataFrame,
    func: Callable[..., pd.DataFrame],
    meta: pd.DataFrame,
    *others: dd.DataFrame,
    stage: str,
    **kwargs: Any,
) -> dd.DataFrame:
    """Run a pandas function on every partition, with an explicit, checked meta.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame
        The input.
    func : callable
        ``func(part, *other_parts, **kwargs) -> pandas.DataFrame``; a top-level
        function so it pickles to workers.
    meta : pandas.DataFrame
        Empty frame with the output's columns and dtypes.
    *others : dask.dataframe.DataFrame
        Collections with as many partitions as *snips*: partition ``i`` of each
        is passed with partition ``i`` of *snips* (how large inputs such as
        assignment tables travel: never baked into the task graph).
    **kwargs
        Small parameters passed to *func*.
    stage : str
        Label shown on the dashboard (``"assign"``, ``"detect"``, ...).

    Returns
    -------
    dask.dataframe.DataFrame
        Lazy result; its divisions are unknown (results are change sets).
    """
    return snips.map_partitions(
        _apply,
        *others,
        _func=func,
        _meta=meta,
        _stage=stage,
        **kwargs,
        meta=meta,
        token=f"{stage}-{uuid.uuid4().hex[:8]}",
        enforce_metadata=False,
        align_dataframes=False,
        clear_divisions=True,
    )
