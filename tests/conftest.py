"""Shared fixtures: example files, store files written from make_store, a sync scheduler."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import orjson
import pytest

from pipeline import _jsonfile
from pipeline.testing import make_store

# PIPELINE_TEST_BLOCK=2048 runs the suite (in this process) with every store
# file larger than that read a block at a time, as tables only, the way
# large stores are read.
if os.environ.get("PIPELINE_TEST_BLOCK"):
    _jsonfile.BLOCK = int(os.environ["PIPELINE_TEST_BLOCK"])

#: Hand-written stores and tables that live with the tests.
DATA = Path(__file__).parent / "data"
#: The shared examples: ../shared beside the checkout, here and in CI.
EXAMPLES = Path(__file__).parents[2] / "shared" / "examples"
#: The hand-written 2 experiments x 2 embryos x 4 frames store.
MINIMAL = DATA / "store_minimal.json"


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    if not EXAMPLES.is_dir():
        pytest.fail(
            f"shared examples not found at {EXAMPLES}: check out ../shared beside the repo"
        )
    return EXAMPLES


@pytest.fixture(scope="session")
def legacy_path(examples_dir: Path) -> Path:
    return examples_dir / "legacy_store.json"


@pytest.fixture(scope="session")
def small_store_path(examples_dir: Path) -> Path:
    return examples_dir / "small_store.json"


@pytest.fixture(scope="session")
def _minimal_doc() -> dict[str, Any]:
    return orjson.loads(MINIMAL.read_bytes())


@pytest.fixture
def minimal_doc(_minimal_doc: dict[str, Any]) -> dict[str, Any]:
    """A fresh, mutable copy of tests/data/store_minimal.json."""
    return copy.deepcopy(_minimal_doc)


@pytest.fixture
def minimal_path(tmp_path: Path) -> Path:
    """A writable copy of tests/data/store_minimal.json."""
    path = tmp_path / "store_minimal.json"
    path.write_bytes(MINIMAL.read_bytes())
    return path


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    """A small synthetic store (3 experiments x 4 embryos x 6 frames) saved to a file."""
    path = tmp_path / "store.json"
    make_store(n_experiments=3, n_embryos=4, n_frames=6, seed=0).save(path)
    return path


@pytest.fixture
def sync_scheduler() -> Iterator[None]:
    """Compute with the single-threaded scheduler: deterministic, debuggable."""
    with dask.config.set(scheduler="sync"):
        yield


# ---------------------------------------------------------------------------
# Fixtures of later stages (phenotypes, detectors, merge, export) go below.
