"""Token-fair admission (issue 16): the service-gap bound of inference/fairness.py, checked at
every step of simulated and real workloads in tokens (never timed), and per-tenant limits
end to end through real ``loramux serve`` processes."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from engine_rig import HANG_GUARD_S, EngineRig

from loramux.inference.fairness import FairQueue, TenantLimited, TenantPolicy, service_gap_bound

PC, OC = 1.0, 2.0  # the default prompt / output token costs


# ---------------------------------------------------------------------- a simulated engine
@dataclass(eq=False)
class Req:
    tenant: str
    prompt: int
    output: int
    arrival: int  # step of arrival
    admitted_at: int | None = None
    generated: int = 0
    heavy_admitted_before: int = 0  # other tenants' admissions while this one waited


@dataclass
class Sim:
    """The engine's admission and decode loop over token counts: each step admits into free
    rows (prompt charged), then every running row yields one token (output charged); a newly
    admitted row also yields its first token in its prefill, as in Engine._step."""

    queue: FairQueue
    rows: int
    weights: dict[str, float]
    served: dict[str, float] = field(default_factory=dict)  # tokens x cost, not / weight
    running: list[Req] = field(default_factory=list)
    admissions: list[Req] = field(default_factory=list)
    step_no: int = 0
    track_waits: bool = False  # count other tenants' admissions while each request waits

    def submit(self, req: Req) -> None:
        self.queue.push(req.tenant, req)

    def _charge(self, req: Req, prompt: int = 0, output: int = 0) -> None:
        self.queue.charge(req.tenant, prompt_tokens=prompt, output_tokens=output)
        self.served[req.tenant] = self.served.get(req.tenant, 0.0) + prompt * PC + output * OC

    def _token(self, req: Req) -> bool:
        req.generated += 1
        self._charge(req, output=1)
        return req.generated >= req.output

    def step(self, ready=lambda req: True) -> None:
        self.step_no += 1
        new: list[Req] = []
        while len(self.running) + len(new) < self.rows:
            req = self.queue.pick(ready)
            if req is None:
                break
            self.queue.take(req)
            if self.track_waits:
                for waiting in self.queue:
                    if waiting.tenant != req.tenant:
                        waiting.heavy_admitted_before += 1
            req.admitted_at = self.step_no
            self._charge(req, prompt=req.prompt)
            self.admissions.append(req)
            new.append(req)
        done = [r for r in new if self._token(r)]
        self.running += [r for r in new if r not in done]
        for req in done:
            self.queue.release(req.tenant)
        still = []
        for req in self.running:
            if self._token(req):
                self.queue.release(req.tenant)
            else:
                still.append(req)
        self.running = still

    def normalised(self, tenant: str) -> float:
        return self.served.get(tenant, 0.0) / self.weights[tenant]


def _noisy_workload(seed: int) -> tuple[list[Req], list[Req]]:
    """Heavy: 20x the light tenant's requests, long outputs, all queued at once. Light: short
    requests in small bursts over the run."""
    rng = random.Random(seed)
    heavy = [Req("heavy", rng.randint(8, 48), rng.randint(40, 96), 0) for _ in range(400)]
    light: list[Req] = []
    step = 5
    while len(light) < 20:
        for _ in range(rng.randint(1, 3)):
            light.append(Req("light", rng.randint(4, 24), rng.randint(4, 16), step))
        step += rng.randint(20, 120)
    return heavy, light[:20]


def _run_noisy(mode: str, weights: dict[str, float], seed: int, rows: int = 8,
               check_counters: bool = True):
    """Run the workload; return (the largest swing of the normalised service gap over any
    window in which both tenants stayed backlogged, the bound U_heavy + U_light, the sim)."""
    heavy, light = _noisy_workload(seed)
    queue: FairQueue[Req] = FairQueue(mode, prompt_token_cost=PC, output_token_cost=OC,
                                      weight=weights.__getitem__)
    sim = Sim(queue, rows, weights, track_waits=True)
    for req in heavy:
        sim.submit(req)
    arrivals = sorted(light, key=lambda r: r.arrival)
    every = heavy + light
    u = {t: service_gap_bound(prompt_token_cost=PC, output_token_cost=OC,
                              max_prompt_tokens=max(r.prompt for r in every),
                              max_new_tokens=max(r.output for r in every),
                              max_batch_size=rows, weight=w) for t, w in weights.items()}
    worst = 0.0
    lo = hi = None  # range of D = S_heavy/w_heavy - S_light/w_light over the joint backlog
    while queue or sim.running or arrivals:
        while arrivals and arrivals[0].arrival <= sim.step_no:
            sim.submit(arrivals.pop(0))
        both = queue.backlogged() >= {"heavy", "light"}
        sim.step()
        gap = sim.normalised("heavy") - sim.normalised("light")
        if both:
            # Backlogged through this whole step: every window of joint backlog ending now.
            lo = gap if lo is None else min(lo, gap)
            hi = gap if hi is None else max(hi, gap)
            worst = max(worst, hi - lo)
        else:
            lo = hi = None
        if check_counters:  # the docstring's invariant: F <= c_x (backlogged) <= F + U_x
            for tenant in queue.backlogged():
                assert queue.counter(tenant) >= queue.floor - 1e-9
            for tenant, bound in u.items():
                assert queue.counter(tenant) <= queue.floor + bound + 1e-9
    assert all(r.generated == r.output for r in every)  # everyone was served in full
    return worst, sum(u.values()), sim


@pytest.mark.parametrize("weights", [{"heavy": 1.0, "light": 1.0},
                                     {"heavy": 3.0, "light": 1.0},
                                     {"heavy": 1.0, "light": 3.0}])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_service_gap_stays_within_the_bound_at_every_step(weights, seed):
    worst, bound, sim = _run_noisy("fair", weights, seed)
    assert 0 < worst <= bound, (worst, bound)
    # The light tenant's requests never waited behind more than a bounded amount of the
    # heavy tenant's admissions (in requests): heavy admissions each cost at least 8 prompt
    # + 1 output token; the light head may be passed by at most w_heavy * U_light / cost + 1.
    light_u = service_gap_bound(prompt_token_cost=PC, output_token_cost=OC,
                                max_prompt_tokens=48, max_new_tokens=96, max_batch_size=8,
                                weight=weights["light"])
    cap = weights["heavy"] * light_u / (8 * PC + OC) + 1
    light = [r for r in sim.admissions if r.tenant == "light"]
    assert max(r.heavy_admitted_before for r in light) <= cap


def test_fifo_breaks_the_bound_the_fair_queue_keeps():
    """The same check fails for arrival order: the test can tell the two apart."""
    weights = {"heavy": 1.0, "light": 1.0}
    worst_fifo, bound, fifo = _run_noisy("fifo", weights, 1, check_counters=False)
    worst_fair, _, fair = _run_noisy("fair", weights, 1)
    assert worst_fair <= bound < worst_fifo
    waited_fifo = max(r.heavy_admitted_before for r in fifo.admissions if r.tenant == "light")
    waited_fair = max(r.heavy_admitted_before for r in fair.admissions if r.tenant == "light")
    assert waited_fair * 10 < waited_fifo


def test_weights_share_rows_in_proportion_while_both_are_backlogged():
    """3:1 weights and identical requests: 3 heavy admissions per light one, within one."""
    weights = {"a": 3.0, "b": 1.0}
    queue: FairQueue[Req] = FairQueue(weight=weights.__getitem__)
    sim = Sim(queue, rows=2, weights=weights)
    for _ in range(200):
        sim.submit(Req("a", 10, 10, 0))
        sim.submit(Req("b", 10, 10, 0))
    while len(sim.admissions) < 200:
        sim.step()
    order = [r.tenant for r in sim.admissions[:200]]
    for n in range(8, 200):
        a, b = order[:n].count("a"), order[:n].count("b")
        assert abs(a - 3 * b) <= 4, (n, a, b)


def test_work_conserving_a_lone_tenant_gets_every_row():
    queue: FairQueue[Req] = FairQueue()
    sim = Sim(queue, rows=4, weights={"solo": 1.0, "loading": 1.0})
    for _ in range(10):
        sim.submit(Req("solo", 5, 50, 0))
    sim.submit(Req("loading", 1, 1, 0))  # its adapter never becomes ready in this test
    sim.step(ready=lambda r: r.tenant == "solo")
    assert len(sim.running) == 4 and {r.tenant for r in sim.running} == {"solo"}
    # The tenant that cannot be admitted has the least counter and still blocks nobody.
    assert queue.counter("loading") < queue.counter("solo")
    assert queue.pick(lambda r: r.tenant == "solo").tenant == "solo"


def test_an_idle_tenant_banks_no_credit():
    """B idles while A is served thousands of tokens; when B returns, B's counter starts at the
    floor (A's level), so A still gets a row after B's first admissions (not after thousands of
    tokens of B)."""
    queue: FairQueue[Req] = FairQueue()
    sim = Sim(queue, rows=1, weights={"a": 1.0, "b": 1.0})
    for _ in range(100):
        sim.submit(Req("a", 20, 40, 0))
    while len(sim.admissions) < 50:
        sim.step()
    assert sim.served["a"] > 4000
    floor_before = queue.floor
    for _ in range(100):
        sim.submit(Req("b", 20, 40, sim.step_no))
    assert queue.counter("b") >= floor_before > 0
    start = len(sim.admissions)
    while len(sim.admissions) < start + 10:
        sim.step()
    recent = [r.tenant for r in sim.admissions[start:start + 10]]
    assert "a" in recent and "b" in recent


def test_lift_uses_the_least_backlogged_counter():
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a1")
    queue.push("b", "b1")
    queue.push("a", "a2")
    queue.take(queue.pick(lambda i: True))  # a1 (tie broken by arrival)
    queue.charge("a", prompt_tokens=100)
    assert queue.floor == 0  # b is backlogged at 0
    queue.take(queue.pick(lambda i: True))  # b1: b leaves the backlog
    queue.charge("b", prompt_tokens=30)
    assert queue.floor == 100  # only a is backlogged now, at 100
    queue.push("c", "c1")
    assert queue.counter("c") == 100  # lifted to the least backlogged counter, not 0
    assert queue.counter("b") == 30  # b has a row running, not backlogged: not lifted
    queue.push("b", "b2")
    assert queue.counter("b") == 100


def test_fifo_keeps_arrival_order_and_skips_what_is_not_ready():
    queue: FairQueue[str] = FairQueue("fifo")
    for item in ["a1", "b1", "a2", "c1", "b2"]:
        queue.push(item[0], item)
    queue.charge("a", prompt_tokens=10_000)  # counters do not matter in fifo
    order = []
    while queue:
        item = queue.pick(lambda i: i != "b1" or len(order) >= 3)
        queue.take(item)
        order.append(item)
    assert order == ["a1", "a2", "c1", "b1", "b2"]


def test_fair_pick_skips_a_tenant_whose_head_is_not_ready():
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a1")
    queue.push("b", "b1")
    queue.charge("b", prompt_tokens=50)  # b is behind... ahead: a has the least counter
    assert queue.pick(lambda i: True) == "a1"
    assert queue.pick(lambda i: i != "a1") == "b1"  # a's adapter is loading
    assert queue.pick(lambda i: False) is None


def test_idle_tenant_state_is_forgotten():
    """Ten thousand tenants come and go: the queue keeps no state for idle ones."""
    queue: FairQueue[Req] = FairQueue(max_idle=50)
    sim = Sim(queue, rows=4, weights={})
    sim.weights = _AnyWeight()
    for i in range(10_000):
        sim.submit(Req(f"t{i}", 3, 3, 0))
        if i % 7 == 0:
            sim.step()
    while queue or sim.running:
        sim.step()
    assert len(queue.known_tenants()) == 0
    # With a backlog that never empties, idle state stays capped at max_idle.
    queue2: FairQueue[Req] = FairQueue(max_idle=50)
    sim2 = Sim(queue2, rows=4, weights=_AnyWeight())
    for _ in range(1000):
        sim2.submit(Req("flood", 2, 50, 0))
    for i in range(2000):
        sim2.submit(Req(f"t{i}", 3, 3, 0))
        sim2.step()
        assert len(queue2.known_tenants()) <= 50 + len(queue2.backlogged()) + 4
    assert queue2.backlogged()  # the flood was still backlogged throughout


class _AnyWeight(dict):
    def __missing__(self, key):
        return 1.0


def test_tenant_policy_and_limited_error():
    with pytest.raises(ValueError):
        TenantPolicy(weight=0)
    exc = TenantLimited("acme", "tokens_per_minute", 100, 0.2)
    assert exc.retry_after_s == 1.0 and "tokens_per_minute" in str(exc)


# ---------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def rigs(tiny_model_dir, adapter_root):
    made: list[EngineRig] = []

    def make(faults: str = "", **settings: object) -> EngineRig:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LORAMUX_TEST_FAULTS", faults)  # read when the engine is made
            rig = EngineRig(tiny_model_dir, adapter_root,
                            ["legal", "medical", "retail", "finance"], **settings)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


HEAVY_REQUESTS, HEAVY_TOKENS, LIGHT_TOKENS, ROWS = 48, 24, 8, 4


def _flood_then_light(rig: EngineRig) -> tuple[list, list, int]:
    """Heavy (legal) queues 48 long requests; once 8 are admitted, light (medical) sends 3
    short ones while the engine is held. Returns (heavy, light, admissions before light)."""
    heavy = [rig.seq("legal", HEAVY_TOKENS, prompt_len=16) for _ in range(HEAVY_REQUESTS)]
    for seq in heavy:
        rig.submit(seq)
    rig.wait_until(lambda: len(rig.admitted) >= 8)
    gate = rig.hold()
    light = [rig.seq("medical", LIGHT_TOKENS, prompt_len=8) for _ in range(3)]
    for seq in light:
        rig.submit(seq)
    before = len(rig.admitted)
    gate.set()
    rig.wait_until(lambda: all(s.done for s in heavy + light))
    return heavy, light, before


@pytest.mark.parametrize("admission", ["fair", "fifo"])
def test_a_flood_cannot_push_a_light_tenant_back_beyond_the_bound(rigs, admission):
    """Counted in admissions and tokens: with fair admission each light request is admitted
    after at most w_heavy * U_light / (cost of the cheapest heavy admission) + 1 heavy
    admissions (fairness.py); FIFO makes it wait for the whole flood queued before it."""
    rig = rigs(max_batch_size=ROWS, admission=admission)
    heavy, light, before = _flood_then_light(rig)
    assert all(len(s.generated) == HEAVY_TOKENS for s in heavy)
    assert all(len(s.generated) == LIGHT_TOKENS for s in light)
    u_light = service_gap_bound(prompt_token_cost=PC, output_token_cost=OC,
                                max_prompt_tokens=16, max_new_tokens=HEAVY_TOKENS,
                                max_batch_size=ROWS)
    cheapest_heavy = 16 * PC  # its prompt, charged at admission
    cap = u_light / cheapest_heavy + 1
    after = rig.admitted[before:]
    passed = [sum(1 for s in after[:after.index(seq)] if s.entry.ref.tenant == "legal")
              for seq in light]
    queued_ahead = HEAVY_REQUESTS - before
    if admission == "fair":
        assert max(passed) <= cap < queued_ahead, (passed, cap)
    else:
        assert min(passed) == queued_ahead > cap, (passed, cap)
    # everything was released: nothing waits or runs, for either tenant
    view = rig.engine.fairness_view()
    assert all(v["waiting"] == 0 and v["in_flight"] == 0 for v in view.values()), view


def _counts(rig: EngineRig, tenant: str) -> tuple[int, int]:
    view = rig.engine.fairness_view().get(tenant, {"waiting": 0, "in_flight": 0})
    return view["waiting"], view["in_flight"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_limits_refuse_and_every_way_of_ending_releases_the_counts(rigs):
    """(The engine thread dies on purpose at the end: its exception is expected.)"""
    rig = rigs(faults="prefill:retail,die:finance", max_batch_size=2)
    engine = rig.engine

    def refused(seq) -> TenantLimited:
        with pytest.raises(TenantLimited) as info:
            rig.submit(seq)
        assert not seq.done
        return info.value

    # max_queued, and the cancel and timeout paths of waiting requests
    engine.set_tenant_policy("legal", TenantPolicy(max_concurrent=3, max_queued=2))
    gate = rig.hold()
    cancelled, late = rig.seq("legal", 4), rig.seq("legal", 4, timeout_s=30.0)
    late.submitted_at -= 60.0  # past its timeout at the engine's next look (no sleeping)
    rig.submit(cancelled)
    rig.submit(late)
    assert _counts(rig, "legal") == (2, 2)
    exc = refused(rig.seq("legal", 4))
    assert (exc.tenant, exc.limit, exc.value, exc.retry_after_s) == ("legal", "max_queued", 2,
                                                                     1.0)
    other = rig.seq("medical", 4)
    rig.submit(other)  # a limited tenant does not limit anyone else
    cancelled.cancel()
    gate.set()
    rig.wait_until(lambda: cancelled.done and late.done and other.done)
    assert len(other.generated) == 4 and not cancelled.generated and not late.generated
    assert _counts(rig, "legal") == (0, 0)

    # max_concurrent counts running rows too; finishing releases them
    engine.set_tenant_policy("legal", TenantPolicy(max_concurrent=3))
    gate = rig.hold()
    three = [rig.seq("legal", 6) for _ in range(3)]
    for seq in three:
        rig.submit(seq)
    assert refused(rig.seq("legal", 4)).limit == "max_concurrent"
    gate.set()
    rig.wait_until(lambda: all(s.done for s in three))
    assert all(len(s.generated) == 6 for s in three)
    assert _counts(rig, "legal") == (0, 0)
    rig.submit(last := rig.seq("legal", 2))
    rig.wait_until(lambda: last.done)
    engine.set_tenant_policy("legal", None)  # back to the default: unlimited

    # a request that fails in the engine releases its counts
    engine.set_tenant_policy("retail", TenantPolicy(max_concurrent=1))
    rig.submit(broken := rig.seq("retail", 4))
    rig.wait_until(lambda: broken.done)
    assert not broken.generated and _counts(rig, "retail") == (0, 0)
    rig.submit(again := rig.seq("retail", 4))  # not refused: the count was released
    rig.wait_until(lambda: again.done)

    # tokens per minute: prompt tokens at admission plus generated tokens
    engine.set_tenant_policy("medical", TenantPolicy(tokens_per_minute=30))
    used = engine.fairness_view()["medical"]["tokens_last_minute"]
    assert used == 12 + 4  # the earlier request: 12 prompt + 4 generated tokens
    rig.submit(big := rig.seq("medical", 20, prompt_len=12))
    rig.wait_until(lambda: big.done)
    assert engine.fairness_view()["medical"]["tokens_last_minute"] == used + 32
    exc = refused(rig.seq("medical", 4))
    assert exc.limit == "tokens_per_minute" and exc.value == 30
    assert 1.0 <= exc.retry_after_s <= 61.0  # when enough of the window has expired
    rig.submit(fine := rig.seq("legal", 2))  # others are not limited
    rig.wait_until(lambda: fine.done)
    assert len(fine.generated) == 2

    # engine death ends every row and queued request and releases all counts
    gate = rig.hold()
    waiting = [rig.seq("legal", 50) for _ in range(3)]
    for seq in waiting:
        rig.submit(seq)
    rig.submit(doomed := rig.seq("finance", 4))
    gate.set()
    rig.wait_until(lambda: all(s.done for s in [*waiting, doomed]))
    # the dying thread ends every request in its `finally`, then exits: wait for the exit
    rig.wait_until(lambda: not rig.engine.alive)
    view = rig.engine.fairness_view()
    assert all(v["waiting"] == 0 and v["in_flight"] == 0 for v in view.values()), view


# ---------------------------------------------------------------------- through `loramux serve`
STALL_S = 4  # the first forward pass of each "sleepy" request holds the engine this long


@pytest.fixture(scope="module")
def limit_root(tmp_path_factory, adapter_root: Path) -> Path:
    from factories import copy_adapter

    root = tmp_path_factory.mktemp("limit-adapters")
    for tenant in ("legal", "medical", "retail"):
        copy_adapter(adapter_root / tenant / "v1", root / tenant / "v1")
    copy_adapter(adapter_root / "finance" / "v1", root / "sleepy" / "v1")
    return root


def _limited_server(start_server, tiny_model_dir: Path, root: Path, *flags: str,
                    stall_s: float = STALL_S):
    from conftest import preload_flags

    return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--log-format", "text", *flags,
                        *preload_flags(root, ["legal", "medical", "retail", "sleepy"]),
                        env={"LORAMUX_TEST_FAULTS": f"stall:sleepy:{stall_s}"})


def _body(tenant: str, tokens: int = 4) -> dict:
    return {"tenant_id": tenant, "prompt": "a fair share", "max_new_tokens": tokens,
            "ignore_eos": True}


async def _queue_depth(client) -> float:
    from helpers import metric_value

    text = (await client.get("/metrics")).text
    return metric_value(text, "loramux_queue_depth")


async def _stalled(client, tasks: list) -> None:
    """Start a sleepy request and return once the engine is held in its stall: a probe
    request (retail, 1 token) has been seen waiting, without a break, for longer than an
    idle engine takes to admit it. (If the sleepy request and the probe were admitted
    together, or the stall ended first, start over.)"""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        assert time.monotonic() < deadline, "never saw the engine held by the stall"
        sleepy = asyncio.create_task(client.post("/generate", json=_body("sleepy", 2)))
        tasks.append(sleepy)
        await asyncio.sleep(0.2)
        probe = asyncio.create_task(client.post("/generate", json=_body("retail", 1)))
        tasks.append(probe)
        since = None
        while not (probe.done() or sleepy.done()):
            await asyncio.sleep(0.02)
            if await _queue_depth(client) >= 1:
                since = since or time.monotonic()
                if time.monotonic() - since > 0.5 and not probe.done():
                    return
            else:
                since = None
        if probe.done():
            assert probe.result().status_code != 429, probe.result().text
        await asyncio.gather(sleepy, probe)


def _assert_limited(response, limit: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()["error"]
    assert body["code"] == f"tenant_{limit}" and limit in body["message"], body
    assert int(response.headers["Retry-After"]) >= 1


def test_per_tenant_limits_answer_429_naming_the_limit_and_release_on_cancel(
        start_server, tiny_model_dir, limit_root):
    server = _limited_server(start_server, tiny_model_dir, limit_root,
                             "--tenant-max-concurrent", "2", "--tenant-max-queued", "1")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            tasks: list = []
            await _stalled(client, tasks)
            # legal: one waits; the next is beyond max_queued
            waiting = asyncio.create_task(client.post("/generate", json=_body("legal")))
            while await _queue_depth(client) < 2:
                await asyncio.sleep(0.02)
            _assert_limited(await client.post("/generate", json=_body("legal")), "max_queued")
            # sleepy: one runs (stalled), one more waits; the third is beyond max_concurrent
            second = asyncio.create_task(client.post("/generate", json=_body("sleepy", 2)))
            while await _queue_depth(client) < 3:
                await asyncio.sleep(0.02)
            _assert_limited(await client.post("/generate", json=_body("sleepy")),
                            "max_concurrent")
            # a limited tenant does not limit another
            other = asyncio.create_task(client.post("/generate", json=_body("medical")))
            results = await asyncio.gather(waiting, second, other, *tasks)
            assert all(r.status_code == 200 for r in results), [r.text for r in results]

            # cancels: two legal requests wait in a stall and their clients go away
            tasks = []
            await _stalled(client, tasks)
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as quitter:
                gone = asyncio.create_task(quitter.post("/generate", json=_body("legal")))
                while await _queue_depth(client) < 2:
                    await asyncio.sleep(0.02)
                gone.cancel()  # the connection closes
            await asyncio.gather(*tasks)
            # the cancelled request's count is gone: one legal request may wait again, the
            # next is refused (with a leaked count the first would already be refused)
            tasks = []
            await _stalled(client, tasks)
            again = asyncio.create_task(client.post("/generate", json=_body("legal")))
            while await _queue_depth(client) < 2:
                await asyncio.sleep(0.02)
            _assert_limited(await client.post("/generate", json=_body("legal")), "max_queued")
            assert (await again).status_code == 200
            await asyncio.gather(*tasks)
            from helpers import metric_value, metrics

            text = metrics(server.url)
            assert metric_value(text, "loramux_tenant_limited_total", tenant="legal",
                                limit="max_queued") == 2

    asyncio.run(scenario())


def test_tokens_per_minute_and_release_after_timeouts(start_server, tiny_model_dir,
                                                      limit_root):
    server = _limited_server(start_server, tiny_model_dir, limit_root,
                             "--tenant-tokens-per-minute", "60", "--tenant-max-queued", "1",
                             # a timeout that a loaded machine still meets (64 tokens of the
                             # tiny model took over 5 s at load 7 on 2 cores), a stall it
                             # cannot: the probe waits ~12 s of the 13 s stall
                             "--request-timeout-s", "8", stall_s=13)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            first = await client.post("/generate", json=_body("legal", 64))
            assert first.status_code == 200, first.text
            response = await client.post("/generate", json=_body("legal"))
            _assert_limited(response, "tokens_per_minute")
            assert 1 <= int(response.headers["Retry-After"]) <= 61
            assert (await client.post("/generate", json=_body("medical"))).status_code == 200

            # timeouts: the retail probe waits through a stall longer than its timeout
            tasks: list = []
            await _stalled(client, tasks)
            results = await asyncio.gather(*tasks)
            assert results[-1].status_code == 504, results[-1].text
            # its count was released: a retail probe may wait again (_stalled asserts it is
            # not refused), and exactly one: the next is beyond max_queued
            tasks = []
            await _stalled(client, tasks)
            _assert_limited(await client.post("/generate", json=_body("retail")),
                            "max_queued")
            await asyncio.gather(*tasks)

    asyncio.run(scenario())
