"""``embryo-pipeline import``: merge a scoring spreadsheet (CSV or XLSX) into a store.

``import STORE SHEET --map embryo_id="Embryo ID" --map phenotype=Phenotype ...``
reads the sheet, renames its headings to the canonical names (headings that
already are canonical names, whatever their case, need no ``--map``) and
merges every row's genotype and phenotype in one atomic, logged batch (author
``import:<file name>`` unless ``--author``), or only previews it with
``--dry-run``. Bad rows are reported with the sheet's own row number and
heading. Exit status 0 when every row applied, 1 when some failed or were
skipped, 2 when the file cannot be imported at all (nothing is written).

The module is ``import_`` because ``import`` is a Python keyword.
"""

from __future__ import annotations

import argparse

from pipeline.cli._common import add_runtime_options, runtime, say

_SHOWN = [
    "sheet_row",
    "kind",
    "embryo_id",
    "frame",
    "old_value",
    "new_value",
    "status",
    "reason",
]


def _mapping_item(text: str) -> tuple[str, str]:
    """``embryo_id=Embryo ID`` -> ``("embryo_id", "Embryo ID")``."""
    key, sep, heading = text.partition("=")
    if not sep or not key.strip() or not heading.strip():
        msg = f'expected CANONICAL=HEADING, e.g. embryo_id="Embryo ID", got {text!r}'
        raise argparse.ArgumentTypeError(msg)
    return key.strip(), heading.strip()


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``import``."""
    p = sub.add_parser(
        "import",
        help="import genotypes and phenotypes from a CSV/XLSX scoring sheet in one batch",
        description=(
            "Import a scoring sheet: each row gives an embryo and a genotype, a phenotype "
            "with a frame range, or both. Everything is merged in one atomic, logged batch "
            "(undo it with 'embryo-pipeline undo STORE BATCH_ID')."
        ),
    )
    p.add_argument("store", help="the store's JSON file")
    p.add_argument("sheet", help="the spreadsheet: .csv (UTF-8), .tsv or .xlsx")
    p.add_argument(
        "--map",
        dest="mapping",
        action="append",
        type=_mapping_item,
        default=[],
        metavar="NAME=HEADING",
        help=(
            "read canonical column NAME (embryo_id, phenotype, frames, genotype, notes, confidence, "
            "allele, zygosity, confirmed) from the sheet's HEADING (repeatable; not needed for "
            "headings that already are these names)"
        ),
    )
    p.add_argument(
        "--sheet",
        dest="sheet_name",
        metavar="NAME",
        help="worksheet of an XLSX file (default: the first)",
    )
    p.add_argument(
        "--author", help="who makes the changes (default: import:<file name>)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="show what would change; write nothing"
    )
    p.add_argument(
        "--on-existing",
        choices=("overwrite", "skip", "error"),
        default="overwrite",
        help="snips that already hold another phenotype, embryos that already have a genotype (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite-dead",
        action="store_true",
        help="allow non-DEAD values at or after death (DEAD stays permanent)",
    )
    p.add_argument(
        "--report",
        metavar="OUT.csv",
        help="write the whole change set (with sheet rows) to this CSV file",
    )
    add_runtime_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Import the sheet and merge (or preview)."""
    import pandas as pd

    from pipeline.cli._common import UsageError
    from pipeline.spreadsheet import import_spreadsheet, read_spreadsheet
    from pipeline.store import read_store

    mapping: dict[str, str] = {}
    for key, heading in args.mapping:
        if key in mapping and mapping[key] != heading:
            msg = f"--map gives two headings for {key}: {mapping[key]!r} and {heading!r}; keep one"
            raise UsageError(msg)
        mapping[key] = heading
    # Read the sheet before the store, so a bad file costs nothing.
    sheet = read_spreadsheet(args.sheet, mapping or None, sheet_name=args.sheet_name)
    store = read_store(args.store, document=True)
    with runtime(args):
        report = import_spreadsheet(
            store,
            sheet,
            author=args.author,
            dry_run=args.dry_run,
            on_existing=args.on_existing,
            overwrite_dead=args.overwrite_dead,
            npartitions=args.npartitions,
        )
    if args.report:
        report.changes.to_csv(args.report, index=False)
    if args.dry_run and not args.quiet:
        preview = report.changes.loc[
            report.changes["status"] != "unchanged", _SHOWN
        ].head(40)
        with pd.option_context(
            "display.width", 160, "display.max_columns", 12, "display.max_colwidth", 70
        ):
            say(
                "preview (first 40 changes):\n"
                + (preview.to_string(index=False) if len(preview) else "  (none)")
            )
    say(report.summary())
    if report.batch_id and not args.quiet:
        say(f"undo with: embryo-pipeline undo {args.store} {report.batch_id}")
    return report.exit_code
