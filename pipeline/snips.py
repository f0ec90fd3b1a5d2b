"""Stage 2: flatten a store into a snip-level Dask DataFrame.

One row per snip, index ``snip_id`` (sorted, known divisions), the columns of
:data:`pipeline.schema.SNIP_COLUMNS` and one ``float64`` column per measurement
key. The table is built once when the store is read (see
:mod:`pipeline._tables`); this module only cuts it into partitions.

Invariant: **no video, hence no embryo, spans two partitions.** Snip ids start
with their video id, so after sorting by ``snip_id`` every video is one
contiguous block, and partition boundaries are only ever placed between
blocks. Per-embryo and per-video work (frame ranges, detectors, time series)
is therefore partition-local, and no result depends on ``npartitions``. The
order (experiment, video, embryo, snip) is also a locality-friendly order for
batch work: there is no separate reordering step.
"""

from __future__ import annotations

import itertools
import math

import dask.dataframe as dd
import numpy as np
import pandas as pd

from pipeline._arrow import differs_from_previous
from pipeline._partitions import from_pieces
from pipeline.store import Store

__all__ = ["snips_from_store", "snip_meta", "partition_bounds", "TARGET_PARTITION_SNIPS"]

#: Snips per partition when ``npartitions`` is not given.
TARGET_PARTITION_SNIPS = 100_000


def snip_meta(store: Store) -> pd.DataFrame:
    """The empty snip table of *store*: its columns, dtypes and index.

    Parameters
    ----------
    store : Store
        The store.

    Returns
    -------
    pandas.DataFrame
        Zero rows.
    """
    return store.snip_table().iloc[:0]


def partition_bounds(video_ids: pd.Series | np.ndarray, npartitions: int) -> list[tuple[int, int]]:
    """Cut a video-sorted table into at most *npartitions* runs of whole videos.

    Parameters
    ----------
    video_ids : array-like of str
        The video of every row, each video one contiguous block.
    npartitions : int
        Wanted number of partitions; fewer are returned when there are fewer videos.

    Returns
    -------
    list of (int, int)
        ``(start, stop)`` row positions of each partition.

    Examples
    --------
    >>> partition_bounds(np.array(["a", "a", "b", "c", "c", "c"]), 2)
    [(0, 3), (3, 6)]
    """
    n = len(video_ids)
    if n == 0:
        return [(0, 0)]
    # Positions where a new video starts: the only legal cut points.
    starts = np.flatnonzero(np.r_[True, differs_from_previous(video_ids)])
    wanted = np.linspace(0, n, max(1, npartitions) + 1)[1:-1]
    cuts = np.unique(starts[np.clip(np.searchsorted(starts, wanted), 0, len(starts) - 1)])
    cuts = cuts[(cuts > 0) & (cuts < n)]
    edges = [0, *cuts.tolist(), n]
    return list(itertools.pairwise(edges))


def snips_from_store(store: Store, npartitions: int | None = None, *, measurements: list[str] | None = None) -> dd.DataFrame:
    """Flatten a store into a snip-level Dask DataFrame.

    Parameters
    ----------
    store : Store
        A store from :func:`pipeline.read_store` or :func:`pipeline.testing.make_store`.
    npartitions : int, optional
        Number of partitions; default one per ~100,000 snips. Partitions hold
        whole videos, so there may be fewer. A sharded store has one partition
        per experiment, read by the workers (*npartitions* is ignored).
    measurements : list of str, optional
        Sharded stores only: the measurement columns (default those of the
        smallest shard; a shard with others raises a clear error).

    Returns
    -------
    dask.dataframe.DataFrame
        Index ``snip_id`` with known divisions; columns as in
        :data:`pipeline.schema.SNIP_COLUMNS` plus one float column per
        measurement key.

    Notes
    -----
    Rows are ordered by snip id, which sorts by experiment, video, embryo and
    then frame, and partitions are cut only between videos. Per-embryo and
    per-video work therefore reads contiguous rows of one partition: the
    locality the earlier tool got by reordering its batches by hand comes
    with the table, and no operation here needs (or offers) a reorder step.

    Examples
    --------
    >>> from pipeline.testing import make_store
    >>> snips = snips_from_store(make_store(n_experiments=2, n_embryos=3, n_frames=4, seed=0), npartitions=2)
    >>> snips.npartitions, snips.known_divisions
    (2, True)
    """
    from pipeline.shards import ShardedStore, sharded_snips

    if isinstance(store, ShardedStore):
        return sharded_snips(store, measurements)
    table = store.snip_table()
    if npartitions is None:
        npartitions = max(1, math.ceil(len(table) / TARGET_PARTITION_SNIPS))
    if npartitions < 1:
        msg = f"npartitions must be at least 1, got {npartitions}"
        raise ValueError(msg)
    bounds = partition_bounds(table["video_id"], npartitions)
    pieces = [table.iloc[a:b] for a, b in bounds]
    if len(table) == 0:
        divisions: list[object] = [None, None]
    else:
        divisions = [piece.index[0] for piece in pieces] + [pieces[-1].index[-1]]
    return from_pieces(pieces, snip_meta(store), divisions, label="flatten")
