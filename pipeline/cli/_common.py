"""Helpers shared by the subcommands: error handling and output."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.errors import PipelineError

__all__ = ["run_command", "fail", "UsageError", "say"]


class UsageError(PipelineError, ValueError):
    """Unusable input on the command line (exit status 2)."""


def say(*parts: Any, quiet: bool = False) -> None:
    """Print to standard output unless *quiet*."""
    if not quiet:
        print(*parts, flush=True)


def fail(message: str) -> int:
    """Print a one-line error to standard error and return exit status 2."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    print(f"embryo-pipeline: error: {first}", file=sys.stderr)
    rest = str(message).strip().splitlines()[1:]
    if rest:
        print("\n".join(rest), file=sys.stderr)
    return 2


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.run(args)``, turning expected failures into exit status 2."""
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("embryo-pipeline: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (PipelineError, OSError, ValueError, KeyError) as err:
        text = str(err) if not isinstance(err, KeyError) else f"missing {err}"
        if isinstance(err, FileNotFoundError):
            text = f"no such file: {err.filename}"
        return fail(text)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Options every computing command shares: partitions, quiet.

    Where work runs (``--scheduler``, workers, dashboard) is added by
    :mod:`pipeline.cluster` when available.
    """
    parser.add_argument("--npartitions", type=int, default=None, help="partitions of the snip table (default: one per 100,000 snips)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary; no progress bar")
    try:
        from pipeline.cluster import add_cluster_options
    except ImportError:
        return
    add_cluster_options(parser)


def runtime(args: argparse.Namespace) -> Any:
    """Context in which a command computes: the chosen scheduler and progress display."""
    try:
        from pipeline.cluster import runtime_from_args
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return runtime_from_args(args)
