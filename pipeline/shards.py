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
- A batch merge (:func:`apply_sharded`, which :func:`pipeline.merge_into_store`
  uses for sharded stores) never loads the shards in this process: one task
  per touched shard (on the workers of the active ``distributed`` client, else
  here one after the other) loads the shard from disk, applies its slice of
  the change set with the functions of :mod:`pipeline.merge`, checks it and
  stages ``<shard>.<token>.new``; this process logs the batch, renames the
  staged files to ``<shard>.new`` and commits them with the same journal.
  :func:`merge_many_sharded` (several change sets as one batch, for
  :func:`pipeline.merge.merge_many`) and :func:`undo_sharded` (for
  :func:`pipeline.merge.undo`) are batches of the same machinery, and
  :func:`holds_sharded` reads a checkpoint's values shard by shard the same
  way (for resuming a checkpointed merge).
- :meth:`ShardedStore.video_ids` lists the videos shard by shard, on the
  workers when a client is active, without keeping the shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pandas as pd

from pipeline import _jsonfile, ids
from pipeline._atomic import (
    LOCK_TIMEOUT,
    _keep_backup,
    atomic_write_bytes,
    fsync_dir,
    store_lock,
)
from pipeline._jsonfile import DUMP_OPTIONS, OtherLayout, stream_embryos
from pipeline._jsonschema import check, store_schema
from pipeline._tables import Tables, build_tables, build_tables_streamed, parse_piece
from pipeline.errors import MergeConflictError, StoreFormatError
from pipeline.store import (
    Store,
    _fingerprint,
    _format_problems,
    _parse_file,
    _parse_json,
    now,
    paused_gc,
)

if TYPE_CHECKING:
    import dask.dataframe as dd

__all__ = [
    "ShardedStore",
    "read_sharded",
    "shard_store",
    "unshard_store",
    "is_sharded",
    "sharded_snips",
    "apply_sharded",
    "merge_many_sharded",
    "undo_sharded",
    "holds_sharded",
    "JOURNAL",
]

INDEX = "store.json"
JOURNAL = "journal.json"
_DUMP = DUMP_OPTIONS  # the single-file layout: shards read and write the same way


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


def _load_shard(
    path: Path, experiment: str, top: dict[str, Any], vocab: dict[str, Any]
) -> dict[str, Any]:
    """Parse and check one shard file; return its embryos.

    Parameters
    ----------
    path : pathlib.Path
        The shard file.
    experiment : str
        The experiment it must hold.
    top : dict
        The store's top-level parts (the index without ``shards``).
    vocab : dict
        The vocabulary in force.

    Returns
    -------
    dict
        The shard's ``embryos`` object.

    Raises
    ------
    StoreFormatError
        If the file is not a valid shard of *experiment*.
    """
    doc = _parse_file(path)
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
            problems = list(build_tables({**top, "embryos": doc["embryos"]}, vocab).problems)
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
    return doc["embryos"]


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
            embryos = _load_shard(path, experiment, _top(self), self.vocabulary)
            self._loaded[experiment] = embryos
            self._digests[experiment] = _digest(orjson.dumps(embryos, option=_DUMP))
            self._shard_fp[experiment] = _fingerprint(path)
        return self._loaded[experiment]

    def _full_doc(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.doc.items() if k != "embryos"}
        doc["embryos"] = {
            eid: e for exp in self.shards for eid, e in self.shard(exp).items()
        }
        return doc

    def prepare_snip_table(self) -> None:
        """Nothing to prepare: the snip table of a sharded store is read shard by shard, in tasks."""

    def tables(self) -> Tables:
        """The columnar view of all shards (loads every shard)."""
        if self._tables is None:
            with paused_gc():
                self._tables = build_tables(self._full_doc(), self.vocabulary)
        return self._tables

    def counts(self) -> dict[str, int]:
        """Numbers of experiments, videos, embryos and snips (loads every shard)."""
        return Store.counts(self)

    def video_ids(self, client: Any = None) -> tuple[str, ...]:
        """The videos the store lists, without holding every shard in this process.

        Parameters
        ----------
        client : distributed.Client, optional
            Where to read the shards; default the active client
            (:func:`pipeline.cluster.get_client`). With none, shards are read
            here one at a time and not kept.

        Returns
        -------
        tuple of str
            Sorted: the index's video flags' keys and the videos of every
            shard's embryos (shards already loaded are read from memory).

        Raises
        ------
        StoreFormatError
            If a shard file is not JSON or an embryo has no ``source.video_id``.

        Notes
        -----
        Triggers computation: parses every shard not already loaded.
        """
        from pipeline.cluster import _cluster_failures, _span, get_client

        videos = set(self.index.get("flags", {}).get("video", {}))
        for embryos in self._loaded.values():
            videos.update(e["source"]["video_id"] for e in embryos.values())
        paths = [
            str(self.shard_path(e).resolve()) for e in self.shards if e not in self._loaded
        ]
        found = get_client(client)
        if found is None:
            for path in paths:
                videos.update(_shard_videos(path))
        elif paths:
            futures = found.map(_shard_videos, paths, pure=False, key=[f"videos-{uuid.uuid4().hex}-{i}" for i in range(len(paths))])
            with _span("videos"), _cluster_failures():
                for part in found.gather(futures):
                    videos.update(part)
        return tuple(sorted(videos))

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
    files: Mapping[Path, bytes | None],
    *,
    backups: int = 5,
    _crash_after: int | None = None,
) -> None:
    """Replace several files of a folder all-or-nothing.

    Parameters
    ----------
    root : pathlib.Path
        The store's folder (where the journal lives).
    files : mapping of pathlib.Path to bytes or None
        New content per file; None when its ``<file>.new`` is already written
        and durable (as :func:`apply_sharded`'s tasks leave it).
    backups : int, default 5
        Backups kept of each replaced file.
    _crash_after : int, optional
        For tests: end the process (as a crash would, no clean-up) after
        replacing this many files; -1 ends it before the journal is written.
    """
    for target, data in files.items():
        if data is not None:
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
    if not problems:
        # The store-level parts beyond their shape (flag vocabulary, authors,
        # timestamps), once here rather than with every shard (see _top).
        store = ShardedStore(root, index)
        top = {k: v for k, v in index.items() if k != "shards"}
        problems = list(build_tables({**top, "embryos": {}}, store.vocabulary).problems)
    if problems:
        raise StoreFormatError(
            _format_problems(problems, str(root / INDEX)),
            problems=problems,
            path=str(root / INDEX),
        )
    return store


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

    store = source if isinstance(source, Store) else read_store(source, document=True)
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
    tables = _typed_shard_tables(path, top, vocab)
    if tables is None:
        doc = _parse_file(path)
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


def _typed_shard_tables(path: Path, top: dict[str, Any], vocab: dict[str, Any]) -> Tables | None:
    """A shard's tables read a block of embryos at a time, typed, as a single file's are.

    The shard's embryos are decoded as :func:`pipeline.read_store` decodes a
    large store's (:func:`pipeline._tables.parse_piece`: about 1.3x as fast
    as a parse into dicts); the store-level members are *top*'s, as in the
    whole parse. None for a shard in another layout, and for one with any
    problem: the whole parse then reports them in its own order.
    """
    found: dict[str, Any] = {}
    try:
        with paused_gc():
            blocks = stream_embryos(path, _jsonfile.BLOCK, found, parse=parse_piece)
            tables = build_tables_streamed(blocks, lambda: {**top, "embryos": {}}, vocab)
    except (OtherLayout, orjson.JSONDecodeError, ValueError):
        return None
    return None if tables.problems else tables


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
    import dask.dataframe as dd

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
    clash = _extending_pair(experiments)
    if clash is not None:
        a, b = clash
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


def _extending_pair(experiments: list[str]) -> tuple[str, str] | None:
    """The first ``(a, b)`` (in sorted order) where id *b* starts with ``a + "_"``.

    Each id's ``_``-prefixes are looked up in a set: linear in the ids (times
    their underscores), where comparing every pair was quadratic.
    """
    known = set(experiments)
    pairs = [
        (b[:i], b)
        for b in experiments
        for i, char in enumerate(b)
        if char == "_" and b[:i] in known
    ]
    return min(pairs) if pairs else None


def _top(store: ShardedStore) -> dict[str, Any]:
    """The index's top-level parts, as each shard is checked against them.

    The store-level flags (experiments, videos, images) are left out (kept as
    empty levels): :func:`read_sharded` checks them once, and walking a
    cohort's worth of them again for every shard cost 50+ ms per shard.
    """
    top = {k: v for k, v in store.index.items() if k != "shards"}
    if isinstance(top.get("flags"), dict):
        top["flags"] = {level: {} for level in top["flags"]}
    return top


def _shard_videos(path: str) -> list[str]:
    """The video ids of one shard's embryos (runs on a worker)."""
    doc = _parse_file(Path(path))
    try:
        return list({e["source"]["video_id"] for e in doc["embryos"].values()})
    except (KeyError, TypeError, AttributeError):
        msg = f"{path}: expected {{'embryos': {{...}}}} with a source.video_id per embryo; check the store with validate"
        raise StoreFormatError(msg, path=path) from None


# ------------------------------------------------------- merging per shard
_TOP_LEVELS = ("experiment", "video", "image")
_KINDS = ("phenotype", "genotype", "measurement", "flag")


def _staged(target: Path, token: str) -> Path:
    """Where a task writes a shard's new content before the client commits it."""
    return target.with_name(f"{target.name}.{token}.new")


def _restamp(log: list[list[Any]], stamp: str) -> None:
    """Give the flag entries a batch created (not the ones it kept) the batch's time."""
    for target, _entity, _field, before, after in log:
        if target != "flags" or not after:
            continue
        kept = {id(f) for f in before or ()}
        for entry in after:
            if id(entry) not in kept:
                entry["timestamp"] = stamp


def _apply_step(
    one: Store,
    kind: str,
    part: pd.DataFrame | list[list[Any]],
    replace: list[str],
    force: bool,
    log: list[list[Any]],
    undo_ops: list[Any],
) -> None:
    """Apply one step of a batch to *one* with the functions of :mod:`pipeline.merge`.

    Parameters
    ----------
    one : Store
        A one-shard store (in a task) or the index's top-level parts (here).
    kind : str
        ``phenotype``, ``genotype``, ``measurement``, ``flag`` or ``undo``.
    part : pandas.DataFrame or list
        The step's rows that fall in *one*; for ``undo``, change-log entries
        ``[target, entity, field, before, after]`` whose ``before`` values are
        put back, in the order given.
    replace : list of str
        Flag steps: authors whose earlier flags are cleared.
    force : bool
        Skip the stale-value checks.
    log, undo_ops : list
        Receive the change-log entries and the steps that take them back.
    """
    from pipeline import merge

    # As in merge._write_batch: many small entries next to a large document.
    with paused_gc():
        if kind == "phenotype":
            merge._apply_phenotypes(one, part, log, undo_ops, force)
        elif kind == "genotype":
            merge._apply_genotypes(one, part, log, undo_ops, force)
        elif kind == "measurement":
            merge._apply_measurements(one, part, log, undo_ops, force)
        elif kind == "flag":
            merge._apply_flags(one, part, replace, log, undo_ops)
        else:
            for target, entity, fieldname, before, after in part:
                merge._restore(one, target, entity, fieldname, before, after, log, undo_ops)


def _shard_store(embryos: dict[str, Any], top: dict[str, Any]) -> Store:
    """A one-shard store: the index's parts, no top-level flags (the client applies those)."""
    doc = {k: v for k, v in top.items() if k != "flags"}
    doc["flags"] = {level: {} for level in _TOP_LEVELS}
    doc["embryos"] = embryos
    return Store(doc, validate=False)


def _index_store(store: ShardedStore) -> Store:
    """The index's top-level parts as a store without embryos (edits reach ``store.index``)."""
    doc = {k: v for k, v in store.index.items() if k != "shards"}
    doc["embryos"] = {}
    return Store(doc, validate=False)


def _merge_shard(
    root: str,
    rel: str,
    experiment: str,
    top: dict[str, Any],
    vocab: dict[str, Any],
    steps: list[tuple[str, Any, list[str]]],
    force: bool,
    stamp: str,
    token: str,
) -> dict[str, Any]:
    """Apply one shard's slices of a batch and stage its new file (runs on a worker).

    Parameters
    ----------
    root : str
        The store's folder (absolute).
    rel : str
        The shard's path inside it.
    experiment : str
        The shard's experiment.
    top : dict
        The index without ``shards`` (to check the shard as it is loaded).
    vocab : dict
        The vocabulary in force.
    steps : list of (str, object, list of str)
        The batch's steps in order: each its kind (``phenotype``,
        ``genotype``, ``measurement``, ``flag`` or ``undo``), its rows that
        fall in this shard (batch order; change-log entries for ``undo``) and
        the authors a flag step replaces.
    force : bool
        Skip the stale-value checks.
    stamp : str
        The batch's time, given to the flag entries it creates.
    token : str
        The batch's token: the new file is ``<shard>.<token>.new``.

    Returns
    -------
    dict
        ``experiment``, ``logs`` (per step, the change-log entries in the
        order :mod:`pipeline.merge` makes them) and ``staged`` (the path
        written, or None when the shard did not change).

    Raises
    ------
    MergeConflictError
        If a value changed since the change set was computed (and not
        *force*), or a flag row breaks the vocabulary.
    StoreFormatError
        If the shard on disk, or the touched embryos after the batch, break
        the contract.
    """
    from pipeline import merge

    path = Path(root) / rel
    embryos = _load_shard(path, experiment, top, vocab)
    one = _shard_store(embryos, top)
    logs: list[list[list[Any]]] = []
    undo_ops: list[Any] = []
    touched: set[str] = set()
    for kind, part, replace in steps:
        log: list[list[Any]] = []
        if len(part) or (kind == "flag" and replace):
            _apply_step(one, kind, part, replace, force, log, undo_ops)
        if kind == "flag":
            # Flag entries are checked as they are built (as merge does).
            _restamp(log, stamp)
        elif kind == "phenotype" and log:
            # As merge does: the written entries and the DEAD rules of the
            # touched embryos, not a rebuild of their tables.
            merge._check_phenotype_batch(one, part, merge._touched_embryos(log))
        else:
            touched.update(merge._touched_embryos(log))
        logs.append(log)
    staged = None
    if any(logs):
        if touched:
            one.check_embryos(touched)
        data = orjson.dumps({"embryos": embryos}, option=_DUMP)
        # Entries that put back what was there leave the file as it was:
        # compare with the bytes on disk rather than serialising twice.
        if _digest(data) != _digest(path.read_bytes()):
            target = _staged(path, token)
            atomic_write_bytes(target, data, backups=0)
            staged = str(target)
    return {"experiment": experiment, "logs": logs, "staged": staged}


def _not_in_store(entity: str) -> MergeConflictError:
    msg = f"the change set names {entity!r} which is not in the store; was it computed from another store?"
    return MergeConflictError(msg)


def _keys(kind: str, rows: pd.DataFrame | list[list[Any]]) -> np.ndarray:
    """Per row, the entity it writes: level and entity joined by NUL (flags, undo), or the embryo id."""
    if kind == "undo":
        keys = []
        for target, entity, *_ in rows:
            if target == "flags":
                level, _, name = entity.partition(":")
                keys.append(f"{level}\x00{name}")
            else:
                keys.append(f"{target}\x00{entity}")
        return np.array(keys, dtype=object)
    if kind == "flag":
        return (rows["level"].astype(str) + "\x00" + rows["entity_id"].astype(str)).to_numpy(dtype=object)
    if kind == "measurement":
        # Measurement rows may leave embryo_id empty: it follows from the snip.
        emb = rows["embryo_id"].astype(object).to_numpy(dtype=object)
        sids = rows["snip_id"].astype(object).to_numpy(dtype=object)
        return np.array(
            [e if isinstance(e, str) else _embryo_of_snip(s) for e, s in zip(emb, sids, strict=True)], dtype=object
        )
    return rows["embryo_id"].astype(str).to_numpy(dtype=object)


def _route(store: ShardedStore, kind: str, rows: pd.DataFrame | list[list[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the rank of its shard in the index (-1: the index itself), and its entity key."""
    keys = _keys(kind, rows)
    leveled = kind in ("flag", "undo")
    codes, uniques = pd.factorize(keys)
    rank = {e: i for i, e in enumerate(store.shards)}
    where = np.empty(len(uniques), dtype=np.int64)
    for i, key in enumerate(uniques):
        level, _, entity = key.partition("\x00") if leveled else ("embryo", "", key)
        if level not in ("snip", "embryo"):
            where[i] = -1  # top-level flags (and unknown levels: merge reports those)
            continue
        try:
            experiment = (
                ids.parse_snip_id(entity).experiment_id if level == "snip" else ids.parse_embryo_id(entity)[0]
            )
        except ValueError:
            raise _not_in_store(entity) from None
        if experiment not in rank:
            raise _not_in_store(entity)
        where[i] = rank[experiment]
    return where[codes], keys


def _embryo_of_snip(snip_id: Any) -> str:
    try:
        return ids.parse_snip_id(snip_id).embryo_id
    except ValueError:
        raise _not_in_store(snip_id) from None


class _Step:
    """One step of a batch, routed: its rows per shard and those of the index."""

    def __init__(
        self,
        store: ShardedStore,
        kind: str,
        rows: pd.DataFrame | list[list[Any]],
        replace: Iterable[str] = (),
    ) -> None:
        self.kind, self.rows = kind, rows
        self.replace = sorted(set(replace or ()))
        shard_of, self.keys = _route(store, kind, rows)
        order = list(store.shards)
        by_rank = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[by_rank], np.arange(-1, len(order) + 1))
        self.positions: dict[str | None, np.ndarray] = {
            exp: by_rank[bounds[i + 1] : bounds[i + 2]]
            for i, exp in enumerate(order)
            if bounds[i + 2] > bounds[i + 1]
        }
        self.positions[None] = by_rank[bounds[0] : bounds[1]]

    @property
    def everywhere(self) -> bool:
        """Whether every shard must be visited (a flag step that replaces authors)."""
        return self.kind == "flag" and bool(self.replace)

    def part(self, exp: str | None) -> pd.DataFrame | list[list[Any]]:
        """The rows that fall in *exp*'s shard (None: in the index), in batch order."""
        pos = self.positions.get(exp)
        if isinstance(self.rows, list):
            return [] if pos is None else [self.rows[i] for i in pos]
        return self.rows.iloc[:0] if pos is None else self.rows.iloc[pos]

    def ordered(self, logs: list[tuple[str | None, list[list[Any]]]]) -> list[list[Any]]:
        """The entries of the index and of every shard, in the order the in-client merge makes them."""
        n = len(self.rows)
        first_of: dict[str, int] = {}
        if self.kind == "phenotype":
            emb = self.rows["embryo_id"].to_numpy(dtype=object)
            first = ~pd.Series(emb).duplicated().to_numpy()
            first_of = dict(zip(emb[first], (np.flatnonzero(first) + n).tolist(), strict=True))
        elif self.kind == "flag":
            first = ~pd.Series(self.keys).duplicated().to_numpy()
            first_of = dict(zip(self.keys[first], np.flatnonzero(first).tolist(), strict=True))
        keyed: list[tuple[int, list[Any]]] = []
        next_key = 2 * n
        for exp, entries in logs:
            pos = self.positions.get(exp, ())
            for j, entry in enumerate(entries):
                if self.kind == "flag":
                    level, _, entity = entry[1].partition(":")
                    k = first_of.get(f"{level}\x00{entity}")
                    if k is None:  # found through replace: after the batch's own rows
                        k, next_key = next_key, next_key + 1
                elif j < len(pos):
                    k = pos[j]
                else:  # death_frame, after every snip entry
                    k = first_of[entry[1]]
                keyed.append((int(k), entry))
        keyed.sort(key=lambda t: t[0])
        return [entry for _, entry in keyed]


def _unsaved_shards(store: ShardedStore) -> list[str]:
    """Loaded shards whose embryos were edited in memory and not saved."""
    return [
        exp
        for exp, embryos in store._loaded.items()
        if _digest(orjson.dumps(embryos, option=_DUMP)) != store._digests[exp]
    ]


def _forget_shards(store: ShardedStore) -> None:
    """Drop the loaded shards and cached tables; note the index on disk."""
    store._loaded, store._digests, store._shard_fp, store._tables = {}, {}, {}, None
    store._fingerprint = _fingerprint(store.path)


def _discard(root: Path, token: str, targets: Iterable[Path] = ()) -> None:
    """Remove a batch's staged files (and the ``.new`` files of *targets*)."""
    for path in [*root.glob(f"*.{token}.new"), *root.glob(f"experiments/*.{token}.new")]:
        path.unlink(missing_ok=True)
    for target in targets:
        target.with_name(target.name + ".new").unlink(missing_ok=True)
    if (root / "experiments").is_dir():
        fsync_dir(root / "experiments")


def _run_tasks(
    client: Any, fn: Any, calls: list[tuple[str, Any]], token: str, prefix: str = "merge-shard", stage: str = "merge"
) -> dict[str, Any]:
    """Run one task per shard: here one at a time, or on the workers of *client*.

    Parameters
    ----------
    client : distributed.Client or None
        Where the tasks run; None: here, one after the other (one shard in
        memory at once).
    fn : callable
        The task, called with the arguments ``make()`` returns.
    calls : list of (str, callable)
        Per shard, its experiment and a function making the task's arguments.
    token : str
        The batch's token (in the task keys).
    prefix, stage : str
        The task keys' prefix, and the span they run in.

    Returns
    -------
    dict
        Experiment to the task's result.

    Raises
    ------
    Exception
        The first failure, in index order, once every task has finished (none
        may still be writing when the caller cleans up).
    """
    if client is None:
        return {exp: fn(*make()) for exp, make in calls}

    from distributed import wait

    from pipeline.cluster import _cluster_failures, _span

    futures: dict[str, Any] = {}
    try:
        with _span(stage), _cluster_failures():
            for i, (exp, make) in enumerate(calls):
                futures[exp] = client.submit(fn, *make(), key=f"{prefix}-{token}-{i}", pure=False)
            wait(list(futures.values()))
            for future in futures.values():
                if future.status != "finished":
                    future.result()
            return {exp: f.result() for exp, f in futures.items()}
    except BaseException:
        client.cancel(list(futures.values()))
        raise


def _fresh(store: ShardedStore) -> None:
    """Re-read a store another writer changed; refuse unsaved in-memory edits (tasks read the disk)."""
    if store.changed_on_disk():
        store.reload()
    unsaved = _unsaved_shards(store)
    if unsaved:
        msg = (
            f"experiment(s) {unsaved[:3]} of {str(store.root)!r} were edited in memory and not saved; "
            "a batch merge reads the shards from disk: save() those edits first, or read the store again"
        )
        raise MergeConflictError(msg)


def _batch(
    store: ShardedStore,
    steps: list[_Step],
    *,
    kind: str,
    author: str,
    inputs: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    backups: int = 5,
    client: Any = None,
    always: bool = False,
) -> tuple[str | None, list[list[Any]]]:
    """Apply the steps of one batch shard by shard, log it and commit it, all-or-nothing.

    The machinery of :func:`apply_sharded`, :func:`undo_sharded` and
    :func:`merge_many_sharded`: steps on the index's top-level flags are
    applied here; one task per touched shard (:func:`_merge_shard`, through
    :func:`_run_tasks`) applies every step's slice of that shard in order,
    checks it and stages its file; the entries are put in the in-client
    order, step after step; :func:`_commit_staged` logs and commits.

    Parameters
    ----------
    store : ShardedStore
        The store (fresh from disk, no unsaved edits), its lock held.
    steps : list of _Step
        The batch's steps, in order.
    kind, author : str
        The change-log record's ``kind`` and ``author``.
    inputs : dict, optional
        The record's ``inputs``.
    extra : dict, optional
        More keys of the record; with ``checkpoint``, a ``saved`` marker
        follows it once committed.
    force : bool, default False
        Skip the stale-value checks.
    backups : int, default 5
        Backups kept of each replaced file.
    client : distributed.Client, optional
        Where the tasks run (None: here).
    always : bool, default False
        Log and commit even when the batch changed nothing (an undo is a
        batch of its own whatever it restores).

    Returns
    -------
    batch_id : str or None
        The new batch; None when nothing changed and not *always*.
    log : list
        The batch's change-log entries.
    """
    from pipeline import changelog
    from pipeline.cluster import get_client

    stamp = now()
    token = uuid.uuid4().hex
    root = store.root
    top = _top(store)
    vocab = store.vocabulary
    visit = [e for e in store.shards if any(s.everywhere or e in s.positions for s in steps)]

    def call(exp: str) -> Any:
        return lambda: (
            str(root.resolve()), store.shards[exp], exp, top, vocab,
            [(s.kind, s.part(exp), s.replace) for s in steps], force, stamp, token,
        )

    top_logs: list[list[list[Any]]] = [[] for _ in steps]
    top_undo: list[Any] = []

    def restore_index() -> None:
        for op in reversed(top_undo):
            op()

    try:
        index = None
        for step, log in zip(steps, top_logs, strict=True):
            if len(step.positions[None]) or step.everywhere:
                if index is None:
                    index = _index_store(store)
                _apply_step(index, step.kind, step.part(None), step.replace, force, log, top_undo)
                if step.kind == "flag":
                    _restamp(log, stamp)
        results = _run_tasks(get_client(client), _merge_shard, [(exp, call(exp)) for exp in visit], token)
    except BaseException:
        _discard(root, token)
        restore_index()
        raise
    log = [
        entry
        for i, step in enumerate(steps)
        for entry in step.ordered([(None, top_logs[i]), *((e, results[e]["logs"][i]) for e in visit)])
    ]
    if not log and not always:
        _discard(root, token)
        restore_index()
        return None, []
    batch_id = changelog.new_batch_id()
    record = changelog.batch_record(batch_id, kind, author, store.path, inputs, log, extra)
    staged = [(store.shard_path(exp), Path(results[exp]["staged"])) for exp in visit if results[exp]["staged"]]
    _commit_staged(store, record, staged, token, restore_index, backups)
    return batch_id, log


def _commit_staged(
    store: ShardedStore,
    record: dict[str, Any],
    staged: list[tuple[Path, Path]],
    token: str,
    restore_index: Any,
    backups: int,
) -> None:
    """Log a batch, then commit its staged shards and the index with the journal.

    Before the journal is durable a failure removes every staged file,
    restores the in-memory index and logs ``aborted``; past it the batch
    completes (here, or when the store is next opened), so nothing is logged
    as aborted. A checkpoint's record is followed by its ``saved`` marker.
    """
    from pipeline import changelog

    root = store.root
    batch_id, author = record["batch_id"], record["author"]
    file_info = store.index["file_info"]
    updated = file_info.get("last_updated")
    try:
        changelog.append_record(store.path, record)
    except BaseException:
        _discard(root, token)
        restore_index()
        raise
    try:
        for target, path in staged:
            os.replace(path, target.with_name(target.name + ".new"))
        if staged:
            fsync_dir(root / "experiments")
        file_info["last_updated"] = now()
        files: dict[Path, bytes | None] = {target: None for target, _ in staged}
        files[store.path] = store.to_bytes()
        journaled_write(root, files, backups=backups)
    except BaseException as err:
        if (root / JOURNAL).exists():
            # Past the commit point: finish now, or the next open will.
            with contextlib.suppress(Exception):
                recover(root)
            _forget_shards(store)
            if (root / JOURNAL).exists() or not isinstance(err, Exception):
                raise
        else:
            _discard(root, token, [t for t, _ in staged] + [store.path])
            file_info["last_updated"] = updated
            restore_index()
            changelog.mark_aborted(store.path, batch_id, author)
            raise
    _forget_shards(store)
    if "checkpoint" in record:
        changelog.mark_saved(store.path, batch_id)


def committed_on_open(store: Store) -> bool:
    """Whether a sharded store's failed save is past its commit point (its journal is durable).

    Such a batch completes when the store is next opened (it is finished here
    if possible): it must not be logged as ``aborted``.
    """
    if not isinstance(store, ShardedStore) or not (store.root / JOURNAL).exists():
        return False
    with contextlib.suppress(Exception):
        recover(store.root)
    _forget_shards(store)
    return True
def apply_sharded(
    store: ShardedStore,
    kind: str,
    writes: pd.DataFrame,
    *,
    replace: Iterable[str] = (),
    force: bool = False,
    inputs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    backups: int = 5,
    client: Any = None,
) -> tuple[str | None, int]:
    """Merge one batch into a sharded store shard by shard, all-or-nothing.

    What :func:`pipeline.merge_into_store` does under the lock, without
    loading the touched shards in this process: each shard gets its slice of
    *writes* in a task that loads the shard as it is on disk, applies the
    slice (the stale-value checks included), checks the touched embryos,
    writes its new content beside it and returns its change-log entries.
    Tasks run on the workers of the active ``distributed`` client, else here
    one after the other (memory: one shard plus the change set). Flags on
    experiments, videos and images live in ``store.json`` and are applied
    here. Then the change-log record is appended (the same record as
    :func:`pipeline.merge.merge_into_store` writes, entries in the same
    order) and the files are committed with :func:`journaled_write`.

    Parameters
    ----------
    store : ShardedStore
        The store, its lock held by the caller (``store.locked()``).
    kind : str
        ``phenotype``, ``genotype``, ``measurement`` or ``flag``.
    writes : pandas.DataFrame
        The rows to write: those of the change set with status ``assigned``
        or ``backfilled`` (``assigned`` for measurements, ``raised`` for
        flags), as ``pipeline.merge`` selects them.
    replace : iterable of str, optional
        Flag batches: first clear the flags these authors raised earlier and
        that the batch does not raise again (every shard is visited).
    force : bool, default False
        Write even where a value changed since the change set was computed.
    inputs : dict, optional
        What produced the batch, recorded in the change log.
    extra : dict, optional
        More keys of the change-log record (``pipeline.merge`` adds a
        checkpoint's ``checkpoint``, a measurement batch's ``author`` and
        ``values_timestamp``). With ``checkpoint``, a ``saved`` marker follows
        the record once the files are committed. Nothing is recorded when
        nothing changed (the caller records an empty checkpoint).
    backups : int, default 5
        Backups kept of each replaced file.
    client : distributed.Client, optional
        Where the tasks run; default the active client
        (:func:`pipeline.cluster.get_client`), else this process.

    Returns
    -------
    batch_id : str or None
        The batch in the change log; None when nothing changed.
    n_entries : int
        Change-log entries of the batch (a flag merge reports them as the
        values written); 0 when nothing changed.

    Raises
    ------
    MergeConflictError
        If a value changed since the change set was computed (and not
        *force*), a flag row breaks the vocabulary, the change set names an
        embryo the store does not have, or a loaded shard has unsaved edits.
    StoreFormatError
        If a shard on disk, or an embryo after the batch, breaks the contract.

    Notes
    -----
    On any failure before the commit point, every staged file is removed:
    every shard and ``store.json`` stay byte-identical and the in-memory
    index is restored. A process killed at any point leaves a store that
    opens to the old or the new state of the whole batch (:func:`recover`).
    Afterwards the store holds no loaded shard; the index is the one written.
    The order of the change-log entries is that of the in-client merge.
    """
    if kind not in _KINDS:
        msg = f"kind must be 'phenotype', 'genotype', 'measurement' or 'flag', got {kind!r}"
        raise ValueError(msg)
    _fresh(store)
    step = _Step(store, kind, writes, replace)
    author = str(writes["author"].iloc[0]) if len(writes) and "author" in writes else ""
    batch_id, log = _batch(
        store, [step], kind=kind, author=author, inputs=inputs, extra=extra, force=force, backups=backups,
        client=client,
    )
    return batch_id, len(log)


def merge_many_sharded(
    store: ShardedStore,
    batches: Iterable[tuple[str, pd.DataFrame]],
    *,
    kind: str,
    force: bool = False,
    inputs: dict[str, Any] | None = None,
    backups: int = 5,
    client: Any = None,
) -> tuple[str | None, int]:
    """Merge several phenotype and genotype change sets as ONE batch, shard by shard.

    What :func:`pipeline.merge.merge_many` does under the lock, without
    loading the touched shards in this process: each touched shard's task
    applies its rows of every change set, in order (as the single-file merge
    applies the change sets one after the other), checks its touched embryos
    and stages its file; one change-log record (one ``batch_id``) holds the
    entries of all change sets, in the single-file order; the files are
    committed together as :func:`apply_sharded` commits them.

    Parameters
    ----------
    store : ShardedStore
        The store, its lock held by the caller.
    batches : iterable of (str, pandas.DataFrame)
        Per change set, its kind (``phenotype`` or ``genotype``) and the rows
        it writes (status ``assigned`` or ``backfilled``).
    kind : str
        The kind recorded in the change log (e.g. ``import``).
    force : bool, default False
        Write even where a value changed since the change sets were computed.
    inputs : dict, optional
        What produced the batch, recorded in the change log.
    backups : int, default 5
        Backups kept of each replaced file.
    client : distributed.Client, optional
        Where the tasks run; default the active client, else this process.

    Returns
    -------
    batch_id : str or None
        The batch; None when nothing changed (nothing is recorded).
    n_entries : int
        Its change-log entries.

    Raises
    ------
    MergeConflictError
        If a value changed since the change sets were computed (and not
        *force*), a change set names an embryo the store does not have, or a
        loaded shard has unsaved edits. Nothing is written.
    StoreFormatError
        If a shard on disk, or an embryo after the batch, breaks the contract.
    """
    batches = [(k, w) for k, w in batches if len(w)]
    wrong = sorted({k for k, _ in batches} - {"phenotype", "genotype"})
    if wrong:
        msg = f"merge_many_sharded takes phenotype and genotype change sets, got {wrong}"
        raise ValueError(msg)
    _fresh(store)
    steps = [_Step(store, k, w) for k, w in batches]
    author = str(batches[0][1]["author"].iloc[0]) if batches and "author" in batches[0][1] else ""
    batch_id, log = _batch(
        store, steps, kind=kind, author=author, inputs=inputs, force=force, backups=backups, client=client
    )
    return batch_id, len(log)


def undo_sharded(
    store: ShardedStore,
    record: dict[str, Any],
    *,
    force: bool = False,
    backups: int = 5,
    client: Any = None,
) -> tuple[str, list[list[Any]]]:
    """Put back the ``before`` values of one logged batch, shard by shard, as a new batch.

    What :func:`pipeline.merge.undo` does under the lock once it has checked
    the later batches, without loading the touched shards in this process:
    the record's entries, last first, go to the task of their shard (flags of
    experiments, videos and images are restored here in the index), which
    restores them, checks the touched embryos and stages its file; the undo
    is logged as a batch of its own (kind ``undo``, ``inputs`` naming the
    batch undone) with the entries in the single-file order, and committed
    as :func:`apply_sharded` commits.

    Parameters
    ----------
    store : ShardedStore
        The store, its lock held by the caller.
    record : dict
        The change-log record of the batch to undo.
    force : bool, default False
        Recorded in the undo's ``inputs`` (the caller checked the later batches).
    backups : int, default 5
        Backups kept of each replaced file.
    client : distributed.Client, optional
        Where the tasks run; default the active client, else this process.

    Returns
    -------
    batch_id : str
        The undo's batch (recorded even when it restores nothing).
    log : list
        Its change-log entries: ``[target, entity, field, current, before]``.

    Raises
    ------
    MergeConflictError
        If an entry names an embryo the store does not have, or a loaded
        shard has unsaved edits.
    StoreFormatError
        If a shard on disk, or an embryo after the undo, breaks the contract.
    """
    _fresh(store)
    rows = [list(entry) for entry in reversed(record.get("changes", []))]
    step = _Step(store, "undo", rows)
    batch_id, log = _batch(
        store, [step], kind="undo", author="undo", inputs={"undo_of": record["batch_id"], "force": force},
        backups=backups, client=client, always=True,
    )
    assert batch_id is not None  # always=True
    return batch_id, log


def _holds_in(one: Store, entries: list[list[Any]]) -> tuple[bool, bool]:
    """Whether *one* holds every ``after`` value of *entries*, and every ``before`` value."""
    from pipeline import merge

    after = before = True
    for target, entity, fieldname, old, new in entries:
        try:
            current = merge._current_value(one, target, entity, fieldname)
        except (KeyError, ValueError):
            return False, False
        after = after and current == new
        before = before and current == old
        if not (after or before):
            break
    return after, before


def _shard_holds(
    root: str, rel: str, experiment: str, top: dict[str, Any], vocab: dict[str, Any], checks: list[list[list[Any]]]
) -> list[tuple[bool, bool]]:
    """Per batch, whether one shard holds its entries' ``after`` and ``before`` values (runs on a worker)."""
    embryos = _load_shard(Path(root) / rel, experiment, top, vocab)
    one = _shard_store(embryos, top)
    return [_holds_in(one, entries) for entries in checks]


def holds_sharded(
    store: ShardedStore, batches: list[list[list[Any]]], *, client: Any = None
) -> list[tuple[bool, bool]]:
    """Whether a sharded store holds each batch's ``after`` values, and its ``before`` values.

    How :func:`pipeline.merge.merge_into_store` judges a checkpoint whose
    ``saved`` marker is missing, without loading the shards in this process:
    each touched shard is read by a task (on the workers of the active
    client, else here one at a time) that checks its entries of every batch;
    the index's top-level flags are checked here; shards already loaded are
    read from memory.

    Parameters
    ----------
    store : ShardedStore
        The store.
    batches : list of list
        Per batch, its change-log entries ``[target, entity, field, before, after]``.
    client : distributed.Client, optional
        Where the tasks run; default the active client, else this process.

    Returns
    -------
    list of (bool, bool)
        Per batch: every ``after`` value is in the store; every ``before``
        value is. An entity the store does not have makes both False.

    Raises
    ------
    StoreFormatError
        If a shard file breaks the contract.
    """
    from pipeline.cluster import get_client

    judged = [[True, True] for _ in batches]
    steps: dict[int, _Step] = {}
    for i, changes in enumerate(batches):
        try:
            steps[i] = _Step(store, "undo", [list(c) for c in changes])
        except MergeConflictError:
            judged[i] = [False, False]

    def fold(i: int, found: tuple[bool, bool]) -> None:
        judged[i] = [judged[i][0] and found[0], judged[i][1] and found[1]]

    index = _index_store(store)
    for i, step in steps.items():
        fold(i, _holds_in(index, step.part(None)))
    order = list(steps)
    visit = [e for e in store.shards if any(e in s.positions for s in steps.values())]
    top, vocab, root = _top(store), store.vocabulary, str(store.root.resolve())
    for exp in [e for e in visit if e in store._loaded]:
        one = _shard_store(store._loaded[exp], top)
        for i in order:
            fold(i, _holds_in(one, steps[i].part(exp)))
    calls = [
        (exp, lambda exp=exp: (root, store.shards[exp], exp, top, vocab, [steps[i].part(exp) for i in order]))
        for exp in visit
        if exp not in store._loaded
    ]
    token = uuid.uuid4().hex
    for found in _run_tasks(get_client(client), _shard_holds, calls, token, "holds-shard", "resume").values():
        for i, pair in zip(order, found, strict=True):
            fold(i, pair)
    return [(bool(a), bool(b)) for a, b in judged]
