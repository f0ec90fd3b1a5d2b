"""Every exception survives pickling (distributed sends worker errors back that way)."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pandas as pd
import pytest

from pipeline import errors
from pipeline.cli._common import UsageError
from pipeline.errors import (
    AnnotationError,
    MergeConflictError,
    MetaMismatchError,
    PipelineError,
    PipelineWarning,
    RangeSyntaxError,
    StoreFormatError,
    StoreLockedError,
    UpgradeWarning,
)
from pipeline.store import Store

FAILURES = pd.DataFrame(
    {"row": [3, 7], "spec": ["[1:2:3:4]", "t5..t2"], "reason": ["syntax", "empty"]}
)

# Every exception class of pipeline.errors, with the keyword context it carries.
CONTEXT: dict[type[BaseException], dict[str, Any]] = {
    PipelineError: {},
    RangeSyntaxError: {"spec": "[1:2:3:4]", "column": 7, "failure_cases": FAILURES},
    StoreFormatError: {
        "problems": [("$.embryos", "expected an object")],
        "path": "/data/store.json",
    },
    StoreLockedError: {"path": "/data/store.json"},
    AnnotationError: {"reason": "after_death"},
    MetaMismatchError: {},
    MergeConflictError: {"failure_cases": FAILURES},
}

BUILTIN_BASES = {
    RangeSyntaxError: ValueError,
    StoreFormatError: ValueError,
    StoreLockedError: TimeoutError,
    AnnotationError: ValueError,
    MetaMismatchError: TypeError,
    MergeConflictError: ValueError,
}


def exception_classes() -> set[type[BaseException]]:
    return {
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseException)
        and not issubclass(obj, Warning)
        and obj.__module__ == errors.__name__
    }


def test_every_exception_class_is_covered() -> None:
    assert exception_classes() == set(CONTEXT)


def round_trip(err: BaseException) -> BaseException:
    return pickle.loads(pickle.dumps(err))


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b)
    return a == b


@pytest.mark.parametrize("cls", list(CONTEXT), ids=lambda c: c.__name__)
def test_pickle_round_trip_with_context(cls: type[PipelineError]) -> None:
    message = f"{cls.__name__}: what went wrong, where, and how to fix it"
    err = cls(message, **CONTEXT[cls])
    back = round_trip(err)
    assert type(back) is cls
    assert str(back) == message
    assert back.args == (message,)
    for name, value in CONTEXT[cls].items():
        assert same_value(getattr(back, name), value), name
    assert isinstance(back, PipelineError)
    if cls in BUILTIN_BASES:
        assert isinstance(back, BUILTIN_BASES[cls])


@pytest.mark.parametrize("cls", list(CONTEXT), ids=lambda c: c.__name__)
def test_pickle_round_trip_with_defaults(cls: type[PipelineError]) -> None:
    back = round_trip(cls("message only"))
    assert type(back) is cls
    assert str(back) == "message only"


def test_context_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        StoreFormatError("message", [("$", "x")])  # type: ignore[misc]


def test_cli_usage_error_pickles() -> None:
    back = round_trip(UsageError("--snips must be at least 1"))
    assert type(back) is UsageError
    assert isinstance(back, ValueError)


def test_a_real_store_error_pickles(minimal_doc: dict[str, Any]) -> None:
    minimal_doc["embryos"]["20240411_A01_e02"]["death_frame"] = None
    with pytest.raises(StoreFormatError) as info:
        Store(minimal_doc)
    back = round_trip(info.value)
    assert back.problems == info.value.problems
    assert str(back) == str(info.value)


def test_a_chained_error_pickles() -> None:
    try:
        try:
            raise KeyError("x")  # noqa: EM101
        except KeyError as cause:
            msg = "refused"
            raise AnnotationError(msg, reason="unknown_embryo") from cause
    except AnnotationError as err:
        back = round_trip(err)
    assert back.reason == "unknown_embryo"


@pytest.mark.parametrize("cls", [PipelineWarning, UpgradeWarning])
def test_warnings_pickle(cls: type[Warning]) -> None:
    back = round_trip(cls("legacy file"))
    assert type(back) is cls
    assert issubclass(cls, UserWarning)
