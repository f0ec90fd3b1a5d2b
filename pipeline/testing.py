"""Synthetic stores and comparison helpers for tests, doctests, notebooks and benchmarks.

:func:`make_store` builds a realistic store, deterministic for a seed: experiment
ids with and without underscores, all three snip suffix styles, one or two
embryos per well, gaps in the frames, dead embryos (DEAD filled forward),
genotypes, treatments, flags at every level and measurements that drift like a
growing embryo's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.schema import SCHEMA_VERSION
from pipeline.store import Store

__all__ = ["make_store", "make_document", "make_cohort", "make_assignments", "assert_store_equal"]

_ROWS = "ABCDEFGH"
_GENOTYPES = ["WT", "lmx1b", "tmem67", "sox9a", "cep290", "b9d2", "rpgrip1l", "shh", "TBD"]
_AUTHORS = ["alee", "bkim", "cruiz", "dpatel", "eokafor"]
_STAMP = "2026-01-05T10:00:00+00:00"


def _experiment_id(k: int, rng: np.random.Generator) -> str:
    day = 20240101 + (k // 28) * 100 + k % 28 + 1
    if k % 3 == 1:
        temp = int(rng.choice([28, 32]))
        return f"{day}_chem{k % 100:02d}_{temp}C_T00_{1000 + k:04d}"
    if k % 3 == 2:
        return f"{day}_batch{k:03d}"
    return str(day)


def make_document(
    n_experiments: int = 2,
    n_embryos: int = 8,
    n_frames: int = 20,
    seed: int = 0,
    *,
    dead_fraction: float = 0.15,
    gap_fraction: float = 0.05,
    flag_fraction: float = 0.03,
) -> dict[str, Any]:
    """Build a synthetic store document (a plain dict, schema version 1).

    Parameters
    ----------
    n_experiments : int, default 2
        Experiments in the cohort.
    n_embryos : int, default 8
        Embryos per experiment (one or two per well; at most 384).
    n_frames : int, default 20
        Frames per video; embryos keep most of them (some gaps, some short tracks).
    seed : int, default 0
        Random seed: the same arguments give the same document.
    dead_fraction : float, default 0.15
        Share of embryos that die during the video.
    gap_fraction : float, default 0.05
        Share of frames missing from a track.
    flag_fraction : float, default 0.03
        Share of snips carrying a flag.

    Returns
    -------
    dict
        A valid store document.
    """
    rng = np.random.default_rng(seed)
    embryos: dict[str, Any] = {}
    store_flags: dict[str, dict[str, Any]] = {"experiment": {}, "video": {}, "image": {}}
    n_embryos = min(int(n_embryos), 384)
    for k in range(n_experiments):
        exp = _experiment_id(k, rng)
        style = ("s", "t", "")[k % 3]
        width = 3 if (k % 4 == 3 and n_frames <= 1000) else 4
        wells = [f"{r}{c:02d}" for c in range(1, 25) for r in _ROWS]
        made = 0
        for well in wells:
            if made >= n_embryos:
                break
            video = f"{exp}_{well}"
            per_well = 2 if (rng.random() < 0.25 and made + 2 <= n_embryos) else 1
            for j in range(1, per_well + 1):
                eid = f"{video}_e{j:02d}" if k % 2 == 0 else f"{video}_e{j}"
                embryos[eid] = _embryo(exp, video, eid, n_frames, style, width, rng, dead_fraction, gap_fraction, flag_fraction)
                made += 1
            if rng.random() < 0.02:
                store_flags["video"][video] = [_flag("FOCUS_DRIFT", "auto:focus", rng)]
            if rng.random() < 0.02:
                store_flags["image"][f"{video}_t{int(rng.integers(0, n_frames)):04d}"] = [_flag("DARK", "auto:exposure", rng, "error")]
        if k % 5 == 4:
            store_flags["experiment"][exp] = [_flag("PROTOCOL_DEVIATION", "alee", rng, "info", auto=False)]
    return {
        "file_info": {
            "schema_version": SCHEMA_VERSION,
            "created": _STAMP,
            "last_updated": _STAMP,
            "source": f"pipeline.testing.make_store(seed={seed})",
        },
        "embryos": embryos,
        "flags": store_flags,
    }


def _flag(value: str, author: str, rng: np.random.Generator, severity: str = "warning", *, auto: bool = True) -> dict[str, Any]:
    flag: dict[str, Any] = {"value": value, "author": author, "timestamp": _STAMP, "severity": severity}
    if auto:
        flag["auto_generated"] = True
        flag["confidence"] = round(float(rng.uniform(0.5, 1.0)), 3)
    return flag


def _embryo(
    exp: str,
    video: str,
    eid: str,
    n_frames: int,
    style: str,
    width: int,
    rng: np.random.Generator,
    dead_fraction: float,
    gap_fraction: float,
    flag_fraction: float,
) -> dict[str, Any]:
    max_frame = min(n_frames, 10**width) - 1
    last = max_frame if rng.random() > 0.1 else int(rng.integers(0, max_frame + 1))
    frames = np.arange(0, last + 1)
    keep = rng.random(frames.size) >= gap_fraction
    keep[0] = True
    frames = frames[keep]
    death = int(rng.choice(frames)) if rng.random() < dead_fraction else None
    area = 7.0e4 * np.cumprod(1 + rng.normal(0.01, 0.03, frames.size))
    length = 900.0 * np.cumprod(1 + rng.normal(0.008, 0.01, frames.size))
    confidence = np.clip(rng.normal(0.93, 0.06, frames.size), 0, 1)
    flagged = rng.random(frames.size) < flag_fraction
    snips: dict[str, Any] = {}
    for i, f in enumerate(frames.tolist()):
        dead = death is not None and f >= death
        snip: dict[str, Any] = {
            "frame": f,
            "phenotype": {"value": "DEAD", "author": "cruiz", "timestamp": _STAMP} if dead else {"value": "NONE", "author": "system_init", "timestamp": _STAMP},
            "flags": [_flag("MOTION_BLUR", "auto:motion_blur", rng) | {"notes": "var=0.31 > 0.2"}] if flagged[i] else [],
            "measurements": {
                "area_um2": round(float(area[i]), 1),
                "length_um": round(float(length[i]), 2),
                "mask_confidence": round(float(confidence[i]), 4),
            },
        }
        snips[f"{eid}_{style}{f:0{width}d}"] = snip
    r = rng.random()
    genotype = None
    if r < 0.8:
        genotype = {
            "value": str(rng.choice(_GENOTYPES)),
            "author": str(rng.choice(_AUTHORS)),
            "timestamp": _STAMP,
            "confirmed": bool(rng.random() < 0.5),
        }
        if genotype["value"] not in ("WT", "TBD"):
            genotype["zygosity"] = str(rng.choice(["homozygous", "heterozygous"]))
    treatments = []
    if rng.random() < 0.2:
        treatments.append({"value": "heat_shock", "author": "bkim", "timestamp": _STAMP, "temperature_celsius": 37.0})
    flags = []
    if death is not None:
        flags.append(_flag("DEATH_FRAME", "auto:death_detector", rng, "info") | {"notes": f"death at frame {death}"})
    return {
        "source": {"experiment_id": exp, "video_id": video},
        "genotype": genotype,
        "treatments": treatments,
        "death_frame": death,
        "flags": flags,
        "snips": snips,
    }


def make_store(
    n_experiments: int = 2,
    n_embryos: int = 8,
    n_frames: int = 20,
    seed: int = 0,
    **kwargs: Any,
) -> Store:
    """Build a realistic synthetic store in memory.

    Parameters
    ----------
    n_experiments : int, default 2
        Experiments in the cohort.
    n_embryos : int, default 8
        Embryos per experiment.
    n_frames : int, default 20
        Frames per video.
    seed : int, default 0
        Random seed.
    **kwargs
        Passed to :func:`make_document` (``dead_fraction``, ...).

    Returns
    -------
    Store
        A checked store with no path; ``store.save(path)`` writes it.

    Examples
    --------
    >>> store = make_store(n_experiments=3, n_embryos=4, n_frames=10, seed=0)
    >>> store.counts()["experiments"], store.counts()["embryos"]
    (3, 12)
    """
    return Store(make_document(n_experiments, n_embryos, n_frames, seed, **kwargs))


def assert_store_equal(left: Store | dict[str, Any], right: Store | dict[str, Any], *, ignore_last_updated: bool = True) -> None:
    """Assert two stores hold the same document.

    Parameters
    ----------
    left, right : Store or dict
        The stores (or documents) to compare.
    ignore_last_updated : bool, default True
        Leave ``file_info.last_updated`` out of the comparison.

    Raises
    ------
    AssertionError
        Naming the first differing JSON path.
    """
    a = left.doc if isinstance(left, Store) else left
    b = right.doc if isinstance(right, Store) else right
    diff = _first_difference(a, b, "$", ignore_last_updated)
    if diff is not None:
        msg = f"stores differ at {diff}"
        raise AssertionError(msg)


def _first_difference(a: Any, b: Any, path: str, ignore: bool) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if ignore and path == "$.file_info" and key == "last_updated":
                continue
            if key not in a or key not in b:
                return f"{path}.{key} (present on one side only)"
            found = _first_difference(a[key], b[key], f"{path}.{key}", ignore)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (lengths {len(a)} and {len(b)})"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path}[{i}]", ignore)
            if found:
                return found
        return None
    if a != b or type(a) is not type(b):
        return f"{path} ({a!r} != {b!r})"
    return None


def make_cohort(n_snips: int = 50_000, seed: int = 0) -> dict[str, Any]:
    """Build a synthetic cohort document of about *n_snips* snips.

    Parameters
    ----------
    n_snips : int, default 50,000
        Approximate number of snips wanted.
    seed : int, default 0
        Random seed.

    Returns
    -------
    dict
        A valid store document (experiments of up to 96 embryos, 40 frames each
        for large cohorts).

    Examples
    --------
    >>> doc = make_cohort(2_000, seed=0)
    >>> 1_500 < sum(len(e["snips"]) for e in doc["embryos"].values()) < 2_500
    True
    """
    n_frames = 40 if n_snips >= 4_000 else max(5, n_snips // 20)
    # About 7% of frames go missing (gaps and short tracks).
    embryos_total = max(1, round(n_snips / (0.93 * n_frames)))
    n_experiments = max(1, -(-embryos_total // 96))
    n_embryos = -(-embryos_total // n_experiments)
    return make_document(n_experiments, n_embryos, n_frames, seed)


_SPECS = ("all", "first", "last", "[0:5]", "[5:]", "[::3]", "[-3:]", "[8:2:-2]", "[0:3, -1]", "death", "death:",
          "death-2:death+2", "t2..t10", "t5..", "[2]", "[-1]", "10:20")
_PHENOTYPES = ("NORMAL", "EDEMA", "HEART_DEFECT", "BODY_AXIS", "CONVERGENCE_EXTENSION", "TBD", "DEAD")


def make_assignments(store: Store, n_rows: int = 100, seed: int = 0, *, bad_fraction: float = 0.02) -> pd.DataFrame:
    """Random phenotype assignments for a store: mixed specs and a few bad rows.

    Parameters
    ----------
    store : Store
        The store the rows refer to.
    n_rows : int, default 100
        Number of rows.
    seed : int, default 0
        Random seed.
    bad_fraction : float, default 0.02
        Share of rows that are wrong on purpose (unknown embryo or phenotype,
        malformed range, confidence out of range).

    Returns
    -------
    pandas.DataFrame
        Columns ``embryo_id``, ``phenotype``, ``frames``, ``confidence``, ``notes``.

    Examples
    --------
    >>> rows = make_assignments(make_store(seed=0), n_rows=5, seed=1)
    >>> list(rows.columns)
    ['embryo_id', 'phenotype', 'frames', 'confidence', 'notes']
    """
    rng = np.random.default_rng(seed)
    embryos = np.array(sorted(store.embryos), dtype=object)
    rows = pd.DataFrame(
        {
            "embryo_id": rng.choice(embryos, n_rows),
            "phenotype": rng.choice(np.array(_PHENOTYPES, dtype=object), n_rows, p=[0.3, 0.2, 0.15, 0.1, 0.05, 0.1, 0.1]),
            "frames": rng.choice(np.array(_SPECS, dtype=object), n_rows),
            "confidence": np.round(rng.uniform(0.5, 1.0, n_rows), 2),
            "notes": np.where(rng.random(n_rows) < 0.1, "second pass", None),
        }
    )
    bad = np.flatnonzero(rng.random(n_rows) < bad_fraction)
    for k, i in enumerate(bad):
        column, value = [
            ("embryo_id", "20990101_A01_e01"),
            ("phenotype", "EDMEA"),
            ("frames", "[1:2:3:4]"),
            ("confidence", 1.7),
        ][k % 4]
        rows.loc[i, column] = value
    return rows
