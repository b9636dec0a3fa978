"""The engine: the one owner of the model, running continuous batching on its own thread.

HTTP handlers call :meth:`Engine.submit` and read events from the sequence's queue. The
engine thread loops:

1. run queued commands (adapter promotions, evictions) between forward passes;
2. drop cancelled and timed-out sequences, freeing their rows;
3. admit waiting sequences whose adapter is on the device, up to the batch limit, in the
   order of the :class:`~.fairness.FairQueue`: the backlogged tenant with the least weighted
   token service goes next (``admission="fair"``, VTC; see fairness.py for the bound it
   keeps), or arrival order (``"fifo"``). A sequence whose adapter is still loading stays
   waiting and does not hold up anyone else;
4. prefill the admitted prompts in one forward pass and splice them into the running batch;
   while rows decode, a group of more than ``prefill_chunk_tokens`` padded prompt tokens
   is prefilled that many per step instead (a chunk, then step 5), and requests that fit
   in half the budget are prefilled beside it, so a long prompt stalls nobody for long;
5. decode one token for every running sequence, whatever its tenant, in one forward pass.

Each row carries its own adapter slot; there is no model-wide active adapter and no lock
around the forward pass. The running batch is left-padded: each row has its own position
ids and attention mask, and the KV cache is re-packed when rows join or leave.

One request never takes the others down. Sampling never raises (a row whose logits are not
finite, or whose own sampling fails, ends alone with an error event); a prefill that raises
is retried row by row, so only the rows that fail alone get an error (an out-of-memory of
the whole group costs nobody); a decode step that raises is undone (the KV cache is
restored), each row is tried alone to find the culprits, they end with an error and the
step runs again without them. Only a failure that no single row explains fails the batch.

Liveness is progress: :attr:`Engine.last_progress` is the end of the last loop iteration,
and :meth:`Engine.stalled_for` says how long the engine has not advanced while work is
waiting or running (the health routes turn that into 503s). If the thread dies, every row
and queued request ends with a 503 at once.

Per-tenant limits (:class:`~.fairness.TenantPolicy`: requests waiting or running, requests
waiting, prompt+generated tokens per 60 s) are checked in :meth:`Engine.submit`, before the
global queue bound; a refusal is :class:`~.fairness.TenantLimited`. Every way a sequence ends
(finish, error, cancel, timeout, engine death) releases its counts, in ``_unqueue`` (it left
the waiting queue) and ``_end_sequence`` (it ended).

A bound on the wait for a row (``max_queue_wait_s``, off by default) keeps time to first
token low under overload by refusing early what would wait too long. :meth:`Engine.submit`
estimates the new request's wait from the requests ahead of it (under fair admission, about
one round of the backlogged tenants per request of its own tenant already waiting) and the
admissions of the recent past, and refuses it at once (:class:`Overloaded`, 429 with
``Retry-After``) if the estimate exceeds the bound; a request that still waits longer (the
estimate was wrong) is ended with a 429 when it does. Neither counts against its adapter
version's health: overload is not the adapter's fault.

``LORAMUX_TEST_FAULTS`` (tests only) injects faults for chosen tenants; see
:func:`parse_faults`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .adapter_cache import AdapterCache, AdapterEntry, Prepared
from .fairness import FairQueue, TenantLimited, TenantPolicy
from .lora_backend import LoraBackend
from .metrics import BASE_LABEL, Metrics
from .sampling import (
    IncrementalDetokenizer,
    RowError,
    RowSampler,
    SamplingParams,
    StopTextTracker,
    sample_rows,
)

log = logging.getLogger("loramux.engine")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def confine_torch_threads() -> None:
    """Keep the calling thread's torch ops single-threaded.

    libgomp gives every thread that runs a parallel torch op its own OpenMP team; once it
    manages more threads than there are CPUs it stops spinning between parallel regions and
    small ops pay a futex wake-up each: decode steps ran ~2x slower on the engine thread
    than the same steps on a lone main thread. So only the engine thread runs torch with all
    cores. (bench/repro_openmp_threads.py reproduces it in plain torch.)
    """
    torch.set_num_threads(1)


class QueueFull(RuntimeError):
    """Too many requests wait to join the batch (HTTP 429)."""

    retry_after_s = 1.0


class Overloaded(QueueFull):
    """The new request would wait longer than ``max_queue_wait_s`` for a row (HTTP 429)."""

    def __init__(self, estimate_s: float, limit_s: float) -> None:
        super().__init__(f"a new request would wait about {estimate_s:.1f}s for a row, more "
                         f"than this server's max_queue_wait_s of {limit_s:g}s")
        self.estimate_s = estimate_s
        # the backlog beyond the bound should have drained by then
        self.retry_after_s = min(60.0, max(1.0, estimate_s - limit_s))


class EngineDown(RuntimeError):
    """The engine thread is not running (HTTP 503)."""


class _InjectedDeath(BaseException):
    """Kills the engine thread (fault injection): escapes the loop's ``except Exception``."""


FAULT_KINDS = ("prefill", "batch-prefill-oom", "decode", "sample", "stall", "die")


def parse_faults(spec: str | None) -> dict[str, dict[str, float]]:
    """``LORAMUX_TEST_FAULTS``: ``kind:tenant[:seconds]`` items, comma-separated; for tests.

    ``prefill``/``decode``: a forward pass holding a row of ``tenant`` raises;
    ``batch-prefill-oom``: a prefill of several rows holding one of ``tenant`` raises
    out-of-memory (alone it fits); ``sample``: sampling ``tenant``'s row raises;
    ``stall``: the first forward pass of each ``tenant`` request sleeps ``seconds``;
    ``die``: the engine thread exits at ``tenant``'s first forward pass.
    ``tenant`` may also be ``tenant@version``: the fault hits that version only (a bad canary).
    """
    faults: dict[str, dict[str, float]] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        kind, tenant, *rest = item.strip().split(":")  # tenant: name or name@version
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (one of {FAULT_KINDS})")
        faults.setdefault(tenant, {})[kind] = float(rest[0]) if rest else 0.0
    return faults


@dataclass
class TokenEvent:
    text: str


@dataclass
class FinishEvent:
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    status: int
    reason: str


Event = TokenEvent | FinishEvent | ErrorEvent

_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    entry: AdapterEntry | None
    loop: asyncio.AbstractEventLoop
    timeout_s: float
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    done: bool = False
    admitted: bool = False  # left the waiting queue for a row
    stalled: bool = False  # fault injection: stalled once already
    sampler: RowSampler = field(init=False)
    tracker: StopTextTracker = field(init=False)
    detokenizer: IncrementalDetokenizer = field(init=False)

    def __post_init__(self) -> None:
        self.sampler = RowSampler(self.params)
        self.tracker = StopTextTracker(self.params.stop)

    def attach(self, tokenizer: Any) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer)

    @property
    def tenant_label(self) -> str:
        return self.entry.ref.tenant if self.entry is not None else BASE_LABEL

    def cancel(self) -> None:
        """Called by the HTTP side when the client goes away; the engine frees the row."""
        self.cancelled = True


@dataclass
class _Batch:
    """The running rows: left-padded KV cache, masks and positions, one row per sequence."""

    seqs: list[Sequence]
    cache: Any  # transformers DynamicCache
    mask: torch.Tensor  # [rows, cached_len] 1 = real token
    positions: torch.Tensor  # [rows] position id of the next token
    last_tokens: torch.Tensor  # [rows] token to feed next


TPM_WINDOW_S = 60.0


class _Usage:
    """One tenant's counts for its limits (guarded by the engine's tenant lock)."""

    __slots__ = ("buckets", "in_flight", "tokens", "waiting")

    def __init__(self) -> None:
        self.waiting = 0  # submitted, not admitted
        self.in_flight = 0  # submitted, not ended (waiting or running)
        self.buckets: deque[list[int]] = deque()  # [whole second, tokens], oldest first
        self.tokens = 0  # sum over buckets

    def add(self, now: float, tokens: int) -> None:
        second = int(now)
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += tokens
        else:
            self.buckets.append([second, tokens])
        self.tokens += tokens

    def expire(self, now: float) -> None:
        # A bucket of second s holds tokens of [s, s+1): all older than the window at s+1+60.
        while self.buckets and self.buckets[0][0] + 1 + TPM_WINDOW_S <= now:
            self.tokens -= self.buckets.popleft()[1]

    def below_after(self, now: float, limit: int) -> float:
        """Seconds until fewer than ``limit`` tokens are left in the window."""
        left = self.tokens
        for second, tokens in self.buckets:
            left -= tokens
            if left < limit:
                return second + 1 + TPM_WINDOW_S - now
        return 0.0

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not self.buckets


@dataclass(eq=False)
class _Chunked:
    """An admitted group prefilled a chunk of columns per step, between decode steps, so
    its prompts do not stall the running rows for the whole prefill (``prefill_chunk_tokens``)."""

    seqs: list[Sequence]
    ids: torch.Tensor  # [rows, longest] left-padded prompts
    mask: torch.Tensor  # [rows, longest]
    positions: torch.Tensor  # [rows, longest]
    cache: Any  # transformers DynamicCache, filled up to column ``done``
    done: int = 0


def _pad_left(t: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [amount, 0]
    return F.pad(t, pad)


class Engine:
    def __init__(
        self,
        model_config: Any,
        tokenizer: Any,
        backend: LoraBackend,
        cache: AdapterCache,
        metrics: Metrics,
        *,
        device: str,
        max_batch_size: int,
        max_queue: int,
        max_prefill_tokens: int = 4096,
        prefill_chunk_tokens: int = 512,
        eos_token_ids: set[int] | None = None,
        torch_threads: int | None = None,
        admission: str = "fair",
        prompt_token_cost: float = 1.0,
        output_token_cost: float = 2.0,
        default_policy: TenantPolicy = TenantPolicy(),  # noqa: B008 - frozen, immutable
        prefetch_adapters: bool = False,
        max_queue_wait_s: float | None = None,
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.backend = backend
        self.cache = cache
        self.metrics = metrics
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.eos_token_ids = eos_token_ids or set()
        self.prefetch_adapters = prefetch_adapters
        self.max_queue_wait_s = max_queue_wait_s
        # When recent requests left the waiting queue for a row (the engine thread appends;
        # submit reads a snapshot): the service rate behind the wait estimate.
        self._admitted_at: deque[float] = deque(maxlen=256)
        self._backlogged = 0  # tenants with a request waiting (tenant lock)
        self.torch_threads = torch_threads or available_cpus()
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], concurrent.futures.Future]]
        self._commands = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending = 0  # submitted, not yet admitted
        self._pending_lock = threading.Lock()
        self.admission = admission
        self.default_policy = default_policy
        self._policies: dict[str, TenantPolicy] = {}
        self._usage: dict[str, _Usage] = {}
        self._usage_sweep_at = 64
        self._tenant_lock = threading.Lock()  # policies and usage; taken before _pending_lock
        self._waiting: FairQueue[Sequence] = FairQueue(
            admission,  # type: ignore[arg-type] - FairQueue refuses an unknown mode
            prompt_token_cost=prompt_token_cost, output_token_cost=output_token_cost,
            weight=lambda tenant: self._policy(tenant).weight)
        self._batch: _Batch | None = None
        self._prefilling: list[Sequence] = []  # admitted, being prefilled in this step
        self._chunked: _Chunked | None = None  # admitted, prefilled over several steps
        self.prefill_chunks = 0  # forward passes that prefilled part of a group
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.last_progress = time.monotonic()
        self._faults = parse_faults(os.environ.get("LORAMUX_TEST_FAULTS"))
        if self._faults:
            log.warning("fault injection is on (LORAMUX_TEST_FAULTS); never in production",
                        extra={"faults": self._faults})
        cache.on_change = self.wake
        cache.run_on_engine = self.call

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run ``fn`` on the engine thread between forward passes."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if threading.current_thread() is self._thread:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
            return future
        self._commands.put((fn, future))
        self._wake.set()
        return future

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; raises EngineDown, TenantLimited (a per-tenant limit) or QueueFull
        (the global queue bound, checked last)."""
        if not self.alive:
            raise EngineDown("the engine thread is not running")
        label = seq.tenant_label
        now = time.monotonic()
        with self._tenant_lock:
            policy = self._policy(label)
            usage = self._usage.get(label) or _Usage()
            self._check_limits(label, policy, usage, now)
            if self.max_queue_wait_s is not None:
                wait = self._estimated_wait(usage.waiting, now)
                if wait is not None and wait > self.max_queue_wait_s:
                    self.metrics.requests_shed.labels(label, "estimated_wait").inc()
                    raise Overloaded(wait, self.max_queue_wait_s)
            with self._pending_lock:
                if self._pending >= self.max_queue:
                    raise QueueFull(
                        f"{self._pending} requests already wait (limit {self.max_queue})")
                self._pending += 1
            self._usage[label] = usage
            if usage.waiting == 0:
                self._backlogged += 1
            usage.waiting += 1
            usage.in_flight += 1
            self.metrics.request_started(label)  # loramux_tenant_in_flight, without a walk
            if len(self._usage) > self._usage_sweep_at:
                self._sweep_usage(now)
        seq.attach(self.tokenizer)
        self.metrics.queue_depth.inc()
        self._inbox.put(seq)
        self._wake.set()

    def _estimated_wait(self, own_waiting: int, now: float) -> float | None:
        """Seconds a request submitted now would wait for a row, or None without the
        evidence to say (fewer than 4 admissions at capacity in the window).

        The requests ahead of it: every waiting one under fifo; under fair admission about
        one per backlogged tenant for each request its own tenant already has waiting (a
        tenant with nothing waiting is near the front: its counter starts at the lowest);
        weights are ignored. Free rows take that many at once. The service rate: the
        admissions made at capacity (a full batch, or requests left waiting) in the last
        max(10 s, 2 x the bound). A queue that has stopped moving is the reaper's to bound,
        not the estimate's."""
        pending = self._pending
        if pending == 0 or self.max_queue_wait_s is None:
            return None
        if self.admission == "fifo":
            ahead = pending
        else:
            ahead = min(pending, (own_waiting + 1) * max(1, self._backlogged))
        ahead -= max(0, self.max_batch_size - self.rows_in_use)
        if ahead <= 0:
            return 0.0
        window = max(10.0, 2 * self.max_queue_wait_s)
        times = [t for t in list(self._admitted_at) if now - t <= window]  # list(): atomic
        if len(times) < 4 or times[-1] <= times[0]:
            return None
        rate = (len(times) - 1) / (times[-1] - times[0])
        return ahead / rate

    def set_tenant_policy(self, tenant: str, policy: TenantPolicy | None) -> None:
        """Set ``tenant``'s weight and limits (``None``: back to the default policy). Applies
        to the next submissions and charges; requests already admitted are not touched."""
        with self._tenant_lock:
            if policy is None:
                self._policies.pop(tenant, None)
            else:
                self._policies[tenant] = policy

    def tenant_policy(self, tenant: str) -> TenantPolicy:
        return self._policy(tenant)

    def fairness_view(self) -> dict[str, dict]:
        """Per tenant with state: virtual counter, requests waiting and in flight (waiting or
        running), weight and prompt+generated tokens of the last minute."""
        now = time.monotonic()
        with self._tenant_lock:
            self._sweep_usage(now)
            usage = {t: (u.waiting, u.in_flight, u.tokens) for t, u in self._usage.items()}
        view: dict[str, dict] = {}
        for tenant in sorted(set(usage) | self._waiting.known_tenants()):
            waiting, in_flight, tokens = usage.get(tenant, (0, 0, 0))
            view[tenant] = {"counter": self._waiting.counter(tenant), "waiting": waiting,
                            "in_flight": in_flight, "weight": self._policy(tenant).weight,
                            "tokens_last_minute": tokens}
        return view

    def _policy(self, tenant: str) -> TenantPolicy:
        return self._policies.get(tenant, self.default_policy)

    def _check_limits(self, label: str, policy: TenantPolicy, usage: _Usage,
                      now: float) -> None:
        """Raise TenantLimited if ``label`` may not queue one more request (tenant lock held)."""
        if policy.max_concurrent is not None and usage.in_flight >= policy.max_concurrent:
            # No honest clock for a request to end: retry soon.
            raise TenantLimited(label, "max_concurrent", policy.max_concurrent, 1.0)
        if policy.max_queued is not None and usage.waiting >= policy.max_queued:
            raise TenantLimited(label, "max_queued", policy.max_queued, 1.0)
        if policy.tokens_per_minute is not None:
            usage.expire(now)
            if usage.tokens >= policy.tokens_per_minute:
                raise TenantLimited(label, "tokens_per_minute", policy.tokens_per_minute,
                                    usage.below_after(now, policy.tokens_per_minute))

    def _sweep_usage(self, now: float) -> None:
        """Forget tenants with nothing in flight and no tokens in the window (lock held)."""
        for tenant in list(self._usage):
            usage = self._usage[tenant]
            usage.expire(now)
            if usage.idle:
                del self._usage[tenant]
        self._usage_sweep_at = 2 * len(self._usage) + 64

    def _count_tokens(self, label: str, tokens: int, now: float) -> None:
        with self._tenant_lock:
            usage = self._usage.get(label)
            if usage is not None:
                usage.expire(now)
                usage.add(now, tokens)

    @property
    def running(self) -> int:
        batch = self._batch
        return len(batch.seqs) if batch is not None else 0

    @property
    def rows_in_use(self) -> int:
        """Running rows plus the rows of a group still being prefilled in chunks (the load
        the pool's placement table sees)."""
        chunked = self._chunked
        return self.running + (len(chunked.seqs) if chunked is not None else 0)

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet admitted to a row (the server's load, for routing)."""
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """Rows run or requests wait (submitted, not yet admitted or ended)."""
        return (self.running > 0 or self._pending > 0 or bool(self._prefilling)
                or self._chunked is not None)

    def stalled_for(self, limit_s: float) -> float | None:
        """Seconds without a completed loop iteration while busy, if more than ``limit_s``."""
        idle = time.monotonic() - self.last_progress
        if idle > limit_s and self.busy:
            return idle
        return None

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        reason = "server is shutting down"
        try:
            self._loop()
        except BaseException:
            reason = "the engine stopped unexpectedly"
            log.critical("engine thread died", exc_info=True)
            raise
        finally:
            # Nobody waits for an engine that is gone: every row and queued request ends now.
            self._fail_batch(503, reason)
            for seq in [*self._prefilling, *(self._chunked.seqs if self._chunked else [])]:
                self._finish_error(seq, 503, reason)
            while True:
                try:
                    seq = self._inbox.get_nowait()
                except queue.Empty:
                    break
                self._waiting.push(seq.tenant_label, seq)
            for seq in list(self._waiting):
                self._waiting.remove(seq)
                self._unqueue(seq)
                self._finish_error(seq, 503, reason)

    def _loop(self) -> None:
        # The engine is the one thread that runs torch with all cores; the others stay at one
        # thread (see confine_torch_threads).
        torch.set_num_threads(self.torch_threads)
        log.info("engine started", extra={"max_batch_size": self.max_batch_size,
                                          "torch_threads": self.torch_threads})
        while not self._stop.is_set():
            try:
                worked = self._step()
            except Exception:  # the loop must survive anything a step throws
                log.exception("engine step failed; failing the running batch")
                self._fail_batch(503, "the engine hit an internal error on this batch")
                worked = True
            self.last_progress = time.monotonic()
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()
                self.last_progress = time.monotonic()

    def _step(self) -> bool:
        worked = self._run_commands()
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._waiting.push(seq.tenant_label, seq)
        self.cache.promote_pinned()
        self._reap()
        if self._chunked is None:
            admitted = self._admit(self.max_prefill_tokens)
            if admitted:
                self._guarded(admitted, lambda: self._prefill(admitted))
                worked = True
        else:
            # A step's prefill work stays within prefill_chunk_tokens: requests that fit in
            # half of it are admitted and prefilled in one pass (short prompts do not wait
            # for a long one), the chunk takes the rest.
            budget = self.prefill_chunk_tokens
            side = self._admit(budget // 2, padded=True)
            if side:
                self._guarded(side, lambda: self._prefill(side, chunk=False))
            used = len(side) * max((len(s.prompt_ids) for s in side), default=0)
            chunked = self._chunked
            if chunked is not None:
                self._guarded(chunked.seqs, lambda: self._prefill_chunk(budget - used))
            worked = True
        if self.prefetch_adapters and self._waiting:
            self._prefetch()
        if self._batch is not None and self._batch.seqs:
            self._decode()
            worked = True
        self.metrics.running.set(self.running)
        return worked

    PREFETCH_SCAN = 64  # waiting requests looked at per step, at most

    def _guarded(self, seqs: list[Sequence], prefill: Callable[[], None]) -> None:
        """Run a prefill of admitted ``seqs``; if it raises past its own handling, end them
        (they are in neither the waiting queue nor the batch: nobody else would)."""
        self._prefilling = seqs
        try:
            prefill()
        except Exception:
            for seq in seqs:
                self._finish_error(seq, 503, "the engine failed to prefill this request")
            if self._chunked is not None and self._chunked.seqs[0] in seqs:
                self._chunked = None
            self._prefilling = []
            raise
        # Not in a finally: if the thread dies, _run ends these rows.
        self._prefilling = []

    def _prefetch(self) -> None:
        """Start bringing the adapters of requests still waiting (the batch is full, or
        their adapter is not ready) toward the device, in arrival order, before their turn:
        disk reads overlap the decode steps, and free device slots are filled (never by
        evicting). Bounded per step, so a long queue costs a step nothing that grows."""
        seen: set[int] = set()
        for seq in itertools.islice(self._waiting, self.PREFETCH_SCAN):
            entry = seq.entry
            if entry is None or id(entry) in seen:
                continue
            seen.add(id(entry))
            if entry.slot is None:
                self.cache.prefetch(entry)

    def _run_commands(self) -> bool:
        ran = False
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _reap(self) -> None:
        """Finish cancelled or timed-out sequences, waiting or running."""
        now = time.monotonic()
        limit = self.max_queue_wait_s
        for seq in list(self._waiting):
            waited = now - seq.submitted_at
            if seq.cancelled or waited > seq.timeout_s:
                self._waiting.remove(seq)
                self._unqueue(seq)
                self._end(seq, now)
            elif limit is not None and waited > limit:
                self._waiting.remove(seq)
                self._unqueue(seq)
                self.metrics.requests_shed.labels(seq.tenant_label, "queue_wait").inc()
                self._finish_error(seq, 429, f"waited {waited:.1f}s for a row, more than "
                                   f"this server's max_queue_wait_s of {limit:g}s; retry")
        if self._batch is not None:
            gone = [s for s in self._batch.seqs
                    if s.cancelled or now - s.submitted_at > s.timeout_s]
            for seq in gone:
                self._end(seq, now)
            if gone:
                self._drop_rows(gone)

    def _end(self, seq: Sequence, now: float) -> None:
        if seq.cancelled:
            self._finish_error(seq, 499, "client disconnected")
        else:
            self._finish_error(seq, 504, f"request exceeded its timeout of {seq.timeout_s:g}s")

    def _unqueue(self, seq: Sequence) -> None:
        """``seq`` left the waiting queue (admitted or ended)."""
        with self._tenant_lock:
            usage = self._usage.get(seq.tenant_label)
            if usage is not None and usage.waiting > 0:
                usage.waiting -= 1
                if usage.waiting == 0:
                    self._backlogged -= 1
        with self._pending_lock:
            self._pending -= 1
        self.metrics.queue_depth.dec()

    def _admit(self, budget: int, padded: bool = False) -> list[Sequence]:
        """Waiting requests for one prefill group: ready ones, fairly ordered, within the
        batch's free rows and ``budget`` prompt tokens (``padded``: counted as the group's
        rows x longest prompt, what a one-pass prefill computes; a lone request longer than
        an unpadded budget is still admitted, alone)."""
        room = self.max_batch_size - self.running
        if self._chunked is not None:
            room -= len(self._chunked.seqs)
        longest = 0
        admitted: list[Sequence] = []
        # Adapter states seen in this round that are not READY (prepare once per entry).
        states: dict[int, Prepared] = {}
        failed: list[Sequence] = []

        def ready(seq: Sequence) -> bool:
            if seq.entry is None:
                return True
            state = states.get(id(seq.entry))
            if state is None:
                state = self.cache.prepare(seq.entry)
                if state != Prepared.READY:
                    states[id(seq.entry)] = state
            if state == Prepared.FAILED:
                failed.append(seq)
            return state == Prepared.READY  # WAIT: its adapter is loading, others go ahead

        while room > 0:
            seq = self._waiting.pick(ready)
            for bad in failed:
                if self._waiting.remove(bad):
                    self._unqueue(bad)
                    reason = bad.entry.reason if bad.entry is not None else None
                    self._finish_error(bad, 503, f"adapter failed to load: {reason}")
            failed.clear()
            if seq is None:
                break
            n = len(seq.prompt_ids)
            if padded and (len(admitted) + 1) * max(longest, n) > budget:
                break
            if not padded and admitted and n > budget:
                break
            longest = max(longest, n)
            label = self._waiting.take(seq)
            seq.admitted = True
            self._unqueue(seq)
            now = time.monotonic()
            self._waiting.charge(label, prompt_tokens=len(seq.prompt_ids))
            self._count_tokens(label, len(seq.prompt_ids), now)
            admitted.append(seq)
            room -= 1
            if not padded:
                budget -= n
        if admitted and (room == 0 or len(self._waiting)):
            # admissions at capacity (a full batch, or requests left waiting): the service
            # rate the wait estimate reads; a lightly loaded server's admissions only tell
            # its arrival rate
            self._admitted_at.extend([time.monotonic()] * len(admitted))
        return admitted

    def _slots(self, seqs: list[Sequence]) -> list[str | None]:
        return [s.entry.slot if s.entry is not None else None for s in seqs]

    def _forward(self, seqs: list[Sequence], phase: str, ids: torch.Tensor,
                 mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """One forward pass; if it raises, ``cache`` is left as it was before the call."""
        saved = [(layer.keys, layer.values) for layer in cache.layers]
        try:
            if self._faults:
                self._inject(seqs, phase)
            return self.backend.forward(ids, mask, positions, cache, self._slots(seqs))
        except Exception:
            # DynamicCache appends with torch.cat (new tensors): the old ones are intact.
            for layer, (keys, values) in zip(cache.layers, saved, strict=True):
                layer.keys, layer.values = keys, values
            raise

    def _faults_of(self, seq: Sequence) -> dict[str, float]:
        """The faults injected for ``seq``'s tenant, or for its exact ``tenant@version``."""
        faults = self._faults.get(seq.tenant_label, {})
        if seq.entry is not None:
            exact = self._faults.get(str(seq.entry.ref))
            if exact:
                faults = {**faults, **exact}
        return faults

    def _inject(self, seqs: list[Sequence], phase: str) -> None:
        for seq in seqs:
            faults = self._faults_of(seq)
            if "stall" in faults and not seq.stalled:
                seq.stalled = True
                time.sleep(faults["stall"])
            if "die" in faults:
                raise _InjectedDeath(f"injected: engine dies on {seq.tenant_label}")
            if phase in faults:
                raise RuntimeError(f"injected {phase} fault for {seq.tenant_label}")
            if phase == "prefill" and "batch-prefill-oom" in faults and len(seqs) > 1:
                raise torch.OutOfMemoryError("injected: out of memory prefilling a group")

    def _prefill(self, seqs: list[Sequence], chunk: bool = True) -> None:
        """Prefill ``seqs`` together; if that raises, one by one, so only a row that fails
        on its own gets an error (and a group too large for memory costs nobody). While rows
        decode, a group of more than ``prefill_chunk_tokens`` padded prompt tokens starts a
        chunked prefill instead (:meth:`_prefill_chunk` runs its first chunk now)."""
        try:
            ids, mask, positions = self._group_inputs(seqs)
            budget = self.prefill_chunk_tokens
            if chunk and budget and self.running and ids.numel() > budget:
                self._chunked = _Chunked(list(seqs), ids, mask, positions, self._new_cache())
                self._prefill_chunk(budget)
                return
            cache = self._new_cache()
            logits = self._forward(seqs, "prefill", ids, mask, positions, cache)
        except Exception as exc:
            self._prefill_failed(seqs, exc)
            return
        self._join(seqs, cache, mask, logits)

    def _prefill_failed(self, seqs: list[Sequence], exc: Exception) -> None:
        if len(seqs) > 1:
            log.warning("prefill of %d rows failed (%s); prefilling them one by one",
                        len(seqs), type(exc).__name__)
            for seq in seqs:
                self._prefill([seq], chunk=False)
            return
        log.error("prefill failed", exc_info=exc, extra={"tenant": seqs[0].tenant_label})
        self.metrics.row_failures.labels(seqs[0].tenant_label, "prefill").inc()
        oom = isinstance(exc, torch.OutOfMemoryError)
        self._finish_error(seqs[0], 503, "the server ran out of memory prefilling this "
                           "request" if oom else "the engine failed to prefill this request")

    def _prefill_chunk(self, tokens: int) -> None:
        """The next chunk of the chunked group: ``tokens // rows`` columns, at least one
        (every remaining column once no row decodes, since then nobody waits). The last chunk
        joins the group to the batch and yields its first tokens. If a chunk raises, the
        group is prefilled again from the start, one row at a time (as :meth:`_prefill`)."""
        group = self._chunked
        assert group is not None
        now = time.monotonic()
        if all(s.cancelled or now - s.submitted_at > s.timeout_s for s in group.seqs):
            self._chunked = None  # nobody is left to answer (gone or timed out): stop here
            for seq in group.seqs:
                self._end(seq, now)
            return
        longest = group.ids.shape[1]
        width = max(1, tokens // len(group.seqs))
        end = min(longest, group.done + width) if self.running else longest
        try:
            logits = self._forward(group.seqs, "prefill", group.ids[:, group.done:end],
                                   group.mask[:, :end], group.positions[:, group.done:end],
                                   group.cache)
        except Exception as exc:
            self._chunked = None
            self._prefill_failed(group.seqs, exc)
            return
        self.prefill_chunks += 1
        group.done = end
        if end == longest:
            self._chunked = None
            self._join(group.seqs, group.cache, group.mask, logits)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model_config)

    def _group_inputs(self, seqs: list[Sequence]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ``(ids, mask, positions)`` of the group's prompts, on the device."""
        longest = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[row, longest - n:] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            mask[row, longest - n:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _join(self, seqs: list[Sequence], cache: Any, mask: torch.Tensor,
              logits: torch.Tensor) -> None:
        """A prefilled group joins the running batch and takes its first tokens."""
        group = _Batch(
            seqs=list(seqs),
            cache=cache,
            mask=mask,
            positions=mask.sum(dim=1),
            last_tokens=torch.zeros(len(seqs), dtype=torch.long, device=self.device),
        )
        self._merge(group)
        assert self._batch is not None
        self._accept_tokens(list(seqs), logits, offset=len(self._batch.seqs) - len(seqs))

    def _merge(self, group: _Batch) -> None:
        if self._batch is None or not self._batch.seqs:
            self._batch = group
            return
        batch = self._batch
        old_len, new_len = batch.mask.shape[1], group.mask.shape[1]
        target = max(old_len, new_len)
        for old_layer, new_layer in zip(batch.cache.layers, group.cache.layers, strict=True):
            old_layer.keys = torch.cat([_pad_left(old_layer.keys, target - old_len, 2),
                                        _pad_left(new_layer.keys, target - new_len, 2)])
            old_layer.values = torch.cat([_pad_left(old_layer.values, target - old_len, 2),
                                          _pad_left(new_layer.values, target - new_len, 2)])
        batch.mask = torch.cat([_pad_left(batch.mask, target - old_len, 1),
                                _pad_left(group.mask, target - new_len, 1)])
        batch.positions = torch.cat([batch.positions, group.positions])
        batch.last_tokens = torch.cat([batch.last_tokens, group.last_tokens])
        batch.seqs.extend(group.seqs)

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None
        rows = len(batch.seqs)
        mask = torch.cat([batch.mask, torch.ones((rows, 1), dtype=batch.mask.dtype,
                                                 device=batch.mask.device)], dim=1)
        slots = self._slots(batch.seqs)
        self.metrics.batch_size.observe(rows)
        self.metrics.distinct_adapters.observe(len(set(slots)))
        try:
            logits = self._forward(batch.seqs, "decode", batch.last_tokens[:, None], mask,
                                   batch.positions[:, None], batch.cache)
        except Exception:
            self._isolate_decode_failure(mask)
            return
        batch.mask = mask
        batch.positions = batch.positions + 1
        self.steps += 1
        self._accept_tokens(list(batch.seqs), logits, offset=0)

    def _isolate_decode_failure(self, mask: torch.Tensor) -> None:
        """The step raised (and left the cache as it was): try each row alone, end the rows
        that fail alone, and run the step again without them. If no row fails alone, the
        failure is the batch's, and the batch fails (the loop's handler)."""
        batch = self._batch
        assert batch is not None
        log.warning("decode step of %d rows failed; trying each row alone", len(batch.seqs),
                    exc_info=True)
        culprits: list[Sequence] = []
        for i, seq in enumerate(batch.seqs):
            if len(batch.seqs) == 1:
                culprits.append(seq)
                break
            try:
                self._forward([seq], "decode", batch.last_tokens[i:i + 1, None], mask[i:i + 1],
                              batch.positions[i:i + 1, None], self._row_cache(batch.cache, i))
            except Exception:
                culprits.append(seq)
        if not culprits:
            raise RuntimeError("a decode step failed that no single row explains")
        for seq in culprits:
            log.error("a row failed its decode step; ending it alone",
                      extra={"tenant": seq.tenant_label})
            self.metrics.row_failures.labels(seq.tenant_label, "decode").inc()
            self._finish_error(seq, 503, "the engine failed to generate for this request")
        self._drop_rows(culprits)
        if self._batch is not None and self._batch.seqs:
            self._decode()  # the rest of the step, without the failed rows

    @staticmethod
    def _row_cache(cache: Any, row: int) -> Any:
        """A one-row copy of ``cache`` (a probe; the batch's cache is not touched)."""
        sub = copy.copy(cache)
        sub.layers = []
        for layer in cache.layers:
            one = copy.copy(layer)
            one.keys, one.values = layer.keys[row:row + 1], layer.values[row:row + 1]
            sub.layers.append(one)
        return sub

    def _accept_tokens(self, seqs: list[Sequence], logits: torch.Tensor, offset: int) -> None:
        """Sample a token per row, stream it, and retire rows that are done."""
        batch = self._batch
        assert batch is not None
        tokens = sample_rows(logits, [s.sampler for s in seqs])
        now = time.monotonic()
        finished: list[Sequence] = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            try:
                if self._faults and "sample" in self._faults_of(seq):
                    raise RuntimeError(f"injected sample fault for {seq.tenant_label}")
                if isinstance(token, RowError):
                    raise token
                if self._accept_one(seq, token, offset + i, now):
                    finished.append(seq)
            except Exception as exc:  # one row's failure ends that row, never the batch
                log.error("a row failed after its forward pass; ending it alone",
                          extra={"tenant": seq.tenant_label, "error": repr(exc)[:300]})
                self.metrics.row_failures.labels(seq.tenant_label, "sample").inc()
                reason = (str(exc) if isinstance(exc, RowError)
                          else "the engine failed to sample for this request")
                self._finish_error(seq, 503, reason)
                finished.append(seq)
        if finished:
            self._drop_rows(finished)

    def _accept_one(self, seq: Sequence, token: int, row: int, now: float) -> bool:
        """Take ``token`` for ``seq``; True when the sequence is done."""
        batch = self._batch
        assert batch is not None
        batch.last_tokens[row] = token
        seq.generated.append(token)
        self._waiting.charge(seq.tenant_label, output_tokens=1)
        self._count_tokens(seq.tenant_label, 1, now)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.labels(seq.tenant_label).observe(now - seq.submitted_at)
            if seq.entry is not None:
                seq.entry.outcomes.first_token(now - seq.submitted_at)
        hit_eos = token in self.eos_token_ids and not seq.params.ignore_eos
        at_length = len(seq.generated) >= seq.params.max_new_tokens
        final = hit_eos or at_length
        if not hit_eos:
            seq.detokenizer.add(token)
        text = seq.detokenizer.finish() if final else seq.detokenizer.text
        delta = seq.tracker.update(text, final=final)
        if delta and seq.stream:
            self._emit(seq, TokenEvent(delta))
        if seq.tracker.stopped or final:
            reason = "stop" if (hit_eos or seq.tracker.stopped) else "length"
            self._finish_ok(seq, reason)
            return True
        return False

    def _drop_rows(self, gone: list[Sequence]) -> None:
        batch = self._batch
        assert batch is not None
        keep = [i for i, s in enumerate(batch.seqs) if s not in gone]
        if not keep:
            self._batch = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        mask = batch.mask.index_select(0, index)
        # Columns that are padding in every remaining row are dead weight: trim them.
        live = mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else 0
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]
        batch.mask = mask[:, start:]
        batch.positions = batch.positions.index_select(0, index)
        batch.last_tokens = batch.last_tokens.index_select(0, index)
        batch.seqs = [batch.seqs[i] for i in keep]

    def _fail_batch(self, status: int, reason: str) -> None:
        batch, self._batch = self._batch, None
        if batch is not None:
            for seq in batch.seqs:
                self._finish_error(seq, status, reason)

    # ------------------------------------------------------------------ completion
    def _emit(self, seq: Sequence, event: Event) -> None:
        # RuntimeError: the event loop is gone (server shutting down); nobody is listening.
        with contextlib.suppress(RuntimeError):
            seq.loop.call_soon_threadsafe(seq.events.put_nowait, event)

    def _end_sequence(self, seq: Sequence, event: Event) -> None:
        """Release ``seq``'s tenant counts, tell its client, then release its adapter.

        The counts go first: a client that has its answer may send the next request at once
        and must not find this one still counted against its tenant's limits (nor in the
        in-flight gauge). The adapter goes last, so an eviction waiting for it to drain is
        answered after this request's client (the loop runs callbacks in order)."""
        if seq.done:
            return
        seq.done = True
        self._release_counts(seq)
        self._emit(seq, event)
        if seq.entry is not None:
            self.cache.release(seq.entry)

    def _release_counts(self, seq: Sequence) -> None:
        label = seq.tenant_label
        if seq.admitted:
            self._waiting.release(label)
        with self._tenant_lock:
            usage = self._usage.get(label)
            if usage is not None and usage.in_flight > 0:
                usage.in_flight -= 1
                self.metrics.request_ended(label)

    def _finish_ok(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        now = time.monotonic()
        label = seq.tenant_label
        self.metrics.requests.labels(label, "ok").inc()
        self.metrics.prompt_tokens.labels(label).inc(len(seq.prompt_ids))
        self.metrics.completion_tokens.labels(label).inc(len(seq.generated))
        self.metrics.e2e.labels(label).observe(now - seq.submitted_at)
        if seq.entry is not None:
            seq.entry.outcomes.finished(now - seq.submitted_at, error=False)
        self._end_sequence(seq, FinishEvent(seq.tracker.text, reason, len(seq.prompt_ids),
                                            len(seq.generated)))
        if seq.entry is not None:
            log.debug("sequence finished", extra={"tenant": seq.entry.ref.tenant,
                                                  "version": seq.entry.ref.version,
                                                  "tokens": len(seq.generated)})

    def _finish_error(self, seq: Sequence, status: int, reason: str) -> None:
        if seq.done:
            return
        outcome = {499: "cancelled", 504: "timeout", 429: "shed"}.get(status, "error")
        self.metrics.requests.labels(seq.tenant_label, outcome).inc()
        # a client that left, or a request shed for overload, is no verdict on the adapter
        if seq.entry is not None and status not in (429, 499):
            seq.entry.outcomes.finished(None, error=status >= 500)
        self._end_sequence(seq, ErrorEvent(status, reason))
