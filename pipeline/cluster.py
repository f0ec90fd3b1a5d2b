"""Where work runs: the one place that picks a Dask scheduler.

Every computing command of the CLI takes the same options (added by
:func:`add_cluster_options`) and runs inside :func:`runtime_from_args`:

- ``--scheduler tcp://host:8786`` (or ``DASK_SCHEDULER_ADDRESS``) connects a
  ``distributed.Client`` to an existing scheduler (``dask scheduler`` /
  ``dask worker``, dask-jobqueue, dask-kubernetes, ...);
- by default (``--scheduler local``) an embedded ``LocalCluster`` starts on
  this machine: one in-process worker with a thread per core, or ``--workers
  N`` worker processes bound to 127.0.0.1 (see ``benchmarks/RESULTS.md`` for
  why in-process is the default);
- ``--scheduler sync|threads|processes`` selects Dask's local schedulers, for
  debugging (no dashboard).

With a distributed client the dashboard link is printed to standard error and
every computation is tagged with a ``distributed.span`` named after the
command; tasks carry the stage as their name prefix (``flatten``, ``assign``,
``detect``, ``export``). A progress bar goes to standard error when it is a
terminal and ``--quiet`` is not given.

In Python, library functions take an optional ``client`` and use the active
one if there is one (:func:`get_client`); :func:`compute` computes a
collection there, reporting ``progress(done, total)`` per partition.

Adding the options and choosing the scheduler import only the standard
library (the command line does both before it reads a store); Dask is
imported where work runs.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self

from pipeline.errors import PipelineError

__all__ = [
    "ClusterError",
    "DEFAULT_SCHEDULER",
    "DEFAULT_DASHBOARD",
    "LOCAL_SCHEDULERS",
    "get_client",
    "settle",
    "compute",
    "compute_with_progress",
    "scatter_pieces",
    "open_runtime",
    "add_cluster_options",
    "runtime_from_args",
]

#: What ``--scheduler`` defaults to: an embedded in-process ``LocalCluster``
#: (one worker, a thread per core, the dashboard). Chosen from the figures in
#: ``benchmarks/RESULTS.md``: it is as fast as Dask's threaded scheduler and
#: uses the least memory, while worker processes first have to receive the
#: whole snip table and send the change sets back.
DEFAULT_SCHEDULER = "local"

#: Where the dashboard of an embedded cluster listens (a free port if taken).
DEFAULT_DASHBOARD = "127.0.0.1:8787"

#: Dask's local schedulers, for debugging, and the names Dask also accepts.
LOCAL_SCHEDULERS: dict[str, str] = {
    "sync": "sync",
    "synchronous": "sync",
    "single-threaded": "sync",
    "threads": "threads",
    "threading": "threads",
    "processes": "processes",
    "multiprocessing": "processes",
}

# Errors that mean the cluster, not the data, failed (a worker died with the
# only copy of a piece, the scheduler went away): reported as ClusterError.
_CLUSTER_FAILURES = (
    "KilledWorker",
    "FutureCancelledError",
    "CancelledError",
    "CommClosedError",
    "StreamClosedError",
)


# The command a runtime was opened for: the outer span of its computations.
_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pipeline_command", default=None
)


class ClusterError(PipelineError, RuntimeError):
    """The Dask cluster could not be reached or lost work; nothing was written."""


# ------------------------------------------------------------------ clients
def get_client(client: Any = None) -> Any:
    """The ``distributed.Client`` work should run on, or None for a local scheduler.

    Parameters
    ----------
    client : distributed.Client, optional
        Returned as is when given.

    Returns
    -------
    distributed.Client or None
        *client*; else the active default client (never a new one), unless
        ``dask.config`` names a local scheduler (``sync``, ``threads``,
        ``processes``); else None.

    Examples
    --------
    >>> import dask
    >>> with dask.config.set(scheduler="sync"):
    ...     get_client() is None
    True
    """
    if client is not None:
        return client
    import dask

    configured = dask.config.get("scheduler", None)
    if isinstance(configured, str) and configured in LOCAL_SCHEDULERS:
        return None
    if callable(configured) and getattr(configured, "__module__", "").startswith("dask."):
        return None  # a local scheduler's get function (see _local_get)
    # No distributed import, no client: keep plain sessions free of its cost.
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        found = default_client()
    except ValueError:
        return None
    return (
        found
        if getattr(found, "status", "running")
        in ("running", "connecting", "newly-created")
        else None
    )


class _Plan:
    """A collection, optimised once, with the keys its progress counts.

    Progress counts **partitions**: the tasks that produce the collection's
    output partitions (a DataFrame's ``npartitions``). A collection with a
    single output that is not a DataFrame (a ``Scalar`` such as
    ``to_parquet(..., compute=False)``, a ``Delayed``) counts the tasks its
    final step gathers instead: one per file written. The keys are read from
    the optimised graph, which is the graph that runs, so the count is the
    same on every scheduler and known before anything runs.
    """

    def __init__(self, collection: Any) -> None:
        import dask
        from dask.core import flatten, get_dependencies

        optimize = getattr(collection, "optimize", None)
        # Dask DataFrames optimise (and lower) their expression themselves;
        # other collections go through dask.optimize.
        self.collection = (
            optimize() if callable(optimize) else dask.optimize(collection)[0]
        )
        self.graph = self.collection.__dask_graph__()
        self.keys = self.collection.__dask_keys__()
        outputs = list(flatten(self.keys))
        counted = outputs
        if len(outputs) == 1 and not _is_frame(self.collection):
            gathered = [
                k
                for k in get_dependencies(self.graph, outputs[0], as_list=True)
                if k in self.graph
            ]
            counted = gathered or outputs
        self.counted: list[Any] = list(dict.fromkeys(counted))

    @property
    def total(self) -> int:
        """How many partitions progress counts."""
        return len(self.counted)

    def finalize(self, results: Any) -> Any:
        """Build the collection's result from its computed output keys."""
        finalize, extra = self.collection.__dask_postcompute__()
        return finalize(results, *extra)


def _is_frame(collection: Any) -> bool:
    frames = sys.modules.get("dask.dataframe")
    return frames is not None and isinstance(
        collection, (frames.DataFrame, frames.Series, frames.Index)
    )


class _LocalProgress:
    """``progress(done, total)`` per finished partition on Dask's local schedulers.

    A Dask callback that counts only the tasks of :attr:`_Plan.counted`:
    intermediate tasks (reading, fused steps, the final concatenation) do not
    move it. Local schedulers call ``posttask`` from the thread that drives
    the computation, so calls are sequential and ``done`` never decreases.
    """

    def __init__(self, progress: Callable[[int, int], None], plan: _Plan) -> None:
        from dask.callbacks import Callback

        self.progress = progress
        self.pending = set(plan.counted)
        self.total = plan.total
        self.done = 0
        self.callback = Callback(start_state=self._start_state, posttask=self._posttask)

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        # Keys that hold data rather than a task are done before anything runs.
        cached = [k for k in self.pending if k in state.get("cache", {})]
        self.pending.difference_update(cached)
        self.done = len(cached)
        self.progress(self.done, self.total)

    def _posttask(
        self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any
    ) -> None:
        if key in self.pending:
            self.pending.discard(key)
            self.done += 1
            self.progress(self.done, self.total)


def compute(
    collection: Any,
    *,
    client: Any = None,
    progress: Callable[[int, int], None] | bool | None = None,
    stage: str | None = None,
) -> Any:
    """Compute a Dask collection where work runs, with optional progress.

    This is the one place that reports progress: every long-running function
    of the package (``merge_into_store``, ``run_detectors``, ``map_snips``,
    the ``write_*`` exporters) passes its ``progress`` here.

    Parameters
    ----------
    collection : dask collection
        Usually a ``dask.dataframe.DataFrame``; anything else is returned as is.
    client : distributed.Client, optional
        Default the active client (:func:`get_client`); with none, Dask's
        configured local scheduler.
    progress : callable or bool, optional
        ``progress(done, total)`` once as the computation starts
        (``done == 0``, or the partitions that were already in memory) and
        then once per finished partition, ending with ``done == total``.
        ``total`` is the number of output partitions (a DataFrame's
        ``npartitions``; for a single-output collection such as
        ``to_parquet(..., compute=False)``, the tasks its final step gathers:
        one per file written) and never changes during a computation; ``done``
        never decreases. With a distributed client the calls come from
        ``distributed.as_completed`` on per-partition futures; on a local
        scheduler from a Dask callback that counts only those partitions'
        tasks. Either way they run in the calling thread. ``True`` shows
        Dask's own bar instead (a widget in Jupyter).
    stage : str, optional
        Name of the ``distributed.span`` the computation runs in (shown on the
        dashboard), e.g. ``"merge"``.

    Returns
    -------
    object
        The computed result (a pandas DataFrame for a Dask DataFrame).

    Raises
    ------
    ClusterError
        If the cluster lost work it cannot recompute (a worker died holding
        the only copy of a scattered piece) or went away.

    Notes
    -----
    Triggers computation. The collection is optimised once, here, and the
    optimised graph is what runs; a single-output collection reports its last
    partition just before its final (gathering) step runs.

    Examples
    --------
    >>> import dask
    >>> import pipeline
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=2, n_frames=3, seed=0)
    >>> seen = []
    >>> with dask.config.set(scheduler="sync"):
    ...     snips = pipeline.snips_from_store(store, npartitions=2)
    ...     table = compute(snips, progress=lambda d, t: seen.append((d, t)))
    >>> len(table) == store.counts()["snips"], seen
    (True, [(0, 2), (1, 2), (2, 2)])
    """
    import dask

    if not dask.is_dask_collection(collection):
        return collection
    found = get_client(client)
    if found is None:
        return _compute_local(collection, progress)
    return _compute_distributed(collection, found, progress, stage)


def _local_get(name: str) -> Callable[..., Any]:
    """The get function of one of Dask's local schedulers.

    Configured by name, Dask imports ``distributed`` on every compute to look
    for a client (1.5 s the first time); configured as the function itself, it
    runs it directly.
    """
    if name == "sync":
        from dask.local import get_sync

        return get_sync
    if name == "processes":
        from dask.multiprocessing import get

        return get
    from dask.threaded import get

    return get


def compute_with_progress(
    collection: Any, progress: Callable[[int, int], None] | None, client: Any = None
) -> Any:
    """:func:`compute` with a ``progress(done, total)`` callable (or None)."""
    return compute(collection, client=client, progress=progress)


def _compute_local(
    collection: Any, progress: Callable[[int, int], None] | bool | None
) -> Any:
    if progress is True:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            return collection.compute()
    if not callable(progress):
        return collection.compute()
    import dask

    plan = _Plan(collection)
    with _LocalProgress(progress, plan).callback:
        # Already optimised: running it as is keeps the keys progress counts.
        (result,) = dask.compute(plan.collection, optimize_graph=False)
    return result


def _compute_distributed(
    collection: Any, client: Any, progress: Any, stage: str | None
) -> Any:
    # Built outside the span: Dask warns about annotations while building
    # collections.
    plan = _Plan(collection)
    with _span(stage), _cluster_failures():
        results = _run(client, plan, progress)
    return plan.finalize(results)


def _run(client: Any, plan: _Plan, progress: Any) -> Any:
    from distributed import as_completed

    # One submission for the outputs and the counted partitions: a future per
    # partition to follow, and every task runs once.
    outputs, counted = client.get(
        dict(plan.graph), [plan.keys, plan.counted], sync=False
    )
    if callable(progress):
        total = len(counted)
        progress(0, total)
        for done, _ in enumerate(as_completed(counted), start=1):
            progress(done, total)
    elif progress is True:
        from distributed import progress as dask_progress

        dask_progress(counted)
    return client.gather(outputs)


def settle(client: Any = None, timeout: float = 5.0) -> None:
    """Wait until an embedded cluster's workers have dropped the data nothing refers to.

    Dropping a computation's futures (a scattered snip table, gathered
    results) only asks the scheduler to have the workers forget them; that
    happens a moment later. A command about to grow the store in memory waits
    for it here, so the table is not still held at its peak. Only for the
    cluster this process started (all of whose data is its own); otherwise,
    and on the local schedulers, it returns at once.

    Parameters
    ----------
    client : distributed.Client, optional
        Default the active client (:func:`get_client`).
    timeout : float, default 5.0
        Seconds to wait at most.
    """
    client = get_client(client)
    if client is None or getattr(client, "cluster", None) is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = {key for keys in client.has_what().values() for key in keys}
        if held <= set(client.futures):
            return
        time.sleep(0.02)


def scatter_pieces(client: Any, pieces: Sequence[Any], label: str) -> list[Any]:
    """Scatter in-memory pieces to the workers (one copy each).

    Parameters
    ----------
    client : distributed.Client
        Where to scatter.
    pieces : sequence of pandas.DataFrame
        The pieces.
    label : str
        Prefix of their keys (shown on the dashboard).

    Returns
    -------
    list of distributed.Future
        One per piece, in order.
    """
    token = uuid.uuid4().hex
    keys = [f"{label}-piece-{token}-{i}" for i in range(len(pieces))]
    # hash=False and our own keys: hashing a million rows is slow.
    futures = client.scatter(dict(zip(keys, pieces, strict=True)), hash=False)
    return [futures[key] for key in keys]


@contextlib.contextmanager
def _span(stage: str | None) -> Iterator[None]:
    """A ``distributed.span`` named after the command (if any) and *stage*."""
    tags = [t for t in (_COMMAND.get(), stage) if t]
    if not tags:
        yield
        return
    from distributed import span

    with span(*tags):
        yield


@contextlib.contextmanager
def _cluster_failures() -> Iterator[None]:
    """Turn a lost worker or scheduler into :class:`ClusterError`."""
    try:
        yield
    except BaseException as err:
        if type(err).__name__ not in _CLUSTER_FAILURES or isinstance(
            err, PipelineError
        ):
            raise
        msg = (
            f"the Dask cluster lost work it could not recompute ({type(err).__name__}: {err}); "
            "nothing was written. Check the workers (their logs, memory limits) and rerun the "
            "command, or run it in-process without --scheduler."
        )
        raise ClusterError(msg) from err


# ------------------------------------------------------------------ runtime
def _free_dashboard(address: str) -> str:
    """*address* if its port is free, else the same host on a random free port."""
    host, _, port = address.rpartition(":")
    host = host or "127.0.0.1"
    if port in ("", "0"):
        return f"{host}:0"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            return f"{host}:0"
    return f"{host}:{port}"


def _parse_scheduler(value: str | None) -> str:
    """``local``, a local scheduler name, or a scheduler address.

    Imports nothing beyond the standard library: the command line asks
    before it reads a store, when Dask is not imported yet. Without *value*,
    Dask's ``scheduler-address`` setting is consulted once Dask is imported
    (:func:`open_runtime` imports it first, so the runtime sees every
    source); before that, ``DASK_SCHEDULER_ADDRESS`` only, so an address
    given only in a Dask YAML file is not seen by that early question.
    """
    if value is None:
        value = (
            _configured_address()
            or os.environ.get("DASK_SCHEDULER_ADDRESS")
            or DEFAULT_SCHEDULER
        )
    value = str(value).strip()
    if value in LOCAL_SCHEDULERS:
        return LOCAL_SCHEDULERS[value]
    if value in ("local", "distributed"):
        return "local"
    if "://" in value or value.rpartition(":")[2].isdigit():
        return value if "://" in value else f"tcp://{value}"
    msg = (
        f"--scheduler {value!r} is neither a scheduler address (tcp://host:8786) nor one of "
        f"local, {', '.join(sorted(set(LOCAL_SCHEDULERS.values())))}"
    )
    raise ValueError(msg)


def _configured_address() -> str | None:
    """Dask's ``scheduler-address`` setting, if Dask is imported already (else None)."""
    config = sys.modules.get("dask.config")
    return None if config is None else config.get("scheduler-address", None)


def _progress_minimum() -> float:
    """Seconds a computation runs before its bar appears (``pipeline.progress-minimum``)."""
    import dask

    return float(dask.config.get("pipeline.progress-minimum", 0.5))


def _show_progress(quiet: bool) -> bool:
    if quiet:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def open_runtime(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    dashboard_address: str | None = DEFAULT_DASHBOARD,
    performance_report: str | None = None,
    quiet: bool = False,
    progress: bool | None = None,
    label: str | None = None,
    _starting: _Starting | None = None,
) -> Iterator[Any]:
    """Run the enclosed computations where *scheduler* says, then tear down.

    Parameters
    ----------
    scheduler : str, optional
        A scheduler address (``tcp://host:8786``); ``local`` (an embedded
        ``LocalCluster``); or ``sync``, ``threads``, ``processes``. Default
        ``DASK_SCHEDULER_ADDRESS`` if set, else :data:`DEFAULT_SCHEDULER`.
    workers : int, optional
        Embedded cluster: this many worker processes (default one in-process
        worker). Local ``processes`` scheduler: the pool size.
    threads_per_worker : int, optional
        Embedded cluster: threads of each worker (default the cores divided
        among the workers). Local ``threads`` scheduler: the pool size.
    memory_limit : str, optional
        Embedded cluster: memory limit per worker (``"4GB"``, ``"auto"``).
    dashboard_address : str or None, default DEFAULT_DASHBOARD
        Embedded cluster: where its dashboard listens (a free port when that
        one is taken); None for no dashboard.
    performance_report : str, optional
        Write Dask's HTML performance report to this file (distributed only).
    quiet : bool, default False
        Print neither the dashboard link nor a progress bar.
    progress : bool, optional
        Show a progress bar on standard error; default when it is a terminal
        and not *quiet*.
    label : str, optional
        Outer ``distributed.span`` of what :func:`compute` runs inside (the
        command's name), and the progress bar's label.
    _starting : optional
        A client :func:`start_early` is starting for the same options: it is
        waited for instead of starting another.

    Yields
    ------
    distributed.Client or None
        The client, or None on a local scheduler.

    Raises
    ------
    ClusterError
        If the scheduler cannot be reached, or the cluster lost work.
    ValueError
        For an unknown *scheduler* or options that do not apply to it.
    """
    import dask  # first: the scheduler may come from its configuration

    target = _parse_scheduler(scheduler)
    show = _show_progress(quiet) if progress is None else bool(progress)
    if target in ("sync", "threads", "processes"):
        if performance_report:
            msg = f"--performance-report needs a distributed scheduler (the default, or an address), not {target!r}"
            raise ValueError(msg)
        pool = (
            workers
            if target == "processes"
            else threads_per_worker
            if target == "threads"
            else None
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                dask.config.set(
                    scheduler=_local_get(target), **({"num_workers": pool} if pool else {})
                )
            )
            if show:
                from dask.diagnostics import ProgressBar

                stack.enter_context(
                    ProgressBar(minimum=_progress_minimum(), out=sys.stderr)
                )
            yield None
        return
    if target != "local" and (workers or threads_per_worker or memory_limit):
        msg = "--workers, --threads-per-worker and --memory-limit size the embedded cluster; size a running cluster where it is started"
        raise ValueError(msg)
    options = (workers, threads_per_worker, memory_limit, dashboard_address)
    with contextlib.ExitStack() as stack:
        if _starting is not None and _starting.matches(target, options):
            client = _starting.adopt(stack)
        else:
            client = _start_client(target, stack, *options)
        if not quiet:
            link = _dashboard_link(client)
            print(
                f"dashboard: {link}"
                if link
                else "dashboard: not available (the scheduler serves none)",
                file=sys.stderr,
                flush=True,
            )
        if performance_report:
            from distributed import performance_report as report

            stack.enter_context(report(filename=performance_report))
        if show:
            stack.enter_context(
                _ProgressWatcher(client, label or "work", minimum=_progress_minimum())
            )
        stack.enter_context(_cluster_failures())
        token = _COMMAND.set(label)
        stack.callback(_COMMAND.reset, token)
        yield client


class _Starting:
    """A distributed client being started on a thread while the caller does other work.

    Made by :func:`start_early`; :func:`open_runtime` adopts it when its
    options are the same (it then waits for it), and :meth:`close` stops
    whatever was started and not adopted.
    """

    def __init__(self, target: str, options: tuple[Any, ...]) -> None:
        self.target, self.options = target, options
        self._stack = contextlib.ExitStack()
        self._client: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pipeline-cluster-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._client = _start_client(self.target, self._stack, *self.options)
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread by adopt()
            self._error = err

    def matches(self, target: str, options: tuple[Any, ...]) -> bool:
        """Whether this is the client :func:`open_runtime` would start for these options."""
        return (target, options) == (self.target, self.options)

    def adopt(self, stack: contextlib.ExitStack) -> Any:
        """Wait for the client and hand its tear-down to *stack*; raises what the start raised."""
        self._thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
        stack.enter_context(self._stack.pop_all())
        return self._client

    def close(self) -> None:
        """Stop the client and cluster if they were not adopted."""
        self._thread.join()
        self._error = None
        self._stack.close()


def start_early(args: argparse.Namespace) -> _Starting | None:
    """Start the distributed client ``args`` asks for on a thread, or None.

    The command line calls this once its input has passed its checks and it
    still has work of its own that does not need Dask (the snip table's
    sort): the embedded cluster's start (about 1 s, mostly in its own event
    loop's thread) then overlaps that work. :func:`runtime_from_args` adopts
    it. None for Dask's local schedulers and for options the runtime will
    refuse (it says why).
    """
    import dask  # noqa: F401 - first: the scheduler may come from its configuration

    try:
        target = _parse_scheduler(getattr(args, "scheduler", None))
    except ValueError:
        return None
    workers, threads_per_worker, memory_limit, dashboard_address = _options(args)
    if target in ("sync", "threads", "processes") or (
        target != "local" and (workers or threads_per_worker or memory_limit)
    ):
        return None
    return _Starting(target, (workers, threads_per_worker, memory_limit, dashboard_address))


def _options(args: argparse.Namespace) -> tuple[Any, ...]:
    """``(workers, threads_per_worker, memory_limit, dashboard_address)`` of a subcommand's options."""
    dashboard = getattr(args, "dashboard_address", DEFAULT_DASHBOARD)
    return (
        getattr(args, "workers", None),
        getattr(args, "threads_per_worker", None),
        getattr(args, "memory_limit", None),
        None if str(dashboard).lower() in ("none", "") else dashboard,
    )


def _start_client(
    target: str,
    stack: contextlib.ExitStack,
    workers: int | None,
    threads_per_worker: int | None,
    memory_limit: str | None,
    dashboard_address: str | None,
) -> Any:
    import logging

    import dask
    from distributed import Client, LocalCluster

    if target != "local":
        try:
            client = Client(
                target,
                timeout=dask.config.get("pipeline.connect-timeout", "10s"),
                set_as_default=True,
            )
        except (OSError, TimeoutError) as err:
            msg = (
                f"cannot reach the Dask scheduler at {target} ({err}); start one with "
                "`dask scheduler` and `dask worker ADDRESS`, or omit --scheduler to run on this machine"
            )
            raise ClusterError(msg) from err
        stack.callback(client.close)
        return client
    cores = os.cpu_count() or 1
    # Without a dashboard the scheduler still serves health checks over HTTP:
    # on a free port of 127.0.0.1, never on the default 8787.
    dashboard = _free_dashboard(dashboard_address or "127.0.0.1:0")
    common: dict[str, Any] = {
        "dashboard_address": dashboard,
        "scheduler_kwargs": {"dashboard": bool(dashboard_address)},
        "silence_logs": logging.ERROR,
        "memory_limit": memory_limit or "auto",
    }
    if workers:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads_per_worker or max(1, cores // workers),
            processes=True,
            host="127.0.0.1",
            **common,
        )
    else:
        # In-process: the worker shares the client's memory, so the snip table
        # and the change sets are never serialised (inproc:// transport).
        cluster = LocalCluster(
            n_workers=1,
            threads_per_worker=threads_per_worker or cores,
            processes=False,
            **common,
        )
    stack.callback(cluster.close)
    client = Client(cluster, set_as_default=True)
    stack.callback(client.close)
    return client


def _dashboard_link(client: Any) -> str | None:
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - an old scheduler without services info: trust the link
        return str(client.dashboard_link)
    if "dashboard" not in services:
        return None
    if getattr(client, "cluster", None) is not None:
        # Embedded: it listens on 127.0.0.1 only, whatever the machine's name.
        return f"http://127.0.0.1:{services['dashboard']}/status"
    return str(client.dashboard_link)


class _StderrBar:
    """Distributed's progress bar for some keys, drawn on standard error."""

    def __init__(
        self, keys: list[Any], client: Any, label: str, width: int = 30
    ) -> None:
        from distributed.diagnostics.progressbar import ProgressBar

        class Bar(ProgressBar):
            def _draw_bar(inner, remaining: int, all: int, **kwargs: Any) -> None:
                frac = (1 - remaining / all) if all else 1.0
                elapsed = inner.elapsed
                sys.stderr.write(
                    f"\r{label}: [{'#' * int(width * frac):<{width}}] {int(100 * frac):3d}% "
                    f"{all - remaining}/{all} tasks | {elapsed:5.1f}s"
                )
                sys.stderr.flush()

            def _draw_stop(inner, **kwargs: Any) -> None:
                sys.stderr.write("\n")
                sys.stderr.flush()

        self.bar = Bar(
            keys, scheduler=client.scheduler.address, interval="200ms", complete=True
        )
        self.bar.client = weakref.ref(client)
        self.client = client

    def run(self) -> None:
        self.client.sync(self.bar.listen)

    def abort(self) -> None:
        comm = getattr(self.bar, "comm", None)
        if comm is not None:
            comm.abort()


class _ProgressWatcher:
    """Draw a bar for every computation the client starts that lasts > 0.5 s.

    Computations come from this package (:func:`compute`) and from Dask
    itself (``to_parquet``, ``dask.compute``): all leave futures on the
    client, so the watcher follows ``client.futures`` rather than each caller.
    """

    def __init__(self, client: Any, label: str, minimum: float = 0.5) -> None:
        self.client = client
        self.label = label
        self.minimum = minimum
        self.stop = threading.Event()
        self.bar: _StderrBar | None = None
        self.thread = threading.Thread(
            target=self._run, name="pipeline-progress", daemon=True
        )

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Let a bar whose work is done draw its last (100%) frame before
        # stopping it: it redraws every 200 ms.
        deadline = time.monotonic() + 1.0
        while self.bar is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stop.set()
        if self.bar is not None:
            self.bar.abort()
        self.thread.join(timeout=5)

    def _pending(self, keys: set[Any]) -> list[Any]:
        states = dict(self.client.futures)
        return [k for k in keys if k in states and states[k].status == "pending"]

    def _run(self) -> None:
        seen: set[Any] = set()
        while not self.stop.is_set():
            try:
                new = set(dict(self.client.futures)) - seen
                seen |= new
                pending = self._pending(new)
                if pending and not self.stop.wait(self.minimum):
                    pending = self._pending(set(pending))
                    if pending:
                        self.bar = _StderrBar(pending, self.client, self.label)
                        self.bar.run()
                        self.bar = None
            except Exception:  # noqa: BLE001 - a bar must never break the work it watches
                self.bar = None
            self.stop.wait(0.1)


# ---------------------------------------------------------------------- CLI
def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--scheduler``, ``--workers``, ... (where work runs) to a subcommand."""
    group = parser.add_argument_group("where work runs")
    group.add_argument(
        "--scheduler",
        metavar="ADDRESS|local|sync|threads|processes",
        default=None,
        help=(
            "tcp://host:8786 to use a running Dask cluster (default $DASK_SCHEDULER_ADDRESS if set); "
            "'local' for an embedded cluster on 127.0.0.1 (the default); sync, threads or processes "
            "for Dask's local schedulers (debugging, no dashboard)"
        ),
    )
    group.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="embedded cluster: N worker processes (default: one in-process worker)",
    )
    group.add_argument(
        "--threads-per-worker",
        type=_positive_int,
        metavar="N",
        help="embedded cluster: threads per worker (default: the cores shared among the workers)",
    )
    group.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="embedded cluster: memory limit per worker, e.g. 4GB (default: auto)",
    )
    group.add_argument(
        "--dashboard-address",
        default=DEFAULT_DASHBOARD,
        metavar="HOST:PORT",
        help="embedded cluster: where the dashboard listens (default %(default)s, a free port if taken; 'none' for no dashboard)",
    )
    group.add_argument(
        "--performance-report",
        metavar="FILE.html",
        help="write Dask's performance report to this file (distributed schedulers)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


@contextlib.contextmanager
def runtime_from_args(args: argparse.Namespace) -> Iterator[Any]:
    """:func:`open_runtime` configured from a subcommand's parsed options.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options of a subcommand that called :func:`add_cluster_options`;
        ``args.starting_client`` (from :func:`start_early`), if set, is adopted
        (and cleared: it serves one runtime).

    Yields
    ------
    distributed.Client or None
        The client, or None on a local scheduler.
    """
    from pipeline.cli._common import UsageError

    report = getattr(args, "performance_report", None)
    quiet = bool(getattr(args, "quiet", False))
    workers, threads_per_worker, memory_limit, dashboard_address = _options(args)
    # An early start serves one runtime: a later one starts its own.
    starting, args.starting_client = getattr(args, "starting_client", None), None
    with contextlib.ExitStack() as stack:
        try:
            client = stack.enter_context(
                open_runtime(
                    getattr(args, "scheduler", None),
                    workers=workers,
                    threads_per_worker=threads_per_worker,
                    memory_limit=memory_limit,
                    dashboard_address=dashboard_address,
                    performance_report=report,
                    quiet=quiet,
                    label=getattr(args, "command", None),
                    _starting=starting,
                )
            )
        except ValueError as err:
            # Only set-up errors are usage errors; the work's own errors pass through.
            if isinstance(err, PipelineError):
                raise
            raise UsageError(str(err)) from err
        yield client
    if report and not quiet:
        print(f"performance report: {report}", file=sys.stderr)
