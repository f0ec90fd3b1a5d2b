"""Helpers shared by the subcommands: error handling and output."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Any

from pipeline.errors import PipelineError

__all__ = ["run_command", "fail", "UsageError", "say", "start_read", "read_then_runtime"]


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


def _share(args: argparse.Namespace, document: bool) -> float | None:
    """The part of a split read of ``args.store`` this process reads (None: an unusable ``--scheduler``, said later)."""
    from pipeline import _split_read
    from pipeline.cluster import _parse_scheduler

    try:
        embedded = _parse_scheduler(getattr(args, "scheduler", None)) == "local"
    except ValueError:
        return None  # the runtime reports it
    return _split_read.share(document=document, early=True, cluster=embedded)


def start_read(args: argparse.Namespace, stack: contextlib.ExitStack, *, document: bool) -> None:
    """Start the helper of a large ``args.store`` now, before the command imports pandas and Dask.

    The command line calls this (a subcommand's ``early_read``) right after
    parsing: the helper's interpreter then starts and imports while this one
    does, and :func:`read_then_runtime` takes it over. Leaving *stack* stops
    a helper that was not taken over (the command failed first).
    """
    from pipeline import _split_read

    share = _share(args, document)
    started = None if share is None else _split_read.start(args.store, share)
    if started is not None:
        stack.callback(started.helper.__exit__, None, None, None)
        args.started_read = (document, started)


def read_then_runtime(
    args: argparse.Namespace,
    stack: contextlib.ExitStack,
    *,
    document: bool,
    read: Callable[[], Any],
    then: Callable[[], None] | None = None,
    snips: bool = True,
) -> Any:
    """Read ``args.store``, then open the command's runtime in *stack*.

    A large store is read with a helper process (see
    ``pipeline.store.SplitRead``), the one :func:`start_read` started right
    after the arguments were parsed if there is one: once this process has
    read its part and found it sound, *then* runs (input checks that must
    pass before any cluster starts) and a distributed client starts on a
    thread (``pipeline.cluster.start_early``) while this one joins the
    helper's part and sorts the snip table; the runtime then adopts the
    client. An embedded cluster's start (distributed's import, the
    dashboard: about 1 s, mostly in its own event loop's thread) leaves this
    process less of the store to read. Otherwise the store is read by
    *read*, then *then* runs and the runtime opens, in that order, as
    before: a store or input that fails starts no cluster (unless the
    problems lie in the helper's part of a large store only).

    Parameters
    ----------
    args : argparse.Namespace
        The subcommand's options (``store``, where work runs).
    stack : contextlib.ExitStack
        Receives the helper and the runtime.
    document : bool
        Whether the store's document is needed (else tables only).
    read : callable
        Reads the store in one process (the fallback).
    then : callable, optional
        Runs after the read and before the runtime opens.
    snips : bool, default True
        Whether the command uses the snip table: it is sorted while a
        distributed client starts (see ``pipeline.cluster.start_early``).

    Returns
    -------
    Store
        The store.
    """
    from pipeline import _split_read
    from pipeline.store import SplitRead

    done: list[str] = []

    def start_runtime() -> None:
        # The input passed its checks: a distributed client starts on a
        # thread, while this one finishes the read and sorts the snip table.
        if then is not None:
            then()
        done.append("then")
        starting = _start_early(args)
        if starting is not None:
            stack.callback(starting.close)  # when the command fails before adopting it
            args.starting_client = starting

    started = None
    early = getattr(args, "started_read", None)
    if early is not None:
        args.started_read = None
        if early[0] == document:
            started = SplitRead.adopt(early[1], document=document)
        else:  # a helper for another read: not this one
            early[1].helper.__exit__(None, None, None)
    if started is None and (share := _share(args, document)) is not None:
        started = SplitRead.start(args.store, document=document, share=share)
    store = None
    if started is not None:
        stack.enter_context(started)
        store = started.finish(start_runtime)
    if store is None:
        with _split_read.off() if started is not None else contextlib.nullcontext():
            store = read()
    if not done:
        start_runtime()
    if snips and getattr(args, "starting_client", None) is not None:
        store.prepare_snip_table()
    stack.enter_context(runtime(args))
    return store


def _start_early(args: argparse.Namespace) -> Any:
    """``pipeline.cluster.start_early(args)``, or None without Dask's distributed."""
    try:
        from pipeline.cluster import start_early
    except ImportError:
        return None
    return start_early(args)
