"""embryo-pipeline: zebrafish embryo annotations as a snip-level Dask DataFrame.

The public API, in pipeline order::

    store = pipeline.read_store("annotations.json")      # 1 read and check
    snips = pipeline.snips_from_store(store)             # 2 flatten (lazy)
    ...                                                  # 3-4 ranges, assign, detect
    pipeline.write_store(store)                          # save atomically

Names load on first use: ``import pipeline`` imports none of pandas, Arrow
or Dask, and ``pipeline.read_store`` (or ``from pipeline import
read_store``) imports the module that defines it the first time it is
asked for. The command line starts quickly that way, before it reads a
store.

Anything whose name starts with ``_`` is internal.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
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

#: The submodule that defines each public name (as imported above for type
#: checkers). The public submodules (``detectors``, ``testing``, ``plot``,
#: ``report``) resolve as every submodule does.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "errors": (
        "AnnotationError",
        "MergeConflictError",
        "MetaMismatchError",
        "PipelineError",
        "PipelineWarning",
        "RangeSyntaxError",
        "StoreFormatError",
        "StoreLockedError",
        "UpgradeWarning",
    ),
    "store": ("Store", "read_store", "validate_store", "write_store"),
    "snips": ("snips_from_store",),
    "ranges": ("FrameRange", "expand_ranges", "parse_range", "select_positions"),
    "phenotypes": ("assign_genotypes", "assign_phenotypes", "read_assignments"),
    "detectors": (
        "Detector",
        "FrameGap",
        "HighlyVariableMask",
        "IncompleteExperiment",
        "LowMaskConfidence",
        "LowPhenotypeConfidence",
        "MissingGenotype",
        "NoEmbryo",
        "ShortTrack",
        "run_detectors",
    ),
    "merge": ("MergeReport", "merge_into_store", "undo"),
    "changelog": ("read_changelog",),
    "shards": ("ShardedStore", "shard_store", "unshard_store"),
    "batch": ("map_snips", "to_changes"),
    "cluster": ("ClusterError", "compute", "get_client"),
    "spreadsheet": ("SpreadsheetError", "import_spreadsheet"),
    "export": (
        "ExportError",
        "ExportResult",
        "export_store",
        "read_table",
        "write_csv",
        "write_feather",
        "write_hdf5",
        "write_parquet",
        "write_table",
    ),
    "estimate": ("estimate_resources",),
}
_DEFINED_IN: dict[str, str] = {
    name: module for module, names in _EXPORTS.items() for name in names
}


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule, the first time it is asked for.

    Parameters
    ----------
    name : str
        A name of :data:`__all__`, or of a submodule (``pipeline.store``).

    Returns
    -------
    object
        The object, which is then kept in the package's namespace: the
        import happens once per name.

    Raises
    ------
    AttributeError
        If *name* is neither.
    """
    module = _DEFINED_IN.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    elif _is_submodule(name):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg, name=name, obj=sys.modules[__name__])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The package's namespace and every public name, loaded or not."""
    return sorted(set(globals()) | set(__all__))


def _is_submodule(name: str) -> bool:
    """Whether *name* is a module or regular package inside this package."""
    if not name.isidentifier() or name.startswith("__"):
        return False
    spec = importlib.util.find_spec(f"{__name__}.{name}")
    return spec is not None and spec.origin is not None  # not a data folder
