"""embryo-pipeline: zebrafish embryo annotations as a snip-level Dask DataFrame."""

from __future__ import annotations

__version__ = "0.1.0"
