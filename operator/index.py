"""The LoraAdapters and pods a pass decides from, kept current by kopf's watch streams.

A pass needs every LoraAdapter and every pod of the watched namespace(s): a pod's desired
set aggregates all adapters of its pool. Listing both from the API server on every pass
costs O(world) per pass on the server and in the operator; with 1,000 LoraAdapters a
change to one of them would re-read all 1,000. Instead, kopf already streams both kinds
(it watches LoraAdapters for its handlers and pods for ``pod_event``): its event handlers
feed this index, and a pass reads the index.

A full list still happens:

- on the first pass (nothing watched yet; kopf's initial listing races with it);
- every ``relist_seconds`` (a safety net like client-go's informer resync: a watch stream
  that silently lost events cannot leave a pass blind for longer than that);
- whenever nothing feeds the index (the :class:`Reconciler` used without kopf, as in unit
  tests and ``bench_control_plane``'s pass worker).

Ordering: each object carries ``metadata.resourceVersion``. Kubernetes documents it as
opaque, but every server in practice (etcd revisions; the test emulator) hands out
increasing integers, so when both versions parse as integers a stale event (older than what
the index holds) is ignored. Events received while a list is in flight are re-applied on
top of the list's snapshot, so the list cannot undo them. The operator's own status patches
return the new object, which is applied at once: the next pass sees the placements it just
wrote even before the watch event arrives.

Hand-written rather than kubernetes' ``informer``/``watch`` helpers because kopf already
owns the watch connections (and their reconnects and backoff); a second set would double
the API server's watch load.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["adapter", "pod"]
Key = tuple[str, str]


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _rv(obj: Mapping[str, Any]) -> int | None:
    raw = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


@dataclass
class IndexStats:
    lists: int = 0  # full lists of both kinds
    events: int = 0  # watch events applied
    stale: int = 0  # watch events ignored as older than what the index held


class WatchIndex:
    """LoraAdapters and pods by (namespace, name), fed by watch events and full lists."""

    def __init__(self, relist_seconds: float = 300.0) -> None:
        self.relist_seconds = relist_seconds
        self.watching = False  # set by the kopf handlers once they feed the index
        self.listed_at: float | None = None  # time.monotonic() of the last full list
        self.stats = IndexStats()
        self._objects: dict[Kind, dict[Key, dict[str, Any]]] = {"adapter": {}, "pod": {}}
        self._pending: list[tuple[Kind, str | None, dict[str, Any]]] | None = None

    # ------------------------------------------------------------------ feeding
    def apply(self, kind: Kind, event_type: str | None, obj: Mapping[str, Any]) -> None:
        """One watch event (``ADDED`` / ``MODIFIED`` / ``DELETED``; kopf's initial listing
        has type ``None``), or an object the operator just wrote."""
        if self._pending is not None:
            self._pending.append((kind, event_type, dict(obj)))
        self._apply(kind, event_type, obj)

    def _apply(self, kind: Kind, event_type: str | None, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        if not key[1]:
            return
        store = self._objects[kind]
        held = store.get(key)
        new_rv, old_rv = _rv(obj), (_rv(held) if held is not None else None)
        if event_type == "DELETED":
            if held is None or new_rv is None or old_rv is None or new_rv >= old_rv:
                store.pop(key, None)
                self.stats.events += 1
            else:
                self.stats.stale += 1
            return
        if new_rv is not None and old_rv is not None and new_rv < old_rv:
            self.stats.stale += 1
            return
        store[key] = dict(obj)
        self.stats.events += 1

    def begin_list(self) -> None:
        """A full list starts: events from now on are replayed over its result."""
        self._pending = []

    def abort_list(self) -> None:
        self._pending = None

    def replace(self, adapters: Iterable[Mapping[str, Any]],
                pods: Iterable[Mapping[str, Any]]) -> None:
        """The result of a full list (started with :meth:`begin_list`)."""
        pending, self._pending = self._pending or [], None
        self._objects = {"adapter": {_key(o): dict(o) for o in adapters},
                         "pod": {_key(o): dict(o) for o in pods}}
        for kind, event_type, obj in pending:
            self._apply(kind, event_type, obj)
        self.listed_at = time.monotonic()
        self.stats.lists += 1

    # ------------------------------------------------------------------ reading
    def fresh(self, now: float | None = None) -> bool:
        """Whether a pass may read the index instead of listing."""
        if not self.watching or self.listed_at is None:
            return False
        now = time.monotonic() if now is None else now
        return now - self.listed_at < self.relist_seconds

    def adapters(self) -> list[dict[str, Any]]:
        return list(self._objects["adapter"].values())

    def pods(self) -> list[dict[str, Any]]:
        return list(self._objects["pod"].values())
