"""The ``embryo-pipeline`` command line.

Each subcommand lives in its own module of this package and registers itself
with :func:`register`-style ``add_parser(subparsers)``. Exit status: 0 when
everything applied, 1 when some rows failed or were skipped (or a store is
invalid), 2 for unusable input, with a one-line error and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence

from pipeline import __version__

__all__ = ["main", "COMMANDS", "EXIT_OK", "EXIT_PARTIAL", "EXIT_UNUSABLE"]

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_UNUSABLE = 2

#: Subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("demo", "validate", "info", "assign", "import_", "undo", "detect", "detectors", "shard", "export")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="embryo-pipeline",
        description="Zebrafish embryo annotations: JSON store to a snip-level Dask DataFrame, and batch work on it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pipeline.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        0, 1 or 2 (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.cli._common import run_command

    program = argv is None
    with contextlib.ExitStack() as stack:
        if (early_read := getattr(args, "early_read", None)) is not None:
            # First of all: a large store's helper starts before this
            # process imports pandas and Dask.
            early_read(args, stack)
        if program:
            # Run as the program (console script, python -m pipeline): the
            # process reads its store once and exits, so the parsed document
            # can be kept out of the garbage collector's walks (1-4 s at 1M snips).
            from pipeline import store

            store._FREEZE_PARSED = True
        status = run_command(args)
    if program and sys.getprofile() is None and sys.gettrace() is None:  # not under a profiler or debugger
        _exit(status)
    return status


def _exit(status: int) -> None:
    """End the program without tearing its heap down object by object.

    Once a command has returned, everything it wrote is closed and fsynced.
    What remains is freeing the parsed store (tens of millions of objects, 0.6 s
    at 1M snips) and the modules, which no one waits for. The exit handlers
    still run (closing clusters and child processes, logging), the standard
    streams are flushed, and the process ends with ``os._exit``.
    """
    import atexit
    import contextlib
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
            stream.flush()
    os._exit(status)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
