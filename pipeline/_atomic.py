"""Durable, atomic file replacement and the cross-process store lock.

A store file is never written in place: the new bytes go to a temporary file
in the same folder, are flushed and fsynced, the old file is kept as a
timestamped backup (a hard link, so no copy is made), and the temporary file is
renamed over the store with ``os.replace``; finally the folder itself is
fsynced so the rename survives a power cut. A crash or SIGKILL at any moment
leaves either the old or the new file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import filelock

from pipeline.errors import StoreLockedError

__all__ = ["atomic_write_bytes", "fsync_dir", "store_lock", "backup_dir", "LOCK_TIMEOUT"]

#: Seconds a writer waits for another writer's lock before giving up.
LOCK_TIMEOUT = 120.0


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk.

    Parameters
    ----------
    folder : pathlib.Path
        The folder.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_dir(path: Path) -> Path:
    """Folder holding the backups of the store at *path*."""
    return path.parent / f".{path.name}.backups"


def _keep_backup(path: Path, keep: int) -> None:
    folder = backup_dir(path)
    folder.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{path.stem}.{stamp}{path.suffix}"
    try:
        os.link(path, target)
    except OSError:
        # Filesystems without hard links get a real copy.
        shutil.copy2(path, target)
    _prune_backups(path, keep)


def _prune_backups(path: Path, keep: int) -> None:
    """Delete all but the newest *keep* backups of *path* (none made here)."""
    old = sorted(backup_dir(path).glob(f"{path.stem}.*{path.suffix}"))
    for stale in old[: max(0, len(old) - keep)]:
        stale.unlink(missing_ok=True)


def _prune_meanwhile(path: Path, keep: int) -> None:
    # Unlinking a large file's last link frees its blocks (0.3 s for 400 MB):
    # done while the new file is written. A failure here shows again, and is
    # raised, when the backup is kept.
    with contextlib.suppress(OSError):
        _prune_backups(path, keep)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | Iterable[bytes], *, backups: int = 5) -> None:
    """Replace *path* by *data* atomically and durably.

    Parameters
    ----------
    path : path-like
        The file to replace (or create).
    data : bytes or iterable of bytes
        The new content, or its pieces in order (written as they come, so the
        whole need never be in memory; if producing a piece fails, the file is
        left as it was).
    backups : int, default 5
        How many timestamped backups of earlier versions to keep; 0 keeps none.
    """
    path = Path(path)
    folder = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    # The backups beyond the newest backups - 1 go while the file is written;
    # the one kept before the rename makes it backups again. (A write that
    # fails leaves the store as it was and one backup fewer.)
    pruning = threading.Thread(target=_prune_meanwhile, args=(path, backups - 1), name="pipeline-prune", daemon=True)
    if backups > 0:
        pruning.start()
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                if isinstance(data, bytes | bytearray | memoryview):
                    handle.write(data)
                else:
                    _write_pieces(handle, data)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            if pruning.is_alive():
                pruning.join()
        if path.exists():
            # Match the permissions of the file being replaced.
            os.chmod(tmp, path.stat().st_mode & 0o7777)
            if backups > 0:
                _keep_backup(path, backups)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)


#: Bytes written between two background flushes of a file being written in pieces.
FLUSH_EVERY = 32 << 20


#: Pieces made ahead of the writer at most (a few MB each).
WRITE_AHEAD = 8


def _write_pieces(handle: BinaryIO, pieces: Iterable[bytes]) -> None:
    """Write pieces from a thread of their own while this one makes the next ones.

    Making a piece (serialising part of a store) holds the interpreter lock;
    writing it to the file does not, so the two overlap on two cores. Every
    :data:`FLUSH_EVERY` bytes, another thread runs ``fdatasync`` on the file,
    so the final ``fsync`` has only the rest to write. Durability is
    unchanged: the caller still fsyncs before the rename. An error of a write
    or of a background flush is raised here (an error reported once must not
    be lost), and an error making a piece stops the writer first.
    """
    fd = handle.fileno()
    failure: list[Exception] = []
    ready: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=WRITE_AHEAD)

    def datasync() -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
        except OSError as err:
            failure.append(err)

    def write() -> None:
        flush: threading.Thread | None = None
        pending = 0
        while (piece := ready.get()) is not None:
            if failure:
                continue  # keep taking pieces so that the maker is never stuck
            try:
                handle.write(piece)
                pending += len(piece)
                if pending >= FLUSH_EVERY and (flush is None or not flush.is_alive()):
                    handle.flush()
                    flush = threading.Thread(target=datasync, name="pipeline-flush", daemon=True)
                    flush.start()
                    pending = 0
            except Exception as err:  # noqa: BLE001 - raised by the maker's thread, below
                failure.append(err)
        if flush is not None:
            flush.join()

    writer = threading.Thread(target=write, name="pipeline-write", daemon=True)
    writer.start()
    try:
        for piece in pieces:
            if failure:
                break
            ready.put(piece)
    finally:
        ready.put(None)
        writer.join()
    if failure:
        raise failure[0]


def lock_path(path: Path) -> Path:
    """The lock file guarding the store at *path*."""
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def store_lock(path: str | os.PathLike[str], timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the exclusive cross-process lock of the store at *path*.

    Parameters
    ----------
    path : path-like
        The store file (or a sharded store's folder).
    timeout : float, default LOCK_TIMEOUT
        Seconds to wait for another writer; negative waits forever.

    Raises
    ------
    StoreLockedError
        If another process still holds the lock after *timeout* seconds.
    """
    path = Path(path)
    lock = filelock.FileLock(str(lock_path(path)))
    try:
        lock.acquire(timeout=timeout)
    except filelock.Timeout:
        msg = (
            f"store {str(path)!r} is locked by another writer (lock file {str(lock_path(path))!r}) "
            f"and stayed locked for {timeout:g} s; wait for that batch to finish and run again "
            "(if no other process is running, the lock is released automatically)"
        )
        raise StoreLockedError(msg, path=str(path)) from None
    try:
        yield
    finally:
        lock.release()
