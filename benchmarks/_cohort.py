"""Write large synthetic sharded stores one experiment at a time (benchmarks only).

:func:`pipeline.testing.make_document` builds a whole cohort in memory, which
is fine for tests and far too much for millions of snips. Here every
experiment is generated with its own random stream (``seed``, ``k``) by the
same helpers (``_experiment_id``, ``_embryo``, ``_flag``), written as its shard
and dropped before the next one, so memory stays at one experiment whatever
the cohort. Experiment ids come from ``_experiment_id(k)``: each starts with a
distinct date, so they are valid, distinct, and no id is another's prefix
followed by ``_`` (which :mod:`pipeline.shards` refuses).

A manifest (``<root>.manifest.json``, beside the store) lists the experiment
ids, the embryo ids of every experiment and the snip counts, so benchmarks can
draw assignment rows without loading any shard.

Command line::

    python benchmarks/_cohort.py ROOT N_EXPERIMENTS N_EMBRYOS N_FRAMES [--seed S] [--reference E,F]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from pipeline.schema import SCHEMA_VERSION
from pipeline.testing import _ROWS, _STAMP, _embryo, _experiment_id, _flag

__all__ = ["make_sharded_store", "experiment_embryos", "manifest_path", "read_manifest"]

_DUMP = orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE


def manifest_path(root: str | Path) -> Path:
    """Where the manifest of the store at *root* lives (beside its folder)."""
    root = Path(root)
    return root.with_name(root.name + ".manifest.json")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest written by :func:`make_sharded_store`."""
    return orjson.loads(manifest_path(root).read_bytes())


def experiment_embryos(
    k: int,
    n_embryos: int,
    n_frames: int,
    seed: int,
    *,
    dead_fraction: float = 0.15,
    gap_fraction: float = 0.05,
    flag_fraction: float = 0.03,
) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """One experiment as ``make_document`` would build its ``k``-th one.

    The body of ``make_document``'s experiment loop, with a random stream of
    its own (``default_rng([seed, k])``) so experiments are independent and an
    experiment is identical in any cohort that uses the same seed and sizes.

    Returns
    -------
    tuple
        ``(experiment_id, embryos, flags)`` where *flags* holds the
        experiment-, video- and image-level flags of this experiment.
    """
    rng = np.random.default_rng([seed, k])
    flags: dict[str, dict[str, Any]] = {"experiment": {}, "video": {}, "image": {}}
    embryos: dict[str, Any] = {}
    n_embryos = min(int(n_embryos), 384)
    exp = _experiment_id(k, rng)
    style = ("s", "t", "")[k % 3]
    width = 3 if (k % 4 == 3 and n_frames <= 1000) else 4
    wells = [f"{r}{c:02d}" for c in range(1, 25) for r in _ROWS]
    made = 0
    for well in wells:
        if made >= n_embryos:
            break
        video = f"{exp}_{well}"
        # Two embryos in a quarter of the wells, as make_document does; when
        # the wells run out (384 embryos in 192 wells) every well gets two.
        left_wells = len(wells) - wells.index(well)
        need_two = n_embryos - made > left_wells
        per_well = 2 if ((need_two or rng.random() < 0.25) and made + 2 <= n_embryos) else 1
        for j in range(1, per_well + 1):
            eid = f"{video}_e{j:02d}" if k % 2 == 0 else f"{video}_e{j}"
            embryos[eid] = _embryo(exp, video, eid, n_frames, style, width, rng, dead_fraction, gap_fraction, flag_fraction)
            made += 1
        if rng.random() < 0.02:
            flags["video"][video] = [_flag("FOCUS_DRIFT", "auto:focus", rng)]
        if rng.random() < 0.02:
            flags["image"][f"{video}_t{int(rng.integers(0, n_frames)):04d}"] = [_flag("DARK", "auto:exposure", rng, "error")]
    if k % 5 == 4:
        flags["experiment"][exp] = [_flag("PROTOCOL_DEVIATION", "alee", rng, "info", auto=False)]
    return exp, embryos, flags


def _write_experiment(job: tuple[str, int, int, int, int]) -> tuple[str, list[str], int, dict[str, Any]]:
    root, k, n_embryos, n_frames, seed = job
    exp, embryos, flags = experiment_embryos(k, n_embryos, n_frames, seed)
    (Path(root) / "experiments" / f"{exp}.json").write_bytes(orjson.dumps({"embryos": embryos}, option=_DUMP))
    return exp, list(embryos), sum(len(e["snips"]) for e in embryos.values()), flags


def make_sharded_store(
    root: str | Path,
    n_experiments: int,
    n_embryos: int,
    n_frames: int,
    seed: int = 0,
    *,
    reference: tuple[int, int] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, Any]:
    """Write a sharded store of ``n_experiments`` experiments, one shard at a time.

    Parameters
    ----------
    root : path-like
        The store's folder (must not exist or be empty).
    n_experiments, n_embryos, n_frames : int
        Cohort size: experiments, embryos per experiment (at most 384), frames
        per video (about 90% of them become snips: gaps and short tracks).
    seed : int, default 0
        Random seed.
    reference : (n_embryos, n_frames), optional
        Sizes of experiment 0 instead of the cohort's: with the same seed, two
        cohorts of different sizes then share an identical experiment 0 (used
        to show a one-experiment batch costs the same in both).
    progress : bool, default True
        Print a line every few experiments.
    workers : int, default 1
        Processes generating experiments in parallel (each holds one experiment).

    Returns
    -------
    dict
        The manifest (also written to ``<root>.manifest.json``): experiments,
        their embryo ids and snip counts.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        msg = f"{root} exists and is not empty"
        raise FileExistsError(msg)
    (root / "experiments").mkdir(parents=True, exist_ok=True)
    flags: dict[str, dict[str, Any]] = {"experiment": {}, "video": {}, "image": {}}
    shards: dict[str, str] = {}
    manifest: dict[str, Any] = {"seed": seed, "experiments": {}, "n_snips": 0, "n_embryos": 0}
    start = time.perf_counter()
    jobs = [(str(root), k, *(reference if (k == 0 and reference) else (n_embryos, n_frames)), seed)
            for k in range(n_experiments)]
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_write_experiment, jobs) if pool else map(_write_experiment, jobs)
        for k, (exp, embryo_ids, n_snips, exp_flags) in enumerate(results):
            if exp in shards:
                msg = f"experiment id {exp} generated twice"
                raise ValueError(msg)
            for level, found in exp_flags.items():
                flags[level].update(found)
            shards[exp] = f"experiments/{exp}.json"
            manifest["experiments"][exp] = {"k": k, "embryos": embryo_ids, "n_snips": n_snips}
            manifest["n_snips"] += n_snips
            manifest["n_embryos"] += len(embryo_ids)
            if progress and (k % 10 == 9 or k == n_experiments - 1):
                print(f"  generated {k + 1}/{n_experiments} experiments, {manifest['n_snips']:,} snips, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    ids = sorted(shards)
    for a in ids:
        for b in ids:
            if a != b and b.startswith(a + "_"):
                msg = f"experiment ids {a!r} and {b!r}: one extends the other"
                raise ValueError(msg)
    index = {
        "file_info": {
            "schema_version": SCHEMA_VERSION,
            "created": _STAMP,
            "last_updated": _STAMP,
            "source": f"benchmarks/_cohort.py make_sharded_store(seed={seed})",
        },
        "flags": flags,
        "shards": dict(sorted(shards.items())),
    }
    # The index last: a folder without it is not a store yet.
    (root / "store.json").write_bytes(orjson.dumps(index, option=_DUMP))
    manifest_path(root).write_bytes(orjson.dumps(manifest))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("n_experiments", type=int)
    parser.add_argument("n_embryos", type=int)
    parser.add_argument("n_frames", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", help="EMBRYOS,FRAMES of experiment 0")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    reference = tuple(int(x) for x in args.reference.split(",")) if args.reference else None
    m = make_sharded_store(args.root, args.n_experiments, args.n_embryos, args.n_frames, args.seed, reference=reference, workers=args.workers)
    print(f"{args.root}: {len(m['experiments'])} experiments, {m['n_embryos']:,} embryos, {m['n_snips']:,} snips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
