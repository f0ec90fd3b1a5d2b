"""Sharded stores: one JSON file per experiment, loaded and written in parallel.

A sharded store is a folder holding ``store.json`` (everything but the
embryos, plus ``"shards": {"<experiment_id>": "experiments/<experiment_id>.json"}``)
and one ``{"embryos": {...}}`` file per experiment (``spec/store-schema.md``).
Semantics are those of a single-file store; what changes is how it is read
and written:

- :class:`ShardedStore` loads a shard only when one of its embryos is touched,
  and :func:`pipeline.snips_from_store` builds the snip table with
  ``dask.dataframe.from_map`` over the shard files: each worker parses and
  checks its own experiments, one partition per experiment, and no process
  ever holds the whole cohort.
- Saving writes only the shards that changed, all-or-nothing across shards:
  every new file is first written beside its target as ``<file>.new`` and
  fsynced; then a journal naming them is made durable (the commit point); then
  each ``.new`` replaces its file; then the journal is removed. Opening a store
  finishes a journaled batch (roll forward) or, without a journal, deletes
  stray ``.new`` files (roll back), before anything else, so a store always
  opens to the old or the new state of a whole batch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import orjson
import pandas as pd

from pipeline import ids
from pipeline._atomic import (
    LOCK_TIMEOUT,
    _keep_backup,
    atomic_write_bytes,
    fsync_dir,
    store_lock,
)
from pipeline._jsonschema import check, store_schema
from pipeline._tables import Tables, build_tables
from pipeline.errors import MergeConflictError, StoreFormatError
from pipeline.store import (
    Store,
    _fingerprint,
    _format_problems,
    _parse_json,
    now,
    paused_gc,
)

__all__ = [
    "ShardedStore",
    "read_sharded",
    "shard_store",
    "unshard_store",
    "is_sharded",
    "sharded_snips",
    "JOURNAL",
]

INDEX = "store.json"
JOURNAL = "journal.json"
_DUMP = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether *path* is a sharded store (its folder, or its ``store.json``)."""
    path = Path(path)
    if path.is_dir():
        return (path / INDEX).is_file()
    return (
        path.name == INDEX and path.is_file() and (path.parent / "experiments").is_dir()
    )


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class _LazyEmbryos(Mapping[str, Any]):
    """The embryos of a sharded store: a shard loads on first access."""

    def __init__(self, store: ShardedStore) -> None:
        self._store = store

    def __getitem__(self, embryo_id: str) -> Any:
        try:
            experiment, _video = ids.parse_embryo_id(embryo_id)
        except ValueError:
            raise KeyError(embryo_id) from None
        if experiment not in self._store.shards:
            raise KeyError(embryo_id)
        return self._store.shard(experiment)[embryo_id]

    def __iter__(self) -> Iterator[str]:
        for experiment in self._store.shards:
            yield from self._store.shard(experiment)

    def __len__(self) -> int:
        return sum(len(self._store.shard(e)) for e in self._store.shards)


class ShardedStore(Store):
    """A store kept as one JSON file per experiment.

    Parameters
    ----------
    root : path-like
        The store's folder.
    index : dict
        The parsed ``store.json``.

    Notes
    -----
    ``store.embryos`` loads shards on demand; ``store.snip_table()`` and
    ``validate()`` load them all. :func:`pipeline.snips_from_store` never loads
    them in this process: workers do.
    """

    def __init__(self, root: str | os.PathLike[str], index: dict[str, Any]) -> None:
        self.root = Path(root)
        self.index = index
        self.path = self.root / INDEX
        self.upgrade_report = []
        self._loaded: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, bytes] = {}
        self._shard_fp: dict[str, Any] = {}
        self._tables: Tables | None = None
        self.doc = {k: v for k, v in index.items() if k != "shards"}
        self.doc["embryos"] = _LazyEmbryos(self)
        self._fingerprint = _fingerprint(self.path)

    def __repr__(self) -> str:
        return f"<ShardedStore {self.root}: {len(self.shards)} experiments>"

    @property
    def shards(self) -> dict[str, str]:
        """Experiment id to shard path (relative to the folder)."""
        return self.index["shards"]

    def shard_path(self, experiment: str) -> Path:
        """The file of one experiment's shard."""
        return self.root / self.shards[experiment]

    def shard(self, experiment: str) -> dict[str, Any]:
        """The embryos of one experiment (parsed and checked on first access)."""
        if experiment not in self._loaded:
            path = self.shard_path(experiment)
            data = path.read_bytes()
            doc = _parse_json(data, str(path))
            problems: list[tuple[str, str]] = []
            # The shape with the schema checker; the embryos with the columnar
            # checks the single-file reader and the workers use (the schema
            # checker runs only on embryos they find malformed). The schema
            # checker over every snip took ~6x longer and made loading shards
            # most of a merge's time (benchmarks/RESULTS.md, issue 9).
            shape = (
                {k: ({} if k == "embryos" and isinstance(v, dict) else v) for k, v in doc.items()}
                if isinstance(doc, dict)
                else doc
            )
            check(shape, store_schema()["$defs"]["shard"], (), problems)
            if not problems:
                with paused_gc():
                    problems = list(
                        build_tables({**_top(self), "embryos": doc["embryos"]}, self.vocabulary).problems
                    )
            if problems:
                raise StoreFormatError(
                    _format_problems(problems, str(path)),
                    problems=problems,
                    path=str(path),
                )
            wrong = [e for e in doc["embryos"] if not e.startswith(experiment + "_")]
            if wrong:
                msg = f"{path}: embryo(s) {wrong[:3]} do not belong to experiment {experiment!r}; move them to their own shard"
                raise StoreFormatError(msg, path=str(path))
            self._loaded[experiment] = doc["embryos"]
            self._digests[experiment] = _digest(
                orjson.dumps(doc["embryos"], option=_DUMP)
            )
            self._shard_fp[experiment] = _fingerprint(path)
        return self._loaded[experiment]

    def _full_doc(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.doc.items() if k != "embryos"}
        doc["embryos"] = {
            eid: e for exp in self.shards for eid, e in self.shard(exp).items()
        }
        return doc

    def tables(self) -> Tables:
        """The columnar view of all shards (loads every shard)."""
        if self._tables is None:
            with paused_gc():
                self._tables = build_tables(self._full_doc(), self.vocabulary)
        return self._tables

    def counts(self) -> dict[str, int]:
        """Numbers of experiments, videos, embryos and snips (loads every shard)."""
        return Store.counts(self)

    def changed_on_disk(self) -> bool:
        """Whether the index or any loaded shard was replaced by another writer."""
        if _fingerprint(self.path) != self._fingerprint:
            return True
        return any(
            _fingerprint(self.shard_path(e)) != fp for e, fp in self._shard_fp.items()
        )

    def reload(self) -> None:
        """Forget loaded shards and read the index again."""
        fresh = read_sharded(self.root, _recovered=True)
        self.index, self.doc, self._fingerprint = (
            fresh.index,
            fresh.doc,
            fresh._fingerprint,
        )
        self.doc["embryos"] = _LazyEmbryos(self)
        self._loaded, self._digests, self._shard_fp, self._tables = {}, {}, {}, None

    def to_bytes(self) -> bytes:
        """The index serialised (shards are written separately)."""
        return orjson.dumps(self.index, option=_DUMP)

    def save(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        backups: int = 5,
        lock_timeout: float = LOCK_TIMEOUT,
        force: bool = False,
        _locked: bool = False,
        _checked: bool = False,
    ) -> Path:
        """Write the changed shards and the index, all-or-nothing, under the lock.

        Parameters
        ----------
        path : path-like, optional
            Must be None or the store's own folder; use :func:`shard_store` /
            :func:`unshard_store` to convert.
        backups : int, default 5
            Backups kept of each replaced file.
        lock_timeout : float, default LOCK_TIMEOUT
            Seconds to wait for another writer.
        force : bool, default False
            Overwrite even if another process changed the store since it was read.

        Returns
        -------
        pathlib.Path
            The store's folder.

        Raises
        ------
        MergeConflictError
            If another writer changed the store since it was read.
        StoreFormatError
            If a loaded shard is invalid.
        """
        if path is not None and Path(path).resolve() not in (
            self.root.resolve(),
            self.path.resolve(),
        ):
            msg = "a sharded store saves into its own folder; use shard_store()/unshard_store() to convert"
            raise ValueError(msg)
        ctx = store_lock(self.path, lock_timeout) if not _locked else _null()
        with ctx:
            if not force and self.changed_on_disk():
                msg = f"{str(self.root)!r} was changed by another writer since it was read; read it again and re-apply your edits"
                raise MergeConflictError(msg)
            changed: dict[Path, bytes] = {}
            for exp, embryos in self._loaded.items():
                data = orjson.dumps(embryos, option=_DUMP)
                if _digest(data) != self._digests[exp]:
                    changed[self.shard_path(exp)] = orjson.dumps(
                        {"embryos": embryos}, option=_DUMP
                    )
            if not _checked and changed:
                touched = [eid for exp in self._loaded for eid in self._loaded[exp]]
                self.check_embryos(touched)
            self.index["file_info"]["last_updated"] = now()
            self.doc["file_info"] = self.index["file_info"]
            changed[self.path] = self.to_bytes()
            journaled_write(self.root, changed, backups=backups)
            for exp in self._loaded:
                self._digests[exp] = _digest(
                    orjson.dumps(self._loaded[exp], option=_DUMP)
                )
                self._shard_fp[exp] = _fingerprint(self.shard_path(exp))
            self._fingerprint = _fingerprint(self.path)
        return self.root


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _write_new(target: Path, data: bytes) -> Path:
    new = target.with_name(target.name + ".new")
    atomic_write_bytes(new, data, backups=0)
    return new


def journaled_write(
    root: Path,
    files: dict[Path, bytes],
    *,
    backups: int = 5,
    _crash_after: int | None = None,
) -> None:
    """Replace several files of a folder all-or-nothing.

    Parameters
    ----------
    root : pathlib.Path
        The store's folder (where the journal lives).
    files : dict of pathlib.Path to bytes
        New content per file.
    backups : int, default 5
        Backups kept of each replaced file.
    _crash_after : int, optional
        For tests: end the process (as a crash would, no clean-up) after
        replacing this many files; -1 ends it before the journal is written.
    """
    for target, data in files.items():
        _write_new(target, data)
    if _crash_after == -1:
        os._exit(9)
    journal = {"files": [str(p.relative_to(root)) for p in files], "timestamp": now()}
    # The commit point: once the journal is durable, the batch will complete.
    atomic_write_bytes(root / JOURNAL, orjson.dumps(journal), backups=0)
    for i, target in enumerate(files):
        if _crash_after is not None and i >= _crash_after:
            os._exit(9)
        _replace_new(target, backups)
    for folder in {p.parent for p in files}:
        fsync_dir(folder)
    (root / JOURNAL).unlink()
    fsync_dir(root)


def _replace_new(target: Path, backups: int) -> None:
    new = target.with_name(target.name + ".new")
    if not new.exists():
        return
    if target.exists() and backups > 0:
        _keep_backup(target, backups)
    os.replace(new, target)


def recover(root: Path) -> str | None:
    """Finish or roll back an interrupted batch; say which (or None).

    Parameters
    ----------
    root : pathlib.Path
        The store's folder.

    Returns
    -------
    str or None
        ``"completed"``, ``"rolled back"`` or None when there was nothing to do.
    """
    journal = root / JOURNAL
    if journal.exists():
        try:
            names = orjson.loads(journal.read_bytes())["files"]
        except (orjson.JSONDecodeError, KeyError):
            names = None
        if names is not None:
            for name in names:
                _replace_new(root / name, backups=5)
            for folder in {(root / n).parent for n in names}:
                fsync_dir(folder)
            journal.unlink()
            fsync_dir(root)
            return "completed"
        # A torn journal cannot be: it is written atomically. Treat as absent.
        journal.unlink()
    stray = [*root.glob("*.new"), *root.glob("experiments/*.new")]
    for path in stray:
        path.unlink()
    if stray:
        fsync_dir(root)
        return "rolled back"
    return None


def read_sharded(
    root: str | os.PathLike[str], *, _recovered: bool = False
) -> ShardedStore:
    """Open a sharded store (its folder or its ``store.json``).

    Parameters
    ----------
    root : path-like
        The folder, or its ``store.json``.

    Returns
    -------
    ShardedStore
        The store; shards load when used.

    Raises
    ------
    StoreFormatError
        If ``store.json`` is invalid or names a missing shard.
    """
    root = Path(root)
    if root.is_file():
        root = root.parent
    if not _recovered:
        with store_lock(root / INDEX):
            recover(root)
    index = _parse_json((root / INDEX).read_bytes(), str(root / INDEX))
    problems: list[tuple[str, str]] = []
    if not isinstance(index, dict):
        problems.append(("$", "expected a JSON object"))
    else:
        check(index, store_schema()["$defs"]["sharded_index"], (), problems)
        for exp, rel in (index.get("shards") or {}).items():
            if isinstance(rel, str) and not (root / rel).is_file():
                problems.append(
                    (f'$.shards["{exp}"]', f"shard file {rel!r} does not exist")
                )
            if isinstance(rel, str) and rel != f"experiments/{exp}.json":
                problems.append(
                    (
                        f'$.shards["{exp}"]',
                        f"expected 'experiments/{exp}.json', found {rel!r}",
                    )
                )
    if problems:
        raise StoreFormatError(
            _format_problems(problems, str(root / INDEX)),
            problems=problems,
            path=str(root / INDEX),
        )
    return ShardedStore(root, index)


def shard_store(
    source: str | os.PathLike[str] | Store, out_dir: str | os.PathLike[str]
) -> ShardedStore:
    """Convert a single-file store into a sharded one (losslessly).

    Parameters
    ----------
    source : path-like or Store
        The single-file store.
    out_dir : path-like
        A new (or empty) folder.

    Returns
    -------
    ShardedStore
        The new store.

    Raises
    ------
    FileExistsError
        If *out_dir* exists and is not empty.
    """
    from pipeline.store import read_store

    store = source if isinstance(source, Store) else read_store(source)
    store.validate(raise_on_error=True)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        msg = f"{str(out)!r} exists and is not empty; choose a new folder"
        raise FileExistsError(msg)
    (out / "experiments").mkdir(parents=True, exist_ok=True)
    by_exp: dict[str, dict[str, Any]] = {}
    for eid, embryo in store.embryos.items():
        by_exp.setdefault(embryo["source"]["experiment_id"], {})[eid] = embryo
    index = {k: v for k, v in store.doc.items() if k != "embryos"}
    index["shards"] = {exp: f"experiments/{exp}.json" for exp in sorted(by_exp)}
    for exp, embryos in by_exp.items():
        atomic_write_bytes(
            out / "experiments" / f"{exp}.json",
            orjson.dumps({"embryos": embryos}, option=_DUMP),
            backups=0,
        )
    # The index last: a folder without it is not a store yet.
    atomic_write_bytes(out / INDEX, orjson.dumps(index, option=_DUMP), backups=0)
    return read_sharded(out)


def unshard_store(
    source: str | os.PathLike[str] | ShardedStore, out_path: str | os.PathLike[str]
) -> Store:
    """Convert a sharded store into a single-file one (losslessly).

    Parameters
    ----------
    source : path-like or ShardedStore
        The sharded store.
    out_path : path-like
        The new JSON file (must not exist).

    Returns
    -------
    Store
        The new single-file store.
    """
    store = source if isinstance(source, ShardedStore) else read_sharded(source)
    out = Path(out_path)
    if out.exists():
        msg = f"{str(out)!r} exists; choose a new file name"
        raise FileExistsError(msg)
    doc = {k: v for k, v in store.index.items() if k != "shards"}
    ordered = {"file_info": doc.pop("file_info")}
    if "permitted_values" in doc:
        ordered["permitted_values"] = doc.pop("permitted_values")
    ordered["embryos"] = store._full_doc()["embryos"]
    ordered["flags"] = doc.pop("flags")
    single = Store(ordered)
    single.save(out, backups=0)
    return single


def _shard_table(
    rel: str,
    root: str,
    top: dict[str, Any],
    vocab: dict[str, Any],
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """Parse, check and flatten one shard (runs on a worker)."""
    path = Path(root) / rel
    doc = _parse_json(path.read_bytes(), str(path))
    if not isinstance(doc, dict) or not isinstance(doc.get("embryos"), dict):
        msg = f"{path}: expected an object with 'embryos'"
        raise StoreFormatError(msg, path=str(path))
    with paused_gc():
        tables = build_tables({**top, "embryos": doc["embryos"]}, vocab)
    if tables.problems:
        raise StoreFormatError(
            _format_problems(tables.problems, str(path)),
            problems=tables.problems,
            path=str(path),
        )
    table = tables.snips.sort_index()
    table.attrs = {}
    if columns is None:
        return table
    extra = [c for c in table.columns if c not in columns]
    if extra:
        msg = (
            f"{path}: measurement column(s) {extra} are not in the other shards' columns; "
            "pass snips_from_store(store, measurements=[...]) naming every measurement key"
        )
        raise StoreFormatError(msg, path=str(path))
    return table.reindex(columns=columns)


def sharded_snips(
    store: ShardedStore, measurements: list[str] | None = None
) -> dd.DataFrame:
    """The snip table of a sharded store: one partition per experiment.

    Parameters
    ----------
    store : ShardedStore
        The store.
    measurements : list of str, optional
        Measurement columns; default those of the smallest shard.

    Returns
    -------
    dask.dataframe.DataFrame
        Lazy; each worker parses and checks its own shards.
    """
    from pipeline.schema import SNIP_COLUMNS, empty_frame

    experiments = sorted(store.shards)
    if measurements is None:
        smallest = (
            min(experiments, key=lambda e: store.shard_path(e).stat().st_size)
            if experiments
            else None
        )
        sample = (
            _shard_table(
                store.shards[smallest], str(store.root), _top(store), store.vocabulary
            )
            if smallest
            else None
        )
        measurements = [
            c
            for c in (sample.columns if sample is not None else [])
            if c not in SNIP_COLUMNS
        ]
    columns = [*SNIP_COLUMNS, *sorted(measurements)]
    meta = empty_frame(
        {**SNIP_COLUMNS, **dict.fromkeys(sorted(measurements), "float64")},
        index="snip_id",
    )
    for a in experiments:
        for b in experiments:
            if a != b and b.startswith(a + "_"):
                msg = f"experiments {a!r} and {b!r}: one experiment id extends another, which a sharded snip table cannot order; keep them in a single-file store"
                raise StoreFormatError(msg, path=str(store.root))
    # Every snip id of experiment E starts with "E_", so "E_" bounds its shard
    # from below and the next experiment's prefix from above.
    divisions = (
        [f"{e}_" for e in experiments] + [f"{experiments[-1]}_~"]
        if experiments
        else [None, None]
    )
    rels = [store.shards[e] for e in experiments]
    return dd.from_map(
        _shard_table,
        rels,
        args=(str(store.root), _top(store), store.vocabulary, columns),
        meta=meta,
        divisions=tuple(divisions),
        label="flatten",
        enforce_metadata=False,
    )


def _top(store: ShardedStore) -> dict[str, Any]:
    return {k: v for k, v in store.index.items() if k not in ("shards",)}
