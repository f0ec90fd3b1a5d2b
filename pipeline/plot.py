"""Plots of a snip table for notebooks: mortality curves and phenotype timelines.

Each plot is a pair: a ``*_table`` function that aggregates the snip table (a
Dask or a pandas DataFrame from :func:`pipeline.snips_from_store`) with one
``groupby`` over ``frame`` and computes once, and a function that draws the
table and returns a :class:`matplotlib.figure.Figure`.

Figures are built with the object-oriented API (``Figure()``, never
``pyplot``), so no global figure state is kept and they render headless (in
tests and CI) with the Agg canvas; ``fig.savefig("curve.png")`` writes a file.
In IPython and Jupyter, a figure at the end of a cell shows as an image: the
first plot registers a PNG display formatter for figures unless one is
registered already (``%matplotlib inline`` registers its own).

matplotlib is imported only when a figure is drawn; it comes with the ``plot``
extra: ``pip install "embryo-pipeline[plot]"``. Importing :mod:`pipeline` never
imports matplotlib.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "mortality_curve",
    "mortality_table",
    "phenotype_timeline",
    "phenotype_table",
    "MISSING_LABEL",
]

#: Label of the group whose *by* value is missing (e.g. no genotype yet).
MISSING_LABEL = "(none)"


def _figure_class() -> type[Figure]:
    """Import matplotlib lazily, saying how to install it when it is absent."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        msg = (
            "pipeline.plot needs matplotlib, which is not installed; install the plot "
            'extra: pip install "embryo-pipeline[plot]" (or pip install matplotlib)'
        )
        raise ImportError(msg) from err
    _show_in_notebooks(Figure)
    return Figure


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _show_in_notebooks(figure_class: type[Figure]) -> None:
    """Let IPython display figures as PNG, unless a figure formatter exists.

    Without pyplot, IPython knows no image format for a bare ``Figure`` and
    would show ``<Figure size 700x400 with 1 Axes>``.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    for formatter in formatters.values():
        try:
            formatter.lookup_by_type(figure_class)
        except KeyError:
            continue
        return  # %matplotlib inline (or the user) chose a format already
    formatters["image/png"].for_type(figure_class, _png)


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    figure_class = _figure_class()
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = figure_class(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _check_columns(snips: Any, needed: Sequence[str]) -> None:
    if not isinstance(snips, dd.DataFrame | pd.DataFrame):
        msg = f"expected a snip table (a Dask or pandas DataFrame from pipeline.snips_from_store), got {type(snips).__name__}"
        raise TypeError(msg)
    missing = [c for c in needed if c not in snips.columns]
    if missing:
        msg = (
            f"the snip table lacks the column(s) {', '.join(map(repr, missing))}; "
            f"columns present: {', '.join(map(str, snips.columns))}"
        )
        raise ValueError(msg)


def _group_labels(column: Any) -> Any:
    """The *by* column with missing values labelled, so they form a group too."""
    if pd.api.types.is_string_dtype(column.dtype) or column.dtype == object:
        return column.fillna(MISSING_LABEL)
    return column


def _sort_groups(labels: Sequence[Any]) -> list[Any]:
    present = [g for g in labels if g != MISSING_LABEL]
    return sorted(present, key=lambda g: str(g).casefold()) + [
        g for g in labels if g == MISSING_LABEL
    ]


def _mortality(
    snips: dd.DataFrame | pd.DataFrame, by: str | None
) -> tuple[pd.DataFrame, pd.Series]:
    _check_columns(snips, ["frame", "is_dead", "embryo_id", *([by] if by else [])])
    if by == "frame":
        msg = "by='frame' is the x axis already; group by a per-embryo column such as 'genotype' or 'experiment_id'"
        raise ValueError(msg)
    sub = snips[["frame", "is_dead", "embryo_id"]]
    sub = sub.assign(group=_group_labels(snips[by]) if by else "all")
    stats = sub.groupby(["group", "frame"])["is_dead"].agg(["sum", "count"])
    n_embryos = sub.groupby("group")["embryo_id"].nunique()
    # One compute for both aggregates: the snip table is read once.
    stats, n_embryos = dask.compute(stats, n_embryos)
    fraction = (stats["sum"] / stats["count"]).rename("fraction_dead")
    table = fraction.unstack("group").sort_index()
    groups = _sort_groups(list(table.columns))
    table = table.reindex(columns=groups)
    table.index = table.index.astype(np.int64)
    table.index.name = "frame"
    table.columns.name = by or "group"
    n_embryos = n_embryos.reindex(groups)
    n_embryos.index.name = by or "group"
    return table, n_embryos


def mortality_table(
    snips: dd.DataFrame | pd.DataFrame, by: str | None = "genotype"
) -> pd.DataFrame:
    """Fraction of snips that are dead, per frame and group.

    At each frame, the fraction is over the embryos imaged at that frame
    (``is_dead`` is true from the death frame on, DEAD being permanent); an
    embryo whose track ended earlier no longer counts.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The snip table (columns ``frame``, ``is_dead``, ``embryo_id`` and *by*).
    by : str or None, default "genotype"
        Column to group embryos by (``genotype``, ``experiment_id``, ...);
        ``None`` for one curve over all embryos. Missing values of a text
        column (no genotype yet) form the group ``"(none)"``.

    Returns
    -------
    pandas.DataFrame
        Index ``frame`` (int), one column per group (sorted, ``"(none)"``
        last), values in [0, 1]; NaN where a group has no snip at a frame.

    Notes
    -----
    Triggers computation (once).

    Examples
    --------
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=4, n_frames=5, seed=0)
    >>> table = mortality_table(pipeline.snips_from_store(store), by=None)
    >>> list(table.columns), table.index.name, bool(table["all"].between(0, 1).all())
    (['all'], 'frame', True)
    """
    return _mortality(snips, by)[0]


def mortality_curve(
    snips: dd.DataFrame | pd.DataFrame,
    by: str | None = "genotype",
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Plot the fraction of dead embryos per frame, one line per group.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The snip table from :func:`pipeline.snips_from_store`.
    by : str or None, default "genotype"
        Column to group embryos by; ``None`` for a single curve. The legend
        gives each group's number of embryos.
    ax : matplotlib.axes.Axes, optional
        Draw into these axes (e.g. one panel of a larger figure) instead of a
        new figure.
    title : str, optional
        Axes title (default "Mortality by <by>").

    Returns
    -------
    matplotlib.figure.Figure
        x ``frame``, y ``fraction dead`` in [0, 1]; ``fig.savefig(path)`` to save.

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install "embryo-pipeline[plot]"``).

    Notes
    -----
    Triggers computation (once); the values are :func:`mortality_table`'s.

    Examples
    --------
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=6, n_frames=8, seed=0)
    >>> fig = mortality_curve(pipeline.snips_from_store(store), by="genotype")
    >>> fig.axes[0].get_ylabel()
    'fraction dead'
    """
    table, n_embryos = _mortality(snips, by)
    fig, ax = _new_axes(ax, (7.0, 4.0))
    for group in table.columns:
        values = table[group].dropna()
        ax.plot(
            values.index.to_numpy(),
            values.to_numpy(),
            marker="o" if len(values) <= 30 else None,
            markersize=3,
            label=f"{group} (n={int(n_embryos[group])})",
        )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("frame")
    ax.set_ylabel("fraction dead")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        title if title is not None else (f"Mortality by {by}" if by else "Mortality")
    )
    ax.grid(alpha=0.3)
    if len(table.columns):
        ax.legend(
            title=by,
            fontsize="small",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
        )
    return fig


def phenotype_table(
    snips: dd.DataFrame | pd.DataFrame,
    *,
    phenotypes: Sequence[str] | None = None,
    normalize: bool = True,
) -> pd.DataFrame:
    """Snips per phenotype and frame: the data of :func:`phenotype_timeline`.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The snip table (columns ``phenotype`` and ``frame``).
    phenotypes : sequence of str, optional
        Rows to show, in this order (default: every phenotype present, the
        most frequent first).
    normalize : bool, default True
        Fractions of the snips at each frame (columns sum to 1 over all
        phenotypes); otherwise counts.

    Returns
    -------
    pandas.DataFrame
        Index ``phenotype``, one column per frame from the first to the last
        (frames without snips: 0 counts, NaN fractions).

    Notes
    -----
    Triggers computation (once).

    Examples
    --------
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=4, n_frames=5, seed=0)
    >>> counts = phenotype_table(pipeline.snips_from_store(store), normalize=False)
    >>> int(counts.to_numpy().sum()) == store.counts()["snips"]
    True
    """
    _check_columns(snips, ["phenotype", "frame"])
    counts = snips.groupby(["phenotype", "frame"]).size()
    (counts,) = dask.compute(counts)
    table = counts.unstack("frame", fill_value=0)
    if len(table.columns):
        frames = np.arange(
            int(table.columns.min()), int(table.columns.max()) + 1, dtype=np.int64
        )
        table = table.reindex(columns=frames, fill_value=0)
    table.columns = pd.Index(table.columns.astype(np.int64), name="frame")
    per_frame = table.sum(axis=0)
    if phenotypes is None:
        order = (
            table.sum(axis=1).sort_values(ascending=False, kind="stable").index.tolist()
        )
    else:
        order = list(phenotypes)
    table = table.reindex(index=order, fill_value=0)
    table.index = pd.Index(table.index.astype(object), name="phenotype")
    table = table.astype(np.int64)
    if normalize:
        return table / per_frame.where(per_frame > 0)
    return table


def phenotype_timeline(
    snips: dd.DataFrame | pd.DataFrame,
    *,
    phenotypes: Sequence[str] | None = None,
    normalize: bool = True,
    ax: Axes | None = None,
    title: str | None = None,
    cmap: str = "viridis",
) -> Figure:
    """Plot a phenotype-by-frame heat map: how the phenotypes unfold over time.

    Parameters
    ----------
    snips : dask.dataframe.DataFrame or pandas.DataFrame
        The snip table from :func:`pipeline.snips_from_store` (filter it first
        to plot one genotype or experiment, e.g. ``snips[snips.genotype == "WT"]``).
    phenotypes : sequence of str, optional
        Rows, in order (default: every phenotype present, the most frequent first).
    normalize : bool, default True
        Colour by the fraction of the frame's snips; otherwise by counts.
    ax : matplotlib.axes.Axes, optional
        Draw into these axes instead of a new figure.
    title : str, optional
        Axes title (default "Phenotypes by frame").
    cmap : str, default "viridis"
        A matplotlib colormap name.

    Returns
    -------
    matplotlib.figure.Figure
        Rows are phenotypes, columns frames, with a colour bar.

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install "embryo-pipeline[plot]"``).

    Notes
    -----
    Triggers computation (once); the values are :func:`phenotype_table`'s.

    Examples
    --------
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=6, n_frames=8, seed=0)
    >>> fig = phenotype_timeline(pipeline.snips_from_store(store))
    >>> fig.axes[0].get_xlabel()
    'frame'
    """
    table = phenotype_table(snips, phenotypes=phenotypes, normalize=normalize)
    fig, ax = _new_axes(ax, (8.0, 1.5 + 0.35 * max(len(table), 1)))
    frames = table.columns.to_numpy()
    first, last = (int(frames[0]), int(frames[-1])) if len(frames) else (0, 0)
    values = np.ma.masked_invalid(table.to_numpy(dtype=np.float64))
    image = ax.imshow(
        values,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        extent=(first - 0.5, last + 0.5, len(table) - 0.5, -0.5),
        vmin=0.0,
        vmax=1.0 if normalize else None,
    )
    ax.set_yticks(np.arange(len(table)), labels=[str(p) for p in table.index])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("frame")
    ax.set_ylabel("phenotype")
    ax.set_title(title if title is not None else "Phenotypes by frame")
    fig.colorbar(image, ax=ax, label="fraction of snips" if normalize else "snips")
    return fig
