"""The FastAPI app: public, admin and health routers over one engine.

Errors map to status codes in one place (:class:`ServiceError` and the handlers registered in
:func:`create_app`), and every error body is :func:`loramux.contracts.error_body`. Handlers
only translate HTTP to engine calls and back: which version a request gets is the tenant
directory's decision (``tenants.py``), and the admin bodies are the wire contracts of
``loramux.contracts``. Handlers get the :class:`Runtime` through :data:`RuntimeDep`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from loramux.contracts import (
    AccessList,
    AccessView,
    ActivateRequest,
    AdapterList,
    AdapterState,
    AdapterView,
    EvictionState,
    EvictResult,
    LoadAdapterRequest,
    PeerTable,
    PeerTableView,
    Residency,
    RouteList,
    RouteRequest,
    RouteView,
    SplitRequest,
    TenantAccess,
    VersionStats,
    error_body,
)
from loramux.http import (
    ServiceError,
    bearer_matches,
    install_error_handlers,
    require_json_body,
)
from loramux.names import AdapterRef, InvalidName, TenantRef, validate_label

from .access import Principal, Unauthenticated
from .adapter_cache import AdapterConflict, AdapterUnavailable, UnknownAdapter
from .adapters import AdapterRejected
from .engine import (
    EngineDown,
    ErrorEvent,
    FinishEvent,
    Overloaded,
    QueueFull,
    Sequence,
    TokenEvent,
)
from .fairness import TenantLimited
from .lora_backend import BatchedLoraBackend
from .metrics import BASE_LABEL
from .routing import Forwarded, TenantRouter, UsageReader, was_forwarded
from .sampling import SamplingParams
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    Usage,
)
from .server import Runtime
from .tenants import ModelName, Target

log = logging.getLogger("loramux.http")


# ---------------------------------------------------------------------- request plumbing
class _BodyTooLarge(HTTPException):
    """Raised from the body reader. An HTTPException, so that FastAPI's body parsing lets it
    through instead of turning it into a 400 ("error parsing the body")."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds {max_bytes} bytes")


class BodyLimitMiddleware:
    """Refuse request bodies above a byte limit with 413, chunked uploads included."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await self._reject(send)

    async def _reject(self, send: Callable) -> None:
        body = json.dumps(error_body(
            413, "body_too_large", f"request body exceeds {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


_FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def require_admin(request: Request, runtime: RuntimeDep) -> None:
    """Admin routes: a bearer token when one is configured (read per request, so a rotated
    token file takes effect), else loopback clients only - and a request that carries
    forwarding headers came through a proxy, so it is not a loopback client whatever its
    peer address says."""
    token = runtime.admin_token.current()
    if token:
        if not bearer_matches(request, token):
            raise ServiceError(401, "admin routes need 'Authorization: Bearer <token>'",
                               "unauthorized", {"WWW-Authenticate": "Bearer"})
        return
    host = request.client.host if request.client else ""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ServiceError(403, "admin routes accept only loopback clients when no token is set",
                           "forbidden")
    forwarded = [h for h in _FORWARDING_HEADERS if h in request.headers]
    if forwarded:
        raise ServiceError(403, "admin routes without a token accept only direct loopback "
                                f"clients, not requests forwarded by a proxy ({forwarded[0]})",
                           "forbidden")


def _on_port(scope: dict, port: int | None) -> bool:
    server = scope.get("server")
    return port is not None and server is not None and server[1] == port


class PortGate:
    """With a separate admin port (``runtime.admin_port``): ``/admin`` answers only there,
    and the admin port answers nothing else. With a metrics port (``runtime.metrics_port``):
    it answers ``/metrics`` (per tenant) and nothing else. Every other request is a 404, as
    for an unknown route. The local port a request arrived on is the ASGI scope's
    ``server``."""

    def __init__(self, app: Callable, runtime: Runtime) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        # The bound port; the configured one until serve() bound it (0: none matches yet,
        # so /admin is closed rather than open on the public port).
        settings = self.runtime.settings
        admin_port = self.runtime.admin_port
        if admin_port is None:
            admin_port = settings.admin_port
        metrics_port = self.runtime.metrics_port
        if metrics_port is None:
            metrics_port = settings.metrics_port
        if scope["type"] == "http":
            path = scope.get("path", "")
            refuse = False
            if _on_port(scope, metrics_port):
                refuse = path != "/metrics"
            elif admin_port is not None:
                admin_path = path == "/admin" or path.startswith("/admin/")
                refuse = admin_path != _on_port(scope, admin_port)
            if refuse:
                body = json.dumps(error_body(404, "not_found", "Not Found")).encode()
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------- generation core
SPLIT_KEY_HEADER = "X-Loramux-Split-Key"


def _split_key(request: Request, user: str | None = None) -> str:
    """What a canary split hashes: the ``X-Loramux-Split-Key`` header, else OpenAI's
    ``user``, else a random key of this request (one draw, however often it is asked)."""
    key = getattr(request.state, "split_key", None)
    if key is not None:
        return key
    key = request.headers.get(SPLIT_KEY_HEADER)
    if key is not None and not 1 <= len(key) <= 256:
        raise ServiceError(400, f"{SPLIT_KEY_HEADER} must be 1 to 256 characters",
                           "invalid_split_key")
    key = key if key is not None else user if user is not None else uuid.uuid4().hex
    request.state.split_key = key
    return key


def _target(runtime: Runtime, name: ModelName, *, openai: bool,
            split_key: str | None = None) -> Target:
    """The tenant directory's answer for ``name``, as HTTP errors."""
    try:
        return runtime.tenants.target(name, split_key)
    except InvalidName as exc:
        if openai:
            raise ServiceError(404, f"model {name.text[:80]!r} not found: {exc}",
                               "model_not_found") from exc
        raise ServiceError(422, str(exc), "invalid_name") from exc
    except UnknownAdapter as exc:
        raise ServiceError(404, str(exc), "model_not_found") from exc
    except AdapterUnavailable as exc:
        # Retrying helps while a version drains (its successor is being activated), not
        # after a failed load (someone has to publish a fixed adapter).
        headers = {"Retry-After": "2"} if exc.retryable else None
        raise ServiceError(503, public_reason(str(exc)), "adapter_unavailable",
                           headers) from exc


_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:~|\.{1,2})?(?:[/\\][^\s/\\'\"<>:]+){2,}[/\\]?")


def public_reason(reason: str) -> str:
    """A failure reason as public clients see it: no URIs (bucket keys, internal URLs) and
    no file paths, which loaders put in their messages. Admins read the full reason in
    ``/admin/adapters``; the log has it too."""
    return _PATH.sub("<path>", _URI.sub("<uri>", reason))


def _principal(runtime: Runtime, request: Request) -> Principal:
    """Who is calling: 401 without a key the server knows. The key is never logged."""
    try:
        return runtime.access.authenticate(request.headers.get("authorization"))
    except Unauthenticated as exc:
        runtime.metrics.auth_failures.labels("401").inc()
        raise ServiceError(401, str(exc), exc.code, {"WWW-Authenticate": "Bearer"}) from None


def require_key(request: Request, runtime: RuntimeDep) -> None:
    """Every public route: authenticate first, so a caller without a key learns nothing,
    not even what a valid body looks like (this runs before body validation)."""
    request.state.principal = _principal(runtime, request)


def _authorize(runtime: Runtime, request: Request, name: ModelName) -> Principal:
    """401 without a known key; 403 when the key does not grant the model ``name`` names
    (whether or not that model exists here: a 404 would tell a stranger who is here)."""
    principal = getattr(request.state, "principal", None) or _principal(runtime, request)
    if name.base:
        wanted: str | None = None  # the base model
    elif name.ref is not None:
        wanted = name.ref.tenant
    else:
        wanted = ""  # an invalid name: only an every-tenant key gets as far as its 4xx
    if wanted == "" and principal.all_tenants:
        return principal
    if not principal.may(wanted):
        runtime.metrics.auth_failures.labels("403").inc()
        what = "the base model" if wanted is None else f"model {name.text[:80]!r}"
        raise ServiceError(403, f"this API key does not grant {what}", "forbidden")
    return principal


def _check_base_fallback(runtime: Runtime, principal: Principal, target: Target) -> None:
    """An unknown tenant served by the base model (``--unknown-tenant base``) is the base
    model: the key must grant it too."""
    if target.entry is None and not principal.may(None):
        _release(runtime, target)
        runtime.metrics.auth_failures.labels("403").inc()
        raise ServiceError(403, "this model is served by the base model here, which this API "
                                "key does not grant", "forbidden")


def _engine_problem(runtime: Runtime) -> tuple[str, str] | None:
    """Why the engine cannot take work now (code, message), or None. Liveness is progress:
    a thread that is alive but has completed no step for ``engine_stall_timeout_s`` while
    work waits is as good as dead to a client."""
    engine = runtime.engine
    if not engine.alive:
        return "engine_down", "engine thread is not running"
    stalled = engine.stalled_for(runtime.settings.engine_stall_timeout_s)
    if stalled is not None:
        return "engine_stalled", f"the engine has made no progress for {stalled:.0f}s"
    return None


def _params(runtime: Runtime, max_tokens: int | None, temperature: float, top_p: float,
            stop: list[str], ignore_eos: bool, seed: int | None) -> SamplingParams:
    limit = runtime.settings.max_new_tokens_limit
    wanted = max_tokens if max_tokens is not None else runtime.settings.default_max_new_tokens
    if wanted > limit:
        raise ServiceError(422, f"max_new_tokens {wanted} exceeds this server's limit of {limit}",
                           "max_tokens_too_large")
    return SamplingParams(max_new_tokens=wanted, temperature=temperature, top_p=top_p,
                          stop=tuple(stop or ()), ignore_eos=ignore_eos, seed=seed)


def _tokenize(runtime: Runtime, prompt: str, params: SamplingParams, *,
              special: bool = True) -> list[int]:
    ids = runtime.tokenizer.encode(prompt, add_special_tokens=special)
    limit = runtime.settings.max_prompt_tokens
    if len(ids) > limit:
        raise ServiceError(413, f"prompt is {len(ids)} tokens; this server accepts at most {limit}",
                           "prompt_too_long")
    if not ids:
        raise ServiceError(422, "prompt encodes to no tokens", "empty_prompt")
    context = runtime.context_length
    if context and len(ids) + params.max_new_tokens > context:
        raise ServiceError(422, f"prompt ({len(ids)} tokens) plus max_new_tokens "
                                f"({params.max_new_tokens}) exceeds the model's context of "
                                f"{context} tokens", "context_too_long")
    return ids


def _submit(runtime: Runtime, target: Target, prompt_ids: list[int],
            params: SamplingParams, stream: bool) -> Sequence:
    seq = Sequence(prompt_ids=prompt_ids, params=params, entry=target.entry,
                   loop=asyncio.get_running_loop(), stream=stream,
                   timeout_s=runtime.settings.request_timeout_s)
    problem = _engine_problem(runtime)
    try:
        if problem is not None:
            raise EngineDown(problem[1])
        runtime.engine.submit(seq)
    except EngineDown as exc:
        _release(runtime, target)
        raise ServiceError(503, f"server cannot generate now: {exc}",
                           problem[0] if problem else "engine_down",
                           {"Retry-After": "5"}) from exc
    except TenantLimited as exc:
        _release(runtime, target)
        runtime.metrics.tenant_limited.labels(seq.tenant_label, exc.limit).inc()
        raise ServiceError(429, f"{exc}; retry after {math.ceil(exc.retry_after_s)}s",
                           f"tenant_{exc.limit}",
                           {"Retry-After": str(math.ceil(exc.retry_after_s))}) from exc
    except QueueFull as exc:
        _release(runtime, target)
        raise ServiceError(429, f"server is busy: {exc}",
                           "overloaded" if isinstance(exc, Overloaded) else "queue_full",
                           {"Retry-After": str(math.ceil(exc.retry_after_s))}) from exc
    return seq


def _release(runtime: Runtime, target: Target) -> None:
    if target.entry is not None:
        runtime.cache.release(target.entry)


def _error_code(event: ErrorEvent) -> str:
    # 429 from the engine: shed after waiting longer than --max-queue-wait-s
    return "overloaded" if event.status == 429 else "generation_failed"


def _error_payload(event: ErrorEvent) -> dict:
    return error_body(event.status, _error_code(event), public_reason(event.reason))["error"]


async def _await_finish(seq: Sequence, request: Request) -> FinishEvent:
    """Wait for the sequence's end; cancel it if the client disconnects meanwhile."""
    return cast(FinishEvent, await _await_event(seq, request, first=False))


async def _await_first(seq: Sequence, request: Request) -> TokenEvent | FinishEvent:
    """A stream's first token (or its end): what decides the response's status. An error
    before any token (shed after waiting, a failed prefill) is an HTTP error, not a 200
    stream that carries one, so clients, proxies and peer routers see the status."""
    return await _await_event(seq, request, first=True)


async def _await_event(seq: Sequence, request: Request,
                       first: bool) -> TokenEvent | FinishEvent:
    # The engine enforces the request timeout; this is a backstop so a handler never hangs.
    backstop = time.monotonic() + seq.timeout_s + 30
    answered = False
    try:
        while True:
            try:
                event = await asyncio.wait_for(seq.events.get(), timeout=0.25)
            except TimeoutError:
                if time.monotonic() > backstop:
                    raise ServiceError(504, "no answer from the engine in time",
                                       "timeout") from None
                if await request.is_disconnected():
                    seq.cancel()
                    raise ServiceError(499, "client disconnected", "client_closed") from None
                continue
            if isinstance(event, FinishEvent) or (first and isinstance(event, TokenEvent)):
                answered = True
                return event
            if isinstance(event, ErrorEvent):
                # Which version failed, as on a success (a canary's failures are its own).
                adapter = str(seq.entry.ref) if seq.entry is not None else "none"
                headers = {"X-Loramux-Adapter": adapter}
                if event.status == 429:
                    headers["Retry-After"] = "1"
                raise ServiceError(event.status, public_reason(event.reason),
                                   _error_code(event), headers)
    finally:
        if not answered and not seq.done:
            seq.cancel()


async def _stream_events(seq: Sequence, first: TokenEvent | FinishEvent
                         ) -> AsyncIterator[TokenEvent | FinishEvent | ErrorEvent]:
    """Yield ``first`` (from :func:`_await_first`), then events until the end; a cancelled
    stream (client gone) cancels the sequence."""
    try:
        yield first
        if isinstance(first, FinishEvent):
            return
        while True:
            event = await seq.events.get()
            yield event
            if isinstance(event, FinishEvent | ErrorEvent):
                return
    finally:
        if not seq.done:
            seq.cancel()


def _sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BoundedStreamingResponse(StreamingResponse):
    """A stream with a server-side bound: a send that the client does not take (it stopped
    reading; the socket buffers are full) for ``send_timeout_s`` ends the stream, runs
    ``on_abort`` (which frees the engine row or the upstream connection) and closes the
    connection, instead of holding both until the client comes back."""

    def __init__(self, content: AsyncIterator[bytes], *, send_timeout_s: float,
                 on_abort: Callable[[], object] | None = None, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.send_timeout_s, self.on_abort = send_timeout_s, on_abort

    async def stream_response(self, send: Callable) -> None:
        async def bounded(message: dict) -> None:
            async with asyncio.timeout(self.send_timeout_s):
                await send(message)

        try:
            await super().stream_response(bounded)
        except TimeoutError:
            log.warning("stream client read nothing for %gs; ending the stream",
                        self.send_timeout_s)
            if self.on_abort is not None:
                self.on_abort()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            # Returning with the response unfinished makes the server close the connection.


def _stream_response(runtime: Runtime, content: AsyncIterator[bytes],
                     on_abort: Callable[[], object] | None, **kwargs: Any) -> StreamingResponse:
    return BoundedStreamingResponse(content, send_timeout_s=runtime.settings.stream_send_timeout_s,
                                    on_abort=on_abort, **kwargs)


async def _maybe_forward(runtime: Runtime, request: Request, name: ModelName,
                         stream: bool) -> Response | None:
    """The request answered by another server, or ``None`` (serve it here): a routed (hot)
    tenant's by its dedicated deployment first, else a tenant held only by peers by one of
    them (``_maybe_forward_peer``). Runs after ``_authorize``: nothing is forwarded for a
    key that does not grant the tenant."""
    hot = await _maybe_forward_hot(runtime, request, name, stream)
    if hot is not None:
        return hot
    return await _maybe_forward_peer(runtime, request, name, stream)


async def _maybe_forward_hot(runtime: Runtime, request: Request, name: ModelName,
                             stream: bool) -> Response | None:
    """A routed (hot) tenant's request answered by its dedicated deployment, or ``None``.

    A dedicated (merged) server never forwards. Whether a request was forwarded already is
    decided by the router from hop ids only servers know (routing.py), never from a header
    a client can simply send, so no client opts out of routing."""
    router = runtime.router
    want = name.ref
    if router is None or not router.routes or want is None or runtime.tenants.merged is not None:
        return None
    route = router.match(want.tenant, want.version, request.headers)
    if route is None:
        return None
    if want.version is None and runtime.tenants.canary_takes(want.tenant, _split_key(request)):
        return None  # a hot tenant's canary share is served here, by the canary version
    result = await router.forward(route, request.url.path, await request.body(),
                                  request.headers, stream)
    if result is None:
        runtime.metrics.forwarded_requests.labels(want.tenant, "fallback").inc()
        return None
    runtime.metrics.forwarded_requests.labels(want.tenant, "forwarded").inc()
    runtime.metrics.requests.labels(want.tenant, "forwarded").inc()
    return await _relay(runtime, result, stream,
                        runtime.metrics.forwarded_tokens.labels(want.tenant).inc)


async def _relay(runtime: Runtime, result: Forwarded, stream: bool,
                 count_tokens: Callable[[int], object] | None) -> Response:
    """Relay an accepted upstream answer; ``count_tokens`` gets the usage it reports."""
    usage = UsageReader()
    if stream and 200 <= result.status < 300:
        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in result.stream():
                    if count_tokens is not None:
                        usage.feed(chunk)
                    yield chunk
            finally:
                if usage.tokens and count_tokens is not None:
                    count_tokens(usage.tokens)

        return _stream_response(runtime, relay(), None, status_code=result.status,
                                headers=result.headers)
    body = await result.body()
    if count_tokens is not None:
        usage.body(body)
        if usage.tokens:
            count_tokens(usage.tokens)
    return Response(body, status_code=result.status, headers=result.headers)


async def _maybe_forward_peer(runtime: Runtime, request: Request, name: ModelName,
                              stream: bool) -> Response | None:
    """A request for a tenant this server does not hold, answered by a peer that does (the
    pool's placement table, ``PUT /admin/peers``), or ``None`` (serve it here: held here,
    or the table does not know the tenant, so the existing 404 / base fallback applies).

    Failover (``--peer-failover-s``): when the table knows the tenant but no holder could
    answer (all failed or hung, none Ready yet, its only pod died and it is being
    re-placed), the request waits for a new table or a holder's breaker to expire
    (``TenantRouter.wait_for_peers``), then tries again, until the deadline; a tenant that
    is loaded here meanwhile is served here. So with ``replicas: 1`` a holder killed
    abruptly costs its tenant's requests a wait, not a failure. No wait (503 at once) when
    every placement Failed (the table's ``failed``), for a pinned version no holder
    has, when ``--max-queue`` requests already wait, and with ``--peer-failover-s 0``. A
    client that disconnects ends the wait.

    Raises 503 ``tenant_unavailable`` with the reason when no holder answered in the end,
    or when this request already came from another server (never a second hop: the first
    server sees the 503, skips this holder and waits or tries another). Never the base
    model for a tenant the table knows. Peer forwards are counted without a tenant label
    and not as the tenant's tokens: the holder counts those as its own."""
    router = runtime.router
    want = name.ref
    if router is None or want is None or name.base or runtime.tenants.merged is not None:
        return None
    row = router.peer_tenant(want.tenant)
    if row is None or runtime.tenants.holds(want):
        return None
    counter = runtime.metrics.peer_forwarded_requests
    if was_forwarded(request.headers):
        counter.labels("not_held").inc()
        raise _tenant_unavailable(want, "this server does not hold it (forwarded request, "
                                        "not forwarded again)")
    body = await request.body()  # before any wait: is_disconnected() reads the stream
    failover_s = runtime.settings.peer_failover_s
    deadline: float | None = None  # set when the request starts waiting
    while True:
        changed = router.peers_changed  # taken before the try: a table set during it counts
        candidates = router.peer_candidates(row, want.version)
        # With a failover wait, a holder whose breaker is open is not tried but waited for
        # (its breaker's expiry wakes the wait): a hung one would cost every request its
        # probe time. Without one, it is tried last rather than failing the request.
        holders = candidates if failover_s <= 0 else [
            h for h in candidates if router.peer_usable(h)]
        outcome, wait = "no_holder", True
        reason = row.reason or "no pod of the pool holds it Ready"
        if holders:
            for n, holder in enumerate(holders, start=1):
                result = await router.forward_peer(holder, want.tenant, request.url.path,
                                                   body, request.headers, stream)
                if isinstance(result, str):
                    counter.labels("holder_failed").inc()
                    continue
                if result.busy and n < len(holders):  # another holder may have room
                    await result.body()  # (read already: this only closes it)
                    counter.labels("holder_busy").inc()
                    continue
                # The last holder's 429 is the answer: busy is not gone, no failover wait.
                counter.labels("forwarded").inc()
                if deadline is not None:
                    waited = time.monotonic() - (deadline - failover_s)
                    log.info("a holder answered after the failover wait",
                             extra={"tenant": want.tenant, "pod": holder.pod,
                                    "waited_s": round(waited, 3)})
                return await _relay(runtime, result, stream, None)
            outcome = "all_failed"
            reason = f"none of its {len(holders)} holder(s) could answer"
        elif candidates:  # every holder's breaker is open: wait for one to close
            outcome, reason = "all_failed", (
                f"none of its {len(candidates)} holder(s) could answer")
        elif want.version is not None and (
                row.holders or runtime.tenants.holds(TenantRef(want.tenant))):
            reason, wait = f"no pod of the pool holds version {want.version}", False
        else:
            wait = not row.failed
        now = time.monotonic()
        if deadline is None and wait and router.waiting >= runtime.settings.max_queue:
            # A flood for a tenant that is gone holds no more than a full queue's worth of
            # connections; the rest get the 503 (with Retry-After) at once.
            wait, reason = False, f"{reason}; too many requests already wait for a holder"
        if not wait or failover_s <= 0:
            counter.labels(outcome).inc()
            raise _tenant_unavailable(want, reason)
        if deadline is None:
            deadline = now + failover_s
            counter.labels("failover_wait").inc()
            log.info("no holder could answer; waiting for a new placement",
                     extra={"tenant": want.tenant, "reason": reason[:200],
                            "wait_s": failover_s})
        elif now >= deadline:
            counter.labels("failover_expired").inc()
            log.warning("no holder answered within the failover wait",
                        extra={"tenant": want.tenant, "reason": reason[:200],
                               "wait_s": failover_s})
            raise _tenant_unavailable(want, f"{reason} (waited {failover_s:g}s)")
        if not await router.wait_for_peers(want.tenant, changed, deadline,
                                           request.is_disconnected):
            counter.labels("client_gone").inc()
            raise ServiceError(499, "client disconnected", "client_closed")
        if runtime.tenants.holds(want):
            return None  # loaded here meanwhile
        fresh = router.peer_tenant(want.tenant)
        if fresh is None:
            return None  # the table no longer knows it: the answer for an unknown tenant
        row = fresh


def _tenant_unavailable(want: TenantRef, reason: str) -> ServiceError:
    return ServiceError(503, f"tenant {str(want)[:80]!r} is not available: "
                             f"{public_reason(reason)}", "tenant_unavailable",
                        {"Retry-After": "2"})


# ---------------------------------------------------------------------- routers
public = APIRouter(dependencies=[Depends(require_key)])
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
health = APIRouter()


@public.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, request: Request, runtime: RuntimeDep) -> Any:
    name = runtime.tenants.name(body.tenant_id)
    principal = _authorize(runtime, request, name)
    _split_key(request)
    forwarded = await _maybe_forward(runtime, request, name, body.stream)
    if forwarded is not None:
        return forwarded
    params = _params(runtime, body.max_new_tokens, body.temperature, body.top_p, body.stop,
                     body.ignore_eos, body.seed)
    prompt_ids = _tokenize(runtime, body.prompt, params)
    target = _target(runtime, name, openai=False, split_key=_split_key(request))
    _check_base_fallback(runtime, principal, target)
    version = target.entry.ref.version if target.entry is not None else None
    seq = _submit(runtime, target, prompt_ids, params, body.stream)
    if body.stream:
        first_event = await _await_first(seq, request)

        async def events() -> AsyncIterator[bytes]:
            async for event in _stream_events(seq, first_event):
                if isinstance(event, TokenEvent):
                    yield _sse({"text": event.text})
                elif isinstance(event, FinishEvent):
                    yield _sse({"tenant_id": body.tenant_id, "version": version,
                                "adapter": target.adapter, "finish_reason": event.finish_reason,
                                "usage": _usage(event).model_dump()})
                else:
                    yield _sse({"error": _error_payload(event)})
            yield b"data: [DONE]\n\n"

        return _stream_response(runtime, events(), seq.cancel, media_type="text/event-stream",
                                headers=_SSE_HEADERS)
    done = await _await_finish(seq, request)
    return GenerateResponse(tenant_id=body.tenant_id, version=version, adapter=target.adapter,
                            text=done.text, finish_reason=done.finish_reason, usage=_usage(done))


def _usage(event: FinishEvent) -> Usage:
    return Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                 total_tokens=event.prompt_tokens + event.completion_tokens)


async def _openai(runtime: Runtime, request: Request, name: ModelName, principal: Principal,
                  body: CompletionRequest | ChatCompletionRequest, prompt: str,
                  chat: bool) -> Any:
    params = _params(runtime, body.max_completion_tokens or body.max_tokens, body.temperature,
                     body.top_p, body.stop, body.ignore_eos, body.seed)
    # A chat template already carries its special tokens.
    prompt_ids = _tokenize(runtime, prompt, params, special=not chat)
    target = _target(runtime, name, openai=True, split_key=_split_key(request, body.user))
    _check_base_fallback(runtime, principal, target)
    seq = _submit(runtime, target, prompt_ids, params, body.stream)
    created = int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    headers = {"X-Loramux-Adapter": target.adapter or "none"}
    if body.stream:
        first_event = await _await_first(seq, request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": body.model,
                    "adapter": target.adapter, "choices": [choice]}

        async def events() -> AsyncIterator[bytes]:
            if chat:
                yield _sse(chunk(None, None, first=True))
            async for event in _stream_events(seq, first_event):
                if isinstance(event, TokenEvent):
                    yield _sse(chunk(event.text, None))
                elif isinstance(event, FinishEvent):
                    final = chunk(None, event.finish_reason)
                    final["usage"] = _usage(event).model_dump()
                    yield _sse(final)
                else:
                    yield _sse({"error": _error_payload(event)})
            yield b"data: [DONE]\n\n"

        return _stream_response(runtime, events(), seq.cancel, media_type="text/event-stream",
                                headers={**_SSE_HEADERS, **headers})
    done = await _await_finish(seq, request)
    if chat:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason,
                                  "message": {"role": "assistant", "content": done.text}}
    else:
        choice = {"index": 0, "text": done.text, "finish_reason": done.finish_reason,
                  "logprobs": None}
    payload = {"id": rid, "object": "chat.completion" if chat else "text_completion",
               "created": created, "model": body.model, "adapter": target.adapter,
               "choices": [choice], "usage": _usage(done).model_dump()}
    return JSONResponse(payload, headers=headers)


@public.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, runtime: RuntimeDep) -> Any:
    name = runtime.tenants.name(body.model)
    principal = _authorize(runtime, request, name)
    _split_key(request, body.user)
    forwarded = await _maybe_forward(runtime, request, name, body.stream)
    if forwarded is not None:
        return forwarded
    assert isinstance(body.prompt, str)
    return await _openai(runtime, request, name, principal, body, body.prompt, chat=False)


@public.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           runtime: RuntimeDep) -> Any:
    name = runtime.tenants.name(body.model)
    principal = _authorize(runtime, request, name)
    _split_key(request, body.user)
    forwarded = await _maybe_forward(runtime, request, name, body.stream)
    if forwarded is not None:
        return forwarded
    if not getattr(runtime.tokenizer, "chat_template", None):
        raise ServiceError(422, "the base model's tokenizer has no chat template; use "
                                "/v1/completions", "no_chat_template")
    text = runtime.tokenizer.apply_chat_template(
        [m.model_dump() for m in body.messages], tokenize=False, add_generation_prompt=True
    )
    return await _openai(runtime, request, name, principal, body, text, chat=True)


@public.get("/v1/models")
async def models(request: Request, runtime: RuntimeDep) -> Any:
    """The models the caller's key may use (everything with ``--auth none``)."""
    principal = getattr(request.state, "principal", None) or _principal(runtime, request)
    created = int(runtime.started_at)
    data: list[dict[str, Any]] = []
    if runtime.tenants.merged is None and principal.may(None):
        data.append({"id": runtime.base_name, "object": "model", "created": created,
                     "owned_by": "loramux", "root": runtime.base_name, "parent": None,
                     "quantization": runtime.quantization,
                     "compute_dtype": runtime.base.compute_dtype})
    for entry in sorted(runtime.cache.entries(), key=lambda e: str(e.ref)):
        if entry.state != AdapterState.READY or not principal.may(entry.ref.tenant):
            continue
        active = runtime.tenants.is_active(entry.ref)
        ids = [str(entry.ref)] + ([entry.ref.tenant] if active else [])
        for model_id in ids:
            data.append({"id": model_id, "object": "model", "created": created,
                         "owned_by": "loramux", "root": runtime.base_name,
                         "parent": runtime.base_name, "tenant": entry.ref.tenant,
                         "version": entry.ref.version, "merged": entry.merged})
    return {"object": "list", "data": data, "base_model": runtime.base_name,
            "base_model_aliases": list(runtime.base_names),
            "precision": runtime.base.precision_view(),
            "lora_kernel": lora_kernel_view(runtime),
            "cpu_linear": runtime.cpu_linear.view()}


def lora_kernel_view(runtime: Runtime) -> dict[str, str]:
    """What one-token steps of distinct tenants run: loramux's CPU kernel or plain torch."""
    backend = runtime.backend
    if not isinstance(backend, BatchedLoraBackend):
        return {"state": "torch", "reason": "--lora-backend peft"}
    return {"state": backend.kernel_state, "reason": backend.kernel_reason}


def _ref(tenant: str, version: str) -> AdapterRef:
    try:
        return AdapterRef(tenant, version)
    except InvalidName as exc:
        raise ServiceError(422, str(exc), "invalid_name") from exc


@admin.get("/adapters")
async def list_adapters(runtime: RuntimeDep) -> AdapterList:
    """Every version here, and the server's load (waiting requests, running rows), which
    the operator puts in the pool's placement table to pick among holders."""
    engine = runtime.engine
    return AdapterList(adapters=runtime.tenants.views(), base_model=runtime.base_name,
                       base_model_aliases=list(runtime.base_names),
                       queue_depth=max(0, int(getattr(engine, "queue_depth", 0))),
                       running=max(0, int(getattr(engine, "rows_in_use", 0))))


@admin.put("/adapters/{tenant}/{version}")
async def load_adapter(tenant: str, version: str, body: LoadAdapterRequest,
                       runtime: RuntimeDep) -> AdapterView:
    ref = _ref(tenant, version)
    path = Path(body.path)
    if not path.is_absolute():
        raise ServiceError(422, "path must be absolute", "bad_path")
    root = runtime.settings.adapter_root
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise ServiceError(422, f"path must be inside {root}", "bad_path")
    try:
        future = runtime.tenants.register(ref, path, pinned=body.pinned,
                                          activate=body.activate)
    except AdapterConflict as exc:
        raise ServiceError(409, str(exc), "conflict") from exc
    try:
        entry = await asyncio.wrap_future(future)
    except AdapterRejected as exc:
        raise ServiceError(422, f"adapter {ref} rejected: {exc.message}", exc.code) from exc
    except AdapterUnavailable as exc:  # evicted while it was being read
        raise ServiceError(409, str(exc), "conflict") from exc
    if body.pinned:
        # The engine brings pinned adapters onto the device between steps anyway; this only
        # makes the answer wait for it, never longer than a drain.
        promoted = asyncio.wrap_future(runtime.engine.call(lambda: runtime.cache.prepare(entry)))
        try:
            await asyncio.wait_for(promoted, runtime.settings.drain_timeout_s)
        except TimeoutError:
            log.warning("pinned adapter not on the device yet",
                        extra={"tenant": ref.tenant, "version": ref.version})
    try:
        if runtime.cache.get(ref) is not entry:
            raise UnknownAdapter(f"{ref} was evicted while it was being loaded")
        if body.activate:
            runtime.tenants.activate(ref.tenant, ref.version)
    except (UnknownAdapter, AdapterUnavailable) as exc:  # a DELETE (or failure) came first
        raise ServiceError(409, str(exc), "conflict") from exc
    return entry.view(active=runtime.tenants.is_active(ref))


@admin.delete("/adapters/{tenant}/{version}")
async def evict_adapter(tenant: str, version: str, runtime: RuntimeDep,
                        response: Response) -> EvictResult:
    ref = _ref(tenant, version)
    try:
        future = runtime.tenants.evict(ref)
    except UnknownAdapter as exc:
        raise ServiceError(404, str(exc), "not_found") from exc
    except AdapterConflict as exc:
        raise ServiceError(409, str(exc), "conflict") from exc
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                               runtime.settings.drain_timeout_s)
    except TimeoutError:
        response.status_code = 202
        return EvictResult(tenant=tenant, version=version, state=EvictionState.DRAINING)
    return EvictResult(tenant=tenant, version=version, state=EvictionState.EVICTED)


@admin.put("/tenants/{tenant}/active")
async def set_active(tenant: str, body: ActivateRequest, runtime: RuntimeDep) -> AdapterView:
    ref = _ref(tenant, body.version)
    try:
        entry = runtime.tenants.activate(ref.tenant, ref.version)
    except UnknownAdapter as exc:
        raise ServiceError(404, str(exc), "not_found") from exc
    except AdapterUnavailable as exc:
        raise ServiceError(409, str(exc), "not_ready") from exc
    return entry.view(active=runtime.tenants.is_active(ref))


@admin.put("/tenants/{tenant}/split")
async def set_split(tenant: str, body: SplitRequest, runtime: RuntimeDep) -> AdapterView:
    """A canary: ``body.version`` answers ``body.weight`` percent of the bare tenant's
    requests (by split key); the active version answers the rest."""
    ref = _ref(tenant, body.version)
    try:
        entry = runtime.tenants.set_split(ref.tenant, ref.version, body.weight)
    except UnknownAdapter as exc:
        raise ServiceError(404, str(exc), "not_found") from exc
    except AdapterUnavailable as exc:
        raise ServiceError(409, str(exc), "not_ready") from exc
    except AdapterConflict as exc:
        raise ServiceError(409, str(exc), "conflict") from exc
    return entry.view(active=False, weight=body.weight)


@admin.delete("/tenants/{tenant}/split")
async def clear_split(tenant: str, runtime: RuntimeDep) -> dict[str, Any]:
    try:
        validate_label(tenant, "tenant")
    except InvalidName as exc:
        raise ServiceError(422, str(exc), "invalid_name") from exc
    return {"tenant": tenant, "removed": runtime.tenants.clear_split(tenant)}


@admin.get("/routes")
async def list_routes(runtime: RuntimeDep) -> RouteList:
    routes = runtime.router.routes.values() if runtime.router is not None else []
    return RouteList(routes=[r.view() for r in sorted(routes, key=lambda r: r.tenant)])


@admin.put("/tenants/{tenant}/route")
async def set_route(tenant: str, body: RouteRequest, runtime: RuntimeDep) -> RouteView:
    """Forward ``tenant``'s requests to its dedicated deployment (hot tenants)."""
    if runtime.tenants.merged is not None:
        raise ServiceError(409, "a merged (dedicated) server does not forward", "conflict")
    try:
        validate_label(tenant, "tenant")
        if body.version is not None:
            validate_label(body.version, "version")
    except InvalidName as exc:
        raise ServiceError(422, str(exc), "invalid_name") from exc
    assert runtime.router is not None
    return runtime.router.set(tenant, body.url, body.version).view()


@admin.delete("/tenants/{tenant}/route")
async def delete_route(tenant: str, runtime: RuntimeDep) -> Any:
    route = runtime.router.remove(tenant) if runtime.router is not None else None
    if route is None:
        raise ServiceError(404, f"tenant {tenant[:63]!r} has no route", "not_found")
    return {"tenant": tenant, "state": "removed"}


@admin.get("/peers")
async def get_peers(runtime: RuntimeDep) -> PeerTableView:
    """The pool's placement table this server forwards by, its fingerprint, and per holder
    what this server saw (breaker, forwards in flight, last error)."""
    if runtime.router is None:
        raise ServiceError(503, "the server is starting", "not_ready", {"Retry-After": "1"})
    return runtime.router.peers_view()


@admin.put("/peers")
async def put_peers(body: PeerTable, runtime: RuntimeDep) -> PeerTableView:
    """Replace the pool's placement table (the sidecar, from ``DesiredState.peers``)."""
    if runtime.tenants.merged is not None:
        raise ServiceError(409, "a merged (dedicated) server does not forward", "conflict")
    if runtime.router is None:
        raise ServiceError(503, "the server is starting", "not_ready", {"Retry-After": "1"})
    return runtime.router.set_peers(body)


@admin.get("/access")
async def list_access(runtime: RuntimeDep) -> AccessList:
    return runtime.access.views()


@admin.put("/tenants/{tenant}/access")
async def set_access(tenant: str, body: TenantAccess, runtime: RuntimeDep) -> AccessView:
    """A tenant's key hashes, weight and limits (the sidecar, from ``spec.access``)."""
    try:
        validate_label(tenant, "tenant")
    except InvalidName as exc:
        raise ServiceError(422, str(exc), "invalid_name") from exc
    return runtime.access.set(tenant, body)


@admin.delete("/tenants/{tenant}/access")
async def delete_access(tenant: str, runtime: RuntimeDep) -> Any:
    if not runtime.access.remove(tenant):
        raise ServiceError(404, f"tenant {tenant[:63]!r} has no access set through this API",
                           "not_found")
    return {"tenant": tenant, "state": "removed"}


@admin.get("/fairness")
async def fairness(runtime: RuntimeDep) -> Any:
    """The fair scheduler's view per tenant (service counter, waiting, in flight, limits)."""
    view = getattr(runtime.engine, "fairness_view", None)
    return {"admission": runtime.settings.admission, "tenants": view() if view else {}}


@admin.get("/metrics")
async def admin_metrics(runtime: RuntimeDep) -> Response:
    """Every series, per tenant (the public port's ``/metrics`` sums over tenants)."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@health.get("/healthz")
async def healthz(runtime: RuntimeDep) -> Any:
    problem = _engine_problem(runtime)
    if problem is not None:
        raise ServiceError(503, problem[1], problem[0])
    return {"status": "ok"}


@health.get("/readyz")
async def readyz(runtime: RuntimeDep) -> Any:
    problem = _engine_problem(runtime)
    if problem is not None:
        raise ServiceError(503, problem[1], problem[0])
    ok, missing = runtime.cache.pinned_resident()
    if not ok:
        raise ServiceError(503, f"pinned adapters not resident yet: {missing}", "not_ready")
    return {"status": "ready", "base_model": runtime.base_name}


@health.get("/metrics")
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    """On the metrics port: every series, per tenant. Elsewhere (the public port): the same
    series summed over tenants, so a client learns nothing about other tenants' traffic
    (kept as sums when observed: a scrape does not grow with the number of tenants)."""
    port = runtime.metrics_port if runtime.metrics_port is not None \
        else runtime.settings.metrics_port
    registry = (runtime.metrics.registry if _on_port(request.scope, port)
                else runtime.metrics.public_registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------- app
_TIERS = (Residency.DEVICE, Residency.HOST, Residency.DISK)


def _tenant_load(runtime: Runtime) -> list[tuple[str, str, int]]:
    """(tenant, best tier here, requests in flight) for ``loramux_tenant_in_flight``: only
    tenants with requests in flight or a version on the device. Read per scrape from what
    the engine and the cache keep as it changes (requests in flight per tenant, the
    tenants on the device), so a scrape costs those rows (bounded by the queue and batch
    limits and the device slots), never a walk over every registered or recently active
    tenant, and nothing per decode step. A tenant in flight but not on the device shows
    its active version's tier."""
    in_flight = runtime.metrics.in_flight_by_tenant()
    device = runtime.metrics.device_tenants()
    rows = []
    for tenant in sorted(set(in_flight) | device):
        if tenant in device:
            tier = str(Residency.DEVICE)
        elif tenant == BASE_LABEL:
            tier = "base"
        else:
            try:
                residency = runtime.tenants.resolve(TenantRef(tenant)).residency
            except (UnknownAdapter, InvalidName):
                residency = None
            tier = str(residency) if residency in _TIERS else "none"
        rows.append((tenant, tier, in_flight.get(tenant, 0)))
    return rows


def _canary_versions(runtime: Runtime) -> list[tuple[str, str, str, VersionStats]]:
    """(tenant, version, role, stats) of the tenants under a canary split, for the
    per-version Prometheus series: their active (stable) and canary versions."""
    rows = []
    for tenant, (canary, _weight) in sorted(runtime.tenants.split_tenants().items()):
        for view in runtime.tenants.tenant_views(tenant):
            if view.stats is None:
                continue
            if view.version == canary:
                rows.append((tenant, view.version, "canary", view.stats))
            elif view.active:
                rows.append((tenant, view.version, "stable", view.stats))
    return rows


def create_app(runtime: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.engine.start()
        runtime.router = TenantRouter(timeout_s=runtime.settings.request_timeout_s + 30,
                                      retry_s=runtime.settings.route_retry_s,
                                      peer_connect_s=runtime.settings.peer_connect_timeout_s,
                                      peer_hang_s=runtime.settings.peer_hang_timeout_s)
        yield
        await runtime.router.aclose()
        runtime.engine.stop()
        runtime.cache.shutdown()

    # JSON bodies: no Content-Type means JSON, other non-JSON types are a 415 (loramux.http).
    app = FastAPI(title="loramux", version=runtime.version, lifespan=lifespan,
                  strict_content_type=False, dependencies=[Depends(require_json_body)])
    app.state.runtime = runtime
    runtime.metrics.track_tenant_load(lambda: _tenant_load(runtime))
    runtime.metrics.track_canary_versions(lambda: _canary_versions(runtime))
    app.include_router(public)
    app.include_router(admin)
    app.include_router(health)

    install_error_handlers(app, log)
    app.add_middleware(BodyLimitMiddleware, max_bytes=runtime.settings.max_body_bytes)
    if runtime.settings.admin_port is not None or runtime.settings.metrics_port is not None:
        app.add_middleware(PortGate, runtime=runtime)
    return app


__all__ = ["RuntimeDep", "create_app", "get_runtime"]
