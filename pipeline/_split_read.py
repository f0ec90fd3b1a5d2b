"""A helper process that reads the second part of a large store file's embryos.

Reading a store is CPU-bound Python work (parse, checks, snip table) that one
interpreter does on one core. For a large file in the layout this package
writes, :func:`pipeline.store.read_store` cuts the embryos in two at a member
boundary (:func:`pipeline._jsonfile.split_point`) and starts a helper process
that builds the tables of the embryos after the cut while it builds those
before it (and, when it keeps the document, parses all of them: the
helper's part with msgspec's untyped decoder, 1.5x as fast as orjson and
the same objects whenever every integer fits in 64 bits, which the helper's
typed decode of the same embryos checks and reports). The helper
writes its pieces to an unnamed temporary file (in ``TMPDIR``; about 130 MB
per 400,000 snips) as it goes, and they are joined exactly as the pieces of
a one-process streamed read are.

Anything unexpected (the helper cannot start, fails or dies, the file is in
another layout or changed, an id repeats, any problem in the store) makes
the caller fall back to the one-process read, which gives the usual result
and messages: the helper only ever saves time.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import os
import pickle
import select
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

__all__ = [
    "MIN_BYTES",
    "SHARE_WITH_DOCUMENT",
    "SHARE_TABLES_ONLY",
    "CLI_SHARE_WITH_DOCUMENT",
    "CLI_SHARE_TABLES_ONLY",
    "SHARE_WITH_CLUSTER",
    "SHARE_TABLES_ONLY_WITH_CLUSTER",
    "share",
    "worthwhile",
    "off",
    "Helper",
    "Started",
    "start",
]

#: Files smaller than this are read in one process: the helper's own start
#: (a new interpreter importing the package, about 1.5 s of its CPU) would
#: not pay for itself.
MIN_BYTES = 96 << 20
#: How far into the embryos the cut goes when this process also parses the
#: whole document (it then parses every embryo, the helper only its part) ...
SHARE_WITH_DOCUMENT = 0.4
#: ... and when both read tables only (the helper starts later) ...
SHARE_TABLES_ONLY = 0.58
#: The command line starts the helper before its own imports (pandas, Dask:
#: about 1.5 s of this process), so its helper reads more: with the
#: document ...
CLI_SHARE_WITH_DOCUMENT = 0.28
#: ... tables only ...
CLI_SHARE_TABLES_ONLY = 0.52
#: ... and when it also starts an embedded cluster meanwhile (about 1 s of
#: this process: distributed's import, the dashboard), with the document ...
SHARE_WITH_CLUSTER = 0.25
#: ... or tables only. (All measured on two cores with the 1M-snip store;
#: see benchmarks/RESULTS.md. The helper and a tables-only read decode their
#: embryos typed, about 1.3x as fast as a parse into dicts. With the document
#: this process parses the helper's part untyped, about 1.5x as fast as
#: orjson, and its own part with orjson for its tables too, so the helper
#: takes the larger part.)
SHARE_TABLES_ONLY_WITH_CLUSTER = 0.42

_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("pipeline_split_read_off", default=False)


def share(*, document: bool, early: bool = False, cluster: bool = False) -> float:
    """The part of the embryos the caller reads itself (see the constants above).

    Parameters
    ----------
    document : bool
        Whether the caller also parses the whole document.
    early : bool, default False
        Whether the helper started before the caller's imports (the command line).
    cluster : bool, default False
        Whether the caller starts an embedded cluster meanwhile (the command
        line, which then always starts its helper early).
    """
    if cluster:
        return SHARE_WITH_CLUSTER if document else SHARE_TABLES_ONLY_WITH_CLUSTER
    if early:
        return CLI_SHARE_WITH_DOCUMENT if document else CLI_SHARE_TABLES_ONLY
    return SHARE_WITH_DOCUMENT if document else SHARE_TABLES_ONLY


def worthwhile(size: int) -> bool:
    """Whether a file of *size* bytes is worth a helper process on this machine (and not :func:`off`)."""
    return size >= MIN_BYTES and not _OFF.get() and _cpus() >= 2


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Read in one process within this context (after a split read fell back: it would again)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: The helper's start: the package's modules from this same folder, without
#: running its ``__init__`` (nothing there is needed, whatever it may come to
#: import), then :func:`_main` with the arguments.
_BOOT = """\
import importlib.util, sys
folder = sys.argv[1]
spec = importlib.util.spec_from_file_location("pipeline", folder + "/__init__.py", submodule_search_locations=[folder])
sys.modules["pipeline"] = importlib.util.module_from_spec(spec)  # not executed
from pipeline._split_read import _main
_main(sys.argv[2:])
"""


class Helper:
    """The helper process reading the embryos from byte *offset* of *path* on.

    A new interpreter (``python -c``, see ``_BOOT``), not a
    ``multiprocessing`` child: that would run the caller's main script again
    in the helper. It imports this same package's modules and writes the
    tables of each block of embryos, pickled, to an unnamed temporary file
    as soon as they are built (so it never holds them all, and never waits
    for this process, which is busy with its own part), then says "end" or
    "fail" on a pipe of its own. Use as a context manager: leaving it stops
    the process if its result was not received.
    """

    def __init__(self, path: Path, offset: int, block: int) -> None:
        self._spill = tempfile.TemporaryFile()  # noqa: SIM115 - closed by __exit__; unlinked: nothing is left behind
        read_end, write_end = os.pipe()
        package = str(Path(__file__).resolve().parent)
        fds = (write_end, self._spill.fileno())
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, package, str(path), str(offset), str(block), *map(str, fds)],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(read_end)
            self._spill.close()
            raise
        finally:
            os.close(write_end)
        self._status = os.fdopen(read_end, "rb")
        self._received = False

    def finished(self) -> bool:
        """Whether the helper has said how it ended (:meth:`result` will not wait)."""
        return bool(select.select([self._status], [], [], 0)[0])

    def result(self) -> tuple[list[Any], list[str], dict[str, Any], tuple[int, int, int], bool] | None:
        """The helper's ``(pieces, embryo ids, rest of the document, file fingerprint, bounded)``, or None if it failed.

        *bounded*: every piece's typed decode passed (``pipeline._tables.Bounded``),
        so no integer in the helper's part is wider than 64 bits.
        """
        try:
            status = self._status.read()  # until the helper closes its end
        finally:
            self._received = True
            self._process.wait()
        if status != b"end":
            return None
        pieces: list[Any] = []
        ids: list[str] = []
        bounded = True
        self._spill.seek(0)
        try:
            while (message := pickle.load(self._spill))[0] == "piece":
                pieces.append(message[1])
                ids.extend(message[2])
                bounded = bounded and message[3]
        except Exception:  # noqa: BLE001 - a spill file cut short: read in one process
            return None
        _, rest, fingerprint = message
        return pieces, ids, rest, fingerprint, bounded

    @property
    def received(self) -> bool:
        """Whether :meth:`result` was called."""
        return self._received

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._received:
            self._process.kill()  # its pieces are not wanted (any more)
        self._process.wait()
        self._status.close()
        self._spill.close()


@dataclass(frozen=True)
class Started:
    """A helper at work on a store file: the file, the first embryo of its part, the process."""

    path: Path
    first_theirs: str
    helper: Helper


def start(path: str | os.PathLike[str], share: float) -> Started | None:
    """Cut the embryos of *path* about *share* of the way in and start a helper on the rest.

    Light: the standard library and orjson only, so the command line can
    start the helper before its own imports (pandas, Dask).

    Parameters
    ----------
    path : path-like
        A store file.
    share : float
        Part of the embryos the caller reads itself.

    Returns
    -------
    Started or None
        None when a helper would not help (a small or missing file, one
        core, :func:`off`, another layout) or cannot start: the caller reads
        in one process, and says what is wrong with the path.
    """
    from pipeline._jsonfile import BLOCK, split_point

    path = Path(path)
    try:
        if not path.is_file() or not worthwhile(path.stat().st_size):
            return None
        point = split_point(path, share)
    except (OSError, ValueError):  # not a store this reader can cut (read_store says why)
        return None
    if point is None:
        return None
    offset, first_theirs = point
    try:
        helper = Helper(path, offset, BLOCK)
    except Exception:  # noqa: BLE001 - no process can be started here (a daemon, limits): read in one
        return None
    return Started(path, first_theirs, helper)


def _main(argv: list[str]) -> None:
    # The helper's entry point: the pieces to the spill file, then "end" on
    # the status pipe; whatever goes wrong, "fail".
    path, offset, block, status_fd, spill_fd = argv
    with os.fdopen(int(status_fd), "wb") as status:
        try:
            with os.fdopen(int(spill_fd), "wb", closefd=False) as spill:

                def put(*message: Any) -> None:
                    pickle.dump(message, spill, protocol=pickle.HIGHEST_PROTOCOL)

                done = _read_after(Path(path), int(offset), int(block), put)
        except Exception:  # noqa: BLE001 - any failure means "read it in one process"
            done = False
        status.write(b"end" if done else b"fail")


def _read_after(path: Path, offset: int, block: int, put: Callable[..., None]) -> bool:
    from pipeline._jsonfile import stream_embryos
    from pipeline._tables import Bounded, add_block, parse_piece, vocab_sets
    from pipeline.legacy import is_legacy
    from pipeline.store import _stat_fingerprint, _streamed_vocabulary, _vocabulary_of

    gc.disable()  # a short-lived process of acyclic objects (see store.paused_gc)
    found: dict[str, Any] = {}
    stream = stream_embryos(path, block, found, skip_to=offset, parse=parse_piece)
    sets: dict[str, Any] = {}
    vocab: dict[str, Any] = {}
    seen: set[str] = set()
    for piece in stream:
        if not vocab:
            vocab = _streamed_vocabulary(found)  # OtherLayout for a legacy file: "fail"
            sets = vocab_sets(vocab)
        tables: list[Any] = []
        add_block(tables, seen, piece, sets)
        put("piece", tables[0], list(piece), isinstance(piece, Bounded))
        del piece, tables
    rest = found.get("rest")
    if not vocab or is_legacy(rest) or _vocabulary_of(rest) != vocab:
        return False
    put("end", rest, _stat_fingerprint(found["stat"]))
    return True
