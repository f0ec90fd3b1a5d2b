"""Column names, dtypes and the default vocabulary: one source of truth.

Every stage of the pipeline builds its frames (and the ``meta`` that Dask needs)
from the definitions here, so a column is named and typed in exactly one place.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "SCHEMA_VERSION",
    "STRING",
    "SNIP_INDEX",
    "SNIP_COLUMNS",
    "RESERVED_COLUMNS",
    "DEFAULT_VOCABULARY",
    "LEVELS",
    "empty_frame",
    "default_vocabulary",
]

SCHEMA_VERSION = 1

#: Arrow-backed strings with ``pd.NA`` for missing values: what Dask itself
#: converts text columns to, so pandas partitions and Dask meta always agree.
STRING = pd.StringDtype("pyarrow")

#: Name of the snip table's index.
SNIP_INDEX = "snip_id"

#: The snip table's own columns, in order, with their dtypes. Measurement
#: columns (``float64``) follow these, sorted by name.
SNIP_COLUMNS: dict[str, Any] = {
    "experiment_id": STRING,
    "video_id": STRING,
    "embryo_id": STRING,
    "image_id": STRING,
    "frame": np.dtype("int64"),
    "frame_index": np.dtype("int64"),
    "n_frames": np.dtype("int64"),
    "phenotype": STRING,
    "phenotype_confidence": np.dtype("float64"),
    "phenotype_author": STRING,
    "phenotype_timestamp": STRING,
    "genotype": STRING,
    "genotype_confirmed": np.dtype("bool"),
    "death_frame": pd.Int64Dtype(),
    "is_dead": np.dtype("bool"),
    "n_flags": np.dtype("int64"),
    "flag_list": STRING,
}

#: Names a measurement key may not take: the table's own columns, its index
#: and the store's own field names.
RESERVED_COLUMNS: frozenset[str] = frozenset(SNIP_COLUMNS) | {
    SNIP_INDEX,
    "phenotype",
    "genotype",
    "treatments",
    "death_frame",
    "flags",
    "measurements",
    "source",
}

#: Entity levels that carry flags, from the finest to the coarsest.
LEVELS: tuple[str, ...] = ("snip", "image", "embryo", "video", "experiment")

#: The vocabulary that applies when a store has no ``permitted_values``.
DEFAULT_VOCABULARY: dict[str, Any] = {
    "phenotypes": {
        "NONE": {"description": "not annotated", "is_default": True},
        "DEAD": {"description": "embryo is dead", "exclusive": True, "terminal": True},
        "NORMAL": {},
        "EDEMA": {},
        "CONVERGENCE_EXTENSION": {},
        "BODY_AXIS": {},
        "HEART_DEFECT": {},
        "TBD": {},
        "BLUR": {},
        "CORRUPT": {},
    },
    "genotypes": ["WT", "TBD", "lmx1b", "tmem67", "sox9a", "cep290", "b9d2", "rpgrip1l", "shh"],
    "zygosity": [
        "homozygous",
        "heterozygous",
        "compound_heterozygous",
        "hemizygous",
        "crispant",
        "morpholino",
    ],
    "flags": {
        "snip": [
            "MOTION_BLUR",
            "OUT_OF_FOCUS",
            "HIGHLY_VAR_MASK",
            "MASK_ON_EDGE",
            "DISCONTINUOUS_MASK",
            "LOW_CONFIDENCE",
            "FRAME_GAP",
        ],
        "image": ["DETECTION_FAILURE", "DARK", "BLUR", "CORRUPT"],
        "embryo": [
            "DEATH_FRAME",
            "DEVELOPMENTAL_DELAY",
            "POOR_QUALITY",
            "MISSING_GENOTYPE",
            "SHORT_TRACK",
        ],
        "video": ["NO_EMBRYO", "NONZERO_SEED_FRAME", "FOCUS_DRIFT", "DRY_WELL"],
        "experiment": ["INCOMPLETE", "PROTOCOL_DEVIATION"],
    },
    "severity_levels": ["info", "warning", "error"],
}


def default_vocabulary() -> dict[str, Any]:
    """Return a fresh copy of the default vocabulary.

    Returns
    -------
    dict
        Same shape as a store's ``permitted_values``.
    """
    return copy.deepcopy(DEFAULT_VOCABULARY)


def empty_frame(columns: dict[str, Any], index: str | None = None) -> pd.DataFrame:
    """Build an empty frame with the given columns and dtypes (a Dask ``meta``).

    Parameters
    ----------
    columns : dict of str to dtype
        Column names and dtypes, in order.
    index : str, optional
        Name of a string index, e.g. ``"snip_id"``.

    Returns
    -------
    pandas.DataFrame
        Zero rows, exactly those columns and dtypes.

    Examples
    --------
    >>> empty_frame({"frame": "int64"}, index="snip_id").dtypes.to_dict()
    {'frame': dtype('int64')}
    """
    data = {name: pd.Series([], dtype=dtype) for name, dtype in columns.items()}
    idx = pd.Index([], dtype=STRING, name=index) if index else pd.RangeIndex(0)
    return pd.DataFrame(data, index=idx)


#: The phenotype change set of :func:`pipeline.assign_phenotypes`: one row per
#: affected snip (``status`` assigned, backfilled, unchanged or skipped), plus one
#: row per failed assignment row (``status`` failed, ``snip_id`` missing).
PHENOTYPE_CHANGE_COLUMNS: dict[str, Any] = {
    "snip_id": STRING,
    "embryo_id": STRING,
    "frame": pd.Int64Dtype(),
    "row": np.dtype("int64"),
    "old_value": STRING,
    "new_value": STRING,
    "status": STRING,
    "reason": STRING,
    "author": STRING,
    "timestamp": STRING,
    "confidence": np.dtype("float64"),
    "notes": STRING,
}

#: The genotype change set of :func:`pipeline.assign_genotypes`: one row per
#: assignment row.
GENOTYPE_CHANGE_COLUMNS: dict[str, Any] = {
    "embryo_id": STRING,
    "row": np.dtype("int64"),
    "old_value": STRING,
    "new_value": STRING,
    "status": STRING,
    "reason": STRING,
    "author": STRING,
    "timestamp": STRING,
    "allele": STRING,
    "zygosity": STRING,
    "confirmed": np.dtype("bool"),
    "confidence": np.dtype("float64"),
    "notes": STRING,
}

#: The flag change set of :func:`pipeline.run_detectors`: one row per hit
#: (``status`` "raised") and one per detector failure on a partition
#: (``status`` "failed", ``reason`` says why, ``entity_id`` is missing).
FLAG_CHANGE_COLUMNS: dict[str, Any] = {
    "entity_id": STRING,
    "level": STRING,
    "flag": STRING,
    "severity": STRING,
    "notes": STRING,
    "confidence": np.dtype("float64"),
    "detector": STRING,
    "author": STRING,
    "status": STRING,
    "reason": STRING,
}

#: The measurement change set of :func:`pipeline.to_changes` with
#: ``kind="measurement"``: one row per (snip, measurement key). ``old_value``
#: is NaN where the snip had no value (key absent or null); ``new_value`` NaN
#: writes null. Measurements carry no author in the store (a flat object of
#: numbers, see the store schema): author and timestamp go to the change log.
MEASUREMENT_CHANGE_COLUMNS: dict[str, Any] = {
    "snip_id": STRING,
    "embryo_id": STRING,
    "column": STRING,
    "old_value": np.dtype("float64"),
    "new_value": np.dtype("float64"),
    "status": STRING,
    "reason": STRING,
    "author": STRING,
    "timestamp": STRING,
}

#: Statuses a change-set row can have.
STATUSES: tuple[str, ...] = ("assigned", "backfilled", "unchanged", "skipped", "failed", "raised", "cleared")
