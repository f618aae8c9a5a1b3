"""How the vCenter's API answers what went wrong: one JSON shape for every error (vSphere's, ``ErrorBody``), the
HTTP status of each of the project's errors (``status_of``), request validation as a 400 naming each field, and a
bug as a 500 with an incident id (its traceback goes to the log, never to the caller)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from testbed.errors import (
    ApiError,
    CommandError,
    Conflict,
    Forbidden,
    HostError,
    HostUnreachable,
    InputError,
    LabError,
    MigrationError,
    NotFound,
    QemuError,
    TestbedError,
    ThumbprintMismatch,
    Unauthorized,
)

log = logging.getLogger("testbed.vcenter.api")


_STATUS: list[tuple[type[Exception], int, str]] = [
    (Unauthorized, 401, "UNAUTHENTICATED"), (Forbidden, 403, "UNAUTHORIZED"), (NotFound, 404, "NOT_FOUND"),
    (Conflict, 409, "RESOURCE_BUSY"), (InputError, 400, "INVALID_ARGUMENT"),
    (ThumbprintMismatch, 400, "INVALID_ARGUMENT"), (HostUnreachable, 503, "SERVICE_UNAVAILABLE"),
    (HostError, 503, "SERVICE_UNAVAILABLE"),     # a host could not do it (its agent says why): not our 500
    # something below the vCenter could not do it (QEMU, a command, the lab, the engine): it says why
    (QemuError, 503, "SERVICE_UNAVAILABLE"), (CommandError, 503, "SERVICE_UNAVAILABLE"),
    (LabError, 503, "SERVICE_UNAVAILABLE"), (MigrationError, 503, "SERVICE_UNAVAILABLE"),
]


def status_of(err: TestbedError) -> tuple[int, str]:
    """The HTTP status and vSphere error type of an error the service raised (500 only for what none names)."""
    for cls, st, k in _STATUS:
        if isinstance(err, cls):
            return st, k
    return (err.status, err.error_type) if isinstance(err, ApiError) else (500, "ERROR")


def validation_message(errors: Sequence[Any], limit: int = 2000) -> str:
    """pydantic's errors as ``field.path: what is wrong`` (the union members' and validators' tags left out)."""
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if not _tag(p)) or "body"
        parts.append(f"{loc}: {str(e.get('msg', '')).removeprefix('Value error, ')}")
    text = "; ".join(dict.fromkeys(parts))
    return text if len(text) <= limit else text[:limit] + " ..."


def _tag(part: object) -> bool:
    return part == "body" or (isinstance(part, str) and (part.startswith(("function-", "constrained-"))
                                                         or part in ("int", "str", "float", "bool", "literal")))


class ErrorMessage(BaseModel):
    default_message: str
    args: list[str]
    id: str


class ErrorBody(BaseModel):
    """Every error's body (vSphere's shape), whatever the status."""
    error_type: str
    messages: list[ErrorMessage] = Field(min_length=1)
    hint: str | None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    st: {"model": ErrorBody, "description": what} for st, what in (
        (400, "bad input: malformed JSON, an unknown field, a value outside its rule (the message names it)"),
        (401, "no session, or an expired, logged-out or other domain's token"),
        (403, "authenticated, but not allowed (an untrusted peer, a refused ticket)"),
        (404, "no such object (or route)"), (405, "no such method on this route"),
        (409, "busy, or already in that state"),
        (500, "a bug: the vCenter's log has the incident id the message gives"),
        (503, "a host or peer that does not answer, or could not do what was asked"))}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with what this API really answers: every error as ``ErrorBody`` and no 422 (a
    validation error is a 400 here)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def error_body(kind: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"error_type": kind, "messages": [{"default_message": message, "args": [], "id": kind.lower()}],
            "hint": hint}



def install_error_handlers(app: FastAPI, vc_name: str) -> None:
    """Every error answered as ``ErrorBody``, with the status that fits."""
    @app.exception_handler(TestbedError)
    async def _testbed_error(request: Request, err: TestbedError) -> JSONResponse:
        status, kind = status_of(err)
        return JSONResponse(error_body(kind, str(err.args[0]) if err.args else str(err), err.hint),
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("INVALID_ARGUMENT", "malformed request: " + validation_message(err.errors()),
                                       "see GET /api/openapi.json for the request shapes"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # no such route (404) or method (405): in the same shape as every other error
        kind = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(err.status_code, "ERROR")
        what = {404: f"vCenter {vc_name} has no {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return JSONResponse(error_body(kind, what, "see GET /api/openapi.json for the routes"),
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        # a bug: logged with its traceback under an incident id; the caller gets the id, not the traceback
        incident = secrets.token_hex(4)
        log.error("incident %s: %s %s failed", incident, request.method, request.url.path,
                  exc_info=(type(err), err, err.__traceback__))
        return JSONResponse(error_body("INTERNAL_ERROR", f"vCenter {vc_name} could not handle {request.method} "
                                       f"{request.url.path}: an internal error (incident {incident})",
                                       f"the vCenter's log has incident {incident}; please report it"),
                            status_code=500)
