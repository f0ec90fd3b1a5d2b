"""Stage 1: reading, checking, editing and saving the JSON store."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import pipeline
from pipeline._atomic import atomic_write_bytes, backup_dir, store_lock
from pipeline.errors import (
    AnnotationError,
    MergeConflictError,
    StoreFormatError,
    StoreLockedError,
    UpgradeWarning,
)
from pipeline.store import Store, read_store, validate_store, write_store
from pipeline.testing import assert_store_equal, make_document

# Entities of tests/data/store_minimal.json.
E1 = "20240411_A01_e01"  # alive, WT, snips s0000..s0003, two flags on s0001
S1 = "20240411_A01_e01_s0001"
E2 = "20240411_A01_e02"  # dead at frame 3, snips t0000, t0001, t0003, t0004 (gap at 2)
E3 = "20250624_chem02_28C_T00_1356_H01_e01"  # lmx1b homozygous, bare 4-digit suffixes
E4 = "20250624_chem02_28C_T00_1356_H02_e1"  # bare 3-digit suffixes, no frame field
TIMESTAMP = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
)


def problems_of(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return Store(doc, validate=False).problems()


def snip(doc: dict[str, Any], embryo: str = E1, snip_id: str = S1) -> dict[str, Any]:
    return doc["embryos"][embryo]["snips"][snip_id]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- valid files
def test_minimal_store_is_valid(minimal_path: Path) -> None:
    store = read_store(minimal_path)
    assert store.problems() == []
    assert validate_store(minimal_path) == []
    assert store.counts() == {"experiments": 2, "videos": 3, "embryos": 4, "snips": 16}
    assert minimal_path.stat().st_size < 5 * 1024


def test_shared_small_example_is_valid(small_store_path: Path) -> None:
    assert validate_store(small_store_path) == []


# ----------------------------------------------------------- validation rules
def _rename_embryo(doc: dict[str, Any], old: str, new: str) -> None:
    doc["embryos"][new] = doc["embryos"].pop(old)


def _rename_snip(doc: dict[str, Any], embryo: str, old: str, new: str) -> None:
    snips = doc["embryos"][embryo]["snips"]
    snips[new] = snips.pop(old)


def _foreign_snip(doc: dict[str, Any]) -> None:
    # A snip of embryo e02 filed under e01 (at a frame e01 does not have).
    moved = snip(doc)
    moved["frame"] = 9
    _rename_snip(doc, E1, S1, "20240411_A01_e02_s0009")


def _dup(lst: list[dict[str, Any]]) -> None:
    lst.append(dict(lst[0]))


SNIP1 = f'$.embryos["{E1}"].snips["{S1}"]'

# (id, mutation, JSON path of the problem, fragment of its message)
RULES: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    # identifiers
    (
        "bad-embryo-id",
        lambda d: _rename_embryo(d, E4, "20250624_chem02_28C_T00_1356_H2_e1"),
        '$.embryos["20250624_chem02_28C_T00_1356_H2_e1"]',
        "not an embryo id",
    ),
    (
        "source-disagrees-with-id",
        lambda d: d["embryos"][E1]["source"].update(video_id="20240411_B01"),
        f'$.embryos["{E1}"].source',
        "implies video_id '20240411_A01'",
    ),
    (
        "bad-experiment-id-in-source",
        lambda d: d["embryos"][E1]["source"].update(experiment_id="2024-04-11"),
        f'$.embryos["{E1}"].source',
        "experiment_id '20240411', found",
    ),
    (
        "bad-snip-suffix",
        lambda d: _rename_snip(d, E1, S1, f"{E1}_x0001"),
        f'$.embryos["{E1}"].snips["{E1}_x0001"]',
        "bad snip id",
    ),
    (
        "five-digit-suffix",
        lambda d: _rename_snip(d, E1, S1, f"{E1}_s00001"),
        f'$.embryos["{E1}"].snips["{E1}_s00001"]',
        "bad snip id",
    ),
    (
        "snip-of-another-embryo",
        _foreign_snip,
        f'$.embryos["{E1}"].snips["20240411_A01_e02_s0009"]',
        f"does not start with its embryo id '{E1}'",
    ),
    (
        "frame-disagrees-with-suffix",
        lambda d: snip(d).update(frame=7),
        f"{SNIP1}.frame",
        "frame 7 disagrees with the snip id suffix (frame 1)",
    ),
    (
        "frame-twice",
        lambda d: d["embryos"][E1]["snips"].update(
            {f"{E1}_t0001": copy.deepcopy(snip(d))}
        ),
        f'$.embryos["{E1}"].snips["{E1}_t0001"]',
        "frame 1 occurs twice",
    ),
    (
        "bad-video-id-in-store-flags",
        lambda d: d["flags"]["video"].update({"20240411_Z01": []}),
        '$.flags.video["20240411_Z01"]',
        "does not have the expected form",
    ),
    # death_frame is a cache of the snips, both ways
    (
        "death-frame-too-late",
        lambda d: d["embryos"][E2].update(death_frame=4),
        f'$.embryos["{E2}"].death_frame',
        "death_frame is 4 but must be 3",
    ),
    (
        "death-frame-missing",
        lambda d: d["embryos"][E2].update(death_frame=None),
        f'$.embryos["{E2}"].death_frame',
        "death_frame is None but must be 3",
    ),
    (
        "death-frame-without-dead-snip",
        lambda d: d["embryos"][E1].update(death_frame=2),
        f'$.embryos["{E1}"].death_frame',
        "must be null (no DEAD snip)",
    ),
    (
        "dead-not-filled-forward",
        lambda d: snip(d, E2, f"{E2}_t0004")["phenotype"].update(value="NONE"),
        f'$.embryos["{E2}"].snips["{E2}_t0004"].phenotype.value',
        "DEAD is permanent and must fill forward",
    ),
    # vocabulary, with a suggestion
    (
        "unknown-phenotype",
        lambda d: snip(d)["phenotype"].update(value="EDMEA"),
        f"{SNIP1}.phenotype.value",
        "unknown phenotype 'EDMEA' (did you mean 'EDEMA'?)",
    ),
    (
        "phenotype-wrong-case",
        lambda d: snip(d)["phenotype"].update(value="dead"),
        f"{SNIP1}.phenotype.value",
        "unknown phenotype 'dead' (did you mean 'DEAD'?)",
    ),
    (
        "unknown-genotype",
        lambda d: d["embryos"][E3]["genotype"].update(value="lmxb1"),
        f'$.embryos["{E3}"].genotype.value',
        "unknown genotype 'lmxb1' (did you mean 'lmx1b'?)",
    ),
    (
        "unknown-zygosity",
        lambda d: d["embryos"][E3]["genotype"].update(zygosity="homozygot"),
        f'$.embryos["{E3}"].genotype.zygosity',
        "unknown zygosity 'homozygot' (did you mean 'homozygous'?)",
    ),
    (
        "unknown-snip-flag",
        lambda d: snip(d)["flags"][0].update(value="OUT_OF_FOCU"),
        f"{SNIP1}.flags[0].value",
        "flag 'OUT_OF_FOCU' is not permitted at level 'snip' (did you mean 'OUT_OF_FOCUS'?)",
    ),
    (
        "flag-of-another-level",
        lambda d: snip(d)["flags"][0].update(value="DARK"),
        f"{SNIP1}.flags[0].value",
        "flag 'DARK' is not permitted at level 'snip'",
    ),
    (
        "unknown-severity",
        lambda d: snip(d)["flags"][0].update(severity="warn"),
        f"{SNIP1}.flags[0].severity",
        "unknown severity 'warn' (did you mean 'warning'?)",
    ),
    (
        "unknown-severity-store-flag",
        lambda d: d["flags"]["image"]["20240411_A01_t0002"][0].update(severity="Error"),
        '$.flags.image["20240411_A01_t0002"][0].severity',
        "unknown severity 'Error' (did you mean 'error'?)",
    ),
    # wrong types
    (
        "frame-as-string",
        lambda d: snip(d).update(frame="1"),
        f"{SNIP1}.frame",
        "expected integer, found string '1'",
    ),
    (
        "confidence-as-string",
        lambda d: snip(d)["phenotype"].update(confidence="high"),
        f"{SNIP1}.phenotype.confidence",
        "expected number, found string 'high'",
    ),
    (
        "confidence-null",
        lambda d: snip(d)["phenotype"].update(confidence=None),
        f"{SNIP1}.phenotype.confidence",
        "expected number, found null",
    ),
    (
        "confirmed-as-string",
        lambda d: d["embryos"][E1]["genotype"].update(confirmed="yes"),
        f'$.embryos["{E1}"].genotype.confirmed',
        "expected boolean, found string 'yes'",
    ),
    (
        "death-frame-as-string",
        lambda d: d["embryos"][E2].update(death_frame="3"),
        f'$.embryos["{E2}"].death_frame',
        "expected null or frame, found '3'",
    ),
    (
        "flags-as-object",
        lambda d: snip(d).update(flags={}),
        f"{SNIP1}.flags",
        "expected array, found object",
    ),
    (
        "measurement-as-string",
        lambda d: snip(d)["measurements"].update(area_um2="big"),
        f"{SNIP1}.measurements.area_um2",
        "expected number or null, found string 'big'",
    ),
    (
        "embryos-as-list",
        lambda d: d.update(embryos=[]),
        "$.embryos",
        "expected an object of embryos",
    ),
    (
        "schema-version-2",
        lambda d: d["file_info"].update(schema_version=2),
        "$.file_info.schema_version",
        "expected 1, found 2",
    ),
    # missing keys
    (
        "snip-without-phenotype",
        lambda d: snip(d).pop("phenotype"),
        SNIP1,
        "missing required key(s) 'phenotype'",
    ),
    (
        "phenotype-without-author",
        lambda d: snip(d)["phenotype"].pop("author"),
        f"{SNIP1}.phenotype",
        "missing required key(s) 'author'",
    ),
    (
        "embryo-without-source",
        lambda d: d["embryos"][E1].pop("source"),
        f'$.embryos["{E1}"]',
        "missing required key(s) 'source'",
    ),
    (
        "file-info-without-created",
        lambda d: d["file_info"].pop("created"),
        "$.file_info",
        "missing required key(s) 'created'",
    ),
    (
        "no-store-flags",
        lambda d: d.pop("flags"),
        "$",
        "missing required key(s) 'flags'",
    ),
    # unexpected keys
    (
        "unexpected-snip-key",
        lambda d: snip(d).update(comment="x"),
        f"{SNIP1}.comment",
        "unexpected key 'comment'",
    ),
    (
        "unexpected-phenotype-key",
        lambda d: snip(d)["phenotype"].update(method="x"),
        f"{SNIP1}.phenotype.method",
        "unexpected key 'method'",
    ),
    (
        "unexpected-embryo-key",
        lambda d: d["embryos"][E1].update(metadata={}),
        f'$.embryos["{E1}"].metadata',
        "unexpected key 'metadata'",
    ),
    (
        "unexpected-top-level-key",
        lambda d: d.update(config={}),
        "$.config",
        "unexpected key 'config'",
    ),
    # measurement keys must not collide with the table's columns
    (
        "measurement-named-frame",
        lambda d: snip(d)["measurements"].update(frame=3.0),
        f"{SNIP1}.measurements.frame",
        "'frame' is reserved",
    ),
    (
        "measurement-named-is-dead",
        lambda d: snip(d)["measurements"].update(is_dead=1),
        f"{SNIP1}.measurements.is_dead",
        "collides with the snip table's own column 'is_dead'",
    ),
    (
        "measurement-named-n-flags",
        lambda d: snip(d, E3, f"{E3}_0010").update(measurements={"n_flags": 0}),
        f'$.embryos["{E3}"].snips["{E3}_0010"].measurements.n_flags',
        "collides",
    ),
    # authors and timestamps
    (
        "empty-author",
        lambda d: snip(d)["phenotype"].update(author=""),
        f"{SNIP1}.phenotype.author",
        "author must be a non-empty name",
    ),
    (
        "blank-author",
        lambda d: snip(d)["phenotype"].update(author="   "),
        f"{SNIP1}.phenotype.author",
        "author must be a non-empty name",
    ),
    (
        "empty-flag-author",
        lambda d: snip(d)["flags"][1].update(author=""),
        f"{SNIP1}.flags[1].author",
        "author must be a non-empty name",
    ),
    (
        "empty-genotype-author",
        lambda d: d["embryos"][E1]["genotype"].update(author=" "),
        f'$.embryos["{E1}"].genotype.author',
        "author must be a non-empty name",
    ),
    (
        "timestamp-without-offset",
        lambda d: snip(d)["phenotype"].update(timestamp="2026-01-05T10:00:00"),
        f"{SNIP1}.phenotype.timestamp",
        "is not ISO 8601 with a UTC offset",
    ),
    (
        "timestamp-with-space",
        lambda d: d["embryos"][E2]["treatments"][0].update(
            timestamp="2026-01-05 10:00:00+00:00"
        ),
        f'$.embryos["{E2}"].treatments[0].timestamp',
        "is not ISO 8601 with a UTC offset",
    ),
    (
        "file-info-timestamp",
        lambda d: d["file_info"].update(created="yesterday"),
        "$.file_info.created",
        "'yesterday' does not have the expected form",
    ),
    # confidence within [0, 1]
    (
        "phenotype-confidence-above-1",
        lambda d: snip(d)["phenotype"].update(confidence=1.5),
        f"{SNIP1}.phenotype.confidence",
        "confidence must be within [0, 1], found 1.5",
    ),
    (
        "phenotype-confidence-nan",
        lambda d: snip(d)["phenotype"].update(confidence=math.nan),
        f"{SNIP1}.phenotype.confidence",
        "found nan",
    ),
    (
        "flag-confidence-below-0",
        lambda d: snip(d)["flags"][0].update(confidence=-0.1),
        f"{SNIP1}.flags[0].confidence",
        "expected a number >= 0, found -0.1",
    ),
    (
        "genotype-confidence-2",
        lambda d: d["embryos"][E1]["genotype"].update(confidence=2),
        f'$.embryos["{E1}"].genotype.confidence',
        "expected a number <= 1, found 2",
    ),
    (
        "genotype-confidence-nan",
        lambda d: d["embryos"][E1]["genotype"].update(confidence=math.nan),
        f'$.embryos["{E1}"].genotype.confidence',
        "found NaN",
    ),
    # a flag value at most once per entity
    (
        "duplicate-snip-flag",
        lambda d: _dup(snip(d)["flags"]),
        f"{SNIP1}.flags[2].value",
        "flag 'OUT_OF_FOCUS' occurs twice",
    ),
    (
        "duplicate-embryo-flag",
        lambda d: _dup(d["embryos"][E2]["flags"]),
        f'$.embryos["{E2}"].flags[1].value',
        "occurs twice",
    ),
    (
        "duplicate-store-flag",
        lambda d: _dup(d["flags"]["experiment"]["20240411"]),
        '$.flags.experiment["20240411"][1].value',
        "flag 'PROTOCOL_DEVIATION' occurs twice",
    ),
    # integers beyond 64 bits (Python ints of a document built in memory; the
    # table holds int64 and float64) are problems, never a crash
    (
        "phenotype-confidence-10**30",
        lambda d: snip(d)["phenotype"].update(confidence=10**30),
        f"{SNIP1}.phenotype.confidence",
        "expected a number <= 1, found 1000000000000000000000000000000",
    ),
    (
        "phenotype-confidence-10**400",
        lambda d: snip(d)["phenotype"].update(confidence=10**400),
        f"{SNIP1}.phenotype.confidence",
        "expected a number <= 1, found 1000000000",
    ),
    (
        "frame-2**70",
        lambda d: snip(d).update(frame=2**70),
        f"{SNIP1}.frame",
        "expected a non-negative integer that fits in 64 bits, found 1180591620717411303424",
    ),
    (
        "frame-minus-2**70",
        lambda d: snip(d).update(frame=-(2**70)),
        f"{SNIP1}.frame",
        "expected a number >= 0, found -1180591620717411303424",
    ),
    (
        "frame-10**400",
        lambda d: snip(d).update(frame=10**400),
        f"{SNIP1}.frame",
        "expected a non-negative integer that fits in 64 bits, found 1000000000",
    ),
    (
        "death-frame-2**70",
        lambda d: d["embryos"][E2].update(death_frame=2**70),
        f'$.embryos["{E2}"].death_frame',
        "expected a non-negative integer that fits in 64 bits, found 1180591620717411303424",
    ),
    (
        "death-frame-10**400",
        lambda d: d["embryos"][E2].update(death_frame=10**400),
        f'$.embryos["{E2}"].death_frame',
        "expected a non-negative integer that fits in 64 bits, found 1000000000",
    ),
    (
        "measurement-10**400",
        lambda d: snip(d)["measurements"].update(area_um2=10**400),
        f"{SNIP1}.measurements.area_um2",
        "expected a float, found the integer 1000000000",
    ),
    (
        "new-measurement-key-2**70",
        lambda d: snip(d)["measurements"].update(volume_um3=2**70),
        f"{SNIP1}.measurements.volume_um3",
        "expected a float, found the integer 1180591620717411303424, which does not fit in 64 bits",
    ),
    (
        "genotype-confidence-10**30",
        lambda d: d["embryos"][E1]["genotype"].update(confidence=10**30),
        f'$.embryos["{E1}"].genotype.confidence',
        "expected a number <= 1, found 1000000000000000000000000000000",
    ),
    (
        "genotype-confidence-10**400",
        lambda d: d["embryos"][E1]["genotype"].update(confidence=10**400),
        f'$.embryos["{E1}"].genotype.confidence',
        "expected a number <= 1, found 1000000000",
    ),
    (
        "snip-flag-confidence-10**400",
        lambda d: snip(d)["flags"][0].update(confidence=10**400),
        f"{SNIP1}.flags[0].confidence",
        "expected a number <= 1, found 1000000000",
    ),
    (
        "embryo-flag-confidence-10**400",
        lambda d: d["embryos"][E2]["flags"][0].update(confidence=10**400),
        f'$.embryos["{E2}"].flags[0].confidence',
        "expected a number <= 1, found 1000000000",
    ),
    (
        "store-flag-confidence-10**400",
        lambda d: d["flags"]["experiment"]["20240411"][0].update(confidence=10**400),
        '$.flags.experiment["20240411"][0].confidence',
        "expected a number <= 1, found 1000000000",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_each_rule_reports_its_path_and_what_to_fix(
    minimal_doc, mutate, path, fragment
) -> None:
    mutate(minimal_doc)
    problems = problems_of(minimal_doc)
    assert any(p == path and fragment in m for p, m in problems), problems
    with pytest.raises(StoreFormatError) as info:
        Store(minimal_doc)
    assert (
        path,
        next(m for p, m in problems if p == path and fragment in m),
    ) in info.value.problems
    assert path in str(info.value)


# Rules checked on a real file, read the way users read stores: orjson reads
# what json.dumps writes, and the checks see exactly the parsed values.
# (id, mutation, JSON path of the problem, fragment of its message)
FILE_RULES: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    (
        "phenotype-notes-as-float",
        lambda d: snip(d)["phenotype"].update(notes=1.5),
        f"{SNIP1}.phenotype.notes",
        "expected string, found number 1.5",
    ),
    (
        "phenotype-notes-as-integer",
        lambda d: snip(d)["phenotype"].update(notes=3),
        f"{SNIP1}.phenotype.notes",
        "expected string, found integer 3",
    ),
    (
        "phenotype-notes-null",
        lambda d: snip(d)["phenotype"].update(notes=None),
        f"{SNIP1}.phenotype.notes",
        "expected string, found null",
    ),
    (
        # another snip's odd key sends the whole load down the robust path
        "phenotype-notes-as-float-robust-path",
        lambda d: (
            snip(d)["phenotype"].update(notes=1.5),
            snip(d, E4, f"{E4}_007").update(unexpected=1),
        ),
        f"{SNIP1}.phenotype.notes",
        "expected string, found number 1.5",
    ),
    # treatment fields of an otherwise sound embryo
    *[
        (
            f"treatment-{key}-{label}",
            lambda d, key=key, value=value: d["embryos"][E1]["treatments"].append(
                {"value": "DMSO", "author": "a", "timestamp": "2026-01-05T10:00:00+00:00", key: value}
            ),
            f'$.embryos["{E1}"].treatments[0].{key}',
            message,
        )
        for key, label, value, message in [
            ("notes", "float", 1.5, "expected string, found number 1.5"),
            ("temperature_celsius", "string", "hot", "expected number, found string 'hot'"),
            ("temperature_celsius", "boolean", True, "expected number, found boolean True"),
            ("concentration", "array", [1], "expected number or string, found array [1]"),
        ]
    ],
    # integers beyond 64 bits
    (
        "phenotype-confidence-2**63",
        lambda d: snip(d)["phenotype"].update(confidence=2**63),
        f"{SNIP1}.phenotype.confidence",
        "expected a number <= 1, found 9223372036854775808",
    ),
    (
        "phenotype-confidence-10**30",  # read as the float 1e30
        lambda d: snip(d)["phenotype"].update(confidence=10**30),
        f"{SNIP1}.phenotype.confidence",
        "confidence must be within [0, 1], found 1e+30",
    ),
    (
        "frame-2**63",
        lambda d: snip(d).update(frame=2**63),
        f"{SNIP1}.frame",
        "expected a non-negative integer that fits in 64 bits, found 9223372036854775808",
    ),
    (
        "frame-2**64-1",
        lambda d: snip(d).update(frame=2**64 - 1),
        f"{SNIP1}.frame",
        "expected a non-negative integer that fits in 64 bits, found 18446744073709551615",
    ),
    (
        "frame-2**70",  # read as a float
        lambda d: snip(d).update(frame=2**70),
        f"{SNIP1}.frame",
        "expected integer, found number 1.1805916207174113e+21",
    ),
    (
        "frame-2**63-robust-path",
        lambda d: (
            snip(d).update(frame=2**63),
            snip(d, E4, f"{E4}_007").update(unexpected=1),
        ),
        f"{SNIP1}.frame",
        "expected a non-negative integer that fits in 64 bits, found 9223372036854775808",
    ),
    (
        "death-frame-2**63",
        lambda d: d["embryos"][E2].update(death_frame=2**63),
        f'$.embryos["{E2}"].death_frame',
        "expected a non-negative integer that fits in 64 bits, found 9223372036854775808",
    ),
    (
        "death-frame-2**70",
        lambda d: d["embryos"][E2].update(death_frame=2**70),
        f'$.embryos["{E2}"].death_frame',
        "expected null or frame, found 1.1805916207174113e+21",
    ),
    (
        "measurement-2**63",
        lambda d: snip(d)["measurements"].update(area_um2=2**63),
        f"{SNIP1}.measurements.area_um2",
        "expected a float, found the integer 9223372036854775808, which does not fit in 64 bits",
    ),
    (
        "genotype-confidence-10**30",
        lambda d: d["embryos"][E1]["genotype"].update(confidence=10**30),
        f'$.embryos["{E1}"].genotype.confidence',
        "expected a number <= 1, found 1e+30",
    ),
    (
        "genotype-confidence-2**64-1",
        lambda d: d["embryos"][E1]["genotype"].update(confidence=2**64 - 1),
        f'$.embryos["{E1}"].genotype.confidence',
        "expected a number <= 1, found 18446744073709551615",
    ),
    (
        "snip-flag-confidence-10**30",
        lambda d: snip(d)["flags"][0].update(confidence=10**30),
        f"{SNIP1}.flags[0].confidence",
        "expected a number <= 1, found 1e+30",
    ),
    (
        "embryo-flag-confidence-10**30",
        lambda d: d["embryos"][E2]["flags"][0].update(confidence=10**30),
        f'$.embryos["{E2}"].flags[0].confidence',
        "expected a number <= 1, found 1e+30",
    ),
    # source ids of the wrong type: reported, not an Arrow error while building the table
    (
        "source-video-id-integer",
        lambda d: d["embryos"][E2]["source"].update(video_id=7),
        f'$.embryos["{E2}"].source.video_id',
        "expected string, found integer 7",
    ),
    (
        "source-experiment-id-null",
        lambda d: d["embryos"][E2]["source"].update(experiment_id=None),
        f'$.embryos["{E2}"].source.experiment_id',
        "expected string, found null",
    ),
    (
        "store-flag-confidence-2**63",
        lambda d: d["flags"]["experiment"]["20240411"][0].update(confidence=2**63),
        '$.flags.experiment["20240411"][0].confidence',
        "expected a number <= 1, found 9223372036854775808",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [r[1:] for r in FILE_RULES],
    ids=[r[0] for r in FILE_RULES],
)
def test_each_rule_is_reported_when_reading_a_file(
    minimal_doc, tmp_path: Path, mutate, path, fragment
) -> None:
    mutate(minimal_doc)
    file = tmp_path / "bad.json"
    # json, not orjson: orjson refuses to write integers beyond 64 bits.
    file.write_text(json.dumps(minimal_doc, indent=2))
    with pytest.raises(StoreFormatError) as info:
        read_store(file)
    problems = info.value.problems
    assert any(p == path and fragment in m for p, m in problems), problems
    assert path in str(info.value)
    assert sorted(validate_store(file)) == sorted(problems)


def test_integer_too_large_for_a_float_in_a_file_is_a_json_error(
    minimal_doc, tmp_path: Path
) -> None:
    # orjson refuses it while parsing, so it never reaches the checks; in
    # memory it is a problem with its path (see RULES).
    snip(minimal_doc)["measurements"]["area_um2"] = 10**400
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(minimal_doc, indent=2))
    with pytest.raises(StoreFormatError) as info:
        read_store(file)
    [(path, message)] = info.value.problems
    assert path == "$"
    assert "is not valid JSON: number is infinity when parsed as double" in message
    assert "at line 59, column 25" in message


def test_all_problems_are_reported_at_once(minimal_doc, tmp_path: Path) -> None:
    snip(minimal_doc)["phenotype"]["value"] = "EDMEA"
    snip(minimal_doc, E2, f"{E2}_t0000")["phenotype"]["author"] = ""
    minimal_doc["embryos"][E2]["death_frame"] = 4
    minimal_doc["embryos"][E3]["genotype"]["zygosity"] = "homo"
    snip(minimal_doc, E3, f"{E3}_0012")["frame"] = 99
    snip(minimal_doc, E4, f"{E4}_007")["unexpected"] = 1
    minimal_doc["flags"]["image"]["20240411_A01_t0002"][0]["severity"] = "fatal"
    minimal_doc["file_info"]["last_updated"] = "now"
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(minimal_doc))
    before = path.read_bytes()

    with pytest.raises(StoreFormatError) as info:
        read_store(path)
    expected = {
        f"{SNIP1}.phenotype.value",
        f'$.embryos["{E2}"].snips["{E2}_t0000"].phenotype.author',
        f'$.embryos["{E2}"].death_frame',
        f'$.embryos["{E3}"].genotype.zygosity',
        f'$.embryos["{E3}"].snips["{E3}_0012"].frame',
        f'$.embryos["{E4}"].snips["{E4}_007"].unexpected',
        '$.flags.image["20240411_A01_t0002"][0].severity',
        "$.file_info.last_updated",
    }
    err = info.value
    assert {p for p, _ in err.problems} == expected
    text = str(err)
    assert f"{path}: 8 problem(s) found; nothing was changed on disk" in text
    for p in expected:
        assert p in text
    assert err.path == str(path)
    assert isinstance(err, ValueError)
    assert path.read_bytes() == before
    assert sorted(validate_store(path)) == sorted(err.problems)


def test_many_problems_are_summarised(minimal_doc) -> None:
    for e in minimal_doc["embryos"].values():
        for s in e["snips"].values():
            s["phenotype"]["author"] = ""
            s["phenotype"]["timestamp"] = "then"
    minimal_doc["embryos"][E2]["death_frame"] = None
    for k in range(30):
        minimal_doc["flags"]["video"][f"20240411_B{k:02d}"] = [
            {"value": "DRY", "author": "", "timestamp": "x"}
        ]
    with pytest.raises(StoreFormatError) as info:
        Store(minimal_doc)
    n = len(info.value.problems)
    assert n > 40
    assert f"... and {n - 40} more (see the exception's .problems)" in str(info.value)


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "file_info": {},\n  "embryos": {,\n}\n')
    with pytest.raises(
        StoreFormatError, match=r"is not valid JSON: .* at line 3, column 15"
    ) as info:
        read_store(path)
    assert info.value.problems[0][0] == "$"
    assert "restore a backup" in str(info.value)
    assert validate_store(path) == info.value.problems


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(
        StoreFormatError, match="expected a JSON object at the top level, found list"
    ):
        read_store(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_store(tmp_path / "nope.json")


def test_a_folder_without_store_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreFormatError, match=r"folder without a store\.json"):
        read_store(tmp_path)


def test_frame_is_parsed_from_the_suffix_when_absent(minimal_path: Path) -> None:
    table = read_store(minimal_path).snip_table()
    assert table.loc[f"{E4}_007", "frame"] == 7
    assert table.loc[f"{E3}_0013", "frame"] == 13


# ----------------------------------------------------------------- primitives
@pytest.fixture
def store(minimal_doc) -> Store:
    return Store(minimal_doc)


def phenotypes(store: Store, embryo: str) -> dict[str, str]:
    return {
        sid: s["phenotype"]["value"]
        for sid, s in store.embryos[embryo]["snips"].items()
    }


def test_add_phenotype_writes_canonical_value_author_and_time(store: Store) -> None:
    changed = store.add_phenotype(
        S1, "edema", "  alee ", confidence=1, notes="second look"
    )
    assert changed == [S1]
    entry = snip(store.doc)["phenotype"]
    assert entry["value"] == "EDEMA"
    assert entry["author"] == "alee"
    assert entry["confidence"] == 1.0
    assert isinstance(entry["confidence"], float)
    assert entry["notes"] == "second look"
    assert TIMESTAMP.match(entry["timestamp"])
    # The cached table follows the document.
    assert store.snip_table().loc[S1, "phenotype"] == "EDEMA"
    assert store.validate() == []


def test_dead_fills_forward_and_sets_death_frame(store: Store) -> None:
    changed = store.add_phenotype(S1, "DEAD", "cruiz")
    assert changed == [S1, f"{E1}_s0002", f"{E1}_s0003"]
    assert phenotypes(store, E1) == {
        f"{E1}_s0000": "NONE",
        S1: "DEAD",
        f"{E1}_s0002": "DEAD",
        f"{E1}_s0003": "DEAD",
    }
    assert store.embryos[E1]["death_frame"] == 1
    table = store.snip_table()
    assert table.loc[f"{E1}_s0003", "is_dead"]
    assert table.loc[f"{E1}_s0000", "death_frame"] == 1
    assert store.validate() == []


def test_earlier_dead_moves_death_frame_back(store: Store) -> None:
    # e02 is dead from frame 3 (t0003, t0004); frame 2 is a gap.
    changed = store.add_phenotype(f"{E2}_t0001", "DEAD", "cruiz")
    assert changed == [f"{E2}_t0001"]  # later snips were DEAD already
    assert store.embryos[E2]["death_frame"] == 1
    assert store.add_phenotype(f"{E2}_t0004", "DEAD", "bkim") == [f"{E2}_t0004"]
    assert store.embryos[E2]["death_frame"] == 1
    assert store.validate() == []


def test_value_after_death_is_refused(store: Store) -> None:
    before = copy.deepcopy(store.doc)
    for sid in (f"{E2}_t0003", f"{E2}_t0004"):
        with pytest.raises(
            AnnotationError,
            match=r"at or after death \(frame 3\): DEAD is permanent; pass overwrite_dead=True",
        ) as info:
            store.add_phenotype(sid, "NORMAL", "alee")
        assert info.value.reason == "after_death"
    assert_store_equal(store.doc, before)


def test_overwrite_dead_keeps_permanence(store: Store) -> None:
    before = copy.deepcopy(store.doc)
    # Reviving the last frame would leave a live frame after DEAD.
    with pytest.raises(AnnotationError, match="DEAD must stay permanent") as info:
        store.add_phenotype(f"{E2}_t0004", "NORMAL", "alee", overwrite_dead=True)
    assert info.value.reason == "breaks_permanence"
    assert_store_equal(store.doc, before)
    # Correcting the death call frame by frame, from the first DEAD frame, works.
    assert store.add_phenotype(
        f"{E2}_t0003", "NORMAL", "alee", overwrite_dead=True
    ) == [f"{E2}_t0003"]
    assert store.embryos[E2]["death_frame"] == 4
    assert store.validate() == []
    store.add_phenotype(f"{E2}_t0004", "NORMAL", "alee", overwrite_dead=True)
    assert store.embryos[E2]["death_frame"] is None
    assert store.validate() == []


@pytest.mark.parametrize(
    ("snip_id", "reason"),
    [
        ("20240411_A01_e01_s0009", "unknown_snip_id"),
        ("20990101_A01_e01_s0001", "unknown_snip_id"),
        ("not-a-snip", "unknown_snip_id"),
    ],
)
def test_add_phenotype_unknown_snip(store: Store, snip_id: str, reason: str) -> None:
    with pytest.raises(AnnotationError) as info:
        store.add_phenotype(snip_id, "NORMAL", "alee")
    assert info.value.reason == reason


def test_add_phenotype_vocabulary(store: Store) -> None:
    with pytest.raises(
        AnnotationError,
        match=re.escape(
            "unknown phenotype 'EDMEA' (did you mean 'EDEMA'?); permitted: BLUR"
        ),
    ) as info:
        store.add_phenotype(S1, "EDMEA", "alee")
    assert info.value.reason == "unknown_phenotype"
    with pytest.raises(AnnotationError, match="must be a non-empty string"):
        store.add_phenotype(S1, "  ", "alee")


@pytest.mark.parametrize("author", ["", "   ", None, 3])
def test_author_is_required(store: Store, author: Any) -> None:
    calls = [
        lambda: store.add_phenotype(S1, "NORMAL", author),
        lambda: store.add_genotype(E2, "WT", author),
        lambda: store.add_flag(S1, "MOTION_BLUR", "snip", author),
        lambda: store.add_treatment(E1, "heat_shock", author),
    ]
    for call in calls:
        with pytest.raises(
            AnnotationError, match="author must be a non-empty name"
        ) as info:
            call()
        assert info.value.reason == "bad_author"


@pytest.mark.parametrize("confidence", [-0.01, 1.01, math.nan, math.inf, True, "0.5"])
def test_confidence_must_be_within_0_and_1(store: Store, confidence: Any) -> None:
    before = copy.deepcopy(store.doc)
    calls = [
        lambda: store.add_phenotype(S1, "NORMAL", "alee", confidence=confidence),
        lambda: store.add_genotype(E2, "WT", "alee", confidence=confidence),
        lambda: store.add_flag(
            S1, "MOTION_BLUR", "snip", "alee", confidence=confidence
        ),
    ]
    for call in calls:
        with pytest.raises(
            AnnotationError, match=r"confidence must be a number within \[0, 1\]"
        ) as info:
            call()
        assert info.value.reason == "bad_confidence"
    assert_store_equal(store.doc, before)


def test_confidence_bounds_are_inclusive(store: Store) -> None:
    store.add_phenotype(S1, "NORMAL", "alee", confidence=0)
    store.add_phenotype(f"{E1}_s0002", "NORMAL", "alee", confidence=1.0)
    assert store.validate() == []


def test_add_genotype(store: Store) -> None:
    store.add_genotype(
        E2,
        "LMX1B",
        "bkim",
        confirmed=True,
        allele="sa123",
        zygosity="Heterozygous",
        confidence=0.9,
        notes="PCR",
    )
    g = store.embryos[E2]["genotype"]
    assert {
        k: g[k]
        for k in (
            "value",
            "author",
            "confirmed",
            "allele",
            "zygosity",
            "confidence",
            "notes",
        )
    } == {
        "value": "lmx1b",
        "author": "bkim",
        "confirmed": True,
        "allele": "sa123",
        "zygosity": "heterozygous",
        "confidence": 0.9,
        "notes": "PCR",
    }
    assert TIMESTAMP.match(g["timestamp"])
    assert store.snip_table().loc[f"{E2}_t0000", "genotype"] == "lmx1b"
    assert store.validate() == []


def test_add_genotype_refusals(store: Store) -> None:
    with pytest.raises(
        AnnotationError, match="already has genotype 'WT'; pass overwrite=True"
    ) as info:
        store.add_genotype(E1, "shh", "bkim")
    assert info.value.reason == "has_genotype"
    store.add_genotype(E1, "shh", "bkim", overwrite=True)
    assert store.embryos[E1]["genotype"]["value"] == "shh"
    with pytest.raises(
        AnnotationError,
        match=re.escape("unknown genotype 'lmxb1' (did you mean 'lmx1b'?)"),
    ) as info:
        store.add_genotype(E2, "lmxb1", "bkim")
    assert info.value.reason == "unknown_genotype"
    with pytest.raises(AnnotationError, match="unknown zygosity 'homo'") as info:
        store.add_genotype(E2, "shh", "bkim", zygosity="homo")
    assert info.value.reason == "unknown_zygosity"
    with pytest.raises(AnnotationError, match="unknown embryo") as info:
        store.add_genotype("20240411_A01_e09", "WT", "bkim")
    assert info.value.reason == "unknown_embryo"
    assert store.embryos[E2]["genotype"] is None


@pytest.mark.parametrize(
    ("entity", "level", "value", "where"),
    [
        (S1, "snip", "low_confidence", lambda d: snip(d)["flags"]),
        (
            "20240411_A01_t0003",
            "image",
            "Blur",
            lambda d: d["flags"]["image"]["20240411_A01_t0003"],
        ),
        (E1, "embryo", "POOR_QUALITY", lambda d: d["embryos"][E1]["flags"]),
        (
            "20240411_A01",
            "video",
            "dry_well",
            lambda d: d["flags"]["video"]["20240411_A01"],
        ),
        (
            "20250624_chem02_28C_T00_1356",
            "experiment",
            "INCOMPLETE",
            lambda d: d["flags"]["experiment"]["20250624_chem02_28C_T00_1356"],
        ),
    ],
    ids=["snip", "image", "embryo", "video", "experiment"],
)
def test_add_flag_at_every_level(
    store: Store, entity: str, level: str, value: str, where: Callable
) -> None:
    store.add_flag(
        entity,
        value,
        level,
        "auto:test",
        severity="ERROR",
        notes="x=3 > 2",
        auto_generated=True,
        confidence=0.75,
    )
    flag = where(store.doc)[-1]
    assert flag["value"] == value.upper()
    assert flag["severity"] == "error"
    assert (
        flag["author"],
        flag["notes"],
        flag["auto_generated"],
        flag["confidence"],
    ) == ("auto:test", "x=3 > 2", True, 0.75)
    # Raising it again updates it in place.
    n = len(where(store.doc))
    store.add_flag(entity, value, level, "alee", severity="info")
    assert len(where(store.doc)) == n
    assert where(store.doc)[-1]["author"] == "alee"
    assert "auto_generated" not in where(store.doc)[-1]
    assert store.validate() == []


def test_add_flag_updates_the_snip_table(store: Store) -> None:
    store.add_flag(S1, "MOTION_BLUR", "snip", "auto:motion_blur")
    row = store.snip_table().loc[S1]
    assert row["n_flags"] == 3
    assert row["flag_list"] == "MASK_ON_EDGE,MOTION_BLUR,OUT_OF_FOCUS"


@pytest.mark.parametrize(
    ("entity", "level", "value", "severity", "reason", "fragment"),
    [
        (S1, "frame", "MOTION_BLUR", "info", "bad_level", "unknown level 'frame'"),
        (
            "20240411_A01",
            "image",
            "DARK",
            "info",
            "bad_level",
            "'20240411_A01' is a video id, not a image id",
        ),
        (S1, "snip", "DARK", "info", "unknown_snip_flag", "unknown snip flag 'DARK'"),
        (
            S1,
            "snip",
            "MOTION_BLURR",
            "info",
            "unknown_snip_flag",
            "(did you mean 'MOTION_BLUR'?)",
        ),
        (
            S1,
            "snip",
            "MOTION_BLUR",
            "warn",
            "unknown_severity",
            "unknown severity 'warn' (did you mean 'warning'?)",
        ),
        (
            "20240411_A01_e01_s0042",
            "snip",
            "MOTION_BLUR",
            "info",
            "unknown_entity",
            "unknown snip",
        ),
        (
            "20240411_A01_e07",
            "embryo",
            "POOR_QUALITY",
            "info",
            "unknown_embryo",
            "unknown embryo",
        ),
        (
            "A01_e01",
            "embryo",
            "POOR_QUALITY",
            "info",
            "unknown_entity",
            "not an experiment, video, embryo, snip or image id",
        ),
    ],
)
def test_add_flag_refusals(
    store: Store, entity, level, value, severity, reason, fragment
) -> None:
    before = copy.deepcopy(store.doc)
    with pytest.raises(AnnotationError, match=re.escape(fragment)) as info:
        store.add_flag(entity, value, level, "alee", severity=severity)
    assert info.value.reason == reason
    assert_store_equal(store.doc, before)


def test_add_treatment(store: Store) -> None:
    store.add_treatment(
        E1,
        " PTU ",
        "bkim",
        concentration="200 uM",
        temperature_celsius=28,
        notes="from 24 hpf",
    )
    store.add_treatment(E1, "heat_shock", "bkim", concentration=1.5)
    t = store.embryos[E1]["treatments"]
    assert [x["value"] for x in t] == ["PTU", "heat_shock"]
    assert t[0]["concentration"] == "200 uM"
    assert t[0]["temperature_celsius"] == 28.0
    assert t[1]["concentration"] == 1.5
    assert store.validate() == []
    for kwargs, fragment in [
        ({"value": ""}, "treatment must be a non-empty string"),
        ({"concentration": True}, "concentration must be a number or a string"),
        ({"concentration": [1]}, "concentration must be a number or a string"),
        ({"temperature_celsius": "hot"}, "temperature_celsius must be a number"),
    ]:
        args = {"value": "heat_shock", "author": "bkim", **kwargs}
        with pytest.raises(AnnotationError, match=fragment) as info:
            store.add_treatment(E1, **args)
        assert info.value.reason == "bad_value"
    with pytest.raises(AnnotationError, match="unknown embryo"):
        store.add_treatment("20240411_A01_e07", "heat_shock", "bkim")
    assert len(store.embryos[E1]["treatments"]) == 2


def test_primitives_survive_a_save_and_read(store: Store, tmp_path: Path) -> None:
    store.add_phenotype(S1, "DEAD", "cruiz")
    store.add_genotype(E2, "WT", "bkim")
    store.add_flag(E1, "DEVELOPMENTAL_DELAY", "embryo", "alee")
    store.add_treatment(E3, "heat_shock", "bkim")
    path = store.save(tmp_path / "edited.json")
    again = read_store(path)
    assert_store_equal(again, store)
    assert again.snip_table().equals(store.snip_table())


# ----------------------------------------------------------------------- save
def test_save_format_and_last_updated(minimal_path: Path) -> None:
    store = read_store(minimal_path)
    assert write_store(store) == minimal_path
    data = minimal_path.read_bytes()
    assert data.endswith(b"}\n")
    assert data.startswith(b'{\n  "file_info": {\n    "schema_version": 1,')
    last = store.doc["file_info"]["last_updated"]
    assert TIMESTAMP.match(last)
    assert last != "2026-01-05T10:00:00Z"
    assert_store_equal(read_store(minimal_path), store)


def test_in_memory_store_needs_a_path(minimal_doc) -> None:
    with pytest.raises(ValueError, match=r"pass save\(path=...\)"):
        Store(minimal_doc).save()


def test_save_is_atomic_when_rename_fails(
    minimal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = read_store(minimal_path)
    store.add_phenotype(S1, "EDEMA", "alee")
    before = minimal_path.read_bytes()

    def crash(src: Any, dst: Any) -> None:
        # Between the fsynced temporary file and the rename over the store.
        assert Path(src).read_bytes() != before
        msg = "disk on fire"
        raise OSError(msg)

    monkeypatch.setattr("pipeline._atomic.os.replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        store.save()
    assert minimal_path.read_bytes() == before
    assert no_temp_files(minimal_path.parent)
    monkeypatch.undo()
    # Nothing changed on disk, so the same store can still be saved.
    store.save()
    assert (
        read_store(minimal_path).doc["embryos"][E1]["snips"][S1]["phenotype"]["value"]
        == "EDEMA"
    )
    assert no_temp_files(minimal_path.parent)


def test_save_keeps_five_backups(minimal_path: Path) -> None:
    store = read_store(minimal_path)
    versions = [minimal_path.read_bytes()]
    for k in range(8):
        store.add_flag(E1, "POOR_QUALITY", "embryo", "alee", notes=f"version {k}")
        store.save()
        versions.append(minimal_path.read_bytes())
    backups = sorted(backup_dir(minimal_path).iterdir())
    assert len(backups) == 5
    # The newest backups are the versions just before the current one, in order.
    assert [b.read_bytes() for b in backups] == versions[-6:-1]
    for b in backups:
        assert validate_store(b) == []


def test_a_failed_write_leaves_the_store_and_its_newest_backups(minimal_path: Path) -> None:
    # Backups beyond the newest four go while the new file is written (their
    # blocks are freed meanwhile); a write that fails then leaves four.
    store = read_store(minimal_path)
    for k in range(6):
        store.add_flag(E1, "POOR_QUALITY", "embryo", "alee", notes=f"version {k}")
        store.save()
    before = sorted(backup_dir(minimal_path).iterdir())
    current = minimal_path.read_bytes()
    assert len(before) == 5

    def pieces() -> Iterator[bytes]:
        yield b"{"
        msg = "serialising failed"
        raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="serialising failed"):
        atomic_write_bytes(minimal_path, pieces(), backups=5)
    assert minimal_path.read_bytes() == current
    assert sorted(backup_dir(minimal_path).iterdir()) == before[1:]
    assert no_temp_files(minimal_path.parent)
    store.save()  # and the next save keeps five again, the newest being the current file
    after = sorted(backup_dir(minimal_path).iterdir())
    assert len(after) == 5
    assert after[-1].read_bytes() == current


def test_save_without_backups(minimal_path: Path) -> None:
    store = read_store(minimal_path)
    store.save(backups=0)
    assert not backup_dir(minimal_path).exists()


def test_save_refuses_when_the_file_changed_on_disk(minimal_path: Path) -> None:
    mine = read_store(minimal_path)
    theirs = read_store(minimal_path)
    theirs.add_flag(E1, "POOR_QUALITY", "embryo", "bkim")
    theirs.save()
    after_theirs = minimal_path.read_bytes()
    mine.add_phenotype(S1, "EDEMA", "alee")
    assert mine.changed_on_disk()
    with pytest.raises(
        MergeConflictError,
        match="was changed by another writer since it was read; saving would lose their changes",
    ):
        mine.save()
    assert minimal_path.read_bytes() == after_theirs
    assert no_temp_files(minimal_path.parent)
    mine.save(force=True)
    on_disk = read_store(minimal_path)
    assert on_disk.doc["embryos"][E1]["snips"][S1]["phenotype"]["value"] == "EDEMA"
    assert (
        on_disk.doc["embryos"][E1]["flags"] == []
    )  # force means theirs is overwritten
    assert not mine.changed_on_disk()


def test_reload_then_save_keeps_both_changes(minimal_path: Path) -> None:
    mine = read_store(minimal_path)
    theirs = read_store(minimal_path)
    theirs.add_flag(E1, "POOR_QUALITY", "embryo", "bkim")
    theirs.save()
    with mine.locked():
        mine.reload()
        mine.add_phenotype(S1, "EDEMA", "alee")
        mine.save(_locked=True)
    on_disk = read_store(minimal_path).doc
    assert on_disk["embryos"][E1]["snips"][S1]["phenotype"]["value"] == "EDEMA"
    assert on_disk["embryos"][E1]["flags"][0]["value"] == "POOR_QUALITY"


def test_invalid_document_is_never_written(minimal_path: Path, tmp_path: Path) -> None:
    store = read_store(minimal_path)
    before = minimal_path.read_bytes()
    snip(store.doc)["phenotype"]["value"] = "EDMEA"  # behind the primitives' back
    store.invalidate()
    with pytest.raises(StoreFormatError, match=r"unknown phenotype 'EDMEA'"):
        store.save()
    with pytest.raises(StoreFormatError):
        store.save(tmp_path / "elsewhere.json")
    assert minimal_path.read_bytes() == before
    assert not (tmp_path / "elsewhere.json").exists()
    assert no_temp_files(minimal_path.parent)


def test_nan_never_reaches_the_json(minimal_path: Path) -> None:
    store = read_store(minimal_path)
    snip(store.doc)["measurements"]["area_um2"] = math.nan
    store.invalidate()
    store.save()
    data = minimal_path.read_bytes()
    assert b"NaN" not in data
    strict = json.loads(
        data, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")
    )
    assert snip(strict)["measurements"]["area_um2"] is None
    assert math.isnan(read_store(minimal_path).snip_table().loc[S1, "area_um2"])
    # A NaN confidence would become null, which the schema forbids: refused.
    snip(store.doc)["phenotype"]["confidence"] = math.nan
    store.invalidate()
    with pytest.raises(StoreFormatError, match="confidence"):
        store.save()
    assert minimal_path.read_bytes() == data


def test_permissions_are_preserved(minimal_path: Path, tmp_path: Path) -> None:
    minimal_path.chmod(0o640)
    store = read_store(minimal_path)
    store.save()
    assert stat.S_IMODE(minimal_path.stat().st_mode) == 0o640
    new = store.save(tmp_path / "new.json")
    assert stat.S_IMODE(new.stat().st_mode) == 0o644


def test_lock_timeout_raises_a_clear_error(minimal_path: Path) -> None:
    store = read_store(minimal_path)
    before = minimal_path.read_bytes()
    with store_lock(minimal_path):
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            store.save(lock_timeout=0.3)
        assert time.monotonic() - start < 5
    text = str(info.value)
    assert f"store {str(minimal_path)!r} is locked by another writer" in text
    assert "stayed locked for 0.3 s" in text
    assert "wait for that batch to finish" in text
    assert info.value.path == str(minimal_path)
    assert isinstance(info.value, TimeoutError)
    assert minimal_path.read_bytes() == before
    store.save(lock_timeout=0.3)  # released


# ------------------------------------------------------- crashes and concurrency
# Importing the package costs seconds of CPU, so one helper process imports it
# once and forks a fresh worker per request: a line "ARGS..." on its stdin forks
# work(*ARGS) and answers the pid; "wait PID" answers the wait status.
_FORKER = textwrap.dedent(
    """
    import os, sys, traceback
    import pipeline

    exec(sys.argv[1])
    for line in sys.stdin:
        args = line.split()
        if args[0] == "wait":
            print(os.waitpid(int(args[1]), 0)[1], flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                work(*args)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        print(pid, flush=True)
    """
)


class Forker:
    def __init__(self, work: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORKER, textwrap.dedent(work)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def _ask(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer.strip().lstrip("-").isdigit():
            self.close()
            pytest.fail(f"helper process failed: {self.proc.stderr.read()}")
        return int(answer)

    def fork(self, *args: object) -> int:
        return self._ask(" ".join(map(str, args)))

    def wait(self, pid: int) -> int:
        return self._ask(f"wait {pid}")

    def close(self) -> str:
        self.proc.kill()
        return self.proc.communicate()[1]


_SAVE_FOREVER = """
    from pipeline.store import read_store

    def work(path, exp):
        store = read_store(path)
        n = 0
        while True:
            n += 1
            store.doc["file_info"]["source"] = f"iteration {n}"
            store.add_flag(exp, "INCOMPLETE", "experiment", "writer", notes=f"iteration {n}")
            store.save(backups=2)
"""


def test_sigkill_during_saves_leaves_old_or_new_file(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    doc = make_document(n_experiments=2, n_embryos=120, n_frames=40, seed=3)
    Store(doc).save(path)
    assert path.stat().st_size > 3_000_000
    exp = min(e["source"]["experiment_id"] for e in doc["embryos"].values())
    rng = random.Random(20260105)
    seen = set()
    forker = Forker(_SAVE_FOREVER)
    try:
        for attempt in range(6):
            pid = forker.fork(path, exp)
            # Reading the store takes ~0.1-0.3 s, then it saves over and over.
            time.sleep(rng.uniform(0.1, 1.2))
            os.kill(pid, signal.SIGKILL)
            status = forker.wait(pid)
            assert os.WIFSIGNALED(status), status
            assert os.WTERMSIG(status) == signal.SIGKILL
            # Whatever moment the kill hit, the file is a whole, valid store...
            store = read_store(path)
            source = store.doc["file_info"]["source"]
            flags = store.doc["flags"]["experiment"].get(exp, [])
            # ... holding one version, never a mix of two.
            if source.startswith("iteration "):
                assert [f["notes"] for f in flags] == [source], attempt
                seen.add(source)
            else:
                assert flags == []
            for key in ("embryos", "permitted_values"):
                assert store.doc.get(key) == doc.get(key)
    finally:
        forker.close()
    assert seen, "the writer never completed a save: the test did not exercise anything"


_READ_MODIFY_SAVE = """
    import time
    from pathlib import Path
    from pipeline.errors import MergeConflictError
    from pipeline.store import read_store

    def work(path, me, n, mode):
        me, n = int(me), int(n)
        store = read_store(path)
        ids = sorted(s for e in store.embryos.values() for s in e["snips"])
        mine = [s for i, s in enumerate(ids) if i % 2 == me][:n]
        while not Path(path + ".go").exists():
            time.sleep(0.002)
        for k, sid in enumerate(mine):
            if mode == "locked":
                with store.locked(timeout=60):
                    store.reload()
                    store.add_flag(sid, "LOW_CONFIDENCE", "snip", f"writer{me}", notes=f"update {k}")
                    store.save(_locked=True, backups=0)
            else:  # optimistic: save refuses a stale store, so re-read and retry
                while True:
                    store.add_flag(sid, "LOW_CONFIDENCE", "snip", f"writer{me}", notes=f"update {k}")
                    try:
                        store.save(backups=0, lock_timeout=60)
                        break
                    except MergeConflictError:
                        store.reload()
"""


def test_two_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    n = 15
    forker = Forker(_READ_MODIFY_SAVE)
    try:
        for mode in ("locked", "optimistic"):
            path = tmp_path / f"{mode}.json"
            pipeline.testing.make_store(
                n_experiments=2, n_embryos=6, n_frames=10, seed=4
            ).save(path)
            pids = [forker.fork(path, me, n, mode) for me in (0, 1)]
            Path(f"{path}.go").touch()
            statuses = [forker.wait(pid) for pid in pids]
            assert statuses == [0, 0], forker.close()
            store = read_store(path)
            written = {
                sid: f
                for e in store.embryos.values()
                for sid, s in e["snips"].items()
                for f in s["flags"]
                if f["value"] == "LOW_CONFIDENCE"
            }
            assert len(written) == 2 * n, mode
            assert (
                sorted(f["author"] for f in written.values())
                == ["writer0"] * n + ["writer1"] * n
            )
            assert sorted(f["notes"] for f in written.values()) == sorted(
                2 * [f"update {k}" for k in range(n)]
            )
    finally:
        forker.close()


# ---------------------------------------------------------------------- legacy
def test_legacy_upgrade(
    legacy_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "legacy.json"
    path.write_bytes(legacy_path.read_bytes())
    with pytest.warns(
        UpgradeWarning,
        match="is a legacy EmbryoMetadata file; it was upgraded in memory",
    ) as record:
        store = read_store(path)
    assert record[0].filename == __file__  # points at the caller, not the package
    report = store.upgrade_report
    for line in [
        "snip frame parsed from its id: 15",
        "death_frame computed from DEAD snips",
        "genotypes keyed by gene turned into one genotype: 2",
        "timestamps without a UTC offset read as UTC (+00:00 appended): 19",
        "dropped top-level key 'config'",
    ]:
        assert line in report
    assert path.read_bytes() == legacy_path.read_bytes()  # reading never writes
    capsys.readouterr()
    store.save()
    assert f"upgraded {path} to schema version 1" in capsys.readouterr().err
    assert store.upgrade_report == []

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = read_store(path)
    assert again.upgrade_report == []
    raw = orjson.loads(path.read_bytes())
    assert raw["file_info"]["schema_version"] == 1
    assert "config" not in raw
    assert raw["embryos"]["20240411_A02_e01"]["death_frame"] == 3
    assert raw["embryos"]["20240411_A01_e01"]["death_frame"] is None
    assert raw["embryos"]["20240411_A01_e01"]["genotype"]["value"] == "lmx1b"
    for e in raw["embryos"].values():
        for sid, s in e["snips"].items():
            assert s["frame"] == int(sid[-4:])
    assert validate_store(path) == []
    assert again.counts() == {"experiments": 1, "videos": 3, "embryos": 3, "snips": 15}


def test_legacy_with_two_genotypes_is_refused(
    legacy_path: Path, tmp_path: Path
) -> None:
    doc = orjson.loads(legacy_path.read_bytes())
    genotypes = doc["embryos"]["20240411_A01_e01"]["genotypes"]
    genotypes["shh"] = dict(genotypes["lmx1b"], value="shh")
    path = tmp_path / "two.json"
    path.write_bytes(orjson.dumps(doc))
    with pytest.raises(
        StoreFormatError, match="legacy embryo '20240411_A01_e01' has 2 genotypes"
    ):
        read_store(path)


def test_validate_does_not_warn_about_legacy(legacy_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_store(legacy_path) == []


# ------------------------------------------------------- writing in pieces
def test_pieces_are_flushed_in_the_background_and_written_in_order(tmp_path, monkeypatch):
    from pipeline import _atomic

    monkeypatch.setattr(_atomic, "FLUSH_EVERY", 1000)
    synced = []
    real = getattr(os, "fdatasync", os.fsync)
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd) or real(fd), raising=False)
    pieces = [bytes([65 + i % 26]) * 700 for i in range(40)]
    target = tmp_path / "store.json"
    _atomic.atomic_write_bytes(target, iter(pieces))
    assert target.read_bytes() == b"".join(pieces)
    assert synced  # some flushes ran while pieces were still being written


def test_a_failed_background_flush_fails_the_write_and_keeps_the_old_file(tmp_path, monkeypatch):
    from pipeline import _atomic

    target = tmp_path / "store.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(_atomic, "FLUSH_EVERY", 10)

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing, raising=False)
    with pytest.raises(OSError, match="Input/output error"):
        _atomic.atomic_write_bytes(target, iter([b"x" * 20, b"y" * 20, b"z" * 20]))
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]


def test_a_failed_write_fails_the_save_and_keeps_the_old_file(tmp_path, monkeypatch):
    from pipeline import _atomic

    target = tmp_path / "store.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(_atomic, "WRITE_AHEAD", 1)
    made = []

    def pieces():
        for i in range(50):
            made.append(i)
            yield b"x" * 10 if i != 3 else "not bytes"  # the writer's write() raises TypeError

    with pytest.raises(TypeError):
        _atomic.atomic_write_bytes(target, pieces())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]
    assert len(made) < 50  # the maker stopped soon after the failure


def test_a_piece_that_cannot_be_made_stops_the_writer_and_keeps_the_old_file(tmp_path):
    from pipeline import _atomic

    target = tmp_path / "store.json"
    target.write_bytes(b"old")

    def pieces():
        yield b"new"
        msg = "cannot serialise"
        raise ValueError(msg)

    with pytest.raises(ValueError, match="cannot serialise"):
        _atomic.atomic_write_bytes(target, pieces())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]
    assert not [t for t in threading.enumerate() if t.name == "pipeline-write"]
