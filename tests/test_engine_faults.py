"""One bad request never takes anyone else down (issue 15).

Real `loramux serve` processes on loopback. In each scenario two innocent tenants are in
flight when the faulty request arrives; they must finish with the same text as when alone
(greedy, fp32: see tests/test_isolation.py for why equal texts are the right comparison).
Faults the schema cannot produce (an adapter that raises in the forward pass, sampling that
raises, an out-of-memory at prefill, a stalled or dead engine thread) are injected with
``LORAMUX_TEST_FAULTS`` (``loramux.inference.engine.parse_faults``).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess, preload_flags
from factories import copy_adapter, make_adapter
from helpers import generate, metric_value, metrics

INNOCENT = [("legal", "Draft a clause about liability", 160),
            ("medical", "Summarise the patient's symptoms", 160)]
FAULTY = ["overflow", "crashy", "badprefill", "badsample", "oomy", "sleepy", "doomed"]
FAULTS = ("decode:crashy,prefill:badprefill,sample:badsample,batch-prefill-oom:oomy,"
          "stall:sleepy:1.5")


@pytest.fixture(scope="module")
def fault_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
               adapter_root: Path) -> Path:
    root = tmp_path_factory.mktemp("fault-adapters")
    for tenant in ("legal", "medical"):
        copy_adapter(adapter_root / tenant / "v1", root / tenant / "v1")
    for tenant in FAULTY:
        if tenant != "overflow":
            copy_adapter(adapter_root / "finance" / "v1", root / tenant / "v1")
    # Finite weights whose products overflow fp32: inf/nan logits for this tenant's rows.
    make_adapter(tiny_model_dir, root / "overflow" / "v1", rank=8, seed=5, scale=1e30,
                 targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    return root


def _serve(start_server, tiny_model_dir: Path, root: Path, *extra: str,
           faults: str = FAULTS) -> ServerProcess:
    return start_server("--model", str(tiny_model_dir), "--quantization", "none",
                        "--log-format", "text", *extra,
                        *preload_flags(root, ["legal", "medical", *FAULTY]),
                        env={"LORAMUX_TEST_FAULTS": faults})


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir: Path, fault_root: Path) -> ServerProcess:
    return _serve(start_server, tiny_model_dir, fault_root)


@pytest.fixture(scope="module")
def solo(server: ServerProcess) -> list[str]:
    return [generate(server.url, t, p, n)["text"] for t, p, n in INNOCENT]


def _body(tenant: str, prompt: str, tokens: int, **extra: object) -> dict:
    return {"tenant_id": tenant, "prompt": prompt, "max_new_tokens": tokens,
            "ignore_eos": True, **extra}


async def _with_innocents(url: str, faulty: list[dict], delay: float = 0.15,
                          first: dict | None = None) -> tuple[list[httpx.Response], list[dict]]:
    """Start the innocents (after ``first``, if given), send each ``faulty`` body ``delay``
    seconds later, and return (faulty responses, innocent results with their end times)."""
    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.monotonic()

        async def innocent(tenant: str, prompt: str, tokens: int) -> dict:
            r = await client.post(f"{url}/generate", json=_body(tenant, prompt, tokens))
            return {"status": r.status_code, "body": r.json(), "end": time.monotonic() - t0}

        async def bad(body: dict) -> httpx.Response:
            await asyncio.sleep(delay)
            return await client.post(f"{url}/generate", json=body)

        pacer = asyncio.create_task(client.post(f"{url}/generate", json=first)) if first else None
        if pacer is not None:
            await asyncio.sleep(0.3)
        results = await asyncio.gather(*(innocent(*job) for job in INNOCENT),
                                       *(bad(b) for b in faulty))
        if pacer is not None:
            assert (await pacer).status_code == 200
    return list(results[len(INNOCENT):]), list(results[:len(INNOCENT)])


def _check_innocents(innocents: list[dict], solo: list[str], faulty_sent_at: float) -> None:
    for result, text in zip(innocents, solo, strict=True):
        assert result["status"] == 200, result
        assert result["body"]["text"] == text
        assert result["end"] > faulty_sent_at  # it was in flight when the fault came


# ---------------------------------------------------------------------- item 1
EXTREMES: list[dict] = [
    {"temperature": 1e-30, "seed": 0},
    {"temperature": 5e-324, "seed": 2**63 - 1},
    {"temperature": 5.0, "seed": 2**63 - 1},
    {"temperature": 5.0, "top_p": 1e-300, "seed": 1},
    {"temperature": 0.7, "top_p": 1.0, "seed": 0},
    {"temperature": 1.0, "top_p": 5e-324},
    {"temperature": 1.0, "stop": ["é", "日本", "🙂", "\u0000", "a" * 128, "ab", "abc", "b"]},
    {"temperature": 0.0, "stop": ["x" * 128]},  # longer than the whole output
    {"temperature": 2.0, "stop": "\U0010ffff"},
]


def test_extreme_sampling_parameters_never_fail_a_step(server, solo) -> None:
    faulty = [_body("legal", "Quarterly revenue grew by", 24, **x) for x in EXTREMES]
    responses, innocents = asyncio.run(_with_innocents(server.url, faulty))
    _check_innocents(innocents, solo, 0.15)
    for extra, r in zip(EXTREMES, responses, strict=True):
        assert r.status_code == 200, (extra, r.text)
    # A temperature that small is argmax: the same text as greedy.
    greedy_text = generate(server.url, "legal", "Quarterly revenue grew by", 24)["text"]
    assert responses[0].json()["text"] == greedy_text
    assert responses[1].json()["text"] == greedy_text
    # A stop string longer than the output cuts nothing.
    assert responses[7].json()["text"] == greedy_text


@pytest.mark.parametrize("extra", [{"temperature": 0.0}, {"temperature": 0.8, "seed": 3},
                                   {"temperature": 0.0, "stream": True}])
def test_non_finite_logits_end_that_row_alone(server, solo, extra) -> None:
    responses, innocents = asyncio.run(_with_innocents(
        server.url, [_body("overflow", "Any prompt at all", 24, **extra)]))
    _check_innocents(innocents, solo, 0.15)
    r = responses[0]
    # The first token is already non-finite: a stream answers with the HTTP status too, not
    # with a 200 that carries the error.
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "generation_failed"
    assert "non-finite" in r.json()["error"]["message"]


# ---------------------------------------------------------------------- item 2
@pytest.mark.parametrize(("tenant", "stage"), [("crashy", "decode"), ("badprefill", "prefill"),
                                               ("badsample", "sample")])
def test_a_failing_row_ends_alone_and_the_step_goes_on(server, solo, tenant, stage) -> None:
    before = metric_value(metrics(server.url), "loramux_requests_total", outcome="ok")
    # sleepy stalls its first forward pass, so the others land in one group and one batch.
    first = _body("sleepy", "Pace the batch", 4)
    responses, innocents = asyncio.run(_with_innocents(
        server.url, [_body(tenant, "This one fails", 24)], delay=0.0, first=first))
    _check_innocents(innocents, solo, 0.0)
    assert responses[0].status_code == 503, responses[0].text
    assert responses[0].json()["error"]["code"] == "generation_failed"
    text = metrics(server.url)
    assert metric_value(text, "loramux_requests_total", outcome="ok") == before + 3
    assert metric_value(text, "loramux_row_failures_total", tenant=tenant, stage=stage) == 1
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_out_of_memory_of_a_prefill_group_costs_nobody(server, solo) -> None:
    first = _body("sleepy", "Pace the batch", 4)
    responses, innocents = asyncio.run(_with_innocents(
        server.url, [_body("oomy", "Big group", 8)], delay=0.0, first=first))
    _check_innocents(innocents, solo, 0.0)
    assert responses[0].status_code == 200, responses[0].text
    assert "prefilling them one by one" in server.log()


# ---------------------------------------------------------------------- item 3
def test_a_stalled_or_dead_engine_fails_health_and_new_requests_at_once(
        start_server, tiny_model_dir, fault_root) -> None:
    srv = _serve(start_server, tiny_model_dir, fault_root, "--engine-stall-timeout-s", "1",
                 faults="stall:sleepy:6,die:doomed")
    alone = generate(srv.url, "legal", "Wait for me", 48)["text"]

    async def scenario() -> dict:
        async with httpx.AsyncClient(timeout=120) as client:
            innocent = asyncio.create_task(client.post(f"{srv.url}/generate",
                                                       json=_body("legal", "Wait for me", 48)))
            stuck = asyncio.create_task(client.post(f"{srv.url}/generate",
                                                    json=_body("sleepy", "Stall", 4)))
            await asyncio.sleep(2.5)  # the engine sleeps in sleepy's prefill; limit is 1s
            health = await client.get(f"{srv.url}/healthz")
            ready = await client.get(f"{srv.url}/readyz")
            t = time.monotonic()
            new = await client.post(f"{srv.url}/generate", json=_body("medical", "New", 4))
            new_took = time.monotonic() - t
            done = await innocent
            await stuck
            after = await client.get(f"{srv.url}/healthz")
            return {"health": health, "ready": ready, "new": new, "new_took": new_took,
                    "innocent": done, "after": after}

    out = asyncio.run(scenario())
    assert out["health"].status_code == 503
    assert out["health"].json()["error"]["code"] == "engine_stalled"
    assert out["ready"].status_code == 503
    assert out["new"].status_code == 503 and out["new_took"] < 1.0
    assert out["new"].json()["error"]["code"] == "engine_stalled"
    # Progress resumed: healthy again, and the in-flight request was not harmed.
    assert out["after"].status_code == 200
    assert out["innocent"].status_code == 200 and out["innocent"].json()["text"] == alone

    # The thread dies: everyone in flight gets a 503 now (not at their timeout), and so does
    # every new request.
    t = time.monotonic()
    r = httpx.post(f"{srv.url}/generate", json=_body("doomed", "Die", 4), timeout=60)
    assert r.status_code == 503 and time.monotonic() - t < 10
    health = httpx.get(f"{srv.url}/healthz", timeout=5)
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_down"
    assert httpx.get(f"{srv.url}/readyz", timeout=5).status_code == 503
    t = time.monotonic()
    r = httpx.post(f"{srv.url}/generate", json=_body("legal", "After", 4), timeout=60)
    assert r.status_code == 503 and time.monotonic() - t < 1.0
    srv.stop()


# ---------------------------------------------------------------------- item 4
# A client that stops reading blocks the server's sends only once the kernel's socket
# buffers are full (about 4 MB on loopback here: minutes of tiny-model tokens), so these
# drive the app's stream and the router's relay directly, with a send that never completes
# (what a full socket looks like to the app) and an upstream that never ends.
def test_a_stream_nobody_reads_is_ended_and_its_row_freed() -> None:
    from loramux.inference.app import BoundedStreamingResponse

    closed, aborted, sent = [], [], []

    async def body():
        try:
            for i in range(10_000):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and len(sent) > 3:
            await asyncio.Event().wait()  # the client reads nothing: blocked for ever

    async def scenario() -> float:
        response = BoundedStreamingResponse(body(), send_timeout_s=0.3,
                                            on_abort=lambda: aborted.append(True),
                                            media_type="text/event-stream")
        t = time.monotonic()
        await asyncio.wait_for(response.stream_response(send), 5)
        return time.monotonic() - t

    took = asyncio.run(scenario())
    assert took < 2 and aborted == [True] and closed == [True]  # row cancelled, stream closed


def test_a_forwarded_stream_has_a_total_bound() -> None:
    from loramux.inference.routing import Forwarded, Route

    async def endless():
        while True:
            yield b"data: {}\n\n"
            await asyncio.sleep(0.05)

    async def scenario() -> list[bytes]:
        response = httpx.Response(200, content=endless())
        forwarded = Forwarded(response, Route(tenant="legal", url="http://internal:1"), 0.3)
        return [chunk async for chunk in forwarded.stream()]

    t = time.monotonic()
    chunks = asyncio.run(scenario())
    assert time.monotonic() - t < 3
    assert b"upstream_stream_broken" in chunks[-1] and chunks[-1].endswith(b"[DONE]\n\n")
    assert b"internal" not in b"".join(chunks)


# ---------------------------------------------------------------------- item 6
def test_public_failure_reasons_carry_no_paths_or_uris(server, tmp_path: Path) -> None:
    from loramux.inference.app import public_reason

    reason = ("adapter a@v1 failed to load: [Errno 2] No such file: '/var/lib/loramux/a/v1/"
              "adapter_config.json' (from s3://bucket/tenants/a/v1/ via http://10.0.0.7:8000/x)")
    scrubbed = public_reason(reason)
    assert "/var/lib" not in scrubbed and "s3://" not in scrubbed and "10.0.0.7" not in scrubbed
    assert scrubbed.startswith("adapter a@v1 failed to load: [Errno 2] No such file:")

    broken = tmp_path / "secret-dir" / "broken" / "v1"
    broken.mkdir(parents=True)  # no adapter_config.json: the loader names the path
    httpx.put(f"{server.url}/admin/adapters/broken/v1",
              json={"path": str(broken), "activate": True}, timeout=30)
    admin = httpx.get(f"{server.url}/admin/adapters", timeout=10).json()["adapters"]
    entry = next(a for a in admin if a["tenant"] == "broken")
    assert entry["state"] == "failed"
    assert str(broken) in entry["reason"]  # admins see the full reason
    r = httpx.post(f"{server.url}/generate", json=_body("broken@v1", "hi", 4), timeout=30)
    assert r.status_code in (404, 503), r.text
    assert "secret-dir" not in r.text and str(tmp_path) not in r.text
