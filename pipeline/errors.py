"""Errors and warnings raised by ``pipeline``.

Every exception takes its message as the only positional argument and extra
context as keyword-only arguments, so it survives the pickling round trip that
``distributed`` uses to send worker exceptions back to the client.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "AnnotationError",
    "MergeConflictError",
    "MetaMismatchError",
    "PipelineError",
    "PipelineWarning",
    "RangeSyntaxError",
    "StoreFormatError",
    "StoreLockedError",
    "UpgradeWarning",
    "warn",
]


class PipelineError(Exception):
    """Base class for every error raised by ``pipeline``."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild with the message and the keyword context, never with extra
        # positional arguments (which would break unpickling on the client).
        return (_rebuild, (type(self), str(self), self._context()))

    def _context(self) -> dict[str, Any]:
        return {}


def _rebuild(cls: type[PipelineError], message: str, context: dict[str, Any]) -> PipelineError:
    return cls(message, **context)


class RangeSyntaxError(PipelineError, ValueError):
    """A frame-range spec is malformed.

    Parameters
    ----------
    message : str
        What is wrong, where (spec, column) and what was expected.
    spec : str, optional
        The offending spec.
    column : int, optional
        One-based character position of the problem within *spec*.
    failure_cases : pandas.DataFrame, optional
        One row per bad spec when several were checked at once.
    """

    def __init__(
        self,
        message: str,
        *,
        spec: str | None = None,
        column: int | None = None,
        failure_cases: Any = None,
    ) -> None:
        super().__init__(message)
        self.spec = spec
        self.column = column
        self.failure_cases = failure_cases

    def _context(self) -> dict[str, Any]:
        return {"spec": self.spec, "column": self.column, "failure_cases": self.failure_cases}


class StoreFormatError(PipelineError, ValueError):
    """A store document breaks the on-disk contract.

    Parameters
    ----------
    message : str
        Summary followed by one line per problem.
    problems : list of (str, str), optional
        ``(json_path, what_was_expected)`` for every problem found.
    path : str, optional
        The file that was read.
    """

    def __init__(
        self,
        message: str,
        *,
        problems: list[tuple[str, str]] | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.problems = list(problems or [])
        self.path = path

    def _context(self) -> dict[str, Any]:
        return {"problems": self.problems, "path": self.path}


class StoreLockedError(PipelineError, TimeoutError):
    """Another process holds the store's write lock for longer than the timeout."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    def _context(self) -> dict[str, Any]:
        return {"path": self.path}


class AnnotationError(PipelineError, ValueError):
    """A single annotation was refused by the store's rules.

    Parameters
    ----------
    message : str
        What was refused and how to fix it.
    reason : str, optional
        A short machine-readable reason, e.g. ``"after_death"``,
        ``"unknown_phenotype"``, ``"bad_confidence"``.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason

    def _context(self) -> dict[str, Any]:
        return {"reason": self.reason}


class MetaMismatchError(PipelineError, TypeError):
    """A partition function returned columns or dtypes other than its ``meta``."""


class MergeConflictError(PipelineError, ValueError):
    """A change set cannot be merged into the store as it now stands.

    Parameters
    ----------
    message : str
        What conflicts and how to resolve it.
    failure_cases : pandas.DataFrame, optional
        The conflicting rows.
    """

    def __init__(self, message: str, *, failure_cases: Any = None) -> None:
        super().__init__(message)
        self.failure_cases = failure_cases

    def _context(self) -> dict[str, Any]:
        return {"failure_cases": self.failure_cases}


class PipelineWarning(UserWarning):
    """Base class for every warning issued by ``pipeline``."""


class UpgradeWarning(PipelineWarning):
    """A legacy store was read and will be upgraded to the current schema on save."""


_PACKAGE_DIR = str(Path(__file__).parent)


def warn(message: str, category: type[Warning] = PipelineWarning) -> None:
    """Issue *message* pointing at the first frame outside this package.

    Parameters
    ----------
    message : str
        The warning text.
    category : type of Warning, default PipelineWarning
        The warning class.
    """
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=(_PACKAGE_DIR,))
        return
    frame = sys._getframe(1)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
