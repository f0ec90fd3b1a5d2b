"""Identifiers are parsed from the end: all three snip suffix styles, underscore experiment ids."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import ids
from pipeline.ids import (
    SnipId,
    image_id,
    level_of,
    parse_embryo_id,
    parse_snip_id,
    parse_video_id,
)

UNDERSCORED = "20250624_chem02_28C_T00_1356"


@pytest.mark.parametrize(
    ("snip_id", "expected"),
    [
        (
            "20240411_A01_e01_s0042",
            SnipId("20240411", "20240411_A01", "20240411_A01_e01", 42, "s"),
        ),
        (
            "20240411_A01_e01_t0042",
            SnipId("20240411", "20240411_A01", "20240411_A01_e01", 42, "t"),
        ),
        (
            "20240411_A01_e01_0042",
            SnipId("20240411", "20240411_A01", "20240411_A01_e01", 42, ""),
        ),
        (
            "20240411_H12_e01_s042",
            SnipId("20240411", "20240411_H12", "20240411_H12_e01", 42, "s"),
        ),
        (
            "20240411_A01_e01_t999",
            SnipId("20240411", "20240411_A01", "20240411_A01_e01", 999, "t"),
        ),
        (
            "20240411_A01_e01_000",
            SnipId("20240411", "20240411_A01", "20240411_A01_e01", 0, ""),
        ),
        (
            "20240411_A01_e1_9999",
            SnipId("20240411", "20240411_A01", "20240411_A01_e1", 9999, ""),
        ),
        (
            "20240411_A01_e123_s0001",
            SnipId("20240411", "20240411_A01", "20240411_A01_e123", 1, "s"),
        ),
        (
            f"{UNDERSCORED}_H01_e01_s0042",
            SnipId(
                UNDERSCORED, f"{UNDERSCORED}_H01", f"{UNDERSCORED}_H01_e01", 42, "s"
            ),
        ),
        (
            f"{UNDERSCORED}_H01_e01_t0042",
            SnipId(
                UNDERSCORED, f"{UNDERSCORED}_H01", f"{UNDERSCORED}_H01_e01", 42, "t"
            ),
        ),
        (
            f"{UNDERSCORED}_H01_e01_0042",
            SnipId(UNDERSCORED, f"{UNDERSCORED}_H01", f"{UNDERSCORED}_H01_e01", 42, ""),
        ),
        (
            f"{UNDERSCORED}_H01_e01_042",
            SnipId(UNDERSCORED, f"{UNDERSCORED}_H01", f"{UNDERSCORED}_H01_e01", 42, ""),
        ),
        # An experiment part that looks like a frame suffix.
        (
            "20240411_0042_B03_e04_0005",
            SnipId(
                "20240411_0042", "20240411_0042_B03", "20240411_0042_B03_e04", 5, ""
            ),
        ),
    ],
)
def test_parse_snip_id(snip_id: str, expected: SnipId) -> None:
    parsed = parse_snip_id(snip_id)
    assert parsed == expected
    assert level_of(snip_id) == "snip"
    assert parse_embryo_id(parsed.embryo_id) == (parsed.experiment_id, parsed.video_id)
    assert parse_video_id(parsed.video_id) == parsed.experiment_id
    assert level_of(parsed.embryo_id) == "embryo"
    assert level_of(parsed.video_id) == "video"
    assert level_of(parsed.experiment_id) == "experiment"


def test_parsing_is_from_the_end() -> None:
    # Experiment ids may hold anything underscore-separated, even parts that
    # look like wells and embryos: only the last parts decide.
    parsed = parse_snip_id("20240411_A01_e01_A02_e02_s0003")
    assert parsed == SnipId(
        "20240411_A01_e01", "20240411_A01_e01_A02", "20240411_A01_e01_A02_e02", 3, "s"
    )
    assert parse_embryo_id(parsed.embryo_id) == (
        "20240411_A01_e01",
        "20240411_A01_e01_A02",
    )


@pytest.mark.parametrize(
    "bad",
    [
        "20240411_A01_e01_x0042",  # unknown style
        "20240411_A01_e01_s00042",  # 5 digits
        "20240411_A01_e01_s42",  # 2 digits
        "20240411_A01_e01_S0042",  # case matters
        "20240411_A01_e01",  # an embryo id
        "20240411_A01_s0042",  # no embryo
        "20240411_I01_e01_s0042",  # row I does not exist
        "20240411_A1_e01_s0042",  # one-digit column
        "2024041_A01_e01_s0042",  # 7-digit date
        "19990101_A01_e01_s0042",  # not 20xx
        "20240411_A01_e1234_s0042",  # 4-digit embryo number
        "20240411__A01_e01_s0042",  # empty experiment part
        "20240411_A01_e01_s0042 ",  # trailing space
        "",
        None,
        42,
    ],
)
def test_parse_snip_id_rejects(bad: object) -> None:
    with pytest.raises(
        ValueError, match=r"not a snip id: .*expected '\{embryo_id\}_\{suffix\}'"
    ):
        parse_snip_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("embryo_id", "expected"),
    [
        ("20240411_A01_e01", ("20240411", "20240411_A01")),
        ("20240411_A01_e1", ("20240411", "20240411_A01")),
        ("20240411_H12_e123", ("20240411", "20240411_H12")),
        (f"{UNDERSCORED}_H01_e01", (UNDERSCORED, f"{UNDERSCORED}_H01")),
        ("20240411_e01_A01_e02", ("20240411_e01", "20240411_e01_A01")),
    ],
)
def test_parse_embryo_id(embryo_id: str, expected: tuple[str, str]) -> None:
    assert parse_embryo_id(embryo_id) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "20240411_A01",
        "20240411_A01_e",
        "20240411_A01_e1234",
        "20240411_A01_E01",
        "20240411_A01_e01_s0001",
        None,
    ],
)
def test_parse_embryo_id_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="not an embryo id"):
        parse_embryo_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("video_id", "expected"),
    [
        ("20240411_A01", "20240411"),
        (f"{UNDERSCORED}_H01", UNDERSCORED),
        ("20240411_batch007_C10", "20240411_batch007"),
    ],
)
def test_parse_video_id(video_id: str, expected: str) -> None:
    assert parse_video_id(video_id) == expected


@pytest.mark.parametrize(
    "bad", ["20240411", "20240411_A1", "20240411_J01", "20240411_A01_e01", "A01", None]
)
def test_parse_video_id_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="not a video id"):
        parse_video_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("video_id", "frame", "expected"),
    [
        ("20240411_A01", 42, "20240411_A01_t0042"),
        ("20240411_A01", 0, "20240411_A01_t0000"),
        ("20240411_A01", 12345, "20240411_A01_t12345"),
        (f"{UNDERSCORED}_H01", 7, f"{UNDERSCORED}_H01_t0007"),
    ],
)
def test_image_id(video_id: str, frame: int, expected: str) -> None:
    assert image_id(video_id, frame) == expected
    assert level_of(expected) == "image"


def test_image_id_of_every_suffix_style_is_the_same() -> None:
    frames = {
        parse_snip_id(f"20240411_A01_e01_{style}{n}").frame
        for style in ("s", "t", "")
        for n in ("0042", "042")
    }
    assert frames == {42}


@pytest.mark.parametrize(
    ("entity_id", "level"),
    [
        ("20240411", "experiment"),
        (UNDERSCORED, "experiment"),
        ("20240411_A01", "video"),
        (f"{UNDERSCORED}_H01", "video"),
        ("20240411_A01_e01", "embryo"),
        ("20240411_A01_e01_0003", "snip"),
        ("20240411_A01_e01_s003", "snip"),
        ("20240411_A01_t0003", "image"),
        (f"{UNDERSCORED}_H01_t0003", "image"),
        ("20240411_A01_t00003", "image"),
    ],
)
def test_level_of(entity_id: str, level: str) -> None:
    assert level_of(entity_id) == level


@pytest.mark.parametrize(
    "bad",
    ["", "A01", "2024_A01", "20240411-A01", "20240411_A01_e01_s0003-x", None, 20240411],
)
def test_level_of_rejects(bad: object) -> None:
    with pytest.raises(
        ValueError, match="not an experiment, video, embryo, snip or image id"
    ):
        level_of(bad)  # type: ignore[arg-type]


def test_array_parsers_agree_with_scalar_ones() -> None:
    good = [
        "20240411_A01_e01_s0042",
        "20240411_A01_e01_t042",
        f"{UNDERSCORED}_H01_e01_0042",
        f"{UNDERSCORED}_H01_e1_007",
    ]
    bad = ["20240411_A01_e01_x0042", "20240411_A01_e01_s00042", "nonsense"]
    valid, embryos, frames = ids.snip_arrays(pa.array(good + bad))
    assert valid.to_pylist() == [True] * len(good) + [False] * len(bad)
    assert embryos.to_pylist()[: len(good)] == [
        parse_snip_id(s).embryo_id for s in good
    ]
    assert frames.tolist() == [parse_snip_id(s).frame for s in good] + [-1] * len(bad)
    parsed = [parse_snip_id(s) for s in good]
    assert ids.video_of_embryo_arrays(
        pa.array([p.embryo_id for p in parsed])
    ).to_pylist() == [p.video_id for p in parsed]
    assert ids.experiment_of_video_arrays(
        pa.array([p.video_id for p in parsed])
    ).to_pylist() == [p.experiment_id for p in parsed]
