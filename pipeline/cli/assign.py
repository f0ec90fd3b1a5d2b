"""``embryo-pipeline assign`` and ``genotypes``: batch assignment from a file.

``assign STORE ASSIGNMENTS --author NAME`` assigns phenotypes to frame ranges
(CSV, XLSX or JSON with ``embryo_id``, ``phenotype``, optional ``frames``,
``confidence``, ``notes``); ``genotypes STORE ASSIGNMENTS --author NAME``
assigns genotypes. Both merge in one atomic, logged batch, or only preview with
``--dry-run``. ``assign --checkpoint-every N`` instead commits the changes of
every N finished partitions as a batch of its own: a run killed midway keeps
them, and running the same command again (same store, assignments file
content, options and ``--npartitions``) skips the partitions already committed.
Exit status 0 when every row applied, 1 when some failed or were skipped, 2 for
unusable input.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli._common import add_runtime_options, read_then_runtime, say, start_read

if TYPE_CHECKING:
    import pandas as pd


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``assign`` and ``genotypes``."""
    p = sub.add_parser("assign", help="assign phenotypes to frame ranges from a CSV/XLSX/JSON file")
    p.add_argument("store", help="the store's JSON file")
    p.add_argument("assignments", help="CSV, XLSX or JSON file: embryo_id, phenotype, frames, confidence, notes")
    p.add_argument("--author", required=True, help="who makes the changes (recorded on every value)")
    p.add_argument("--on-existing", choices=("overwrite", "skip", "error"), default="overwrite",
                   help="what to do with snips that already hold another phenotype (default: %(default)s)")
    p.add_argument("--overwrite-dead", action="store_true", help="allow non-DEAD values at or after death (DEAD stays permanent)")
    add_checkpoint_option(p)
    _common_options(p)
    p.set_defaults(run=run_assign, early_read=functools.partial(start_read, document=True))

    g = sub.add_parser("genotypes", help="assign genotypes to embryos from a CSV/XLSX/JSON file")
    g.add_argument("store", help="the store's JSON file")
    g.add_argument("assignments", help="CSV, XLSX or JSON file: embryo_id, genotype, allele, zygosity, confirmed, notes")
    g.add_argument("--author", required=True, help="who makes the changes")
    g.add_argument("--no-overwrite", action="store_true", help="skip embryos that already have a genotype")
    _common_options(g)
    g.set_defaults(run=run_genotypes)


def add_checkpoint_option(p: argparse.ArgumentParser) -> None:
    """Add ``--checkpoint-every N`` (commit every N finished partitions; re-runs resume)."""
    p.add_argument(
        "--checkpoint-every", type=_positive_int, metavar="N", default=None,
        help=("commit the changes of every N finished partitions as a batch of its own, so a killed run "
              "keeps them; running the same command again resumes after them (default: one batch at the end)"),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a whole number of partitions, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content: an edited input file is another run's input."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def checkpoint_notes(args: argparse.Namespace) -> Iterator[None]:
    """Say which checkpoints a failed or interrupted checkpointed run kept.

    The merge notes them on the exception; this prints them to standard error
    before the usual one-line error (an interrupt exits 130 here, instead of
    claiming that nothing was written).
    """
    try:
        yield
    except BaseException as err:
        notes = getattr(err, "__notes__", None) if getattr(args, "checkpoint_every", None) else None
        if not notes:
            raise
        for note in notes:
            print(f"embryo-pipeline: note: {note}", file=sys.stderr)
        if isinstance(err, KeyboardInterrupt):
            print("embryo-pipeline: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        raise


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    p.add_argument("--report", metavar="OUT.csv", help="write the whole change set to this CSV file")
    p.add_argument("--sheet", help="sheet of an XLSX file (default: the first)")
    add_runtime_options(p)


def _finish(args: argparse.Namespace, report: object) -> int:
    import pandas as pd

    from pipeline.merge import MergeReport

    assert isinstance(report, MergeReport)
    if args.report:
        report.changes.to_csv(args.report, index=False)
    if args.dry_run and not args.quiet:
        preview = report.changes.loc[report.changes["status"] != "unchanged"].head(40)
        with pd.option_context("display.width", 160, "display.max_columns", 12, "display.max_colwidth", 60):
            say("preview (first 40 changes):\n" + (preview.to_string(index=False) if len(preview) else "  (none)"))
    say(report.summary())
    return report.exit_code


def _load(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[Any, pd.DataFrame]:
    """The store (with its document) and the assignments, then the runtime opened in *stack*."""
    from pipeline.phenotypes import read_assignments
    from pipeline.store import read_store

    tables: list[pd.DataFrame] = []
    store = read_then_runtime(
        args, stack, document=True,
        read=lambda: read_store(args.store, document=True),
        then=lambda: tables.append(read_assignments(Path(args.assignments), sheet_name=args.sheet)),
    )
    return store, tables[0]


def run_assign(args: argparse.Namespace) -> int:
    """Assign phenotypes and merge (or preview)."""
    import pipeline

    with contextlib.ExitStack() as stack:
        store, table = _load(args, stack)
        changes = _phenotype_changes(store, table, args)
        with checkpoint_notes(args):
            report = pipeline.merge_into_store(
                store, changes, dry_run=args.dry_run, checkpoint_every=args.checkpoint_every,
                inputs={"command": "assign", "assignments": str(args.assignments), "on_existing": args.on_existing,
                        "overwrite_dead": args.overwrite_dead, "author": args.author, "sheet": args.sheet,
                        "assignments_sha256": file_digest(args.assignments)},
            )
    return _finish(args, report)


def _phenotype_changes(store: Any, table: pd.DataFrame, args: argparse.Namespace) -> Any:
    """The change set: lazy for a checkpointed run, else computed, with the snip table released.

    A checkpointed merge computes partitions as it commits them, so it needs
    the lazy frame. Otherwise the change set is computed here, in the same
    "merge" stage the merge would use, and the flattened snip table it was
    computed from (the store's cached table and the graph's pieces of it,
    about 300 MB at 1M snips) is let go before the document grows with the
    batch: the merge needs only the document.
    """
    import pipeline
    from pipeline._arrow import release_unused_memory
    from pipeline.cluster import compute, settle

    snips = pipeline.snips_from_store(store, npartitions=args.npartitions)
    changes = pipeline.assign_phenotypes(
        snips, table, author=args.author, on_existing=args.on_existing,
        overwrite_dead=args.overwrite_dead, vocabulary=store.vocabulary,
    )
    if args.checkpoint_every:
        return changes
    del snips
    computed = compute(changes, stage="merge")
    del changes
    store.invalidate()
    settle()  # an embedded cluster's worker lets go of its copy of the table
    release_unused_memory()  # allocators keep freed memory otherwise
    return computed


def run_genotypes(args: argparse.Namespace) -> int:
    """Assign genotypes and merge (or preview)."""
    import pipeline

    store = pipeline.read_store(args.store, document=True)
    table = pipeline.read_assignments(Path(args.assignments), sheet_name=args.sheet)
    changes = pipeline.assign_genotypes(store, table, author=args.author, overwrite=not args.no_overwrite)
    report = pipeline.merge_into_store(
        store, changes, dry_run=args.dry_run,
        inputs={"command": "genotypes", "assignments": str(args.assignments)},
    )
    return _finish(args, report)
