"""Resource estimates (issue 10): ``pipeline.estimate_resources`` and ``info --estimate``."""

from __future__ import annotations

import dataclasses
import sys

import pytest

import pipeline
from pipeline.cli import main
from pipeline.errors import StoreFormatError
from pipeline.estimate import (
    COSTS,
    OPERATIONS,
    ResourceEstimate,
    calibrate,
    measure_command,
    store_size,
)
from pipeline.shards import shard_store
from pipeline.store import Store
from pipeline.testing import make_cohort, make_store

GiB = 1024**3


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A single-file store under 1 MiB, its snip count, and a sharded copy."""
    root = tmp_path_factory.mktemp("estimate")
    path = root / "store.json"
    store = make_store(n_experiments=3, n_embryos=8, n_frames=20, seed=0)
    store.save(path, backups=0)
    sharded = root / "sharded"
    shard_store(path, sharded)
    return path, store.counts()["snips"], sharded


def test_single_file_prediction_and_recommendation(small):
    path, n, _ = small
    est = pipeline.estimate_resources(path, "export")
    assert isinstance(est, ResourceEstimate)
    assert (est.operation, est.layout, est.n_snips, est.n_snips_source) == ("export", "single", n, "counted")
    assert est.store_bytes == path.stat().st_size
    assert est.choice == "in-process"
    assert est.workers == 0
    assert est.recommended_workers == 0
    assert est.worker_peak_bytes is None
    assert est.peak_bytes == est.client_peak_bytes
    assert est.seconds == pytest.approx(sum(s for _, s, _ in est.stages))
    assert est.client_peak_bytes >= max(p for _, _, p in est.stages if p)
    assert [s[0] for s in est.stages][:3] == ["startup", "cluster", "dashboard"]
    quiet = pipeline.estimate_resources(path, "export", dashboard=False)
    assert "dashboard" not in {s[0] for s in quiet.stages}
    assert quiet.seconds < est.seconds
    assert {"load", "export", "overhead"} <= {s[0] for s in est.stages}
    assert est.n_rows is None
    assert est.warnings == ()
    assert f"embryo-pipeline export {path} OUT" == est.command
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.seconds = 0.0  # type: ignore[misc]
    text = est.summary()
    assert "export" in text
    assert "recommendation: in-process" in text
    assert str(est) == text
    html = est._repr_html_()
    assert "<table>" in html
    assert "in-process" in html
    assert "assumptions" in html


def test_assign_rows_and_sync_scheduler(small):
    path, n, _ = small
    default = pipeline.estimate_resources(path, "assign")
    assert default.n_rows == max(1, round(n / 50))
    more = pipeline.estimate_resources(path, "assign", n_rows=50_000)
    assert more.n_rows == 50_000
    assert more.seconds > default.seconds
    sync = pipeline.estimate_resources(path, "assign", scheduler="sync")
    assert sync.scheduler == "sync"
    assert "cluster" not in {s[0] for s in sync.stages}
    assert sync.seconds < default.seconds
    assert [s[0] for s in default.stages][-3:] == ["assign", "merge_assign", "overhead"]
    detect = pipeline.estimate_resources(path, "detect", speed=2.0)
    assert detect.speed == 2.0
    assert detect.seconds == pytest.approx(2 * pipeline.estimate_resources(path, "detect").seconds)


def test_open_store_uses_its_table(small):
    path, n, _ = small
    est = pipeline.estimate_resources(pipeline.read_store(path), "detect")
    assert (est.n_snips, est.n_snips_source, est.store_bytes) == (n, "table", path.stat().st_size)
    in_memory = pipeline.estimate_resources(make_store(seed=1), "detect")
    assert in_memory.path is None
    assert in_memory.n_snips_source == "table"
    assert "embryo-pipeline detect STORE" in in_memory.command


def test_sampled_count_of_a_bigger_file(tmp_path):
    path = tmp_path / "store.json"
    store = Store(make_cohort(6_000, seed=3))
    store.save(path, backups=0)
    assert path.stat().st_size > 1024**2
    size = store_size(path)
    assert size["source"] == "sampled"
    assert size["n_snips"] == pytest.approx(store.counts()["snips"], rel=0.1)


def test_sharded_store_is_sized_from_files(small):
    _path, n, sharded = small
    size = store_size(sharded)
    assert size["layout"] == "sharded"
    assert size["n_shards"] == 3
    assert size["n_snips"] == pytest.approx(n, rel=0.2)
    assert 0 < size["largest_shard_snips"] <= size["n_snips"]
    assert store_size(sharded / "store.json") == size
    est = pipeline.estimate_resources(sharded, "assign")
    assert est.layout == "sharded"
    assert est.choice == "in-process"
    assert any(name.startswith("merge_assign") for name, _, _ in est.stages)
    opened = pipeline.estimate_resources(pipeline.read_store(sharded), "export")
    assert opened.layout == "sharded"
    assert opened.n_snips == size["n_snips"]


def test_big_single_file_is_sharded_first(small):
    path, _, _ = small
    est = pipeline.estimate_resources(path, "assign", n_snips=5_000_000, memory_total=24 * GiB, cpu_count=2)
    assert est.n_snips_source == "given"
    assert est.memory_budget == 6 * GiB
    assert est.client_peak_bytes > 6 * GiB
    assert est.choice == "shard-first"
    assert est.command.startswith("embryo-pipeline shard ")
    assert est.warnings == ()
    small_budget = pipeline.estimate_resources(path, "export", memory_budget=1024)
    assert small_budget.choice == "shard-first"
    assert small_budget.warnings == ()


def test_big_sharded_store_gets_workers(small):
    _, _, sharded = small
    est = pipeline.estimate_resources(sharded, "export", n_snips=3_000_000, memory_total=256 * GiB, cpu_count=8)
    assert est.choice == "local-cluster"
    assert est.recommended_workers == est.workers == 8
    assert est.worker_peak_bytes is not None
    assert est.command.endswith("--workers 8")
    one = pipeline.estimate_resources(sharded, "export", n_snips=3_000_000, workers=0, memory_total=256 * GiB, cpu_count=8)
    assert one.workers == 0
    assert one.seconds > est.seconds
    assert one.choice == "local-cluster"
    merge = pipeline.estimate_resources(sharded, "detect", n_snips=5_000_000, memory_total=256 * GiB, cpu_count=8)
    assert [name for name, _, _ in merge.stages if name.startswith("merge")] == ["merge_detect, shard by shard (workers)"]
    # The merge runs shard by shard on the workers: a 5M-snip cohort's client
    # stays small (the benchmark's 5M client peaked at 1.46 GiB) ...
    assert merge.client_peak_bytes < 6 * GiB
    assert not any("split the batch by experiment" in w for w in merge.warnings)
    # ... but still grows with the cohort (its change log and the flags it holds).
    cohort = pipeline.estimate_resources(sharded, "detect", n_snips=100_000_000, memory_total=256 * GiB, cpu_count=8)
    assert cohort.client_peak_bytes > 6 * GiB
    assert any("split the batch by experiment" in w for w in cohort.warnings)
    lone = pipeline.estimate_resources(sharded, "export", n_snips=3_000_000, memory_total=256 * GiB, cpu_count=1)
    assert lone.choice == "in-process"
    huge = pipeline.estimate_resources(sharded, "export", n_snips=60_000_000, memory_total=256 * GiB, cpu_count=8)
    assert any("largest shard" in w for w in huge.warnings)


def test_bad_arguments_and_stores(small, tmp_path):
    path, _, _ = small
    with pytest.raises(ValueError, match="unknown operation"):
        pipeline.estimate_resources(path, "merge")
    with pytest.raises(ValueError, match="workers"):
        pipeline.estimate_resources(path, "export", workers=-1)
    with pytest.raises(ValueError, match="scheduler"):
        pipeline.estimate_resources(path, "export", scheduler="threads")
    with pytest.raises(ValueError, match="no workers"):
        pipeline.estimate_resources(path, "export", scheduler="sync", workers=2)
    with pytest.raises(FileNotFoundError):
        pipeline.estimate_resources(tmp_path / "missing.json", "export")
    with pytest.raises(StoreFormatError, match=r"without a store\.json"):
        pipeline.estimate_resources(tmp_path, "export")
    (tmp_path / "notes.txt").write_text("not a store")
    with pytest.raises(StoreFormatError, match="not a JSON store"):
        pipeline.estimate_resources(tmp_path / "notes.txt", "export")
    broken = tmp_path / "broken"
    (broken / "experiments").mkdir(parents=True)
    (broken / "store.json").write_text('{"shards": {"20240101": "experiments/20240101.json"}}')
    with pytest.raises(StoreFormatError, match="does not exist"):
        store_size(broken)


def test_cli_info_estimate(small, capsys):
    path, n, sharded = small
    assert main(["info", str(path), "--estimate"]) == 0
    out = capsys.readouterr().out
    for op in OPERATIONS:
        assert f"\n{op}: {n:,} snips" in out
    assert out.count("recommendation: in-process") == 3
    assert "assumptions:" in out
    assert main(["info", str(sharded), "--estimate", "--rows", "123"]) == 0
    out = capsys.readouterr().out
    assert "sharded store" in out
    assert "123 assignment rows" in out


def test_cli_info_estimate_errors(small, tmp_path, capsys):
    path, _, _ = small
    assert main(["info", str(tmp_path / "missing.json"), "--estimate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embryo-pipeline: error: no such file")
    assert "Traceback" not in err
    assert main(["info", str(path), "--estimate", "--rows", "0"]) == 2
    assert "--rows must be at least 1" in capsys.readouterr().err
    assert main(["info", str(path), "--rows", "5"]) == 2
    assert "go with --estimate" in capsys.readouterr().err


def test_prediction_within_2x_of_a_real_export(tmp_path):
    """The issue's check: a real ``embryo-pipeline export`` against its estimate.

    The command runs as a user would (the default in-process cluster; no
    dashboard, as in the benchmark) on a generated store of about 150,000
    snips, in a fresh process whose wall time and peak RSS are measured
    (:func:`pipeline.estimate.measure_command`).

    Memory is compared as is. Time depends on how fast and how busy the
    machine is, so the prediction is scaled to the moment: this process runs
    :func:`pipeline.estimate.calibrate` (a fixed piece of the same load path,
    on one core) just before and just after the command, and their mean over
    the calibration recorded with the cost table is the speed factor. On a
    slower or busier CI machine both the calibration and the command slow
    down, so the ratio stays near where it is here (see
    ``benchmarks/RESULTS.md``, "Resource estimates (issue 10)"). Sampling the
    calibration while the command runs was tried and rejected: it competes
    with the command for the cores and overstates the slowdown by about 1.5x.
    """
    path = tmp_path / "store.json"
    Store(make_cohort(150_000, seed=2)).save(path, backups=0)
    before = calibrate(7)
    run = measure_command([sys.executable, "-m", "pipeline", "export", str(path), str(tmp_path / "out"),
                           "--quiet", "--dashboard-address", "none"])
    after = calibrate(7)
    assert run["returncode"] == 0
    speed = (before + after) / 2 / COSTS["calibration"]
    est = pipeline.estimate_resources(path, "export", workers=0, speed=speed, dashboard=False)
    assert est.choice == "in-process"
    assert est.n_snips_source == "sampled"
    time_ratio = run["wall"] / est.seconds
    memory_ratio = run["peak"] / est.client_peak_bytes
    detail = (f"measured {run['wall']:.1f} s, {run['peak'] / 2**20:.0f} MiB; predicted {est.seconds:.1f} s, "
              f"{est.client_peak_bytes / 2**20:.0f} MiB (speed {speed:.2f})")
    assert 0.5 <= time_ratio <= 2.0, detail
    assert 0.5 <= memory_ratio <= 2.0, detail
