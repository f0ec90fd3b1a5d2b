"""The notebooks run top to bottom on synthetic data, within their time budget.

Each notebook in ``notebooks/`` is executed with nbclient in a fresh kernel, in a
temporary working folder. The kernel is this interpreter: a ``python3``
kernelspec pointing at ``sys.executable`` is written to a temporary folder put
first on ``JUPYTER_PATH``, so the test needs no ``ipykernel install`` and never
picks up another environment's ``python3`` kernel.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_quickstart.ipynb",
    "02_batch_annotation.ipynb",
    "03_cohort_reprocessing.ipynb",
]
BUDGET_S = 60  # per notebook, on 2 cores (STYLE.md B.6)
CELL_TIMEOUT_S = 120
USES_CLUSTER = {"02_batch_annotation.ipynb", "03_cohort_reprocessing.ipynb"}
# A private name of the package: `pipeline._x`, `pipeline.merge._x`, `from pipeline._x import`.
PRIVATE = re.compile(r"\bpipeline(?:\.[A-Za-z]\w*)*\._\w+")


def _params(marked: set[str]) -> list[pytest.ParameterSet]:
    return [
        pytest.param(
            p, id=p.stem, marks=[pytest.mark.distributed] if p.name in marked else []
        )
        for p in NOTEBOOKS
    ]


def _tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory):
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (embryo-pipeline tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(spec_dir.parents[1]))
        yield


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", _params(set()))
def test_notebook_is_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "code"
    assert "parameters" in _tags(first), "the first cell must be tagged `parameters`"
    assert re.search(r"^STORE_PATH = None\b", first.source, re.MULTILINE), (
        "the parameters cell sets STORE_PATH = None"
    )
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"cell {i} has outputs: strip them"
        assert cell.execution_count is None, (
            f"cell {i} has an execution count: strip it"
        )
        assert not PRIVATE.search(cell.source), (
            f"cell {i} uses a private name: {PRIVATE.search(cell.source)[0]}"
        )
        for line in cell.source.splitlines():
            if re.match(r"\s*(from|import)\s+pipeline\b", line):
                assert re.fullmatch(r"\s*import pipeline\s*", line), (
                    f"cell {i}: import only `pipeline` ({line.strip()!r})"
                )


@pytest.mark.parametrize("path", _params(USES_CLUSTER))
def test_notebook_runs(path: Path, kernel_env: None, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if "raises-exception" in _tags(cell):
            assert errors, f"cell {i} is tagged raises-exception but raised nothing"
        else:
            assert not errors, (
                f"cell {i} failed:\n{cell.source}\n{errors[0].ename}: {errors[0].evalue}"
            )
    images = sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    if path.name == "01_quickstart.ipynb":
        assert images >= 2, (
            "the quickstart shows the mortality curve and the phenotype timeline as images"
        )
    assert list(tmp_path.iterdir()) == [], (
        "a notebook wrote into its working folder; use tempfile.mkdtemp()"
    )
    assert elapsed < BUDGET_S, f"{path.name} took {elapsed:.1f} s (budget {BUDGET_S} s)"
