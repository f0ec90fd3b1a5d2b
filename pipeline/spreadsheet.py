"""Spreadsheet import: a scoring sheet (CSV or XLSX) merged as one batch.

:func:`import_spreadsheet` reads a sheet whose rows each carry a genotype, a
phenotype with a frame range, or both; renames its columns to the canonical
names (:data:`CANONICAL_COLUMNS`) through a *mapping* such as
``{"embryo_id": "Embryo ID"}``; turns the phenotype cells into a phenotype
change set with :func:`pipeline.assign_phenotypes` and the genotype cells into
a genotype change set with :func:`pipeline.assign_genotypes`; and merges both
with :func:`pipeline.merge.merge_many`: one lock, one atomic write, one change
log record with one ``batch_id``, so one :func:`pipeline.undo` restores both.

Problems with the file as a whole (missing file, unknown type, unreadable
workbook, wrong sheet, a CSV that is not UTF-8, a mapping that names a missing
heading) raise :class:`SpreadsheetError` before anything is computed or
written. Problems with single rows are reported per row with the sheet's own
row number (as a person sees it: the heading row of a plain sheet is row 1)
and the sheet's own column heading, e.g. ``row 7, column 'Phenotype': unknown
phenotype 'edma' (did you mean 'EDEMA'?)``; the other rows still apply.

Cells are normalised: whitespace is stripped, phenotypes, genotypes and
zygosity match the vocabulary whatever their case (``heart defect`` is
``HEART_DEFECT``), embryo ids match whatever their case when that is
unambiguous, an empty Frames cell means ``all`` and a number typed into Excel
(``3`` or ``3.0``) means position ``[3]``. A Frames cell that Excel turned
into a time or a date (it does that to ``5:10`` and ``1-5``) is reported, not
guessed at. The genotype and the phenotype of a row are independent: a bad
Frames cell fails the row's phenotype, not its genotype.
"""

from __future__ import annotations

import csv
import datetime as dt
import difflib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline._atomic import LOCK_TIMEOUT
from pipeline._tables import suggest
from pipeline.errors import PipelineError
from pipeline.merge import MergeReport, merge_many
from pipeline.phenotypes import _confidence, assign_genotypes, assign_phenotypes
from pipeline.schema import GENOTYPE_CHANGE_COLUMNS, PHENOTYPE_CHANGE_COLUMNS
from pipeline.store import Store, now, read_store

__all__ = [
    "CANONICAL_COLUMNS",
    "Sheet",
    "ImportReport",
    "SpreadsheetError",
    "read_spreadsheet",
    "import_changes",
    "import_spreadsheet",
]

#: The column names a sheet's headings map to.
CANONICAL_COLUMNS = (
    "embryo_id",
    "phenotype",
    "frames",
    "genotype",
    "notes",
    "confidence",
    "allele",
    "zygosity",
    "confirmed",
)
_PHENOTYPE_PART = ("phenotype", "frames")
_GENOTYPE_PART = ("genotype", "allele", "zygosity")
_CSV_SUFFIXES = (".csv", ".tsv", ".txt")
_XLSX_SUFFIXES = (".xlsx", ".xlsm")
# Rows searched for the heading row when a title or blank rows sit above it.
_HEADER_SEARCH = 20
# Characters Excel and copy-paste leave around values, beyond str.strip()'s.
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"

# Which column a reason code of the change sets is about.
_COLUMN_OF = {
    "missing_embryo_id": "embryo_id",
    "unknown_embryo": "embryo_id",
    "missing_phenotype": "phenotype",
    "unknown_phenotype": "phenotype",
    "missing_value": "phenotype",
    "bad_range": "frames",
    "empty_selection": "frames",
    "index_out_of_range": "frames",
    "frame_not_found": "frames",
    "no_death_frame": "frames",
    "unknown_snip_id": "frames",
    "bad_confidence": "confidence",
    "missing_genotype": "genotype",
    "unknown_genotype": "genotype",
    "unknown_zygosity": "zygosity",
    "bad_confirmed": "confirmed",
}
_CODE = re.compile(r"^([a-z_]+)(?::\s*(.*))?$", re.DOTALL)
_LATER_ROW = re.compile(r"a later row \((\d+)\)")


class SpreadsheetError(PipelineError, ValueError):
    """A spreadsheet cannot be imported at all; nothing was written.

    Parameters
    ----------
    message : str
        What is wrong with the file, where, and how to fix it.
    path : str, optional
        The spreadsheet.
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def _context(self) -> dict[str, Any]:
        return {"path": self.path}


@dataclass
class Sheet:
    """A spreadsheet read for import: canonical columns, and where cells came from.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per non-blank data row, in sheet order; one column per mapped
        canonical name, holding the cells as read (text stripped, empty cells
        None, Excel numbers and dates as Python values).
    sheet_rows : numpy.ndarray of int
        The sheet's own (1-based) row number of each row of *table*.
    headings : dict of str to str
        Canonical name to the sheet's heading it was read from.
    path : pathlib.Path
        The file.
    sheet_name : str or None
        The worksheet (None for a CSV file).
    header_row : int
        The sheet row holding the headings.
    """

    table: pd.DataFrame
    sheet_rows: np.ndarray
    headings: dict[str, str]
    path: Path
    sheet_name: str | None
    header_row: int

    @property
    def where(self) -> str:
        """The file (and sheet) as named in messages."""
        return f"{str(self.path)!r}" + (
            f" (sheet {self.sheet_name!r})" if self.sheet_name else ""
        )


# ------------------------------------------------------------------ reading


def _clean(value: Any) -> Any:
    """Strip text cells; empty text becomes None; other values stay as read."""
    if isinstance(value, str):
        value = value.strip().strip(_INVISIBLE).strip()
        return value or None
    return value


def _loose(text: str) -> str:
    """Heading comparison key: case and inner whitespace do not matter."""
    return " ".join(str(text).strip(_INVISIBLE).split()).casefold()


def _canonical_key(text: str) -> str:
    """``"Embryo ID"`` -> ``"embryo_id"``: how a heading may name a canonical column."""
    return re.sub(r"[\s\-_]+", "_", _loose(text)).strip("_")


def _read_csv_grid(path: Path) -> list[list[Any]]:
    data = path.read_bytes()
    where = repr(str(path))
    if data.startswith(b"PK\x03\x04"):
        msg = f"cannot read {where} as CSV: it is a zip file, probably an Excel workbook; rename it to .xlsx"
        raise SpreadsheetError(msg, path=str(path))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Excel's "Unicode Text" export: UTF-16 with a byte-order mark, unambiguous.
        text = data.decode("utf-16")
    else:
        try:
            # utf-8-sig reads plain UTF-8 too, and drops Excel's "CSV UTF-8" BOM.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            shown = (
                data.splitlines()[line - 1].decode("cp1252", errors="replace")[:80]
                if data
                else ""
            )
            msg = (
                f"cannot read {where}: it is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}, "
                f"{shown!r} if read as Windows-1252, is not valid UTF-8; the file was probably saved as "
                "Windows-1252/Latin-1). Save it as UTF-8 (in Excel: File > Save As > 'CSV UTF-8 "
                "(Comma delimited)') and import it again"
            )
            raise SpreadsheetError(msg, path=str(path)) from None
    if "\x00" in text:
        msg = f"cannot read {where} as CSV: it contains NUL bytes, so it is not a text file; export the sheet as CSV UTF-8 or .xlsx"
        raise SpreadsheetError(msg, path=str(path))
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if path.suffix.lower() == ".tsv" or ("\t" in first and "," not in first):
        delimiter = "\t"
    elif ";" in first and "," not in first:
        delimiter = ";"  # Excel's CSV export in locales with a decimal comma
    else:
        delimiter = ","
    try:
        # One record per sheet row as Excel shows it (a quoted cell may span lines).
        return [
            [c if c != "" else None for c in rec]
            for rec in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        ]
    except csv.Error as err:
        msg = f"cannot read {where} as CSV: {err}; check its quoting, or export the sheet again as CSV UTF-8"
        raise SpreadsheetError(msg, path=str(path)) from None


def _read_xlsx_grid(
    path: Path, sheet_name: str | int | None
) -> tuple[list[list[Any]], str]:
    import zipfile

    import openpyxl
    from openpyxl.utils.exceptions import InvalidFileException

    where = repr(str(path))
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (
        zipfile.BadZipFile,
        InvalidFileException,
        KeyError,
        OSError,
        ValueError,
        TypeError,
    ) as err:
        msg = (
            f"cannot read {where} as an Excel workbook ({type(err).__name__}: {err}); "
            "is it a real .xlsx file (not a renamed CSV or .xls)? Open it in Excel and save it as .xlsx"
        )
        raise SpreadsheetError(msg, path=str(path)) from None
    try:
        names = list(book.sheetnames)
        if sheet_name is None:
            name = names[0]
        elif isinstance(sheet_name, int):
            if not 0 <= sheet_name < len(names):
                msg = f"{where} has {len(names)} sheet(s); there is no sheet number {sheet_name}. Its sheets: {', '.join(map(repr, names))}"
                raise SpreadsheetError(msg, path=str(path))
            name = names[sheet_name]
        elif sheet_name in names:
            name = sheet_name
        else:
            loose = [n for n in names if _loose(n) == _loose(sheet_name)]
            if len(loose) != 1:
                by_loose = {_loose(n): n for n in names}
                close = difflib.get_close_matches(
                    _loose(sheet_name), list(by_loose), n=1, cutoff=0.5
                )
                hint = f" (did you mean {by_loose[close[0]]!r}?)" if close else ""
                msg = f"{where} has no sheet {sheet_name!r}{hint}; its sheets: {', '.join(map(repr, names))}. Pass one of them as sheet_name (--sheet)"
                raise SpreadsheetError(msg, path=str(path))
            name = loose[0]
        sheet = book[name]
        if not hasattr(sheet, "iter_rows"):
            msg = f"sheet {name!r} of {where} is a chart, not a worksheet; pass a worksheet as sheet_name (--sheet): {', '.join(map(repr, names))}"
            raise SpreadsheetError(msg, path=str(path))
        # Some writers record a wrong used range; read every row that is there.
        sheet.reset_dimensions()
        grid = [
            list(r) for r in sheet.iter_rows(min_row=1, min_col=1, values_only=True)
        ]
    except SpreadsheetError:
        raise
    except Exception as err:  # noqa: BLE001 (openpyxl raises many kinds on a damaged part of the file)
        msg = f"cannot read {where}: the workbook is damaged ({type(err).__name__}: {err}); open it in Excel and save it again"
        raise SpreadsheetError(msg, path=str(path)) from None
    finally:
        book.close()
    return grid, name


def _is_blank(cells: list[Any]) -> bool:
    return all(_clean(c) is None for c in cells)


def _find_header(grid: list[list[Any]], wanted: list[str]) -> int:
    """Index in *grid* of the heading row: the first non-blank row with the wanted headings."""
    candidates = [i for i, cells in enumerate(grid) if not _is_blank(cells)][
        :_HEADER_SEARCH
    ]
    for i in candidates:
        texts = {_loose(c) for c in grid[i] if _clean(c) is not None}
        keys = {_canonical_key(c) for c in grid[i] if _clean(c) is not None}
        if wanted and all(_loose(w) in texts for w in wanted):
            return i
        if not wanted and "embryo_id" in keys:
            return i
    return candidates[0]


def _resolve_columns(
    headings: list[str | None],
    mapping: Mapping[str, str] | None,
    where: str,
    path: Path,
) -> dict[str, int]:
    """Canonical name -> column position, from the mapping and canonical headings."""
    shown = ", ".join(repr(h) for h in headings if h is not None) or "none"
    columns: dict[str, int] = {}
    for key, heading in (mapping or {}).items():
        name = _canonical_key(str(key))
        if name not in CANONICAL_COLUMNS:
            msg = f"unknown mapping key {key!r}{suggest(name, list(CANONICAL_COLUMNS)).lower()}: keys are the canonical names {', '.join(CANONICAL_COLUMNS)}, values the sheet's headings"
            raise SpreadsheetError(msg, path=str(path))
        if not isinstance(heading, str) or not heading.strip():
            msg = f"the mapping gives {heading!r} for {name}; expected the text of a heading in {where}: {shown}"
            raise SpreadsheetError(msg, path=str(path))
        exact = [
            i for i, h in enumerate(headings) if h is not None and h == heading.strip()
        ]
        found = exact or [
            i
            for i, h in enumerate(headings)
            if h is not None and _loose(h) == _loose(heading)
        ]
        if not found:
            close = difflib.get_close_matches(
                heading, [h for h in headings if h], n=1, cutoff=0.5
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = (
                f"the mapping names the column {heading!r} for {name}, but {where} has no such heading{hint}; "
                f"its headings are: {shown}. Fix the mapping (--map {name}=HEADING)"
            )
            raise SpreadsheetError(msg, path=str(path))
        if len(found) > 1:
            msg = f"the heading {heading!r} (for {name}) appears {len(found)} times in {where}; rename the copies so each heading is unique"
            raise SpreadsheetError(msg, path=str(path))
        if found[0] in columns.values():
            other = next(k for k, v in columns.items() if v == found[0])
            msg = f"the mapping reads the column {heading!r} for both {other} and {name}; give each canonical name its own column"
            raise SpreadsheetError(msg, path=str(path))
        columns[name] = found[0]
    # Headings that already are canonical names need no mapping.
    for i, h in enumerate(headings):
        key = _canonical_key(h) if h is not None else None
        if (
            key in CANONICAL_COLUMNS
            and key not in columns
            and i not in columns.values()
        ):
            columns[key] = i
    hint = "pass a mapping (--map embryo_id=HEADING --map phenotype=HEADING ...)"
    if "embryo_id" not in columns:
        msg = f"no embryo_id column in {where}: no heading is called embryo_id and the mapping names none; its headings are: {shown}. {hint}"
        raise SpreadsheetError(msg, path=str(path))
    if "phenotype" not in columns and "genotype" not in columns:
        msg = f"nothing to import from {where}: there is neither a phenotype nor a genotype column; its headings are: {shown}. {hint}"
        raise SpreadsheetError(msg, path=str(path))
    if "frames" in columns and "phenotype" not in columns:
        msg = f"{where} has a frames column but no phenotype column; map the phenotype column too (--map phenotype=HEADING)"
        raise SpreadsheetError(msg, path=str(path))
    extra = [k for k in ("allele", "zygosity", "confirmed") if k in columns]
    if extra and "genotype" not in columns:
        msg = f"{where} has {', '.join(extra)} column(s) but no genotype column; map the genotype column too (--map genotype=HEADING)"
        raise SpreadsheetError(msg, path=str(path))
    return columns


def read_spreadsheet(
    path: str | Path,
    mapping: Mapping[str, str] | None = None,
    *,
    sheet_name: str | int | None = None,
) -> Sheet:
    r"""Read a CSV or XLSX sheet for import, its columns renamed to canonical names.

    Parameters
    ----------
    path : str or path-like
        A ``.csv`` (also ``.tsv``, ``.txt``; UTF-8, with or without BOM) or
        ``.xlsx`` file.
    mapping : mapping of str to str, optional
        Canonical name (:data:`CANONICAL_COLUMNS`) to the sheet's heading, e.g.
        ``{"embryo_id": "Embryo ID"}``. Headings are matched ignoring case and
        extra spaces. Headings that already are canonical names (``Embryo ID``,
        ``embryo_id``, ``Phenotype``) need no entry.
    sheet_name : str or int, optional
        The worksheet of an XLSX file (default the first).

    Returns
    -------
    Sheet
        The table, the sheet row of each of its rows and the headings used.

    Raises
    ------
    SpreadsheetError
        If the file is missing, of an unknown type, unreadable or not UTF-8; if
        the sheet does not exist; if the mapping has an unknown key or names a
        missing heading; if there is no embryo_id column or neither a phenotype
        nor a genotype column.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "scores.csv"
    >>> _ = path.write_text("Embryo ID,Call\n e1 ,edema\n\ne2,dead\n")
    >>> sheet = read_spreadsheet(path, {"phenotype": "call"})
    >>> sheet.table.to_dict("list"), sheet.sheet_rows.tolist()
    ({'embryo_id': ['e1', 'e2'], 'phenotype': ['edema', 'dead']}, [2, 4])
    """
    path = Path(path)
    where = repr(str(path))
    if not path.exists():
        msg = f"no such spreadsheet: {where}"
        raise SpreadsheetError(msg, path=str(path))
    if not path.is_file():
        msg = f"{where} is a folder, not a spreadsheet; pass a .csv or .xlsx file"
        raise SpreadsheetError(msg, path=str(path))
    suffix = path.suffix.lower()
    try:
        if suffix in _CSV_SUFFIXES:
            if sheet_name is not None:
                msg = f"{where} is a CSV file, which has no sheets; drop sheet_name (--sheet {sheet_name})"
                raise SpreadsheetError(msg, path=str(path))
            grid, name = _read_csv_grid(path), None
        elif suffix in _XLSX_SUFFIXES:
            grid, name = _read_xlsx_grid(path, sheet_name)
        else:
            old = {
                ".xls": "Excel 97-2003 workbooks",
                ".ods": "OpenDocument spreadsheets",
                ".numbers": "Numbers files",
            }
            what = f" ({old[suffix]} are not read)" if suffix in old else ""
            msg = f"cannot import {where}{what}: expected a .csv, .tsv or .xlsx file; save the sheet as .xlsx or CSV UTF-8"
            raise SpreadsheetError(msg, path=str(path))
    except OSError as err:
        msg = f"cannot read {where}: {err.strerror or err}"
        raise SpreadsheetError(msg, path=str(path)) from None
    located = where + (f" (sheet {name!r})" if name else "")
    if not grid or all(_is_blank(cells) for cells in grid):
        msg = f"{located} is empty: expected a heading row (e.g. embryo_id, phenotype, frames) and one row per assignment"
        raise SpreadsheetError(msg, path=str(path))
    header = _find_header(
        grid, [str(v) for v in (mapping or {}).values() if isinstance(v, str)]
    )
    headings = [None if _clean(c) is None else str(_clean(c)) for c in grid[header]]
    where_head = f"{located}, row {header + 1}"
    columns = _resolve_columns(headings, mapping, where_head, path)
    columns = {k: columns[k] for k in CANONICAL_COLUMNS if k in columns}
    width = len(headings)
    body = [
        (i + 1, (cells + [None] * width)[:width])
        for i, cells in enumerate(grid)
        if i > header and not _is_blank(cells)
    ]
    table = pd.DataFrame(
        {
            name_: pd.Series([_clean(cells[pos]) for _, cells in body], dtype=object)
            for name_, pos in columns.items()
        }
    )
    return Sheet(
        table=table,
        sheet_rows=np.asarray([r for r, _ in body], dtype=np.int64),
        headings={k: str(headings[pos]) for k, pos in columns.items()},
        path=path,
        sheet_name=name,
        header_row=header + 1,
    )


# --------------------------------------------------------------- change sets


def _text(value: Any) -> str | None:
    """A cell as text: Excel's 12.0 is "12", a date its ISO form."""
    value = _clean(value)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def _frames_cell(value: Any) -> tuple[Any, str | None]:
    """A Frames cell as a range spec, or why it cannot be one."""
    value = _clean(value)
    if value is None:
        return "all", None
    if isinstance(value, bool):
        return (
            None,
            f"the cell holds {str(value).upper()}; expected a frame range such as '[5:10]', a position or 'all'",
        )
    # Excel stores a time as a fraction of a day from 1899-12-30: "5:10" reads
    # as time(5, 10), "25:10" as a datetime early in 1900.
    is_time = isinstance(value, dt.time | dt.timedelta) or (
        isinstance(value, dt.datetime) and value.year <= 1900 and value.month == 1
    )
    if is_time:
        typed = _time_text(value)
        return (
            None,
            f"Excel turned {typed!r} into a time; format the Frames column as Text and type the range again (e.g. '[{typed}]')",
        )
    if isinstance(value, dt.date):
        shown = (
            value.date().isoformat()
            if isinstance(value, dt.datetime)
            else value.isoformat()
        )
        return (
            None,
            f"Excel turned the cell into the date {shown}; format the Frames column as Text and type the range again (e.g. '[1:5]')",
        )
    if isinstance(value, float):
        if np.isnan(value):
            return "all", None
        if not value.is_integer():
            return (
                None,
                f"the cell holds the number {value:g}; a frame position is a whole number, a range is text such as '[5:10]'",
            )
        return int(value), None
    if isinstance(value, int | str):
        return value, None
    return (
        None,
        f"the cell holds {value!r}; expected a frame range such as '[5:10]', a position or 'all'",
    )


def _time_text(value: dt.time | dt.datetime | dt.timedelta) -> str:
    """What was most likely typed before Excel made *value* a time (``5:10``)."""
    if isinstance(value, dt.timedelta | dt.datetime):
        delta = (
            value
            if isinstance(value, dt.timedelta)
            else value - dt.datetime(1899, 12, 31)
        )
        seconds = int(delta.total_seconds())
        hours, minutes, secs = seconds // 3600, seconds // 60 % 60, seconds % 60
    else:
        hours, minutes, secs = value.hour, value.minute, value.second
    return f"{hours}:{minutes:02d}" + (f":{secs:02d}" if secs else "")


def _vocab_values(values: list[str | None], choices: Any) -> list[str | None]:
    """The vocabulary's spelling of each value, whatever its case and separators."""
    by_key = {_canonical_key(c).upper(): c for c in choices}
    return [
        None if v is None else by_key.get(_canonical_key(v).upper(), v) for v in values
    ]


def _failures(
    kind: str,
    rows: np.ndarray,
    embryo: list[Any],
    value: list[Any],
    reasons: list[str],
    author: str,
    stamp: str,
) -> pd.DataFrame:
    """Failed change-set lines of *kind* for rows that never reach the assignment."""
    n = len(rows)
    columns = (
        PHENOTYPE_CHANGE_COLUMNS if kind == "phenotype" else GENOTYPE_CHANGE_COLUMNS
    )
    data: dict[str, Any] = {
        "embryo_id": embryo,
        "row": rows,
        "old_value": [None] * n,
        "new_value": value,
        "status": ["failed"] * n,
        "reason": reasons,
        "author": [author] * n,
        "timestamp": [stamp] * n,
        "confidence": np.full(n, np.nan),
        "notes": [None] * n,
    }
    if kind == "phenotype":
        data.update(snip_id=[None] * n, frame=pd.array([None] * n, dtype="Int64"))
    else:
        data.update(
            allele=[None] * n, zygosity=[None] * n, confirmed=np.zeros(n, dtype=bool)
        )
    return pd.DataFrame(data).astype(columns)[list(columns)]


def _to_sheet_rows(
    changes: pd.DataFrame, positions: np.ndarray, sheet_rows: np.ndarray
) -> pd.DataFrame:
    """Renumber a change set computed on a subset: ``row`` becomes the import row."""
    changes = changes.copy()
    local = changes["row"].to_numpy(dtype=np.int64)
    changes["row"] = positions[local] if len(local) else local
    # Reasons repeat over snips: rewrite each distinct text once, then take them
    # back by code (Series.replace with a large dict is quadratic).
    codes, texts = pd.factorize(changes["reason"])
    if any(_LATER_ROW.search(t) for t in texts):
        new = np.array(
            [
                _LATER_ROW.sub(
                    lambda m: f"a later row (row {sheet_rows[positions[int(m[1])]]})", t
                )
                for t in texts
            ],
            dtype=object,
        )
        out = np.where(codes >= 0, new[np.maximum(codes, 0)], None)
        changes["reason"] = pd.array(out, dtype=changes["reason"].dtype)
    return changes


def import_changes(
    store: Store,
    sheet: Sheet,
    *,
    author: str,
    timestamp: str | None = None,
    on_existing: str = "overwrite",
    overwrite_dead: bool = False,
    npartitions: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Turn a sheet into a phenotype and a genotype change set.

    Parameters
    ----------
    store : Store
        The store to import into.
    sheet : Sheet
        From :func:`read_spreadsheet`.
    author : str
        Who makes the changes.
    timestamp : str, optional
        One timestamp for the batch (default now).
    on_existing : {"overwrite", "skip", "error"}, default "overwrite"
        As in :func:`pipeline.assign_phenotypes`; anything but ``overwrite``
        also keeps existing genotypes (those rows are ``skipped``).
    overwrite_dead : bool, default False
        As in :func:`pipeline.assign_phenotypes`.
    npartitions : int, optional
        Partitions of the snip table.

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame)
        The phenotype and genotype change sets; ``row`` is the position of the
        row in ``sheet.table`` (``sheet.sheet_rows[row]`` its sheet row). Rows
        that fail as a whole (empty or unknown embryo, bad confidence, nothing
        to import) appear once, in the phenotype change set when the sheet has
        a phenotype column.

    Notes
    -----
    Triggers computation.
    """
    from pipeline.snips import snips_from_store

    stamp = timestamp or now()
    table, heads = sheet.table, sheet.headings
    n = len(table)
    vocab = store.vocabulary

    def cells(name: str) -> list[Any]:
        return list(table[name]) if name in table.columns else [None] * n

    embryo = [_text(v) for v in cells("embryo_id")]
    known = store.embryos
    folded: dict[str, str | None] = {}
    for eid in known:
        folded[eid.casefold()] = (
            None if eid.casefold() in folded else eid
        )  # None: ambiguous
    pheno = _vocab_values([_text(v) for v in cells("phenotype")], vocab["phenotypes"])
    geno = [_text(v) for v in cells("genotype")]
    zyg = _vocab_values([_text(v) for v in cells("zygosity")], vocab["zygosity"])
    allele = [_text(v) for v in cells("allele")]
    frames_raw = cells("frames")
    notes = [_text(v) for v in cells("notes")]
    conf = [_clean(v) for v in cells("confidence")]
    confirmed = cells("confirmed")

    row_fail: dict[int, tuple[str, str]] = {}  # row -> (reason, kind it is reported in)
    pheno_rows: list[int] = []
    geno_rows: list[int] = []
    pheno_fail: dict[int, str] = {}
    frames_spec: list[Any] = [None] * n
    home = "phenotype" if "phenotype" in table.columns else "genotype"
    suggestions = 0
    for i in range(n):
        # One pass over the sheet's rows (not over snips): route each row's
        # phenotype and genotype to their assignment, or fail it once here.
        has_pheno = pheno[i] is not None or _clean(frames_raw[i]) is not None
        has_geno = geno[i] is not None or allele[i] is not None or zyg[i] is not None
        eid = embryo[i]
        if eid is not None and eid not in known:
            eid = folded.get(eid.casefold()) or eid
            embryo[i] = eid
        if eid is None:
            row_fail[i] = (
                "missing_embryo_id: empty cell; every row needs the embryo it is about",
                home,
            )
            continue
        if eid not in known:
            hint = ""
            if suggestions < 50:  # difflib over every id: only for the first few rows
                suggestions += 1
                close = difflib.get_close_matches(eid, list(known), n=1, cutoff=0.8)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            row_fail[i] = (
                f"unknown_embryo: {eid!r} is not in this store{hint}",
                "phenotype" if has_pheno or not has_geno else "genotype",
            )
            continue
        if not has_pheno and not has_geno:
            what = " nor a ".join(
                heads[k] for k in ("phenotype", "genotype") if k in heads
            )
            what = f"neither a {what}" if "nor" in what else f"no {what}"
            row_fail[i] = (
                f"missing_value: empty cell; the row has {what} to import",
                home,
            )
            continue
        _, conf_error = _confidence(conf[i])
        if conf_error:
            row_fail[i] = (
                f"bad_confidence: {conf_error}",
                "phenotype" if has_pheno else "genotype",
            )
            continue
        if has_pheno:
            spec, frames_error = _frames_cell(frames_raw[i])
            if frames_error:
                pheno_fail[i] = f"bad_range: {frames_error}"
            else:
                frames_spec[i] = spec
                pheno_rows.append(i)
        if has_geno:
            geno_rows.append(i)

    p_pos = np.asarray(pheno_rows, dtype=np.int64)
    g_pos = np.asarray(geno_rows, dtype=np.int64)
    pieces_p: list[pd.DataFrame] = []
    pieces_g: list[pd.DataFrame] = []
    if len(p_pos):
        rows = pd.DataFrame(
            {
                "embryo_id": [embryo[i] for i in p_pos],
                "phenotype": [pheno[i] for i in p_pos],
                "frames": pd.Series([frames_spec[i] for i in p_pos], dtype=object),
                "confidence": pd.Series([conf[i] for i in p_pos], dtype=object),
                "notes": [notes[i] for i in p_pos],
            }
        )
        snips = snips_from_store(store, npartitions=npartitions)
        lazy = assign_phenotypes(
            snips,
            rows,
            author=author,
            on_existing=on_existing,
            overwrite_dead=overwrite_dead,
            vocabulary=vocab,
            timestamp=stamp,
        )
        pieces_p.append(_to_sheet_rows(lazy.compute(), p_pos, sheet.sheet_rows))
    if len(g_pos):
        rows = pd.DataFrame(
            {
                "embryo_id": [embryo[i] for i in g_pos],
                "genotype": [geno[i] for i in g_pos],
                "allele": [allele[i] for i in g_pos],
                "zygosity": [zyg[i] for i in g_pos],
                "confirmed": pd.Series([confirmed[i] for i in g_pos], dtype=object),
                "confidence": pd.Series([conf[i] for i in g_pos], dtype=object),
                "notes": [notes[i] for i in g_pos],
            }
        )
        changes = assign_genotypes(
            store,
            rows,
            author=author,
            overwrite=on_existing == "overwrite",
            timestamp=stamp,
        )
        pieces_g.append(_to_sheet_rows(changes, g_pos, sheet.sheet_rows))
    fails = {"phenotype": [], "genotype": []}
    for i, (reason, kind) in row_fail.items():
        value = pheno[i] if kind == "phenotype" else geno[i]
        fails[kind].append((i, embryo[i], value, reason))
    for i, reason in pheno_fail.items():
        fails["phenotype"].append((i, embryo[i], pheno[i], reason))
    for kind, pieces in (("phenotype", pieces_p), ("genotype", pieces_g)):
        if fails[kind]:
            r, e, v, why = zip(*sorted(fails[kind]), strict=True)
            pieces.append(
                _failures(
                    kind,
                    np.asarray(r, dtype=np.int64),
                    list(e),
                    list(v),
                    list(why),
                    author,
                    stamp,
                )
            )
    out = []
    for pieces, columns in (
        (pieces_p, PHENOTYPE_CHANGE_COLUMNS),
        (pieces_g, GENOTYPE_CHANGE_COLUMNS),
    ):
        pieces = [p for p in pieces if len(p)]
        if not pieces:
            out.append(
                pd.DataFrame({c: pd.Series([], dtype=d) for c, d in columns.items()})
            )
            continue
        frame = pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0]
        sort = ["row", "frame"] if "frame" in frame.columns else ["row"]
        out.append(frame.sort_values(sort, kind="stable", ignore_index=True))
    return out[0], out[1]


# ---------------------------------------------------------------- reporting


@dataclass(repr=False)
class ImportReport(MergeReport):
    """What an import did: a :class:`~pipeline.merge.MergeReport` that speaks in sheet rows.

    ``changes`` and ``failed`` carry two more columns: ``sheet_row`` (the row
    number a person sees in the sheet) and ``column`` (the sheet's heading the
    problem is about, or missing); ``reason`` starts with both, e.g.
    ``row 7, column 'Phenotype': unknown phenotype 'edma' (did you mean 'EDEMA'?)``.

    Attributes
    ----------
    source : str or None
        The spreadsheet (and sheet).
    """

    source: str | None = None

    def summary(self) -> str:
        """A few readable lines: counts, then every failed row in sheet order."""
        verb = "would write" if self.dry_run else "wrote"
        by_kind = self.changes.loc[
            self.changes["status"].isin(("assigned", "backfilled")), "kind"
        ].value_counts()
        parts = ", ".join(
            f"{int(by_kind.get(k, 0))} {k}" for k in ("phenotype", "genotype")
        )
        head = (
            "import (dry run)"
            if self.dry_run
            else f"import batch {self.batch_id or '(nothing written)'}"
        )
        lines = [
            f"{head} from {self.source}: {verb} {self.n_written} value(s) ({parts})"
        ]
        lines.append(
            "  "
            + (
                ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
                or "no changes"
            )
        )
        if self.overrides:
            lines.append(
                f"  {self.overrides} write(s) overridden by a later row of the sheet"
            )
        lines += [f"  {n}" for n in self.notes]
        if len(self.failed):
            lines.append(f"  failed rows ({len(self.failed)}):")
            lines += [f"    {r}" for r in self.failed["reason"].head(20)]
            if len(self.failed) > 20:
                lines.append(f"    ... and {len(self.failed) - 20} more")
        skipped = self.changes.loc[self.changes["status"] == "skipped"]
        if len(skipped):
            grouped = skipped.groupby(["sheet_row", "reason"], sort=True).size()
            lines.append(f"  skipped ({len(skipped)}):")
            for (_, reason), size in grouped.head(10).items():
                lines.append(f"    {reason}" + (f" ({size} snips)" if size > 1 else ""))
            if len(grouped) > 10:
                lines.append(f"    ... and {len(grouped) - 10} more")
        return "\n".join(lines)


def _located(
    reason: str, sheet_row: int, headings: Mapping[str, str]
) -> tuple[str, str | None]:
    """``"unknown_phenotype: 'x'"`` -> ``"row 7, column 'Phenotype': unknown phenotype 'x'"``."""
    match = _CODE.match(reason)
    code, rest = (match[1], match[2]) if match else (None, None)
    if code is None:
        return f"row {sheet_row}: {reason}", None
    column = headings.get(_COLUMN_OF.get(code, ""))
    words = code.replace("_", " ")
    if code == "missing_phenotype":
        text = "empty cell; the row gives a frame range but no phenotype"
    elif code == "missing_genotype":
        text = "empty cell; the row gives an allele or zygosity but no genotype"
    elif code in ("missing_embryo_id", "missing_value"):
        text = rest or words
    elif code.startswith("unknown_") and rest:
        text = f"{words} {rest}"
    elif code == "after_death":
        text = "after death: the frame is at or after the embryo's death frame (DEAD is permanent)"
    else:
        text = f"{words}: {rest}" if rest else words
    where = f"row {sheet_row}, column {column!r}" if column else f"row {sheet_row}"
    return f"{where}: {text}", column


def _in_sheet_terms(report: MergeReport, sheet: Sheet) -> ImportReport:
    """The merge report with sheet rows, headings and readable reasons."""
    changes = report.changes.copy()
    rows = changes["row"].to_numpy(dtype=np.int64)
    changes["sheet_row"] = sheet.sheet_rows[rows] if len(rows) else rows
    changes["column"] = pd.Series(
        pd.NA, index=changes.index, dtype=changes["reason"].dtype
    )
    has = changes["reason"].notna().to_numpy()
    if has.any():
        # Reasons repeat over the snips of a row: rewrite each distinct
        # (row, reason) once, then take the texts back by group number.
        pairs = changes.loc[has, ["sheet_row", "reason"]]
        group = pairs.groupby(["sheet_row", "reason"], sort=False).ngroup().to_numpy()
        firsts = pairs.drop_duplicates()
        located = [
            _located(why, int(r), sheet.headings)
            for r, why in zip(
                firsts["sheet_row"].to_numpy(),
                firsts["reason"].to_numpy(dtype=object),
                strict=True,
            )
        ]
        texts = np.array([t for t, _ in located], dtype=object)
        cols = np.array([c for _, c in located], dtype=object)
        reason = changes["reason"].to_numpy(dtype=object)
        column = np.full(len(changes), None, dtype=object)
        reason[has] = texts[group]
        column[has] = cols[group]
        changes["reason"] = pd.array(reason, dtype=changes["reason"].dtype)
        changes["column"] = pd.array(column, dtype=changes["reason"].dtype)
    failed = changes.loc[changes["status"] == "failed"].sort_values(
        ["sheet_row", "kind"], kind="stable", ignore_index=True
    )
    base = {f.name: getattr(report, f.name) for f in fields(MergeReport)}
    base.update(changes=changes, failed=failed)
    return ImportReport(**base, source=sheet.where)


def import_spreadsheet(
    store: Store | str | Path,
    path: str | Path | Sheet,
    mapping: Mapping[str, str] | None = None,
    *,
    sheet_name: str | int | None = None,
    author: str | None = None,
    dry_run: bool = False,
    on_existing: str = "overwrite",
    overwrite_dead: bool = False,
    npartitions: int | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> ImportReport:
    r"""Import a scoring sheet (CSV or XLSX) into the store as one atomic, logged batch.

    Parameters
    ----------
    store : Store or path-like
        The store (or its file).
    path : str, path-like or Sheet
        The spreadsheet: ``.csv`` (UTF-8), ``.tsv`` or ``.xlsx``; or a sheet
        already read by :func:`read_spreadsheet` (then *mapping* and
        *sheet_name* are not used).
    mapping : mapping of str to str, optional
        Canonical name to the sheet's heading, e.g. ``{"embryo_id": "Embryo ID",
        "phenotype": "Call"}``; may be omitted for headings that already are
        canonical names (:data:`CANONICAL_COLUMNS`; case and spaces ignored).
    sheet_name : str or int, optional
        Worksheet of an XLSX file (default the first).
    author : str, optional
        Who makes the changes; default ``import:<file name>``.
    dry_run : bool, default False
        Compute and report what would change; write nothing.
    on_existing : {"overwrite", "skip", "error"}, default "overwrite"
        What happens to snips that already hold another phenotype (see
        :func:`pipeline.assign_phenotypes`); anything but ``overwrite`` also
        keeps existing genotypes.
    overwrite_dead : bool, default False
        Allow non-DEAD values at or after death, keeping DEAD permanent.
    npartitions : int, optional
        Partitions of the snip table.
    lock_timeout : float, default LOCK_TIMEOUT
        Seconds to wait for another writer's lock.

    Returns
    -------
    ImportReport
        Counts, failed rows (with ``sheet_row``, ``column`` and a reason that
        names both) and the ``batch_id`` that :func:`pipeline.undo` takes.

    Raises
    ------
    SpreadsheetError
        If the file as a whole cannot be imported (see :func:`read_spreadsheet`);
        nothing is written.
    MergeConflictError
        If the store changed under the batch; nothing is written.

    Notes
    -----
    Triggers computation.

    Examples
    --------
    >>> import pathlib, tempfile, pipeline
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> store = pipeline.testing.make_store(n_experiments=1, n_embryos=2, n_frames=4, seed=1)
    >>> _ = store.save(folder / "store.json")
    >>> e1, e2 = sorted(store.embryos)
    >>> _ = (folder / "scores.csv").write_text(
    ...     f"Embryo ID,Call,Frames,Genotype\n{e1},edema,[0:2],wt\n{e2},edma,,\n")
    >>> report = import_spreadsheet(folder / "store.json", folder / "scores.csv", {"phenotype": "Call"})
    >>> report.n_written, report.failed["reason"].iloc[0].split(";")[0]
    (3, "row 3, column 'Call': unknown phenotype 'edma' (did you mean 'EDEMA'?)")
    """
    sheet = (
        path
        if isinstance(path, Sheet)
        else read_spreadsheet(path, mapping, sheet_name=sheet_name)
    )
    if not isinstance(store, Store):
        store = read_store(store, document=True)  # the import writes into it
    who = (
        author.strip()
        if isinstance(author, str) and author.strip()
        else f"import:{sheet.path.name}"
    )
    pheno, geno = import_changes(
        store,
        sheet,
        author=who,
        on_existing=on_existing,
        overwrite_dead=overwrite_dead,
        npartitions=npartitions,
    )
    inputs = {
        "command": "import",
        "spreadsheet": str(sheet.path),
        "sheet": sheet.sheet_name,
        "columns": sheet.headings,
        "on_existing": on_existing,
        "overwrite_dead": overwrite_dead,
    }
    report = merge_many(
        store,
        [pheno, geno],
        dry_run=dry_run,
        kind="import",
        lock_timeout=lock_timeout,
        inputs=inputs,
    )
    return _in_sheet_terms(report, sheet)
