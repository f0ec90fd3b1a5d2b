"""``embryo-pipeline validate STORE``: check a store against the contract."""

from __future__ import annotations

import argparse

from pipeline.errors import StoreFormatError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("validate", help="check a store and print every problem (exit 0 valid, 1 invalid)")
    p.add_argument("store", help="the store's JSON file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the problems, or a one-line summary when the store is valid."""
    from pipeline.store import read_store

    try:
        store = read_store(args.store, quiet=True)
    except StoreFormatError as err:
        if not err.problems:
            raise
        print(f"invalid: {len(err.problems)} problem(s) in {args.store}")
        for path, message in err.problems:
            print(f"  {path}: {message}")
        return 1
    c = store.counts()
    print(f"valid: {c['experiments']} experiments, {c['embryos']} embryos, {c['snips']} snips")
    if store.upgrade_report:
        print("legacy file: would be upgraded to schema version 1 on save:")
        for line in store.upgrade_report:
            print(f"  {line}")
    return 0
