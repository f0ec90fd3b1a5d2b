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
from pipeline.ranges import FrameRange, expand_ranges, parse_range, select_positions
from pipeline.phenotypes import assign_genotypes, assign_phenotypes, read_assignments
from pipeline import detectors
from pipeline.detectors import (
    Detector,
    FrameGap,
    HighlyVariableMask,
    IncompleteExperiment,
    LowMaskConfidence,
    LowPhenotypeConfidence,
    MissingGenotype,
    NoEmbryo,
    ShortTrack,
    run_detectors,
)
from pipeline.merge import MergeReport, merge_into_store, undo
from pipeline.changelog import read_changelog
from pipeline.shards import ShardedStore, shard_store, unshard_store
from pipeline.batch import map_snips, to_changes
# where work runs
from pipeline.cluster import ClusterError, compute, get_client
from pipeline.spreadsheet import SpreadsheetError, import_spreadsheet
# 6 export
from pipeline.export import ExportError, ExportResult, export_store, read_table, write_csv, write_feather, write_hdf5, write_parquet, write_table
from pipeline.estimate import estimate_resources
from pipeline import testing

# Jupyter: plot imports matplotlib only when a figure is drawn
from pipeline import plot, report

__all__ = [
    "__version__",
    # 1 store
    "Store",
    "read_store",
    "validate_store",
    "write_store",
    # 2 snips
    "snips_from_store",
    # 3 ranges
    "FrameRange",
    "parse_range",
    "select_positions",
    "expand_ranges",
    # 4 phenotypes and genotypes
    "assign_phenotypes",
    "assign_genotypes",
    "read_assignments",
    # 4 detectors
    "detectors",
    "Detector",
    "run_detectors",
    "HighlyVariableMask",
    "LowMaskConfidence",
    "LowPhenotypeConfidence",
    "FrameGap",
    "ShortTrack",
    "MissingGenotype",
    "NoEmbryo",
    "IncompleteExperiment",
    # 5 merge
    "MergeReport",
    "merge_into_store",
    "undo",
    "read_changelog",
    # 5 import (a scoring sheet, merged as one batch)
    "import_spreadsheet",
    "SpreadsheetError",
    # 6 export
    "write_parquet",
    "write_feather",
    "write_hdf5",
    "write_csv",
    "write_table",
    "export_store",
    "read_table",
    "ExportResult",
    "ExportError",
    # sharded stores
    "ShardedStore",
    "shard_store",
    "unshard_store",
    # generic batch operations
    "map_snips",
    "to_changes",
    # where work runs
    "get_client",
    "compute",
    "ClusterError",
    # resource estimates
    "estimate_resources",
    # helpers
    "testing",
    # Jupyter
    "plot",
    "report",
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
