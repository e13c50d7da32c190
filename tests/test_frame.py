"""The prediction frame's pieces that need no server."""

from __future__ import annotations

import pytest

from batchd import errors
from batchd.http.frame import STATUS_FOR_ERROR, status_for


class OddInput(errors.BadInput):
    """A BadInput subclass the table does not list."""


class OddTooLarge(errors.PayloadTooLarge):
    """A subclass of a subclass."""


@pytest.mark.parametrize(("error", "status"), [
    (errors.BadInput("x"), 400), (OddInput("x"), 400), (errors.PayloadTooLarge("x"), 413),
    (OddTooLarge("x"), 413), (errors.UnsupportedMediaType("x"), 415),
    (errors.InvalidParameter("x"), 422), (errors.QueueFull("x"), 503),
    (errors.DeadlineExceeded("x"), 504), (errors.ModelFailed("x"), 500),
    (errors.ConfigError("x"), 500),
])
def test_status_follows_the_class_hierarchy_not_the_table_order(
        error: errors.BatchdError, status: int) -> None:
    assert status_for(error) == status


def test_every_request_error_has_a_status() -> None:
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.BatchdError) and cls not in (
                errors.BatchdError, errors.ConfigError, errors.CheckpointError):
            assert any(issubclass(cls, listed) for listed in STATUS_FOR_ERROR), name
