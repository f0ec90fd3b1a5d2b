"""Resource estimates (issue 10): measure the costs behind ``pipeline.estimate.COSTS``.

Runs the real operations on generated single-file stores of two sizes
(``make_cohort(n, seed=1)``, default 20,000 and 200,000 snips), each in a fresh
process, and fits a fixed + per-snip line (time and peak RSS) through the two
sizes for every stage:

- ``startup``: the interpreter, the modules ``assign``, ``detect`` and
  ``export`` import (the store, the snip table, assignment, detectors, merge
  and export, with pandas, Arrow and Dask; not the spreadsheet reader,
  plots or the estimates, which the package loads only on first use) and the
  argument parser; a fixed cost;
- ``load`` (``read_store``: read, parse, check, build the snip table),
  ``flatten`` (``snips_from_store``), ``assign`` / ``detect`` (computing the
  change set), ``merge_assign`` / ``merge_detect`` (``merge_into_store``:
  apply, re-check, change log, durable save) and ``export`` (``export_store``
  of the open store to partitioned Parquet, flatten included): one child
  process per operation runs its stages in order with Dask's sync scheduler,
  timing each and reading the process's peak RSS during it (``VmHWM``, reset
  between stages through ``/proc/self/clear_refs``). ``assign`` and its merge
  also get a third point (4x the assignment rows) for a per-row term.
- ``cluster``: the embedded in-process ``LocalCluster`` the CLI starts by
  default, as the difference between ``embryo-pipeline OP`` and
  ``embryo-pipeline OP --scheduler sync`` end to end;
- ``workers``: the extra of ``--workers 2`` over the default, end to end.

- ``overhead``: what the command's end-to-end runs of the single files
  (default and ``--scheduler sync``) take beyond the sum of the other stages'
  predictions: the interpreter's exit, less the work the command overlaps
  (the embedded cluster starts while the snip table is sorted). Fitted on the
  command itself, so its predictions come out as measured on average; it may
  be negative.

Every run is a fresh process measured with
:func:`pipeline.estimate.measure_command` (wall time, and the peak RSS from
``getrusage(RUSAGE_CHILDREN)`` of a small launcher process); times and peaks
are the median of ``--repeat`` runs (``--best``: the best time). :func:`pipeline.estimate.calibrate`
runs before every measurement and the table records the median as
``"calibration"``: ``estimate_resources(..., speed="measure")`` compares a
fresh calibration with it to carry the times over to another machine or load.
(``--normalise`` also scales each time by the median / its own calibration;
on a shared machine the calibrations vary by 2x between runs, so by default
the times are left as measured.)

Run it from a clean export of the commit being measured (``git archive HEAD``
and ``PYTHONPATH`` pointing there) when others are editing the working tree.

It prints the ``COSTS`` table to paste into ``pipeline/estimate.py`` and,
as a check, each end-to-end run beside the estimate the fitted table gives.

    /work/venv/bin/python benchmarks/bench_estimate.py [--sizes 20000 200000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import pprint
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pipeline.estimate import calibrate, measure_command

DATA = Path(__file__).parent / "data" / "estimate"
ROWS_PER_SNIP = 0.02  # 20,000 assignment rows per million snips, as in issue 4

#: The ``startup`` stage's program (see the module docstring).
STARTUP = """\
import pipeline.cli
import pipeline.detectors, pipeline.export, pipeline.merge, pipeline.phenotypes, pipeline.snips, pipeline.store

pipeline.cli.build_parser()
"""


# ------------------------------------------------------------------ child
def child(op: str, store_path: str, rows_path: str, out_path: str, scratch: str) -> None:
    """Run one operation stage by stage (sync scheduler) and write the timings."""
    import dask

    import pipeline
    from pipeline.detectors import BUILTINS
    from pipeline.estimate import peak_rss, reset_peak_rss

    dask.config.set(scheduler="sync")
    # pipeline loads its names on first use: load them all before measuring, as
    # importing it did, so that no import counts in the figures.
    for name in pipeline.__all__:
        getattr(pipeline, name)
    record: dict[str, dict[str, float]] = {}
    base = peak_rss()
    state: dict[str, object] = {}

    def stage(name, fn):
        reset_peak_rss()
        start = time.perf_counter()
        state[name] = fn()
        record[name] = {"seconds": time.perf_counter() - start, "peak": peak_rss()}

    # The document is kept, as the writing commands (assign, detect) keep it;
    # export reads large stores as tables only, so its memory is predicted
    # high (an upper bound) by the same "load" costs.
    stage("load", lambda: pipeline.read_store(store_path, document=True))
    store = state["load"]
    if op == "export":
        stage("export", lambda: pipeline.export_store(store, Path(scratch) / "export"))
    else:
        stage("flatten", lambda: pipeline.snips_from_store(store))
        snips = state["flatten"]
        if op == "assign":
            rows = pipeline.read_assignments(Path(rows_path))
            stage("assign", lambda: pipeline.assign_phenotypes(
                snips, rows, author="bench", vocabulary=store.vocabulary).compute())
        else:
            stage("detect", lambda: pipeline.run_detectors(
                snips, [cls() for cls in BUILTINS.values()], store=store).compute())
        changes = state[op]
        stage(f"merge_{op}", lambda: pipeline.merge_into_store(store, changes, inputs={"command": op}))
    table = store.snip_table()
    Path(out_path).write_text(json.dumps({
        "stages": record,
        "base": base,
        "n_snips": len(table),
        "table_bytes": int(table.memory_usage(deep=True).sum()),
        "changes": len(state.get(op, [])) if op != "export" else 0,
    }))


# ----------------------------------------------------------------- parent
def ensure_store(n: int, rows_per_snip: tuple[float, ...]) -> tuple[Path, dict[float, Path]]:
    """The store of about *n* snips and its assignment files (created once)."""
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"store_{n}.json"
    rows = {r: DATA / f"rows_{n}_{r:g}.csv" for r in rows_per_snip}
    if not path.exists() or not all(p.exists() for p in rows.values()):
        from pipeline.store import Store
        from pipeline.testing import make_assignments, make_cohort

        store = Store(make_cohort(n, seed=1))
        store.save(path, backups=0)
        snips = store.counts()["snips"]
        for r, p in rows.items():
            make_assignments(store, n_rows=max(1, round(snips * r)), seed=4).to_csv(p, index=False)
    return path, rows


def scratch_copy(path: Path, scratch: Path) -> Path:
    for old in scratch.iterdir():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    target = scratch / path.name
    shutil.copyfile(path, target)
    return target


class Runner:
    """Measurements normalised by a calibration taken just before each."""

    def __init__(self) -> None:
        self.calibrations: list[float] = []
        self.raw: list[dict] = []
        self.normalise = False

    def measure(self, kind: str, argv: list[str], **info) -> dict:
        cal = calibrate(5)
        self.calibrations.append(cal)
        result = measure_command(argv)
        result.update(info, kind=kind, calibration=cal, load=os.getloadavg()[0])
        self.raw.append(result)
        return result

    def scale(self, result: dict) -> float:
        """Factor that brings a time measured with *result*'s calibration to the median's (with --normalise)."""
        if not self.normalise:
            return 1.0
        return statistics.median(self.calibrations) / result["calibration"]


def measure_sharded(sizes: list[int], repeat: int) -> dict[tuple[int, str], list[dict]]:
    """The stage runs on the same stores converted to the sharded layout."""
    from pipeline.shards import shard_store

    py = sys.executable
    runner = Runner()
    runs: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_estimate_sharded_") as tmp:
        tmp = Path(tmp)
        out = tmp / "stages.json"
        for _ in range(repeat):
            for n in sizes:
                path, rows = ensure_store(n, (ROWS_PER_SNIP, 4 * ROWS_PER_SNIP))
                base = DATA / f"sharded_{n}"
                if not base.exists():
                    shard_store(path, base)
                for op in ("export", "assign", "detect"):
                    scratch = tmp / "scratch"
                    shutil.rmtree(scratch, ignore_errors=True)
                    shutil.copytree(base, scratch / "store")
                    res = runner.measure("sharded", [py, __file__, "--child", op, str(scratch / "store"),
                                                     str(rows[ROWS_PER_SNIP]), str(out), str(scratch)])
                    if res["returncode"] != 0:
                        msg = f"the sharded {op} stage run failed (exit {res['returncode']}); rerun it alone to see why"
                        raise SystemExit(msg)
                    res["child"] = json.loads(out.read_text())
                    out.unlink()
                    runs.setdefault((n, op), []).append(res)
                    print(f"  sharded stages {op:6s} n={n:>7,}: "
                          + ", ".join(f"{k} {v['seconds']:.2f} s / {v['peak'] / MiB:.0f} MiB" for k, v in res["child"]["stages"].items()),
                          flush=True)
                    # The same end to end (a check, not fitted).
                    for mode, extra in (("default", []), ("workers-2", ["--workers", "2"])):
                        shutil.rmtree(scratch, ignore_errors=True)
                        shutil.copytree(base, scratch / "store")
                        argv = {"assign": ["assign", str(scratch / "store"), str(rows[ROWS_PER_SNIP]), "--author", "bench"],
                                "detect": ["detect", str(scratch / "store")],
                                "export": ["export", str(scratch / "store"), str(scratch / "export")]}[op]
                        cli = runner.measure("cli", [py, "-m", "pipeline", *argv, "--quiet", "--dashboard-address", "none", *extra])
                        if cli["returncode"] not in (0, 1):
                            msg = f"embryo-pipeline {op} ({mode}) on the sharded store failed (exit {cli['returncode']})"
                            raise SystemExit(msg)
                        runs.setdefault((n, op, mode), []).append(cli)
                        print(f"  sharded cli {op:6s} {mode:9s} n={n:>7,}: {cli['wall']:.2f} s, {cli['peak'] / MiB:.0f} MiB, "
                              f"load {cli['load']:.1f}", flush=True)
    return runs


def line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares fixed + slope through (n, value) points (two: exact)."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - slope * mx, slope


def plane(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Exact a + b*n + c*rows through three (n, rows, value) points."""
    import numpy as np

    a = np.array([[1.0, n, r] for n, r, _ in points])
    y = np.array([v for *_, v in points])
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    return float(sol[0]), float(sol[1]), float(sol[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--refit", action="store_true", help="fit and print again from the last run's measurements")
    parser.add_argument("--only-sharded", action="store_true",
                        help="measure only the sharded stage runs and add them to the last run's measurements")
    parser.add_argument("--best", action="store_true", help="fit the best (not the median) time of the repeats")
    parser.add_argument("--normalise", action="store_true",
                        help="scale each time by (median calibration / the calibration taken just before it)")
    parser.add_argument("--child", nargs=5, metavar=("OP", "STORE", "ROWS", "OUT", "SCRATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    saved_path = DATA / f"last_run_{args.sizes[0]}_{args.sizes[1]}.pkl"
    if args.refit:
        with open(saved_path, "rb") as fh:
            fit(**pickle.load(fh), normalise=args.normalise, best=args.best)
        return
    sizes, repeat = args.sizes, args.repeat
    if args.only_sharded:
        with open(saved_path, "rb") as fh:
            saved = pickle.load(fh)
        saved["sharded_runs"] = measure_sharded(saved["sizes"], repeat)
        with open(saved_path, "wb") as fh:
            pickle.dump(saved, fh)
        fit(**saved, normalise=args.normalise, best=args.best)
        return
    py = sys.executable
    started = time.time()
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, load {os.getloadavg()}", flush=True)
    runner = Runner()
    stores = {}
    for n in sizes:
        stores[n] = ensure_store(n, (ROWS_PER_SNIP, 4 * ROWS_PER_SNIP))
    big = max(sizes)
    stage_runs: dict[tuple[int, float, str], list[dict]] = {}
    e2e: dict[tuple[int, str, str], list[dict]] = {}
    startup: list[dict] = []
    meta: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_estimate_") as tmp:
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        out = Path(tmp) / "stages.json"
        for _ in range(repeat):
            startup.append(runner.measure("startup", [py, "-c", STARTUP]))
            for n in sizes:
                path, rows = stores[n]
                plans = [("export", ROWS_PER_SNIP), ("assign", ROWS_PER_SNIP), ("detect", ROWS_PER_SNIP)]
                if n == big:
                    plans.append(("assign", 4 * ROWS_PER_SNIP))
                for op, rps in plans:
                    copy = scratch_copy(path, scratch)
                    res = runner.measure("stages", [py, __file__, "--child", op, str(copy), str(rows[rps]), str(out), str(scratch)])
                    if res["returncode"] != 0:
                        msg = f"the {op} stage run failed (exit {res['returncode']}); rerun it alone to see why"
                        raise SystemExit(msg)
                    res["child"] = json.loads(out.read_text())
                    out.unlink()
                    meta[n] = {"n_snips": res["child"]["n_snips"], "table_bytes": res["child"]["table_bytes"],
                               "file_bytes": path.stat().st_size, "base": res["child"]["base"]}
                    res["rows"] = len(rows[rps].read_text().splitlines()) - 1
                    stage_runs.setdefault((n, rps, op), []).append(res)
                    print(f"  stages {op:6s} n={n:>7,} rows={res['rows']:>6,}: "
                          + ", ".join(f"{k} {v['seconds']:.2f} s / {v['peak'] / MiB:.0f} MiB" for k, v in res["child"]["stages"].items()),
                          flush=True)
                for op in ("export", "assign", "detect"):
                    modes = [("sync", ["--scheduler", "sync"]), ("default", []), ("workers-2", ["--workers", "2"])]
                    if op == "export":
                        modes.append(("dashboard", None))  # the default with its dashboard
                    for mode, extra in modes:
                        copy = scratch_copy(path, scratch)
                        argv = {"assign": ["assign", str(copy), str(rows[ROWS_PER_SNIP]), "--author", "bench"],
                                "detect": ["detect", str(copy)],
                                "export": ["export", str(copy), str(scratch / "export")]}[op]
                        options = ["--dashboard-address", "none", *extra] if extra is not None else []
                        res = runner.measure("cli", [py, "-m", "pipeline", *argv, "--quiet", *options],
                                             n=n, op=op, mode=mode)
                        if res["returncode"] not in (0, 1):
                            msg = f"embryo-pipeline {op} ({mode}) failed (exit {res['returncode']})"
                            raise SystemExit(msg)
                        e2e.setdefault((n, op, mode), []).append(res)
                        print(f"  cli {op:6s} {mode:9s} n={n:>7,}: {res['wall']:.2f} s, {res['peak'] / MiB:.0f} MiB, "
                              f"rc {res['returncode']}, calibration {res['calibration'] * 1e3:.0f} ms, load {res['load']:.1f}", flush=True)
    saved = {"sizes": sizes, "repeat": repeat, "started": started, "calibrations": runner.calibrations,
             "stage_runs": stage_runs, "e2e": e2e, "startup": startup, "meta": meta, "stores": stores,
             "sharded_runs": measure_sharded(sizes, repeat)}
    with open(saved_path, "wb") as fh:
        pickle.dump(saved, fh)
    fit(**saved, normalise=args.normalise, best=args.best)


def fit(sizes, repeat, started, calibrations, stage_runs, e2e, startup, meta, stores, sharded_runs=None,
        normalise=False, best=False) -> None:
    """Fit the table from the measurements and print it with the check."""
    from pipeline.estimate import estimate_resources

    runner = Runner()
    runner.calibrations = calibrations
    runner.normalise = normalise
    pick = min if best else statistics.median
    big = max(sizes)

    def best_stage(n, rps, op, name):
        runs = stage_runs[(n, rps, op)]
        secs = pick(r["child"]["stages"][name]["seconds"] * runner.scale(r) for r in runs)
        peak = statistics.median(r["child"]["stages"][name]["peak"] for r in runs)
        return secs, peak

    def best_e2e(n, op, mode):
        runs = e2e[(n, op, mode)]
        return pick(r["wall"] * runner.scale(r) for r in runs), statistics.median(r["peak"] for r in runs)

    ns = {n: meta[n]["n_snips"] for n in sizes}
    rows_of = {key: runs[0]["rows"] for key, runs in stage_runs.items()}
    costs: dict[str, object] = {}
    costs["calibration"] = round(statistics.median(runner.calibrations), 4)
    st = pick(r["wall"] * runner.scale(r) for r in startup)
    costs["startup"] = {"seconds": round(st, 3), "peak_bytes": int(statistics.median(r["peak"] for r in startup))}

    def fit_line(op, name):
        pts_t = [(ns[n], best_stage(n, ROWS_PER_SNIP, op, name)[0]) for n in sizes]
        pts_m = [(ns[n], best_stage(n, ROWS_PER_SNIP, op, name)[1]) for n in sizes]
        return pts_t, pts_m

    def entry(t_fixed, t_per, m_fixed, m_per, t_row=None, m_row=None):
        e = {"fixed_s": round(max(0.0, t_fixed), 4), "s_per_snip": float(f"{max(0.0, t_per):.4g}"),
             "fixed_bytes": int(max(0, m_fixed)), "bytes_per_snip": round(max(0.0, m_per), 1)}
        if t_row is not None:
            e["s_per_row"] = float(f"{max(0.0, t_row):.4g}")
            e["bytes_per_row"] = round(max(0.0, m_row or 0.0), 1)
        return e

    for name, ops in (("load", ("export", "assign", "detect")), ("flatten", ("assign", "detect")),
                      ("detect", ("detect",)), ("merge_detect", ("detect",)), ("export", ("export",))):
        t_pts, m_pts = [], []
        for op in ops:
            a, b = fit_line(op, name)
            t_pts += a
            m_pts += b
        tf, tp = line(t_pts)
        mf, mp = line(m_pts)
        costs[name] = entry(tf, tp, mf, mp)
    for name in ("assign", "merge_assign"):
        keys = [(n, ROWS_PER_SNIP, "assign") for n in sizes] + [(big, 4 * ROWS_PER_SNIP, "assign")]
        t3 = plane([(ns[k[0]], rows_of[k], best_stage(*k, name)[0]) for k in keys])
        m3 = plane([(ns[k[0]], rows_of[k], best_stage(*k, name)[1]) for k in keys])
        costs[name] = entry(t3[0], t3[1], m3[0], m3[1], t3[2], m3[2])
    for name, (base_mode, mode) in (("cluster", ("sync", "default")), ("workers", ("default", "workers-2"))):
        t_pts, m_pts = [], []
        for op in ("export", "assign", "detect"):
            for n in sizes:
                t0, m0 = best_e2e(n, op, base_mode)
                t1, m1 = best_e2e(n, op, mode)
                t_pts.append((ns[n], t1 - t0))
                m_pts.append((ns[n], m1 - m0))
        tf, tp = line(t_pts)
        mf, mp = line(m_pts)
        costs[name] = entry(tf, tp, mf, mp)
    # The dashboard of the default embedded cluster (imports bokeh and
    # starts a server): a fixed cost, from the export runs.
    if all((n, "export", "dashboard") in e2e for n in sizes):
        d_t = [best_e2e(n, "export", "dashboard")[0] - best_e2e(n, "export", "default")[0] for n in sizes]
        d_m = [best_e2e(n, "export", "dashboard")[1] - best_e2e(n, "export", "default")[1] for n in sizes]
        costs["dashboard"] = entry(statistics.fmean(d_t), 0.0, statistics.fmean(d_m), 0.0)
    # Sharded stores: the work stage (the shards parsed, flattened and
    # computed, one task per shard) and the merge (shard by shard), in one
    # process with the sync scheduler.
    for op in ("export", "assign", "detect") if sharded_runs else ():
        t_w, m_w, t_m, m_m = [], [], [], []
        for n in sizes:
            runs = sharded_runs[(n, op)]
            stages = [r["child"]["stages"] for r in runs]
            work = [k for k in stages[0] if not k.startswith("merge")]
            t_w.append((ns[n], pick(sum(st[k]["seconds"] for k in work) for st in stages)))
            m_w.append((ns[n], statistics.median(max(st[k]["peak"] for k in work) for st in stages)))
            if op != "export":
                t_m.append((ns[n], pick(st[f"merge_{op}"]["seconds"] for st in stages)))
                m_m.append((ns[n], statistics.median(st[f"merge_{op}"]["peak"] for st in stages)))
        costs[f"sharded_{op}"] = entry(*line(t_w), *line(m_w))
        if op != "export":
            costs[f"sharded_merge_{op}"] = entry(*line(t_m), *line(m_m))
    costs["file_bytes_per_snip"] = round(statistics.fmean(meta[n]["file_bytes"] / ns[n] for n in sizes), 1)
    costs["table_bytes_per_snip"] = round(statistics.fmean(meta[n]["table_bytes"] / ns[n] for n in sizes), 1)
    # Last, what the stages do not include, fitted on the command itself: the
    # end-to-end runs of the single files (default and sync) minus the sum of
    # the other stages' predictions (the interpreter's exit, and the work the
    # command overlaps, such as the embedded cluster starting while the snip
    # table is sorted). It may be negative: a correction to the sum of the parts.
    costs["overhead"] = entry(0.0, 0.0, 0, 0)
    t_pts = []
    for (n, op, mode) in e2e:
        if mode in ("default", "sync"):
            est = estimate_resources(stores[n][0], op, workers=0, n_snips=ns[n], n_rows=round(ns[n] * ROWS_PER_SNIP),
                                     costs=costs, scheduler="sync" if mode == "sync" else None, dashboard=False)
            t_pts.append((ns[n], best_e2e(n, op, mode)[0] - est.seconds))
    tf, tp = line(t_pts)
    costs["overhead"] = entry(tf, tp, 0, 0)
    costs["overhead"]["fixed_s"] = round(tf, 4)
    costs["measured"] = (f"benchmarks/bench_estimate.py --sizes {' '.join(map(str, sizes))} --repeat {repeat}, "
                         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {os.cpu_count()} CPUs")

    print("\nCOSTS = " + pprint.pformat(costs, sort_dicts=False, width=110))

    print("\ncheck: end-to-end runs (normalised to the median calibration) against the fitted table")
    print("| op | mode | snips | measured s | predicted s | ratio | measured MiB | predicted MiB | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    workers_of = {"sync": 0, "default": 0, "workers-2": 2, "dashboard": 0}
    for (n, op, mode), _runs in sorted(e2e.items()):
        t, m = best_e2e(n, op, mode)
        est = estimate_resources(stores[n][0], op, workers=workers_of[mode], n_snips=ns[n],
                                 n_rows=round(ns[n] * ROWS_PER_SNIP), costs=costs,
                                 scheduler="sync" if mode == "sync" else None, dashboard=mode == "dashboard")
        print(f"| {op} | {mode} | {ns[n]:,} | {t:.2f} | {est.seconds:.2f} | {t / est.seconds:.2f} "
              f"| {m / MiB:.0f} | {est.peak_bytes / MiB:.0f} | {m / est.peak_bytes:.2f} |")
    sharded_e2e = sorted(k for k in (sharded_runs or {}) if len(k) == 3)
    if sharded_e2e:
        print("\ncheck: the same stores sharded (one shard per experiment), end to end")
        print("| op | mode | snips | measured s | predicted s | ratio | measured MiB | predicted MiB (largest process) | ratio |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n, op, mode in sharded_e2e:
        runs = sharded_runs[(n, op, mode)]
        t, m = pick(r["wall"] for r in runs), statistics.median(r["peak"] for r in runs)
        est = estimate_resources(DATA / f"sharded_{n}", op, workers=workers_of[mode], n_snips=ns[n],
                                 n_rows=round(ns[n] * ROWS_PER_SNIP), costs=costs, dashboard=False)
        print(f"| {op} | {mode} | {ns[n]:,} | {t:.2f} | {est.seconds:.2f} | {t / est.seconds:.2f} "
              f"| {m / MiB:.0f} | {est.peak_bytes / MiB:.0f} | {m / est.peak_bytes:.2f} |")
    print(f"\ncalibrations: min {min(runner.calibrations) * 1e3:.0f} ms, median {statistics.median(runner.calibrations) * 1e3:.0f} ms, "
          f"max {max(runner.calibrations) * 1e3:.0f} ms; load at the end {os.getloadavg()}; total {time.time() - started:.0f} s")


MiB = 1024**2

if __name__ == "__main__":
    main()
