"""``embryo-pipeline detectors``: list the detectors and their parameters.

The command itself lives in :mod:`pipeline.cli.detect`, beside ``detect``.
"""

from __future__ import annotations

from pipeline.cli.detect import add_list_parser as add_parser
from pipeline.cli.detect import run_list

__all__ = ["add_parser", "run_list"]
