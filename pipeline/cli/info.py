"""``embryo-pipeline info STORE``: counts per experiment, phenotype and genotype.

``--estimate`` prints instead the predicted time and peak memory of
``assign``, ``detect`` and ``export`` on this store, and where to run them
(:func:`pipeline.estimate_resources`); it reads only file sizes and a sample
of the store, so it is quick on stores too big to open.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pipeline.cli._common import UsageError

if TYPE_CHECKING:
    import pandas as pd


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("info", help="print counts per experiment, phenotype and genotype (or resource estimates)")
    p.add_argument("store", help="the store's JSON file, or a sharded store's folder")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="predict time and peak memory of assign, detect and export, and where to run them (does not read the whole store)",
    )
    p.add_argument("--rows", type=int, metavar="N", help="with --estimate: assignment rows for assign (default: one per 50 snips)")
    p.add_argument(
        "--measure-speed",
        action="store_true",
        help="with --estimate: time a short calibration first and scale the predicted times to this machine's current speed",
    )
    p.set_defaults(run=run)


def summary(table: pd.DataFrame) -> str:
    """Readable counts of a snip table: per experiment, phenotype and genotype.

    Parameters
    ----------
    table : pandas.DataFrame
        A snip table (or a computed Dask snip table).

    Returns
    -------
    str
        Several small aligned tables.
    """
    per_exp = table.groupby("experiment_id", observed=True).agg(
        videos=("video_id", "nunique"), embryos=("embryo_id", "nunique"), snips=("frame", "size"),
        dead_embryos=("death_frame", lambda s: 0),
    )
    dead = table.loc[table["death_frame"].notna()].groupby("experiment_id", observed=True)["embryo_id"].nunique()
    per_exp["dead_embryos"] = dead.reindex(per_exp.index, fill_value=0)
    phen = table["phenotype"].value_counts().rename("snips")
    embryos = table.drop_duplicates("embryo_id")
    geno = embryos["genotype"].fillna("(none)").value_counts().rename("embryos")
    return "\n\n".join(
        [
            "per experiment:\n" + per_exp.to_string(),
            "phenotypes (snips):\n" + phen.to_string(),
            "genotypes (embryos):\n" + geno.to_string(),
        ]
    )


def estimates(store: str, *, rows: int | None = None, measure_speed: bool = False) -> str:
    """The resource estimates of ``assign``, ``detect`` and ``export``, as text.

    Parameters
    ----------
    store : str
        The store's file or folder.
    rows : int, optional
        Assignment rows for ``assign``.
    measure_speed : bool, default False
        Scale the times by a calibration run now (``speed="measure"``).

    Returns
    -------
    str
        One block per operation, then the assumptions.
    """
    from pipeline.estimate import COSTS, OPERATIONS, calibrate, estimate_resources

    speed = calibrate(7) / float(COSTS["calibration"]) if measure_speed else 1.0
    found = [estimate_resources(store, op, n_rows=rows, speed=speed) for op in OPERATIONS]
    first = found[0]
    head = (
        f"{store}: {first.layout} store, {first.store_bytes / 1024**2:,.1f} MiB, "
        f"about {first.n_snips:,} snips ({first.n_snips_source})"
    )
    blocks = [head] + [e.summary() for e in found]
    # The export's assumptions are those of all three, less assign's rows.
    blocks.append("assumptions:\n" + "\n".join(f"  - {a}" for a in found[-1].assumptions))
    return "\n\n".join(blocks)


def run(args: argparse.Namespace) -> int:
    """Print the counts, or the estimates with ``--estimate``."""
    if args.estimate:
        if args.rows is not None and args.rows < 1:
            msg = f"--rows must be at least 1, got {args.rows}"
            raise UsageError(msg)
        print(estimates(args.store, rows=args.rows, measure_speed=args.measure_speed))
        return 0
    if args.rows is not None or args.measure_speed:
        msg = "--rows and --measure-speed go with --estimate"
        raise UsageError(msg)
    from pipeline.store import read_store

    store = read_store(args.store)
    c = store.counts()
    print(f"{args.store}: {c['experiments']} experiments, {c['videos']} videos, {c['embryos']} embryos, {c['snips']} snips")
    print(summary(store.snip_table()))
    return 0
