"""``embryo-pipeline export STORE OUT``: write the snips, flags or change log to files.

Parquet (a hive-partitioned folder), Feather, HDF5 or CSV; see
:mod:`pipeline.export`. The output is written beside its target and swapped in
atomically, so an interrupted export leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from pipeline.cli._common import (
    UsageError,
    add_runtime_options,
    read_then_runtime,
    runtime,
    say,
    start_read,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "export",
        help="write the snip table (or flags, or change log) as Parquet, Feather, HDF5 or CSV",
        description=(
            "Export a store's snip table (or its flags, or its change log). Parquet writes a folder "
            "partitioned by experiment (experiment_id=.../part.00000.parquet) with provenance in every "
            "file's metadata; feather, hdf5 and csv write one file. The output is replaced atomically."
        ),
    )
    p.add_argument("store", help="the store's JSON file")
    p.add_argument("out", help="output folder (parquet) or file (feather, hdf5, csv)")
    p.add_argument(
        "--format",
        choices=("parquet", "feather", "hdf5", "csv"),
        default="parquet",
        help="output format (default: %(default)s)",
    )
    p.add_argument(
        "--what",
        choices=("snips", "flags", "changes"),
        default="snips",
        help="which table (default: %(default)s)",
    )
    p.add_argument(
        "--partition-on",
        action="append",
        metavar="COL",
        help="parquet: hive partition column, repeatable; 'none' for no partitioning "
        "(default: experiment_id for snips, level for flags, none for changes)",
    )
    p.add_argument(
        "--columns",
        action="append",
        metavar="COL,COL...",
        help="columns to write (comma-separated, repeatable; default all)",
    )
    add_runtime_options(p)
    p.set_defaults(run=run, early_read=_early_read)


def _early_read(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Start a large store's helper before the imports (see ``start_read``).

    Whether the document is kept follows ``pipeline.export._needs_document``
    (not imported here: it imports Dask; a test holds the two together).
    """
    if args.what != "changes":
        start_read(args, stack, document=args.what == "flags")


def _split(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    out = [c.strip() for v in values for c in v.split(",") if c.strip()]
    if not out:
        msg = "--columns needs at least one column name"
        raise UsageError(msg)
    return out


def run(args: argparse.Namespace) -> int:
    """Export and print what was written."""
    from pipeline.export import export_store

    if args.npartitions is not None and args.npartitions < 1:
        msg = f"--npartitions must be at least 1, got {args.npartitions}"
        raise UsageError(msg)
    partition_on = None
    if args.partition_on is not None:
        partition_on = [
            c for c in _split(args.partition_on) or [] if c.lower() != "none"
        ]
        if partition_on and args.format != "parquet":
            msg = f"--partition-on applies to --format parquet only, not {args.format}"
            raise UsageError(msg)
    start = time.perf_counter()
    source: Any = args.store
    with contextlib.ExitStack() as stack:
        if args.what == "changes":
            stack.enter_context(runtime(args))
        else:
            from pipeline.export import _needs_document, _read_for_export

            # Read before an embedded cluster starts, as the other commands
            # do: a store that fails to load starts no cluster.
            source = read_then_runtime(
                args,
                stack,
                document=_needs_document(args.what),
                read=lambda: _read_for_export(args.store, args.what),
                snips=args.what == "snips",
            )
        result = export_store(
            source,
            args.out,
            format=args.format,
            what=args.what,
            partition_on=partition_on,
            columns=_split(args.columns),
            npartitions=args.npartitions,
        )
    say(f"{result.summary()} in {time.perf_counter() - start:.1f} s", quiet=args.quiet)
    return 0
