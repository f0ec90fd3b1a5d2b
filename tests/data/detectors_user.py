"""Detectors a lab might write, loaded by ``--detectors-file`` in the tests.

One vectorised detector class (a :class:`pipeline.detectors.BaseDetector`
dataclass), one plain class with its own attributes and a function in the
earlier tool's style ``(entity_id, entity_data, **params) -> dict | None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.detectors import BaseDetector


@dataclass(frozen=True)
class ShortBody(BaseDetector):
    """Snips whose body length is below a bound.

    Parameters
    ----------
    min_length : float, default 900.0
        Flag snips with ``length_um`` below this.
    severity : str, default "warning"
        Severity of the flag.
    """

    level = "snip"
    value = "OUT_OF_FOCUS"
    required_columns = ("length_um",)

    min_length: float = 900.0
    severity: str = "warning"

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        length = part["length_um"].to_numpy()
        hit = np.flatnonzero(length < self.min_length)
        notes = [f"length_um {v:.1f} < {self.min_length}" for v in length[hit].tolist()]
        return self.hits(part.index[hit], notes, np.full(len(hit), 0.8))


class DeadWell:
    """Videos whose embryos are all dead at their last frame (plain class)."""

    name = "DeadWell"
    level = "video"
    value = "DRY_WELL"
    required_columns = ("video_id", "is_dead")

    def params(self) -> dict[str, object]:
        return {}

    def __call__(self, part: pd.DataFrame) -> pd.DataFrame:
        dead = part.groupby("video_id", sort=True)["is_dead"].any()
        return pd.DataFrame(
            {
                "entity_id": dead.index[dead.to_numpy()].astype(str),
                "notes": "an embryo died",
            }
        )


def big_embryo(entity_id, entity_data, max_area=150_000.0):
    """The earlier tool's style: one call per snip, a dict for a hit."""
    area = entity_data["area_um2"]
    if area > max_area:
        return {
            "value": "MASK_ON_EDGE",
            "severity": "info",
            "notes": f"area {area:.0f} > {max_area:.0f}",
            "confidence": 0.7,
        }
    return None


def _helper(x):
    return x
