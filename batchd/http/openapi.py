"""The OpenAPI 3.1 document of the native API and the repository API, built from the
code's own routes and tables.

Paths and methods come from `batchd.http.native.routes()` (and, where the server has
the repository API on, `batchd.http.repository.routes()`), summaries from the
endpoints' docstrings, error statuses and their `reason` values from the frame's
error-to-status table (`STATUS_FOR_ERROR`, walked over every error class, or over the
repository routes' `REFUSALS`), header names from the frame: a route, a status or a
reason added there appears here without a second edit.
"""

from __future__ import annotations

import inspect
from typing import Any

from starlette.routing import Route

from batchd import __version__, errors
from batchd.config import Config
from batchd.http import native
from batchd.http import repository as repository_api
from batchd.http.auth import ADMIN_PREFIX, OPEN_PATHS
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


REPOSITORY_ONLY = ("Served only when `repository.admin_token_env` names a set environment "
                   "variable (else 404), and only with that variable's token, the admin "
                   "token, as `Authorization: Bearer <token>` (not the inference token). "
                   "The Open Inference Protocol's model-repository extension, as Triton "
                   "serves it.")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
REPOSITORY_BODIES: dict[str, dict[str, Any]] = {
    repository_api.INDEX: {"type": "object", "properties": {"ready": {
        "type": "boolean", "description": "true: only the models whose state is READY"}}},
    repository_api.LOAD: {"type": "object", "properties": {"parameters": {
        "type": "object", "description": "Triton's load parameters; `config` and `file:...` "
        "overrides are refused (400): batchd loads only what its repository folder holds"}}},
    repository_api.UNLOAD: {"type": "object", "properties": {"parameters": {
        "type": "object", "description": "accepted and ignored (`unload_dependents`: batchd "
        "has no ensembles)"}}},
}
REPOSITORY_ANSWERS: dict[str, tuple[str, dict[str, Any]]] = {
    repository_api.INDEX: ("every model of the folder, loaded or not: one entry per loaded "
                           "version, or one without a version when none is loaded", {
        "type": "array", "items": {"$ref": "#/components/schemas/RepositoryEntry"}}),
    repository_api.LOAD: ("the new versions serve and the replaced ones are freed", {
        "type": "object", "required": ["name", "state", "versions", "seconds"],
        "properties": {"name": {"type": "string"}, "state": {"const": "READY"},
                       "versions": {"type": "array", "items": {"type": "string"}},
                       "seconds": {"type": "number", "minimum": 0}}}),
    repository_api.UNLOAD: ("its admitted requests were answered and it is freed (a model "
                            "that was not loaded: nothing to do)", {
        "type": "object", "required": ["name", "state", "seconds"],
        "properties": {"name": {"type": "string"}, "state": {"const": "UNAVAILABLE"},
                       "seconds": {"type": "number", "minimum": 0}}}),
}


def _repository_operation(route: Route) -> dict[str, Any]:
    summary = inspect.getdoc(route.endpoint) or route.path
    parameters: list[dict[str, Any]] = []
    if "{name}" in route.path:
        parameters.append({"name": "name", "in": "path", "required": True,
                           "description": "a model folder of the repository: letters, digits, "
                                          "'_', '-' and '.', never '..' (else 400); one not "
                                          "in the folder is 404",
                           "schema": {"type": "string", "pattern": NAME_PATTERN}})
    by_status: dict[int, set[str]] = {401: {errors.Unauthorized.reason},
                                      413: {errors.PayloadTooLarge.reason}}
    for cls in repository_api.REFUSALS[route.path]:
        by_status.setdefault(status_for(cls("")), set()).add(cls.reason)
    description, schema = REPOSITORY_ANSWERS[route.path]
    responses: dict[str, Any] = {"200": json_response(description, schema)}
    for status, reasons in sorted(by_status.items()):
        responses[str(status)] = error_response(f"refused or failed: {', '.join(sorted(reasons))}",
                                                sorted(reasons))
    return {"summary": summary.splitlines()[0], "description": REPOSITORY_ONLY,
            "parameters": parameters,
            "requestBody": {"required": False, "content": {"application/json": {
                "schema": REPOSITORY_BODIES[route.path]}}},
            "responses": responses, "security": [{"admin": []}]}


def openapi_document(config: Config, auth: bool) -> dict[str, Any]:
    """The document for this server: its routes, bearer auth when a token is set, and the
    repository API when `repository.admin_token_env` turns it on."""
    paths: dict[str, dict[str, Any]] = {}
    for route in native.routes():
        for method in sorted((route.methods or set()) - {"HEAD"}):
            operation = (_predict_operation(route.path, auth) if route.path in PREDICT_PATHS
                         else _read_operation(route, auth))
            for status, reasons in ROUTING_ERRORS.items():
                operation["responses"].setdefault(str(status), error_response(
                    "no such route or method", reasons))
            paths.setdefault(route.path, {})[method.lower()] = operation
    repository_on = bool(config.repository.admin_token_env)
    if repository_on:
        for route in repository_api.routes():
            operation = _repository_operation(route)
            for status, reasons in ROUTING_ERRORS.items():
                operation["responses"].setdefault(str(status), error_response(
                    "no such route or method", reasons))
            paths[route.path] = {"post": operation}
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
    if repository_on:
        document["components"]["schemas"]["RepositoryEntry"] = {
            "type": "object", "required": ["name", "state", "reason"], "properties": {
                "name": {"type": "string"},
                "version": {"type": "string", "description": "absent when none is loaded"},
                "state": {"enum": ["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]},
                "reason": {"type": "string",
                           "description": "why it is not ready, or why its last load failed"}}}
        document["components"].setdefault("securitySchemes", {})["admin"] = {
            "type": "http", "scheme": "bearer",
            "description": "the repository API's own token: the value of the environment "
                           "variable that repository.admin_token_env names"}
    if auth:
        document["components"].setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer"}
        for path, operations in paths.items():
            if path not in OPEN_PATHS and not path.startswith(ADMIN_PREFIX):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
    return document
