"""Readable summaries of change sets, for notebooks and logs.

A change set (from :func:`pipeline.assign_phenotypes`,
:func:`pipeline.assign_genotypes` or :func:`pipeline.run_detectors`) is a
DataFrame, lazy for phenotypes and flags, whose display says little about what
it holds. :func:`summarize` computes it once and returns a
:class:`ChangeSummary`, which shows counts by status, a breakdown by value or
detector, why rows were skipped, and the first failed rows with their reasons,
as text (``repr``) and as HTML in Jupyter. The computed table is kept in
``summary.changes``, so merging it afterwards does not compute again::

    summary = pipeline.report.summarize(pipeline.run_detectors(snips, detectors, store=store))
    summary                                          # in a notebook: the HTML table
    pipeline.merge_into_store(store, summary.changes)

:class:`pipeline.MergeReport` is the display of what a merge wrote (or, with
``dry_run=True``, would write); this module covers change sets before a merge,
and lays its HTML out the same way.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

import dask.dataframe as dd
import pandas as pd

from pipeline.merge import kind_of

__all__ = ["ChangeSummary", "summarize"]

#: Column a change set is broken down by, per kind.
_BREAKDOWN = {"phenotype": "new_value", "genotype": "new_value", "flag": "detector"}

#: Columns shown for failed rows, per kind (when present).
_FAILED_COLUMNS = {
    "phenotype": ["row", "embryo_id", "new_value", "reason"],
    "genotype": ["row", "embryo_id", "new_value", "reason"],
    "flag": ["detector", "reason"],
}


@dataclass
class ChangeSummary:
    """A computed change set with a readable display.

    Attributes
    ----------
    kind : str
        ``phenotype``, ``genotype`` or ``flag``.
    counts : dict of str to int
        Rows per status (``assigned``, ``raised``, ``failed``, ...).
    breakdown : pandas.DataFrame
        Rows per value (phenotype, genotype) or per detector and flag, one
        column per status.
    skipped_reasons : dict of str to int
        Skipped rows per reason code (``overridden``, ``after_death``, ...).
    failed : pandas.DataFrame
        The failed rows with their reasons.
    changes : pandas.DataFrame
        The whole computed change set, ready for :func:`pipeline.merge_into_store`.
    max_rows : int
        How many failed rows the display lists.
    """

    kind: str
    counts: dict[str, int]
    breakdown: pd.DataFrame
    skipped_reasons: dict[str, int]
    failed: pd.DataFrame
    changes: pd.DataFrame
    max_rows: int = 10

    @property
    def ok(self) -> bool:
        """True when no row failed."""
        return not self.counts.get("failed")

    def __len__(self) -> int:
        return len(self.changes)

    def summary(self) -> str:
        """A few readable lines: counts (per detector for flags), skip reasons, first failures."""
        counts = (
            ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "no rows"
        )
        lines = [f"{self.kind} change set: {len(self.changes)} row(s): {counts}"]
        if self.kind == "flag":
            # A few detectors: one line each says what every detector found.
            for key, row in self.breakdown.iterrows():
                label = " ".join(map(str, key)) if isinstance(key, tuple) else str(key)
                found = ", ".join(f"{k} {v}" for k, v in row.items() if v)
                lines.append(f"  {label}: {found}")
        if self.skipped_reasons:
            reasons = ", ".join(f"{k} {v}" for k, v in self.skipped_reasons.items())
            lines.append(f"  skipped because: {reasons}")
        if len(self.failed):
            lines.append(f"  failed rows ({len(self.failed)}):")
            for _, r in self.failed.head(self.max_rows).iterrows():
                where = (
                    r.get("detector")
                    if self.kind == "flag"
                    else f"row {r.get('row', '-')}: {r.get('embryo_id', '')}"
                )
                lines.append(f"    {where}: {r['reason']}")
            if len(self.failed) > self.max_rows:
                lines.append(
                    f"    ... and {len(self.failed) - self.max_rows} more (see .failed)"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<ChangeSummary {self.summary()}>"

    def _repr_html_(self) -> str:
        counts = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
            for k, v in sorted(self.counts.items())
        )
        parts = [
            f"<div><b>ChangeSummary</b> ({html.escape(self.kind)}): {len(self.changes)} row(s)",
            f"<table><tr><th>status</th><th>rows</th></tr>{counts}</table>",
        ]
        if len(self.breakdown):
            parts.append(self.breakdown.to_html())
        if self.skipped_reasons:
            reasons = ", ".join(
                f"{html.escape(k)} {v}" for k, v in self.skipped_reasons.items()
            )
            parts.append(f"<p>skipped because: {reasons}</p>")
        if len(self.failed):
            shown = [c for c in _FAILED_COLUMNS[self.kind] if c in self.failed.columns]
            more = len(self.failed) - self.max_rows
            parts.append(
                f"<p>failed rows ({len(self.failed)}{f', first {self.max_rows}' if more > 0 else ''}):</p>"
            )
            parts.append(self.failed.head(self.max_rows)[shown].to_html(index=False))
        else:
            parts.append("<p>no failed rows</p>")
        parts.append("</div>")
        return "".join(parts)


def _sorted_rows(failed: pd.DataFrame) -> pd.DataFrame:
    # Partitions finish in index order, not row order: list failures as the user wrote them.
    if "row" in failed.columns:
        failed = failed.sort_values("row", kind="stable")
    return failed.reset_index(drop=True)


def summarize(
    changes: pd.DataFrame | dd.DataFrame,
    *,
    max_rows: int = 10,
    compute: Callable[[dd.DataFrame], pd.DataFrame] | None = None,
) -> ChangeSummary:
    """Compute a change set once and summarise it for display.

    Parameters
    ----------
    changes : pandas.DataFrame or dask.dataframe.DataFrame
        A phenotype, genotype or flag change set.
    max_rows : int, default 10
        Failed rows listed by the display (all are in ``.failed``).
    compute : callable, optional
        How to compute a lazy change set (default ``changes.compute()``), e.g.
        ``lambda c: client.compute(c).result()`` or a call wrapped in a progress bar.

    Returns
    -------
    ChangeSummary
        Counts by status, a breakdown, skip reasons, failed rows and the
        computed change set.

    Raises
    ------
    ValueError
        If *changes* is not a change set.

    Notes
    -----
    Triggers computation (once).

    Examples
    --------
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=4, n_frames=6, seed=0)
    >>> snips = pipeline.snips_from_store(store)
    >>> summary = summarize(pipeline.run_detectors(snips, [pipeline.ShortTrack(min_snips=100)], store=store))
    >>> summary.counts
    {'raised': 4}
    >>> print(summary.summary())
    flag change set: 4 row(s): raised 4
      ShortTrack SHORT_TRACK: raised 4
    """
    kind = kind_of(changes)
    if isinstance(changes, dd.DataFrame):
        table = compute(changes) if compute is not None else changes.compute()
    else:
        table = changes
    table = table.reset_index(drop=True)
    status = table["status"].astype(object)
    counts = {str(k): int(v) for k, v in status.value_counts().items()}
    key = [_BREAKDOWN[kind], "flag"] if kind == "flag" else [_BREAKDOWN[kind]]
    labelled = table[key].astype(object).fillna("(missing)").assign(status=status)
    breakdown = (
        labelled.groupby([*key, "status"]).size().unstack("status", fill_value=0)
    )
    breakdown.columns.name = None
    skipped = table.loc[status == "skipped", "reason"].astype(object).fillna("")
    codes = skipped.str.split(":", n=1).str[0].str.strip().replace("", "(no reason)")
    return ChangeSummary(
        kind=kind,
        counts=counts,
        breakdown=breakdown,
        skipped_reasons={str(k): int(v) for k, v in codes.value_counts().items()},
        failed=_sorted_rows(table.loc[status == "failed"]),
        changes=table,
        max_rows=max_rows,
    )
