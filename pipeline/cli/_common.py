"""Helpers shared by the subcommands: error handling and output."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.errors import PipelineError

__all__ = ["run_command", "fail", "UsageError", "say"]


class UsageError(PipelineError, ValueError):
    """Unusable input on the command line (exit status 2)."""


def say(*parts: Any, quiet: bool = False) -> None:
    """Print to standard output unless *quiet*."""
    if not quiet:
        print(*parts, flush=True)


def fail(message: str) -> int:
    """Print a one-line error to standard error and return exit status 2."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    print(f"embryo-pipeline: error: {first}", file=sys.stderr)
    rest = str(message).strip().splitlines()[1:]
    if rest:
        print("\n".join(rest), file=sys.stderr)
    return 2


def run_command(args: argparse.Namespace) -> int:
    """Run ``args.run(args)``, turning expected failures into exit status 2."""
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("embryo-pipeline: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (PipelineError, OSError, ValueError, KeyError) as err:
        text = str(err) if not isinstance(err, KeyError) else f"missing {err}"
        if isinstance(err, FileNotFoundError):
            text = f"no such file: {err.filename}"
        return fail(text)
