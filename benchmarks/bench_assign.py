"""Batch assignment end to end (issue 4): the CLI against the earlier tool and the JSON floor.

On the shared 1M-snip store (``benchmarks/data/store_1m.json``, created if
missing) with 20,000 assignment rows (mixed specs, about 2% bad rows), this runs,
side by side in one run, each as its own process on a fresh scratch copy of the
store (the commands write in place; the copy is not timed):

- ``cli``: ``python -m pipeline assign STORE ROWS --author bench`` (load, check,
  flatten, assign, merge, durable save with backup and change log), with the
  default scheduler and with ``--scheduler threads``;
- ``legacy``: ``benchmarks/baseline_assign_legacy.py`` (stdlib ``json.load``, a
  per-snip Python loop calling ``add_phenotype``, ``json.dump(indent=2)``);
- ``floor``: orjson load plus orjson dump (two-space indent) with the same
  durable write (``pipeline._atomic.atomic_write_bytes``) of the same file: the
  least any JSON-backed store can do.

It reports wall time and the peak resident memory of the whole process tree
(the command and any process it starts, sampled with psutil every 50 ms), and
the ratios the issue sets: legacy / cli >= 3, cli / floor <= 2, peak memory /
file size <= 5.

    /work/venv/bin/python benchmarks/bench_assign.py [--repeat 1] [--modes default threads] [--skip-legacy]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
from _installed import byte_compile_package

HERE = Path(__file__).parent
DATA = HERE / "data"
STORE = DATA / "store_1m.json"
ROWS = DATA / "assign_issue4_20k.csv"
N_ROWS = 20_000
MODES = {
    "default": [],
    "threads": ["--scheduler", "threads"],
    "sync": ["--scheduler", "sync"],
}

FLOOR = """
import gc, sys, orjson
from pipeline._atomic import atomic_write_bytes
gc.disable()
path = sys.argv[1]
with open(path, "rb") as handle:
    data = handle.read()
doc = orjson.loads(data)
del data
atomic_write_bytes(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
"""


def wait_for_writers() -> None:
    # Another benchmark may be writing the shared store: wait for its temp file.
    for _ in range(360):
        if not list(DATA.glob(f".{STORE.name}.*.tmp")):
            return
        time.sleep(5)


def ensure_inputs() -> None:
    import orjson

    from pipeline.store import Store
    from pipeline.testing import make_assignments, make_document

    DATA.mkdir(parents=True, exist_ok=True)
    wait_for_writers()
    if not STORE.exists():
        print("creating", STORE, flush=True)
        Store(make_document(n_experiments=52, n_embryos=384, n_frames=52, seed=1)).save(
            STORE
        )
    if not ROWS.exists():
        doc = orjson.loads(STORE.read_bytes())
        # make_assignments only reads store.embryos: no need to check the whole store here.
        rows = make_assignments(
            SimpleNamespace(embryos=doc["embryos"]),
            n_rows=N_ROWS,
            seed=4,
            bad_fraction=0.02,
        )
        tmp = ROWS.with_suffix(".tmp")
        rows.to_csv(tmp, index=False)
        os.replace(tmp, ROWS)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


def measure(name: str, cmd: list[str], scratch_dir: Path) -> dict:
    scratch = scratch_dir / "store.json"
    for leftover in scratch_dir.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    shutil.copyfile(STORE, scratch)
    cmd = [c.replace("{store}", str(scratch)) for c in cmd]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    result = {
        "name": name,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak / 2**20),
        "returncode": proc.returncode,
        "out_mb": round(scratch.stat().st_size / 2**20, 1),
        "stdout": out.strip().splitlines()[:6],
        "stderr": err.strip().splitlines()[-3:],
    }
    print(
        f"  {name:16s} {wall:8.1f} s  peak {peak / 2**20:8.0f} MB  rc {proc.returncode}  {out.strip().splitlines()[:1]}",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--modes", nargs="+", default=["default", "threads"], choices=sorted(MODES)
    )
    parser.add_argument(
        "--skip-legacy",
        action="store_true",
        help="leave out the (slow) legacy baseline",
    )
    args = parser.parse_args(argv)
    ensure_inputs()
    byte_compile_package()
    size = STORE.stat().st_size
    py = sys.executable
    runs = {"floor": [py, "-c", FLOOR, "{store}"]}
    for mode in args.modes:
        runs[f"cli-{mode}"] = [
            py,
            "-m",
            "pipeline",
            "assign",
            "{store}",
            str(ROWS),
            "--author",
            "bench",
            "--quiet",
            *MODES[mode],
        ]
    if not args.skip_legacy:
        runs["legacy"] = [
            py,
            str(HERE / "baseline_assign_legacy.py"),
            "{store}",
            str(ROWS),
            "--author",
            "bench",
        ]
    print(
        f"store {STORE} ({size / 2**20:.0f} MB), rows {ROWS} ({N_ROWS:,}); load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(dir=DATA, prefix="bench_assign_") as tmp:
        for _ in range(args.repeat):
            for name, cmd in runs.items():
                results[name].append(measure(name, cmd, Path(tmp)))
    best = {name: min(r["wall_s"] for r in rs) for name, rs in results.items()}
    peak = {name: max(r["peak_rss_mb"] for r in rs) for name, rs in results.items()}
    print(
        "\n| run | wall (best) | peak RSS (tree) | peak / file size |\n|---|---|---|---|"
    )
    for name in runs:
        print(
            f"| {name} | {best[name]:.1f} s | {peak[name]:,} MB | {peak[name] * 2**20 / size:.1f}x |"
        )
    summary = {}
    for mode in args.modes:
        cli = best[f"cli-{mode}"]
        summary[mode] = {
            "cli_over_floor": round(cli / best["floor"], 2),
            "memory_over_file": round(peak[f"cli-{mode}"] * 2**20 / size, 2),
        }
        if "legacy" in best:
            summary[mode]["legacy_over_cli"] = round(best["legacy"] / cli, 2)
        print(f"{mode}: " + ", ".join(f"{k} {v}" for k, v in summary[mode].items()))
    record = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "store_bytes": size,
        "rows": N_ROWS,
        "results": results,
        "summary": summary,
    }
    (DATA / "bench_assign.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
