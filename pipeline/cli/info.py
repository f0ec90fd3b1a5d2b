"""``embryo-pipeline info STORE``: counts per experiment, phenotype and genotype."""

from __future__ import annotations

import argparse

import pandas as pd

from pipeline.store import read_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("info", help="print counts per experiment, phenotype and genotype")
    p.add_argument("store", help="the store's JSON file")
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


def run(args: argparse.Namespace) -> int:
    """Print the counts."""
    store = read_store(args.store)
    c = store.counts()
    print(f"{args.store}: {c['experiments']} experiments, {c['videos']} videos, {c['embryos']} embryos, {c['snips']} snips")
    print(summary(store.snip_table()))
    return 0
