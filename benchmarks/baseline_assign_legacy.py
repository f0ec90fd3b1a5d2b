"""The earlier tool's way of assigning phenotypes: the baseline of issue 4's benchmark.

Faithful to the EmbryoMetadata approach: load the whole store with the standard
library's ``json``, then loop over the assignment rows in Python and, for each
row, over the snips its frame range selects, calling a per-snip
``add_phenotype`` that enforces the vocabulary and the DEAD rules (DEAD fills
forward, a live value at or after death is refused), and finally
``json.dump(indent=2)`` the whole document back. Bad rows are caught and
reported one by one; they do not stop the batch. Frame ranges are resolved per
row with :func:`pipeline.ranges.select_positions` (the one thing borrowed from
the new package, so both sides select the same snips).

    /work/venv/bin/python benchmarks/baseline_assign_legacy.py STORE ASSIGNMENTS.csv [--author NAME]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import UTC, datetime

from pipeline.ranges import select_positions

DEFAULT_PHENOTYPES = [
    "NONE",
    "DEAD",
    "NORMAL",
    "EDEMA",
    "CONVERGENCE_EXTENSION",
    "BODY_AXIS",
    "HEART_DEFECT",
    "TBD",
    "BLUR",
    "CORRUPT",
]


class AssignError(ValueError):
    pass


def add_phenotype(doc, embryo_id, snip_id, value, author, confidence=None, notes=None):
    """Set one snip's phenotype with the DEAD rules, the way the earlier tool did."""
    embryo = doc["embryos"][embryo_id]
    snips = embryo["snips"]
    entry = {
        "value": value,
        "author": author,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if confidence is not None:
        entry["confidence"] = confidence
    if notes:
        entry["notes"] = notes
    frame = snips[snip_id]["frame"]
    death = embryo.get("death_frame")
    if value == "DEAD":
        # Permanence: every later snip becomes DEAD too.
        for sid, snip in snips.items():
            if snip["frame"] >= frame and (
                sid == snip_id or snip["phenotype"]["value"] != "DEAD"
            ):
                snip["phenotype"] = dict(entry)
        embryo["death_frame"] = frame if death is None else min(death, frame)
        return
    if death is not None and frame >= death:
        msg = f"snip {snip_id} is at or after death (frame {death})"
        raise AssignError(msg)
    snips[snip_id]["phenotype"] = entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("assignments")
    parser.add_argument("--author", default="legacy")
    args = parser.parse_args(argv)

    with open(args.store) as handle:
        doc = json.load(handle)
    vocabulary = list(
        (doc.get("permitted_values") or {}).get("phenotypes") or DEFAULT_PHENOTYPES
    )
    by_upper = {p.upper(): p for p in vocabulary}
    with open(args.assignments, newline="") as handle:
        rows = list(csv.DictReader(handle))

    written = skipped = 0
    failed = []
    for number, row in enumerate(rows):
        try:
            embryo_id = (row.get("embryo_id") or "").strip()
            if embryo_id not in doc["embryos"]:
                msg = f"unknown embryo {embryo_id!r}"
                raise AssignError(msg)
            value = by_upper.get((row.get("phenotype") or "").strip().upper())
            if value is None:
                msg = f"unknown phenotype {row.get('phenotype')!r}"
                raise AssignError(msg)
            confidence = None
            if (row.get("confidence") or "").strip():
                confidence = float(row["confidence"])
                if not 0 <= confidence <= 1:
                    msg = f"confidence {confidence} outside [0, 1]"
                    raise AssignError(msg)
            embryo = doc["embryos"][embryo_id]
            # The embryo's snips in frame order, once per row.
            ordered = sorted(
                embryo["snips"], key=lambda sid: embryo["snips"][sid]["frame"]
            )
            frames = [embryo["snips"][sid]["frame"] for sid in ordered]
            positions = select_positions(
                (row.get("frames") or "all").strip() or "all",
                frames,
                embryo["death_frame"],
                snip_ids=ordered,
            )
            if len(positions) == 0:
                msg = "the range selects no snip"
                raise AssignError(msg)
        except (AssignError, ValueError) as err:
            failed.append((number, str(err)))
            continue
        for pos in positions:
            try:
                add_phenotype(
                    doc,
                    embryo_id,
                    ordered[pos],
                    value,
                    args.author,
                    confidence,
                    row.get("notes") or None,
                )
                written += 1
            except AssignError:
                skipped += 1

    doc["file_info"]["last_updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    with open(args.store, "w") as handle:
        json.dump(doc, handle, indent=2)
    print(
        f"legacy: {len(rows)} rows, {written} snip writes, {skipped} skipped, {len(failed)} failed rows"
    )
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
