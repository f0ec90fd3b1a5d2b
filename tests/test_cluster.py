"""Where work runs: real ``dask scheduler`` / ``dask worker`` processes, the
embedded cluster, local schedulers, progress, dashboard and worker failure.

The cluster tests start a scheduler and two single-threaded worker processes
on 127.0.0.1 (random free ports), run the CLI against them with
``--scheduler tcp://...`` and compare the store with the one the synchronous
scheduler writes. Every process is started in its own session and killed with
its group at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dask
import pandas as pd
import pytest

import pipeline
from pipeline import cluster
from pipeline._partitions import from_pieces
from pipeline.cli import COMMANDS, main
from pipeline.testing import make_assignments, make_store

pytestmark = pytest.mark.distributed

DASK = Path(sys.executable).with_name("dask")
_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
)
_BATCH = re.compile(r"b-\d{8}T\d{6}-[0-9a-f]+")

SLOW_DETECTOR = '''
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.detectors import BaseDetector


@dataclass(frozen=True)
class SlowShortBody(BaseDetector):
    """Snips shorter than 900 um, a quarter of a second per partition."""

    level = "snip"
    value = "OUT_OF_FOCUS"
    required_columns = ("length_um",)

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        time.sleep(0.25)
        length = part["length_um"].to_numpy()
        hit = np.flatnonzero(length < 900.0)
        return self.hits(part.index[hit], ["short"] * len(hit), np.full(len(hit), 0.8))
'''


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def counts(http_port: int) -> dict[str, int]:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{http_port}/json/counts.json", timeout=5
    ) as reply:
        return json.loads(reply.read())


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Cluster:
    address: str
    http_port: int
    workers: list[subprocess.Popen]


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def dask_cluster(tmp: Path, *, dashboard: bool) -> Iterator[Cluster]:
    """``dask scheduler`` + 2 ``dask worker --nworkers 1 --nthreads 1`` on 127.0.0.1."""
    port, http_port = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    log = (tmp / "cluster.log").open("ab")

    def start(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(DASK), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    try:
        start(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            f"127.0.0.1:{http_port}",
            *([] if dashboard else ["--no-dashboard"]),
        )
        workers = [
            start(
                "worker",
                address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-nanny",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(tmp / f"worker-{i}"),
            )
            for i in range(2)
        ]
        wait_until(lambda: counts(http_port)["workers"] == 2, 90, "two workers")
        yield Cluster(address, http_port, workers)
    finally:
        for proc in reversed(procs):
            _kill(proc)
        log.close()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with dask_cluster(tmp_path_factory.mktemp("cluster"), dashboard=True) as running:
        yield running


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inputs")
    store = make_store(n_experiments=4, n_embryos=24, n_frames=30, seed=2)
    store.save(tmp / "store.json")
    make_assignments(store, n_rows=200, seed=3).to_csv(tmp / "rows.csv", index=False)
    (tmp / "slow_detector.py").write_text(textwrap.dedent(SLOW_DETECTOR))
    return {
        "store": tmp / "store.json",
        "rows": tmp / "rows.csv",
        "slow": tmp / "slow_detector.py",
    }


def command(name: str, store: Path, inputs: dict[str, Path], out: Path) -> list[str]:
    if name == "assign":
        return [
            "assign",
            str(store),
            str(inputs["rows"]),
            "--author",
            "tester",
            "--npartitions",
            "6",
        ]
    if name == "detect":
        return ["detect", str(store), "--npartitions", "6"]
    return ["export", str(store), str(out)]


def cli(args: list[str], timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def normalised(path: Path) -> object:
    """The store's JSON with timestamps and batch ids blanked out."""
    text = _BATCH.sub("<batch>", _TIMESTAMP.sub("<ts>", path.read_text()))
    return json.loads(text)


def exported(folder: Path) -> pd.DataFrame:
    table = pd.read_parquet(folder)
    return table.sort_values(list(table.columns[:2])).reset_index(drop=True)


def takes_scheduler(name: str) -> bool:
    """Whether the CLI has command *name* and it takes ``--scheduler``."""
    if name not in COMMANDS:
        return False
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return "--scheduler" in sub.choices[name]._option_string_actions


@pytest.fixture(scope="module")
def sync_runs(inputs, tmp_path_factory) -> dict[str, tuple[int, Path, Path]]:
    """Each command once on the synchronous scheduler (in-process): the reference."""
    runs = {}
    for name in ("assign", "detect", "export"):
        if not takes_scheduler(name):
            continue
        folder = tmp_path_factory.mktemp(f"sync-{name}")
        store = folder / "store.json"
        store.write_bytes(inputs["store"].read_bytes())
        code = main(
            [
                *command(name, store, inputs, folder / "out"),
                "--scheduler",
                "sync",
                "--quiet",
            ]
        )
        runs[name] = (code, store, folder / "out")
    return runs


# ----------------------------------------------------------- real cluster
@pytest.mark.parametrize("name", ["assign", "detect", "export"])
def test_command_on_a_running_cluster_matches_sync(
    name, shared_cluster, inputs, sync_runs, tmp_path
):
    if not takes_scheduler(name):
        pytest.skip(f"the {name!r} command does not take --scheduler in this CLI yet")
    sync_code, sync_store, sync_out = sync_runs[name]
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    done = cli(
        [
            *command(name, store, inputs, tmp_path / "out"),
            "--scheduler",
            shared_cluster.address,
        ]
    )
    assert done.returncode == sync_code, done.stderr
    assert "Sending large graph" not in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert normalised(store) == normalised(sync_store)
    if name == "export":
        pd.testing.assert_frame_equal(exported(tmp_path / "out"), exported(sync_out))
    # The link to the running cluster's dashboard is printed, and it renders.
    link = re.search(r"dashboard: (http://\S+)", done.stderr)
    assert link, done.stderr
    with urllib.request.urlopen(
        link.group(1).replace("localhost", "127.0.0.1"), timeout=30
    ) as page:
        assert page.status == 200


def test_killed_worker_completes_or_leaves_the_store_untouched(inputs, tmp_path):
    expected_store = tmp_path / "expected.json"
    expected_store.write_bytes(inputs["store"].read_bytes())
    args = ["detect", "--detectors-file", str(inputs["slow"]), "--npartitions", "24"]
    assert (
        main(
            [
                *args[:1],
                str(expected_store),
                *args[1:],
                "--scheduler",
                "sync",
                "--quiet",
            ]
        )
        == 0
    )

    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    before = store.read_bytes()
    with dask_cluster(tmp_path, dashboard=False) as running:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                *args[:1],
                str(store),
                *args[1:],
                "--scheduler",
                running.address,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            # Kill a worker once the slow detector is running on both.
            wait_until(
                lambda: counts(running.http_port)["processing"] >= 2,
                90,
                "tasks to start",
            )
            time.sleep(0.3)
            running.workers[0].kill()
            _, err = proc.communicate(timeout=180)
        finally:
            _kill(proc)
    print(f"killed-worker run: exit {proc.returncode}\n{err[-2000:]}")
    if proc.returncode == 0:
        # Completed on the surviving worker: the same flags as synchronously.
        assert normalised(store) == normalised(expected_store)
    else:
        # Failed cleanly: one-line error, the store byte-identical.
        assert proc.returncode == 2, err
        assert "nothing was written" in err, err
        assert "Traceback" not in err, err
        assert store.read_bytes() == before


def test_unreachable_scheduler_is_a_clean_error(inputs, tmp_path):
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    done = cli(
        ["detect", str(store), "--scheduler", f"tcp://127.0.0.1:{free_port()}"],
        timeout=60,
        env=dict(os.environ, DASK_PIPELINE__CONNECT_TIMEOUT="2s"),
    )
    assert done.returncode == 2
    assert "cannot reach the Dask scheduler" in done.stderr
    assert "Traceback" not in done.stderr
    assert store.read_bytes() == inputs["store"].read_bytes()


# ------------------------------------------------ embedded and local runs
def test_default_embedded_cluster_prints_link_and_writes_report(
    inputs, tmp_path, capsys
):
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    report = tmp_path / "report.html"
    code = main(
        [
            "detect",
            str(store),
            "--dashboard-address",
            "127.0.0.1:0",
            "--performance-report",
            str(report),
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/status", err), err
    assert report.stat().st_size > 10_000
    assert "<html" in report.read_text()[:2000].lower()


def test_quiet_prints_no_link(inputs, tmp_path, capsys):
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    assert main(["detect", str(store), "--quiet", "--dashboard-address", "none"]) == 0
    assert "dashboard" not in capsys.readouterr().err


@pytest.mark.parametrize("where", ["local", "threads"])
def test_embedded_and_local_schedulers_match_sync(where, inputs, sync_runs, tmp_path):
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    args = command("detect", store, inputs, tmp_path / "out")
    assert (
        main([*args, "--quiet", "--scheduler", where, "--dashboard-address", "none"])
        == sync_runs["detect"][0]
    )
    assert normalised(store) == normalised(sync_runs["detect"][1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--scheduler", "sync", "--performance-report", "r.html"],
            "needs a distributed scheduler",
        ),
        (
            ["--scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
            "size the embedded cluster",
        ),
        (["--scheduler", "bogus"], "neither a scheduler address"),
    ],
)
def test_option_errors(args, message, inputs, capsys):
    assert main(["detect", str(inputs["store"]), *args]) == 2
    assert message in capsys.readouterr().err


def test_default_scheduler_from_dask_config_then_the_environment(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert cluster._parse_scheduler(None) == "local"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "host-a:8786")
    assert cluster._parse_scheduler(None) == "tcp://host-a:8786"
    # Dask is imported here: its configuration comes first, as it does for
    # open_runtime (which imports Dask before it asks).
    with dask.config.set({"scheduler-address": "tcp://host-b:8786"}):
        assert cluster._parse_scheduler(None) == "tcp://host-b:8786"
        assert cluster._parse_scheduler("sync") == "sync"


def test_scheduler_address_from_a_dask_config_file(inputs, tmp_path):
    # The command line decides where work runs after it has imported Dask,
    # so Dask's own configuration files still count.
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "pipeline.yaml").write_text("scheduler-address: sync\n")
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    done = cli(
        ["export", str(inputs["store"]), str(tmp_path / "out")],
        env={**env, "DASK_CONFIG": str(config)},
    )
    assert done.returncode == 0, done.stderr
    assert "dashboard" not in done.stderr  # Dask's synchronous scheduler: no cluster
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("where", ["local"])
def test_progress_bar_on_a_terminal(where, inputs, tmp_path):
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    primary, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "detect",
                str(store),
                "--detectors-file",
                str(inputs["slow"]),
                "--npartitions",
                "8",
                "--scheduler",
                where,
                "--dashboard-address",
                "none",
            ],
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=180,
            check=False,
            env=dict(os.environ, DASK_PIPELINE__PROGRESS_MINIMUM="0"),
        )
        os.close(secondary)
        secondary = -1
        chunks = []
        with contextlib.suppress(OSError):
            while data := os.read(primary, 65536):
                chunks.append(data)
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    err = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, err
    assert "100%" in err, err


# --------------------------------------------------------------- Python API
def test_get_client_and_compute(inputs):
    assert cluster.get_client() is None
    store = pipeline.read_store(inputs["store"])
    with dask.config.set(scheduler="sync"):
        expected = pipeline.snips_from_store(store, npartitions=4).compute()
    seen: list[tuple[int, int]] = []
    with cluster.open_runtime("local", dashboard_address=None, quiet=True) as client:
        assert cluster.get_client() is client
        with dask.config.set(scheduler="sync"):
            assert cluster.get_client() is None
        snips = pipeline.snips_from_store(store, npartitions=4)
        # The pieces were scattered: the graph holds futures, not the table.
        graph = dict(snips.__dask_graph__())
        assert not any(isinstance(v, pd.DataFrame) for v in graph.values())
        assert snips.known_divisions
        got = cluster.compute(
            snips, progress=lambda d, t: seen.append((d, t)), stage="flatten"
        )
    pd.testing.assert_frame_equal(got, expected)
    assert seen[0] == (0, 4)
    assert seen[-1] == (4, 4)
    assert cluster.get_client() is None


def test_scattered_graph_stays_small_for_a_large_table():
    big = pd.DataFrame(
        {"x": range(400_000), "y": ["some text"] * 400_000},
        index=pd.RangeIndex(400_000, name="i"),
    )
    pieces = [big.iloc[i : i + 100_000] for i in range(0, 400_000, 100_000)]
    divisions = [p.index[0] for p in pieces] + [pieces[-1].index[-1]]
    with cluster.open_runtime("local", dashboard_address=None, quiet=True) as client:
        lazy = from_pieces(pieces, big.iloc[:0], divisions)
        from distributed.protocol import dumps

        assert len(b"".join(dumps(dict(lazy.__dask_graph__())))) < 200_000
        assert lazy.divisions == tuple(divisions)
        total = client.compute(lazy["x"].sum()).result()
    assert total == big["x"].sum()


def test_settle_waits_until_the_embedded_worker_dropped_released_data(inputs):
    store = pipeline.read_store(inputs["store"])
    with cluster.open_runtime("local", dashboard_address=None, quiet=True) as client:
        snips = pipeline.snips_from_store(store, npartitions=4)
        total = int(cluster.compute(snips["frame"].sum()))
        assert any(client.has_what().values())  # the scattered pieces
        del snips
        cluster.settle()
        assert not any(client.has_what().values())
    assert total == int(store.snip_table()["frame"].sum())
    cluster.settle()  # no client: returns at once


# ------------------------------------------------- a cluster started early
def runtime_args(**options) -> argparse.Namespace:
    """A subcommand's parsed runtime options (the embedded cluster, no dashboard, quiet)."""
    values = {"scheduler": None, "dashboard_address": "none", "quiet": True, "command": "export"}
    return argparse.Namespace(**{**values, **options})


def started_client(starting):
    """The client an early start made (waiting for it), whoever owns it now."""
    starting._thread.join()
    return starting._client


def test_an_early_start_is_adopted_by_the_runtime_and_closed_with_it():
    args = runtime_args()
    starting = cluster.start_early(args)
    assert starting is not None
    args.starting_client = starting
    with cluster.runtime_from_args(args) as client:
        assert cluster.get_client() is client
        # The same client the thread started, not a second cluster.
        assert client is started_client(starting)
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert client.status == "closed"
    assert cluster.get_client() is None
    starting.close()  # nothing left to close


def test_an_early_start_not_adopted_is_closed_by_close():
    starting = cluster.start_early(runtime_args())
    client = started_client(starting)
    assert client.status == "running"
    # Other options: the runtime starts its own client and leaves this one.
    args = runtime_args(threads_per_worker=1, starting_client=starting)
    with cluster.runtime_from_args(args) as other:
        assert other is not client
    starting.close()
    assert client.status == "closed"


@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes", "bogus"])
def test_no_early_start_for_local_schedulers_or_bad_options(scheduler):
    assert cluster.start_early(runtime_args(scheduler=scheduler)) is None
    assert cluster.start_early(runtime_args(scheduler="tcp://127.0.0.1:1", workers=2)) is None


def test_an_early_start_that_fails_raises_when_adopted(monkeypatch):
    monkeypatch.setitem(dask.config.config, "pipeline", {"connect-timeout": "1s"})
    args = runtime_args(scheduler=f"tcp://127.0.0.1:{free_port()}")
    args.starting_client = cluster.start_early(args)
    with pytest.raises(cluster.ClusterError, match="cannot reach the Dask scheduler"), cluster.runtime_from_args(args):
        pass  # pragma: no cover


def test_read_then_runtime_sorts_the_snip_table_while_the_cluster_starts(inputs, monkeypatch):
    from pipeline.cli._common import read_then_runtime

    started: list[bool] = []
    start_early = cluster.start_early

    def watched(args):
        starting = start_early(args)
        started.append(starting)
        return starting

    monkeypatch.setattr(cluster, "start_early", watched)
    args = runtime_args(store=str(inputs["store"]), command="export")
    checked: list[str] = []
    with contextlib.ExitStack() as stack:
        store = read_then_runtime(
            args, stack, document=False, read=lambda: pipeline.read_store(inputs["store"]),
            then=lambda: checked.append("then"),
        )
        assert checked == ["then"]
        assert started  # started early
        assert store.tables().sorted  # sorted before the runtime opened
        client = cluster.get_client()
        assert client is not None
        assert client is started_client(started[0])
        assert args.starting_client is None  # used once
    assert client.status == "closed"


@pytest.mark.parametrize("name", ["assign", "export"])
def test_commands_that_start_their_cluster_early_write_the_report(name, inputs, sync_runs, tmp_path, capsys):
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    report = tmp_path / "report.html"
    args = command(name, store, inputs, tmp_path / "out")
    code = main([*args, "--dashboard-address", "127.0.0.1:0", "--performance-report", str(report)])
    assert code == sync_runs[name][0]
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/status", capsys.readouterr().err)
    assert "<html" in report.read_text()[:2000].lower()
    if name == "assign":
        assert normalised(store) == normalised(sync_runs[name][1])
    else:
        pd.testing.assert_frame_equal(exported(tmp_path / "out"), exported(sync_runs[name][2]))


def test_an_unreachable_scheduler_is_a_clean_error_for_commands_that_start_early(inputs, tmp_path):
    store = tmp_path / "store.json"
    store.write_bytes(inputs["store"].read_bytes())
    done = cli(
        ["export", str(store), str(tmp_path / "out"), "--scheduler", f"tcp://127.0.0.1:{free_port()}"],
        timeout=60,
        env=dict(os.environ, DASK_PIPELINE__CONNECT_TIMEOUT="2s"),
    )
    assert done.returncode == 2
    assert "cannot reach the Dask scheduler" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
