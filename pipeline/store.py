"""Stage 1: the JSON metadata store, read, checked, edited and saved safely.

:func:`read_store` parses a store with orjson, upgrades legacy files, and checks
the whole document against the contract (``spec/store-schema.md``), reporting
every problem at once with its JSON path. The :class:`Store` it returns holds
the document, its vocabulary and a cached columnar snip table, and offers the
scalar primitives (``add_phenotype``, ``add_genotype``, ``add_flag``,
``add_treatment``) that enforce the vocabulary and the DEAD rules. Batch code
reaches the same rules through vectorised code in :mod:`pipeline.merge`.

A large file in this package's layout is read as tables only: its embryos go
into the snip table and the checks a block at a time and are dropped, and the
document is parsed again, from the same file, when something needs it
(:attr:`Store.doc`). Reading and flattening a store then holds its table, not
the document as Python objects (about a third of the memory).

Saving is atomic and durable (see :mod:`pipeline._atomic`) and happens under an
exclusive cross-process lock; a save refuses to overwrite a file that another
process changed since it was read, so no update is ever lost silently.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import msgspec
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import _jsonfile, _split_read, ids
from pipeline._arrow import (
    arrow_strings,
    differs_from_previous,
    release_unused_memory,
    strictly_increasing,
)
from pipeline._atomic import LOCK_TIMEOUT, atomic_write_bytes, store_lock
from pipeline._jsonfile import (
    DUMP_OPTIONS,
    OtherLayout,
    dump_chunks,
    load_json_file,
    stream_embryos,
)
from pipeline._tables import (
    Tables,
    add_block,
    build_tables,
    build_tables_streamed,
    combine_pieces,
    flags_table,
    parse_piece,
    suggest,
    vocab_sets,
)
from pipeline.errors import (
    AnnotationError,
    MergeConflictError,
    StoreFormatError,
    UpgradeWarning,
    warn,
)
from pipeline.legacy import is_legacy, upgrade
from pipeline.schema import LEVELS, default_vocabulary

__all__ = ["Store", "read_store", "write_store", "validate_store", "now", "paused_gc"]

#: How many problems an error message lists before summarising the rest.
_MAX_LISTED = 40


def now() -> str:
    """Current time as ISO 8601 with a UTC offset, e.g. ``2026-01-05T10:00:00+00:00``."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector.

    Parsing or building millions of small containers triggers full collections
    over and over while nothing can be freed; pausing it for the duration makes
    loads 2-3x faster and changes no result.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        return _stat_fingerprint(path.stat())
    except FileNotFoundError:
        return None


def _stat_fingerprint(st: os.stat_result) -> tuple[int, int, int]:
    # A file replaced (os.replace) or rewritten changes at least one of these.
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _format_problems(problems: list[tuple[str, str]], where: str) -> str:
    lines = [f"{where}: {len(problems)} problem(s) found; nothing was changed on disk:"]
    lines += [f"  {path}: {message}" for path, message in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED} more (see the exception's .problems)")
    lines.append("Fix these entries in the file (or restore a backup) and read it again.")
    return "\n".join(lines)


def _parse_json(data: bytes, where: str) -> Any:
    try:
        with paused_gc():
            return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise _not_json(err, where) from None


#: Whether :func:`read_store` moves what it parsed out of the cyclic garbage
#: collector's reach (``gc.freeze``); set only for the command line's own
#: process (:func:`pipeline.cli.main` run as the program), see
#: :func:`_parse_file`.
_FREEZE_PARSED = False
#: With ``_FREEZE_PARSED``, the last document parsed, kept alive so that it is
#: not freed object by object when the command's frames return (0.6 s at 1M
#: snips): the command line's process ends with ``os._exit`` instead (see
#: :func:`pipeline.cli.main`).
_KEPT: list[Any] = []


def _parse_file(path: Path, *, freeze: bool = False) -> Any:
    """Parse a JSON file, a block at a time when it is in our layout (see :mod:`pipeline._jsonfile`).

    With *freeze*, the parsed objects go to the collector's permanent
    generation before it is switched back on. Otherwise the next collections
    walk the whole document (millions of objects, about a second each at 1M
    snips) although a JSON document has no cycles to find; reference counting
    still frees it. Only for a process that reads a store and exits: frozen
    objects are never examined for cycles, so in a long session garbage cycles
    alive at that moment would stay.
    """
    try:
        with paused_gc():
            doc = load_json_file(path)
            if freeze:
                gc.freeze()
                _KEPT[:] = [doc]
            return doc
    except orjson.JSONDecodeError as err:
        raise _not_json(err, str(path)) from None


def _not_json(err: orjson.JSONDecodeError, where: str) -> StoreFormatError:
    msg = (
        f"{where} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno} "
        f"(character {err.pos}); fix the file by hand or restore a backup"
    )
    return StoreFormatError(msg, problems=[("$", msg)], path=where)


class Store:
    """A metadata store: the JSON document plus its columnar snip table.

    Parameters
    ----------
    doc : dict
        The document, in schema version 1.
    path : path-like, optional
        Where it was read from and is saved to.
    upgrade_report : list of str, optional
        What a legacy upgrade changed (empty for current files).
    validate : bool, default True
        Check the document now; raise :class:`StoreFormatError` if it is invalid.

    Examples
    --------
    >>> from pipeline.testing import make_store
    >>> store = make_store(n_experiments=1, n_embryos=2, n_frames=5, seed=0)
    >>> store.counts()["snips"]
    9
    """

    def __init__(
        self,
        doc: dict[str, Any],
        *,
        path: str | os.PathLike[str] | None = None,
        upgrade_report: list[str] | None = None,
        validate: bool = True,
    ) -> None:
        self._doc: dict[str, Any] | None = doc
        self._head: dict[str, Any] | None = None
        self.path = Path(path) if path is not None else None
        self.upgrade_report = list(upgrade_report or [])
        self._fingerprint = _fingerprint(self.path) if self.path else None
        self._tables: Tables | None = None
        if validate:
            self.validate(raise_on_error=True)

    @classmethod
    def _from_tables(cls, head: dict[str, Any], tables: Tables, *, path: Path, fingerprint: tuple[int, int, int]) -> Store:
        """A store read as tables only: its document is parsed on first use (see :attr:`doc`)."""
        store = cls.__new__(cls)
        store._doc, store._head = None, head
        store.path, store.upgrade_report = path, []
        store._fingerprint, store._tables = fingerprint, tables
        store.validate(raise_on_error=True)
        return store

    @property
    def doc(self) -> dict[str, Any]:
        """The JSON document (a dict in schema version 1).

        A large store that :func:`read_store` read as tables only is parsed
        here, on first use, from the same file (a second read: it must not
        have changed on disk since).
        """
        if self._doc is None:
            self._doc = self._read_document()
            self._head = None
        return self._doc

    @doc.setter
    def doc(self, value: dict[str, Any]) -> None:
        self._doc, self._head = value, None

    @property
    def head(self) -> dict[str, Any]:
        """Every top-level member of the document but ``"embryos"`` (never parses it)."""
        if self._doc is None:
            return self._head or {}
        return {k: v for k, v in self._doc.items() if k != "embryos"}

    @property
    def has_document(self) -> bool:
        """Whether the document is in memory (see :func:`read_store`'s *document*)."""
        return self._doc is not None

    def _read_document(self) -> dict[str, Any]:
        if self.path is None:  # pragma: no cover - only stores read from a file come without it
            msg = "this store has no document and no file to read it from"
            raise RuntimeError(msg)
        if self.changed_on_disk():
            msg = (
                f"{str(self.path)!r} was changed by another writer since it was read, and this store "
                "was read without its document (read_store(..., document=False)): read it again with "
                "read_store() and re-apply your edits"
            )
            raise MergeConflictError(msg)
        doc = _parse_file(self.path, freeze=_FREEZE_PARSED)
        if self.changed_on_disk() or not isinstance(doc, dict) or is_legacy(doc):
            msg = f"{str(self.path)!r} changed while its document was being read; read it again with read_store()"
            raise MergeConflictError(msg)
        return doc

    def __repr__(self) -> str:
        c = self.counts()
        where = str(self.path) if self.path else "in memory"
        return f"<Store {where}: {c['experiments']} experiments, {c['embryos']} embryos, {c['snips']} snips>"

    # ---------------------------------------------------------------- views
    @property
    def vocabulary(self) -> dict[str, Any]:
        """The vocabulary in force: ``permitted_values`` or the package default."""
        return _vocabulary_of(self.head)

    @property
    def embryos(self) -> dict[str, Any]:
        """The ``embryos`` object of the document."""
        return self.doc["embryos"]

    def tables(self) -> Tables:
        """The columnar view of the store (built once, cached until a change)."""
        if self._tables is None:
            with paused_gc():
                self._tables = build_tables(self.doc, self.vocabulary)
        return self._tables

    def snip_table(self) -> pd.DataFrame:
        """The whole snip table as one pandas DataFrame (index ``snip_id``, sorted).

        Returns
        -------
        pandas.DataFrame
            See :data:`pipeline.schema.SNIP_COLUMNS`; measurement columns follow.
        """
        tables = self.tables()
        if not tables.sorted:
            if not strictly_increasing(tables.snips.index):
                _sort_by_index(tables)
            tables.sorted = True
        return tables.snips

    def prepare_snip_table(self) -> None:
        """Sort the snip table now if it is built and sound (else leave it to :meth:`snip_table`).

        The command line calls this while its cluster starts on another
        thread: the sort's takes release the interpreter lock.
        """
        if self._tables is not None and not self._tables.problems:
            self.snip_table()

    def flags_table(self) -> pd.DataFrame:
        """Every flag in long format; see :func:`pipeline._tables.flags_table`."""
        return flags_table(self.doc)

    def invalidate(self) -> None:
        """Drop cached tables after the document was changed."""
        self._tables = None

    def problems(self) -> list[tuple[str, str]]:
        """Every problem of the document, as ``(json_path, message)`` pairs."""
        return list(self.tables().problems)

    def validate(self, *, raise_on_error: bool = True) -> list[tuple[str, str]]:
        """Check the document against the contract.

        Parameters
        ----------
        raise_on_error : bool, default True
            Raise instead of returning when there are problems.

        Returns
        -------
        list of (str, str)
            The problems (empty when valid).

        Raises
        ------
        StoreFormatError
            If *raise_on_error* and the document has problems.
        """
        problems = self.problems()
        if problems and raise_on_error:
            where = str(self.path) if self.path else "store"
            raise StoreFormatError(_format_problems(problems, where), problems=problems, path=where)
        return problems

    def check_embryos(self, embryo_ids: list[str] | set[str]) -> None:
        """Check only some embryos (after a batch touched them), raising on problems.

        Parameters
        ----------
        embryo_ids : collection of str
            The embryos to check, with the store's top-level parts.

        Raises
        ------
        StoreFormatError
            If any of them breaks the contract.
        """
        sub = {k: v for k, v in self.doc.items() if k != "embryos"}
        sub["embryos"] = {e: self.embryos[e] for e in embryo_ids if e in self.embryos}
        with paused_gc():
            problems = build_tables(sub, self.vocabulary).problems
        if problems:
            where = str(self.path) if self.path else "store"
            raise StoreFormatError(_format_problems(problems, where), problems=problems, path=where)

    def counts(self) -> dict[str, int]:
        """Numbers of experiments, videos, embryos and snips."""
        tables = self.tables()
        return {
            "experiments": len(tables.experiments),
            "videos": len(tables.videos),
            "embryos": tables.n_embryos,
            "snips": len(tables.snips),
        }

    def video_ids(self) -> tuple[str, ...]:
        """The videos the store lists: its video flags' keys and its embryos' videos.

        Returns
        -------
        tuple of str
            Sorted video ids, including videos without snips or embryos.

        Examples
        --------
        >>> from pipeline.testing import make_store
        >>> make_store(n_experiments=1, n_embryos=2, n_frames=3, seed=0).video_ids()[:1]
        ('20240102_A01',)
        """
        videos = set(self.head.get("flags", {}).get("video", {}))
        videos.update(self.tables().videos)
        return tuple(sorted(videos))

    # ----------------------------------------------------------- primitives
    def _canonical(self, value: str, choices: list[str] | set[str] | dict[str, Any], what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            msg = f"{what} must be a non-empty string, got {value!r}"
            raise AnnotationError(msg, reason="bad_value")
        by_upper = {c.upper(): c for c in choices}
        found = by_upper.get(value.strip().upper())
        if found is None:
            msg = f"unknown {what} {value!r}{suggest(value, set(choices))}; permitted: {', '.join(sorted(choices))}"
            raise AnnotationError(msg, reason=f"unknown_{what.replace(' ', '_')}")
        return found

    @staticmethod
    def _author(author: str) -> str:
        if not isinstance(author, str) or not author.strip():
            msg = f"author must be a non-empty name, got {author!r}"
            raise AnnotationError(msg, reason="bad_author")
        return author.strip()

    @staticmethod
    def _confidence(confidence: float | None) -> float | None:
        if confidence is None:
            return None
        ok = isinstance(confidence, int | float) and not isinstance(confidence, bool) and 0 <= confidence <= 1
        if not ok:
            msg = f"confidence must be a number within [0, 1], got {confidence!r}"
            raise AnnotationError(msg, reason="bad_confidence")
        return float(confidence)

    def _embryo(self, embryo_id: str) -> dict[str, Any]:
        try:
            return self.embryos[embryo_id]
        except KeyError:
            msg = f"unknown embryo {embryo_id!r}: not in this store"
            raise AnnotationError(msg, reason="unknown_embryo") from None

    def add_phenotype(
        self,
        snip_id: str,
        value: str,
        author: str,
        confidence: float | None = None,
        notes: str | None = None,
        overwrite_dead: bool = False,
    ) -> list[str]:
        """Set the phenotype of one snip, applying the DEAD rules.

        Parameters
        ----------
        snip_id : str
            The snip.
        value : str
            A phenotype of the vocabulary (matched case-insensitively).
        author : str
            Who makes the change (non-empty).
        confidence : float, optional
            Within [0, 1].
        notes : str, optional
            Free text.
        overwrite_dead : bool, default False
            Allow a non-DEAD value at or after the death frame, as long as DEAD
            stays permanent afterwards.

        Returns
        -------
        list of str
            Snip ids whose phenotype changed (DEAD fills forward to later frames).

        Raises
        ------
        AnnotationError
            Unknown snip or value, empty author, bad confidence, or a non-DEAD
            value at or after death (reason ``after_death``) without
            *overwrite_dead*, or one that would break permanence.
        """
        try:
            parts = ids.parse_snip_id(snip_id)
        except ValueError as err:
            raise AnnotationError(str(err), reason="unknown_snip_id") from None
        embryo = self.embryos.get(parts.embryo_id)
        if embryo is None or snip_id not in embryo["snips"]:
            msg = f"unknown snip {snip_id!r}: not in this store"
            raise AnnotationError(msg, reason="unknown_snip_id")
        value = self._canonical(value, self.vocabulary["phenotypes"], "phenotype")
        entry: dict[str, Any] = {"value": value, "author": self._author(author), "timestamp": now()}
        conf = self._confidence(confidence)
        if conf is not None:
            entry["confidence"] = conf
        if notes:
            entry["notes"] = str(notes)
        snips = embryo["snips"]
        frames = {sid: _frame(sid, s) for sid, s in snips.items()}
        frame = frames[snip_id]
        death = embryo["death_frame"]
        if value == "DEAD":
            targets = [sid for sid, f in frames.items() if f >= frame and (sid == snip_id or snips[sid]["phenotype"]["value"] != "DEAD")]
            for sid in targets:
                snips[sid]["phenotype"] = dict(entry)
            embryo["death_frame"] = frame if death is None else min(death, frame)
            self.invalidate()
            return targets
        if death is not None and frame >= death:
            if not overwrite_dead:
                msg = f"snip {snip_id!r} (frame {frame}) is at or after death (frame {death}): DEAD is permanent; pass overwrite_dead=True to correct a death call"
                raise AnnotationError(msg, reason="after_death")
            later_dead = [f for sid, f in frames.items() if sid != snip_id and f > frame and snips[sid]["phenotype"]["value"] == "DEAD"]
            if frame > death or (later_dead and len(later_dead) != sum(1 for f in frames.values() if f > frame)):
                msg = f"setting {value!r} at frame {frame} would leave DEAD at frame {death} followed by a live frame: DEAD must stay permanent"
                raise AnnotationError(msg, reason="breaks_permanence")
            snips[snip_id]["phenotype"] = entry
            embryo["death_frame"] = min(later_dead) if later_dead else None
            self.invalidate()
            return [snip_id]
        snips[snip_id]["phenotype"] = entry
        self.invalidate()
        return [snip_id]

    def add_genotype(
        self,
        embryo_id: str,
        value: str,
        author: str,
        confirmed: bool = False,
        allele: str | None = None,
        zygosity: str | None = None,
        notes: str | None = None,
        overwrite: bool = False,
        confidence: float | None = None,
    ) -> None:
        """Set the genotype of one embryo.

        Parameters
        ----------
        embryo_id : str
            The embryo.
        value : str
            A genotype of the vocabulary (matched case-insensitively).
        author : str
            Who makes the change.
        confirmed : bool, default False
            Whether it was confirmed (e.g. by PCR).
        allele, notes : str, optional
            Free text.
        zygosity : str, optional
            A zygosity of the vocabulary.
        overwrite : bool, default False
            Replace an existing genotype.
        confidence : float, optional
            Within [0, 1].

        Raises
        ------
        AnnotationError
            Unknown embryo or value, empty author, or an existing genotype
            without *overwrite* (reason ``has_genotype``).
        """
        embryo = self._embryo(embryo_id)
        entry: dict[str, Any] = {
            "value": self._canonical(value, self.vocabulary["genotypes"], "genotype"),
            "author": self._author(author),
            "timestamp": now(),
            "confirmed": bool(confirmed),
        }
        if allele:
            entry["allele"] = str(allele)
        if zygosity:
            entry["zygosity"] = self._canonical(zygosity, self.vocabulary["zygosity"], "zygosity")
        conf = self._confidence(confidence)
        if conf is not None:
            entry["confidence"] = conf
        if notes:
            entry["notes"] = str(notes)
        if embryo["genotype"] is not None and not overwrite:
            msg = f"embryo {embryo_id!r} already has genotype {embryo['genotype']['value']!r}; pass overwrite=True to replace it"
            raise AnnotationError(msg, reason="has_genotype")
        embryo["genotype"] = entry
        self.invalidate()

    def add_flag(
        self,
        entity_id: str,
        value: str,
        level: str,
        author: str,
        severity: str = "warning",
        notes: str | None = None,
        auto_generated: bool = False,
        confidence: float | None = None,
    ) -> None:
        """Raise a flag on an entity; raising the same value again updates it.

        Parameters
        ----------
        entity_id : str
            A snip, image, embryo, video or experiment id.
        value : str
            A flag the vocabulary permits at *level*.
        level : str
            One of ``snip``, ``image``, ``embryo``, ``video``, ``experiment``.
        author : str
            Who raises it.
        severity : str, default "warning"
            One of the vocabulary's ``severity_levels``.
        notes : str, optional
            Free text, e.g. the measured figure against the threshold.
        auto_generated : bool, default False
            Raised by a detector.
        confidence : float, optional
            Within [0, 1].

        Raises
        ------
        AnnotationError
            Unknown level, entity or value, bad severity, empty author.
        """
        if level not in LEVELS:
            msg = f"unknown level {level!r}; expected one of {', '.join(LEVELS)}"
            raise AnnotationError(msg, reason="bad_level")
        try:
            actual = ids.level_of(entity_id)
        except ValueError as err:
            raise AnnotationError(str(err), reason="unknown_entity") from None
        if actual != level:
            msg = f"{entity_id!r} is a {actual} id, not a {level} id"
            raise AnnotationError(msg, reason="bad_level")
        vocab = self.vocabulary
        entry: dict[str, Any] = {
            "value": self._canonical(value, vocab["flags"][level], f"{level} flag"),
            "author": self._author(author),
            "timestamp": now(),
            "severity": self._canonical(severity, vocab["severity_levels"], "severity"),
        }
        if auto_generated:
            entry["auto_generated"] = True
        if notes:
            entry["notes"] = str(notes)
        conf = self._confidence(confidence)
        if conf is not None:
            entry["confidence"] = conf
        flags = self._flag_list(entity_id, level, create=True)
        for i, existing in enumerate(flags):
            if existing["value"] == entry["value"]:
                flags[i] = entry
                break
        else:
            flags.append(entry)
        self.invalidate()

    def _flag_list(self, entity_id: str, level: str, *, create: bool) -> list[dict[str, Any]]:
        if level == "snip":
            embryo = self.embryos.get(ids.parse_snip_id(entity_id).embryo_id)
            if embryo is None or entity_id not in embryo["snips"]:
                msg = f"unknown snip {entity_id!r}: not in this store"
                raise AnnotationError(msg, reason="unknown_entity")
            return embryo["snips"][entity_id]["flags"]
        if level == "embryo":
            return self._embryo(entity_id)["flags"]
        table = self.doc["flags"][level]
        if create:
            return table.setdefault(entity_id, [])
        return table.get(entity_id, [])

    def add_treatment(
        self,
        embryo_id: str,
        value: str,
        author: str,
        concentration: float | str | None = None,
        temperature_celsius: float | None = None,
        notes: str | None = None,
    ) -> None:
        """Record a treatment of one embryo.

        Parameters
        ----------
        embryo_id : str
            The embryo.
        value : str
            The treatment, e.g. ``"heat_shock"``.
        author : str
            Who records it.
        concentration : float or str, optional
            A number, or a string carrying its unit (``"10 uM"``).
        temperature_celsius : float, optional
            Temperature of the treatment.
        notes : str, optional
            Free text.

        Raises
        ------
        AnnotationError
            Unknown embryo, empty value or author, non-numeric temperature.
        """
        embryo = self._embryo(embryo_id)
        if not isinstance(value, str) or not value.strip():
            msg = f"treatment must be a non-empty string, got {value!r}"
            raise AnnotationError(msg, reason="bad_value")
        entry: dict[str, Any] = {"value": value.strip(), "author": self._author(author), "timestamp": now()}
        if concentration is not None:
            if isinstance(concentration, bool) or not isinstance(concentration, int | float | str):
                msg = f"concentration must be a number or a string with its unit, got {concentration!r}"
                raise AnnotationError(msg, reason="bad_value")
            entry["concentration"] = concentration
        if temperature_celsius is not None:
            if isinstance(temperature_celsius, bool) or not isinstance(temperature_celsius, int | float):
                msg = f"temperature_celsius must be a number, got {temperature_celsius!r}"
                raise AnnotationError(msg, reason="bad_value")
            entry["temperature_celsius"] = float(temperature_celsius)
        if notes:
            entry["notes"] = str(notes)
        embryo["treatments"].append(entry)
        self.invalidate()

    # ------------------------------------------------------------ persistence
    def changed_on_disk(self) -> bool:
        """Whether the file was replaced by another writer since it was read."""
        return self.path is not None and _fingerprint(self.path) != self._fingerprint

    @contextlib.contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[Store]:
        """Hold the store's write lock for a whole read-modify-write.

        Parameters
        ----------
        timeout : float, default LOCK_TIMEOUT
            Seconds to wait for another writer.

        Yields
        ------
        Store
            This store.

        Raises
        ------
        StoreLockedError
            If another writer holds the lock for longer than *timeout*.
        """
        if self.path is None:
            yield self
            return
        with store_lock(self.path, timeout):
            yield self

    def reload(self) -> None:
        """Read the file again, replacing the document in memory."""
        if self.path is None:
            return
        fresh = read_store(self.path, quiet=True, document=True if self._doc is not None else None)
        self._doc, self._head = fresh._doc, fresh._head
        self._tables, self._fingerprint = fresh._tables, fresh._fingerprint
        self.upgrade_report = fresh.upgrade_report

    def to_bytes(self) -> bytes:
        """Serialise the document (orjson, two-space indent, trailing newline)."""
        return orjson.dumps(self.doc, option=DUMP_OPTIONS)

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
        """Write the store atomically and durably, under its lock.

        Parameters
        ----------
        path : path-like, optional
            Where to write; default the path it was read from.
        backups : int, default 5
            Timestamped backups of earlier versions to keep beside the file.
        lock_timeout : float, default LOCK_TIMEOUT
            Seconds to wait for another writer's lock.
        force : bool, default False
            Overwrite even if another process changed the file since it was read.

        Returns
        -------
        pathlib.Path
            The file written.

        Raises
        ------
        MergeConflictError
            If the file changed on disk since it was read (and not *force*).
        StoreFormatError
            If the document in memory is invalid: an invalid store is never written.
        """
        target = Path(path) if path is not None else self.path
        if target is None:
            msg = "this store was not read from a file: pass save(path=...)"
            raise ValueError(msg)
        same_file = self.path is not None and target.resolve() == self.path.resolve()
        ctx = contextlib.nullcontext() if _locked else store_lock(target, lock_timeout)
        with ctx:
            if same_file and not force and self.changed_on_disk():
                msg = (
                    f"{str(target)!r} was changed by another writer since it was read; "
                    "saving would lose their changes. Read it again with read_store() and "
                    "re-apply your edits (batch functions do this for you), or save(force=True)."
                )
                raise MergeConflictError(msg)
            if not _checked:
                self.validate(raise_on_error=True)
            self.doc["file_info"]["last_updated"] = now()
            # In pieces: the file's bytes are never all in memory next to the document.
            atomic_write_bytes(target, dump_chunks(self.doc), backups=backups)
        if self.upgrade_report:
            print(f"upgraded {target} to schema version 1", file=sys.stderr)
            self.upgrade_report = []
        self.path = target
        self._fingerprint = _fingerprint(target)
        return target


def _sort_by_index(tables: Tables) -> None:
    """Sort the snip table by its (unique) index, a column or two at a time.

    ``DataFrame.sort_index`` holds the whole table twice; here the table is
    taken apart, each column's old values are released as soon as its sorted
    copy exists, and Arrow's allocator is asked to hand the freed memory back,
    so a 1M-snip table costs one or two extra columns at the peak, not a
    second table.
    """
    index = tables.snips.index
    # The ids in one array (a table read block by block has them in pieces):
    # the order is found on it, and it is the index column taken below.
    ids = arrow_strings(index)
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    order = _embryo_order(ids, arrow_strings(tables.snips["embryo_id"]))
    if order is None:
        order = pc.sort_indices(ids).to_numpy()
    columns = {name: tables.snips[name].array for name in tables.snips.columns}
    dtypes = tables.snips.dtypes.to_dict()
    tables.snips = None  # type: ignore[assignment]  # the only other reference
    # Two columns at a time (Arrow's and numpy's takes release the interpreter
    # lock), each pair's old values released before the next pair is taken.
    name = index.name
    columns[None] = _in_one_piece(index.array, ids)  # type: ignore[index]  # the index, taken with the columns
    del index, ids
    keys = list(columns)
    with ThreadPoolExecutor(max_workers=_SORT_THREADS, thread_name_prefix="pipeline-sort") as pool:
        for pair in (keys[i : i + _SORT_THREADS] for i in range(0, len(keys), _SORT_THREADS)):
            for key, values in zip(pair, pool.map(lambda key: _take(columns[key], order), pair), strict=True):
                columns[key] = values
            # Freed columns go back to the system now: the allocators would
            # keep them for the thread that made them, not the takers.
            release_unused_memory()
    index = pd.Index(columns.pop(None), name=name)  # type: ignore[call-overload]
    tables.snips = pd.DataFrame(columns, index=index, copy=False).astype(dtypes)
    release_unused_memory()


#: Columns taken at once when the snip table is sorted.
_SORT_THREADS = 2


def _in_one_piece(values: Any, joined: pa.Array) -> Any:
    """*values* (a pandas array of strings) as *joined*, the same strings in one Arrow array, when they can be wrapped so."""
    if isinstance(values, pd.arrays.ArrowStringArray):
        with contextlib.suppress(TypeError):  # pandas 2 takes no dtype here: keep the pieces
            return pd.arrays.ArrowStringArray(joined, dtype=values.dtype)
    return values


def _take(values: Any, order: np.ndarray) -> Any:
    """``values.take(order)``; Arrow columns in pieces are joined first.

    A table read block by block has its string columns in ~25 chunks, and
    Arrow's take over chunks locates every row's chunk (2-5x slower than
    joining them, a copy, and taking from one array).
    """
    if isinstance(values, pd.arrays.ArrowExtensionArray):
        chunked = pa.chunked_array(pa.array(values))
        if chunked.num_chunks > 1:
            return type(values)(chunked.combine_chunks().take(pa.array(order)))
    return values.take(order)


def _embryo_order(snip_ids: pa.Array | pa.ChunkedArray, embryo_ids: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """The sorting permutation, found by moving whole embryos, or None.

    Tables are built embryo by embryo, each embryo's snips usually in order:
    ordering the embryos by their first snip id (thousands of strings, not
    millions) then sorts the table. None when that is not so, and the caller
    sorts every id. The check needs no sorted copy of the ids: the result is
    strictly increasing when each embryo's ids are (compared in place) and,
    in the new order, each embryo's last id precedes the next one's first.
    """
    n = len(snip_ids)
    if snip_ids.null_count:
        return None
    starts = np.flatnonzero(np.r_[True, differs_from_previous(embryo_ids)])
    ends = np.r_[starts[1:], n]
    runs = pc.sort_indices(snip_ids.take(pa.array(starts))).to_numpy()
    rising = pc.less(snip_ids[:-1], snip_ids[1:]).to_numpy(zero_copy_only=False)
    rising[starts[1:] - 1] = True  # across embryos: checked below
    if not rising.all():
        return None
    first = snip_ids.take(pa.array(starts[runs[1:]]))
    last = snip_ids.take(pa.array(ends[runs[:-1]] - 1))
    if not pc.all(pc.less(last, first)).as_py() in (True, None):
        return None
    lengths = (ends - starts)[runs]
    # Positions of the runs laid end to end in their new order.
    offsets = np.repeat(starts[runs] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return np.arange(n) + offsets


def _frame(snip_id: str, snip: dict[str, Any]) -> int:
    frame = snip.get("frame")
    return ids.parse_snip_id(snip_id).frame if frame is None else frame


def read_store(path: str | os.PathLike[str], *, quiet: bool = False, document: bool | None = None) -> Store:
    """Read and check a single-file store.

    Parameters
    ----------
    path : path-like
        The store's JSON file, or a sharded store's folder (see
        :mod:`pipeline.shards`; its shards are read when used).
    quiet : bool, default False
        Do not warn about a legacy upgrade (the report stays on the store).
    document : bool, optional
        Whether to keep the parsed JSON document in memory. Its Python
        objects take about 2.7x the file, the snip table about 1.5x. With
        False, a file in the layout this package writes is read a block of
        embryos at a time into the snip table and the checks, and each block
        is dropped once used: the document is parsed again, from the same
        file, only if something needs it (an edit, a merge, a save, the flags
        table). True parses it now (for a process that will write anyway).
        The default is False for files larger than one read block (16 MB)
        and True for smaller ones. Files in another layout, legacy files and
        files with errors are always parsed whole.

        On a machine with two or more cores, a file of 96 MB or more
        (``pipeline._split_read.MIN_BYTES``) in that layout is read on two:
        a helper interpreter builds the tables of the embryos after a cut
        while this process builds the others (and, with True, parses the
        whole document). Same store, same errors; the helper exits when done.

    Returns
    -------
    Store
        The checked store, its snip table already built.

    Raises
    ------
    FileNotFoundError
        If *path* does not exist.
    StoreFormatError
        If the file is not valid JSON or breaks the contract; the message lists
        every problem with its JSON path. Nothing is written.

    Notes
    -----
    Triggers computation: parses and checks the whole file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from pipeline.testing import make_store
    >>> tmp = pathlib.Path(tempfile.mkdtemp()) / "store.json"
    >>> _ = make_store(n_experiments=1, n_embryos=2, n_frames=3, seed=1).save(tmp)
    >>> read_store(tmp).counts()["snips"]
    6
    """
    path = Path(path)
    from pipeline.shards import is_sharded, read_sharded

    if is_sharded(path):
        return read_sharded(path)
    if path.is_dir():
        msg = f"{str(path)!r} is a folder without a store.json: expected a store file or a sharded store's folder"
        raise StoreFormatError(msg, path=str(path))
    if document is False or (document is None and path.stat().st_size > _jsonfile.BLOCK):
        try:
            return _read_split(path, document=False) or _read_tables_only(path)
        except (OtherLayout, orjson.JSONDecodeError, ValueError):
            pass  # another layout, a legacy file, an error: the whole parse says exactly what
    elif document and (split := _read_split(path, document=True)) is not None:
        return split
    doc = _parse_file(path, freeze=_FREEZE_PARSED)
    report: list[str] = []
    if is_legacy(doc):
        try:
            doc, report = upgrade(doc)
        except ValueError as err:
            msg = f"{path}: cannot upgrade legacy file: {err}"
            raise StoreFormatError(msg, path=str(path)) from None
        if not quiet:
            warn(
                f"{path} is a legacy EmbryoMetadata file; it was upgraded in memory and will be "
                "written in schema version 1 on the next save:\n  " + "\n  ".join(report),
                UpgradeWarning,
            )
    elif not isinstance(doc, dict):
        msg = f"{path}: expected a JSON object at the top level, found {type(doc).__name__}"
        raise StoreFormatError(msg, problems=[("$", msg)], path=str(path))
    return Store(doc, path=path, upgrade_report=report)


def _read_tables_only(path: Path) -> Store:
    """Read a store's tables a block of embryos at a time, without keeping its document.

    Raises
    ------
    OtherLayout, orjson.JSONDecodeError, ValueError
        When the file must be read whole instead (another layout, a legacy
        file, a syntax error, an embryo id given twice): nothing is kept.
    """
    found: dict[str, Any] = {}
    with paused_gc():
        stream = stream_embryos(path, _jsonfile.BLOCK, found, parse=parse_piece)
        first = next(stream, None)
        if first is None:
            raise OtherLayout
        vocab = _streamed_vocabulary(found)
        pieces = itertools.chain([first], stream)
        del first  # the chain lets go of the first block once it moves on
        tables = build_tables_streamed(pieces, lambda: found["rest"], vocab)
    rest = found["rest"]
    if is_legacy(rest):
        raise OtherLayout
    if _vocabulary_of(rest) != vocab:
        # permitted_values follows the embryos in this file: read it again
        # with the right vocabulary (the file is read once per vocabulary).
        with paused_gc():
            tables = build_tables_streamed(
                stream_embryos(path, _jsonfile.BLOCK, found, parse=parse_piece), lambda: found["rest"], _vocabulary_of(rest)
            )
    return Store._from_tables(rest, tables, path=path, fingerprint=_stat_fingerprint(found["stat"]))


def _read_split(path: Path, *, document: bool) -> Store | None:
    """Read a large store with a helper process building part of its tables.

    See :mod:`pipeline._split_read` and :class:`SplitRead`.

    Returns
    -------
    Store or None
        The store; None when the one-process read must do it (nothing is
        kept).
    """
    started = SplitRead.start(path, document=document)
    if started is None:
        return None
    with started:
        return started.finish()


class SplitRead:
    """A store read whose helper process is already at work.

    :meth:`start` cuts the embryos and starts the helper on those after the
    cut; :meth:`finish` builds the tables of those before it (and with
    *document* parses every embryo into the document), both at once on two
    cores, then joins the helper's part. Between the two the caller may do
    other work, and :meth:`finish` can run more once its own part is done
    (the command line starts its cluster there), which the helper's start-up
    and part absorb. Use as a context manager: leaving it stops a helper
    whose result was not taken.
    """

    def __init__(self, path: Path, document: bool, first_theirs: str, helper: _split_read.Helper) -> None:
        self.path, self.document = path, document
        self._first_theirs, self._helper = first_theirs, helper

    @classmethod
    def start(cls, path: str | os.PathLike[str], *, document: bool, share: float | None = None) -> SplitRead | None:
        """Start reading *path* with a helper, or None when one would not help.

        Parameters
        ----------
        path : path-like
            A store file.
        document : bool
            Whether :meth:`finish` keeps the document.
        share : float, optional
            Part of the embryos this process reads (default
            ``_split_read.share(document=document)``); smaller when the
            caller has other work to do meanwhile.
        """
        started = _split_read.start(path, _split_read.share(document=document) if share is None else share)
        return None if started is None else cls.adopt(started, document=document)

    @classmethod
    def adopt(cls, started: _split_read.Started, *, document: bool) -> SplitRead:
        """The read whose helper :func:`pipeline._split_read.start` started (the command line starts it early)."""
        return cls(started.path, document, started.first_theirs, started.helper)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._helper.__exit__(*exc)

    def finish(self, meanwhile: Callable[[], object] | None = None) -> Store | None:
        """Read this process's part and join the helper's.

        Parameters
        ----------
        meanwhile : callable, optional
            Called once this process's part is read and found sound, while
            the helper may still be at work (the command line starts its
            cluster there). Not called when the read falls back.

        Returns
        -------
        Store or None
            The store; None when the one-process read must do it (nothing is
            kept). With *document*, once the whole document is parsed, a
            failed split builds the store from it the usual way instead.

        Raises
        ------
        StoreFormatError
            With *document*, as :func:`read_store`.
        """
        path, document, first_theirs, block = self.path, self.document, self._first_theirs, _jsonfile.BLOCK
        found: dict[str, Any] = {}
        pieces: list[Tables] = []
        mine: set[str] = set()
        embryos: dict[str, Any] = {}
        n_parsed = 0
        met = False
        untyped = False  # whether part of the document came from _helpers_document_piece
        vocab: dict[str, Any] = {}

        def document_piece(view: memoryview) -> dict[str, Any]:
            # Up to the cut, orjson's objects serve the document and this
            # process's tables; after it, the document only (the helper
            # builds those tables): see _helpers_document_piece.
            nonlocal untyped
            if not met:
                return orjson.loads(view)
            untyped = True
            return _helpers_document_piece(view)

        try:
            with paused_gc():
                stream = stream_embryos(path, block, found, parse=document_piece if document else parse_piece)
                try:
                    for piece in stream:
                        if not vocab:
                            vocab = _streamed_vocabulary(found)
                            sets = vocab_sets(vocab)
                        if document:
                            embryos.update(piece)
                            n_parsed += len(piece)
                        if not met:
                            if first_theirs in piece:
                                met = True
                                names = list(piece)
                                piece = {k: piece[k] for k in names[: names.index(first_theirs)]}
                            if piece:
                                add_block(pieces, mine, piece, sets)
                            if met and not document:
                                break
                        del piece
                finally:
                    stream.close()
                if document:
                    doc = found["rest"]
                    doc["embryos"] = embryos
                    if _FREEZE_PARSED:
                        gc.freeze()
                        _KEPT[:] = [doc]
                # Still paused: a collection now would walk the whole document.
                theirs = None
                if met and meanwhile is not None and not any(piece.problems for piece in pieces):
                    if self._helper.finished():
                        # Its pieces first: unpickling them and a cluster's
                        # start (what *meanwhile* may begin) both want the
                        # interpreter lock, the work after them does not.
                        theirs = self._helper.result()
                        meanwhile()
                    else:
                        meanwhile()
                if met and theirs is None and not self._helper.received:
                    theirs = self._helper.result()
        except (OtherLayout, orjson.JSONDecodeError, ValueError):
            return None
        fingerprint = _stat_fingerprint(found["stat"])
        if document and untyped and not (theirs is not None and theirs[4]):
            # The helper's part of the document was decoded untyped with no
            # 64-bit check (the helper failed, or found a wider integer):
            # parse the file as usual.
            embryos.clear()  # frees the pieces before the new parse
            _KEPT.clear()
            doc = _parse_file(path, freeze=_FREEZE_PARSED)
            theirs = None  # and build the store from it, as the one-process read does
        if (
            theirs is None
            or theirs[3] != fingerprint
            or _fingerprint(path) != fingerprint
            or not theirs[1]
            or theirs[1][0] != first_theirs
            or not mine.isdisjoint(theirs[1])
            or (document and not n_parsed == len(embryos) == len(mine) + len(theirs[1]))
        ):
            return Store(doc, path=path) if document else None
        all_pieces = [*pieces, *theirs[0]]
        rest = theirs[2]
        del pieces, theirs  # the pieces go as soon as they are joined
        tables = combine_pieces(all_pieces, rest, vocab)
        release_unused_memory()
        if tables.problems:  # the one-process read words them (and orders them) as usual
            return Store(doc, path=path) if document else None
        store = Store._from_tables(rest, tables, path=path, fingerprint=fingerprint)
        if document:
            store.doc = doc
        return store


#: Decodes a piece of the document into plain dicts and lists, as orjson
#: does but about 1.5x as fast (measured on the 1M-snip store).
_UNTYPED = msgspec.json.Decoder()


def _helpers_document_piece(view: memoryview) -> dict[str, Any]:
    """A piece of the document after the cut of a split read, as ``orjson.loads`` gives it.

    The untyped msgspec decode gives the same objects as orjson for any JSON
    whose integers fit in 64 bits (orjson turns wider ones into floats, msgspec
    keeps them). The helper decodes these embryos typed, which checks exactly
    that: the caller keeps this document only if the helper found its whole
    part :class:`pipeline._tables.Bounded`, and parses the file again with
    orjson otherwise.
    """
    try:
        return _UNTYPED.decode(view)
    except msgspec.DecodeError:  # not JSON, or nested too deep for msgspec: orjson says which
        return orjson.loads(view)


def _streamed_vocabulary(found: dict[str, Any]) -> dict[str, Any]:
    """The vocabulary of a store file being streamed, from the members before its embryos.

    Raises
    ------
    OtherLayout
        If those members say the file is a legacy one (read whole instead).
    """
    if is_legacy(found["head"]):
        raise OtherLayout
    return _vocabulary_of(found["head"])


def _vocabulary_of(doc: dict[str, Any]) -> dict[str, Any]:
    pv = doc.get("permitted_values")
    return pv if isinstance(pv, dict) else default_vocabulary()


def write_store(store: Store, path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Path:
    """Save *store* atomically and durably; see :meth:`Store.save`.

    Parameters
    ----------
    store : Store
        The store.
    path : path-like, optional
        Where to write; default where it was read from.
    **kwargs
        Passed to :meth:`Store.save`.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    return store.save(path, **kwargs)


def validate_store(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Check a store file and return its problems instead of raising.

    Parameters
    ----------
    path : path-like
        The store file.

    Returns
    -------
    list of (str, str)
        ``(json_path, message)`` per problem; empty when valid.
    """
    try:
        read_store(path, quiet=True)
    except StoreFormatError as err:
        return err.problems or [("$", str(err))]
    return []
