"""Per-tenant forwarding to a dedicated (merged) deployment, with local fallback.

A hot tenant gets its own Deployment that serves its adapter merged into the base. The
shared pool keeps serving the tenant's name: once told (``PUT /admin/tenants/{t}/route``)
a pool server forwards that tenant's generation requests - streaming included - to the
dedicated Service, and answers them itself whenever the dedicated side cannot:

* the upstream refuses the connection, times out before answering, or answers with any
  non-2xx status (503 while it starts, 404 before its adapter is there, 429 when busy):
  the request is served locally, so no request fails because of a promotion or a demotion;
* after such a failure the route is skipped for ``route_retry_seconds`` (a small circuit
  breaker), then the next request tries the upstream again.

Only bare tenant names and the routed version are forwarded (``tenant@other-version`` is
served locally). Loops are cut without trusting clients: each server process draws a random
hop id at start (never shown anywhere), and a forwarded request carries
``X-Loramux-Forwarded: <hop ids of the servers it passed>``. A server serves a request
locally only if its own hop id is in that list, so a misconfigured route (to itself, or
pool A -> pool B -> pool A) cannot loop, while a client that sends the header cannot opt out
of routing (it would have to know the server's hop id). A dedicated (merged) server has no
routes at all. Responses say that they were forwarded (``X-Loramux-Routed: dedicated``) but
never where to: the dedicated deployment's URL is internal.

A stream that breaks after the upstream has started sending cannot be replayed locally
(the client already holds part of an answer); it ends with an SSE ``error`` event, and so
does one that runs longer than the router's ``timeout_s`` in all (a stalled upstream holds
no connection forever; the app bounds a client that stops reading).

Hand-written on purpose: it is a few dozen lines around ``httpx``'s streaming client, and a
generic reverse proxy would not know when falling back to the local engine is safe.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from loramux.contracts import RouteView, error_body

log = logging.getLogger("loramux.routing")

FORWARDED_HEADER = "x-loramux-forwarded"
ROUTED_HEADER = "X-Loramux-Routed"
_HOP_ID = re.compile(r"[0-9a-f]{32}")
_MAX_HOPS = 8
_PASS_HEADERS = ("content-type", "accept", "authorization", "x-request-id")


@dataclass
class Route:
    tenant: str
    url: str
    version: str | None = None
    down_until: float = 0.0  # monotonic
    forwarded: int = 0
    fallbacks: int = 0
    last_error: str | None = None

    def view(self) -> RouteView:
        return RouteView(tenant=self.tenant, url=self.url, version=self.version,
                         healthy=time.monotonic() >= self.down_until, forwarded=self.forwarded,
                         fallbacks=self.fallbacks, last_error=self.last_error)


class Forwarded:
    """An upstream response that has been accepted (2xx); the caller relays it."""

    def __init__(self, response: httpx.Response, route: Route, max_stream_s: float) -> None:
        self.response, self.route, self.max_stream_s = response, route, max_stream_s

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def headers(self) -> dict[str, str]:
        keep = ("content-type", "x-loramux-adapter", "cache-control")
        out = {k: v for k, v in self.response.headers.items() if k.lower() in keep}
        out[ROUTED_HEADER] = "dedicated"  # never the URL: it is internal
        return out

    async def body(self) -> bytes:
        try:
            return await self.response.aread()
        finally:
            await self.response.aclose()

    async def stream(self) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + self.max_stream_s
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"stream ran longer than {self.max_stream_s:g}s")
        except httpx.HTTPError as exc:
            self.route.last_error = f"stream broke: {exc!r}"[:300]
            log.warning("forwarded stream broke", extra={"tenant": self.route.tenant})
            error = error_body(502, "upstream_stream_broken",
                               "the dedicated deployment stopped mid-stream")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await self.response.aclose()


class TenantRouter:
    """The routes of one server; used from the event loop only."""

    def __init__(self, *, timeout_s: float, retry_s: float = 5.0) -> None:
        self.routes: dict[str, Route] = {}
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.hop_id = secrets.token_hex(16)  # this process's; see the module docstring
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=2.0), follow_redirects=False)

    def set(self, tenant: str, url: str, version: str | None) -> Route:
        route = Route(tenant=tenant, url=url.rstrip("/"), version=version)
        self.routes[tenant] = route
        log.info("route set", extra={"tenant": tenant, "version": version, "url": route.url})
        return route

    def remove(self, tenant: str) -> Route | None:
        route = self.routes.pop(tenant, None)
        if route is not None:
            log.info("route removed", extra={"tenant": tenant})
        return route

    def match(self, tenant: str, version: str | None, headers: Any) -> Route | None:
        route = self.routes.get(tenant)
        if route is None or self.hop_id in _hops(headers):
            return None
        if version is not None and version != route.version:
            return None
        if time.monotonic() < route.down_until:
            route.fallbacks += 1
            return None
        return route

    async def forward(self, route: Route, path: str, body: bytes, headers: Any,
                      stream: bool) -> Forwarded | None:
        """Send the request upstream; ``None`` means "serve it locally"."""
        send_headers = {k: v for k, v in headers.items() if k.lower() in _PASS_HEADERS}
        hops = [*_hops(headers), self.hop_id][-_MAX_HOPS:]
        send_headers[FORWARDED_HEADER] = ",".join(hops)
        request = self._client.build_request("POST", route.url + path, content=body,
                                             headers=send_headers)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            self._failed(route, f"{type(exc).__name__}: {exc}")
            return None
        if not 200 <= response.status_code < 300:
            detail = (await response.aread())[:200].decode(errors="replace")
            await response.aclose()
            self._failed(route, f"HTTP {response.status_code}: {detail}")
            return None
        if not stream:
            # Read the whole answer here, so a connection that breaks mid-body still
            # falls back to the local engine.
            try:
                await response.aread()
            except httpx.HTTPError as exc:
                await response.aclose()
                self._failed(route, f"{type(exc).__name__}: {exc}")
                return None
        route.forwarded += 1
        route.down_until = 0.0
        return Forwarded(response, route, self.timeout_s)

    def _failed(self, route: Route, error: str) -> None:
        route.fallbacks += 1
        route.last_error = error[:300]
        route.down_until = time.monotonic() + self.retry_s
        log.warning("dedicated deployment unavailable, serving locally",
                    extra={"tenant": route.tenant, "version": route.version,
                           "error": route.last_error})

    async def aclose(self) -> None:
        await self._client.aclose()


def _hops(headers: Any) -> list[str]:
    """The well-formed hop ids of a request's forwarded header (junk is dropped)."""
    raw = headers.get(FORWARDED_HEADER) or ""
    return [h for h in (p.strip() for p in raw[:2000].split(",")) if _HOP_ID.fullmatch(h)]




class UsageReader:
    """Reads the token usage of a forwarded answer as it is relayed: the JSON body's
    ``usage``, or the last SSE event that carries one. Only the tail of a stream that may
    still hold an unfinished event is kept, so a long stream costs no memory."""

    _MAX_PENDING = 64 * 1024

    def __init__(self) -> None:
        self.tokens: int | None = None
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        *events, self._pending = self._pending.split(b"\n\n")
        for event in events:
            self._event(event)
        if len(self._pending) > self._MAX_PENDING:
            self._pending = b""  # no event is this long: not SSE; nothing to read

    def body(self, body: bytes) -> None:
        self._json(body)

    def _event(self, event: bytes) -> None:
        if b'"usage"' not in event:
            return
        for line in event.splitlines():
            if line.startswith(b"data:"):
                self._json(line[5:])

    def _json(self, raw: bytes) -> None:
        try:
            usage = json.loads(raw).get("usage")
            total = int(usage["prompt_tokens"]) + int(usage["completion_tokens"])
        except (ValueError, TypeError, KeyError, AttributeError):
            return
        if total >= 0:
            self.tokens = total


__all__ = ["FORWARDED_HEADER", "ROUTED_HEADER", "Forwarded", "Route", "TenantRouter",
           "UsageReader"]
