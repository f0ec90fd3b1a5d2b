"""A helper process that reads the second part of a large store file's embryos.

Reading a store is CPU-bound Python work (parse, checks, snip table) that one
interpreter does on one core. For a large file in the layout this package
writes, :func:`pipeline.store.read_store` cuts the embryos in two at a member
boundary (:func:`pipeline._jsonfile.split_point`) and starts a helper process
that builds the tables of the embryos after the cut while it builds those
before it (and, when it keeps the document, parses all of them). The helper
sends its pieces back, and they are joined exactly as the pieces of a
one-process streamed read are.

Anything unexpected (the helper cannot start, fails or dies, the file is in
another layout or changed, an id repeats, any problem in the store) makes
the caller fall back to the one-process read, which gives the usual result
and messages: the helper only ever saves time.
"""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
from itertools import chain
from pathlib import Path
from typing import Any, Self

__all__ = ["MIN_BYTES", "SHARE_WITH_DOCUMENT", "SHARE_TABLES_ONLY", "SHARE_WITH_CLUSTER", "worthwhile", "Helper"]

#: Files smaller than this are read in one process: the helper's own start
#: (a new interpreter importing the package, about 1.5 s of its CPU) would
#: not pay for itself.
MIN_BYTES = 96 << 20
#: How far into the embryos the cut goes when this process also parses the
#: whole document (it then parses every embryo, the helper only its part) ...
SHARE_WITH_DOCUMENT = 0.6
#: ... and when both read tables only (the helper starts later) ...
SHARE_TABLES_ONLY = 0.58
#: ... and when the command line starts an embedded cluster meanwhile (about
#: 1.4 s of this process: imports, dashboard) and keeps the document.
SHARE_WITH_CLUSTER = 0.5


def worthwhile(size: int) -> bool:
    """Whether a file of *size* bytes is worth a helper process on this machine."""
    return size >= MIN_BYTES and _cpus() >= 2


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Helper:
    """The helper process reading the embryos from byte *offset* of *path* on.

    A new interpreter (``python -m pipeline._split_read``), not a
    ``multiprocessing`` child: that would run the caller's main script again
    in the helper. It imports this same package and sends its result,
    pickled, through a pipe of its own. Use as a context manager: leaving it
    stops the process if its result was not received.
    """

    def __init__(self, path: Path, offset: int, block: int) -> None:
        import pipeline

        read_end, write_end = os.pipe()
        root = str(Path(pipeline.__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pipeline._split_read", str(path), str(offset), str(block), str(write_end)],
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self._receive = os.fdopen(read_end, "rb")
        self._received = False

    def result(self) -> tuple[list[Any], list[str], dict[str, Any], tuple[int, int, int]] | None:
        """The helper's ``(pieces, embryo ids, rest of the document, file fingerprint)``, or None if it failed."""
        try:
            got = pickle.load(self._receive)
        except Exception:  # noqa: BLE001 - it died or sent nothing usable
            return None
        self._received = True
        return got

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._receive.close()
        if not self._received:
            self._process.kill()  # its pieces are not wanted (any more)
        self._process.wait()


def _main(argv: list[str]) -> None:
    # The helper's entry point: whatever goes wrong, it sends None.
    path, offset, block, fd = argv
    try:
        result = _read_after(Path(path), int(offset), int(block))
    except Exception:  # noqa: BLE001 - any failure means "read it in one process"
        result = None
    with os.fdopen(int(fd), "wb") as send:
        pickle.dump(result, send, protocol=pickle.HIGHEST_PROTOCOL)


def _read_after(path: Path, offset: int, block: int) -> tuple[Any, ...] | None:
    from pipeline._jsonfile import stream_embryos
    from pipeline._tables import block_tables
    from pipeline.legacy import is_legacy
    from pipeline.store import _stat_fingerprint, _vocabulary_of

    gc.disable()  # a short-lived process of acyclic objects (see store.paused_gc)
    found: dict[str, Any] = {}
    stream = stream_embryos(path, block, found, skip_to=offset)
    first = next(stream, None)
    if first is None or is_legacy(found["head"]):
        return None
    vocab = _vocabulary_of(found["head"])
    pieces, ids = block_tables(chain([first], stream), vocab)
    rest = found["rest"]
    if is_legacy(rest) or _vocabulary_of(rest) != vocab:
        return None
    return pieces, ids, rest, _stat_fingerprint(found["stat"])


if __name__ == "__main__":
    _main(sys.argv[1:])
