"""Fair shares between tenants: per-tenant policy (weight and limits), the refusal a limit
gives, and the token-fair admission queue (issue 16).

Torch-free: the scheduler is pure bookkeeping over token counts, tested without a model.

The scheduler (:class:`FairQueue`) follows VTC ("Fairness in Serving Large Language Models",
Sheng et al., OSDI 2024). Each tenant has a FIFO of waiting sequences and a *virtual
counter* ``c`` of its weighted service::

    c_x += (prompt_tokens * prompt_token_cost) / w_x     when a request of x is admitted
    c_x += output_token_cost / w_x                        for each token generated for x

The next free row goes to the backlogged tenant (one with a waiting request) with the least
counter; a tenant whose waiting requests cannot be admitted now (adapter still loading) is
skipped without blocking the others, and a lone tenant gets every row (work-conserving).
When a tenant becomes backlogged its counter is lifted to at least the *floor* ``F``: the
least counter of the backlogged tenants, or, when none is backlogged, the highest counter
any tenant had when the backlog emptied (VTC takes the counter of the last tenant to leave;
ours is at least that, so an arrival to an idle server starts level with the most served
tenant and no idle state needs keeping). So an idle tenant banks no credit. ``F`` never
decreases.

The bound
---------
Write ``P`` = the largest prompt (tokens, ``max_prompt_tokens``), ``N`` = the largest output
(``max_new_tokens_limit``), ``B`` = ``max_batch_size``, ``c_p``/``c_o`` the prompt/output
token costs, and, for a tenant ``x`` of weight ``w_x``::

    U_x = (c_p * P + c_o * B * N) / w_x

**Claim.** At every moment, every tenant's counter ``c_x <= F + U_x``, and every backlogged
tenant's ``c_x >= F``. Hence while tenants ``f`` and ``g`` are both backlogged
``c_f - c_g <= U_f``, and over any interval during which both stay backlogged their weighted
services differ by at most ``U_f + U_g`` (``2U`` for equal weights)::

    | S_f / w_f - S_g / w_g | <= U_f + U_g        (S = tokens x cost served in the interval)

*Proof.* ``F`` is the least backlogged counter, so a tenant is admitted only when
``c_x = F``. Take the last moment ``tau`` with ``c_x <= F``. After ``tau`` the tenant is not
admitted again, so ``c_x`` grows only by (i) the prompt charge of a request admitted at
``tau`` (``<= c_p * P / w_x``) and (ii) the decode charges of the rows it holds after ``tau``
(at most ``B`` rows that keep running after their admission, at most ``N`` tokens each:
``<= c_o * B * N / w_x``), while ``F`` only grows. The interval bound follows from
``c_f(t2) - c_g(t2) <= U_f`` and ``c_g(t1) - c_f(t1) <= U_g`` (counters of backlogged
tenants change only by charges). VTC's ``2U`` with ``U = max(w_p * L_input, w_q * M)``
(``M``: tokens a batch holds) is the same argument; this engine has no KV token budget, so
what a tenant's running rows may still produce is bounded by ``B * N`` rows x tokens, and
the prompt charge adds to it rather than competing with it (both land after ``tau``).
The ``B * N`` term is the price of non-preemption: a flood that holds every row keeps being
served (and charged) until its rows finish, while the light tenant waits for a free row.

For a light tenant ``l`` this means: once its request is at the head of its queue, other
tenants ``x`` are admitted ahead of it only while ``c_x <= c_l <= F + U_l``, i.e. for at
most ``w_x * U_l`` (plus one prompt) of weighted service each, however many requests they
queue; with FIFO the wait grows with the whole queue ahead. Its time to first token is then
at most the time for a row to free (``<= N`` decode steps) plus those admissions.

Exceptions (stated, not hidden): time when ``l``'s waiting requests are not admissible
(adapter loading) does not count (others are served meanwhile); :meth:`FairQueue.forget`
caps the idle state kept (``max_idle``) and a tenant forgotten above the floor comes back
at the floor, i.e. with up to ``U_x`` of service forgiven.

Memory: state is kept for tenants that are backlogged, have rows running, or are idle with
a counter above the floor (they would keep that debt on return); an idle tenant at or below
the floor is forgotten at once (the lift rule would give it exactly ``F`` anyway), and every
idle tenant is forgotten whenever the backlog empties (the floor then rises to the top).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar


@dataclass(frozen=True)
class TenantPolicy:
    """One tenant's share and limits on this server (``None``: no limit)."""

    weight: float = 1.0
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None
    max_queued: int | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")


LIMIT_NAMES = ("max_concurrent", "tokens_per_minute", "max_queued")


class TenantLimited(RuntimeError):
    """A per-tenant limit refuses a request (HTTP 429 with ``Retry-After``)."""

    def __init__(self, tenant: str, limit: str, value: int, retry_after_s: float) -> None:
        assert limit in LIMIT_NAMES
        self.tenant, self.limit, self.value = tenant, limit, value
        self.retry_after_s = max(1.0, retry_after_s)
        super().__init__(f"tenant {tenant} is at its {limit} limit of {value}")


def service_gap_bound(*, prompt_token_cost: float, output_token_cost: float,
                      max_prompt_tokens: int, max_new_tokens: int, max_batch_size: int,
                      weight: float = 1.0) -> float:
    """``U_x`` of the module docstring: how far a tenant's counter may run above the floor."""
    return (prompt_token_cost * max_prompt_tokens
            + output_token_cost * max_batch_size * max_new_tokens) / weight


T = TypeVar("T", bound=Hashable)


class _Tenant:
    __slots__ = ("counter", "queue", "running", "version")

    def __init__(self, counter: float) -> None:
        self.counter = counter
        self.queue: deque = deque()
        self.running = 0
        self.version = 0  # of its entry in the backlog heap


class FairQueue(Generic[T]):
    """Waiting items per tenant, admitted by least weighted service (``fair``) or in arrival
    order (``fifo``). Thread-safe (one lock); items must be hashable and unique.

    The owner calls :meth:`push` when an item arrives, :meth:`pick` to choose the next one
    (``ready(item)`` says whether it can be admitted now), :meth:`take` to admit it,
    :meth:`charge` for the tokens it is served, :meth:`release` when an admitted item ends and
    :meth:`remove` when a waiting item leaves without admission (cancelled, timed out).
    """

    def __init__(self, mode: Literal["fair", "fifo"] = "fair", *,
                 prompt_token_cost: float = 1.0, output_token_cost: float = 2.0,
                 weight: Callable[[str], float] | None = None,
                 max_idle: int = 10_000) -> None:
        if mode not in ("fair", "fifo"):
            raise ValueError(f"unknown admission mode {mode!r}")
        self.mode = mode
        self.prompt_token_cost = prompt_token_cost
        self.output_token_cost = output_token_cost
        self._weight = weight or (lambda tenant: 1.0)
        self.max_idle = max_idle
        self._lock = threading.RLock()
        self._tenants: dict[str, _Tenant] = {}
        self._backlogged: set[str] = set()
        # (counter, arrival of its first waiting item, tenant, version) per backlogged tenant;
        # an entry whose version is not the tenant's current one is stale (lazily dropped).
        self._heap: list[tuple[float, int, str, int]] = []
        self._idle: set[str] = set()  # no waiting, no running, counter above the floor
        self._idle_heap: list[tuple[float, str]] = []  # (counter, tenant), lazily pruned
        self._where: dict[T, tuple[str, int]] = {}  # waiting item -> (tenant, arrival no.)
        self._arrivals = itertools.count()
        self.floor = 0.0

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[T]:
        """The waiting items in arrival order (a snapshot)."""
        with self._lock:
            return iter(list(self._where))  # a dict keeps insertion (= arrival) order

    def __contains__(self, item: object) -> bool:
        return item in self._where

    def counter(self, tenant: str) -> float:
        """The tenant's virtual counter; a tenant without state would start at the floor."""
        with self._lock:
            state = self._tenants.get(tenant)
            return state.counter if state is not None else self.floor

    def waiting(self, tenant: str) -> int:
        with self._lock:
            state = self._tenants.get(tenant)
            return len(state.queue) if state is not None else 0

    def backlogged(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._backlogged)

    def known_tenants(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._tenants)

    # ------------------------------------------------------------------ changes
    def push(self, tenant: str, item: T) -> None:
        with self._lock:
            if item in self._where:
                raise ValueError("item is already waiting")
            state = self._tenants.get(tenant)
            if state is None:
                state = self._tenants[tenant] = _Tenant(self.floor)
            arrival = next(self._arrivals)
            state.queue.append(item)
            self._where[item] = (tenant, arrival)
            if len(state.queue) == 1:
                # Becoming backlogged: no banked credit. ``floor`` is the least backlogged
                # counter (or the top one when none was backlogged).
                state.counter = max(state.counter, self.floor)
                self._backlogged.add(tenant)
                self._idle.discard(tenant)  # its idle-heap entry goes stale
                self._reheap(tenant, state)

    def pick(self, ready: Callable[[T], bool]) -> T | None:
        """The item to admit next, or None; it stays waiting until :meth:`take`.

        ``fair``: tenants by least counter (ties: earliest waiting item), each tenant's items
        in arrival order, the first ``ready`` one wins; a tenant with none ready is skipped.
        ``fifo``: all items in arrival order, the first ``ready`` one wins.
        ``ready`` may be called on items that are not picked (never twice on one item).
        """
        with self._lock:
            if self.mode == "fifo":
                return next((item for item in list(self._where) if ready(item)), None)
            seen: list[tuple[float, int, str, int]] = []
            found = None
            while found is None and self._heap:
                entry = heapq.heappop(self._heap)
                state = self._tenants.get(entry[2])
                if state is None or state.version != entry[3] or not state.queue:
                    continue  # stale
                seen.append(entry)
                found = next((item for item in list(state.queue) if ready(item)), None)
            for entry in seen:
                heapq.heappush(self._heap, entry)
            return found

    def take(self, item: T) -> str:
        """Admit a waiting item (it now counts as running for its tenant); its tenant."""
        with self._lock:
            tenant, _ = self._where.pop(item)
            state = self._tenants[tenant]
            state.queue.remove(item)
            state.running += 1
            self._left(tenant, state)
            return tenant

    def remove(self, item: T) -> bool:
        """A waiting item leaves without admission; False if it was not waiting."""
        with self._lock:
            where = self._where.pop(item, None)
            if where is None:
                return False
            tenant = where[0]
            state = self._tenants[tenant]
            state.queue.remove(item)
            self._left(tenant, state)
            self._maybe_forget(tenant, state)
            return True

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """Count service: prompt tokens at admission, generated tokens as produced."""
        cost = prompt_tokens * self.prompt_token_cost + output_tokens * self.output_token_cost
        if cost <= 0:
            return
        with self._lock:
            state = self._tenants.get(tenant)
            if state is None:  # not waiting nor running: counted all the same
                state = self._tenants[tenant] = _Tenant(self.floor)
            self._idle.discard(tenant)  # its counter changes: any heap entry goes stale
            state.counter += cost / self._weight(tenant)
            if state.queue:
                self._reheap(tenant, state)
            self._raise_floor()
            self._maybe_forget(tenant, state)

    def release(self, tenant: str) -> None:
        """An admitted item of ``tenant`` ended (any way)."""
        with self._lock:
            state = self._tenants.get(tenant)
            if state is None or state.running <= 0:
                return
            state.running -= 1
            self._maybe_forget(tenant, state)

    def forget(self) -> None:
        """Drop the state of idle tenants at or below the floor; beyond ``max_idle`` idle
        tenants, drop the ones closest to the floor (they return at the floor)."""
        with self._lock:
            heap = self._idle_heap
            while heap and (heap[0][0] <= self.floor or len(self._idle) > self.max_idle):
                counter, tenant = heapq.heappop(heap)
                state = self._tenants.get(tenant)
                if tenant in self._idle and state is not None and state.counter == counter:
                    self._idle.discard(tenant)
                    del self._tenants[tenant]
            if len(heap) > 2 * len(self._idle) + 64:  # stale entries of tenants that returned
                self._idle_heap = [(c, t) for c, t in heap
                                   if t in self._idle and self._tenants[t].counter == c]
                heapq.heapify(self._idle_heap)

    # ------------------------------------------------------------------ internals
    def _reheap(self, tenant: str, state: _Tenant) -> None:
        """Enter the backlogged tenant's current (counter, head arrival) in the heap."""
        state.version += 1
        heapq.heappush(self._heap, (state.counter, self._where[state.queue[0]][1], tenant,
                                    state.version))
        if len(self._heap) > 2 * len(self._backlogged) + 64:  # drop the stale entries
            self._heap = [e for e in self._heap if e[2] in self._backlogged
                          and self._tenants[e[2]].version == e[3]]
            heapq.heapify(self._heap)

    def _least(self) -> float | None:
        """The least counter of the backlogged tenants (None: none is backlogged)."""
        heap = self._heap
        while heap:
            _, _, tenant, version = heap[0]
            state = self._tenants.get(tenant)
            if state is not None and state.version == version and state.queue:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def _left(self, tenant: str, state: _Tenant) -> None:
        if state.queue:
            self._reheap(tenant, state)  # its head changed
            self._raise_floor()
            return
        state.version += 1  # its heap entry goes stale
        self._backlogged.discard(tenant)
        if not self._backlogged:
            # Nobody is backlogged: the next arrival starts level with the most served tenant
            # still known (VTC uses the last one to leave; any value >= that keeps the bound,
            # and this one lets every idle tenant's state go).
            top = max(t.counter for t in self._tenants.values())
            if top > self.floor:
                self.floor = top
            self.forget()
        else:
            self._raise_floor()

    def _raise_floor(self) -> None:
        least = self._least()
        if least is not None and least > self.floor:
            self.floor = least
            if self._idle_heap and self._idle_heap[0][0] <= least:
                self.forget()

    def _maybe_forget(self, tenant: str, state: _Tenant) -> None:
        if state.queue or state.running:
            return
        if state.counter <= self.floor:
            self._idle.discard(tenant)
            del self._tenants[tenant]
            return
        # Idle above the floor: keep the debt until the floor passes it. An idle tenant is
        # charged nothing, so its counter is fixed while it stays idle (heap key is exact).
        if tenant not in self._idle:
            self._idle.add(tenant)
            heapq.heappush(self._idle_heap, (state.counter, tenant))
            if len(self._idle) > self.max_idle:
                self.forget()
