"""Detectors (issue 5): vectorised built-ins vs the earlier per-entity approach.

Part 1, on the shared 1M-snip store (``benchmarks/data/store_1m.json``,
created if missing), side by side in one run, both starting from the store in
memory and ending with the flags in the document (saving excluded on both):

- ours: ``snips_from_store`` -> ``run_detectors`` (every built-in) ->
  ``merge_into_store`` (an in-memory store, so it does not rewrite the file);
- the earlier tool's approach: the same eight checks written as per-entity
  Python functions ``(entity_id, entity_data, **params) -> dict | None``,
  submitted one future per entity to a ``ThreadPoolExecutor``, results
  gathered in a dict, then each hit written with the scalar ``Store.add_flag``.

The script checks that both raise the same (entity, flag) pairs.

Part 2: a CPU-bound user detector (about 1 ms of numpy work per snip) loaded
from a detectors file, over 20,000 snips, on a ``LocalCluster`` of 1 then 2
worker processes (one thread each).

    /work/venv/bin/python benchmarks/bench_detectors.py [--skip-legacy] [--skip-scaling | --only-scaling]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import orjson
import pandas as pd

import pipeline
from pipeline import detectors as det
from pipeline.store import Store
from pipeline.testing import make_document

# pipeline loads its names on first use: load them all before measuring, as
# importing it did, so that no import counts in the figures.
for _name in pipeline.__all__:
    getattr(pipeline, _name)

DATA = Path(__file__).parent / "data" / "store_1m.json"


def load_1m() -> Store:
    if not DATA.exists():
        DATA.parent.mkdir(parents=True, exist_ok=True)
        Store(make_document(n_experiments=52, n_embryos=384, n_frames=52, seed=1)).save(
            DATA, backups=0
        )
    return pipeline.read_store(DATA, quiet=True)


def in_memory_copy(store: Store) -> Store:
    # A store without a path: merging changes the document, never the shared file.
    copy = Store(orjson.loads(orjson.dumps(store.doc)), validate=False)
    copy.validate()
    return copy


# ------------------------------------------------------------------ ours
def run_ours(store: Store) -> tuple[float, float, set[tuple[str, str]]]:
    t0 = time.perf_counter()
    snips = pipeline.snips_from_store(store)
    changes = pipeline.run_detectors(
        snips, [cls() for cls in det.BUILTINS.values()], store=store
    )
    table = changes.compute(scheduler="threads")
    t1 = time.perf_counter()
    pipeline.merge_into_store(store, table)
    t2 = time.perf_counter()
    raised = table.loc[table["status"] == "raised"]
    return t1 - t0, t2 - t1, set(zip(raised["entity_id"], raised["flag"], strict=True))


# ----------------------------------------------------- the earlier approach
def low_mask_confidence(
    entity_id: str, entity_data: dict[str, Any], threshold: float = 0.5
) -> dict[str, Any] | None:
    value = (entity_data.get("measurements") or {}).get("mask_confidence")
    if value is not None and value < threshold:
        return {
            "value": "LOW_CONFIDENCE",
            "severity": "warning",
            "notes": f"mask_confidence {value:.3f} < {threshold}",
        }
    return None


def low_phenotype_confidence(
    entity_id: str, entity_data: dict[str, Any], threshold: float = 0.5
) -> dict[str, Any] | None:
    value = entity_data["phenotype"].get("confidence")
    if value is not None and value < threshold:
        return {
            "value": "LOW_CONFIDENCE",
            "severity": "info",
            "notes": f"phenotype_confidence {value:.3f} < {threshold}",
        }
    return None


def _frames(embryo: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    return sorted((s["frame"], sid, s) for sid, s in embryo["snips"].items())


def highly_variable_mask(
    entity_id: str, entity_data: dict[str, Any], threshold: float = 0.3, window: int = 5
) -> dict[str, Any] | None:
    rows = _frames(entity_data)
    areas = [(s.get("measurements") or {}).get("area_um2") for _, _, s in rows]
    half, hits = window // 2, {}
    for i, (_, sid, _) in enumerate(rows):
        near = [a for a in areas[max(0, i - half) : i + half + 1] if a is not None]
        if areas[i] is None or not near:
            continue
        median = statistics.median(near)
        change = abs(areas[i] - median) / median if median else float("nan")
        if change > threshold:
            hits[sid] = {
                "value": "HIGHLY_VAR_MASK",
                "severity": "warning",
                "notes": f"relative change {change:.2f}",
            }
    return hits or None


def frame_gap(entity_id: str, entity_data: dict[str, Any]) -> dict[str, Any] | None:
    rows = _frames(entity_data)
    hits = {}
    for (prev, _, _), (frame, sid, _) in itertools.pairwise(rows):
        if frame - prev > 1:
            hits[sid] = {
                "value": "FRAME_GAP",
                "severity": "info",
                "notes": f"{frame - prev - 1} frame(s) missing",
            }
    return hits or None


def short_track(
    entity_id: str, entity_data: dict[str, Any], min_snips: int = 10
) -> dict[str, Any] | None:
    n = len(entity_data["snips"])
    return (
        {
            "value": "SHORT_TRACK",
            "severity": "warning",
            "notes": f"{n} snips < {min_snips}",
        }
        if n < min_snips
        else None
    )


def missing_genotype(
    entity_id: str, entity_data: dict[str, Any]
) -> dict[str, Any] | None:
    return (
        {
            "value": "MISSING_GENOTYPE",
            "severity": "warning",
            "notes": "no genotype recorded",
        }
        if entity_data["genotype"] is None
        else None
    )


def no_embryo(
    entity_id: str, entity_data: list[dict[str, Any]]
) -> dict[str, Any] | None:
    snips = [s for e in entity_data for s in e["snips"].values()]
    if not snips or all(s["flags"] for s in snips):
        return {"value": "NO_EMBRYO", "severity": "error", "notes": "no usable snip"}
    return None


def incomplete(
    entity_id: str,
    entity_data: list[dict[str, Any]],
    plate_wells: int = 96,
    min_snips: int = 10,
) -> dict[str, Any] | None:
    with_snips = [e for e in entity_data if e["snips"]]
    videos = {e["source"]["video_id"] for e in with_snips}
    short = sum(len(e["snips"]) < min_snips for e in with_snips) / max(
        len(with_snips), 1
    )
    if len(videos) < plate_wells or short > 0.5:
        return {
            "value": "INCOMPLETE",
            "severity": "warning",
            "notes": f"{len(videos)} videos",
        }
    return None


def run_legacy(
    store: Store, workers: int = 8
) -> tuple[float, float, set[tuple[str, str]]]:
    t0 = time.perf_counter()
    embryos = store.embryos
    by_video: dict[str, list[dict[str, Any]]] = {
        v: [] for v in store.doc["flags"]["video"]
    }
    by_exp: dict[str, list[dict[str, Any]]] = {}
    for e in embryos.values():
        by_video.setdefault(e["source"]["video_id"], []).append(e)
        by_exp.setdefault(e["source"]["experiment_id"], []).append(e)
    results: dict[tuple[str, str, str], Any] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {}
        for emb in embryos.values():
            for sid, snip in emb["snips"].items():
                for func in (low_mask_confidence, low_phenotype_confidence):
                    futures[(func.__name__, "snip", sid)] = pool.submit(func, sid, snip)
        for eid, emb in embryos.items():
            for func, level in (
                (highly_variable_mask, "snip"),
                (frame_gap, "snip"),
                (short_track, "embryo"),
                (missing_genotype, "embryo"),
            ):
                futures[(func.__name__, level, eid)] = pool.submit(func, eid, emb)
        for vid, members in by_video.items():
            futures[("no_embryo", "video", vid)] = pool.submit(no_embryo, vid, members)
        for exp, members in by_exp.items():
            futures[("incomplete", "experiment", exp)] = pool.submit(
                incomplete, exp, members
            )
        for key, future in futures.items():
            results[key] = future.result()
    t1 = time.perf_counter()
    found = set()
    for (name, level, entity), out in results.items():
        if not out:
            continue
        hits = (
            out if "value" not in out else {entity: out}
        )  # per-embryo functions return hits per snip
        for target, hit in hits.items():
            store.add_flag(
                target,
                hit["value"],
                level,
                author=f"auto:{name}",
                severity=hit["severity"],
                notes=hit["notes"],
                auto_generated=True,
            )
            found.add((target, hit["value"]))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, found


# ------------------------------------------------------------ CPU scaling
CPU_DETECTOR = '''
"""A user's CPU-bound detector: a blur score from repeated small FFTs per snip."""
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.detectors import BaseDetector


@dataclass(frozen=True)
class FftBlur(BaseDetector):
    level = "snip"
    value = "MOTION_BLUR"
    required_columns = ("frame", "area_um2")

    threshold: float = 0.9
    reps: int = 8
    severity: str = "warning"

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        # 64x64 images stay under glibc's mmap threshold, which distributed's
        # workers pin (MALLOC_TRIM_THRESHOLD_): large arrays would page-fault.
        scores = np.empty(len(part))
        for i, (frame, area) in enumerate(zip(part["frame"].tolist(), part["area_um2"].tolist())):
            img = np.random.default_rng(frame * 7919 + int(area)).random((64, 64))
            total = 0.0
            for _ in range(self.reps):
                spectrum = np.abs(np.fft.rfft2(img))
                total += spectrum[16:, 16:].sum() / spectrum.sum()
                img = img.T[::-1].copy()
            scores[i] = total / self.reps
        hit = np.flatnonzero(scores > self.threshold)
        return self.hits(part.index[hit], [f"score {s:.3f}" for s in scores[hit]])
'''


def run_scaling(repeat: int) -> dict[int, float]:
    from distributed import Client, LocalCluster

    folder = Path(tempfile.mkdtemp())
    path = folder / "detectors_cpu.py"
    path.write_text(textwrap.dedent(CPU_DETECTOR))
    found = det.load_detectors_file(path)
    store = Store(make_document(n_experiments=2, n_embryos=206, n_frames=52, seed=2))
    n = store.counts()["snips"]
    snips = pipeline.snips_from_store(store, npartitions=16)
    sample = store.snip_table().iloc[:300]
    # Calibrate the repetitions to about 1 ms of numpy work per snip here.
    t = time.perf_counter()
    found["FftBlur"](sample)
    reps = max(1, round(8 * 1e-3 / ((time.perf_counter() - t) / len(sample))))
    detector = det.make_detector("FftBlur", {"reps": str(reps)}, found)
    t = time.perf_counter()
    detector(sample)
    per_snip = (time.perf_counter() - t) / len(sample)
    print(
        f"CPU-bound user detector (reps={reps}): {n:,} snips, "
        f"{per_snip * 1e3:.2f} ms per snip in this process, 16 partitions"
    )
    timings = {}
    for workers in (1, 2):
        with (
            LocalCluster(
                n_workers=workers,
                processes=True,
                threads_per_worker=1,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.compute(
                pipeline.run_detectors(
                    pipeline.snips_from_store(store, npartitions=2), [det.ShortTrack()]
                )
            ).result()
            runs = []
            for _ in range(repeat):
                t = time.perf_counter()
                client.compute(pipeline.run_detectors(snips, [detector])).result()
                runs.append(time.perf_counter() - t)
            timings[workers] = min(runs)
            print(
                f"  {workers} worker process(es): {timings[workers]:.2f} s (best of {repeat})"
            )
    print(f"  speed-up on 2 workers: {timings[1] / timings[2]:.2f}x (target >= 1.7x)")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--skip-legacy",
        action="store_true",
        help="time only our pipeline on the 1M store",
    )
    parser.add_argument(
        "--skip-scaling", action="store_true", help="skip the LocalCluster scaling part"
    )
    parser.add_argument(
        "--only-scaling",
        action="store_true",
        help="run only the LocalCluster scaling part",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="scaling runs per cluster size (best is kept)",
    )
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, pandas {pd.__version__}, dask {dask.__version__}"
    )
    if not args.skip_scaling:
        run_scaling(args.repeat)
    if args.only_scaling:
        return
    t = time.perf_counter()
    base = load_1m()
    print(
        f"\n1M store: {base.counts()} (read in {time.perf_counter() - t:.1f} s, not timed below)"
    )
    ours_store = in_memory_copy(base)
    detect_s, merge_s, ours = run_ours(ours_store)
    total = detect_s + merge_s
    print(
        f"ours: detect {detect_s:.2f} s + merge {merge_s:.2f} s = {total:.2f} s, {len(ours):,} flags"
    )
    if args.skip_legacy:
        return
    legacy_store = in_memory_copy(base)
    del base
    run_s, flag_s, legacy = run_legacy(legacy_store)
    legacy_total = run_s + flag_s
    print(
        f"earlier approach (thread pool, per entity): run {run_s:.2f} s + add_flag {flag_s:.2f} s = {legacy_total:.2f} s, {len(legacy):,} flags"
    )
    same = ours == legacy
    print(
        f"same flags: {same}"
        + (
            ""
            if same
            else f" (only ours: {len(ours - legacy)}, only earlier: {len(legacy - ours)})"
        )
    )
    print(
        f"speed-up: {legacy_total / total:.1f}x overall (target >= 30x); detection alone {run_s / detect_s:.1f}x"
    )


if __name__ == "__main__":
    main()
