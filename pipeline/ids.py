"""Identifiers: parse experiment, video, embryo and snip ids from the end.

Experiment ids contain underscores (``20250624_chem02_28C_T00_1356``), so ids
are always parsed from the right: a snip id is ``{embryo_id}_{suffix}`` with a
suffix ``s####``, ``t####`` or a bare ``####`` (3 or 4 digits); an embryo id is
``{video_id}_e{N}``; a video id is ``{experiment_id}_{WELL}``. Image ids are
derived, ``{video_id}_t{frame:04d}``. The scalar functions serve the store
primitives; the ``*_arrays`` functions work on whole columns with pyarrow.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "EXPERIMENT_RE",
    "VIDEO_RE",
    "EMBRYO_RE",
    "SNIP_RE",
    "IMAGE_RE",
    "SnipId",
    "parse_snip_id",
    "parse_embryo_id",
    "parse_video_id",
    "image_id",
    "level_of",
]

_EXP = r"20\d{6}(?:_[A-Za-z0-9]+)*"
_VIDEO = _EXP + r"_[A-H]\d{2}"
_EMBRYO = _VIDEO + r"_e\d{1,3}"

EXPERIMENT_RE = re.compile(rf"^{_EXP}$")
VIDEO_RE = re.compile(rf"^(?P<experiment_id>{_EXP})_(?P<well>[A-H]\d{{2}})$")
EMBRYO_RE = re.compile(rf"^(?P<video_id>{_VIDEO})_e(?P<n>\d{{1,3}})$")
SNIP_RE = re.compile(rf"^(?P<embryo_id>{_EMBRYO})_(?P<style>[st]?)(?P<frame>\d{{3,4}})$")
IMAGE_RE = re.compile(rf"^(?P<video_id>{_VIDEO})_t(?P<frame>\d{{4,}})$")

# The same patterns for pyarrow (RE2 syntax, no named groups needed).
SNIP_PATTERN = rf"^{_EMBRYO}_[st]?\d{{3,4}}$"
EMBRYO_PATTERN = rf"^{_EMBRYO}$"
VIDEO_PATTERN = rf"^{_VIDEO}$"
EXPERIMENT_PATTERN = rf"^{_EXP}$"


class SnipId(NamedTuple):
    """The parts of a snip id."""

    experiment_id: str
    video_id: str
    embryo_id: str
    frame: int
    style: str


def parse_snip_id(snip_id: str) -> SnipId:
    """Split a snip id into its parts, parsing from the end.

    Parameters
    ----------
    snip_id : str
        E.g. ``"20250624_chem02_28C_T00_1356_H01_e01_s0042"``.

    Returns
    -------
    SnipId
        Experiment, video and embryo ids, the frame number and the suffix style
        (``"s"``, ``"t"`` or ``""`` for a bare number).

    Raises
    ------
    ValueError
        If *snip_id* is not of the form ``{embryo_id}_{s|t|}NNNN``.

    Examples
    --------
    >>> parse_snip_id("20250624_chem02_28C_T00_1356_H01_e01_0042")
    SnipId(experiment_id='20250624_chem02_28C_T00_1356', video_id='20250624_chem02_28C_T00_1356_H01', embryo_id='20250624_chem02_28C_T00_1356_H01_e01', frame=42, style='')
    """
    match = SNIP_RE.match(snip_id) if isinstance(snip_id, str) else None
    if match is None:
        msg = (
            f"not a snip id: {snip_id!r}; expected '{{embryo_id}}_{{suffix}}' with "
            "suffix s####, t#### or #### (3 or 4 digits), e.g. '20240411_A01_e01_s0042'"
        )
        raise ValueError(msg)
    embryo_id = match["embryo_id"]
    video_id, experiment_id = _video_and_experiment(embryo_id)
    return SnipId(experiment_id, video_id, embryo_id, int(match["frame"]), match["style"])


def _video_and_experiment(embryo_id: str) -> tuple[str, str]:
    video_id = embryo_id[: embryo_id.rindex("_e")]
    return video_id, video_id[: video_id.rindex("_")]


def parse_embryo_id(embryo_id: str) -> tuple[str, str]:
    """Return ``(experiment_id, video_id)`` of an embryo id.

    Parameters
    ----------
    embryo_id : str
        E.g. ``"20240411_A01_e01"``.

    Returns
    -------
    tuple of str
        The experiment id and the video id.

    Raises
    ------
    ValueError
        If *embryo_id* is not ``{video_id}_e{N}``.

    Examples
    --------
    >>> parse_embryo_id("20240411_A01_e01")
    ('20240411', '20240411_A01')
    """
    if not isinstance(embryo_id, str) or EMBRYO_RE.match(embryo_id) is None:
        msg = f"not an embryo id: {embryo_id!r}; expected '{{video_id}}_e{{N}}', e.g. '20240411_A01_e01'"
        raise ValueError(msg)
    video_id, experiment_id = _video_and_experiment(embryo_id)
    return experiment_id, video_id


def parse_video_id(video_id: str) -> str:
    """Return the experiment id of a video id.

    Parameters
    ----------
    video_id : str
        E.g. ``"20240411_A01"``.

    Returns
    -------
    str
        The experiment id.

    Raises
    ------
    ValueError
        If *video_id* is not ``{experiment_id}_{WELL}``.

    Examples
    --------
    >>> parse_video_id("20250624_chem02_28C_T00_1356_H01")
    '20250624_chem02_28C_T00_1356'
    """
    match = VIDEO_RE.match(video_id) if isinstance(video_id, str) else None
    if match is None:
        msg = f"not a video id: {video_id!r}; expected '{{experiment_id}}_{{WELL}}' with WELL like A01..H12"
        raise ValueError(msg)
    return match["experiment_id"]


def image_id(video_id: str, frame: int) -> str:
    """Derive the image id of a video frame.

    Parameters
    ----------
    video_id : str
        The video.
    frame : int
        The frame number.

    Returns
    -------
    str
        ``{video_id}_t{frame:04d}``.

    Examples
    --------
    >>> image_id("20240411_A01", 42)
    '20240411_A01_t0042'
    """
    return f"{video_id}_t{frame:04d}"


def level_of(entity_id: str) -> str:
    """Tell which level an id belongs to.

    Parameters
    ----------
    entity_id : str
        Any experiment, video, embryo, snip or image id.

    Returns
    -------
    str
        One of ``"snip"``, ``"image"``, ``"embryo"``, ``"video"``, ``"experiment"``.

    Raises
    ------
    ValueError
        If the id has none of the forms.

    Examples
    --------
    >>> [level_of(i) for i in ["20240411", "20240411_A01", "20240411_A01_e01", "20240411_A01_e01_0003", "20240411_A01_t0003"]]
    ['experiment', 'video', 'embryo', 'snip', 'image']
    """
    if isinstance(entity_id, str):
        for level, pattern in (
            ("snip", SNIP_RE),
            ("image", IMAGE_RE),
            ("embryo", EMBRYO_RE),
            ("video", VIDEO_RE),
            ("experiment", EXPERIMENT_RE),
        ):
            if pattern.match(entity_id):
                return level
    msg = f"not an experiment, video, embryo, snip or image id: {entity_id!r}"
    raise ValueError(msg)


def snip_arrays(snip_ids: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Parse many snip ids at once.

    Parameters
    ----------
    snip_ids : pyarrow.Array of string
        Snip ids.

    Returns
    -------
    valid : pyarrow.Array of bool
        Whether each id has the snip id form.
    embryo_ids : pyarrow.Array of string
        The id with its suffix removed (meaningful where valid).
    frames : numpy.ndarray of int64
        The frame number of the suffix, -1 where invalid.
    """
    valid = pc.match_substring_regex(snip_ids, SNIP_PATTERN)
    embryo_ids = pc.replace_substring_regex(snip_ids, r"_[st]?\d{3,4}$", "")
    digits = pc.extract_regex(snip_ids, r"_[st]?(?P<f>\d{3,4})$").field("f")
    digits = pc.if_else(valid, digits, pa.scalar("-1"))
    frames = pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False)
    return valid, embryo_ids, frames


def video_of_embryo_arrays(embryo_ids: pa.Array) -> pa.Array:
    """Strip the ``_e{N}`` suffix of many embryo ids."""
    return pc.replace_substring_regex(embryo_ids, r"_e\d{1,3}$", "")


def experiment_of_video_arrays(video_ids: pa.Array) -> pa.Array:
    """Strip the ``_{WELL}`` suffix of many video ids."""
    return pc.replace_substring_regex(video_ids, r"_[A-H]\d{2}$", "")
