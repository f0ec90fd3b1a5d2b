"""Make the timed commands start as they would from an installed package.

``pip install`` byte-compiles a package's modules, and Python caches the
bytecode of an editable checkout on its first import. A machine that sets
``PYTHONDONTWRITEBYTECODE`` (this one does) would otherwise recompile every
module of :mod:`pipeline` at every start of a timed command (0.3-0.5 s). The
bytecode goes to the git-ignored ``__pycache__`` folders.
"""

from __future__ import annotations

import compileall
from pathlib import Path

import pipeline

__all__ = ["byte_compile_package"]


def byte_compile_package() -> None:
    """Write the bytecode of every module of :mod:`pipeline`, as ``pip install`` does."""
    compileall.compile_dir(Path(pipeline.__file__).parent, quiet=1, force=False)
