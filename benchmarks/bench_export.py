"""Export (issue 6): the CLI against the floor and against the earlier tool.

Times, side by side in one run, on the same ~1M-snip store
(``benchmarks/data/store_1m.json``, made once with
``make_document(n_experiments=52, n_embryos=384, n_frames=88, seed=1)`` if
missing, and shared with the other benchmarks):

- **cli**: ``python -m pipeline export STORE OUT --quiet`` in a subprocess:
  interpreter start, imports, orjson load, validation and flatten, Dask
  ``to_parquet`` partitioned by experiment, fsync, atomic swap;
- **floor**: in this process, an orjson load of the same file (garbage
  collector paused, as the package does) plus ``pyarrow.parquet.write_to_dataset``
  of an already-flat in-memory Arrow table of the same rows, partitioned the same
  way (the table is built outside the timed region);
- **legacy**: ``benchmarks/legacy_export.py`` in a subprocess: stdlib ``json``
  load, a per-record loop, ``pd.DataFrame(records).to_parquet``.

The three are interleaved, ``--repeat`` times; the best time of each counts.
Targets: cli <= 2x floor, and legacy >= 3x cli.

    /work/venv/bin/python benchmarks/bench_export.py --repeat 3
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from _installed import byte_compile_package

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
STORE = DATA / "store_1m.json"


def ensure_store(path: Path) -> None:
    if path.exists():
        return
    from pipeline.store import Store
    from pipeline.testing import make_document

    print(f"building {path} (once) ...", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    Store(make_document(n_experiments=52, n_embryos=384, n_frames=88, seed=1)).save(
        path, backups=0
    )


def rows_in(folder: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in folder.rglob("*.parquet"))


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_cli(store: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipeline", "export", str(store), str(out), "--quiet"],
        check=True,
    )
    return time.perf_counter() - start


def time_legacy(store: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(HERE / "legacy_export.py"), str(store), str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def time_floor(store: Path, flat: pa.Table, out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cpu = time.process_time()
    data = store.read_bytes()
    gc.disable()
    try:
        doc = orjson.loads(data)
    finally:
        gc.enable()
    loaded = time.perf_counter()
    pq.write_to_dataset(flat, out, partition_cols=["experiment_id"])
    done = time.perf_counter()
    FLOOR_CPU.append(time.process_time() - cpu)
    del doc, data
    return done - start, loaded - start


FLOOR_CPU: list[float] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the outputs in benchmarks/data/export-*",
    )
    args = parser.parse_args()
    byte_compile_package()

    ensure_store(args.store)
    import pipeline

    store = pipeline.read_store(args.store)
    table = store.snip_table()
    flat = pa.Table.from_pandas(table, preserve_index=True)
    n = len(table)
    del store, table
    gc.collect()
    outs = {name: DATA / f"export-{name}" for name in ("cli", "floor", "legacy")}
    print(
        f"store: {args.store} ({args.store.stat().st_size / 1e6:.0f} MB, {n:,} snips); "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    times: dict[str, list[float]] = {"cli": [], "floor": [], "legacy": []}
    loads: list[float] = []
    cpu: dict[str, list[float]] = {"cli": [], "floor": FLOOR_CPU, "legacy": []}
    for i in range(args.repeat):
        before = child_cpu()
        times["cli"].append(time_cli(args.store, outs["cli"]))
        cpu["cli"].append(child_cpu() - before)
        floor, load = time_floor(args.store, flat, outs["floor"])
        times["floor"].append(floor)
        loads.append(load)
        before = child_cpu()
        times["legacy"].append(time_legacy(args.store, outs["legacy"]))
        cpu["legacy"].append(child_cpu() - before)
        print(
            f"  round {i + 1}: wall (cpu) cli {times['cli'][-1]:6.2f} s ({cpu['cli'][-1]:5.1f})   "
            f"floor {floor:6.2f} s ({cpu['floor'][-1]:5.1f}; orjson load {load:.2f} s)   "
            f"legacy {times['legacy'][-1]:6.2f} s ({cpu['legacy'][-1]:5.1f})   load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    for name, out in outs.items():
        got = rows_in(out)
        if got != n:
            msg = f"{name} wrote {got:,} rows, expected {n:,}"
            raise SystemExit(msg)

    best = {k: min(v) for k, v in times.items()}
    print(
        f"\nbest of {args.repeat}: cli {best['cli']:.2f} s, floor {best['floor']:.2f} s (orjson load {min(loads):.2f} s), legacy {best['legacy']:.2f} s"
    )
    print(f"cli / floor  = {best['cli'] / best['floor']:.2f}x (target <= 2x)")
    print(f"legacy / cli = {best['legacy'] / best['cli']:.2f}x (target >= 3x)")
    low = {k: min(v) for k, v in cpu.items()}
    print(
        f"CPU seconds (user+sys, best): cli {low['cli']:.1f}, floor {low['floor']:.1f}, legacy {low['legacy']:.1f}"
    )
    print(
        f"  cli / floor = {low['cli'] / low['floor']:.2f}x, legacy / cli = {low['legacy'] / low['cli']:.2f}x"
    )
    if not args.keep:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
