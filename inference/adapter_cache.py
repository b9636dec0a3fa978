"""The adapter registry and its three tiers: device (in the model), host (RAM), disk (source).

Every adapter version the server knows is an :class:`AdapterEntry`. Its weights may sit in
up to three places:

- **device**: injected into the model as a LoRA slot, usable by the next forward pass;
  bounded by a slot count and a byte budget, LRU, pinned entries never leave;
- **host**: validated tensors in CPU memory, so promotion to the device is a copy, not a
  file read and re-validation; bounded by a byte budget, LRU;
- **disk**: the source directory, always there.

Rules:
- an entry with in-flight requests (``refcount > 0``) is never evicted from the device;
- disk reads and validation run in a loader thread, never on the engine thread;
- the model is only ever changed on the engine thread (``ensure_on_device``, ``finish_evict``).

The cache knows versions, not tenants: which version a tenant's requests get (the active
version, the unknown-tenant policy) is :class:`~.tenants.TenantDirectory`'s decision. The
directory registers, activates and evicts through the cache and takes a request's reference
with :meth:`AdapterCache.acquire` on the entry it resolved.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

import torch

from loramux.contracts import STATS_BUCKETS, AdapterState, AdapterView, Residency, VersionStats
from loramux.names import AdapterRef

from .adapters import AdapterRejected, BaseFacts, DiskStamp, HostAdapter, read_adapter
from .lora_backend import LoraBackend
from .metrics import Metrics

log = logging.getLogger("loramux.cache")


class UnknownAdapter(LookupError):
    """No servable adapter answers to the reference (HTTP 404)."""


class AdapterUnavailable(RuntimeError):
    """The adapter exists but cannot serve: failed to load, or being evicted (HTTP 503)."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class AdapterConflict(RuntimeError):
    """A registration contradicts what is resident (HTTP 409)."""


class Prepared(StrEnum):
    READY = "ready"
    WAIT = "wait"
    FAILED = "failed"


class OutcomeCounts:
    """One version's finished requests, errors and latency histograms on this server (the
    wire form is :class:`~loramux.contracts.VersionStats`; a canary analysis reads it).
    Written by the engine thread, read by the API: a lock keeps a report consistent."""

    __slots__ = ("_lock", "errors", "latency", "requests", "ttft")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.ttft = [0] * (len(STATS_BUCKETS) + 1)
        self.latency = [0] * (len(STATS_BUCKETS) + 1)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft[bisect.bisect_left(STATS_BUCKETS, seconds)] += 1

    def finished(self, seconds: float | None, *, error: bool) -> None:
        with self._lock:
            self.requests += 1
            if error:
                self.errors += 1
            if seconds is not None:
                self.latency[bisect.bisect_left(STATS_BUCKETS, seconds)] += 1

    def view(self) -> VersionStats:
        with self._lock:
            return VersionStats(requests=self.requests, errors=self.errors,
                                ttft=list(self.ttft), latency=list(self.latency))


@dataclass(eq=False)
class AdapterEntry:
    ref: AdapterRef
    path: Path
    pinned: bool = False
    state: AdapterState = AdapterState.LOADING
    reason: str | None = None
    reason_code: str | None = None
    host: HostAdapter | None = None
    slot: str | None = None
    nbytes: int = 0
    rank: int = 0
    refcount: int = 0
    hits: int = 0
    registered_at: float = field(default_factory=time.time)
    last_used: float = 0.0
    disk_load_seconds: float | None = None
    host_to_device_seconds: float | None = None
    loading: concurrent.futures.Future | None = None
    evicted: concurrent.futures.Future | None = None
    merged: bool = False
    miss_counted: bool = False
    stamp: DiskStamp | None = None  # the files as first read; re-reads must find them
    outcomes: OutcomeCounts = field(default_factory=OutcomeCounts)

    @property
    def residency(self) -> Residency:
        if self.slot is not None or self.merged:
            return Residency.DEVICE
        if self.host is not None:
            return Residency.HOST
        return Residency.DISK

    def view(self, *, active: bool, weight: int | None = None) -> AdapterView:
        """This version as ``GET /admin/adapters`` lists it (``active`` and a canary's
        ``weight`` are the directory's)."""
        return AdapterView(
            tenant=self.ref.tenant, version=self.ref.version, state=self.state,
            reason=self.reason, reason_code=self.reason_code, residency=self.residency,
            pinned=self.pinned, active=active, bytes=self.nbytes, rank=self.rank,
            in_flight=self.refcount, hits=self.hits, last_used=self.last_used or None,
            path=str(self.path), merged=self.merged, disk_load_seconds=self.disk_load_seconds,
            host_to_device_seconds=self.host_to_device_seconds, weight=weight,
            stats=self.outcomes.view(),
        )


class Registration(NamedTuple):
    """What :meth:`AdapterCache.register` started: the load's future (it gives the entry),
    and whether the version is new (``False``: it was already registered)."""

    future: concurrent.futures.Future
    created: bool


class AdapterCache:
    def __init__(
        self,
        base: BaseFacts,
        backend: LoraBackend,
        metrics: Metrics,
        *,
        device_slots: int,
        device_bytes: int,
        host_bytes: int,
        max_rank: int,
        allow_pickle: bool = False,
        loader_threads: int = 2,
    ) -> None:
        self._base = base
        self._backend = backend
        self._metrics = metrics
        self.device_slots = device_slots
        self.device_bytes = device_bytes
        self.host_bytes = host_bytes
        self.max_rank = max_rank
        self.allow_pickle = allow_pickle
        self._lock = threading.RLock()
        self._entries: dict[AdapterRef, AdapterEntry] = {}
        self._device_lru: dict[AdapterRef, None] = {}  # insertion order = LRU order
        # ref -> bytes of its host copy, LRU order; _host_used is their sum, so a budget
        # check is O(1) and the work of the per-request paths does not grow with tenants.
        self._host_lru: dict[AdapterRef, int] = {}
        self._host_used = 0
        # Pinned registered refs, and each ref's place in registration order (the order
        # promote_pinned walks them): the per-step pass looks at pinned entries only.
        self._pinned: set[AdapterRef] = set()
        self._order: dict[AdapterRef, int] = {}
        self._order_ids = itertools.count()
        self._slot_ids = itertools.count(1)
        # Loader threads run small torch ops (validation) single-threaded: every thread that
        # opens its own OpenMP team slows the engine's forward passes ~2x on a small CPU
        # (bench/repro_openmp_threads.py).
        self._pool = concurrent.futures.ThreadPoolExecutor(
            loader_threads, thread_name_prefix="adapter-loader",
            initializer=torch.set_num_threads, initargs=(1,),
        )
        # Called (from any thread) when something the engine waits on has changed.
        self.on_change: Callable[[], None] = lambda: None
        # Runs a function on the engine thread; set by the engine.
        self.run_on_engine: Callable[[Callable[[], object]], concurrent.futures.Future] = (
            _run_inline
        )

    # ------------------------------------------------------------------ registration
    def register(self, ref: AdapterRef, path: Path, *, pinned: bool = False) -> Registration:
        """Register a version and start reading it from disk (a version already registered
        from the same path only gets its pinning updated; a failed one is read again)."""
        with self._lock:
            entry = self._entries.get(ref)
            if entry is not None and entry.state == AdapterState.DRAINING:
                raise AdapterConflict(f"{ref} is being evicted; retry once it is gone")
            if entry is not None and entry.state != AdapterState.FAILED:
                if Path(path).resolve() != entry.path.resolve():
                    raise AdapterConflict(
                        f"{ref} is already loaded from {entry.path}; versions are immutable, "
                        "publish a new version instead"
                    )
                entry.pinned = pinned  # a PUT states the version's pinning, both ways
                self._track_pinned(entry)
                if not pinned:
                    self._enforce_host_budget(keep=None)
                if entry.loading is not None:
                    return Registration(entry.loading, False)
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(entry)
                return Registration(done, False)
            if entry is not None:  # a failed version read again: forget the old entry
                entry.host = None
                self._host_pop(ref)
                self._device_lru.pop(ref, None)  # a failed entry holds no slot
            entry = AdapterEntry(ref=ref, path=Path(path), pinned=pinned)
            self._add_entry(entry)
            return Registration(self._start_disk_load(entry), True)

    def register_merged(self, ref: AdapterRef, nbytes: int, rank: int) -> AdapterEntry:
        """An adapter already merged into the base weights (merge mode): always resident."""
        with self._lock:
            entry = AdapterEntry(ref=ref, path=Path("."), pinned=True, state=AdapterState.READY,
                                 nbytes=nbytes, rank=rank, merged=True)
            self._add_entry(entry)
            return entry

    def _add_entry(self, entry: AdapterEntry) -> None:
        """Register ``entry`` as its ref's entry (a ref already there keeps its place in
        registration order, as a dict key does). Lock held."""
        self._entries[entry.ref] = entry
        self._order.setdefault(entry.ref, next(self._order_ids))
        self._track_pinned(entry)

    def _track_pinned(self, entry: AdapterEntry) -> None:
        if entry.pinned:
            self._pinned.add(entry.ref)
        else:
            self._pinned.discard(entry.ref)

    def _host_put(self, entry: AdapterEntry) -> None:
        """``entry``'s host copy is the most recently used one. Lock held."""
        self._host_pop(entry.ref)
        self._host_lru[entry.ref] = entry.nbytes
        self._host_used += entry.nbytes

    def _host_pop(self, ref: AdapterRef) -> None:
        nbytes = self._host_lru.pop(ref, None)
        if nbytes is not None:
            self._host_used -= nbytes

    def _start_disk_load(self, entry: AdapterEntry) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        entry.loading = future

        def load() -> None:
            try:
                read()
            except BaseException as exc:  # never leave a waiter (a PUT) hanging
                log.exception("adapter loader crashed", extra={"adapter": str(entry.ref)})
                with self._lock:
                    if entry.loading is future:
                        entry.loading = None
                if not future.done():
                    future.set_exception(AdapterRejected("load_error", repr(exc)))
                self.on_change()

        def read() -> None:
            started = time.perf_counter()
            try:
                # A re-read (the host copy was dropped) must find the files read the first
                # time: changed or deleted ones fail this version alone.
                host = read_adapter(entry.path, self._base, self.max_rank, self.allow_pickle,
                                    expect=entry.stamp)
                if host.nbytes > self.device_bytes:
                    raise AdapterRejected(
                        "too_large",
                        f"adapter is {host.nbytes} bytes, above the device tier budget of "
                        f"{self.device_bytes} bytes",
                    )
            except AdapterRejected as exc:
                self._fail(entry, exc.code, exc.message)
                future.set_exception(exc)
                return
            except Exception as exc:  # an unexpected reader failure must still fail alone
                log.exception("adapter load crashed", extra={"adapter": str(entry.ref)})
                self._fail(entry, "load_error", f"{type(exc).__name__}: {exc}")
                future.set_exception(AdapterRejected("load_error", str(exc)))
                return
            seconds = time.perf_counter() - started
            with self._lock:
                entry.loading = None
                if not self._registered(entry):
                    # Evicted while it was being read: its weights go nowhere, and whoever
                    # waits on the load hears so (a PUT answers 409, never hangs).
                    gone = AdapterUnavailable(f"{entry.ref} was evicted while loading",
                                              retryable=True)
                else:
                    gone = None
                    entry.host = host
                    if entry.stamp is None:
                        entry.stamp = host.stamp
                    entry.nbytes = host.nbytes
                    entry.rank = host.rank
                    entry.disk_load_seconds = seconds
                    if entry.state == AdapterState.LOADING:
                        entry.state = AdapterState.READY
                        entry.reason = entry.reason_code = None
                    self._host_put(entry)
                    self._enforce_host_budget(keep=entry.ref)
                    self._update_gauges()
            if gone is not None:
                future.set_exception(gone)
                self.on_change()
                return
            self._metrics.adapter_load_seconds.labels("disk", "host").observe(seconds)
            log.info(
                "adapter read from disk",
                extra={"tenant": entry.ref.tenant, "version": entry.ref.version,
                       "bytes": host.nbytes, "rank": host.rank, "seconds": round(seconds, 4)},
            )
            future.set_result(entry)
            self.on_change()

        self._pool.submit(load)
        return future

    def _registered(self, entry: AdapterEntry) -> bool:
        """Whether ``entry`` is still the registered entry of its version. Lock held."""
        return self._entries.get(entry.ref) is entry

    def _fail(self, entry: AdapterEntry, code: str, message: str) -> None:
        with self._lock:
            entry.loading = None
            if entry.state != AdapterState.DRAINING:
                entry.state = AdapterState.FAILED
            entry.reason, entry.reason_code = message, code
        self._metrics.adapter_load_failures.labels(code).inc()
        log.warning(
            "adapter rejected",
            extra={"tenant": entry.ref.tenant, "version": entry.ref.version,
                   "reason": code, "detail": message},
        )
        self.on_change()

    # ------------------------------------------------------------------ lookups
    def get(self, ref: AdapterRef) -> AdapterEntry | None:
        with self._lock:
            return self._entries.get(ref)

    def acquire(self, entry: AdapterEntry) -> AdapterEntry:
        """Take a reference on ``entry`` for one request; ``release`` must follow. A failed
        or draining version takes no new requests."""
        with self._lock:
            if entry.state == AdapterState.FAILED:
                raise AdapterUnavailable(f"adapter {entry.ref} failed to load: {entry.reason}")
            if entry.state == AdapterState.DRAINING:
                raise AdapterUnavailable(f"adapter {entry.ref} is being evicted", retryable=True)
            entry.refcount += 1
            entry.hits += 1
            entry.last_used = time.time()
            return entry

    def release(self, entry: AdapterEntry) -> None:
        with self._lock:
            entry.refcount -= 1
            finish = entry.state == AdapterState.DRAINING and entry.refcount == 0
            if entry.refcount == 0 and self._registered(entry):
                # A host copy kept over budget for this entry's waiting requests may go now.
                self._enforce_host_budget(keep=None)
        if finish:
            self.run_on_engine(lambda: self._finish_evict(entry))
        self.on_change()

    def entries(self) -> list[AdapterEntry]:
        with self._lock:
            return list(self._entries.values())

    def consistency_problems(self) -> list[str]:
        """What is wrong with the cache's bookkeeping (empty: nothing). For tests and
        debugging: the LRU dicts match the entries' tiers, budgets hold, counts are sane."""
        problems: list[str] = []
        with self._lock:
            for ref, entry in self._entries.items():
                if entry.ref != ref:
                    problems.append(f"{ref}: entry is for {entry.ref}")
                if entry.refcount < 0:
                    problems.append(f"{ref}: refcount {entry.refcount}")
                if (entry.slot is not None) != (ref in self._device_lru):
                    problems.append(f"{ref}: slot {entry.slot} vs device LRU")
                if (entry.host is not None) != (ref in self._host_lru):
                    problems.append(f"{ref}: host copy vs host LRU")
            for name, lru in (("device", self._device_lru), ("host", self._host_lru)):
                problems += [f"{ref}: in the {name} LRU, not registered"
                             for ref in lru if ref not in self._entries]
            device = [self._entries[r] for r in self._device_lru if r in self._entries]
            if len(device) > self.device_slots:
                problems.append(f"{len(device)} adapters on {self.device_slots} device slots")
            if sum(e.nbytes for e in device) > self.device_bytes:
                problems.append("device byte budget exceeded")
            host = [self._entries[r] for r in self._host_lru if r in self._entries]
            if self._host_used != sum(self._host_lru.values()):
                problems.append(f"host bytes counted {self._host_used}, "
                                f"held {sum(self._host_lru.values())}")
            if any(self._host_lru[e.ref] != e.nbytes for e in host):
                problems.append("a host copy's counted bytes differ from its entry's")
            pinned = {ref for ref, e in self._entries.items() if e.pinned}
            if pinned != self._pinned:
                problems.append(f"pinned set {sorted(map(str, self._pinned))} vs entries "
                                f"{sorted(map(str, pinned))}")
            if set(self._order) != set(self._entries):
                problems.append("registration order does not match the entries")
            # Only the newest host copy and copies that waiting requests need may exceed it.
            droppable = [e for e in host[:-1]
                         if not (e.slot is None and (e.refcount > 0 or e.pinned))]
            used = sum(e.nbytes for e in host)
            if used > self.host_bytes and droppable:
                problems.append(f"host budget exceeded: {used} > {self.host_bytes} bytes with "
                                f"{[str(e.ref) for e in droppable]} droppable")
        return problems

    def pinned_resident(self) -> tuple[bool, list[str]]:
        with self._lock:
            missing = [str(e.ref) for e in self._entries.values()
                       if e.pinned and e.residency != Residency.DEVICE]
            return not missing, missing

    # ------------------------------------------------------------------ engine thread only
    def prepare(self, entry: AdapterEntry) -> Prepared:
        """Make ``entry`` usable by the next forward pass if possible (engine thread only)."""
        with self._lock:
            if entry.merged:
                return Prepared.READY
            if not self._registered(entry):
                # Evicted (a pinning PUT raced a DELETE): nothing to bring back.
                return Prepared.FAILED
            if entry.slot is not None:
                self._device_lru.pop(entry.ref, None)
                self._device_lru[entry.ref] = None
                self._metrics.cache_hits.labels("device").inc()
                return Prepared.READY
            if entry.state == AdapterState.FAILED:
                return Prepared.FAILED
            if entry.host is None:
                if entry.loading is None:
                    self._start_miss_load(entry)
                return Prepared.WAIT
            if not self._make_device_room(entry.nbytes):
                return Prepared.WAIT
            host = entry.host
            slot = f"lmx{next(self._slot_ids)}"
        started = time.perf_counter()
        try:
            self._backend.add(slot, host)
        except Exception as exc:
            log.exception("adapter injection failed", extra={"adapter": str(entry.ref)})
            self._fail(entry, "inject_failed", f"{type(exc).__name__}: {exc}")
            return Prepared.FAILED
        seconds = time.perf_counter() - started
        with self._lock:
            entry.slot = slot
            entry.host_to_device_seconds = seconds
            self._device_lru[entry.ref] = None
            self._host_pop(entry.ref)
            if entry.host is not None:  # a loader may have dropped it meanwhile
                self._host_put(entry)
            self._enforce_host_budget(keep=None)
            if entry.miss_counted:
                entry.miss_counted = False
            else:
                self._metrics.cache_misses.labels("device").inc()
                self._metrics.cache_hits.labels("host").inc()
            self._update_gauges()
        self._metrics.adapter_load_seconds.labels("host", "device").observe(seconds)
        log.info(
            "adapter moved to device",
            extra={"tenant": entry.ref.tenant, "version": entry.ref.version,
                   "seconds": round(seconds, 5)},
        )
        return Prepared.READY

    def _lru_entries(self, lru: dict[AdapterRef, None] | dict[AdapterRef, int]
                     ) -> list[AdapterEntry]:
        """The entries of an LRU dict, least recently used first. Lock held. Every removal
        from ``_entries`` also removes the ref from both LRU dicts; a ref without an entry
        would be a bug, so it is dropped (and logged), never a KeyError."""
        found: list[AdapterEntry] = []
        for ref in list(lru):
            entry = self._entries.get(ref)
            if entry is None:
                log.error("cache LRU held an unregistered adapter", extra={"adapter": str(ref)})
                if lru is self._host_lru:
                    self._host_pop(ref)
                else:
                    lru.pop(ref, None)
                continue
            found.append(entry)
        return found

    def _device_usage(self) -> tuple[int, int]:
        on_device = self._lru_entries(self._device_lru)
        return len(on_device), sum(e.nbytes for e in on_device)

    def _start_miss_load(self, entry: AdapterEntry) -> None:
        """A lookup that found the adapter on neither the device nor the host: counted once
        (a device miss and a host miss now; the promotion after the disk read is not a
        second lookup), and its disk read started on a loader thread. Lock held."""
        self._metrics.cache_misses.labels("device").inc()
        self._metrics.cache_misses.labels("host").inc()
        entry.miss_counted = True
        self._start_disk_load(entry)

    def prefetch(self, entry: AdapterEntry) -> None:
        """Bring a *waiting* request's adapter toward the device before its turn, never at
        anyone's expense (engine thread only): its disk read starts on a loader thread,
        overlapping the forward passes, and once it is on the host it goes onto the device
        only into a free slot (nothing is evicted for it). Its turn then finds it ready."""
        with self._lock:
            if (entry.merged or entry.slot is not None or entry.state == AdapterState.FAILED
                    or not self._registered(entry)):
                return
            if entry.host is None:
                if entry.loading is None:
                    self._start_miss_load(entry)
                return
            count, used = self._device_usage()
            if count >= self.device_slots or used + entry.nbytes > self.device_bytes:
                return
        self.prepare(entry)  # room without eviction: prepare puts it on the device

    def _make_device_room(self, nbytes: int) -> bool:
        """Evict unpinned, idle entries (LRU first) until ``nbytes`` fit. Lock held."""
        while True:
            count, used = self._device_usage()
            if count < self.device_slots and used + nbytes <= self.device_bytes:
                return True
            victim = next(
                (e for e in self._lru_entries(self._device_lru)
                 if not e.pinned and e.refcount == 0),
                None,
            )
            if victim is None:
                return False
            self._drop_from_device(victim)

    def _drop_from_device(self, entry: AdapterEntry) -> None:
        if entry.slot is None:
            return
        self._backend.remove(entry.slot)
        entry.slot = None
        self._device_lru.pop(entry.ref, None)
        self._metrics.cache_evictions.labels("device").inc()
        log.info("adapter evicted from device",
                 extra={"tenant": entry.ref.tenant, "version": entry.ref.version})
        self._update_gauges()

    def _enforce_host_budget(self, keep: AdapterRef | None) -> None:
        """Drop host copies (LRU) that are not needed soon. Lock held.

        Walks the host LRU from its least recently used end only as far as it must: O(1)
        when under budget, else the copies dropped plus the ones kept on the way (needed by
        a waiting request, pinned, or ``keep``), never every copy held."""
        if self._host_used <= self.host_bytes:
            return  # the common case: nothing to drop
        used = self._host_used
        victims: list[AdapterEntry] = []
        stale: list[AdapterRef] = []
        for ref, nbytes in self._host_lru.items():
            if used <= self.host_bytes:
                break
            entry = self._entries.get(ref)
            if entry is None:  # a bug (see _lru_entries): dropped, its bytes uncounted
                stale.append(ref)
                used -= nbytes
                continue
            # A host copy that a waiting request is about to promote stays.
            needed = entry.slot is None and (entry.refcount > 0 or entry.pinned)
            if entry.ref == keep or needed:
                continue
            victims.append(entry)
            used -= nbytes
        for ref in stale:
            log.error("cache LRU held an unregistered adapter", extra={"adapter": str(ref)})
            self._host_pop(ref)
        for entry in victims:
            entry.host = None
            self._host_pop(entry.ref)
            self._metrics.cache_evictions.labels("host").inc()

    def promote_pinned(self) -> None:
        """Bring pinned adapters onto the device (engine thread, between steps), in
        registration order. Runs every engine step: it looks at pinned entries only, never
        at every registered one."""
        with self._lock:
            if not self._pinned:
                return
            waiting = [entry for ref in sorted(self._pinned, key=self._order.__getitem__)
                       if (entry := self._entries.get(ref)) is not None
                       and entry.pinned and entry.state == AdapterState.READY
                       and entry.slot is None]
        for entry in waiting:
            self.prepare(entry)

    def per_step_footprint(self) -> dict[str, int]:
        """Sizes of what the engine's per-step pass (:meth:`promote_pinned`) walks, and of
        what a request's end walks in the common case (nothing): for tests."""
        with self._lock:
            return {"registered": len(self._entries), "pinned": len(self._pinned),
                    "device": len(self._device_lru), "host": len(self._host_lru)}

    # ------------------------------------------------------------------ eviction
    def begin_evict(self, ref: AdapterRef) -> concurrent.futures.Future:
        """Stop new requests on ``ref``; remove it once its in-flight requests finish."""
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None:
                raise UnknownAdapter(f"{ref} is not registered")
            if entry.merged:
                raise AdapterConflict(f"{ref} is merged into the base and cannot be evicted")
            if entry.evicted is not None:
                return entry.evicted
            entry.state = AdapterState.DRAINING
            entry.evicted = concurrent.futures.Future()
            idle = entry.refcount == 0
            future = entry.evicted
        log.info("adapter draining", extra={"tenant": ref.tenant, "version": ref.version,
                                            "in_flight": entry.refcount})
        if idle:
            self.run_on_engine(lambda: self._finish_evict(entry))
        return future

    def _finish_evict(self, entry: AdapterEntry) -> None:
        with self._lock:
            if entry.refcount > 0 or entry.evicted is None or entry.evicted.done():
                return
            if not self._registered(entry):  # already removed: just say so
                entry.evicted.set_result(entry)
                return
            self._drop_from_device(entry)
            entry.host = None
            self._host_pop(entry.ref)
            self._device_lru.pop(entry.ref, None)
            self._entries.pop(entry.ref, None)
            self._order.pop(entry.ref, None)
            self._pinned.discard(entry.ref)
            self._update_gauges()
        log.info("adapter evicted",
                 extra={"tenant": entry.ref.tenant, "version": entry.ref.version})
        entry.evicted.set_result(entry)

    def _update_gauges(self) -> None:
        device = self._lru_entries(self._device_lru)  # at most device_slots
        self._metrics.resident_adapters.labels("device").set(len(device))
        self._metrics.resident_bytes.labels("device").set(sum(e.nbytes for e in device))
        self._metrics.set_device_tenants(e.ref.tenant for e in device)
        # The host tier may hold every registered adapter: counted, not walked.
        self._metrics.resident_adapters.labels("host").set(len(self._host_lru))
        self._metrics.resident_bytes.labels("host").set(self._host_used)
        self._metrics.resident_adapters.labels("disk").set(len(self._entries))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _run_inline(fn: Callable[[], object]) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
    return future
