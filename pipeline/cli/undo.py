"""``embryo-pipeline undo STORE BATCH_ID``: restore what one batch replaced."""

from __future__ import annotations

import argparse

from pipeline.cli._common import say


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("undo", help="restore the values one batch replaced (see the change log)")
    p.add_argument("store", help="the store's JSON file")
    p.add_argument("batch_id", help="the batch to undo, as printed by assign/detect/import")
    p.add_argument("--force", action="store_true", help="undo even if later batches changed the same values")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Undo the batch."""
    import pipeline

    store = pipeline.read_store(args.store, document=True)
    report = pipeline.undo(store, args.batch_id, force=args.force)
    say(f"undid batch {args.batch_id}: restored {report.n_written} value(s) as batch {report.batch_id}")
    return 0
