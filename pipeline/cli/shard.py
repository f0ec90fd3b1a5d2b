"""``embryo-pipeline shard`` and ``unshard``: convert between store layouts."""

from __future__ import annotations

import argparse

from pipeline.cli._common import say


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``shard`` and ``unshard``."""
    p = sub.add_parser(
        "shard",
        help="convert a single-file store into a sharded folder (one file per experiment)",
    )
    p.add_argument("store", help="the single-file store")
    p.add_argument("out_dir", help="a new folder for the sharded store")
    p.set_defaults(run=run_shard)
    u = sub.add_parser(
        "unshard", help="convert a sharded store folder into a single-file store"
    )
    u.add_argument("store", help="the sharded store's folder")
    u.add_argument("out", help="the new JSON file")
    u.set_defaults(run=run_unshard)


def run_shard(args: argparse.Namespace) -> int:
    """Write the sharded copy."""
    from pipeline.shards import shard_store

    store = shard_store(args.store, args.out_dir)
    say(
        f"sharded {args.store} into {args.out_dir}: {len(store.shards)} experiment shard(s)"
    )
    return 0


def run_unshard(args: argparse.Namespace) -> int:
    """Write the single-file copy."""
    from pipeline.shards import unshard_store

    store = unshard_store(args.store, args.out)
    say(f"unsharded {args.store} into {args.out}: {len(store.embryos)} embryos")
    return 0
