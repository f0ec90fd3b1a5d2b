"""Spreadsheet import: sheet rows and headings in errors, one batch, undo, CLI."""

from __future__ import annotations

import datetime as dt
import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

import openpyxl
import pandas as pd
import pytest

import pipeline
from pipeline import changelog
from pipeline.cli import main
from pipeline.errors import MergeConflictError
from pipeline.merge import merge_into_store, merge_many
from pipeline.spreadsheet import (
    SpreadsheetError,
    import_changes,
    import_spreadsheet,
    read_spreadsheet,
)

EXAMPLES = Path("/work/shared/examples")
SHARED_MAP = {
    "embryo_id": "Embryo ID",
    "phenotype": "Phenotype",
    "frames": "Frames",
    "genotype": "Genotype",
    "notes": "Notes",
}
D09 = "20230309_36hpf_ctrl_sox9a_D09_e1"
H10 = "20230309_36hpf_ctrl_sox9a_H10_e1"
C09 = "20230309_36hpf_ctrl_sox9a_C09_e1"
A12 = "20230310_A12_e01"
D02 = "20230310_D02_e01"
E01 = "20230310_E01_e01"
HEAD = ["Embryo ID", "Phenotype", "Frames", "Genotype", "Notes"]

pytestmark = pytest.mark.skipif(
    not (EXAMPLES / "small_store.json").is_file(), reason="shared examples not present"
)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "store.json"
    shutil.copyfile(EXAMPLES / "small_store.json", path)
    path.chmod(0o644)
    return path


def write_xlsx(
    path: Path, rows: list[list[Any]], *, sheet: str = "scoring", start_row: int = 1
) -> Path:
    book = openpyxl.Workbook()
    ws = book.active
    ws.title = sheet
    for offset, cells in enumerate(rows):
        for col, value in enumerate(cells, start=1):
            if value is None:
                continue
            cell = ws.cell(row=start_row + offset, column=col, value=value)
            if isinstance(value, dt.time):
                cell.number_format = "h:mm"
            elif isinstance(value, dt.datetime):
                cell.number_format = "yyyy-mm-dd"
    book.save(path)
    return path


def phenotype_at(store: pipeline.Store, embryo: str, position: int) -> str:
    snips = store.embryos[embryo]["snips"]
    ordered = sorted(snips, key=lambda s: (snips[s].get("frame") is None, s))
    return snips[ordered[position]]["phenotype"]["value"]


def cli(*argv: str) -> int:
    extra = []
    if importlib.util.find_spec("pipeline.cluster") is not None:
        extra = ["--scheduler", "sync"]
    return main([*argv, *extra])


# -------------------------------------------------------------- reading


def test_shared_xlsx_reads_with_mapping_and_without(store_path: Path) -> None:
    mapped = read_spreadsheet(EXAMPLES / "small_assignments.xlsx", SHARED_MAP)
    bare = read_spreadsheet(EXAMPLES / "small_assignments.xlsx")
    assert mapped.headings == bare.headings == SHARED_MAP
    assert mapped.sheet_name == "scoring"
    assert mapped.sheet_rows.tolist() == list(range(2, 14))
    pd.testing.assert_frame_equal(mapped.table, bare.table)
    assert mapped.table["phenotype"].iloc[0] == "tbd"


def test_header_below_a_title_blank_rows_and_loose_heading_match(
    tmp_path: Path,
) -> None:
    path = write_xlsx(
        tmp_path / "s.xlsx",
        [
            ["Scoring, March"],
            [],
            ["  Embryo   ID ", "Call", "Frames"],
            [f" {D09} ", " Edema ", 3],
            [],
            [],
            [D09, "dead", 4.0],
        ],
        start_row=2,
    )
    sheet = read_spreadsheet(path, {"embryo_id": "embryo id", "phenotype": "CALL"})
    assert sheet.header_row == 4
    assert sheet.sheet_rows.tolist() == [5, 8]
    assert sheet.headings == {
        "embryo_id": "Embryo   ID",
        "phenotype": "Call",
        "frames": "Frames",
    }
    assert sheet.table["embryo_id"].tolist() == [D09, D09]
    assert sheet.table["frames"].tolist() == [3, 4.0]


def test_csv_with_bom_semicolons_and_a_multiline_cell(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    text = f'embryo_id;phenotype;notes\n{D09};edema;"two\nlines"\n\n{H10};normal;\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    sheet = read_spreadsheet(path)
    assert sheet.sheet_rows.tolist() == [2, 4]
    assert sheet.table["notes"].tolist() == ["two\nlines", None]


# ---------------------------------------------------------- one batch


def test_shared_xlsx_imports_both_kinds_in_one_batch_and_undo_restores_both(
    store_path: Path,
) -> None:
    before = pipeline.read_store(store_path, document=True)  # a snapshot: the file changes below
    report = import_spreadsheet(
        store_path, EXAMPLES / "small_assignments.xlsx", SHARED_MAP
    )
    assert report.batch_id
    assert report.kind == "import"
    assert not report.dry_run
    assert set(report.changes["kind"]) == {"phenotype", "genotype"}
    after = pipeline.read_store(store_path)
    assert after.embryos[D09]["genotype"]["value"] == "WT"
    assert after.embryos[D09]["genotype"]["author"] == "import:small_assignments.xlsx"
    assert after.embryos[H10]["genotype"]["value"] == "lmx1b"
    assert phenotype_at(after, D09, 0) == "TBD"
    assert phenotype_at(after, "20230310_A08_e01", -1) == "DEAD"
    records = changelog.committed_batches(store_path)
    assert [r["batch_id"] for r in records] == [report.batch_id]
    fields = {field for _, _, field, _, _ in records[0]["changes"]}
    assert {"phenotype", "genotype"} <= fields
    assert records[0]["inputs"]["sheet"] == "scoring"

    pipeline.undo(after, report.batch_id)
    restored = pipeline.read_store(store_path)
    assert restored.embryos == before.embryos


def test_shared_csv_matches_assign_phenotypes_and_merge(store_path: Path) -> None:
    store = pipeline.read_store(store_path)
    report = import_spreadsheet(store, EXAMPLES / "small_assignments.csv", dry_run=True)
    changes = pipeline.assign_phenotypes(
        pipeline.snips_from_store(store), EXAMPLES / "small_assignments.csv", author="x"
    )
    expected = merge_into_store(store, changes, dry_run=True)
    assert report.counts == expected.counts
    assert report.n_written == expected.n_written
    assert report.overrides == expected.overrides
    got = report.changes.dropna(subset=["snip_id"]).sort_values(["snip_id", "row"])
    want = expected.changes.dropna(subset=["snip_id"]).sort_values(["snip_id", "row"])
    assert got["new_value"].tolist() == want["new_value"].tolist()
    assert got["status"].tolist() == want["status"].tolist()


def test_dry_run_writes_nothing(store_path: Path) -> None:
    data = store_path.read_bytes()
    report = import_spreadsheet(
        store_path, EXAMPLES / "small_assignments.xlsx", SHARED_MAP, dry_run=True
    )
    assert report.dry_run
    assert report.batch_id is None
    assert report.n_written > 0
    assert "(dry run)" in report.summary()
    assert store_path.read_bytes() == data
    assert not changelog.changelog_path(store_path).exists()


def test_merge_many_rolls_back_both_kinds_when_one_conflicts(store_path: Path) -> None:
    store = pipeline.read_store(store_path)
    sheet = read_spreadsheet(EXAMPLES / "small_assignments.xlsx")
    pheno, geno = import_changes(store, sheet, author="me")
    # Another writer changes a genotype the batch is about to replace.
    other = pipeline.read_store(store_path)
    other.add_genotype(D09, "shh", author="someone", overwrite=True)
    other.save()
    theirs = store_path.read_bytes()
    with pytest.raises(MergeConflictError, match=D09):
        merge_many(store, [pheno, geno], kind="import")
    assert store_path.read_bytes() == theirs
    assert not changelog.changelog_path(store_path).exists()
    assert phenotype_at(store, D09, 0) == phenotype_at(other, D09, 0)


def test_author_override_and_genotype_only_sheet(
    store_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "genotypes.csv"
    path.write_text(
        f"Embryo,Genotype,Zygosity,Confirmed\n{D02},SOX9A,Homozygous,yes\n{A12},wt,,\n"
    )
    report = import_spreadsheet(
        store_path, path, {"embryo_id": "Embryo"}, author="alee"
    )
    assert report.exit_code == 0, report.summary()
    store = pipeline.read_store(store_path)
    entry = store.embryos[D02]["genotype"]
    assert (entry["value"], entry["zygosity"], entry["confirmed"], entry["author"]) == (
        "sox9a",
        "homozygous",
        True,
        "alee",
    )


# ------------------------------------------------------- per-row errors


def test_bad_rows_are_reported_with_sheet_row_and_heading(
    store_path: Path, tmp_path: Path
) -> None:
    rows = [
        ["Scoring sheet"],  # row 1: a title
        [],  # row 2
        [*HEAD[:-1], "Notes "],  # row 3: headings, one with a trailing space
        [D09, "edma", "[0:2]"],  # 4: unknown phenotype
        [],  # 5: blank, skipped
        ["nosuch_e1", "edema"],  # 6: unknown embryo
        [f"  {A12.upper()} ", "Edema", 3, "wt"],  # 7: case and spaces; Excel number
        [D09, "normal", "[1:2:3:4]"],  # 8: bad range
        [None, "normal"],  # 9: empty embryo cell
        [H10, None, "[0:2]"],  # 10: frames without a phenotype
        [E01, "normal", dt.time(5, 10)],  # 11: Excel made "5:10" a time
        [E01, None, None, "lmx1"],  # 12: unknown genotype
        [C09, "heart defect", 3.0],  # 13: spaces in a phenotype; Excel float
        [D02, None, None, None, "only a note"],  # 14: nothing to import
        [C09, "edema", dt.datetime(2026, 1, 5)],  # 15: Excel made "1-5" a date
    ]
    path = write_xlsx(tmp_path / "scores.xlsx", rows)
    report = import_spreadsheet(store_path, path, SHARED_MAP)
    assert report.exit_code == 1
    failed = report.failed
    by_row = dict(zip(failed["sheet_row"], failed["reason"], strict=True))
    assert sorted(by_row) == [4, 6, 8, 9, 10, 11, 12, 14, 15]
    assert by_row[4].startswith(
        "row 4, column 'Phenotype': unknown phenotype 'edma' (did you mean 'EDEMA'?)"
    )
    assert by_row[6].startswith("row 6, column 'Embryo ID': unknown embryo 'nosuch_e1'")
    assert by_row[8].startswith(
        "row 8, column 'Frames': bad range: cannot parse frame range '[1:2:3:4]'"
    )
    assert by_row[9].startswith("row 9, column 'Embryo ID': empty cell")
    assert by_row[10].startswith("row 10, column 'Phenotype': empty cell")
    assert by_row[11] == (
        "row 11, column 'Frames': bad range: Excel turned '5:10' into a time; "
        "format the Frames column as Text and type the range again (e.g. '[5:10]')"
    )
    assert by_row[12].startswith(
        "row 12, column 'Genotype': unknown genotype 'lmx1' (did you mean 'lmx1b'?)"
    )
    assert by_row[14].startswith("row 14, column 'Phenotype': empty cell")
    assert "date 2026-01-05" in by_row[15]
    assert "format the Frames column as Text" in by_row[15]
    cols = dict(zip(failed["sheet_row"], failed["column"], strict=True))
    assert cols[4] == "Phenotype"
    assert cols[6] == "Embryo ID"
    assert cols[11] == "Frames"
    summary = report.summary()
    assert "row 4, column 'Phenotype'" in summary
    assert "row 11, column 'Frames'" in summary

    store = pipeline.read_store(store_path)
    assert phenotype_at(store, A12, 3) == "EDEMA"
    assert store.embryos[A12]["genotype"]["value"] == "WT"
    assert phenotype_at(store, C09, 3) == "HEART_DEFECT"
    assert phenotype_at(store, D09, 0) != "EDEMA"


def test_overridden_rows_name_the_winning_sheet_row(
    store_path: Path, tmp_path: Path
) -> None:
    path = tmp_path / "s.csv"
    path.write_text(f"embryo_id,genotype\n{D02},wt\n\n{D02},shh\n")
    report = import_spreadsheet(store_path, path)
    skipped = report.changes.loc[
        report.changes["status"] == "skipped", "reason"
    ].tolist()
    assert skipped == ["row 2: overridden: a later row (row 4) wins on this embryo"]
    assert pipeline.read_store(store_path).embryos[D02]["genotype"]["value"] == "shh"


# ---------------------------------------------------- whole-file errors


def _latin1(path: Path) -> Path:
    path.write_bytes(
        f"embryo_id,phenotype,notes\n{D09},edema,caf\xe9\n".encode("latin-1")
    )
    return path


WHOLE_FILE = {
    "missing-column": (
        lambda d: EXAMPLES / "small_assignments.xlsx",
        {"embryo_id": "Embryo", "phenotype": "Phenotype"},
        None,
        "no such heading (did you mean 'Embryo ID'?); its headings are: 'Embryo ID', 'Phenotype', 'Frames', 'Genotype', 'Notes'",
    ),
    "unknown-key": (
        lambda d: EXAMPLES / "small_assignments.xlsx",
        {"embryo": "Embryo ID"},
        None,
        "unknown mapping key 'embryo' (did you mean 'embryo_id'?)",
    ),
    "wrong-sheet": (
        lambda d: EXAMPLES / "small_assignments.xlsx",
        None,
        "Scores",
        "has no sheet 'Scores' (did you mean 'scoring'?); its sheets: 'scoring'",
    ),
    "corrupt-xlsx": (
        lambda d: (
            (d / "bad.xlsx").write_bytes(b"PK\x03\x04 not really a zip")
            and d / "bad.xlsx"
        ),
        None,
        None,
        "as an Excel workbook",
    ),
    "not-utf8": (
        lambda d: _latin1(d / "latin.csv"),
        None,
        None,
        "not UTF-8 text (byte 0xe9 on line 2",
    ),
    "unknown-type": (
        lambda d: (d / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0") and d / "old.xls",
        None,
        None,
        "Excel 97-2003 workbooks are not read",
    ),
    "missing-file": (lambda d: d / "nope.csv", None, None, "no such spreadsheet"),
    "csv-has-no-sheets": (
        lambda d: EXAMPLES / "small_assignments.csv",
        None,
        "scoring",
        "is a CSV file, which has no sheets",
    ),
    "empty": (
        lambda d: (d / "e.csv").write_text("\n\n") and d / "e.csv",
        None,
        None,
        "is empty",
    ),
    "no-embryo-column": (
        lambda d: (d / "n.csv").write_text("id,phenotype\ne1,edema\n") and d / "n.csv",
        None,
        None,
        "no embryo_id column",
    ),
}


@pytest.mark.parametrize("case", list(WHOLE_FILE), ids=list(WHOLE_FILE))
def test_whole_file_errors_raise_before_anything_is_written(
    case: str, store_path: Path, tmp_path: Path
) -> None:
    make, mapping, sheet, message = WHOLE_FILE[case]
    path = make(tmp_path)
    data = store_path.read_bytes()
    with pytest.raises(SpreadsheetError, match=re.escape(message)) as info:
        import_spreadsheet(store_path, path, mapping, sheet_name=sheet)
    assert isinstance(info.value, ValueError)
    assert store_path.read_bytes() == data
    assert not changelog.changelog_path(store_path).exists()


def test_latin1_error_says_to_save_as_utf8(tmp_path: Path) -> None:
    with pytest.raises(SpreadsheetError, match=r"Save it as UTF-8 .*CSV UTF-8"):
        read_spreadsheet(_latin1(tmp_path / "latin.csv"))


# ---------------------------------------------------------------- CLI


def test_cli_exit_codes(
    store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = str(EXAMPLES / "small_assignments.xlsx")
    maps = [f"--map={k}={v}" for k, v in SHARED_MAP.items()]
    data = store_path.read_bytes()
    assert cli("import", str(store_path), shared, *maps, "--dry-run") == 1
    out = capsys.readouterr().out
    assert "preview" in out
    assert "would write 32 value(s)" in out
    assert store_path.read_bytes() == data

    assert cli("import", str(store_path), shared, "--map", "embryo_id=Embryo") == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "embryo-pipeline: error: the mapping names the column 'Embryo'"
    )
    assert len(err.strip().splitlines()) == 1
    assert cli("import", str(store_path), shared, "--sheet", "nope") == 2
    assert "its sheets: 'scoring'" in capsys.readouterr().err
    assert store_path.read_bytes() == data

    clean = tmp_path / "clean.csv"
    clean.write_text(f"Embryo ID,Phenotype,Frames,Genotype\n{D02},edema,[0:2],shh\n")
    assert cli("import", str(store_path), str(clean), "--author", "alee") == 0
    out = capsys.readouterr().out
    match = re.search(r"import batch (b-\S+)", out)
    assert match
    assert "undo with: embryo-pipeline undo" in out
    store = pipeline.read_store(store_path)
    assert store.embryos[D02]["genotype"]["author"] == "alee"
    assert main(["undo", str(store_path), match[1]]) == 0
    assert (
        pipeline.read_store(store_path).embryos
        == pipeline.read_store(EXAMPLES / "small_store.json").embryos
    )
