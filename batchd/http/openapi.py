"""The OpenAPI 3.1 document of the native API, built from the code's own routes and tables.

Paths and methods come from `batchd.http.native.routes()`, summaries from the endpoints'
docstrings, error statuses and their `reason` values from the frame's error-to-status
table (`STATUS_FOR_ERROR`, walked over every error class), header names from the frame:
a route, a status or a reason added there appears here without a second edit.
"""

from __future__ import annotations

import inspect
from typing import Any

from starlette.routing import Route

from batchd import __version__, errors
from batchd.config import Config
from batchd.http import native
from batchd.http.auth import OPEN_PATHS
from batchd.http.frame import PRIORITY_HEADER, STATUS_FOR_ERROR, TIMEOUT_HEADER, status_for

PREDICT_PATHS = ("/predict", "/models/{name}/predict")
# Statuses any route may answer outside its handler (the app's own handlers).
ROUTING_ERRORS = {404: ["not_found"], 405: ["method_not_allowed"]}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp",
               "image/tiff", "application/octet-stream")


def prediction_error_reasons() -> dict[int, list[str]]:
    """Every status a prediction can fail with, and the `reason` values each carries."""
    by_status: dict[int, set[str]] = {}
    for cls in _error_classes():
        if cls in (errors.Unauthorized, errors.LoadFailed) or not any(issubclass(cls, listed)
                                                 for listed in STATUS_FOR_ERROR):
            continue
        by_status.setdefault(status_for(cls("")), set()).add(cls.reason)
    return {status: sorted(reasons) for status, reasons in sorted(by_status.items())}


def _error_classes() -> list[type[errors.BatchdError]]:
    return [value for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, errors.BatchdError)]


def error_response(description: str, reasons: list[str]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Error"}, "examples": {
        reason: {"value": {"error": "what went wrong", "reason": reason}}
        for reason in reasons}}}}


def json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _predict_operation(path: str, auth: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "top_k", "in": "query", "required": False,
         "description": "how many labels to return, highest probability first (default 3, "
                        "at most the number of labels; otherwise 422)",
         "schema": {"type": "integer", "minimum": 1, "maximum": 999_999_999}},
        {"name": "version", "in": "query", "required": False,
         "description": "the model version to ask (a loaded one; otherwise 404); absent: "
                        "the newest loaded",
         "schema": {"type": "integer", "minimum": 1, "maximum": 999_999_999}},
        {"name": TIMEOUT_HEADER, "in": "header", "required": False,
         "description": "milliseconds, a plain decimal number; shortens (never lengthens) "
                        "the model's queue deadline",
         "schema": {"type": "string", "pattern": r"^[0-9]{1,9}(\.[0-9]{1,6})?$"}},
        {"name": PRIORITY_HEADER, "in": "header", "required": False,
         "description": "priority level, a plain integer: 1 is the most urgent; 0 or absent "
                        "is the model's default level (batching.priority_levels; a level "
                        "the model does not have: 422)",
         "schema": {"type": "string", "pattern": r"^[0-9]{1,9}$"}},
        {"name": "x-request-id", "in": "header", "required": False,
         "description": "echoed back when it is 1-128 of [A-Za-z0-9._:-]; else a new one",
         "schema": {"type": "string"}},
    ]
    if path == "/models/{name}/predict":
        parameters.insert(0, {"name": "name", "in": "path", "required": True,
                              "schema": {"type": "string"}})
    binary = {"type": "string", "format": "binary"}
    content: dict[str, Any] = {"multipart/form-data": {"schema": {
        "type": "object", "properties": {"file": binary}, "required": ["file"]}}}
    content |= {media: {"schema": binary} for media in IMAGE_TYPES}
    responses: dict[str, Any] = {"200": {
        "description": "the top labels of the model's answer for this image alone",
        "headers": {"X-Request-ID": {"schema": {"type": "string"}},
                    "Server-Timing": {"schema": {"type": "string"},
                                      "description": "queue wait, compute time, batch size"}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Prediction"}}},
    }}
    failures = prediction_error_reasons()
    if auth:
        failures[401] = [errors.Unauthorized.reason]
    for status, reasons in sorted(failures.items()):
        responses[str(status)] = error_response(f"refused or failed: {', '.join(reasons)}",
                                                reasons)
    operation: dict[str, Any] = {
        "summary": "Predict the labels of one image (a multipart field `file` or a raw body)",
        "parameters": parameters,
        "requestBody": {"required": True, "content": content},
        "responses": responses,
    }
    return operation


def _read_operation(route: Route, auth: bool) -> dict[str, Any]:
    summary = inspect.getdoc(route.endpoint) or route.path
    responses: dict[str, Any]
    if route.path == "/metrics":
        responses = {"200": {"description": "Prometheus text format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}}
    elif route.path == "/ready":
        responses = {"200": json_response("every model is ready", {"type": "object"}),
                     "503": json_response("not ready, with the reasons by model",
                                          {"$ref": "#/components/schemas/NotReady"})}
    else:
        responses = {"200": json_response(summary, {"type": "object"})}
    if auth and route.path not in OPEN_PATHS:
        responses["401"] = error_response("the bearer token is missing or wrong",
                                          [errors.Unauthorized.reason])
    return {"summary": summary.splitlines()[0], "responses": responses}


def openapi_document(config: Config, auth: bool) -> dict[str, Any]:
    """The document for this server: its routes, and bearer auth when a token is set."""
    paths: dict[str, dict[str, Any]] = {}
    for route in native.routes():
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation = (_predict_operation(route.path, auth) if route.path in PREDICT_PATHS
                         else _read_operation(route, auth))
            for status, reasons in ROUTING_ERRORS.items():
                operation["responses"].setdefault(str(status), error_response(
                    "no such route or method", reasons))
            paths.setdefault(route.path, {})[method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "batchd", "version": __version__,
                 "description": "A dynamic-batching inference server. Models: "
                                + ", ".join(model.name for model in config.models)
                                + (f" and those of the repository {config.repository.path}"
                                   if config.repository.path else "")},
        "paths": paths,
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error", "reason"], "properties": {
                "error": {"type": "string"}, "reason": {"type": "string"}}},
            "Prediction": {"type": "object", "required": ["model", "version", "predictions"],
                           "properties": {"model": {"type": "string"},
                                          "version": {"type": "string"}, "predictions": {
                               "type": "array", "items": {
                                   "type": "object", "required": ["label", "prob"],
                                   "properties": {"label": {"type": "string"},
                                                  "prob": {"type": "number", "minimum": 0,
                                                           "maximum": 1}}}}}},
            "NotReady": {"type": "object", "required": ["status", "reasons"], "properties": {
                "status": {"type": "string"},
                "reasons": {"type": "object", "additionalProperties": {"type": "string"}}}},
        }},
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                                 "scheme": "bearer"}}
        for path, operations in paths.items():
            if path not in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return document
