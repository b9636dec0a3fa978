"""kopf handlers of the loramux operator.

Run with ``loramux operator`` (recommended) or ``kopf run -m loramux.operator.handlers``
(settings then come from ``LORAMUX_OPERATOR_*`` only).

Every handler funnels into one serialized, debounced "reconcile everything" pass
(:mod:`loramux.operator.reconcile`), because a pod's desired set aggregates all adapters:

- create / update / resume of a LoraAdapter: run a pass and wait for it;
- delete: the adapter carries the finalizer ``loramux.io/finalizer``; the pass leaves it out
  of every desired set, and the handler retries until each live pod of its pool reports it
  gone (or ``delete_timeout_seconds`` passed, then a Warning event and the finalizer goes);
- pod events in a known pool: a pass, so a new or restarted pod gets its set re-sent;
- the resync timer inside the reconcile loop: drift is corrected every ``resync_seconds``.

Every LoraAdapter and pod event also feeds the reconciler's index (operator/index.py), so a
pass reads what the watches delivered instead of listing the world again; a full list runs
only at start and every ``relist_seconds``.

Permanent problems (bad spec, duplicate tenant, base model mismatch) end as a condition and
an Event, and are not retried; transient ones (API or pods unreachable) are retried.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

import kopf

from loramux.operator.model import GROUP, PLURAL, VERSION, parse_adapter
from loramux.operator.reconcile import Reconciler
from loramux.operator.settings import OperatorSettings

FINALIZER = "loramux.io/finalizer"
log = logging.getLogger("loramux.operator")

_configured: OperatorSettings | None = None
_reconciler: Reconciler | None = None


def configure(settings: OperatorSettings) -> None:
    """Settings for the next operator start (``loramux operator`` calls this)."""
    global _configured
    _configured = settings


def reconciler() -> Reconciler:
    if _reconciler is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _reconciler


def apply_kopf_settings(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """kopf keeps its bookkeeping in annotations, so ``status`` holds only our fields."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.networking.request_timeout = max(30.0, ours.request_timeout_seconds * 3)
    settings.batching.error_delays = (1, 2, 5, 10, 20, 30, 60)
    settings.peering.lifetime = ours.peering_lifetime_seconds
    if ours.namespace is not None:
        # A namespaced Role cannot list CRDs or namespaces; the resources are known anyway.
        settings.scanning.disabled = True


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _reconciler
    ours = _configured if _configured is not None else OperatorSettings()
    apply_kopf_settings(settings, ours)
    _reconciler = Reconciler(ours)
    await _reconciler.start()
    log.info("loramux operator started (namespace=%s, resync=%ss)",
             ours.namespace or "<all>", ours.resync_seconds)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    global _reconciler
    if _reconciler is not None:
        await _reconciler.stop()
        _reconciler = None


@kopf.on.probe(id="lastReconcile")
def last_reconcile(**_: Any) -> Any:
    rec = _reconciler
    if rec is None or rec.last_ok is None:
        return None
    return round(time.time() - rec.last_ok, 1)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def adapter_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Every LoraAdapter event keeps the reconciler's index current (no pass by itself:
    the change handlers below ask for one when the spec changed)."""
    rec = _reconciler
    if rec is not None:
        rec.index.apply("adapter", type, body)
        rec.index.watching = True


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def adapter_changed(body: kopf.Body, **_: Any) -> None:
    rec = reconciler()
    rec.index.apply("adapter", "MODIFIED", body)
    result = await rec.reconcile_now()
    if not result.ok:
        raise kopf.TemporaryError(f"reconcile pass failed: {result.error}", delay=5)
    # Permanent problems are in the status (Validated=False) and an Event: no retry.


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def adapter_deleted(body: kopf.Body, started: dt.datetime, **_: Any) -> None:
    rec = reconciler()
    spec = parse_adapter(body, max_dedicated_replicas=rec.settings.max_dedicated_replicas)
    result = await rec.reconcile_now()
    if not result.ok:
        raise kopf.TemporaryError(f"reconcile pass failed: {result.error}", delay=5)
    pending = rec.eviction_pending(spec, result)
    if not pending:
        kopf.info(body, reason="Evicted",
                  message=f"{spec.tenant}@{spec.version} removed from every pod")
        return
    elapsed = (dt.datetime.now(dt.UTC) - _aware(started)).total_seconds()
    if elapsed > rec.settings.delete_timeout_seconds:
        kopf.warn(body, reason="EvictionTimeout",
                  message=f"gave up waiting after {elapsed:.0f}s: {'; '.join(pending)[:800]}")
        return
    raise kopf.TemporaryError(f"waiting for eviction: {'; '.join(pending)[:500]}", delay=2)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@kopf.on.event("", "v1", "pods")
async def pod_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    rec = _reconciler
    if rec is None:
        return
    rec.index.apply("pod", type, body)
    rec.index.watching = True
    if rec.pod_is_relevant(body):
        rec.trigger()
