"""A bound on the wait for a row (``--max-queue-wait-s``): a request whose estimated wait
exceeds it is refused at submission (429 ``overloaded``, ``Retry-After``), one that still
waits longer is ended with 429, and neither counts against its adapter version. The
estimate is fair-share aware: a tenant with nothing waiting is not refused for another
tenant's backlog. Real engine thread and real server process, tiny model, fp32."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from engine_rig import HANG_GUARD_S, EngineRig

from conftest import preload_flags
from helpers import metric_value
from loramux.inference.engine import Overloaded

LIMIT_S = 1.5


def _rig(tiny_model_dir, adapter_root, admission: str) -> EngineRig:
    return EngineRig(tiny_model_dir, adapter_root, ["legal", "medical", "retail"],
                     max_batch_size=1, max_queue_wait_s=LIMIT_S, admission=admission)


@pytest.fixture(scope="module")
def fair(tiny_model_dir, adapter_root):
    made = _rig(tiny_model_dir, adapter_root, "fair")
    yield made
    made.close()


def _one_admission_per_second(rig: EngineRig) -> None:
    """The recent past as the estimate reads it: 9 admissions at capacity over the last
    9 s, one per second."""
    now = time.monotonic()
    rig.engine._admitted_at.clear()
    rig.engine._admitted_at.extend(now - 9.5 + i for i in range(9))


def _busy_row(rig: EngineRig):
    """A request on the only row (held with the engine, it keeps it): no free row."""
    runner = rig.seq("retail", 40, prompt_len=6)
    rig.submit(runner)
    rig.wait_until(lambda: len(runner.generated) >= 1)
    return runner


def _submit_all(rig: EngineRig, tenants: list[str]) -> list[str | float]:
    """Submit one request per tenant in order, the engine held: what each got ("ok", or
    the refusal's Retry-After)."""
    results: list[str | float] = []
    for tenant in tenants:
        seq = rig.seq(tenant, 2)
        try:
            rig.submit(seq)
            results.append("ok")
        except Overloaded as exc:
            assert exc.estimate_s > LIMIT_S
            results.append(exc.retry_after_s)
    return results


def _drain(rig: EngineRig, gate) -> None:
    gate.set()
    rig.wait_until(lambda: rig.engine.queue_depth == 0 and rig.engine.rows_in_use == 0)


def test_the_estimate_refuses_a_backlogged_tenant_but_not_a_light_one(fair):
    """One admission per second and a bound of 1.5 s. medical's third request would wait
    for its own two (about 2 s): refused. retail, with nothing waiting, would be admitted
    after about one round of the one backlogged tenant (1 s): accepted, although 2
    requests wait in all. legal then finds 2 tenants backlogged (2 s): refused."""
    engine = fair.engine
    shed = engine.metrics.requests_shed._per_tenant
    before = shed.get(("medical", "estimated_wait"), 0.0)
    _busy_row(fair)
    gate = fair.hold()
    try:
        _one_admission_per_second(fair)
        results = _submit_all(fair, ["medical", "medical", "medical", "retail", "legal"])
    finally:
        _drain(fair, gate)
    assert results[:2] == ["ok", "ok"] and results[3] == "ok", results
    assert isinstance(results[2], float) and results[2] >= 1.0
    assert isinstance(results[4], float)
    assert shed.get(("medical", "estimated_wait"), 0.0) == before + 1


def test_under_fifo_every_request_waits_behind_the_whole_queue(tiny_model_dir, adapter_root):
    rig = _rig(tiny_model_dir, adapter_root, "fifo")
    try:
        _busy_row(rig)
        gate = rig.hold()
        try:
            _one_admission_per_second(rig)
            results = _submit_all(rig, ["medical", "medical", "retail"])
        finally:
            _drain(rig, gate)
    finally:
        rig.close()
    assert results[:2] == ["ok", "ok"] and isinstance(results[2], float), results


def test_no_estimate_without_admissions_at_capacity_and_free_rows_wait_for_nobody(
        tiny_model_dir, adapter_root):
    """No admissions at capacity in the window (a fresh or lightly loaded server):
    nothing is refused up front, the bound at the queue still holds. And requests that
    free rows take at once are never refused, whatever the rate."""
    rig = EngineRig(tiny_model_dir, adapter_root, ["legal", "medical", "retail"],
                    max_batch_size=3, max_queue_wait_s=LIMIT_S)
    try:
        gate = rig.hold()
        try:
            rig.engine._admitted_at.clear()
            no_history = _submit_all(rig, ["medical"] * 5)
        finally:
            _drain(rig, gate)
        gate = rig.hold()
        try:
            _one_admission_per_second(rig)
            # 3 free rows take medical's first 4 at once (3 ahead of the 4th); its 5th has 1
            # ahead after them (about 1 s); its 6th has 2 (about 2 s): refused
            free_rows = _submit_all(rig, ["medical"] * 6)
        finally:
            _drain(rig, gate)
    finally:
        rig.close()
    assert no_history == ["ok"] * 5
    assert free_rows[:5] == ["ok"] * 5 and isinstance(free_rows[5], float), free_rows


def test_a_request_that_waits_longer_than_the_bound_ends_with_429(fair):
    """Held past the bound, a waiting request is shed (429, counted as shed and not against
    its adapter version) at the next step; a request submitted after runs."""
    engine = fair.engine
    counts, shed = engine.metrics.requests._per_tenant, engine.metrics.requests_shed._per_tenant
    before = counts.get(("legal", "shed"), 0.0), shed.get(("legal", "queue_wait"), 0.0)
    gate = fair.hold()
    try:
        engine._admitted_at.clear()
        late = fair.seq("legal", 2)
        fair.submit(late)
        outcomes = late.entry.outcomes
        verdicts_before = outcomes.view()
        time.sleep(LIMIT_S + 0.2)
    finally:
        gate.set()
    fair.wait_until(lambda: late.done)
    assert counts.get(("legal", "shed"), 0.0) == before[0] + 1
    assert shed.get(("legal", "queue_wait"), 0.0) == before[1] + 1
    assert len(late.generated) == 0
    assert outcomes.view() == verdicts_before  # overload is no verdict on the adapter
    on_time = fair.seq("legal", 3)
    fair.submit(on_time)
    fair.wait_until(lambda: on_time.done)
    assert len(on_time.generated) == 3


@pytest.mark.parametrize("stream", [False, True])
def test_a_flooded_server_answers_429_overloaded_and_serves_the_rest(
        start_server, tiny_model_dir, adapter_root, stream):
    """Over HTTP: one row, a bound of 0.3 s and 8 long requests at once. The ones that
    would wait too long get 429 with code overloaded and Retry-After (streams too: as an
    HTTP status, never as an error inside a 200 stream, whether refused at submission or
    shed after waiting); the rest are served in full; the server takes work again once the
    flood is over."""
    server = start_server(
        "--model", str(tiny_model_dir), "--quantization", "none", "--log-format", "text",
        "--auth", "none", "--max-batch-size", "1", "--max-queue-wait-s", "0.3",
        *preload_flags(adapter_root, ["legal"]))
    body = {"tenant_id": "legal", "prompt": "flood", "max_new_tokens": 400,
            "ignore_eos": True, "stream": stream}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=HANG_GUARD_S) as client:
            return await asyncio.gather(*(client.post(f"{server.url}/generate", json=body)
                                          for _ in range(8)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "overloaded", r.text
            assert "max_queue_wait_s" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
        elif stream:
            events = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            assert not [e for e in events if "error" in e], r.text
            assert events[-1]["usage"]["completion_tokens"] == 400
        else:
            assert r.json()["usage"]["completion_tokens"] == 400
    with httpx.Client(timeout=HANG_GUARD_S) as http:
        text = http.get(f"{server.url}/metrics").text
        assert metric_value(text, "loramux_requests_shed_total") == statuses.count(429)
        small = {**body, "max_new_tokens": 2, "stream": False}
        assert http.post(f"{server.url}/generate", json=small).status_code == 200
