"""Stage 6: export the snip table, the flags and the change log to files.

Consumes a snip-level Dask DataFrame (:func:`pipeline.snips_from_store`, or
any later stage) or a pandas table, and produces:

- **Parquet** (:func:`write_parquet`): a folder written by Dask's
  ``to_parquet`` with pyarrow, hive-partitioned by low-cardinality string
  columns (``experiment_id=20240411/part.00000.parquet``), file names that sort,
  and provenance (store path, store ``last_updated``, package version, export
  time) in every file's metadata under the key ``b"embryo_pipeline"``;
- **Feather** and **HDF5** (PyTables, ``format="table"``): one file each;
- **CSV**: one file, for people and spreadsheets.

Every writer computes (it is a ``write_*`` function) through
:func:`pipeline.cluster.compute`, so it takes ``progress=callable(done,
total)`` (called as partitions are computed: for Parquet, as partition files
are written) and never writes in place.
A Parquet export is written into a new sibling folder ``OUT.tmp-<random>``,
then swapped in with two renames (``OUT`` to ``OUT.old-<random>``, the new
folder to ``OUT``) and the old one is deleted; a single file is written beside
its target and ``os.replace``-d over it. An export that fails or is interrupted
leaves the previous export untouched.

Reading back: ``pandas.read_parquet(OUT)``, ``pyarrow.dataset.dataset(OUT,
partitioning="hive")`` and ``dask.dataframe.read_parquet(OUT, filters=...)``
return the same rows and values. Hive partition columns come back last and
as categoricals (dictionary-encoded in pyarrow), and rows come back grouped by
partition folder: cast them back to strings and sort by ``snip_id`` to get the
original table, or use :func:`read_table`, which does both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dask.dataframe.io.parquet.arrow import ArrowDatasetEngine
from pyarrow import feather

from pipeline._atomic import backup_dir, fsync_dir, lock_path
from pipeline._partitions import map_parts
from pipeline.errors import PipelineError
from pipeline.schema import SNIP_COLUMNS, SNIP_INDEX, STRING
from pipeline.store import Store, now, paused_gc, read_store

__all__ = [
    "write_parquet",
    "write_feather",
    "write_hdf5",
    "write_csv",
    "write_table",
    "export_store",
    "read_table",
    "ExportResult",
    "ExportError",
    "FORMATS",
    "WHAT",
    "PROVENANCE_KEY",
    "MAX_PARTITION_VALUES",
    "part_name",
    "prepare_partition",
]

#: Output formats, as the ``--format`` option spells them.
FORMATS: tuple[str, ...] = ("parquet", "feather", "hdf5", "csv")

#: Tables a store export can hold, as the ``--what`` option spells them.
WHAT: tuple[str, ...] = ("snips", "flags", "changes")

#: Key of the provenance JSON in every Parquet/Feather file's schema metadata
#: (and the attribute name in HDF5).
PROVENANCE_KEY = b"embryo_pipeline"

#: Most distinct values a hive partition column may have: one folder per value,
#: and a folder per snip or per embryo makes a dataset every reader crawls.
MAX_PARTITION_VALUES = 10_000

#: Default hive partitioning of each table.
DEFAULT_PARTITION_ON: dict[str, tuple[str, ...]] = {
    "snips": ("experiment_id",),
    "flags": ("level",),
    "changes": (),
}

#: Dtypes of the flags table (``Store.flags_table``), to restore after CSV/HDF5.
FLAG_COLUMNS: dict[str, Any] = {
    "level": STRING,
    "entity_id": STRING,
    "flag": STRING,
    "severity": STRING,
    "author": STRING,
    "timestamp": STRING,
    "auto_generated": np.dtype("bool"),
    "notes": STRING,
    "confidence": np.dtype("float64"),
}

#: Text columns where an empty string is a value, never missing (``flag_list``
#: of a snip without flags): CSV cannot tell the two apart.
_EMPTY_TEXT_COLUMNS = ("flag_list",)

_HDF_KEY = "table"
_PROVENANCE_ATTR = PROVENANCE_KEY.decode()


class ExportError(PipelineError, ValueError):
    """An export was refused: bad target, unknown column or unusable partition column."""


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes
    ----------
    path : pathlib.Path
        The folder (Parquet) or file written.
    format : str
        One of :data:`FORMATS`.
    rows : int
        Rows written.
    files : int
        Data files written (1 for single-file formats).
    columns : list of str
        Columns written, the index (e.g. ``snip_id``) first.
    partition_on : list of str
        Hive partition columns (Parquet only).
    provenance : dict
        The provenance stored in the file metadata.
    """

    path: Path
    format: str
    rows: int
    files: int
    columns: list[str] = field(default_factory=list)
    partition_on: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for people, e.g. ``12 rows in 2 files in out/ (parquet, ...)``."""
        where = f"{self.path}/" if self.format == "parquet" else str(self.path)
        parts = (
            f", partitioned by {', '.join(self.partition_on)}"
            if self.partition_on
            else ""
        )
        return f"wrote {self.rows:,} rows in {self.files:,} file(s) to {where} ({self.format}{parts})"


def part_name(i: int) -> str:
    """File name of the *i*-th partition: zero-padded so names sort.

    A top-level function, so it pickles to ``distributed`` workers.

    Parameters
    ----------
    i : int
        Partition number.

    Returns
    -------
    str
        The file name.

    Examples
    --------
    >>> part_name(7)
    'part.00007.parquet'
    """
    return f"part.{i:05d}.parquet"


# ------------------------------------------------------------------ provenance
def _provenance(store: Store | None, **extra: Any) -> dict[str, Any]:
    from pipeline import __version__

    info: dict[str, Any] = {
        "store_path": None,
        "store_last_updated": None,
        "package": "embryo-pipeline",
        "package_version": __version__,
        "exported_at": now(),
    }
    if store is not None:
        info["store_path"] = str(store.path.resolve()) if store.path else None
        info["store_last_updated"] = store.head.get("file_info", {}).get("last_updated")
    info.update(extra)
    return info


def _provenance_bytes(info: dict[str, Any]) -> bytes:
    return json.dumps(info, sort_keys=True).encode()


# --------------------------------------------------------------- target checks
def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _source(store: Store | None) -> Path | None:
    return store.path if store is not None else None


def _check_target(out: Path, source: Path | None, *, folder: bool) -> None:
    """Refuse targets that would touch the source store or a non-export."""
    target = out.resolve()
    if source is not None:
        src = source.resolve()
        protected = {
            src: "the source store",
            lock_path(src): "the source store's lock file",
            src.with_name(f"{src.stem}.changes.jsonl"): "the source store's change log",
        }
        if target in protected:
            msg = f"refusing to export to {str(out)!r}: it is {protected[target]}; choose another output path"
            raise ExportError(msg)
        if _is_within(target, backup_dir(src)):
            msg = f"refusing to export to {str(out)!r}: it is inside the store's backups folder {str(backup_dir(src))!r}"
            raise ExportError(msg)
        if target in src.parents:
            msg = (
                f"refusing to export to {str(out)!r}: that folder contains the source store {str(src)!r}, "
                "and an export replaces its output folder as a whole; choose a new folder"
            )
            raise ExportError(msg)
    if folder:
        if out.exists() and not out.is_dir():
            msg = f"{str(out)!r} exists and is a file; a Parquet export is a folder: choose another path"
            raise ExportError(msg)
        if out.is_dir():
            stray = _non_export_entry(out)
            if stray is not None:
                msg = (
                    f"refusing to replace {str(out)!r}: it holds {str(stray)!r}, which is not part of a "
                    "Parquet export; an export replaces its folder as a whole, so choose a new or empty folder"
                )
                raise ExportError(msg)
    elif out.is_dir():
        msg = f"{str(out)!r} is a folder; this format writes a single file: give a file name"
        raise ExportError(msg)


def _non_export_entry(folder: Path) -> Path | None:
    """The first entry of *folder* that a Parquet export would not contain."""
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        for d in dirs:
            if "=" not in d:
                return here / d
        for f in files:
            if not (
                f.endswith(".parquet")
                or f in ("_metadata", "_common_metadata", "_SUCCESS")
            ):
                return here / f
    return None


# ----------------------------------------------------------------- swapping in
def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _fsync_tree(folder: Path) -> None:
    # Renaming a folder is atomic, but its files' data must reach the disk
    # before the rename does, or a power cut could expose empty files.
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def _swap_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder *tmp* at *out*, replacing a previous export.

    Two renames: the previous export moves aside, the new one takes its name,
    then the previous one is deleted. Between the renames (microseconds) *out*
    does not exist; at no moment is it partly written.
    """
    _fsync_tree(tmp)
    parent = out.parent
    if out.exists():
        old = _sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
        fsync_dir(parent)


@contextlib.contextmanager
def _temporary_file(out: Path) -> Any:
    """Yield a temporary path beside *out*; on success ``os.replace`` it over *out*."""
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


# ------------------------------------------------------------------ columns
def _index_name(meta: pd.DataFrame) -> str | None:
    return meta.index.name


def _select_columns(
    meta: pd.DataFrame, columns: Iterable[str] | None, partition_on: Sequence[str]
) -> list[str]:
    """The data columns to write: *columns* (in order) plus any partition column."""
    available = list(meta.columns)
    if columns is None:
        return available
    wanted = [c for c in dict.fromkeys(columns) if c != meta.index.name]
    unknown = [c for c in wanted if c not in available]
    if unknown:
        msg = f"unknown column(s) {', '.join(map(repr, unknown))}; available: {', '.join(available)}"
        raise ExportError(msg)
    return wanted + [c for c in partition_on if c not in wanted]


def _check_partition_columns(meta: pd.DataFrame, partition_on: Sequence[str]) -> None:
    for col in partition_on:
        if col not in meta.columns:
            msg = f"cannot partition on {col!r}: no such column; available: {', '.join(meta.columns)}"
            raise ExportError(msg)
        dtype = meta[col].dtype
        if isinstance(dtype, pd.CategoricalDtype):
            dtype = dtype.categories.dtype
        if not pd.api.types.is_string_dtype(dtype):
            msg = (
                f"cannot partition on {col!r}: it holds {dtype} values, and hive partition columns "
                "must be low-cardinality string columns (e.g. experiment_id, genotype, phenotype)"
            )
            raise ExportError(msg)


def _too_many_values(col: str, n: int, max_values: int) -> ExportError:
    msg = (
        f"cannot partition on {col!r}: it has {n:,} distinct values (limit {max_values:,}); "
        "one folder per value would make a dataset that every reader crawls slowly. "
        "Partition on a low-cardinality column such as experiment_id, or pass partition_on=() "
        "(--partition-on none)"
    )
    return ExportError(msg)


def prepare_partition(
    part: pd.DataFrame,
    *,
    columns: list[str],
    partition_on: list[str],
    max_values: int = MAX_PARTITION_VALUES,
) -> pd.DataFrame:
    """Shape one partition for writing, checking its partition columns.

    Parameters
    ----------
    part : pandas.DataFrame
        One partition of the table.
    columns : list of str
        Data columns to keep, in order.
    partition_on : list of str
        Hive partition columns.
    max_values : int, default MAX_PARTITION_VALUES
        Most distinct values of a partition column.

    Returns
    -------
    pandas.DataFrame
        The selected columns; categorical partition columns as strings (so no
        file is written for an unobserved category); ``attrs`` dropped (they
        are not part of the table and pyarrow cannot store arbitrary ones).

    Raises
    ------
    ExportError
        If a partition column has missing values, empty values or values that
        cannot name a folder, or too many distinct values.

    Examples
    --------
    >>> part = pd.DataFrame({"experiment_id": pd.Categorical(["a"], categories=["a", "b"]), "x": [1.0]})
    >>> prepare_partition(part, columns=["experiment_id", "x"], partition_on=["experiment_id"]).dtypes.astype(str).to_dict()
    {'experiment_id': 'string', 'x': 'float64'}
    """
    out = part[columns] if list(part.columns) != columns else part.copy(deep=False)
    out.attrs = {}
    for col in partition_on:
        values = out[col]
        if not isinstance(values.dtype, pd.StringDtype) or values.dtype != STRING:
            values = values.astype(STRING)
            out[col] = values
        missing = int(values.isna().sum())
        if missing:
            first = values.index[values.isna()][0]
            msg = (
                f"cannot partition on {col!r}: {missing:,} row(s) of this partition have no value "
                f"(first: {first!r}); hive partition columns must have no missing values. "
                f"Fill them first (e.g. snips[{col!r}].fillna('unknown')) or partition on another column"
            )
            raise ExportError(msg)
        uniques = values.unique()
        if len(uniques) > max_values:
            raise _too_many_values(col, len(uniques), max_values)
        bad = [
            v for v in uniques if v == "" or "/" in v or "\\" in v or v.startswith(".")
        ]
        if bad:
            msg = (
                f"cannot partition on {col!r}: value(s) {', '.join(map(repr, bad[:5]))} cannot name a "
                "folder (empty, containing a slash, or starting with a dot); partition on another column"
            )
            raise ExportError(msg)
    return out


def _prepared_meta(
    meta: pd.DataFrame, columns: list[str], partition_on: Sequence[str]
) -> pd.DataFrame:
    out = meta[columns].copy()
    out.attrs = {}
    for col in partition_on:
        out[col] = out[col].astype(STRING)
    return out


def _as_dask(table: dd.DataFrame | pd.DataFrame) -> dd.DataFrame:
    if isinstance(table, dd.DataFrame):
        return table
    if isinstance(table, pd.DataFrame):
        plain = table.copy(deep=False)
        plain.attrs = {}
        return dd.from_pandas(plain, npartitions=1, sort=False)
    msg = f"expected a pandas or Dask DataFrame, got {type(table).__name__}"
    raise TypeError(msg)


@contextlib.contextmanager
def _scheduler(scheduler: str | None) -> Iterator[None]:
    """Compute on *scheduler* (a Dask scheduler name) if given, else where work runs."""
    if scheduler is None:
        yield
        return
    with dask.config.set(scheduler=scheduler):
        yield


def _compute(
    collection: Any,
    scheduler: str | None,
    progress: Callable[[int, int], None] | None,
) -> Any:
    from pipeline.cluster import compute

    # GC paused: a parsed store keeps millions of small objects alive, and
    # full collections while computing would walk them over and over.
    with paused_gc(), _scheduler(scheduler):
        return compute(collection, progress=progress, stage="export")


def _as_pandas(
    table: dd.DataFrame | pd.DataFrame,
    scheduler: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    if isinstance(table, dd.DataFrame):
        table = _compute(table, scheduler, progress)
    elif progress is not None:
        progress(1, 1)  # one partition, already in memory
    if not isinstance(table, pd.DataFrame):
        msg = f"expected a pandas or Dask DataFrame, got {type(table).__name__}"
        raise TypeError(msg)
    out = table.copy(deep=False)
    out.attrs = {}
    return out


# -------------------------------------------------------------------- parquet
def write_parquet(
    snips: dd.DataFrame | pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    partition_on: Sequence[str] = ("experiment_id",),
    columns: Sequence[str] | None = None,
    store: Store | None = None,
    scheduler: str | None = None,
    max_partition_values: int = MAX_PARTITION_VALUES,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write a table as a hive-partitioned Parquet folder, atomically.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The snip table (or any table: flags, change log); its index is written
        too (``snip_id``) unless it is a plain ``RangeIndex``.
    path : path-like
        The output folder. It is replaced as a whole: it must not exist, be
        empty, or hold a previous Parquet export.
    partition_on : sequence of str, default ("experiment_id",)
        Low-cardinality string columns to partition by, one folder level each
        (``experiment_id=20240411/``); ``()`` writes one file per partition.
    columns : sequence of str, optional
        Columns to write, in order; default all. Partition columns are always
        written. The index is always written.
    store : Store, optional
        The source store: named in the provenance, and protected (the output
        may not be the store, its backups or a folder that contains it).
    scheduler : str, optional
        Dask scheduler (``"threads"``, ``"sync"``, ...); default Dask's current
        one (a ``distributed`` client when one is active).
    max_partition_values : int, default MAX_PARTITION_VALUES
        Most distinct values a partition column may have.
    provenance : dict, optional
        Extra JSON-serialisable provenance entries.
    progress : callable, optional
        ``progress(done, total)`` as partitions are written: ``total`` is the
        table's number of Dask partitions (each writes its files in one task),
        ``done`` ends equal to it (see :func:`pipeline.cluster.compute`).

    Returns
    -------
    ExportResult
        Folder, rows, files, columns and provenance.

    Raises
    ------
    ExportError
        Unknown column; partition column that is not a string column, has
        missing values or too many distinct values; output path that is a file,
        a folder with other content, or the source store (or contains it).

    Notes
    -----
    Triggers computation: the whole graph runs once.

    The export is written into a new sibling folder ``PATH.tmp-<random>`` and
    then swapped in: a previous export at *path* is renamed to
    ``PATH.old-<random>``, the new folder is renamed to *path*, and the old
    one is deleted. The previous export is never modified in place; between
    the two renames (a few microseconds) *path* does not exist, and a crash
    there leaves both folders beside it. An export that fails (bad column,
    exception in a partition, interrupt) deletes its temporary folder and
    leaves *path* as it was. Files are fsynced before the swap and the parent
    folder after it.

    Files are named ``part.NNNNN.parquet`` after the Dask partition they come
    from, so names sort; with hive partitioning only observed values get a
    folder and no file is empty. Every file's schema metadata holds
    :data:`PROVENANCE_KEY`: JSON with the store path, the store's
    ``last_updated``, the package version, the export time (UTC), the
    partition columns and the columns.

    Examples
    --------
    >>> import tempfile, pathlib, pipeline
    >>> from pipeline.testing import make_store
    >>> store = make_store(n_experiments=2, n_embryos=2, n_frames=3, seed=0)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "snips"
    >>> result = write_parquet(pipeline.snips_from_store(store), out, store=store)
    >>> result.rows == store.counts()["snips"], sorted(p.name for p in out.iterdir())[0].startswith("experiment_id=")
    (True, True)
    """
    out = Path(path)
    table = _as_dask(snips)
    partition_on = list(partition_on)
    meta = table._meta
    _check_partition_columns(meta, partition_on)
    cols = _select_columns(meta, columns, partition_on)
    _check_target(out, _source(store), folder=True)
    index = _index_name(meta)
    write_index = not isinstance(meta.index, pd.RangeIndex)
    info = _provenance(
        store,
        format="parquet",
        partition_on=partition_on,
        columns=([index] if write_index and index else []) + cols,
        **(provenance or {}),
    )
    prepared = map_parts(
        table,
        prepare_partition,
        _prepared_meta(meta, cols, partition_on),
        stage="export",
        columns=cols,
        partition_on=partition_on,
        max_values=max_partition_values,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    try:
        with _dask_writer_warnings():
            writes = prepared.to_parquet(
                tmp,
                engine=_ArrowEngine,
                partition_on=partition_on or None,
                name_function=part_name,
                write_index=write_index,
                write_metadata_file=False,
                custom_metadata={PROVENANCE_KEY: _provenance_bytes(info)},
                compute=False,
            )
            _compute(writes, scheduler, progress)
        tmp.mkdir(exist_ok=True)  # an empty table writes no file at all
        rows, files, folders = _count(tmp, len(partition_on))
        if partition_on and folders > max_partition_values:
            raise _too_many_values(partition_on[0], folders, max_partition_values)
        _swap_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        out, "parquet", rows, files, info["columns"], partition_on, info
    )


def _sync(handle: Any) -> None:
    """Flush a file just written to the disk, in its task: the wait overlaps other partitions' work.

    The folder is fsynced whole before it is swapped in (:func:`_fsync_tree`)
    whatever happens here; by then these files have nothing left to write. A
    file system without file descriptors (not a local disk) is left to that.
    """
    try:
        fd = handle.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return
    handle.flush()
    os.fsync(fd)


def _in_key_order(table: pa.Table, keys: list[str]) -> bool:
    """Whether the rows of *table* are in ascending order of its (non-null) *keys* columns, ties allowed."""
    # For each row after the first: not before the row above, by the keys from k on.
    ordered = np.ones(max(table.num_rows - 1, 0), dtype=bool)
    for k in reversed(keys):
        values = table.column(k).combine_chunks()
        before, after = values[:-1], values[1:]
        equal = pc.equal(before, after).to_numpy(zero_copy_only=False)
        ordered = pc.less(before, after).to_numpy(zero_copy_only=False) | (equal & ordered)
    return bool(ordered.all())


class _ArrowEngine(ArrowDatasetEngine):
    """Dask's pyarrow Parquet engine, converting each partition to Arrow once.

    The files are the ones Dask's own engine writes (same names, rows, schema
    and metadata; ``tests/test_export.py`` compares them). Two costs of its
    hive-partitioned write go:

    - Dask converts a partition to Arrow whole (for its schema), then each
      of its pandas groups again. Here the whole conversion is split in Arrow
      (a stable sort on the partition columns) and each group is a ``take``.
    - pyarrow probes every pandas column for ``__arrow_array__``; on a frame
      indexed by strings (``snip_id``) that probe makes pandas hash the index
      (``name in index``), once per group: about 0.7 s at 1M snips. The
      index is converted as a column instead, under the exact schema and
      metadata pyarrow gives the frame (taken from its empty head).

    Only the engine class itself is taken from Dask (``to_parquet`` accepts
    an engine class, for third-party engines); partitions it does not
    expect (no partition columns, non-string or missing keys) go to Dask's
    own ``write_partition``.
    """

    @classmethod
    def _pandas_to_arrow_table(cls, df: pd.DataFrame, preserve_index: bool = False, schema: pa.Schema | None = None) -> pa.Table:
        names = list(df.index.names)
        if not preserve_index or any(not isinstance(n, str) or n in df.columns for n in names):
            return super()._pandas_to_arrow_table(df, preserve_index=preserve_index, schema=schema)
        exact = super()._pandas_to_arrow_table(df.iloc[:0], preserve_index=preserve_index, schema=schema).schema
        flat = df.reset_index()  # a RangeIndex, which pyarrow's probes do not hash
        table = super()._pandas_to_arrow_table(flat[exact.names], preserve_index=False, schema=exact)
        return pa.Table.from_arrays(table.columns, schema=exact)

    @classmethod
    def write_partition(  # type: ignore[override]
        cls,
        df: pd.DataFrame,
        path: str,
        fs: Any,
        filename: str,
        partition_on: list[str],
        return_metadata: bool,
        fmd: Any = None,
        compression: Any = None,
        index_cols: list[str] | None = None,
        schema: pa.Schema | None = None,
        head: bool = False,
        custom_metadata: dict[bytes, bytes] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        keys = list(partition_on or [])
        if not keys or any(not pd.api.types.is_string_dtype(df[k].dtype) or df[k].hasnans for k in keys):
            return super().write_partition(
                df, path, fs, filename, partition_on, return_metadata, fmd=fmd, compression=compression,
                index_cols=index_cols, schema=schema, head=head, custom_metadata=custom_metadata, **kwargs,
            )
        # As Dask's engine: the index columns are written as the index when
        # the schema has them all.
        preserve_index = bool(index_cols) and (schema is None or set(index_cols) <= set(schema.names))
        frame = df.set_index(index_cols) if preserve_index else df
        table = cls._pandas_to_arrow_table(frame, preserve_index=preserve_index, schema=schema)
        if custom_metadata:
            table = table.replace_schema_metadata({**table.schema.metadata, **custom_metadata})
        # The schema (and pandas metadata) Dask's own path gives each group's
        # file: that of the group's frame, built as it builds it.
        sub_schema = table.schema
        for k in keys:
            sub_schema = sub_schema.remove(sub_schema.get_field_index(k))
        empty = df.iloc[:0][table.schema.names]
        if preserve_index:
            empty = empty.set_index(index_cols)
        empty = empty.drop(columns=keys)
        sub_schema = cls._pandas_to_arrow_table(empty, preserve_index=preserve_index, schema=sub_schema).schema
        data = table.drop_columns(keys)
        if data.schema.names != sub_schema.names:  # pragma: no cover - a layout left to Dask's own path
            return super().write_partition(
                df, path, fs, filename, partition_on, return_metadata, fmd=fmd, compression=compression,
                index_cols=index_cols, schema=schema, head=head, custom_metadata=custom_metadata, **kwargs,
            )
        # Groups in key order, rows in partition order (the sort is stable).
        # A partition already in key order (a snip table sorted by id usually
        # has its experiments in order too) is cut into slices: nothing sorted
        # or copied.
        order = None if _in_key_order(table, keys) else pc.sort_indices(table.select(keys), sort_keys=[(k, "ascending") for k in keys])
        ordered_keys = table.select(keys) if order is None else table.select(keys).take(order)
        changes = np.zeros(table.num_rows, dtype=bool)
        if table.num_rows:
            changes[0] = True
        for k in keys:
            values = ordered_keys.column(k).combine_chunks()
            changes[1:] |= pc.not_equal(values[1:], values[:-1]).to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(changes).tolist()
        md_list: list[Any] = []
        for start, stop in zip(starts, [*starts[1:], table.num_rows], strict=True):
            values = [ordered_keys.column(k)[start].as_py() for k in keys]
            rows = data.slice(start, stop - start) if order is None else data.take(order[start:stop])
            group = pa.Table.from_arrays(rows.columns, schema=sub_schema)
            subdir = fs.sep.join(f"{k}={v}" for k, v in zip(keys, values, strict=True))  # no nulls here
            prefix = fs.sep.join([path, subdir])
            fs.mkdirs(prefix, exist_ok=True)
            with fs.open(fs.sep.join([prefix, filename]), "wb") as f:
                pq.write_table(
                    group, f, compression=compression, metadata_collector=md_list if return_metadata else None, **kwargs
                )
                _sync(f)
            if return_metadata:
                md_list[-1].set_file_path(fs.sep.join([subdir, filename]))
        if not return_metadata:
            return []
        meta = None
        if md_list:
            meta = md_list[0]
            for extra in md_list[1:]:
                meta.append_row_groups(extra)
        out: dict[str, Any] = {"meta": meta}
        if head:
            out["schema"] = table.schema
        return [out]


@contextlib.contextmanager
def _dask_writer_warnings() -> Any:
    # Dask's pyarrow writer still calls DataFrame.set_index/reset_index with
    # inplace=True, which pandas 3.1 deprecates; the warning is about Dask's
    # code, not the caller's, and says nothing about the data written.
    category = getattr(pd.errors, "Pandas4Warning", DeprecationWarning)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"The inplace keyword in DataFrame\.(re)?set_index",
            category=category,
        )
        yield


def _count(folder: Path, depth: int) -> tuple[int, int, int]:
    """Rows and files of a written dataset, and its number of first-level folders."""
    files = sorted(folder.rglob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    folders = sum(1 for p in folder.iterdir() if p.is_dir()) if depth else 0
    return rows, len(files), folders


# ------------------------------------------------------------- single files
def _single_file_frame(
    table: dd.DataFrame | pd.DataFrame,
    columns: Sequence[str] | None,
    scheduler: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    meta = table._meta if isinstance(table, dd.DataFrame) else table
    cols = _select_columns(meta, columns, ())
    if isinstance(table, dd.DataFrame) and cols != list(meta.columns):
        table = table[cols]
    frame = _as_pandas(table, scheduler, progress)
    return frame[cols] if cols != list(frame.columns) else frame


def _single_file_info(
    frame: pd.DataFrame, store: Store | None, fmt: str, extra: dict[str, Any] | None
) -> dict[str, Any]:
    index = [frame.index.name] if frame.index.name else []
    return _provenance(
        store,
        format=fmt,
        partition_on=[],
        columns=index + list(frame.columns),
        **(extra or {}),
    )


def _single_file_start(
    snips: dd.DataFrame | pd.DataFrame,
    path: str | os.PathLike[str],
    fmt: str,
    columns: Sequence[str] | None,
    store: Store | None,
    scheduler: str | None,
    provenance: dict[str, Any] | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, pd.DataFrame, dict[str, Any]]:
    """What every single-file writer does first: check, compute, describe."""
    out = Path(path)
    _check_target(out, _source(store), folder=False)
    frame = _single_file_frame(snips, columns, scheduler, progress)
    info = _single_file_info(frame, store, fmt, provenance)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, frame, info


def write_feather(
    snips: dd.DataFrame | pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    store: Store | None = None,
    scheduler: str | None = None,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write a table as one Feather (Arrow IPC) file, atomically.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The table; its index is written too.
    path : path-like
        The file; replaced with ``os.replace`` if it exists.
    columns : sequence of str, optional
        Columns to write, in order; default all.
    store : Store, optional
        Source store, for provenance and protection.
    scheduler : str, optional
        Dask scheduler used to compute a Dask table.
    provenance : dict, optional
        Extra provenance entries.
    progress : callable, optional
        ``progress(done, total)`` as the partitions of a Dask table are
        computed (``total`` its ``npartitions``; see
        :func:`pipeline.cluster.compute`); once, ``(1, 1)``, for a pandas table.

    Returns
    -------
    ExportResult
        File, rows and provenance (also in the schema metadata).

    Notes
    -----
    Triggers computation and holds the whole table in memory.
    ``pandas.read_feather(path)`` returns the same columns, dtypes and index.
    """
    out, frame, info = _single_file_start(
        snips, path, "feather", columns, store, scheduler, provenance, progress
    )
    arrow = pa.Table.from_pandas(
        frame, preserve_index=not isinstance(frame.index, pd.RangeIndex)
    )
    metadata = dict(arrow.schema.metadata or {})
    metadata[PROVENANCE_KEY] = _provenance_bytes(info)
    arrow = arrow.replace_schema_metadata(metadata)
    with _temporary_file(out) as tmp:
        feather.write_feather(arrow, tmp)
    return ExportResult(out, "feather", len(frame), 1, info["columns"], [], info)


def write_hdf5(
    snips: dd.DataFrame | pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    store: Store | None = None,
    scheduler: str | None = None,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write a table as one HDF5 file (PyTables ``format="table"``), atomically.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The table; its index is written too.
    path : path-like
        The file; replaced with ``os.replace`` if it exists.
    columns : sequence of str, optional
        Columns to write, in order; default all.
    store : Store, optional
        Source store, for provenance and protection.
    scheduler : str, optional
        Dask scheduler used to compute a Dask table.
    provenance : dict, optional
        Extra provenance entries.
    progress : callable, optional
        ``progress(done, total)`` as the partitions of a Dask table are
        computed (``total`` its ``npartitions``; see
        :func:`pipeline.cluster.compute`); once, ``(1, 1)``, for a pandas table.

    Returns
    -------
    ExportResult
        File, rows and provenance (also in the node's attributes).

    Notes
    -----
    Triggers computation and holds the whole table in memory. The table is
    stored under the key ``"table"``. HDF5 has no nullable integers: such
    columns (``death_frame``) are stored as ``float64`` with NaN for missing,
    and the original dtypes are kept in the node attribute ``dtypes``;
    :func:`read_table` restores them.
    """
    out, frame, info = _single_file_start(
        snips, path, "hdf5", columns, store, scheduler, provenance, progress
    )
    dtypes = {str(c): str(t) for c, t in frame.dtypes.items()}
    stored = frame.copy(deep=False)
    for col, dtype in frame.dtypes.items():
        if isinstance(
            dtype, pd.api.extensions.ExtensionDtype
        ) and pd.api.types.is_integer_dtype(dtype):
            stored[col] = frame[col].astype("float64")
    with _temporary_file(out) as tmp, pd.HDFStore(tmp, mode="w") as h5:
        h5.put(_HDF_KEY, stored, format="table", track_times=False)
        attrs = h5.get_storer(_HDF_KEY).attrs
        setattr(attrs, _PROVENANCE_ATTR, json.dumps(info, sort_keys=True))
        attrs.dtypes = json.dumps(dtypes)
    return ExportResult(out, "hdf5", len(frame), 1, info["columns"], [], info)


def write_csv(
    snips: dd.DataFrame | pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    store: Store | None = None,
    scheduler: str | None = None,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write a table as one CSV file for people and spreadsheets, atomically.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The table; its index is the first column.
    path : path-like
        The file; replaced with ``os.replace`` if it exists.
    columns : sequence of str, optional
        Columns to write, in order; default all.
    store : Store, optional
        Source store, for provenance and protection.
    scheduler : str, optional
        Dask scheduler used to compute a Dask table.
    provenance : dict, optional
        Extra provenance entries (returned, not written: CSV has no metadata).
    progress : callable, optional
        ``progress(done, total)`` as the partitions of a Dask table are
        computed (``total`` its ``npartitions``; see
        :func:`pipeline.cluster.compute`); once, ``(1, 1)``, for a pandas table.

    Returns
    -------
    ExportResult
        File, rows and provenance.

    Notes
    -----
    Triggers computation and holds the whole table in memory. CSV carries no
    dtypes: missing values are empty fields and booleans ``True``/``False``.
    :func:`read_table` reads a snips or flags export back with its dtypes.
    """
    out, frame, info = _single_file_start(
        snips, path, "csv", columns, store, scheduler, provenance, progress
    )
    with _temporary_file(out) as tmp:
        frame.to_csv(tmp, index=not isinstance(frame.index, pd.RangeIndex))
    return ExportResult(out, "csv", len(frame), 1, info["columns"], [], info)


# ------------------------------------------------------------------ dispatch
def write_table(
    table: dd.DataFrame | pd.DataFrame,
    path: str | os.PathLike[str],
    format: str = "parquet",
    *,
    partition_on: Sequence[str] = ("experiment_id",),
    **kwargs: Any,
) -> ExportResult:
    """Write *table* in *format*: :func:`write_parquet` or a single-file writer.

    Parameters
    ----------
    table : dask.dataframe.DataFrame or pandas.DataFrame
        The table.
    path : path-like
        Folder (Parquet) or file.
    format : {"parquet", "feather", "hdf5", "csv"}, default "parquet"
        Output format.
    partition_on : sequence of str, default ("experiment_id",)
        Parquet only; ignored by the single-file formats.
    **kwargs
        Passed to the writer (``columns``, ``store``, ``scheduler``,
        ``progress``, ...).

    Returns
    -------
    ExportResult
        What was written.

    Raises
    ------
    ExportError
        For an unknown *format*, or whatever the writer refuses.
    """
    if format == "parquet":
        return write_parquet(table, path, partition_on=partition_on, **kwargs)
    writers = {"feather": write_feather, "hdf5": write_hdf5, "csv": write_csv}
    if format not in writers:
        msg = f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}"
        raise ExportError(msg)
    kwargs.pop("max_partition_values", None)
    return writers[format](table, path, **kwargs)


def export_store(
    store: Store | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    format: str = "parquet",
    what: str = "snips",
    partition_on: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    npartitions: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Export one table of a store: its snips, its flags or its change log.

    Parameters
    ----------
    store : Store or path-like
        The store, or its file (read and checked here; for ``what="changes"``
        only the change log beside it is read).
    path : path-like
        Output folder (Parquet) or file.
    format : {"parquet", "feather", "hdf5", "csv"}, default "parquet"
        Output format.
    what : {"snips", "flags", "changes"}, default "snips"
        ``snips``: the snip table (index ``snip_id``). ``flags``: every flag in
        long format, one row per flag with its ``level`` and ``entity_id``.
        ``changes``: the change log, one row per changed value.
    partition_on : sequence of str, optional
        Parquet hive partitioning; default ``experiment_id`` for snips,
        ``level`` for flags, none for changes.
    columns : sequence of str, optional
        Columns to write; default all.
    npartitions : int, optional
        Dask partitions of the snip table (see :func:`pipeline.snips_from_store`).
    scheduler : str, optional
        Dask scheduler.
    progress : callable, optional
        ``progress(done, total)`` as partitions are computed or written (see
        the writers); the flags and the change log are pandas tables, written
        as one partition.

    Returns
    -------
    ExportResult
        What was written.

    Raises
    ------
    ExportError
        Unknown *what* or *format*, no change log, or a refused target/column.

    Notes
    -----
    Triggers computation.
    """
    if what not in WHAT:
        msg = f"unknown table {what!r} to export; choose one of {', '.join(WHAT)}"
        raise ExportError(msg)
    if format not in FORMATS:
        msg = f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}"
        raise ExportError(msg)
    parts = DEFAULT_PARTITION_ON[what] if partition_on is None else tuple(partition_on)
    kwargs: dict[str, Any] = {
        "columns": columns,
        "scheduler": scheduler,
        "provenance": {"what": what},
        "progress": progress,
    }
    if what == "changes":
        store_path = store.path if isinstance(store, Store) else Path(store)
        if store_path is None:
            msg = (
                "this store was not read from a file, so it has no change log to export"
            )
            raise ExportError(msg)
        _check_target(Path(path), store_path, folder=format == "parquet")
        table = _changes_table(store_path)
        kwargs["provenance"]["store_path"] = str(store_path.resolve())
        return write_table(table, path, format, partition_on=parts, **kwargs)
    if not isinstance(store, Store):
        store = _read_for_export(store, what)
    if what == "flags":
        table = store.flags_table()
    else:
        from pipeline.snips import snips_from_store

        table = snips_from_store(store, npartitions=npartitions)
    return write_table(table, path, format, partition_on=parts, store=store, **kwargs)


def _needs_document(what: str) -> bool:
    """Whether an export of *what* needs the store's document (the flags table), not only its tables."""
    return what == "flags"


def _read_for_export(path: str | os.PathLike[str], what: str) -> Store:
    """Read the store an export of *what* needs (see :func:`_needs_document`)."""
    return read_store(path, document=True if _needs_document(what) else None)


def _changes_table(store_path: Path) -> pd.DataFrame:
    try:
        from pipeline.changelog import changelog_path, read_changelog
    except ImportError:
        msg = "no change log yet: this version of embryo-pipeline does not record one, so there are no changes to export"
        raise ExportError(msg) from None
    if not store_path.exists():
        raise FileNotFoundError(2, "No such file or directory", str(store_path))
    log = changelog_path(store_path)
    if not log.exists():
        msg = (
            f"no change log beside {str(store_path)!r} (expected {str(log)!r}): no batch has been merged "
            "into this store yet, so there are no changes to export"
        )
        raise ExportError(msg)
    return read_changelog(store_path)


# -------------------------------------------------------------------- reading
def _known_dtypes(columns: Iterable[str]) -> dict[str, Any]:
    cols = list(columns)
    if "level" in cols and "entity_id" in cols:
        return {c: FLAG_COLUMNS[c] for c in cols if c in FLAG_COLUMNS}
    if "batch_id" in cols:
        return dict.fromkeys(cols, STRING)
    return {c: SNIP_COLUMNS.get(c, np.dtype("float64")) for c in cols}


def read_table(path: str | os.PathLike[str], format: str | None = None) -> pd.DataFrame:
    """Read an export back as the table that was written.

    Parameters
    ----------
    path : path-like
        A Parquet export folder, or a ``.feather``, ``.h5``/``.hdf5`` or
        ``.csv`` file.
    format : {"parquet", "feather", "hdf5", "csv"}, optional
        Default from *path* (a folder is Parquet, else the file suffix).

    Returns
    -------
    pandas.DataFrame
        Same columns (in the written order), dtypes and index. Parquet rows are
        sorted by the index (or by every column for tables without one).

    Notes
    -----
    Triggers computation (reads the whole export). For Parquet this undoes
    what hive partitioning does to a round trip: partition columns come back
    last and categorical, and rows grouped by folder.
    """
    p = Path(path)
    if format is None:
        suffix = p.suffix.lower()
        format = (
            "parquet"
            if p.is_dir()
            else {".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5"}.get(
                suffix, suffix.lstrip(".")
            )
        )
    if format == "parquet":
        return _read_parquet(p)
    if format == "feather":
        return _restore_index(pd.read_feather(p))
    if format == "hdf5":
        with pd.HDFStore(p, mode="r") as h5:
            frame = h5.get(_HDF_KEY)
            dtypes = json.loads(h5.get_storer(_HDF_KEY).attrs.dtypes)
        return _restore_index(
            frame.astype({c: pd.api.types.pandas_dtype(t) for c, t in dtypes.items()})
        )
    if format == "csv":
        head = pd.read_csv(p, nrows=0)
        index = SNIP_INDEX if SNIP_INDEX in head.columns else None
        dtypes = _known_dtypes(c for c in head.columns if c != index)
        if index:
            dtypes[index] = STRING
        frame = pd.read_csv(p, dtype=dtypes, keep_default_na=False, na_values=[""])
        for col in _EMPTY_TEXT_COLUMNS:
            if col in frame.columns:
                frame[col] = frame[col].fillna("")
        return frame.set_index(index) if index else frame
    msg = f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}"
    raise ExportError(msg)


def _restore_index(frame: pd.DataFrame) -> pd.DataFrame:
    # pyarrow rebuilds a string index as pandas' default ``str`` dtype (NaN
    # for missing) even where columns keep ``string``: put the table's back.
    if frame.index.name is not None and pd.api.types.is_string_dtype(frame.index.dtype):
        frame.index = frame.index.astype(STRING)
    return frame


def _read_parquet(folder: Path) -> pd.DataFrame:
    files = sorted(folder.rglob("*.parquet"))
    info: dict[str, Any] = {}
    if files:
        raw = (pq.read_schema(files[0]).metadata or {}).get(PROVENANCE_KEY)
        info = json.loads(raw) if raw else {}
    frame = pd.read_parquet(folder)
    for col in info.get("partition_on", []):
        frame[col] = frame[col].astype(STRING)
    columns = [c for c in info.get("columns", []) if c in frame.columns]
    if columns:
        frame = frame[columns]
    if frame.index.name is not None:
        return _restore_index(frame).sort_index()
    return (
        frame.sort_values(list(frame.columns), ignore_index=True)
        if len(frame.columns)
        else frame
    )
