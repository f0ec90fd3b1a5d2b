"""The earlier tool's export, kept as the baseline of ``bench_export.py``.

What the EmbryoMetadata tool did: stdlib ``json`` load, one Python dict per
snip built in a loop, ``pd.DataFrame(records).to_parquet(...)`` partitioned by
experiment. No validation, no provenance, no atomic swap.

    /work/venv/bin/python benchmarks/legacy_export.py STORE OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd


def legacy_export(store_path: str | Path, out: str | Path) -> int:
    with open(store_path) as handle:
        doc = json.load(handle)
    records = []
    for embryo_id, embryo in doc["embryos"].items():
        source = embryo["source"]
        genotype = embryo.get("genotype") or {}
        for index, (snip_id, snip) in enumerate(embryo["snips"].items()):
            phenotype = snip["phenotype"]
            record = {
                "snip_id": snip_id,
                "experiment_id": source["experiment_id"],
                "video_id": source["video_id"],
                "embryo_id": embryo_id,
                "frame": snip.get(
                    "frame", int(snip_id[-4:]) if snip_id[-4:].isdigit() else None
                ),
                "frame_index": index,
                "n_frames": len(embryo["snips"]),
                "phenotype": phenotype["value"],
                "phenotype_confidence": phenotype.get("confidence"),
                "phenotype_author": phenotype["author"],
                "phenotype_timestamp": phenotype["timestamp"],
                "genotype": genotype.get("value"),
                "genotype_confirmed": bool(genotype.get("confirmed", False)),
                "death_frame": embryo.get("death_frame"),
                "n_flags": len(snip["flags"]),
                "flag_list": ",".join(f["value"] for f in snip["flags"]),
            }
            record.update(snip.get("measurements", {}))
            records.append(record)
    pd.DataFrame(records).to_parquet(out, partition_cols=["experiment_id"], index=False)
    return len(records)


if __name__ == "__main__":
    n = legacy_export(sys.argv[1], sys.argv[2])
    print(n, flush=True)
    # The files are written. Interpreter teardown with this heap sometimes
    # aborts inside pyarrow ("terminate called without an active exception",
    # SIGABRT); skipping it only makes this baseline faster, never ours.
    os._exit(0)
