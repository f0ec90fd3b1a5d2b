"""The command line's start and the lazily loaded public API.

``import pipeline`` loads its public names on first use, so the command line
builds its parser and parses its arguments without pandas, Arrow or Dask:
the store's read can begin before they are imported. Each check that counts
imports runs in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pipeline

MINIMAL = Path(__file__).parent / "data" / "store_minimal.json"

#: What the command line's start must not import.
HEAVY = ("pandas", "pyarrow", "numpy", "dask", "distributed", "bokeh")


def fresh(code: str, **env: str) -> object:
    """Run *code* in a new interpreter and return what it printed, as JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_parsing_any_command_imports_no_heavy_library() -> None:
    loaded = fresh(
        f"""
        import json, sys
        import pipeline.cli
        from pipeline.cluster import _parse_scheduler

        parser = pipeline.cli.build_parser()
        for argv in (
            ["assign", "s.json", "a.csv", "--author", "x"],
            ["assign", "s.json", "a.csv", "--author", "x", "--scheduler", "sync", "--checkpoint-every", "2"],
            ["genotypes", "s.json", "g.csv", "--author", "x"],
            ["export", "s.json", "out"],
            ["export", "s.json", "out.csv", "--format", "csv", "--what", "flags", "--workers", "2"],
            ["detect", "s.json"],
            ["detect", "s.json", "--detector", "ShortTrack:min_snips=5", "--dry-run"],
            ["detectors"],
            ["import", "s.json", "sheet.csv", "--map", "embryo_id=Embryo ID"],
            ["info", "s.json", "--estimate"],
            ["validate", "s.json"],
            ["undo", "s.json", "batch"],
            ["shard", "s.json", "out"],
            ["unshard", "shards", "s.json"],
            ["demo", "--snips", "100"],
        ):
            args = parser.parse_args(argv)
            assert callable(args.run), argv
        # Where work runs is decided before the store is read.
        assert _parse_scheduler(None) == "tcp://host:8786"
        assert _parse_scheduler("threads") == "threads"
        print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in {HEAVY!r})))
        """,
        DASK_SCHEDULER_ADDRESS="host:8786",
    )
    assert loaded == []


def test_reading_a_store_imports_no_dask() -> None:
    # The store module never needed Dask; the eager package imported it
    # anyway (and read_store's check for a sharded folder still did).
    loaded = fresh(
        f"""
        import json, sys
        import pipeline

        store = pipeline.read_store({str(MINIMAL)!r})
        assert store.counts()["snips"] == 16
        print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in ("dask", "distributed"))))
        """
    )
    assert loaded == []


def test_import_pipeline_loads_names_on_first_use() -> None:
    loaded = fresh(
        """
        import json, sys
        import pipeline

        before = sorted(m for m in sys.modules if m.startswith(("pipeline", "pandas", "dask")))
        store = pipeline.testing.make_store(n_experiments=1, n_embryos=2, n_frames=3, seed=0)
        # A submodule asked for as an attribute is imported too.
        same = pipeline.store.Store is pipeline.Store is type(store)
        print(json.dumps([before, same, "read_store" in vars(pipeline)]))
        """
    )
    assert loaded == [["pipeline"], True, False]


def test_every_public_name_resolves_and_is_listed() -> None:
    names = set(dir(pipeline))
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
        assert name in names, name
    assert pipeline.read_store is pipeline.store.read_store
    assert pipeline.detectors.__name__ == "pipeline.detectors"
    assert isinstance(pipeline.__version__, str)


def test_star_import_brings_every_public_name() -> None:
    missing = fresh(
        """
        from pipeline import *
        import json, pipeline
        print(json.dumps([n for n in pipeline.__all__ if n not in globals()]))
        """
    )
    assert missing == []


@pytest.mark.parametrize("name", ["no_such_name", "data", "__wrapped__", "store.Store"])
def test_unknown_attribute_raises_attribute_error(name: str) -> None:
    with pytest.raises(AttributeError, match=f"^module 'pipeline' has no attribute '{name}'$"):
        getattr(pipeline, name)
    assert not hasattr(pipeline, name)


def test_type_checking_imports_match_the_lazy_table() -> None:
    # The imports under TYPE_CHECKING are what type checkers and IDEs see;
    # _DEFINED_IN is what runs: they name the same module for every name.
    tree = ast.parse(Path(pipeline.__file__).read_text())
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    )
    seen: dict[str, str] = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom), ast.dump(node)
        for alias in node.names:
            module = alias.name if node.module == "pipeline" else node.module.removeprefix("pipeline.")
            seen[alias.asname or alias.name] = module
    submodules = {name for name, module in seen.items() if name == module}
    assert submodules == {"detectors", "testing", "plot", "report"}
    assert {n: m for n, m in seen.items() if n not in submodules} == pipeline._DEFINED_IN
    assert set(seen) | {"__version__"} == set(pipeline.__all__)
