"""The sidecar's HTTP API.

- ``PUT /v1/desired`` (:class:`~loramux.contracts.DesiredState`): the versions this pod
  should hold, and the pool's placement table (``peers``, pushed to the server's
  ``PUT /admin/peers``); 202, then the reconcile loop works towards it.
- ``GET /v1/state`` (:class:`~loramux.contracts.SyncState`): each desired version's phase,
  the routes, and the server's own last ``GET /admin/adapters`` and ``GET /admin/access``
  answers (``access``: key counts and fingerprints, never hashes). The operator reads a
  pod's state from here only.
- ``GET /v1/desired``: the desired set as told, credentials masked, and the placement
  table's size and fingerprints (told, and held by the server) (for humans).
- ``GET /healthz``, ``GET /readyz`` (unauthenticated probes), ``GET /metrics``.

``/v1`` needs ``Authorization: Bearer <token>`` when a token is set; a token file is
re-read when it changes, so a rotated Secret takes effect on the next request (the old token
is refused from then on) without a restart. Every error is the one
error body of :mod:`loramux.contracts` (``{"error": {"message", "code", "status"}}``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loramux.contracts import DesiredState
from loramux.http import (
    ServiceError,
    bearer_matches,
    error_response,
    install_error_handlers,
    require_json_body,
)
from loramux.sync.reconciler import Reconciler
from loramux.sync.settings import SyncSettings

log = logging.getLogger("loramux.sync")


def create_app(settings: SyncSettings, *, s3_client: Any = None) -> FastAPI:
    """The sidecar's app; its lifespan starts and stops the reconcile loop. ``s3_client``
    replaces the client built from the AWS environment (tests, embedding)."""
    reconciler = Reconciler(settings, s3_client=s3_client)
    token = settings.token_source()
    protected = settings.token_configured

    def require_token(request: Request) -> None:
        if not protected:
            return
        current = token.current()  # follows a rotated token file
        if not current or not bearer_matches(request, current):
            raise ServiceError(401, "needs 'Authorization: Bearer <token>'", "unauthorized",
                               {"WWW-Authenticate": "Bearer"})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await reconciler.start()
        try:
            yield
        finally:
            await reconciler.stop()

    # PUT /v1/desired: no Content-Type means JSON, other non-JSON types are a 415 (loramux.http).
    app = FastAPI(title="loramux-sync", lifespan=lifespan, strict_content_type=False,
                  dependencies=[Depends(require_json_body)])
    app.state.reconciler = reconciler
    auth = [Depends(require_token)]

    install_error_handlers(app, log)

    @app.put("/v1/desired", status_code=202, dependencies=auth)
    async def put_desired(body: DesiredState) -> Any:
        reconciler.set_desired(body)
        return {"accepted": len(body.adapters)}

    @app.get("/v1/desired", dependencies=auth)
    async def get_desired() -> Any:
        # Credentials are masked: this endpoint is for looking, not for copying secrets.
        body: dict[str, Any] = {
            "adapters": [e.public_view() for e in reconciler.desired.values()]}
        peers = reconciler.desired_peers
        if peers is not None:  # the placement table: its size and fingerprint, not its rows
            body["peers"] = {"tenants": len(peers.tenants),
                             "fingerprint": reconciler.desired_peers_fingerprint,
                             "server_fingerprint": reconciler.peers_fingerprint}
        return body

    @app.get("/v1/state", dependencies=auth)
    async def get_state() -> Any:
        return reconciler.state().model_dump(mode="json")

    @app.get("/healthz")
    async def healthz() -> Any:
        if not reconciler.loop_running:
            return error_response(503, "loop_down", "the reconcile loop is not running")
        return {"status": "ok", "server_reachable": reconciler.server_reachable}

    @app.get("/readyz")
    async def readyz() -> Any:
        if not reconciler.loop_running:
            return error_response(503, "loop_down", "the reconcile loop is not running")
        ready, body = reconciler.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(reconciler.metrics.registry),
                        media_type=CONTENT_TYPE_LATEST)

    return app


__all__ = ["create_app"]
