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

Peers (scale-out, issue 17): the operator gives every pool pod the pool's placement table
(``PUT /admin/peers``, the pod itself left out). A request for a tenant this server does not
hold goes to a holder in the table: device before host before disk, then the load the pod
last reported plus this server's own forwards to it in flight. A holder that fails (connect
error, timeout before answering, a non-2xx other than a client error every holder would
repeat) gets the same small circuit breaker as a route and the next holder is tried. A
request that carries hop ids came from another server and is never forwarded to a peer
again (one extra hop at most, so two wrong tables cannot loop). Relayed answers say
``X-Loramux-Routed: peer``.

Failover (a holder that dies or hangs; ``app._maybe_forward_peer`` drives it):

* Connecting to a peer has its own short timeout (``peer_connect_s``): a pod IP in a cluster
  answers a connect (or refuses it) in milliseconds, a lost node never does.
* A hung holder (its socket accepts, its process never answers: a stopped or wedged process)
  is found by a probe, not by a header timeout. A non-streaming answer legitimately starts
  only once the whole generation is done, so no bound on the wait for response headers
  could tell a long generation from a hang (and a streaming answer's headers, though they
  come at once from a healthy holder, would need a second setting that says the same).
  Instead, once a holder has sent no headers for ``peer_hang_s``, this server asks it
  ``GET /healthz``, and again every ``peer_hang_s`` while the headers do not come; any
  HTTP answer (even a 503 of a draining pod) means the process is alive and the request
  stays, no answer within ``peer_hang_s`` means it is hung: the request is withdrawn from
  it (its breaker opens) and the next holder is tried. A hung holder costs a request at
  most about ``2 * peer_hang_s`` plus the connect timeout.
* When no holder could answer but the table knows the tenant for a reason that can pass
  (every holder failed, the tenant is being re-placed after its pod died, still
  downloading), the app holds the request up to ``peer_failover_s`` for a new table
  (:attr:`TenantRouter.peers_changed`, set by every ``PUT /admin/peers``) or a holder's
  breaker to expire (:meth:`TenantRouter.wait_for_peers`), then tries again; only then
  503. With a wait configured, a holder whose breaker is open is waited for rather than
  tried (without one, it is tried last rather than failing the request). A tenant whose
  every placement Failed (the table's ``failed``) gets its 503 at once: waiting would
  only hold the client.
* A busy holder (429: its queue is full, or the tenant is at its limits there) is alive:
  no breaker, the next holder is tried, and the last holder's 429 is relayed with its
  ``Retry-After`` (no failover wait: the client is told to come back, not held).

Hand-written on purpose: it is a few dozen lines around ``httpx``'s streaming client, and a
generic reverse proxy would not know when falling back to the local engine is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from loramux.contracts import (
    PeerHolder,
    PeerTable,
    PeerTableView,
    PeerTenant,
    Residency,
    RouteView,
    error_body,
)

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


@dataclass
class PeerState:
    """What this server knows of one peer (by URL) beyond the table: its circuit breaker
    and this server's forwards to it still in flight."""

    url: str
    down_until: float = 0.0  # monotonic
    in_flight: int = 0
    forwarded: int = 0
    failures: int = 0
    last_error: str | None = None

    def view(self) -> dict[str, Any]:
        return {"healthy": time.monotonic() >= self.down_until, "in_flight": self.in_flight,
                "forwarded": self.forwarded, "failures": self.failures,
                "last_error": self.last_error}


_TIER_RANK = {Residency.DEVICE: 0, Residency.HOST: 1, Residency.DISK: 2}
# A peer's answer with one of these is the answer: every holder would say the same.
_RELAYED_CLIENT_ERRORS = frozenset({400, 401, 403, 413, 415, 422})
# A busy holder (queue full, the tenant's limits): alive, so no breaker; the caller tries
# the next holder and relays the last one's 429 (``Forwarded.busy``).
BUSY = 429


class Forwarded:
    """An upstream response that has been accepted (2xx, or a peer's client error that any
    holder would repeat); the caller relays it. ``on_close`` runs once the response is done
    (a peer's in-flight count); ``route`` is the hot route, ``None`` for a peer."""

    def __init__(self, response: httpx.Response, route: Route | None, max_stream_s: float,
                 *, routed: str = "dedicated", on_close: Callable[[], None] | None = None,
                 tenant: str = "") -> None:
        self.response, self.route, self.max_stream_s = response, route, max_stream_s
        self.routed, self._on_close, self.tenant = routed, on_close, tenant or (
            route.tenant if route is not None else "")

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def busy(self) -> bool:
        """A peer's 429: another holder may have room; the last one's is relayed."""
        return self.routed == "peer" and self.status == BUSY

    @property
    def headers(self) -> dict[str, str]:
        keep = ("content-type", "x-loramux-adapter", "cache-control", "retry-after")
        out = {k: v for k, v in self.response.headers.items() if k.lower() in keep}
        out[ROUTED_HEADER] = self.routed  # never the URL: it is internal
        return out

    def _closed(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def body(self) -> bytes:
        try:
            return await self.response.aread()
        finally:
            await self.response.aclose()
            self._closed()

    async def stream(self) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + self.max_stream_s
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"stream ran longer than {self.max_stream_s:g}s")
        except httpx.HTTPError as exc:
            if self.route is not None:
                self.route.last_error = f"stream broke: {exc!r}"[:300]
            log.warning("forwarded stream broke",
                        extra={"tenant": self.tenant, "routed": self.routed})
            error = error_body(502, "upstream_stream_broken",
                               "the server answering this tenant stopped mid-stream")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await self.response.aclose()
            self._closed()


class TenantRouter:
    """The routes of one server; used from the event loop only."""

    def __init__(self, *, timeout_s: float, retry_s: float = 5.0, peer_connect_s: float = 1.0,
                 peer_hang_s: float = 5.0) -> None:
        self.routes: dict[str, Route] = {}
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.peer_hang_s = peer_hang_s
        self._peer_timeout = httpx.Timeout(timeout_s, connect=peer_connect_s)
        # Set (and replaced by a fresh one) by every set_peers: requests waiting for a
        # holder (failover) wake up on it.
        self.peers_changed = asyncio.Event()
        self.waiting = 0  # requests in wait_for_peers now
        self.hop_id = secrets.token_hex(16)  # this process's; see the module docstring
        self.peers = PeerTable()
        self.peer_states: dict[str, PeerState] = {}
        self._peer_index: dict[str, PeerTenant] = {}
        self._peer_fingerprint = self.peers.fingerprint()
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
        response = await self._send(route.url, path, body, headers, stream)
        if isinstance(response, str):
            self._failed(route, response)
            return None
        route.forwarded += 1
        route.down_until = 0.0
        return Forwarded(response, route, self.timeout_s)

    async def _send(self, url: str, path: str, body: bytes, headers: Any, stream: bool,
                    accept: frozenset[int] = frozenset(), *, peer: bool = False
                    ) -> httpx.Response | str:
        """POST the request to ``url`` with this server's hop id added: the accepted
        response (2xx, or a status in ``accept``), or why not (a string). ``peer``: the
        peers' connect timeout, and a holder that sends no headers is probed
        (:meth:`_headers_or_hung`)."""
        send_headers = {k: v for k, v in headers.items() if k.lower() in _PASS_HEADERS}
        hops = [*_hops(headers), self.hop_id][-_MAX_HOPS:]
        send_headers[FORWARDED_HEADER] = ",".join(hops)
        request = self._client.build_request(
            "POST", url + path, content=body, headers=send_headers,
            timeout=self._peer_timeout if peer else httpx.USE_CLIENT_DEFAULT)
        try:
            if peer:
                response = await self._headers_or_hung(url, request)
                if isinstance(response, str):
                    return response
            else:
                response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if not 200 <= response.status_code < 300 and response.status_code not in accept:
            try:
                detail = (await response.aread())[:200].decode(errors="replace")
            except httpx.HTTPError:
                detail = ""
            await response.aclose()
            return f"HTTP {response.status_code}: {detail}"
        if not stream or response.status_code in accept:
            # Read the whole answer here, so a connection that breaks mid-body still
            # falls back (to the local engine, or to the next peer).
            try:
                await response.aread()
            except httpx.HTTPError as exc:
                await response.aclose()
                return f"{type(exc).__name__}: {exc}"
        return response

    async def _headers_or_hung(self, url: str, request: httpx.Request) -> httpx.Response | str:
        """Send ``request`` to a peer and wait for its response headers; while they do not
        come, probe the peer every ``peer_hang_s`` (module docstring): a string when it is
        hung. Errors of the send itself propagate (``httpx.HTTPError``)."""
        send = asyncio.ensure_future(self._client.send(request, stream=True))
        handed_over = False
        try:
            while True:
                done, _ = await asyncio.wait({send}, timeout=self.peer_hang_s)
                if done:
                    response = send.result()
                    handed_over = True
                    return response
                if not await self._alive(url) and not send.done():
                    return (f"hung: no response headers after {self.peer_hang_s:g}s and no "
                            f"answer to GET /healthz within {self.peer_hang_s:g}s")
        finally:
            if not handed_over:
                if not send.done():
                    send.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await send
                elif not send.cancelled() and send.exception() is None:
                    await send.result().aclose()

    async def _alive(self, url: str) -> bool:
        """Whether the peer's process answers at all (any status: a draining pod's 503 is
        an answer) within ``peer_hang_s``."""
        try:
            async with asyncio.timeout(self.peer_hang_s):
                response = await self._client.get(url + "/healthz", timeout=self.peer_hang_s)
        except (httpx.HTTPError, TimeoutError):
            return False
        await response.aclose()
        return True

    # ------------------------------------------------------------------ peers
    def set_peers(self, table: PeerTable) -> PeerTableView:
        """Replace the pool's placement table (``PUT /admin/peers``). The state kept per
        holder URL (circuit breaker, in-flight forwards) survives for URLs still listed."""
        index = {t.tenant: t for t in table.tenants}
        urls = {h.url.rstrip("/") for t in table.tenants for h in t.holders}
        self.peer_states = {u: st for u, st in self.peer_states.items() if u in urls}
        self.peers, self._peer_index = table, index
        self._peer_fingerprint = table.fingerprint()
        changed, self.peers_changed = self.peers_changed, asyncio.Event()
        changed.set()  # wakes the requests waiting for a holder (failover)
        log.info("peer table set", extra={"tenants": len(index), "holders": len(urls),
                                          "fingerprint": self._peer_fingerprint})
        return self.peers_view()

    def peers_view(self) -> PeerTableView:
        tenants = []
        for tenant in self.peers.tenants:
            row = tenant.model_dump(mode="json")
            for holder in row["holders"]:
                state = self.peer_states.get(holder["url"].rstrip("/"))
                if state is not None:
                    holder.update(state.view())
            tenants.append(row)
        return PeerTableView(fingerprint=self._peer_fingerprint, tenants=tenants)

    def peer_tenant(self, tenant: str) -> PeerTenant | None:
        """The table's row for ``tenant``; ``None``: the table does not know it."""
        return self._peer_index.get(tenant)

    def peer_candidates(self, row: PeerTenant, version: str | None) -> list[PeerHolder]:
        """The holders to try for ``row`` (``version`` if pinned), best first: device before
        host before disk, then the load each pod last reported plus this server's own
        forwards to it still in flight. Holders whose breaker is open go last, not away: a
        request tries them rather than failing while a healthy holder may not exist."""
        now = time.monotonic()

        def key(item: tuple[int, PeerHolder]) -> tuple:
            index, holder = item
            state = self.peer_states.get(holder.url.rstrip("/"))
            in_flight = state.in_flight if state is not None else 0
            down = state is not None and now < state.down_until
            return (down, _TIER_RANK.get(holder.residency, 3),
                    holder.queue_depth + holder.running + in_flight, index)

        holders = [h for h in row.holders if version is None or version in h.versions]
        return [h for _, h in sorted(enumerate(holders), key=key)]

    def peer_usable(self, holder: PeerHolder) -> bool:
        """Whether ``holder``'s breaker is closed (or it was never tried)."""
        state = self.peer_states.get(holder.url.rstrip("/"))
        return state is None or time.monotonic() >= state.down_until

    async def wait_for_peers(self, tenant: str, changed: asyncio.Event, deadline: float,
                             disconnected: Callable[[], Awaitable[bool]]) -> bool:
        """Failover: wait until the table changes (``changed``, taken from
        :attr:`peers_changed` before the last try), a breaker of one of ``tenant``'s
        holders expires, or ``deadline`` (monotonic). Never a busy loop: the only polling
        is ``disconnected`` twice a second. ``False``: the client went away."""
        row = self.peer_tenant(tenant)
        wake = deadline
        for holder in row.holders if row is not None else ():
            state = self.peer_states.get(holder.url.rstrip("/"))
            if state is not None and state.down_until > time.monotonic():
                wake = min(wake, state.down_until)
        self.waiting += 1
        try:
            while not changed.is_set():
                left = wake - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), timeout=min(0.5, left))
                except TimeoutError:
                    if await disconnected():
                        return False
            return True
        finally:
            self.waiting -= 1

    async def forward_peer(self, holder: PeerHolder, tenant: str, path: str, body: bytes,
                           headers: Any, stream: bool) -> Forwarded | str:
        """Send the request to a peer holding the tenant: the response to relay, or why this
        holder could not answer (the caller tries the next). A client error any holder would
        repeat (a bad body, a key the holder refuses) is relayed, not retried. A 429 (the
        holder is busy, or the tenant at its limits there) comes back too, without opening
        the breaker: the holder is alive (``Forwarded.busy``)."""
        url = holder.url.rstrip("/")
        state = self.peer_states.setdefault(url, PeerState(url))
        state.in_flight += 1
        try:
            response = await self._send(url, path, body, headers, stream,
                                        accept=_RELAYED_CLIENT_ERRORS | {BUSY}, peer=True)
        except BaseException:
            state.in_flight -= 1
            raise
        if isinstance(response, str):
            state.in_flight -= 1
            state.failures += 1
            state.last_error = response[:300]
            state.down_until = time.monotonic() + self.retry_s
            log.warning("peer could not answer, trying the next holder",
                        extra={"tenant": tenant, "pod": holder.pod, "error": state.last_error})
            return response
        state.forwarded += 1
        state.down_until = 0.0

        def done() -> None:
            state.in_flight -= 1

        return Forwarded(response, None, self.timeout_s, routed="peer", on_close=done,
                         tenant=tenant)

    def _failed(self, route: Route, error: str) -> None:
        route.fallbacks += 1
        route.last_error = error[:300]
        route.down_until = time.monotonic() + self.retry_s
        log.warning("dedicated deployment unavailable, serving locally",
                    extra={"tenant": route.tenant, "version": route.version,
                           "error": route.last_error})

    async def aclose(self) -> None:
        await self._client.aclose()


def was_forwarded(headers: Any) -> bool:
    """Whether a request came from another server (well-formed hop ids in its forwarded
    header). Such a request is never forwarded to a peer again: one extra hop at most. A
    client that sends one only opts itself out of peer forwarding (it gets this server's
    own answer); hot routes still go by the server's secret hop id (``match``)."""
    return bool(_hops(headers))


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


__all__ = ["FORWARDED_HEADER", "ROUTED_HEADER", "Forwarded", "PeerState", "Route",
           "TenantRouter", "UsageReader", "was_forwarded"]
