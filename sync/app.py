"""The sidecar's HTTP API.

- ``PUT /v1/desired`` (:class:`~loramux.contracts.DesiredState`): the versions this pod
  should hold; 202, then the reconcile loop works towards it.
- ``GET /v1/state`` (:class:`~loramux.contracts.SyncState`): each desired version's phase,
  the routes, and the server's own last ``GET /admin/adapters`` answer. The operator reads
  a pod's state from here only.
- ``GET /v1/desired``: the desired set as told, credentials masked (for humans).
- ``GET /healthz``, ``GET /readyz`` (unauthenticated probes), ``GET /metrics``.

``/v1`` needs ``Authorization: Bearer <token>`` when a token is set. Every error is the one
error body of :mod:`loramux.contracts` (``{"error": {"message", "code", "status"}}``).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from loramux.contracts import DesiredState, error_body
from loramux.inference.json_body import UnsupportedMediaType, require_json_body
from loramux.sync.reconciler import Reconciler
from loramux.sync.settings import SyncSettings


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None
           ) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


class _Unauthorized(Exception):
    pass


def create_app(settings: SyncSettings, *, s3_client: Any = None) -> FastAPI:
    """The sidecar's app; its lifespan starts and stops the reconcile loop. ``s3_client``
    replaces the client built from the AWS environment (tests, embedding)."""
    reconciler = Reconciler(settings, s3_client=s3_client)
    token = settings.resolved_token()

    def require_token(request: Request) -> None:
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), token):
            raise _Unauthorized()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await reconciler.start()
        try:
            yield
        finally:
            await reconciler.stop()

    # PUT /v1/desired: no Content-Type means JSON, other non-JSON types are a 415 (json_body).
    app = FastAPI(title="loramux-sync", lifespan=lifespan, strict_content_type=False,
                  dependencies=[Depends(require_json_body)])
    app.state.reconciler = reconciler
    auth = [Depends(require_token)]

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        return _error(401, "unauthorized", "needs 'Authorization: Bearer <token>'",
                      {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UnsupportedMediaType)
    async def _not_json(_: Request, exc: UnsupportedMediaType) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own errors (unknown route, wrong method) get the one error body too.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        return _error(422, "invalid_request", "; ".join(problems)[:2000])

    @app.put("/v1/desired", status_code=202, dependencies=auth)
    async def put_desired(body: DesiredState) -> Any:
        reconciler.set_desired(body)
        return {"accepted": len(body.adapters)}

    @app.get("/v1/desired", dependencies=auth)
    async def get_desired() -> Any:
        # Credentials are masked: this endpoint is for looking, not for copying secrets.
        return {"adapters": [e.public_view() for e in reconciler.desired.values()]}

    @app.get("/v1/state", dependencies=auth)
    async def get_state() -> Any:
        return reconciler.state().model_dump(mode="json")

    @app.get("/healthz")
    async def healthz() -> Any:
        if not reconciler.loop_running:
            return _error(503, "loop_down", "the reconcile loop is not running")
        return {"status": "ok", "server_reachable": reconciler.server_reachable}

    @app.get("/readyz")
    async def readyz() -> Any:
        if not reconciler.loop_running:
            return _error(503, "loop_down", "the reconcile loop is not running")
        ready, body = reconciler.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(reconciler.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


__all__ = ["create_app"]
