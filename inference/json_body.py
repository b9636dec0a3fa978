"""Which request bodies are JSON: one rule for the server and the sync sidecar.

Every route with a body takes JSON. A body sent

- with ``Content-Type: application/json`` or any ``application/*+json`` type is JSON;
- with no Content-Type at all is parsed as JSON too (FastAPI refuses that by default; both
  apps turn it on with ``FastAPI(strict_content_type=False)``);
- with any other type - curl ``-d``'s ``application/x-www-form-urlencoded``,
  ``text/plain``, ... - is refused with 415 and what to send instead, rather than with a 422
  about the body "not being a valid dictionary".

:func:`require_json_body` is an app-wide dependency that applies the last rule to the
routes that declare a body; each app maps :class:`UnsupportedMediaType` to its own error
shape. Like the body-size limit and JSON decode errors, it is answered before the route's
own dependencies (admin auth included): it is about the request's format, not its rights.

Torch-free on purpose: the sidecar imports it.
"""

from __future__ import annotations

from fastapi import Request

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


__all__ = ["JSON_HINT", "UnsupportedMediaType", "is_json_media_type", "require_json_body"]
