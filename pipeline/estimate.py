"""Predicted time and peak memory of ``assign``, ``detect`` and ``export``.

:func:`estimate_resources` predicts, from a store's size alone, how long an
operation takes and how much memory its processes peak at, and recommends where
to run it: in this process (the CLI's default embedded in-process cluster),
on a local cluster of *N* worker processes, or, when one process cannot hold
the parsed store, after converting it to the sharded layout first.

It never parses a big store. A single file is measured by its size, and the
bytes per snip of its first MiB (counting the ``"phenotype":`` keys, one per
snip); a sharded store by its ``store.json`` (parsed, small) and the sizes of
its shard files. An open :class:`pipeline.Store` whose snip table is already
built gives the exact count.

Every cost comes from the one table :data:`COSTS`, produced by
``benchmarks/bench_estimate.py`` (command, output and method in
``benchmarks/RESULTS.md``, section "Resource estimates (issue 10)"): the real
operations run at two store sizes in fresh processes, each stage timed and its
peak RSS read, and a fixed + per-snip line fitted through the two points.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COSTS",
    "OPERATIONS",
    "ResourceEstimate",
    "estimate_resources",
    "calibrate",
    "measure_command",
    "store_size",
]

GiB = 1024**3
MiB = 1024**2

#: Operations :func:`estimate_resources` knows.
OPERATIONS = ("assign", "detect", "export")


# ------------------------------------------------------------- measurement
# Run a command and report its wall time and the peak RSS of its process tree.
# It runs in a small intermediate interpreter: Linux folds the peak RSS of the
# process that vfork()ed a child into that child's ru_maxrss when the child
# execs, so a child started straight from a big process (a test runner
# holding a generated store) would report its parent's peak.
_LAUNCHER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"wall": wall, "peak": peak, "returncode": rc}))
"""


def measure_command(argv: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run *argv* to completion; return its wall time and peak memory.

    Parameters
    ----------
    argv : list of str
        The command (its standard output is discarded; standard error is kept).
    env : dict, optional
        Environment of the command.

    Returns
    -------
    dict
        ``wall`` (seconds), ``peak`` (bytes: the largest ``ru_maxrss`` of the
        command and of every process it started and waited for, from
        ``resource.getrusage(RUSAGE_CHILDREN)``) and ``returncode``.

    Notes
    -----
    The command starts from a small intermediate interpreter, so its peak is
    its own and not that of the calling process (see the source).
    """
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *argv],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss() -> int | None:
    """Peak resident memory of this process since the last :func:`reset_peak_rss`, in bytes.

    Returns
    -------
    int or None
        ``VmHWM`` of ``/proc/self/status``; None where there is no ``/proc``.
    """
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+)\s+kB", text)
    return int(found.group(1)) * 1024 if found else None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current RSS (Linux >= 4.0).

    Returns
    -------
    bool
        Whether the reset worked (writing ``5`` to ``/proc/self/clear_refs``).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


_CALIBRATION_DOC: bytes | None = None


def calibrate(repeat: int = 5) -> float:
    """Seconds this machine takes, right now, for a fixed piece of the load path.

    Parameters
    ----------
    repeat : int, default 5
        Rounds; their mean is returned (the mean, not the minimum, so that a
        busy machine's share of the core counts as it does for a real run).

    Returns
    -------
    float
        Mean seconds of one round: parse a fixed 0.8 MB store document
        (2,107 snips, ``make_document(2, 48, 40, seed=0)``) with orjson and
        build and check its snip table. About 0.06 s on the benchmark machine.

    Notes
    -----
    :data:`COSTS` records the value measured while its timings were taken
    (``"calibration"``). ``estimate_resources(..., speed="measure")`` scales
    every predicted time by ``calibrate() / COSTS["calibration"]``, which
    carries the prediction over to a slower or busier machine: the workload
    is the same Python, orjson and pandas code the operations spend their time
    in, and it runs on one core, like them.
    """
    global _CALIBRATION_DOC
    import orjson

    from pipeline.store import Store
    from pipeline.testing import make_document

    if _CALIBRATION_DOC is None:
        _CALIBRATION_DOC = orjson.dumps(make_document(2, 48, 40, seed=0))
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        Store(orjson.loads(_CALIBRATION_DOC)).snip_table()
        times.append(time.perf_counter() - start)
    return statistics.fmean(times)


# -------------------------------------------------------------- store size
_SAMPLE = 1 * MiB
_SNIP_KEY = b'"phenotype":'  # one per snip (required by the schema), nowhere else


def _sample_ratio(path: Path, size: int) -> tuple[float | None, int | None]:
    """Bytes per snip from the first MiB of a JSON file; the exact count if that is all of it."""
    with open(path, "rb") as fh:
        head = fh.read(_SAMPLE)
    if head.lstrip()[:1] != b"{":
        msg = f"{path}: not a JSON store (it does not start with '{{')"
        from pipeline.errors import StoreFormatError

        raise StoreFormatError(msg, path=str(path))
    count = head.count(_SNIP_KEY)
    if len(head) == size:
        return (size / count if count else None), count
    if count < 20:
        return None, None
    first = head.find(_SNIP_KEY)
    last = head.rfind(_SNIP_KEY)
    return (last - first) / (count - 1), None


def store_size(store: Any, *, costs: dict[str, Any] | None = None) -> dict[str, Any]:
    """How big a store is, from cheap facts only (no shard or store is parsed).

    Parameters
    ----------
    store : Store, ShardedStore or path-like
        An open store, a single JSON file, or a sharded store's folder (or its
        ``store.json``).
    costs : dict, optional
        The cost table; default :data:`COSTS` (its ``file_bytes_per_snip`` is
        the fallback ratio).

    Returns
    -------
    dict
        ``layout`` (``"single"`` or ``"sharded"``), ``path``, ``store_bytes``
        (the file, or all shards and the index), ``n_snips``, ``source`` (how
        ``n_snips`` was found: ``"table"`` from an open store's snip table,
        ``"counted"`` in a file under 1 MiB, ``"sampled"`` from the bytes per
        snip of the first MiB, ``"ratio"`` from the benchmark stores' bytes per
        snip), ``n_shards`` and ``largest_shard_snips`` (sharded only).

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    StoreFormatError
        If it is not a store (a folder without ``store.json``, a file that is
        not a JSON object, an index without shards or naming a missing shard).
    """
    import orjson

    from pipeline.errors import StoreFormatError
    from pipeline.shards import INDEX, ShardedStore, is_sharded
    from pipeline.store import Store

    costs = COSTS if costs is None else costs
    fallback = float(costs["file_bytes_per_snip"])
    if isinstance(store, ShardedStore):
        root, index = store.root, store.index
    elif isinstance(store, Store):
        tables = store._tables
        path = store.path if store.path is not None and Path(store.path).is_file() else None
        if tables is not None or path is None:
            n = len(store.tables().snips)
            size = path.stat().st_size if path is not None else round(n * fallback)
            return {"layout": "single", "path": str(path) if path else None, "store_bytes": size, "n_snips": n,
                    "source": "table", "n_shards": None, "largest_shard_snips": None}
        return store_size(path, costs=costs)
    else:
        path = Path(store)
        if not path.exists():
            raise FileNotFoundError(2, "No such file or directory", str(path))
        if is_sharded(path):
            root = path if path.is_dir() else path.parent
            try:
                index = orjson.loads((root / INDEX).read_bytes())
            except orjson.JSONDecodeError as err:
                msg = f"{root / INDEX}: not valid JSON ({err})"
                raise StoreFormatError(msg, path=str(root / INDEX)) from None
        elif path.is_dir():
            msg = f"{str(path)!r} is a folder without a store.json: expected a store file or a sharded store's folder"
            raise StoreFormatError(msg, path=str(path))
        else:
            size = path.stat().st_size
            ratio, exact = _sample_ratio(path, size)
            if exact is not None:
                n, source = exact, "counted"
            elif ratio is not None:
                n, source = round(size / ratio), "sampled"
            else:
                n, source = round(size / fallback), "ratio"
            return {"layout": "single", "path": str(path), "store_bytes": size, "n_snips": int(n), "source": source,
                    "n_shards": None, "largest_shard_snips": None}
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, dict):
        msg = f"{Path(root) / INDEX}: no 'shards' object; not a sharded store's index"
        raise StoreFormatError(msg, path=str(Path(root) / INDEX))
    sizes = {}
    for exp, rel in shards.items():
        shard = Path(root) / str(rel)
        if not shard.is_file():
            msg = f'{Path(root) / INDEX}: $.shards["{exp}"]: shard file {rel!r} does not exist'
            raise StoreFormatError(msg, path=str(Path(root) / INDEX))
        sizes[exp] = shard.stat().st_size
    index_bytes = (Path(root) / INDEX).stat().st_size
    total = sum(sizes.values())
    n = 0
    largest = 0
    source = "counted"
    if sizes:
        biggest = max(sizes, key=sizes.__getitem__)
        ratio, exact = _sample_ratio(Path(root) / str(shards[biggest]), sizes[biggest])
        if exact is not None and len(sizes) == 1:
            n = largest = exact
        else:
            if ratio is None:
                ratio, source = fallback, "ratio"
            else:
                source = "sampled"
            n = round(total / ratio)
            largest = round(sizes[biggest] / ratio)
    return {"layout": "sharded", "path": str(root), "store_bytes": total + index_bytes, "n_snips": int(n),
            "source": source, "n_shards": len(sizes), "largest_shard_snips": int(largest)}


# --------------------------------------------------------------- the model
#: The stages each operation runs in the client, in order (``export`` flattens
#: as it writes).
STAGES: dict[str, tuple[str, ...]] = {
    "assign": ("load", "flatten", "assign", "merge_assign"),
    "detect": ("load", "flatten", "detect", "merge_detect"),
    "export": ("load", "export"),
}

#: Share of an extra worker process that turns into speed for the work that
#: runs on the workers (issue 9 measured 1.4-1.8x on 2 workers).
PARALLEL_EFFICIENCY = 0.75

# Assignment rows per snip in the benchmark's batches (20,000 per million).
_ROWS_PER_SNIP = 0.02

#: Per-process memory budget cap: the 6 GiB per process that issue 9 held the
#: sharded runs to.
PROCESS_BUDGET = 6 * GiB

#: Below this predicted time (seconds), start-up costs dominate and extra
#: worker processes cannot pay for themselves.
IN_PROCESS_SECONDS = 60.0


def _stage(costs: dict[str, Any], name: str, n: float, rows: float, *, correction: bool = False) -> tuple[float, float]:
    # Seconds and peak of a stage; never negative, but for a *correction*'s seconds.
    c = costs[name]
    seconds = c["fixed_s"] + c["s_per_snip"] * n + c.get("s_per_row", 0.0) * rows
    peak = c["fixed_bytes"] + c["bytes_per_snip"] * n + c.get("bytes_per_row", 0.0) * rows
    return (seconds if correction else max(seconds, 0.0)), max(peak, 0.0)


def _machine_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 16 * GiB


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f} GiB"


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


@dataclass(frozen=True)
class ResourceEstimate:
    """Predicted time and peak memory of one operation on one store.

    Attributes
    ----------
    operation : str
        ``"assign"``, ``"detect"`` or ``"export"``.
    layout : str
        ``"single"`` (one JSON file) or ``"sharded"`` (a folder of shards).
    path : str or None
        The store's file or folder.
    store_bytes : int
        Bytes on disk (all shards and the index for a sharded store).
    n_snips : int
        Snips, exact or estimated (see *n_snips_source*).
    n_snips_source : str
        How *n_snips* was found: ``"table"``, ``"counted"``, ``"sampled"``,
        ``"ratio"`` (see :func:`store_size`) or ``"given"``.
    n_rows : int or None
        Assignment rows assumed (``assign`` only).
    scheduler : str
        ``"local"`` (the CLI default: an embedded ``LocalCluster``) or ``"sync"``.
    workers : int
        Worker processes the prediction is for; 0 means in-process.
    seconds : float
        Predicted wall time of the command, start-up to exit.
    client_peak_bytes : int
        Predicted peak RSS of the process running the command.
    worker_peak_bytes : int or None
        Predicted peak RSS of each worker process (None in-process).
    stages : tuple of (str, float, int)
        ``(stage, seconds, peak_bytes)`` in the order they run.
    choice : str
        Machine-readable recommendation: ``"in-process"``, ``"local-cluster"``
        (with *recommended_workers* processes) or ``"shard-first"``.
    recommended_workers : int
        Worker processes for ``"local-cluster"`` (0 otherwise).
    recommendation : str
        The recommendation in words, with the reason.
    command : str
        What to run to follow the recommendation.
    memory_budget : int
        Bytes one process may use (see :func:`estimate_resources`).
    speed : float
        Factor applied to every time from :data:`COSTS` (1.0: the benchmark
        machine's speed when the table was measured).
    assumptions : tuple of str
        What the prediction takes for granted.
    warnings : tuple of str
        Problems the recommendation does not solve.
    """

    operation: str
    layout: str
    path: str | None
    store_bytes: int
    n_snips: int
    n_snips_source: str
    n_rows: int | None
    scheduler: str
    workers: int
    seconds: float
    client_peak_bytes: int
    worker_peak_bytes: int | None
    stages: tuple[tuple[str, float, int], ...]
    choice: str
    recommended_workers: int
    recommendation: str
    command: str
    memory_budget: int
    speed: float
    assumptions: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def peak_bytes(self) -> int:
        """The largest predicted peak RSS of any one process."""
        return max(self.client_peak_bytes, self.worker_peak_bytes or 0)

    @property
    def total_peak_bytes(self) -> int:
        """Predicted peak RSS of all processes together (an upper bound)."""
        return self.client_peak_bytes + (self.worker_peak_bytes or 0) * self.workers

    def _where(self) -> str:
        if self.workers:
            return f"{self.workers} worker process{'es' if self.workers > 1 else ''}"
        return "in-process" if self.scheduler == "local" else f"in-process ({self.scheduler} scheduler)"

    def summary(self) -> str:
        """A few readable lines: the prediction, the recommendation and why.

        Returns
        -------
        str
            Text for a terminal.
        """
        rows = f", {self.n_rows:,} assignment rows" if self.n_rows is not None else ""
        lines = [
            (f"{self.operation}: {self.n_snips:,} snips ({self.n_snips_source}){rows}, "
            f"{self.layout} store of {self.store_bytes / MiB:,.1f} MiB"),
            f"  predicted {self._where()}: {_duration(self.seconds)}, peak memory {_gib(self.client_peak_bytes)}"
            + (f" (client) + {_gib(self.worker_peak_bytes)} per worker" if self.worker_peak_bytes is not None else ""),
            "  stages: " + ", ".join(f"{name} {_duration(s)}" for name, s, _ in self.stages),
            f"  recommendation: {self.recommendation}",
            f"    {self.command}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        esc = html.escape
        cells = "".join(
            f"<tr><td>{esc(name)}</td><td style='text-align:right'>{_duration(s)}</td>"
            f"<td style='text-align:right'>{_gib(p)}</td></tr>"
            for name, s, p in self.stages
        )
        items = "".join(f"<li>{esc(a)}</li>" for a in self.assumptions)
        warns = "".join(f"<p><b>warning:</b> {esc(w)}</p>" for w in self.warnings)
        return (
            f"<div><p><b>{esc(self.operation)}</b> on a {esc(self.layout)} store: {self.n_snips:,} snips "
            f"({esc(self.n_snips_source)}), {self.store_bytes / MiB:,.1f} MiB</p>"
            f"<p>predicted {esc(self._where())}: <b>{_duration(self.seconds)}</b>, peak "
            f"<b>{_gib(self.client_peak_bytes)}</b>"
            + (f" + {_gib(self.worker_peak_bytes)} per worker" if self.worker_peak_bytes is not None else "")
            + f"</p><table><tr><th>stage</th><th>time</th><th>peak RSS</th></tr>{cells}</table>"
            f"<p>recommendation (<code>{esc(self.choice)}</code>): {esc(self.recommendation)}<br>"
            f"<code>{esc(self.command)}</code></p>{warns}"
            f"<details><summary>assumptions</summary><ul>{items}</ul></details></div>"
        )


def _predict(
    size: dict[str, Any], operation: str, workers: int, scheduler: str, rows: int, costs: dict[str, Any],
    speed: float, cpus: int, dashboard: bool = True,
) -> tuple[float, int, int | None, list[tuple[str, float, int]]]:
    """(seconds, client peak, worker peak, stages) of one way of running *operation*."""
    n = float(size["n_snips"])
    stages: list[tuple[str, float, float]] = []
    start = costs["startup"]
    base = float(start["peak_bytes"])
    stages.append(("startup", start["seconds"], base))
    # Costs that add to other stages' memory rather than peak on their own
    # are listed with a peak of 0 and added to the client's peak below.
    if scheduler == "local":
        stages.append(("cluster", _stage(costs, "cluster", n, 0)[0], 0.0))
        if dashboard and "dashboard" in costs:
            stages.append(("dashboard", _stage(costs, "dashboard", n, 0)[0], 0.0))
    if workers:
        # Starting the worker processes, and for a single file scattering the
        # snip table to them (a sharded store's workers read their own shards).
        scattered = n if size["layout"] == "single" else 0.0
        stages.append(("workers", _stage(costs, "workers", scattered, 0)[0], 0.0))
    parallel = 1.0 + (min(workers, cpus) - 1) * PARALLEL_EFFICIENCY if workers else 1.0
    table = float(costs["table_bytes_per_snip"])
    worker_peak: float | None = None
    if size["layout"] == "single":
        for name in STAGES[operation]:
            seconds, peak = _stage(costs, name, n, rows)
            stages.append((name, seconds, peak))
        if workers:
            # The table is scattered to the workers: a copy, cut in N, plus the
            # working copies of one partition's computation.
            worker_peak = base + 2 * table * n / workers
    else:
        # Every step is one task per shard: it parses and checks its shard,
        # then flattens and computes; the merge loads each touched shard again
        # in a task, applies its slice, checks and stages it
        # (pipeline.shards.apply_sharded). Measured in one process (sync
        # scheduler) as "sharded_<op>" and "sharded_merge_<op>"; worker
        # processes share the time. The rows term comes from the single-file
        # fit (the sharded runs use one row per 50 snips).
        largest = float(size["largest_shard_snips"] or 0)
        shards = max(1, int(size["n_shards"] or 1))
        extra_rows = rows - n * _ROWS_PER_SNIP if operation == "assign" else 0.0
        where = " (workers)" if workers else ""
        work_s, work_peak = _stage(costs, f"sharded_{operation}", n, 0)
        work_s = max(0.0, work_s + costs["assign"].get("s_per_row", 0.0) * extra_rows)
        stages.append((f"parse shards + {operation}{where}", work_s / parallel, work_peak))
        if operation != "export":
            m_s, m_peak = _stage(costs, f"sharded_merge_{operation}", n, 0)
            m_s = max(0.0, m_s + costs["merge_assign"].get("s_per_row", 0.0) * extra_rows)
            stages.append((f"merge_{operation}, shard by shard{where}", m_s / parallel, m_peak))
        if workers:
            # A worker holds the shards it is parsing (one per thread) and
            # their results; the client's peak is taken as measured in one
            # process, an upper bound (the workers hold the shards instead).
            at_once = math.ceil(cpus / workers)
            worker_peak = base + min(at_once, shards) * costs["load"]["bytes_per_snip"] * largest
    # The overhead is a correction fitted on the command's own runs of single
    # files: it may be negative there (work the command overlaps, such as its
    # cluster's start while the snip table is sorted), not for sharded stores.
    stages.append(("overhead", _stage(costs, "overhead", n, 0, correction=size["layout"] == "single")[0], 0.0))
    added = 0.0
    if scheduler == "local":
        added += _stage(costs, "cluster", n, 0)[1]
        if dashboard and "dashboard" in costs:
            added += _stage(costs, "dashboard", n, 0)[1]
    client = max(p for _, _, p in stages) + added
    total_s = max(sum(s for _, s, _ in stages), start["seconds"]) * speed
    out = [(name, s * speed, int(p)) for name, s, p in stages]
    return total_s, int(client), (int(worker_peak) if worker_peak is not None else None), out


def estimate_resources(
    store: Any,
    operation: str,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    n_snips: int | None = None,
    n_rows: int | None = None,
    memory_budget: int | None = None,
    memory_total: int | None = None,
    cpu_count: int | None = None,
    speed: float | str = 1.0,
    dashboard: bool = True,
    costs: dict[str, Any] | None = None,
) -> ResourceEstimate:
    """Predict the time and peak memory of ``assign``, ``detect`` or ``export``.

    Parameters
    ----------
    store : Store, ShardedStore or path-like
        The store (a single JSON file, a sharded store's folder, or an open
        store). Nothing big is parsed: see :func:`store_size`.
    operation : {"assign", "detect", "export"}
        The ``embryo-pipeline`` command to predict (end to end: start-up,
        reading the store, the computation, for ``assign``/``detect`` the merge
        and durable save, and exit).
    workers : int, optional
        Predict for this many worker processes (``--workers N``); 0 for the
        default in-process cluster. Default: the recommended way.
    scheduler : {"local", "sync"}, optional
        ``"local"`` (default): the CLI's embedded ``LocalCluster``;
        ``"sync"``: ``--scheduler sync`` (no cluster start-up; in-process only).
    n_snips : int, optional
        Snips, when known; default from the store (see :func:`store_size`).
    n_rows : int, optional
        ``assign`` only: rows of the assignment file. Default one per 50 snips
        (20,000 per million, the size of the benchmarks' batches).
    memory_budget : int, optional
        Bytes one process may use. Default the smaller of 6 GiB and half the
        machine's memory.
    memory_total : int, optional
        The machine's memory in bytes; default this machine's.
    cpu_count : int, optional
        Cores available; default ``os.cpu_count()``.
    speed : float or "measure", default 1.0
        Factor applied to every time of the table (2.0: this machine is twice
        as slow as the benchmark machine was). ``"measure"`` runs
        :func:`calibrate` now (about 0.5 s) and uses its ratio to the
        calibration recorded in the table.
    dashboard : bool, default True
        The embedded cluster starts its dashboard (the CLI's default; False
        for ``--dashboard-address none``).
    costs : dict, optional
        A cost table shaped like :data:`COSTS` (the benchmark passes the one it
        has just fitted).

    Returns
    -------
    ResourceEstimate
        The prediction, the recommendation and its reasons.

    Raises
    ------
    ValueError
        If *operation*, *workers* or *scheduler* is not one of the above.
    FileNotFoundError, StoreFormatError
        If *store* is not a store (see :func:`store_size`).

    Notes
    -----
    The model (costs in :data:`COSTS`, measured by
    ``benchmarks/bench_estimate.py``; see ``benchmarks/RESULTS.md``, section
    "Resource estimates (issue 10)"): time is the sum of the stages the
    command runs, each ``fixed + per_snip * n_snips (+ per_row * n_rows)``;
    peak memory is the largest stage peak, each a line in the same way, plus
    what the embedded cluster adds. The recommendation:

    - **shard first** when the store is a single file and one process would
      need more than *memory_budget* (it holds the whole parsed store, about
      2.3 KB per snip, 5.4x the file);
    - **in-process** for any other single-file store: reading and merging
      run in the client whatever the scheduler, and worker processes only add
      their start-up and a copy of the table (``benchmarks/RESULTS.md``,
      issues 7 and 10); also for a sharded store predicted to take under a
      minute, where start-up dominates, and on one core;
    - **local cluster of N workers** for bigger sharded stores when that is
      predicted faster: N = the most workers, up to the cores, that each stay
      within *memory_budget* and together fit in 80% of memory.

    ``warnings`` name what the recommendation does not solve: a client over
    the budget (for a sharded ``assign``/``detect``, the merge's per-snip
    memory: split the batch by experiment), a worker over it (the largest
    shard), or all processes together over the machine's memory.

    Accuracy, checked against real runs at 20k and 200k snips and in
    ``tests/test_estimate.py``: peak memory within 0.9-1.2x; time within
    0.6-1.8x on the loaded benchmark machine (time is the noisy one: pass
    ``speed="measure"`` on another machine or under another load).

    Examples
    --------
    >>> from pipeline.testing import make_store
    >>> est = estimate_resources(make_store(seed=0), "export")
    >>> est.choice, est.n_snips > 0
    ('in-process', True)
    """
    if operation not in OPERATIONS:
        msg = f"unknown operation {operation!r}; choose one of {', '.join(OPERATIONS)}"
        raise ValueError(msg)
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        msg = f"workers must be a whole number >= 0, got {workers!r}"
        raise ValueError(msg)
    scheduler = scheduler or "local"
    if scheduler not in ("local", "sync"):
        msg = f"scheduler must be 'local' or 'sync', got {scheduler!r}"
        raise ValueError(msg)
    if scheduler == "sync" and workers:
        msg = "scheduler='sync' runs in-process; it takes no workers"
        raise ValueError(msg)
    costs = COSTS if costs is None else costs
    size = store_size(store, costs=costs)
    if n_snips is not None:
        size["n_snips"], size["source"] = int(n_snips), "given"
        if size["layout"] == "sharded" and size["n_shards"]:
            size["largest_shard_snips"] = max(size["largest_shard_snips"] or 0, int(n_snips) // size["n_shards"])
    if speed == "measure":
        speed = calibrate(7) / float(costs["calibration"])
    speed = float(speed)
    rows = int(n_rows) if n_rows is not None else max(1, round(size["n_snips"] / 50))
    if operation != "assign":
        rows = 0
    cpus = int(cpu_count or os.cpu_count() or 1)
    total_mem = int(memory_total or _machine_memory())
    budget = int(memory_budget or min(PROCESS_BUDGET, total_mem // 2))

    def run(w: int, sched: str) -> tuple[float, int, int | None, list[tuple[str, float, int]]]:
        return _predict(size, operation, w, sched, rows, costs, speed, cpus, dashboard)

    in_proc = run(0, scheduler)
    warnings: list[str] = []
    path = size["path"] or "STORE"
    cmd_args = {"assign": f"assign {path} ASSIGNMENTS --author NAME", "detect": f"detect {path}",
                "export": f"export {path} OUT"}[operation]
    rec_workers = 0
    if size["layout"] == "single" and in_proc[1] > budget:
        choice = "shard-first"
        reason = (
            f"one process would peak at {_gib(in_proc[1])} holding the whole parsed store ({size['n_snips']:,} snips), "
            f"over the {_gib(budget)} budget; a sharded store is parsed and merged one experiment at a time, in tasks"
        )
        command = f"embryo-pipeline shard {path} {path}.sharded   (once, on a machine with {_gib(in_proc[1])} free)"
    elif size["layout"] == "single":
        choice = "in-process"
        reason = ("a single-file store is read and merged in the client whatever the scheduler; "
                  "worker processes would only add a copy of the snip table")
        command = f"embryo-pipeline {cmd_args}"
    else:
        best = 0
        if cpus > 1 and in_proc[0] >= IN_PROCESS_SECONDS:
            # The most workers that fit: each must stay within the budget (its
            # share of the table shrinks with more workers, the largest shard
            # does not) and all of them beside the client within 80% of memory.
            for w in range(cpus, 1, -1):
                trial = run(w, "local")
                if (trial[2] or 0) > budget:
                    warnings.append(
                        f"a worker would need about {_gib(trial[2])} (the largest shard, "
                        f"{size['largest_shard_snips']:,} snips, parsed, and its share of the table), over the "
                        f"{_gib(budget)} budget: split the largest experiments or spread the work over more machines"
                    )
                    break
                if trial[1] + w * (trial[2] or 0) <= 0.8 * total_mem:
                    if trial[0] < in_proc[0]:
                        best = w
                    break
        if best:
            choice, rec_workers = "local-cluster", best
            reason = (f"the shards are parsed and processed in parallel; {best} workers fit beside the client "
                      f"in {total_mem / GiB:.0f} GiB")
            command = f"embryo-pipeline {cmd_args} --workers {best}"
        else:
            choice = "in-process"
            reason = ("predicted under a minute, so starting worker processes would not pay off"
                      if in_proc[0] < IN_PROCESS_SECONDS else "more worker processes would not be faster here")
            command = f"embryo-pipeline {cmd_args}"
    if workers is None:
        w_used = rec_workers if choice == "local-cluster" else 0
        sched_used = "local" if w_used else scheduler
    else:
        w_used, sched_used = workers, scheduler
    seconds, client, worker, stages = run(w_used, sched_used)
    if choice != "shard-first" and client > budget:
        text = f"the client process would peak at about {_gib(client)}, over the {_gib(budget)} budget"
        if size["layout"] == "sharded" and operation != "export":
            per_snip = costs[f"sharded_merge_{operation}"]["bytes_per_snip"]
            text += (f" (the {operation} merge holds about {per_snip:.0f} bytes per snip of the cohort in the "
                     "client): split the batch by experiment")
        warnings.append(text)
    if client + w_used * (worker or 0) > total_mem:
        warnings.append(f"all processes together need about {_gib(client + w_used * (worker or 0))}, "
                        f"more than the machine's {_gib(total_mem)}")
    recommendation = {
        "shard-first": "shard first: ",
        "local-cluster": f"local cluster of {rec_workers} worker processes: ",
        "in-process": "in-process (the default): ",
    }[choice] + reason
    assumptions = (
        f"costs from {costs.get('measured', 'the given table')}; times scaled by speed={speed:.2f}",
        "the CLI as is: " + ("embedded LocalCluster" if sched_used == "local" else "--scheduler sync")
        + (f" with {w_used} worker processes" if w_used else (", in-process" if sched_used == "local" else ""))
        + (", with its dashboard" if sched_used == "local" and dashboard else ""),
        f"a {size['layout']} store; snips {size['source']}"
        + (f" ({size['store_bytes'] / max(size['n_snips'], 1):.0f} bytes per snip on disk)" if size["n_snips"] else ""),
        *( [f"{rows:,} assignment rows (default: one per 50 snips)" if n_rows is None else f"{rows:,} assignment rows"]
           if operation == "assign" else []),
        *( [("one task per shard and step, each holding one parsed shard; a batch touches every experiment, "
            "so the merge loads and rewrites every shard (one task each)"),
            f"worker processes turn into {PARALLEL_EFFICIENCY:.0%} of a core each beyond the first"]
           if size["layout"] == "sharded" else []),
        f"memory budget {_gib(budget)} per process, {cpus} cores, {_gib(total_mem)} memory",
        "the machine otherwise idle; other jobs on the same cores slow every stage alike (use speed='measure')",
    )
    return ResourceEstimate(
        operation=operation, layout=size["layout"], path=size["path"], store_bytes=int(size["store_bytes"]),
        n_snips=int(size["n_snips"]), n_snips_source=size["source"], n_rows=rows if operation == "assign" else None,
        scheduler=sched_used, workers=w_used, seconds=float(seconds), client_peak_bytes=client,
        worker_peak_bytes=worker, stages=tuple(stages), choice=choice, recommended_workers=rec_workers,
        recommendation=recommendation, command=command, memory_budget=budget, speed=speed,
        assumptions=assumptions, warnings=tuple(warnings),
    )


#: The measured costs: ``fixed_s + s_per_snip * n (+ s_per_row * rows)``
#: seconds and ``fixed_bytes + bytes_per_snip * n (+ bytes_per_row * rows)``
#: peak RSS per stage (the process's whole RSS while the stage runs, so the
#: interpreter and whatever earlier stages left in memory are included).
#: ``calibration`` is the median of :func:`calibrate` taken before each run.
#: ``overhead`` is fitted last, on the command's own end-to-end runs of single
#: files: what they take beyond the other stages, negative when the command
#: overlaps work the stages were measured one after the other (its cluster
#: starts while the snip table is sorted).
#: Produced by ``benchmarks/bench_estimate.py`` (``benchmarks/RESULTS.md``,
#: "Resource estimates (issue 10)"); paste its output here to update.
COSTS: dict[str, Any] = {
    "calibration": 0.067,
    "startup": {"seconds": 2.435, "peak_bytes": 155428864},
    "load": {"fixed_s": 0.0182, "s_per_snip": 1.129e-05, "fixed_bytes": 168894071, "bytes_per_snip": 1792.7},
    "flatten": {"fixed_s": 0.0115, "s_per_snip": 1.603e-07, "fixed_bytes": 170096162, "bytes_per_snip": 1763.6},
    "detect": {"fixed_s": 0.4989, "s_per_snip": 2.246e-06, "fixed_bytes": 186083294, "bytes_per_snip": 1753.1},
    "merge_detect": {"fixed_s": 0.0303, "s_per_snip": 2.301e-06, "fixed_bytes": 191573770, "bytes_per_snip": 1839.1},
    "export": {"fixed_s": 0.4698, "s_per_snip": 2.671e-06, "fixed_bytes": 202243468, "bytes_per_snip": 1689.1},
    "assign": {"fixed_s": 0.423, "s_per_snip": 1.764e-06, "fixed_bytes": 192965539, "bytes_per_snip": 1684.4,
              "s_per_row": 2.537e-05, "bytes_per_row": 4959.4},
    "merge_assign": {"fixed_s": 0.0507, "s_per_snip": 2.064e-06, "fixed_bytes": 205405581, "bytes_per_snip": 1674.3,
                    "s_per_row": 4.548e-05, "bytes_per_row": 8616.7},
    "cluster": {"fixed_s": 0.7512, "s_per_snip": 0.0, "fixed_bytes": 27072915, "bytes_per_snip": 93.0},
    "workers": {"fixed_s": 2.9898, "s_per_snip": 1.441e-06, "fixed_bytes": 0, "bytes_per_snip": 287.6},
    "dashboard": {"fixed_s": 0.6189, "s_per_snip": 0.0, "fixed_bytes": 9744384, "bytes_per_snip": 0.0},
    "sharded_export": {"fixed_s": 0.3847, "s_per_snip": 3.43e-05, "fixed_bytes": 226597679, "bytes_per_snip": 8.3},
    "sharded_assign": {"fixed_s": 0.2366, "s_per_snip": 4.583e-05, "fixed_bytes": 220157500, "bytes_per_snip": 113.7},
    "sharded_merge_assign": {"fixed_s": 0.0, "s_per_snip": 2.891e-05, "fixed_bytes": 221872897, "bytes_per_snip": 316.3},
    "sharded_detect": {"fixed_s": 0.7092, "s_per_snip": 3.972e-05, "fixed_bytes": 209726038, "bytes_per_snip": 43.2},
    "sharded_merge_detect": {"fixed_s": 0.0111, "s_per_snip": 2.965e-05, "fixed_bytes": 216208337, "bytes_per_snip": 72.6},
    "file_bytes_per_snip": 425.3,
    "table_bytes_per_snip": 321.0,
    "overhead": {"fixed_s": -0.989, "s_per_snip": 0.0, "fixed_bytes": 0, "bytes_per_snip": 0.0},
    "measured": "benchmarks/bench_estimate.py --sizes 20000 200000 --repeat 2, 2026-11-30 02:34 UTC, "
    "commit 0124444 (from a git archive export), 2 shared CPUs",
}
