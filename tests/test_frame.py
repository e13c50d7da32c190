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


def test_grpc_maps_each_request_error_as_its_http_status_means() -> None:
    """gRPC's table (batchd.grpc.frame) covers every error HTTP's does, and agrees with it
    where the two standards agree: 4xx is the caller's fault, 503 is retryable."""
    import grpc

    from batchd.grpc import frame as grpc_frame

    code = grpc.StatusCode
    caller = {code.INVALID_ARGUMENT, code.NOT_FOUND, code.UNAUTHENTICATED}
    retryable = {code.UNAVAILABLE, code.RESOURCE_EXHAUSTED}
    for cls in STATUS_FOR_ERROR:
        error = cls("x")
        http, mapped = status_for(error), grpc_frame.status_for(error)
        assert cls in grpc_frame.STATUS_FOR_ERROR or any(
            issubclass(cls, listed) for listed in grpc_frame.STATUS_FOR_ERROR), cls
        if http in (400, 401, 404, 413, 415, 422):
            assert mapped in caller, (cls, mapped)
        elif http == 503:
            assert mapped in retryable, (cls, mapped)
    assert grpc_frame.status_for(errors.QueueFull("x")) == code.RESOURCE_EXHAUSTED
    assert grpc_frame.status_for(errors.DeadlineExceeded("x")) == code.DEADLINE_EXCEEDED
    assert grpc_frame.status_for(errors.ModelFailed("x")) == code.INTERNAL
    assert grpc_frame.status_for(OddTooLarge("x")) == code.INVALID_ARGUMENT
    assert grpc_frame.status_for(errors.ConfigError("x")) == code.INTERNAL


@pytest.mark.parametrize(("path", "endpoint", "params"), [
    ("/predict", "native.predict", {}),
    ("/models/digits/predict", "native.predict", {"name": "digits"}),
    ("/v2/models/digits/infer", "v2.infer", {"name": "digits"}),
    ("/v2/models/digits/versions/3/infer", "v2.infer", {"name": "digits", "version": "3"}),
    ("/predict/", None, None), ("/models/a/b/predict", None, None),
    ("/v2/models/digits/versions/infer", None, None), ("/v2/models//infer", None, None),
    ("/v2/models/digits/ready", None, None), ("/health", None, None),
])
def test_the_direct_path_takes_exactly_the_prediction_routes(
        path: str, endpoint: str | None, params: dict[str, str] | None) -> None:
    from batchd.http import direct, native, v2

    found = direct.prediction_route(path)
    if endpoint is None:
        assert found is None
        return
    assert found == ({"native.predict": native.predict, "v2.infer": v2.infer}[endpoint], params)
