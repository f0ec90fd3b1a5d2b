"""embryo-pipeline: zebrafish embryo annotations as a snip-level Dask DataFrame.

The public API, in pipeline order::

    store = pipeline.read_store("annotations.json")      # 1 read and check
    snips = pipeline.snips_from_store(store)             # 2 flatten (lazy)
    ...                                                  # 3-4 ranges, assign, detect
    pipeline.write_store(store)                          # save atomically

Anything whose name starts with ``_`` is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pipeline.errors import (
    AnnotationError,
    MergeConflictError,
    MetaMismatchError,
    PipelineError,
    PipelineWarning,
    RangeSyntaxError,
    StoreFormatError,
    StoreLockedError,
    UpgradeWarning,
)
from pipeline.store import Store, read_store, validate_store, write_store
from pipeline.snips import snips_from_store
from pipeline import testing

__all__ = [
    "__version__",
    # 1 store
    "Store",
    "read_store",
    "validate_store",
    "write_store",
    # 2 snips
    "snips_from_store",
    # helpers
    "testing",
    # errors
    "PipelineError",
    "PipelineWarning",
    "AnnotationError",
    "MergeConflictError",
    "MetaMismatchError",
    "RangeSyntaxError",
    "StoreFormatError",
    "StoreLockedError",
    "UpgradeWarning",
]
