"""``embryo-pipeline detect`` and ``detectors``: quality checks raised as flags.

``detect STORE`` runs detectors over the whole store (every built-in when no
``--detector`` or ``--detectors-file`` is given) and merges their flags in one
atomic, logged batch (author ``auto:<detector>``), or only previews them with
``--dry-run``. ``--detector ShortTrack:min_snips=5`` picks a detector and sets
its parameters; ``--detectors-file FILE`` adds every detector a Python file
defines; ``--replace`` clears the flags these detectors raised earlier and no
longer find. ``detectors`` lists the built-ins and their parameters.

``--checkpoint-every N`` commits the flags of every N finished partitions as
a batch of its own; running the same command again resumes after them (not
with ``--replace``: clearing old flags needs every partition's new ones).

Exit status as for ``assign``: 0 when everything applied, 1 when a detector
failed on a partition (the others' flags are still merged unless
``--strict``), 2 for unusable input.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from pipeline.cli._common import UsageError, add_runtime_options, runtime, say
from pipeline.cli.assign import add_checkpoint_option, checkpoint_notes, file_digest


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``detect`` (``detectors`` registers itself from its own module)."""
    p = sub.add_parser(
        "detect",
        help="run quality detectors and merge their flags into the store",
        description="Run detectors over a store and merge their flags (author auto:<detector>).",
    )
    p.add_argument("store", help="the store's JSON file")
    p.add_argument(
        "--detector",
        action="append",
        metavar="NAME[:key=value,...]",
        help="a detector and its parameters, e.g. ShortTrack:min_snips=5 (repeatable; default: every built-in)",
    )
    p.add_argument(
        "--detectors-file",
        metavar="FILE",
        help="a Python file whose detectors (classes, instances, legacy functions) all run",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="show the flags that would be raised; write nothing",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="first clear the flags these detectors raised earlier and no longer find",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="write nothing if any detector failed on a partition",
    )
    p.add_argument(
        "--report",
        metavar="OUT.csv",
        help="write the whole flag change set to this CSV file",
    )
    add_checkpoint_option(p)
    add_runtime_options(p)
    p.set_defaults(run=run_detect)


def add_list_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``detectors``."""
    d = sub.add_parser(
        "detectors", help="list the built-in detectors and their parameters"
    )
    d.add_argument(
        "--detectors-file",
        metavar="FILE",
        help="also list the detectors this Python file defines",
    )
    d.set_defaults(run=run_list)


def choose_detectors(specs: list[str] | None, detectors_file: str | None) -> list[Any]:
    """Build the detectors a command line asks for.

    Parameters
    ----------
    specs : list of str, optional
        ``--detector`` values, ``NAME[:key=value,...]``.
    detectors_file : str, optional
        ``--detectors-file``: all its detectors run, those named in *specs*
        with the parameters given there.

    Returns
    -------
    list of Detector
        Every built-in with its defaults when neither is given.
    """
    from pipeline import detectors as det

    available = det.load_detectors_file(detectors_file) if detectors_file else {}
    chosen: list[Any] = []
    named: set[str] = set()
    for spec in specs or []:
        name, params = det.parse_detector_spec(spec)
        chosen.append(det.make_detector(name, params, available))
        named.add(name)
    for name, target in available.items():
        if name in named:
            continue
        if inspect.isclass(target):
            msg = f"{name} in {detectors_file} needs parameters: pass --detector {name}:key=value,..."
            raise UsageError(msg)
        chosen.append(target)
    if not specs and not detectors_file:
        chosen = [cls() for cls in det.BUILTINS.values()]
    return chosen


def run_detect(args: argparse.Namespace) -> int:
    """Run the detectors and merge (or preview) their flags."""
    import pandas as pd

    import pipeline
    from pipeline.detectors import author_of, run_detectors
    from pipeline.errors import MergeConflictError
    from pipeline.merge import merge_into_store

    if args.checkpoint_every is not None and args.replace:
        msg = (
            "--replace cannot be combined with --checkpoint-every: clearing the flags a detector no longer "
            "raises needs every partition's new flags first; run --replace without --checkpoint-every"
        )
        raise UsageError(msg)
    store = pipeline.read_store(args.store, document=True)
    chosen = choose_detectors(args.detector, args.detectors_file)
    say(f"detectors: {', '.join(d.name for d in chosen)}", quiet=args.quiet)
    with runtime(args):
        snips = pipeline.snips_from_store(store, npartitions=args.npartitions)
        changes = run_detectors(snips, chosen, store=store)
        try:
            with checkpoint_notes(args):
                report = merge_into_store(
                    store,
                    changes,
                    dry_run=args.dry_run,
                    replace_authors=[author_of(d) for d in chosen]
                    if args.replace
                    else None,
                    strict=args.strict,
                    checkpoint_every=args.checkpoint_every,
                    inputs={
                        "command": "detect",
                        "detectors": [f"{d.name}:{_params_text(d)}" for d in chosen],
                        "detectors_file": args.detectors_file,
                        "replace": args.replace,
                        "strict": args.strict,
                        **(
                            {"detectors_file_sha256": file_digest(args.detectors_file)}
                            if args.detectors_file
                            else {}
                        ),
                    },
                )
        except MergeConflictError as err:
            if err.failure_cases is None or not len(err.failure_cases):
                raise
            print(f"embryo-pipeline: {str(err).splitlines()[0]}", file=sys.stderr)
            for reason in err.failure_cases["reason"].tolist():
                print(f"  {reason}", file=sys.stderr)
            return 1
    table = report.changes
    if args.report:
        table.to_csv(args.report, index=False)
    raised = table.loc[table["status"] == "raised"]
    if not args.quiet:
        counts = (
            raised.groupby(["detector", "level", "flag"], observed=True)
            .size()
            .rename("hits")
        )
        say(
            "hits per detector:\n" + (counts.to_string() if len(counts) else "  (none)")
        )
        if args.dry_run:
            with pd.option_context(
                "display.width",
                160,
                "display.max_columns",
                12,
                "display.max_colwidth",
                70,
            ):
                preview = raised[
                    ["entity_id", "flag", "severity", "notes", "detector"]
                ].head(40)
                say(
                    "preview (first 40 flags):\n"
                    + (preview.to_string(index=False) if len(preview) else "  (none)")
                )
    for reason in table.loc[table["status"] == "failed", "reason"].tolist():
        print(f"embryo-pipeline: {reason}", file=sys.stderr)
    say(report.summary())
    return report.exit_code


def _params_text(detector: Any) -> str:
    params = detector.params() if callable(getattr(detector, "params", None)) else {}
    return ",".join(f"{k}={v}" for k, v in params.items() if not isinstance(v, tuple))


def run_list(args: argparse.Namespace) -> int:
    """Print the detectors, their level, flag and parameters."""
    from pipeline import detectors as det

    targets: dict[str, Any] = dict(det.BUILTINS)
    if args.detectors_file:
        targets.update(det.load_detectors_file(args.detectors_file))
    for target in targets.values():
        info = det.describe_detector(target)
        say(
            f"{info['name']}  ({info['level']}, flag {info['value'] or 'from its hits'})"
        )
        if info["summary"]:
            say(f"    {info['summary']}")
        for name, typ, default, text in info["params"]:
            if typ == "(not settable)":
                continue
            say(f"    {name}={default!r}  ({typ}) {text}".rstrip())
    say("\nuse: embryo-pipeline detect STORE --detector NAME:key=value,key=value")
    return 0
