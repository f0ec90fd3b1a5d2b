"""Flatten (issue 2): reading a 1M-snip store into its snip table, against a bare parse.

On a 1M-snip store (``benchmarks/data/store_1m_52frames.json``: about 20,000
embryos x 52 frames, built with :func:`pipeline.testing.make_document` if
missing and reused afterwards; the folder is git-ignored), side by side in one run:

(a) ``orjson.loads(path.read_bytes())``, garbage collector in its default state;
(b) the same with the garbage collector disabled;
(c) ``pipeline.read_store(path).snip_table()``: parse, legacy check, full
    validation and the columnar snip table in pandas;
(d) ``pipeline.snips_from_store(store).compute(scheduler="sync")`` on a store
    already read (cutting the cached table into partitions and computing them).

Then the peak RSS of (c), and of (a) for reference, each in a fresh
subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), against the file size.
Targets of the issue: (c) at most 2x a bare orjson parse; memory at most ~3x
the file size.

    /work/venv/bin/python benchmarks/bench_flatten.py [--repeat 3] [--path STORE]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa

import pipeline
from pipeline.store import Store
from pipeline.testing import make_document

# pipeline loads its names on first use: load them all before measuring, as
# importing it did, so that no import counts in the figures.
for _name in pipeline.__all__:
    getattr(pipeline, _name)

DATA = Path(__file__).parent / "data" / "store_1m_52frames.json"
# About 20,000 embryos x 52 frames (make_document puts ~240 embryos in an
# experiment: one or two per well): ~1M snips, ~410 MB. The other benchmarks'
# benchmarks/data/store_1m.json (12,400 embryos x 88 frames) works too: --path.
SHAPE = {"n_experiments": 89, "n_embryos": 384, "n_frames": 52, "seed": 1}

# Peak memory of one variant in a fresh interpreter. ru_maxrss (KiB on Linux)
# is the measure; VmHWM, the high-water mark of the process's own
# memory map (reset by exec), cross-checks it.
_PEAK = """
import resource, sys, time
mode, path = sys.argv[1], sys.argv[2]
import orjson, pipeline
# pipeline loads its names on first use: load them all before measuring, as
# importing it did, so that no import counts in the figures.
for name in pipeline.__all__:
    getattr(pipeline, name)

def hwm(field="VmHWM:"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

base, base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, hwm()
t = time.perf_counter()
if mode == "orjson":
    with open(path, "rb") as f:
        doc = orjson.loads(f.read())
else:
    store = pipeline.read_store(path, quiet=True)  # kept: resident = document + table
    table = store.snip_table()
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
helper = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the read's helper process, if any
print(base, peak, base_hwm, hwm(), hwm("VmRSS:"), seconds, helper)
"""


def ensure_store(path: Path) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {path} (a few minutes) ...", flush=True)
        Store(make_document(**SHAPE)).save(path, backups=0)
    return path


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times, result = [], None
    for _ in range(repeat):
        result = None  # free the previous result before the next run
        gc.collect()
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return times, result


def bare_parse(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def bare_parse_no_gc(path: Path) -> Any:
    gc.disable()
    try:
        return orjson.loads(path.read_bytes())
    finally:
        gc.enable()


def read_and_flatten(path: Path) -> Any:
    return pipeline.read_store(path, quiet=True).snip_table()


def flatten_sync(store: Store) -> Any:
    return pipeline.snips_from_store(store).compute(scheduler="sync")


# A child started with vfork (as subprocess does) inherits the parent's peak
# RSS into ru_maxrss at exec; a small launcher in between keeps the figure clean.
_LAUNCH = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def peak_rss(mode: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCH, sys.executable, "-c", _PEAK, mode, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    names = ("base", "peak", "base_hwm", "peak_hwm", "resident", "seconds", "helper")
    return dict(zip(names, map(float, out.stdout.split()), strict=True))


def memory_line(what: str, m: dict[str, float], size: int) -> str:
    above = m["peak"] - m["base"]
    return (
        f"peak RSS of {what} (fresh process): ru_maxrss {m['peak'] / 1e9:.2f} GB "
        f"= {m['peak'] / size:.2f}x the file; {above / 1e9:.2f} GB = {above / size:.2f}x "
        f"above the {m['base'] / 1e6:.0f} MB after imports; VmHWM {m['peak_hwm'] / 1e9:.2f} GB; "
        f"resident afterwards {m['resident'] / 1e9:.2f} GB = {m['resident'] / size:.2f}x"
        + (
            f"; with the read's helper process (its own peak {m['helper'] / 1e9:.2f} GB) at most "
            f"{(m['peak'] + m['helper']) / 1e9:.2f} GB = {(m['peak'] + m['helper']) / size:.2f}x the file"
            if m["helper"]
            else ""
        )
    )


def fmt(times: list[float]) -> str:
    return f"best {min(times):6.2f} s   median {statistics.median(times):6.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each (default: %(default)s)"
    )
    parser.add_argument(
        "--path", type=Path, default=DATA, help="store file (default: %(default)s)"
    )
    args = parser.parse_args()
    path = ensure_store(args.path)
    size = path.stat().st_size
    load_before = os.getloadavg()
    mem_c = peak_rss("store", path)
    mem_a = peak_rss("orjson", path)
    path.read_bytes()  # warm the page cache so no variant pays for the disk

    t_a, _ = timed(functools.partial(bare_parse, path), args.repeat)
    t_b, _ = timed(functools.partial(bare_parse_no_gc, path), args.repeat)
    t_c, table = timed(functools.partial(read_and_flatten, path), args.repeat)
    n_snips = len(table)
    del table
    store = pipeline.read_store(path, quiet=True)
    n_embryos = len(store.embryos)
    n_parts = pipeline.snips_from_store(store).npartitions
    t_d, computed = timed(functools.partial(flatten_sync, store), args.repeat)
    assert len(computed) == n_snips
    del computed, store
    load_after = os.getloadavg()

    best = {k: min(v) for k, v in {"a": t_a, "b": t_b, "c": t_c}.items()}
    median = {
        k: statistics.median(v) for k, v in {"a": t_a, "b": t_b, "c": t_c}.items()
    }
    print(
        f"store: {path} ({size / 1e6:,.1f} MB, {n_snips:,} snips, {n_embryos:,} embryos)"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"orjson {orjson.__version__}, pandas {pd.__version__}, pyarrow {pa.__version__}"
        f"; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {args.repeat} runs each"
    )
    print(f"(a) orjson.loads(read_bytes), gc on:        {fmt(t_a)}")
    print(f"(b) orjson.loads(read_bytes), gc off:       {fmt(t_b)}")
    print(f"(c) read_store(path).snip_table():          {fmt(t_c)}")
    print(
        f"    of which checks + table, (c) - (b):     best {best['c'] - best['b']:6.2f} s"
    )
    print(
        f"(d) snips_from_store(store).compute(sync):  {fmt(t_d)}   ({n_parts} partitions)"
    )
    for ref in ("a", "b"):
        print(
            f"ratio (c)/({ref}): {best['c'] / best[ref]:.2f}x best to best, "
            f"{median['c'] / median[ref]:.2f}x median to median"
        )
    print(memory_line("(c)", mem_c, size))
    print(memory_line("(a)", mem_a, size))


if __name__ == "__main__":
    main()
