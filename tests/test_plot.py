from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import pipeline
from pipeline import plot
from pipeline.testing import make_store

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.figure import Figure


@pytest.fixture(scope="module")
def store():
    return make_store(
        n_experiments=2, n_embryos=6, n_frames=8, seed=3, dead_fraction=0.5
    )


def _by_hand(store) -> dict[str, dict[int, float]]:
    """Fraction of dead snips per genotype and frame, straight from the JSON."""
    dead: dict[tuple[str, int], list[bool]] = {}
    for embryo in store.doc["embryos"].values():
        genotype = (
            embryo["genotype"]["value"] if embryo["genotype"] else plot.MISSING_LABEL
        )
        for snip in embryo["snips"].values():
            dead.setdefault((genotype, snip["frame"]), []).append(
                snip["phenotype"]["value"] == "DEAD"
            )
    out: dict[str, dict[int, float]] = {}
    for (genotype, frame), flags in dead.items():
        out.setdefault(genotype, {})[frame] = sum(flags) / len(flags)
    return out


@pytest.mark.parametrize("npartitions", [1, 3], ids=["one-part", "three-parts"])
def test_mortality_table_matches_hand_computation(store, npartitions):
    table = plot.mortality_table(
        pipeline.snips_from_store(store, npartitions=npartitions), by="genotype"
    )
    expected = _by_hand(store)
    assert list(table.columns) == sorted(
        set(expected) - {plot.MISSING_LABEL}, key=str.casefold
    ) + ([plot.MISSING_LABEL] if plot.MISSING_LABEL in expected else [])
    for genotype, by_frame in expected.items():
        got = table[genotype].dropna()
        assert got.to_dict() == pytest.approx(by_frame)


def test_mortality_table_pandas_equals_dask(store):
    snips = pipeline.snips_from_store(store, npartitions=3)
    pd.testing.assert_frame_equal(
        plot.mortality_table(store.snip_table()), plot.mortality_table(snips)
    )


def test_mortality_curve_draws_the_table(store):
    snips = pipeline.snips_from_store(store, npartitions=2)
    fig = plot.mortality_curve(snips, by="genotype")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "frame"
    assert ax.get_ylabel() == "fraction dead"
    assert ax.get_title() == "Mortality by genotype"
    expected = _by_hand(store)
    lines = {line.get_label().rsplit(" (n=", 1)[0]: line for line in ax.get_lines()}
    assert set(lines) == set(expected)
    for genotype, by_frame in expected.items():
        frames = sorted(by_frame)
        np.testing.assert_array_equal(lines[genotype].get_xdata(), frames)
        np.testing.assert_allclose(
            lines[genotype].get_ydata(), [by_frame[f] for f in frames]
        )
    n_embryos = {}
    for embryo in store.doc["embryos"].values():
        g = embryo["genotype"]["value"] if embryo["genotype"] else plot.MISSING_LABEL
        n_embryos[g] = n_embryos.get(g, 0) + 1
    assert {line.get_label() for line in ax.get_lines()} == {
        f"{g} (n={n})" for g, n in n_embryos.items()
    }


def test_mortality_curve_single_group_and_own_axes(store):
    fig = Figure()
    ax = fig.add_subplot()
    assert plot.mortality_curve(store.snip_table(), by=None, ax=ax, title="all") is fig
    assert [line.get_label() for line in ax.get_lines()] == [
        f"all (n={store.counts()['embryos']})"
    ]
    assert ax.get_title() == "all"


def test_phenotype_table_counts_and_fractions(store):
    snips = pipeline.snips_from_store(store, npartitions=2)
    table = store.snip_table()
    counts = plot.phenotype_table(snips, normalize=False)
    expected = table.groupby(["phenotype", "frame"]).size().unstack(fill_value=0)
    frames = range(int(table["frame"].min()), int(table["frame"].max()) + 1)
    assert list(counts.columns) == list(frames)
    for phenotype in expected.index:
        for frame in expected.columns:
            assert counts.loc[phenotype, frame] == expected.loc[phenotype, frame]
    assert (
        counts.index[0] == table["phenotype"].value_counts().index[0]
    )  # most frequent first
    fractions = plot.phenotype_table(snips)
    np.testing.assert_allclose(fractions.sum(axis=0).dropna(), 1.0)
    chosen = plot.phenotype_table(snips, phenotypes=["DEAD", "EDEMA"], normalize=False)
    assert list(chosen.index) == ["DEAD", "EDEMA"]
    assert (chosen.loc["EDEMA"] == 0).all()


def test_phenotype_timeline_is_a_labelled_heat_map(store):
    fig = plot.phenotype_timeline(pipeline.snips_from_store(store))
    assert isinstance(fig, Figure)
    ax, colorbar = fig.axes
    assert ax.get_xlabel() == "frame"
    assert ax.get_ylabel() == "phenotype"
    assert [t.get_text() for t in ax.get_yticklabels()] == list(
        plot.phenotype_table(store.snip_table()).index
    )
    assert colorbar.get_ylabel() == "fraction of snips"
    assert (
        ax.images[0].get_array().shape == plot.phenotype_table(store.snip_table()).shape
    )
    counts = plot.phenotype_timeline(store.snip_table(), normalize=False)
    assert counts.axes[1].get_ylabel() == "snips"


def test_figures_render_headless(store, tmp_path):
    path = tmp_path / "curve.png"
    plot.mortality_curve(store.snip_table()).savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_says_what_is_wrong(store):
    with pytest.raises(ValueError, match="lacks the column"):
        plot.mortality_curve(store.snip_table().drop(columns="is_dead"))
    with pytest.raises(TypeError, match="snip table"):
        plot.phenotype_timeline(store)
    with pytest.raises(ValueError, match="x axis"):
        plot.mortality_table(store.snip_table(), by="frame")


def test_missing_matplotlib_points_to_the_extra(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"embryo-pipeline\[plot\]"):
        plot.mortality_curve(store.snip_table())


def test_importing_pipeline_does_not_import_matplotlib():
    code = "import sys, pipeline; pipeline.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
