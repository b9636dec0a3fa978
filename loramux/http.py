"""What the server and the sync sidecar share as HTTP services: one error type and one
error body for everything that goes wrong (``install_error_handlers``), bearer tokens, and
which request bodies are JSON.

Which request bodies are JSON:

Every route with a body takes JSON. A body sent

- with ``Content-Type: application/json`` or any ``application/*+json`` type is JSON;
- with no Content-Type at all is parsed as JSON too (FastAPI refuses that by default; both
  apps turn it on with ``FastAPI(strict_content_type=False)``);
- with any other type - curl ``-d``'s ``application/x-www-form-urlencoded``,
  ``text/plain``, ... - is refused with 415 and what to send instead, rather than with a 422
  about the body "not being a valid dictionary".

:func:`require_json_body` is an app-wide dependency that applies the last rule to the
routes that declare a body. Like the body-size limit and JSON decode errors, it is answered
before the route's own dependencies (admin auth included): it is about the request's
format, not its rights.

Torch-free on purpose: the sidecar imports it.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loramux.contracts import error_body


class ServiceError(Exception):
    """An HTTP error with a reason: answered as ``{"error": {message, code, status}}``."""

    def __init__(self, status: int, message: str, code: str = "error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


def bearer_matches(request: Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (constant-time). Any
    malformed header - no scheme, another scheme, bytes that are not ASCII - is simply no
    match (a 401 for the caller), never an exception."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII strings (a TypeError, a 500).
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))


_STARLETTE_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def install_error_handlers(app: FastAPI, log: logging.Logger) -> None:
    """Every error of ``app`` gets the one error body: :class:`ServiceError`, a non-JSON
    body (415), Starlette's own (unknown route, wrong method), invalid input (422, naming
    each field) and, last, anything unexpected (500, logged, no traceback to the client)."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(UnsupportedMediaType)
    async def _not_json(_: Request, exc: UnsupportedMediaType) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = _STARLETTE_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        return error_response(422, "invalid_request", "; ".join(problems)[:2000])

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error; see the log")

JSON_HINT = ("send the body as JSON with 'Content-Type: application/json' "
             "(curl: -H 'Content-Type: application/json')")


class UnsupportedMediaType(Exception):
    """A body of a type other than JSON (status 415)."""

    status, code = 415, "unsupported_media_type"

    def __init__(self, content_type: str) -> None:
        media_type = content_type.split(";", 1)[0].strip()[:100]
        self.message = f"request body of type {media_type!r} is not accepted; {JSON_HINT}"
        super().__init__(self.message)


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters ignored."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media_type.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


async def require_json_body(request: Request) -> None:
    """Raise :class:`UnsupportedMediaType` when the route takes a (JSON) body and the request
    declares another type. Routes without a body, and requests without a Content-Type, pass."""
    content_type = request.headers.get("content-type")
    if not content_type or is_json_media_type(content_type):
        return
    if getattr(request.scope.get("route"), "body_field", None) is None:
        return
    raise UnsupportedMediaType(content_type)


__all__ = ["JSON_HINT", "ServiceError", "UnsupportedMediaType", "bearer_matches",
           "error_response", "install_error_handlers", "is_json_media_type",
           "require_json_body"]
