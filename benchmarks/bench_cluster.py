"""Where work runs (issue 7): the 1M-snip commands on each kind of scheduler.

Runs ``embryo-pipeline assign``, ``detect`` and ``export`` (when the CLI has
them) on the shared 1M-snip store (``benchmarks/data/store_1m.json``, created
if missing) as a user would, one subprocess per run, each on a fresh copy of
the store, with:

- ``default``: no ``--scheduler`` (the embedded in-process ``LocalCluster``);
- ``threads``: ``--scheduler threads`` (Dask's threaded scheduler, no dashboard);
- ``workers-1`` / ``workers-2``: ``--workers 1`` / ``--workers 2`` (an
  embedded ``LocalCluster`` with that many worker processes).

It reports the wall time and the peak resident memory of the whole process
tree (the command and every worker process it starts, sampled with psutil
every 50 ms), and whether Dask warned about a large graph.

    /work/venv/bin/python benchmarks/bench_cluster.py [--commands assign detect export] [--modes ...] [--repeat 1]
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

import psutil

DATA = Path(__file__).parent / "data"
STORE = DATA / "store_1m.json"
ROWS = DATA / "assign_1m.csv"
MODES = {
    "default": [],
    "threads": ["--scheduler", "threads"],
    "workers-1": ["--workers", "1"],
    "workers-2": ["--workers", "2"],
}


def wait_for_writers() -> None:
    # Another benchmark may be writing the shared store: wait for its temp file.
    while list(DATA.glob(".store_1m.json.*.tmp")):
        time.sleep(5)


def ensure_inputs() -> None:
    import pipeline
    from pipeline.store import Store
    from pipeline.testing import make_assignments, make_document

    DATA.mkdir(parents=True, exist_ok=True)
    wait_for_writers()
    if not STORE.exists():
        Store(make_document(n_experiments=52, n_embryos=384, n_frames=52, seed=1)).save(
            STORE, backups=0
        )
    if not ROWS.exists():
        store = pipeline.read_store(STORE, quiet=True)
        make_assignments(store, n_rows=20_000, seed=7).to_csv(ROWS, index=False)


def command_line(command: str, store: Path, scratch: Path) -> list[str] | None:
    from pipeline.cli import COMMANDS

    if command not in COMMANDS:
        return None
    if command == "assign":
        return ["assign", str(store), str(ROWS), "--author", "bench"]
    if command == "detect":
        return ["detect", str(store)]
    if command == "export":
        return ["export", str(store), str(scratch / "export")]
    msg = f"unknown command {command!r}"
    raise ValueError(msg)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run(argv: list[str]) -> dict[str, object]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *argv, "--quiet"],
            stdout=out,
            stderr=err,
            env=env,
        )
        proc = psutil.Process(child.pid)
        peak = 0
        while child.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_rss(proc))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak / 1e9, 2),
        "exit": child.returncode,
        "large_graph_warning": "Sending large graph" in stderr,
        "summary": stdout.strip().splitlines()[0]
        if stdout.strip()
        else stderr.strip()[-300:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", nargs="+", default=["assign", "detect", "export"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", default=str(DATA / "bench_cluster.json"))
    args = parser.parse_args()
    ensure_inputs()
    print(
        f"# {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 1e9:.0f} GB, load {os.getloadavg()[0]:.1f}"
    )
    results = []
    print(
        "| command | where | wall (s) | peak RSS, process tree (GB) | exit | large-graph warning |"
    )
    print("|---|---|---:|---:|---:|---|")
    for command in args.commands:
        for mode in args.modes:
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(dir=DATA) as tmp:
                    scratch = Path(tmp)
                    store = scratch / "store.json"
                    shutil.copyfile(STORE, store)
                    argv = command_line(command, store, scratch)
                    if argv is None:
                        print(f"| {command} | (not in this CLI yet) | | | | |")
                        break
                    result = {
                        "command": command,
                        "mode": mode,
                        **run(argv + MODES[mode]),
                    }
                results.append(result)
                print(
                    f"| {command} | {mode} | {result['wall_s']} | {result['peak_rss_gb']} | {result['exit']} "
                    f"| {'yes' if result['large_graph_warning'] else 'no'} |",
                    flush=True,
                )
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
