"""The command line of the foundation: validate, info and demo, run as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.cli import main
from pipeline.store import validate_store

MINIMAL = Path(__file__).parent / "data" / "store_minimal.json"


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=240,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("embryo-pipeline: error: ")
    return lines[0]


def test_validate_valid_store() -> None:
    result = run("validate", MINIMAL)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "valid: 2 experiments, 4 embryos, 16 snips"
    assert result.stderr == ""


def test_validate_invalid_store_lists_every_problem(tmp_path: Path) -> None:
    doc = orjson.loads(MINIMAL.read_bytes())
    e1 = doc["embryos"]["20240411_A01_e01"]
    e1["snips"]["20240411_A01_e01_s0001"]["phenotype"]["value"] = "EDMEA"
    e1["death_frame"] = 2
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(doc))
    result = run("validate", path)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"invalid: 2 problem(s) in {path}"
    assert any(
        '$.embryos["20240411_A01_e01"].death_frame: death_frame is 2 but must be null'
        in line
        for line in lines
    )
    assert any(
        "unknown phenotype 'EDMEA' (did you mean 'EDEMA'?)" in line for line in lines
    )
    assert "Traceback" not in result.stderr


def test_validate_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"file_info": {"schema_version": 1,}}\n')
    result = run("validate", path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert "is not valid JSON" in result.stdout
    assert "at line 1, column 35" in result.stdout


def test_info_malformed_json_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"file_info": {"schema_version": 1,}}\n')
    line = one_line_error(run("info", path))
    assert "is not valid JSON" in line
    assert "at line 1, column 35" in line


@pytest.mark.parametrize("command", ["validate", "info"])
def test_missing_file_is_one_line(command: str, tmp_path: Path) -> None:
    line = one_line_error(run(command, tmp_path / "nope.json"))
    assert line == f"embryo-pipeline: error: no such file: {tmp_path / 'nope.json'}"


def test_validate_legacy_file_reports_the_upgrade(tmp_path: Path) -> None:
    legacy = Path(__file__).parents[2] / "shared" / "examples" / "legacy_store.json"
    result = run("validate", legacy)
    assert result.returncode == 0, result.stderr
    assert (
        "legacy file: would be upgraded to schema version 1 on save:" in result.stdout
    )
    assert "snip frame parsed from its id: 15" in result.stdout


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run("demo", "--snips", "3000", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    store = out / "store.json"
    assert f"store: {store}" in result.stdout
    assert validate_store(store) == []


# In-process from here on: the same code without paying for a fresh interpreter.
def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(MINIMAL)]) == 0
    out = capsys.readouterr().out
    assert (
        out.splitlines()[0]
        == f"{MINIMAL}: 2 experiments, 3 videos, 4 embryos, 16 snips"
    )
    assert "per experiment:" in out
    assert "20250624_chem02_28C_T00_1356" in out
    assert "phenotypes (snips):" in out
    assert "genotypes (embryos):" in out
    assert "(none)" in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate"])
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_folder_without_store_is_unusable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embryo-pipeline: error: ")
    assert "is a folder without a store.json" in err
