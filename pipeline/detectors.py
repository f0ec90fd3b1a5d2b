"""Stage 4: quality detectors that raise flags, vectorised and run in parallel.

A *detector* looks at one partition of the snip table (a pandas DataFrame that
holds whole videos, hence whole embryos; see :mod:`pipeline.snips`) and returns
its *hits*: one row per entity it flags, with the flag value, a severity, notes
(the measured figure against the threshold) and a confidence.
:func:`run_detectors` lifts detectors onto Dask and returns a lazy flag change
set (:data:`pipeline.schema.FLAG_CHANGE_COLUMNS`) that
:func:`pipeline.merge.merge_into_store` writes into the store, with the author
``auto:<detector name>`` and ``auto_generated: true``.

Two kinds of detectors:

- **Partition-local** (levels ``snip``, ``image``, ``embryo``, ``video``):
  ``detector(part) -> hits``, run inside ``map_partitions``. No embryo or
  video spans two partitions, so their result does not depend on
  ``npartitions``.
- **Reducing** (any level, needed for ``experiment``: an experiment may span
  partitions): ``detector.partial(part)`` returns additive per-key figures
  (indexed by ``detector.key``, e.g. ``experiment_id``), Dask sums them across
  partitions and ``detector.finish(totals) -> hits`` decides.

Built-ins (parameters and defaults in each class's docstring, or
``embryo-pipeline detectors``):

==========================  ==========  ==================  =========================
detector                    level       flag                flags when
==========================  ==========  ==================  =========================
``HighlyVariableMask``      snip        HIGHLY_VAR_MASK     area far from rolling median
``LowMaskConfidence``       snip        LOW_CONFIDENCE      ``mask_confidence`` low
``LowPhenotypeConfidence``  snip        LOW_CONFIDENCE      ``phenotype_confidence`` low
``FrameGap``                snip        FRAME_GAP           frames missing just before
``ShortTrack``              embryo      SHORT_TRACK         fewer than ``min_snips``
``MissingGenotype``         embryo      MISSING_GENOTYPE    no genotype
``NoEmbryo``                video       NO_EMBRYO           no snips, or all flagged
``IncompleteExperiment``    experiment  INCOMPLETE          few videos, many short tracks
==========================  ==========  ==================  =========================

``LowMaskConfidence`` and ``LowPhenotypeConfidence`` share ``LOW_CONFIDENCE``: a
snip keeps one flag per value, so when both hit the same snip in one run the
later detector in the list owns the flag (author, notes). Re-runs stay correct
because ``--replace`` works by author: it clears only the flags whose author is
``auto:<that detector>`` and that it no longer raises, never a flag the other
detector owns, and a flag still raised by either detector is re-raised.

Detectors written by users live in a Python file loaded by
:func:`load_detectors_file`: every :class:`Detector` instance or class defined
there, and plain functions in the earlier tool's style
``func(entity_id, entity_data, **params) -> dict | None`` (run once per entity
inside the partitions: correct, parallel across processes, but much slower than
a vectorised detector).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import cloudpickle
import numpy as np
import pandas as pd

from pipeline._arrow import repeated
from pipeline._partitions import map_parts
from pipeline.errors import PipelineError
from pipeline.schema import (
    DEFAULT_VOCABULARY,
    FLAG_CHANGE_COLUMNS,
    LEVELS,
    SNIP_COLUMNS,
    SNIP_INDEX,
    STRING,
    empty_frame,
)

if TYPE_CHECKING:
    import dask.dataframe as dd

    from pipeline.store import Store

__all__ = [
    "Detector",
    "ReducingDetector",
    "BaseDetector",
    "HIT_COLUMNS",
    "DetectorError",
    "HighlyVariableMask",
    "LowMaskConfidence",
    "LowPhenotypeConfidence",
    "FrameGap",
    "ShortTrack",
    "MissingGenotype",
    "NoEmbryo",
    "IncompleteExperiment",
    "BUILTINS",
    "FunctionDetector",
    "FileDetector",
    "run_detectors",
    "run_detectors_partition",
    "load_detectors_file",
    "parse_detector_spec",
    "make_detector",
    "describe_detector",
    "author_of",
]

#: Columns a detector's hits may carry; only ``entity_id`` is required, the
#: others default to the detector's flag value and severity, no notes and no
#: confidence.
HIT_COLUMNS: dict[str, Any] = {
    "entity_id": STRING,
    "flag": STRING,
    "severity": STRING,
    "notes": STRING,
    "confidence": np.dtype("float64"),
}

#: The column holding each level's entity id (``None``: the index, ``snip_id``).
ENTITY_COLUMNS: dict[str, str | None] = {
    "snip": None,
    "image": "image_id",
    "embryo": "embryo_id",
    "video": "video_id",
    "experiment": "experiment_id",
}

_FLAG_META = empty_frame(FLAG_CHANGE_COLUMNS)


class DetectorError(PipelineError, ValueError):
    """A detector cannot run: bad parameters, missing columns or bad hits.

    Parameters
    ----------
    message : str
        What is wrong, naming the detector, and how to fix it.
    detector : str, optional
        The detector's name.
    """

    def __init__(self, message: str, *, detector: str | None = None) -> None:
        super().__init__(message)
        self.detector = detector

    def _context(self) -> dict[str, Any]:
        return {"detector": self.detector}


# ----------------------------------------------------------------- protocol
@runtime_checkable
class Detector(Protocol):
    """What every detector provides (built-in, user class or wrapped function).

    Attributes
    ----------
    name : str
        Names the detector in reports and in the flag's author
        ``auto:<name>``; unique within one run.
    level : str
        One of ``snip``, ``image``, ``embryo``, ``video``, ``experiment``.
    value : str or None
        The flag value it raises, one the vocabulary permits at *level*;
        ``None`` when its hits carry a ``flag`` column.
    required_columns : tuple of str
        Snip-table columns it reads; checked before anything runs.

    Notes
    -----
    ``detector(part)`` takes one partition of the snip table (pandas, index
    ``snip_id``, whole videos) and returns the hits as a pandas DataFrame with
    an ``entity_id`` column (snip, image, embryo, video or experiment id by
    *level*) and optionally the other :data:`HIT_COLUMNS`. ``params()`` returns
    the parameters as a dict. Define detectors as top-level classes with plain
    attributes (no lambdas or closures) so they pickle to worker processes.
    """

    name: str
    level: str
    value: str | None
    required_columns: tuple[str, ...]

    def params(self) -> dict[str, Any]:
        """Return the detector's parameters."""
        ...

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits of one partition."""
        ...


@runtime_checkable
class ReducingDetector(Detector, Protocol):
    """A detector whose entities may span partitions (e.g. experiments).

    Attributes
    ----------
    key : str
        Column the partial figures are keyed by; the hits' entity ids are
        values of this column (e.g. ``experiment_id``).
    partial_dtypes : mapping of str to dtype
        Columns and dtypes of :meth:`partial`'s result (numbers: they are summed).

    Notes
    -----
    ``partial(part)`` returns figures indexed by *key* that add up across
    partitions (counts, sums); :func:`run_detectors` sums them per key with Dask
    and passes the totals to ``finish(totals) -> hits``. Keys seen in a
    partition where ``partial`` failed are left out of the totals and hits.
    """

    key: str
    partial_dtypes: Mapping[str, Any]

    def partial(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return additive per-key figures of one partition."""
        ...

    def finish(self, totals: pd.DataFrame) -> pd.DataFrame:
        """Return the hits, given the per-key totals over all partitions."""
        ...


def _is_reducing(detector: Any) -> bool:
    return callable(getattr(detector, "partial", None)) and callable(
        getattr(detector, "finish", None)
    )


def author_of(detector: Detector | str) -> str:
    """The author a detector's flags carry: ``auto:<name>``.

    Parameters
    ----------
    detector : Detector or str
        A detector or its name.

    Returns
    -------
    str

    Examples
    --------
    >>> author_of(ShortTrack())
    'auto:ShortTrack'
    """
    name = detector if isinstance(detector, str) else detector.name
    return f"auto:{name}"


# ------------------------------------------------------------- base class
class BaseDetector:
    """Convenient base for detectors written as frozen dataclasses.

    Subclasses set the class attributes ``level``, ``value`` and
    ``required_columns`` and declare their parameters as dataclass fields
    (``severity`` among them); ``name`` defaults to the class name. The base
    checks the flag value, severity and parameters on construction, and offers
    :meth:`params` and :meth:`hits`.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> from pipeline.testing import make_store
    >>> @dataclass(frozen=True)
    ... class Tiny(BaseDetector):
    ...     level = "snip"
    ...     value = "OUT_OF_FOCUS"
    ...     required_columns = ("length_um",)
    ...     min_length: float = 500.0
    ...     severity: str = "warning"
    ...     def __call__(self, part):
    ...         bad = part["length_um"] < self.min_length
    ...         return self.hits(part.index[bad])
    >>> table = make_store(n_embryos=2, n_frames=3).snip_table()
    >>> hits = Tiny(min_length=1e9)(table)
    >>> list(hits.columns), len(hits) == len(table)
    (['entity_id', 'flag', 'severity', 'notes', 'confidence'], True)
    """

    name: ClassVar[str] = "BaseDetector"
    level: ClassVar[str] = "snip"
    value: ClassVar[str | None] = None
    required_columns: ClassVar[tuple[str, ...]] = ()
    output_dtypes: ClassVar[Mapping[str, Any]] = HIT_COLUMNS
    severity: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __post_init__(self) -> None:
        check_flag(self.name, self.level, self.value)
        severity = getattr(self, "severity", "warning")
        if severity not in DEFAULT_VOCABULARY["severity_levels"]:
            msg = f"{self.name}: severity {severity!r} is not one of {', '.join(DEFAULT_VOCABULARY['severity_levels'])}"
            raise DetectorError(msg, detector=self.name)
        self.check()

    def check(self) -> None:
        """Check the parameters; raise :class:`DetectorError` saying what to fix."""

    def params(self) -> dict[str, Any]:
        """The detector's parameters, by name.

        Returns
        -------
        dict
        """
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def _positive(self, **values: float) -> None:
        for key, v in values.items():
            if not (
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and v > 0
                and math.isfinite(v)
            ):
                msg = (
                    f"{self.name}: parameter {key} must be a positive number, got {v!r}"
                )
                raise DetectorError(msg, detector=self.name)

    def hits(
        self,
        entity_ids: Any,
        notes: Any = None,
        confidence: Any = None,
    ) -> pd.DataFrame:
        """Build a hits frame with this detector's flag value and severity.

        Parameters
        ----------
        entity_ids : array-like of str
            The flagged entities.
        notes : array-like of str, optional
            One note per entity.
        confidence : array-like of float, optional
            One confidence per entity, within [0, 1].

        Returns
        -------
        pandas.DataFrame
            Columns of :data:`HIT_COLUMNS`.
        """
        ids = pd.array(np.asarray(entity_ids, dtype=object), dtype=STRING)
        n = len(ids)
        return pd.DataFrame(
            {
                "entity_id": ids,
                "flag": pd.array([self.value] * n, dtype=STRING),
                "severity": pd.array(
                    [getattr(self, "severity", "warning")] * n, dtype=STRING
                ),
                "notes": pd.array(
                    [None] * n if notes is None else list(notes), dtype=STRING
                ),
                "confidence": np.full(n, np.nan)
                if confidence is None
                else np.asarray(confidence, dtype=np.float64),
            }
        )


def check_flag(
    name: str,
    level: str,
    value: str | None,
    vocabulary: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`DetectorError` unless *value* is a flag permitted at *level*.

    Parameters
    ----------
    name : str
        The detector, for the message.
    level : str
        The level.
    value : str or None
        The flag value (``None``: the hits carry it; not checked here).
    vocabulary : mapping, optional
        A store's vocabulary; default :data:`pipeline.schema.DEFAULT_VOCABULARY`.
    """
    vocab = vocabulary or DEFAULT_VOCABULARY
    if level not in LEVELS:
        msg = f"{name}: level {level!r} is not one of {', '.join(LEVELS)}"
        raise DetectorError(msg, detector=name)
    permitted = vocab["flags"].get(level, [])
    if value is not None and value not in permitted:
        msg = f"{name}: flag {value!r} is not permitted at level {level!r}; permitted: {', '.join(permitted)}"
        raise DetectorError(msg, detector=name)


# --------------------------------------------------------------- helpers
def _embryo_order(part: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Positions that sort *part* by embryo then frame, and the sorted embryo codes."""
    codes, _ = pd.factorize(part["embryo_id"], sort=False)
    frame = part["frame"].to_numpy()
    # Snip ids usually sort by frame within an embryo already; skip the sort then.
    same = codes[1:] == codes[:-1]
    if np.all(codes[1:] >= codes[:-1]) and np.all(frame[1:][same] > frame[:-1][same]):
        order = np.arange(len(part))
    else:
        order = np.lexsort((frame, codes))
    return order, codes[order]


def _first_per_group(codes: np.ndarray) -> np.ndarray:
    """Position of the first row of each run of equal codes."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])


def _rolling_median(values: np.ndarray, groups: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling median within runs of equal *groups*, missing values ignored.

    Examples
    --------
    >>> _rolling_median(np.array([1.0, 9.0, 3.0, 4.0, 100.0]), np.array([0, 0, 0, 1, 1]), 3)
    array([ 5.,  3.,  6., 52., 52.])
    """
    n = len(values)
    if n == 0:
        return np.zeros(0)
    half = window // 2
    idx = np.arange(n)[:, None] + np.arange(-half, window - half)[None, :]
    inside = (idx >= 0) & (idx < n)
    idx = np.clip(idx, 0, n - 1)
    inside &= groups[idx] == groups[:, None]
    win = np.where(inside, values[idx], np.nan)
    win.sort(axis=1)  # missing values sort last
    count = np.count_nonzero(~np.isnan(win), axis=1)
    lo = np.take_along_axis(win, np.maximum(count - 1, 0)[:, None] // 2, axis=1)[:, 0]
    hi = np.take_along_axis(win, (count // 2)[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, (lo + hi) / 2, np.nan)


def _margin_confidence(distance: np.ndarray, threshold: float) -> np.ndarray:
    """0.5 just past the threshold, rising to 1 at twice its size past it."""
    return np.clip(0.5 + 0.5 * np.abs(distance) / abs(threshold), 0.5, 1.0).round(3)


# --------------------------------------------------------------- built-ins
@dataclass(frozen=True)
class HighlyVariableMask(BaseDetector):
    """Snips whose mask area jumps away from the embryo's rolling median.

    The relative change ``|area - median| / median`` is computed against the
    median of a centred window of *window* snips of the same embryo (in frame
    order, the snip itself included, fewer at the ends of a track).

    Parameters
    ----------
    threshold : float, default 0.3
        Flag when the relative change is above this.
    window : int, default 5
        Width of the centred window, in snips (odd, at least 3).
    column : str, default "area_um2"
        The measurement to follow.
    severity : str, default "warning"
        Severity of the flag.

    Examples
    --------
    >>> HighlyVariableMask(threshold=0.5).value
    'HIGHLY_VAR_MASK'
    """

    level = "snip"
    value = "HIGHLY_VAR_MASK"

    threshold: float = 0.3
    window: int = 5
    column: str = "area_um2"
    severity: str = "warning"

    @property
    def required_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        """The snip-table columns read."""
        return ("embryo_id", "frame", self.column)

    def check(self) -> None:
        """Check the parameters."""
        self._positive(threshold=self.threshold)
        if not isinstance(self.window, int) or self.window < 3 or self.window % 2 == 0:
            msg = f"{self.name}: window must be an odd integer of at least 3, got {self.window!r}"
            raise DetectorError(msg, detector=self.name)

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits of one partition."""
        order, groups = _embryo_order(part)
        x = part[self.column].to_numpy(dtype=np.float64, na_value=np.nan)[order]
        median = _rolling_median(x, groups, self.window)
        with np.errstate(invalid="ignore", divide="ignore"):
            change = np.abs(x - median) / median
        hit = np.flatnonzero(change > self.threshold)
        rows = order[hit]
        notes = [
            f"{self.column} {a:.1f} vs rolling median {m:.1f}: relative change {c:.2f} > {self.threshold}"
            for a, m, c in zip(
                x[hit].tolist(), median[hit].tolist(), change[hit].tolist(), strict=True
            )
        ]
        return self.hits(
            part.index[rows],
            notes,
            _margin_confidence(change[hit] - self.threshold, self.threshold),
        )


@dataclass(frozen=True)
class _BelowThreshold(BaseDetector):
    """Snips whose *column* is below a threshold (missing values never flag)."""

    level = "snip"
    value = "LOW_CONFIDENCE"
    column: ClassVar[str] = ""

    threshold: float = 0.5
    severity: str = "warning"

    @property
    def required_columns(self) -> tuple[str, ...]:  # type: ignore[override]
        """The snip-table columns read."""
        return (self.column,)

    def check(self) -> None:
        """Check the parameters."""
        self._positive(threshold=self.threshold)

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits of one partition."""
        x = part[self.column].to_numpy(dtype=np.float64, na_value=np.nan)
        hit = np.flatnonzero(x < self.threshold)
        notes = [f"{self.column} {v:.3f} < {self.threshold}" for v in x[hit].tolist()]
        return self.hits(
            part.index[hit],
            notes,
            _margin_confidence(self.threshold - x[hit], self.threshold),
        )


@dataclass(frozen=True)
class LowMaskConfidence(_BelowThreshold):
    """Snips whose segmentation mask has a low confidence.

    Parameters
    ----------
    threshold : float, default 0.5
        Flag when ``mask_confidence`` is below this (missing values never flag).
    severity : str, default "warning"
        Severity of the flag.
    """

    column = "mask_confidence"


@dataclass(frozen=True)
class LowPhenotypeConfidence(_BelowThreshold):
    """Snips whose phenotype call has a low confidence.

    Parameters
    ----------
    threshold : float, default 0.5
        Flag when ``phenotype_confidence`` is below this (phenotypes recorded
        without a confidence never flag).
    severity : str, default "info"
        Severity of the flag.
    """

    column = "phenotype_confidence"
    severity: str = "info"


@dataclass(frozen=True)
class FrameGap(BaseDetector):
    """Snips just after missing frames of their embryo's track.

    A snip is flagged when its frame minus the embryo's previous frame is more
    than 1, i.e. at least one frame is missing just before it.

    Parameters
    ----------
    min_missing : int, default 1
        Flag only when at least this many frames are missing.
    severity : str, default "info"
        Severity of the flag.
    """

    level = "snip"
    value = "FRAME_GAP"
    required_columns = ("embryo_id", "frame")

    min_missing: int = 1
    severity: str = "info"

    def check(self) -> None:
        """Check the parameters."""
        self._positive(min_missing=self.min_missing)

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits of one partition."""
        order, groups = _embryo_order(part)
        frame = part["frame"].to_numpy()[order]
        step = np.diff(frame, prepend=frame[:1])
        same = (
            np.r_[False, groups[1:] == groups[:-1]]
            if len(groups)
            else np.zeros(0, dtype=bool)
        )
        hit = np.flatnonzero(same & (step - 1 >= self.min_missing))
        notes = [
            f"{s - 1} frame(s) missing before frame {f} (previous frame {f - s})"
            for s, f in zip(step[hit].tolist(), frame[hit].tolist(), strict=True)
        ]
        return self.hits(part.index[order[hit]], notes, np.ones(len(hit)))


@dataclass(frozen=True)
class ShortTrack(BaseDetector):
    """Embryos tracked over too few snips.

    Parameters
    ----------
    min_snips : int, default 10
        Flag embryos with fewer snips than this.
    severity : str, default "warning"
        Severity of the flag.
    """

    level = "embryo"
    value = "SHORT_TRACK"
    required_columns = ("embryo_id",)

    min_snips: int = 10
    severity: str = "warning"

    def check(self) -> None:
        """Check the parameters."""
        self._positive(min_snips=self.min_snips)

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits of one partition."""
        codes, embryos = pd.factorize(part["embryo_id"], sort=False)
        counts = np.bincount(codes, minlength=len(embryos))
        hit = np.flatnonzero(counts < self.min_snips)
        notes = [f"{n} snips < {self.min_snips}" for n in counts[hit].tolist()]
        return self.hits(
            np.asarray(embryos, dtype=object)[hit], notes, np.ones(len(hit))
        )


@dataclass(frozen=True)
class MissingGenotype(BaseDetector):
    """Embryos without a genotype.

    Parameters
    ----------
    include_tbd : bool, default False
        Also flag embryos whose genotype is ``TBD`` (to be determined).
    severity : str, default "warning"
        Severity of the flag.
    """

    level = "embryo"
    value = "MISSING_GENOTYPE"
    required_columns = ("embryo_id", "genotype")

    include_tbd: bool = False
    severity: str = "warning"

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits of one partition."""
        codes, _ = pd.factorize(part["embryo_id"], sort=False)
        first = part.iloc[_first_per_group(codes)]
        genotype = first["genotype"]
        missing = genotype.isna().to_numpy(dtype=bool)
        if self.include_tbd:
            missing |= (genotype == "TBD").fillna(False).to_numpy(dtype=bool)
        chosen = first.loc[missing]
        notes = [
            "genotype TBD" if g == "TBD" else "no genotype recorded"
            for g in chosen["genotype"].fillna("").tolist()
        ]
        return self.hits(
            chosen["embryo_id"].to_numpy(dtype=object), notes, np.ones(len(chosen))
        )


@dataclass(frozen=True)
class NoEmbryo(BaseDetector):
    """Videos with no usable embryo: no snips at all, or all snips flagged.

    A video with no snips never appears in the snip table, so this detector
    needs the videos the store lists (its ``flags.video`` keys and the videos
    of its embryos, including embryos without snips): :func:`run_detectors`
    fills *video_ids* from its ``store`` argument (the ``detect`` command always
    passes it); without a store only the all-flagged rule applies.

    Parameters
    ----------
    all_flagged : bool, default True
        Also flag videos whose snips all carry at least one flag in the store.
    severity : str, default "error"
        Severity of the flag.
    video_ids : tuple of str, default ()
        The videos the store lists (set from the store, not on the command line).
    """

    level = "video"
    value = "NO_EMBRYO"
    required_columns = ("video_id", "n_flags")
    key: ClassVar[str] = "video_id"
    partial_dtypes: ClassVar[Mapping[str, Any]] = {
        "n_snips": np.dtype("int64"),
        "n_flagged": np.dtype("int64"),
    }

    all_flagged: bool = True
    severity: str = "error"
    video_ids: tuple[str, ...] = ()

    def with_store(self, store: Store) -> NoEmbryo:
        """Return a copy with *video_ids* taken from *store* (unless already set).

        Parameters
        ----------
        store : Store
            The store the snips come from.

        Returns
        -------
        NoEmbryo
        """
        return (
            self
            if self.video_ids
            else dataclasses.replace(self, video_ids=store.video_ids())
        )

    def partial(self, part: pd.DataFrame) -> pd.DataFrame:
        """Snips and flagged snips per video of one partition."""
        flagged = (part["n_flags"].to_numpy() > 0).astype(np.int64)
        grouped = pd.DataFrame(
            {
                "video_id": part["video_id"],
                "n_snips": np.ones(len(part), np.int64),
                "n_flagged": flagged,
            }
        )
        return grouped.groupby("video_id", sort=True).sum()

    def finish(self, totals: pd.DataFrame) -> pd.DataFrame:
        """Videos with no snips or all snips flagged."""
        index = totals.index.union(
            pd.Index(list(self.video_ids), dtype=totals.index.dtype)
        )
        totals = totals.reindex(index, fill_value=0)
        n, flagged = totals["n_snips"].to_numpy(), totals["n_flagged"].to_numpy()
        empty = n == 0
        hit = empty | ((flagged == n) & self.all_flagged)
        notes = [
            "no snips (listed in the store)" if e else f"all {k} snips flagged"
            for e, k in zip(empty[hit].tolist(), n[hit].tolist(), strict=True)
        ]
        return self.hits(totals.index[hit], notes, np.ones(int(hit.sum())))

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits when *part* is the whole snip table."""
        return self.finish(self.partial(part))


@dataclass(frozen=True)
class IncompleteExperiment(BaseDetector):
    """Experiments with fewer videos than a plate's wells, or many short tracks.

    An experiment may span partitions: per-partition counts are summed with
    Dask before deciding.

    Parameters
    ----------
    plate_wells : int, default 96
        Flag experiments with fewer videos (wells with snips) than this.
    min_snips : int, default 10
        A track with fewer snips than this is short.
    max_short_fraction : float, default 0.5
        Flag experiments where more than this share of the embryos have short
        tracks.
    severity : str, default "warning"
        Severity of the flag.
    """

    level = "experiment"
    value = "INCOMPLETE"
    required_columns = ("experiment_id", "video_id", "embryo_id")
    key: ClassVar[str] = "experiment_id"
    partial_dtypes: ClassVar[Mapping[str, Any]] = {
        "n_videos": np.dtype("int64"),
        "n_embryos": np.dtype("int64"),
        "n_short": np.dtype("int64"),
    }

    plate_wells: int = 96
    min_snips: int = 10
    max_short_fraction: float = 0.5
    severity: str = "warning"

    def check(self) -> None:
        """Check the parameters."""
        self._positive(plate_wells=self.plate_wells, min_snips=self.min_snips)
        if not 0 <= self.max_short_fraction <= 1:
            msg = f"{self.name}: max_short_fraction must be within [0, 1], got {self.max_short_fraction!r}"
            raise DetectorError(msg, detector=self.name)

    def partial(self, part: pd.DataFrame) -> pd.DataFrame:
        """Videos, embryos and short tracks per experiment of one partition."""
        # Videos and embryos never span partitions, so these counts add up.
        # Rows are grouped by embryo (hence video and experiment): work on runs.
        embryo, _ = pd.factorize(part["embryo_id"], sort=False)
        first = _first_per_group(embryo)
        sizes = np.bincount(embryo)[embryo[first]] if len(first) else first
        heads = part.iloc[first]
        video, _ = pd.factorize(heads["video_id"], sort=False)
        new_video = (
            np.r_[True, video[1:] != video[:-1]] if len(video) else video.astype(bool)
        )
        per_embryo = pd.DataFrame(
            {
                "experiment_id": heads["experiment_id"].to_numpy(dtype=object),
                "n_videos": new_video.astype(np.int64),
                "n_embryos": np.ones(len(first), dtype=np.int64),
                "n_short": (sizes < self.min_snips).astype(np.int64),
            }
        )
        out = per_embryo.groupby("experiment_id", sort=True).sum()
        return out.astype(dict(self.partial_dtypes))

    def finish(self, totals: pd.DataFrame) -> pd.DataFrame:
        """Experiments with too few videos or too many short tracks."""
        videos = totals["n_videos"].to_numpy()
        short = totals["n_short"].to_numpy() / np.maximum(
            totals["n_embryos"].to_numpy(), 1
        )
        few, many = videos < self.plate_wells, short > self.max_short_fraction
        hit = np.flatnonzero(few | many)
        notes = []
        for i in hit.tolist():
            why = []
            if few[i]:
                why.append(f"{videos[i]} videos < {self.plate_wells} wells")
            if many[i]:
                why.append(
                    f"{short[i]:.2f} of tracks short (< {self.min_snips} snips) > {self.max_short_fraction}"
                )
            notes.append("; ".join(why))
        return self.hits(totals.index[hit], notes, np.ones(len(hit)))

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Return the hits when *part* is the whole snip table."""
        return self.finish(self.partial(part))


#: The built-in detectors by name, in the order ``embryo-pipeline detectors`` lists them.
BUILTINS: dict[str, type[BaseDetector]] = {
    cls.name: cls
    for cls in (
        HighlyVariableMask,
        LowMaskConfidence,
        LowPhenotypeConfidence,
        FrameGap,
        ShortTrack,
        MissingGenotype,
        NoEmbryo,
        IncompleteExperiment,
    )
}


# ----------------------------------------------------- user-written detectors
class FunctionDetector:
    """A detector in the earlier tool's style: one Python call per entity.

    ``func(entity_id, entity_data, **params) -> dict | None`` is called once per
    entity of *level* inside the partitions (in parallel across processes, but
    one Python call per entity: expect it to be 100x slower than a vectorised
    detector). *entity_data* is a dict of the snip's columns for level
    ``snip``, and a pandas DataFrame of the entity's snips otherwise. The
    returned dict may hold ``value`` (or ``flag``), ``severity``, ``notes`` and
    ``confidence``; ``None`` or an empty dict means no hit.

    Parameters
    ----------
    func : callable
        The function; its keyword parameters with defaults are the detector's
        parameters. It may carry the attributes ``level``, ``value`` and
        ``severity`` to set the defaults below.
    level : str, optional
        ``snip``, ``image``, ``embryo`` or ``video`` (experiments span
        partitions: write a reducing detector instead); default
        ``func.level`` or ``"snip"``.
    value : str, optional
        The flag value when the returned dict has none; default ``func.value``.
    severity : str, optional
        Severity when the returned dict has none; default ``func.severity`` or
        ``"warning"``.
    params : dict, optional
        Values for the function's keyword parameters.
    name : str, optional
        Default ``func.__name__``.
    """

    required_columns: tuple[str, ...] = ()

    def __init__(
        self,
        func: Callable[..., dict[str, Any] | None],
        level: str | None = None,
        value: str | None = None,
        severity: str | None = None,
        params: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        self.func = func
        self.name = name or func.__name__
        self.level = level or getattr(func, "level", "snip")
        self.value = value or getattr(func, "value", None)
        self.severity = severity or getattr(func, "severity", "warning")
        defaults = _function_defaults(func)
        unknown = sorted(set(params or {}) - set(defaults))
        if unknown:
            msg = f"{self.name}: unknown parameter(s) {', '.join(unknown)}; parameters: {', '.join(defaults) or '(none)'}"
            raise DetectorError(msg, detector=self.name)
        self._params = {**defaults, **dict(params or {})}
        if self.level == "experiment":
            msg = (
                f"{self.name}: a per-entity function cannot run at level 'experiment' (an experiment may "
                "span partitions); write a detector class with partial() and finish() instead"
            )
            raise DetectorError(msg, detector=self.name)
        check_flag(self.name, self.level, self.value)

    def __repr__(self) -> str:
        return f"FunctionDetector({self.name}, level={self.level!r}, value={self.value!r}, params={self._params!r})"

    def params(self) -> dict[str, Any]:
        """The function's keyword parameters and their values."""
        return dict(self._params)

    def with_params(self, **params: Any) -> FunctionDetector:
        """A copy with other parameter values."""
        return FunctionDetector(
            self.func,
            self.level,
            self.value,
            self.severity,
            {**self._params, **params},
            self.name,
        )

    def __getstate__(self) -> dict[str, Any]:
        # The function may live in a file that workers cannot import: pickle it
        # by value when its module was registered so (see load_detectors_file).
        state = dict(self.__dict__)
        state["func"] = cloudpickle.dumps(self.func)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["func"] = cloudpickle.loads(state["func"])
        self.__dict__.update(state)

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Call the function once per entity of the partition; return the hits."""
        column = ENTITY_COLUMNS[self.level]
        results: list[tuple[Any, Any]] = []
        if column is None:
            for sid, row in zip(
                part.index.tolist(), part.to_dict("records"), strict=True
            ):
                results.append((sid, self.func(sid, row, **self._params)))
        else:
            for eid, group in part.groupby(column, sort=False, observed=True):
                results.append((eid, self.func(eid, group, **self._params)))
        ids, flags, severities, notes, confidences = [], [], [], [], []
        for eid, out in results:
            if not out:
                continue
            if not isinstance(out, Mapping):
                msg = f"returned {type(out).__name__} for {eid!r}; expected a dict or None"
                raise TypeError(msg)
            ids.append(eid)
            flags.append(out.get("value", out.get("flag", self.value)))
            severities.append(out.get("severity", self.severity))
            notes.append(None if out.get("notes") is None else str(out["notes"]))
            conf = out.get("confidence")
            confidences.append(np.nan if conf is None else float(conf))
        return pd.DataFrame(
            {
                "entity_id": pd.array(ids, dtype=STRING),
                "flag": pd.array(flags, dtype=STRING),
                "severity": pd.array(severities, dtype=STRING),
                "notes": pd.array(notes, dtype=STRING),
                "confidence": np.asarray(confidences, dtype=np.float64),
            }
        )


def _function_defaults(func: Callable[..., Any]) -> dict[str, Any]:
    params = list(inspect.signature(func).parameters.values())[2:]
    return {
        p.name: p.default for p in params if p.default is not inspect.Parameter.empty
    }


def _is_legacy_function(obj: Any) -> bool:
    if not inspect.isfunction(obj) or obj.__name__.startswith("_"):
        return False
    params = list(inspect.signature(obj).parameters.values())
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
    return (
        len(params) >= 2
        and params[0].name == "entity_id"
        and all(p.kind in positional for p in params[:2])
    )


class FileDetector:
    """A detector defined in a user's file, pickled by value for the workers.

    Worker processes cannot import a file loaded by path, so this wrapper
    sends the detector (its class and functions included) by value with
    cloudpickle. Every other attribute is the wrapped detector's.

    Parameters
    ----------
    detector : Detector
        The detector (an instance of a class from the file, or a
        :class:`FunctionDetector`).
    source : str
        The file it came from, for messages.
    """

    def __init__(self, detector: Any, source: str) -> None:
        self.__dict__["detector"] = detector
        self.__dict__["source"] = source

    def __getattr__(self, attr: str) -> Any:
        if "detector" not in self.__dict__:
            raise AttributeError(attr)
        return getattr(self.__dict__["detector"], attr)

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        """Run the wrapped detector."""
        return self.__dict__["detector"](part)

    def __repr__(self) -> str:
        return f"FileDetector({self.__dict__['detector']!r}, source={self.__dict__['source']!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _load_file_detector,
            (cloudpickle.dumps(self.__dict__["detector"]), self.__dict__["source"]),
        )


def _load_file_detector(payload: bytes, source: str) -> FileDetector:
    return FileDetector(cloudpickle.loads(payload), source)


def _module_name(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    return f"pipeline_user_detectors_{stem}_{digest}"


def load_detectors_file(path: str | Path) -> dict[str, Any]:
    """Load the detectors a Python file defines.

    Collected, in the file's order: every :class:`Detector` instance; every
    detector class (one with ``level`` and ``__call__``) of which the file
    defines no instance, instantiated with its defaults (a class that needs
    arguments is listed as the class, to be built with parameters from
    ``--detector Name:key=value``); every public function whose first
    parameter is ``entity_id`` (the earlier tool's style), wrapped in a
    :class:`FunctionDetector`.

    Parameters
    ----------
    path : str or pathlib.Path
        The file.

    Returns
    -------
    dict of str to detector or class
        By detector name; instances are wrapped in :class:`FileDetector` so
        they pickle to worker processes.

    Raises
    ------
    FileNotFoundError
        If *path* does not exist.
    DetectorError
        If the file fails to import or defines no detector.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        msg = f"cannot load {str(path)!r} as a Python module; pass a .py file"
        raise DetectorError(msg)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        msg = f"importing detectors file {str(path)!r} failed: {type(err).__name__}: {err}"
        raise DetectorError(msg) from err
    # Workers cannot import this module by name: ship its code by value.
    cloudpickle.register_pickle_by_value(module)
    source = str(path)
    found: dict[str, Any] = {}
    own = [
        (attr, obj)
        for attr, obj in vars(module).items()
        if getattr(obj, "__module__", None) == name
        or getattr(type(obj), "__module__", None) == name
    ]
    instance_types = {
        type(obj)
        for _, obj in own
        if not inspect.isclass(obj) and _looks_like_detector(obj)
    }
    for attr, obj in own:
        if inspect.isclass(obj):
            if (
                not _looks_like_detector(obj)
                or obj in instance_types
                or attr.startswith("_")
            ):
                continue
            try:
                found[
                    obj.name if isinstance(getattr(obj, "name", None), str) else attr
                ] = FileDetector(obj(), source)
            except TypeError:
                found[getattr(obj, "name", attr)] = obj  # needs parameters
        elif _is_legacy_function(obj):
            fd = FunctionDetector(obj)
            found[fd.name] = FileDetector(fd, source)
        elif _looks_like_detector(obj) and not inspect.isfunction(obj):
            found[getattr(obj, "name", attr)] = FileDetector(obj, source)
    if not found:
        msg = (
            f"{str(path)!r} defines no detector: define a class with name, level, value and "
            "__call__(part) (e.g. a BaseDetector dataclass), or a function (entity_id, entity_data, **params)"
        )
        raise DetectorError(msg)
    return found


def _looks_like_detector(obj: Any) -> bool:
    return (
        isinstance(getattr(obj, "level", None), str)
        and callable(obj)
        and hasattr(obj, "value")
        and not inspect.isfunction(obj)
    )


# --------------------------------------------------------------- CLI specs
def parse_detector_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"Name:key=value,key=value"`` into the name and raw parameters.

    Parameters
    ----------
    spec : str
        As given to ``--detector``.

    Returns
    -------
    (str, dict of str to str)

    Raises
    ------
    DetectorError
        If the spec is malformed.

    Examples
    --------
    >>> parse_detector_spec("ShortTrack:min_snips=5")
    ('ShortTrack', {'min_snips': '5'})
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        msg = f"--detector {spec!r}: give a detector name, e.g. 'ShortTrack' or 'ShortTrack:min_snips=5'"
        raise DetectorError(msg)
    params: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            msg = f"--detector {spec!r}: parameter {item!r} is not key=value, e.g. '{name}:threshold=0.2'"
            raise DetectorError(msg, detector=name)
        if key.strip() in params:
            msg = f"--detector {spec!r}: parameter {key.strip()!r} given twice"
            raise DetectorError(msg, detector=name)
        params[key.strip()] = value.strip()
    return name, params


_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _convert(detector: str, key: str, text: str, typ: type) -> Any:
    try:
        if typ is bool:
            low = text.lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError(text)
        if typ is int:
            return int(text)
        if typ is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
    except ValueError:
        hint = "true or false" if typ is bool else f"a finite {typ.__name__}"
        msg = f"{detector}: parameter {key}={text!r} is not {hint}"
        raise DetectorError(msg, detector=detector) from None
    return text


def _param_types(target: Any) -> dict[str, tuple[type | None, Any]]:
    """Settable parameters of a detector class or instance: name -> (type, default)."""
    obj = target.__dict__["detector"] if isinstance(target, FileDetector) else target
    if isinstance(obj, FunctionDetector):
        return {
            k: (type(v) if type(v) in _TYPES.values() else None, v)
            for k, v in obj.params().items()
        }
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            default = (
                getattr(obj, f.name)
                if not inspect.isclass(obj)
                else (f.default if f.default is not dataclasses.MISSING else None)
            )
            typ = (
                _TYPES.get(f.type)
                if isinstance(f.type, str)
                else (f.type if f.type in _TYPES.values() else None)
            )
            if typ is None and type(default) in _TYPES.values():
                typ = type(default)
            out[f.name] = (typ, default)
        return out
    return {}


def make_detector(
    name: str,
    params: Mapping[str, str] | None = None,
    available: Mapping[str, Any] | None = None,
) -> Any:
    """Build a detector by name with parameters given as text (no ``eval``).

    Parameters
    ----------
    name : str
        A built-in (see :data:`BUILTINS`) or a name from *available*.
    params : mapping of str to str, optional
        Raw values, converted to each parameter's type (int, float, bool, str).
    available : mapping, optional
        More detectors, e.g. from :func:`load_detectors_file`; they take
        precedence over built-ins of the same name.

    Returns
    -------
    Detector

    Raises
    ------
    DetectorError
        Unknown detector (with the closest name) or parameter, or a value of
        the wrong type.

    Examples
    --------
    >>> make_detector("ShortTrack", {"min_snips": "5"})
    ShortTrack(min_snips=5, severity='warning')
    """
    registry: dict[str, Any] = {**BUILTINS, **dict(available or {})}
    if name not in registry:
        by_lower = {k.lower(): k for k in registry}
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
        hint = f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
        msg = f"unknown detector {name!r}{hint}; available: {', '.join(registry)} (see `embryo-pipeline detectors`)"
        raise DetectorError(msg, detector=name)
    target = registry[name]
    raw = dict(params or {})
    types = _param_types(target)
    settable = {k: v for k, v in types.items() if v[0] is not None}
    unknown = sorted(set(raw) - set(settable))
    if unknown:
        msg = f"{name}: unknown parameter(s) {', '.join(unknown)}; parameters: {', '.join(settable) or '(none)'}"
        raise DetectorError(msg, detector=name)
    values = {k: _convert(name, k, v, settable[k][0]) for k, v in raw.items()}  # type: ignore[arg-type]
    try:
        if inspect.isclass(target):
            return target(**values)
        inner = (
            target.__dict__["detector"] if isinstance(target, FileDetector) else target
        )
        if not values:
            return target
        if isinstance(inner, FunctionDetector):
            built: Any = inner.with_params(**values)
        else:
            built = dataclasses.replace(inner, **values)
        return (
            FileDetector(built, target.__dict__["source"])
            if isinstance(target, FileDetector)
            else built
        )
    except TypeError as err:
        msg = f"{name}: cannot build it with {values!r}: {err}"
        raise DetectorError(msg, detector=name) from None


def describe_detector(target: Any) -> dict[str, Any]:
    """Name, level, flag, summary and parameters of a detector class or instance.

    Parameters
    ----------
    target : Detector or type
        A built-in class, a user detector or a class from a detectors file.

    Returns
    -------
    dict
        ``name``, ``level``, ``value``, ``summary`` and ``params``: a list of
        ``(name, type name, default, description)``.
    """
    obj = target.__dict__["detector"] if isinstance(target, FileDetector) else target
    doc_source = (
        obj.func
        if isinstance(obj, FunctionDetector)
        else (obj if inspect.isclass(obj) else type(obj))
    )
    doc = inspect.getdoc(doc_source) or ""
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    described = _param_docs(doc)
    params = [
        (k, typ.__name__ if typ else "(not settable)", default, described.get(k, ""))
        for k, (typ, default) in _param_types(target).items()
    ]
    name = getattr(obj, "name", None) or getattr(obj, "__name__", "?")
    return {
        "name": name,
        "level": getattr(obj, "level", "?"),
        "value": getattr(obj, "value", None),
        "summary": summary,
        "params": params,
    }


def _param_docs(doc: str) -> dict[str, str]:
    """Descriptions of the numpydoc ``Parameters`` section of *doc*, by name."""
    lines = doc.splitlines()
    out: dict[str, str] = {}
    inside, current = False, None
    for i, line in enumerate(lines):
        underline = (
            i + 1 < len(lines)
            and lines[i + 1].strip()
            and set(lines[i + 1].strip()) <= {"-"}
        )
        if underline and not line.startswith(" "):
            inside, current = line.strip() == "Parameters", None
            continue
        if not inside or set(line.strip()) <= {"-"}:
            continue
        if line.strip() and not line.startswith(" "):
            for name in line.split(":")[0].split(","):
                out[name.strip()] = ""
            current = line.split(":")[0].split(",")[0].strip()
        elif current is not None and line.strip():
            out[current] = (out[current] + " " + line.strip()).strip()
    return out


# ------------------------------------------------------------------- running
def _span(part: pd.DataFrame) -> str:
    if len(part) == 0:
        return "(empty)..(empty)"
    return f"{part.index[0]}..{part.index[-1]}"


def _failed(name: str, where: str, err: BaseException) -> pd.DataFrame:
    reason = f"{name} failed on partition {where}: {type(err).__name__}: {err}"
    return _change_rows(
        name,
        pd.DataFrame({"entity_id": pd.array([None], dtype=STRING)}),
        "",
        "warning",
        status="failed",
        reason=reason,
    )


def _change_rows(
    name: str,
    hits: pd.DataFrame,
    level: str,
    severity: str,
    value: str | None = None,
    *,
    status: str = "raised",
    reason: str | None = None,
) -> pd.DataFrame:
    n = len(hits)

    def const(text: str | None) -> Any:
        return repeated(text, n)  # built in Arrow, no list of n Python strings

    def col(key: str, default: str | None) -> Any:
        if key not in hits.columns:
            return const(default)
        column = hits[key]
        if column.dtype == STRING:
            return column.array
        return pd.array(column.to_numpy(dtype=object), dtype=STRING)

    return pd.DataFrame(
        {
            "entity_id": col("entity_id", None),
            "level": const(level or None),
            "flag": col("flag", value),
            "severity": col("severity", severity) if status == "raised" else const(None),
            "notes": col("notes", None),
            "confidence": (
                pd.to_numeric(hits["confidence"]).to_numpy(
                    dtype=np.float64, na_value=np.nan
                )
                if "confidence" in hits.columns
                else np.full(n, np.nan)
            ),
            "detector": const(name),
            "author": const(author_of(name)),
            "status": const(status),
            "reason": const(reason),
        }
    )


def _hits_to_changes(
    detector: Any, hits: Any, vocabulary: Mapping[str, Any]
) -> pd.DataFrame:
    """Check a detector's hits and turn them into change-set rows."""
    name = detector.name
    if not isinstance(hits, pd.DataFrame) or "entity_id" not in hits.columns:
        got = (
            type(hits).__name__
            if not isinstance(hits, pd.DataFrame)
            else f"columns {list(hits.columns)}"
        )
        msg = f"returned {got}; expected a pandas DataFrame with an 'entity_id' column (see pipeline.detectors.HIT_COLUMNS)"
        raise DetectorError(msg, detector=name)
    rows = _change_rows(
        name,
        hits,
        detector.level,
        getattr(detector, "severity", "warning"),
        detector.value,
    )
    if rows["entity_id"].isna().any():
        msg = "returned hits with a missing entity_id"
        raise DetectorError(msg, detector=name)
    permitted = set(vocabulary["flags"].get(detector.level, []))
    for key, allowed in (
        ("flag", permitted),
        ("severity", set(vocabulary["severity_levels"])),
    ):
        bad = set(rows[key].dropna().unique().tolist()) - allowed
        if rows[key].isna().any() or bad:
            shown = ", ".join(sorted(map(repr, bad))) or "a missing value"
            msg = f"returned {key} {shown} at level {detector.level!r}; permitted: {', '.join(sorted(allowed))}"
            raise DetectorError(msg, detector=name)
    conf = rows["confidence"].to_numpy()
    if np.any((conf < 0) | (conf > 1)):
        msg = "returned a confidence outside [0, 1]"
        raise DetectorError(msg, detector=name)
    return rows


def _concat(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    pieces = [p for p in pieces if len(p)]
    if not pieces:
        return _FLAG_META.copy()
    out = pieces[0] if len(pieces) == 1 else pd.concat(pieces, ignore_index=True)
    return out.reset_index(drop=True)


def _detect_local(
    part: pd.DataFrame, *, detectors: tuple[Any, ...], vocabulary: Mapping[str, Any]
) -> pd.DataFrame:
    pieces = []
    for detector in detectors:
        try:
            pieces.append(_hits_to_changes(detector, detector(part), vocabulary))
        except Exception as err:  # noqa: BLE001 - any detector bug becomes a "failed" row, the others go on
            pieces.append(_failed(detector.name, _span(part), err))
    return _concat(pieces)


def _partial_meta(detector: Any) -> pd.DataFrame:
    return empty_frame(
        {
            "key": STRING,
            **dict(detector.partial_dtypes),
            "first_snip_id": STRING,
            "last_snip_id": STRING,
            "failure": STRING,
        }
    )


def _detect_partial(part: pd.DataFrame, *, detector: Any) -> pd.DataFrame:
    meta = _partial_meta(detector)
    first, last = (part.index[0], part.index[-1]) if len(part) else (None, None)
    try:
        partial = detector.partial(part)
        out = pd.DataFrame(
            {"key": pd.array(partial.index.to_numpy(dtype=object), dtype=STRING)}
        )
        for col, dtype in detector.partial_dtypes.items():
            out[col] = partial[col].to_numpy().astype(dtype)
        failure = None
    except Exception as err:  # noqa: BLE001 - reported as a "failed" row, see _detect_local
        keys = (
            part[detector.key].dropna().unique() if detector.key in part.columns else []
        )
        out = pd.DataFrame(
            {"key": pd.array(np.asarray(keys, dtype=object), dtype=STRING)}
        )
        for col, dtype in detector.partial_dtypes.items():
            out[col] = np.zeros(len(out), dtype=dtype)
        failure = f"{detector.name} failed on partition {_span(part)}: {type(err).__name__}: {err}"
        if len(out) == 0:
            out = meta.copy()
            out.loc[0, "key"] = None
            out = out.astype(meta.dtypes.to_dict())
    out["first_snip_id"] = pd.array([first] * len(out), dtype=STRING)
    out["last_snip_id"] = pd.array([last] * len(out), dtype=STRING)
    out["failure"] = pd.array([failure] * len(out), dtype=STRING)
    return out


def _detect_finish(
    partials: pd.DataFrame, *, detector: Any, vocabulary: Mapping[str, Any]
) -> pd.DataFrame:
    failed = partials["failure"].notna().to_numpy(dtype=bool)
    pieces = [
        _change_rows(
            detector.name,
            pd.DataFrame({"entity_id": pd.array([None], dtype=STRING)}),
            "",
            "warning",
            status="failed",
            reason=r,
        )
        for r in dict.fromkeys(partials.loc[failed, "failure"].tolist())
    ]
    tainted = set(partials.loc[failed, "key"].dropna().tolist())
    ok = partials.loc[~failed & ~partials["key"].isin(tainted).to_numpy(dtype=bool)]
    columns = list(detector.partial_dtypes)
    totals = ok.groupby("key", sort=True)[columns].sum()
    totals.index.name = detector.key
    try:
        hits = detector.finish(totals)
        changes = _hits_to_changes(detector, hits, vocabulary)
        if tainted:
            changes = changes.loc[
                ~changes["entity_id"].isin(tainted).to_numpy(dtype=bool)
            ]
        pieces.append(changes)
    except Exception as err:  # noqa: BLE001 - reported as a "failed" row, see _detect_local
        spans = partials["first_snip_id"].dropna()
        where = (
            f"{spans.min()}..{partials['last_snip_id'].dropna().max()}"
            if len(spans)
            else "(empty)..(empty)"
        )
        pieces.append(_failed(detector.name, where, err))
    return _concat(pieces)


def _prepare(
    detectors: Iterable[Any],
    columns: Sequence[str],
    store: Store | None,
    vocabulary: Mapping[str, Any],
) -> list[Any]:
    prepared: list[Any] = []
    names: set[str] = set()
    available = set(columns) | {SNIP_INDEX}
    for detector in detectors:
        if inspect.isclass(detector):
            msg = f"{detector.__name__} is a class: pass an instance, e.g. {detector.__name__}()"
            raise DetectorError(msg, detector=detector.__name__)
        missing_attrs = [
            a for a in ("name", "level", "value") if not hasattr(detector, a)
        ]
        if missing_attrs or not callable(detector):
            msg = f"{detector!r} is not a detector: it lacks {', '.join(missing_attrs) or '__call__'} (see pipeline.detectors.Detector)"
            raise DetectorError(msg)
        if store is not None and callable(getattr(detector, "with_store", None)):
            detector = detector.with_store(store)
        name = detector.name
        if name in names:
            msg = f"detector {name!r} given twice; each detector runs once per run (its flags are authored auto:{name})"
            raise DetectorError(msg, detector=name)
        names.add(name)
        check_flag(name, detector.level, detector.value, vocabulary)
        if detector.level == "experiment" and not _is_reducing(detector):
            msg = f"{name}: an experiment may span partitions, so an experiment-level detector needs partial() and finish() (see pipeline.detectors.ReducingDetector)"
            raise DetectorError(msg, detector=name)
        needed = list(getattr(detector, "required_columns", ()) or ())
        entity_col = ENTITY_COLUMNS[detector.level]
        if entity_col and not _is_reducing(detector):
            needed.append(entity_col)
        if _is_reducing(detector):
            needed.append(detector.key)
        missing = [c for c in dict.fromkeys(needed) if c not in available]
        if missing:
            measured = [
                c
                for c in columns
                if c not in FLAG_CHANGE_COLUMNS and c not in _SNIP_OWN
            ]
            msg = (
                f"detector {name} needs column(s) {', '.join(map(repr, missing))}, which the snip table lacks "
                f"(measurement columns present: {', '.join(measured) or 'none'}); add the measurement to the "
                f"store's snips or choose another column (e.g. {name}:column=...)"
            )
            raise DetectorError(msg, detector=name)
        prepared.append(detector)
    if not prepared:
        msg = "no detectors given; pass e.g. [pipeline.detectors.ShortTrack()] (see BUILTINS)"
        raise DetectorError(msg)
    return prepared


_SNIP_OWN = frozenset(SNIP_COLUMNS)


def _vocabulary(store: Store | None) -> dict[str, Any]:
    vocab = store.vocabulary if store is not None else DEFAULT_VOCABULARY
    return {
        "flags": {k: list(v) for k, v in vocab["flags"].items()},
        "severity_levels": list(vocab["severity_levels"]),
    }


def run_detectors(
    snips: dd.DataFrame,
    detectors: Iterable[Any],
    *,
    store: Store | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dd.DataFrame | pd.DataFrame:
    """Run detectors over a snip table; return the flag change set (lazy by default).

    Parameters
    ----------
    snips : dask.dataframe.DataFrame
        From :func:`pipeline.snips_from_store` (whole videos per partition).
    detectors : iterable of Detector
        Instances (built-ins, user classes, :class:`FunctionDetector`); names
        must be unique.
    store : Store, optional
        The store *snips* came from: its vocabulary checks the flag values, and
        detectors with a ``with_store`` method (:class:`NoEmbryo`) take the
        context they need from it.
    progress : callable, optional
        ``progress(done, total)``: compute the change set here, calling it as
        partitions finish, and return it computed. ``total`` is the change
        set's partitions: one per snip partition when any detector works
        partition by partition, plus one per reducing detector (its final
        step); see :func:`pipeline.cluster.compute`. Default: compute nothing.

    Returns
    -------
    dask.dataframe.DataFrame or pandas.DataFrame
        Columns :data:`pipeline.schema.FLAG_CHANGE_COLUMNS`: one row per hit
        (``status`` "raised", ``author`` ``auto:<name>``) and one per detector
        that raised on a partition (``status`` "failed", ``reason``
        ``"<name> failed on partition <first>..<last>: <Type>: <message>"``,
        ``entity_id`` missing). Lazy, nothing computed here, unless
        *progress* is given: then the computed pandas DataFrame.

    Raises
    ------
    DetectorError
        Before anything runs: not a detector, a duplicate name, a flag the
        vocabulary does not permit at the level, or a column the snip table
        lacks (naming the detector and the column).

    Examples
    --------
    >>> from pipeline.testing import make_store
    >>> from pipeline.snips import snips_from_store
    >>> store = make_store(n_experiments=1, n_embryos=4, n_frames=6, seed=0)
    >>> changes = run_detectors(snips_from_store(store, npartitions=2), [ShortTrack(min_snips=100)], store=store)
    >>> flags = changes.compute(scheduler="sync")
    >>> flags[["level", "flag", "author", "status"]].drop_duplicates().to_dict("records")
    [{'level': 'embryo', 'flag': 'SHORT_TRACK', 'author': 'auto:ShortTrack', 'status': 'raised'}]
    >>> len(flags) == store.counts()["embryos"]
    True
    """
    import dask.dataframe as dd

    vocabulary = _vocabulary(store)
    prepared = _prepare(detectors, list(snips.columns), store, vocabulary)
    local = tuple(d for d in prepared if not _is_reducing(d))
    outputs = []
    if local:
        outputs.append(
            map_parts(
                snips,
                _detect_local,
                _FLAG_META,
                stage="detect",
                detectors=local,
                vocabulary=vocabulary,
            )
        )
    for detector in prepared:
        if not _is_reducing(detector):
            continue
        partials = map_parts(
            snips,
            _detect_partial,
            _partial_meta(detector),
            stage="detect",
            detector=detector,
        )
        # Partials are one row per key and partition: gather them in one task.
        outputs.append(
            map_parts(
                partials.repartition(npartitions=1),
                _detect_finish,
                _FLAG_META,
                stage="detect",
                detector=detector,
                vocabulary=vocabulary,
            )
        )
    changes = (
        outputs[0] if len(outputs) == 1 else dd.concat(outputs, ignore_index=True)
    )
    if progress is None:
        return changes
    from pipeline.cluster import compute

    return compute(changes, progress=progress, stage="detect")


def run_detectors_partition(
    part: pd.DataFrame, detectors: Iterable[Any], *, store: Store | None = None
) -> pd.DataFrame:
    """The pandas twin of :func:`run_detectors`, on one partition or a whole table.

    Reducing detectors reduce over *part* alone, so their result equals
    :func:`run_detectors`'s when *part* is the whole snip table (e.g.
    ``store.snip_table()`` or ``snips.get_partition(0).compute()`` to debug).

    Parameters
    ----------
    part : pandas.DataFrame
        Snip rows, whole videos.
    detectors : iterable of Detector
        As for :func:`run_detectors`.
    store : Store, optional
        As for :func:`run_detectors`.

    Returns
    -------
    pandas.DataFrame
        The change set (:data:`pipeline.schema.FLAG_CHANGE_COLUMNS`).

    Examples
    --------
    >>> from pipeline.testing import make_store
    >>> table = make_store(n_experiments=1, n_embryos=4, n_frames=6, seed=0).snip_table()
    >>> flags = run_detectors_partition(table, [ShortTrack(min_snips=100)])
    >>> sorted(flags["entity_id"]) == sorted(table["embryo_id"].unique())
    True
    """
    vocabulary = _vocabulary(store)
    prepared = _prepare(detectors, list(part.columns), store, vocabulary)
    local = tuple(d for d in prepared if not _is_reducing(d))
    pieces = (
        [_detect_local(part, detectors=local, vocabulary=vocabulary)] if local else []
    )
    for detector in prepared:
        if _is_reducing(detector):
            pieces.append(
                _detect_finish(
                    _detect_partial(part, detector=detector),
                    detector=detector,
                    vocabulary=vocabulary,
                )
            )
    return _concat(pieces)
