"""``embryo-pipeline demo``: the whole pipeline on a synthetic cohort.

Generates a realistic cohort (about 50,000 snips by default), writes it as a
store, reads and checks it back, flattens it to a Dask DataFrame and runs every
stage the package has on it, printing a summary. It needs no input and always
exits 0 on a working install.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.cli._common import say


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("demo", help="run the pipeline on a generated cohort (no input needed)")
    p.add_argument("--out", default="embryo-pipeline-demo", help="folder for the demo store and outputs (default: %(default)s)")
    p.add_argument("--snips", type=int, default=50_000, help="approximate cohort size in snips (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the cohort (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.set_defaults(run=run)


class _Steps:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def done(self, what: str, start: float) -> None:
        say(f"  {what:<44} {time.perf_counter() - start:6.2f} s", quiet=self.quiet)


def run(args: argparse.Namespace) -> int:
    """Generate the cohort and run each stage on it."""
    import pipeline
    from pipeline.cli.info import summary
    from pipeline.store import Store
    from pipeline.testing import make_assignments, make_cohort

    if args.snips < 1:
        msg = f"--snips must be at least 1, got {args.snips}"
        raise ValueError(msg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(args.quiet)
    say(f"embryo-pipeline demo: about {args.snips:,} snips in {out}/", quiet=args.quiet)

    t = time.perf_counter()
    store = Store(make_cohort(args.snips, seed=args.seed))
    steps.done("generate a synthetic cohort", t)
    t = time.perf_counter()
    path = store.save(out / "store.json", backups=2)
    steps.done(f"save it atomically ({path.stat().st_size / 1e6:.1f} MB)", t)
    t = time.perf_counter()
    store = pipeline.read_store(path)
    steps.done("read and validate it", t)
    t = time.perf_counter()
    snips = pipeline.snips_from_store(store)
    table = snips.compute(scheduler="threads")
    steps.done(f"flatten to Dask ({snips.npartitions} partitions) and compute", t)

    t = time.perf_counter()
    rows = make_assignments(store, n_rows=max(10, len(table) // 100), seed=args.seed)
    changes = pipeline.assign_phenotypes(snips, rows, author="demo", vocabulary=store.vocabulary)
    report = pipeline.merge_into_store(store, changes, inputs={"command": "demo"})
    steps.done(f"assign {len(rows)} rows (2% bad on purpose) and merge", t)
    say("    " + report.summary().replace("\n", "\n    "), quiet=args.quiet)
    store = pipeline.read_store(path)
    snips = pipeline.snips_from_store(store)

    t = time.perf_counter()
    detectors = [cls() for cls in pipeline.detectors.BUILTINS.values()]
    flags = pipeline.run_detectors(snips, detectors, store=store)
    report = pipeline.merge_into_store(store, flags, inputs={"command": "demo detect"})
    steps.done(f"run {len(detectors)} detectors and merge their flags", t)
    say("    " + report.summary().replace("\n", "\n    "), quiet=args.quiet)
    store = pipeline.read_store(path)
    snips = pipeline.snips_from_store(store)
    t = time.perf_counter()
    exported = pipeline.write_parquet(snips, out / "snips.parquet", store=store)
    steps.done("export partitioned Parquet", t)
    say(f"    {exported.summary()}", quiet=args.quiet)
    table = snips.compute(scheduler="threads")

    c = store.counts()
    say("")
    say(f"{c['experiments']} experiments, {c['videos']} videos, {c['embryos']} embryos, {len(table):,} snips")
    say(summary(table))
    say(f"\nstore: {path}")
    return 0
