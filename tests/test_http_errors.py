"""Every bad input gets its precise status and reason over real HTTP; nothing is ever a 500.

Three server processes, one module-scoped fixture each (a start costs seconds):

- ``fp32_server``: defaults, every tenant preloaded; request validation, names, streaming,
  stop strings, health and metrics;
- ``strict``: tight limits (prompt tokens, body bytes, max_new_tokens, rank 8), an admin
  token, base fallback for unknown tenants and a pinned adapter; admin-API rejections;
- ``busy``: one batch row and one queue place, one device slot and no host cache room, the
  admin token in a file; queue overflow and cache-tier metrics.

Every response goes through :func:`_sane`: no status 500 and no "Traceback" in any body.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_adapter_validation import OTHER_BASE, build_bad_adapters

from conftest import preload_flags
from helpers import metric_value

TOKEN = "secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
BASE = "tiny-llama"  # the tiny model's directory name, which the server serves it under


# ---------------------------------------------------------------------- response checks
def _check(response: httpx.Response) -> None:
    assert response.status_code != 500, f"{response.request.url}: {response.text[:2000]}"
    assert "Traceback" not in response.text, response.text[:2000]


def _sane(response: httpx.Response) -> None:
    response.read()
    _check(response)


async def _asane(response: httpx.Response) -> None:
    await response.aread()
    _check(response)


def _client(**kwargs) -> httpx.Client:
    return httpx.Client(timeout=120, event_hooks={"response": [_sane]}, **kwargs)


def _aclient(**kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=300, event_hooks={"response": [_asane]}, **kwargs)


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with _client() as client:
        yield client


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """Assert the status (and error code); return the error object."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _sse(response: httpx.Response) -> list[dict | str]:
    """The ``data:`` payloads of an event stream; ``[DONE]`` stays a string."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _greedy(tenant: str, prompt: str, tokens: int = 20, **extra) -> dict:
    return {"tenant_id": tenant, "prompt": prompt, "max_new_tokens": tokens,
            "ignore_eos": True, **extra}


def _wait_until(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# ---------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    return build_bad_adapters(tiny_model_dir, tmp_path_factory.mktemp("http-bad-adapters"))


@pytest.fixture(scope="module")
def strict(start_server, tiny_model_dir: Path, adapter_root: Path):
    return start_server(
        "--model", str(tiny_model_dir), "--quantization", "none", "--log-format", "text",
        "--max-prompt-tokens", "16", "--max-new-tokens-limit", "64",
        "--default-max-new-tokens", "16", "--max-body-bytes", "4096",
        "--unknown-tenant", "base", "--admin-token", TOKEN, "--max-lora-rank", "8",
        *preload_flags(adapter_root, ["legal", "finance"]), "--pin", "legal@v1",
    )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "admin-token"
    path.write_text("from-a-file\n")  # the trailing newline is stripped
    return path


@pytest.fixture(scope="module")
def busy(start_server, tiny_model_dir: Path, adapter_root: Path, token_file: Path):
    return start_server(
        "--model", str(tiny_model_dir), "--quantization", "none", "--log-format", "text",
        "--max-queue", "1", "--max-batch-size", "1",
        "--device-adapter-slots", "1", "--host-cache-bytes", "1",
        "--admin-token-file", str(token_file),
        *preload_flags(adapter_root, ["legal", "finance", "retail"]),
    )


# ====================================================================== request validation
@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_422_with_the_decode_error(http, fp32_server, route):
    r = http.post(f"{fp32_server.url}{route}", content=b'{"tenant_id": "legal", "prompt": ',
                  headers={"content-type": "application/json"})
    error = _error(r, 422, "invalid_request")
    assert "JSON decode error" in error["message"]


def test_body_that_is_not_an_object_is_422(http, fp32_server):
    r = http.post(f"{fp32_server.url}/generate", json=["legal", "hello"])
    assert "valid dictionary" in _error(r, 422, "invalid_request")["message"]


@pytest.mark.parametrize(("change", "field"), [
    ({"temperature": -1}, "temperature"),
    ({"temperature": 6}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": "ten"}, "max_new_tokens"),
    ({"seed": -1}, "seed"),
    ({"stream": "maybe"}, "stream"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"tenant_id": ""}, "tenant_id"),
    ({"stop": [f"s{i}" for i in range(9)]}, "at most 8 stop strings"),
    ({"stop": ["x" * 129]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"n": 1}, "n: Extra inputs are not permitted"),
    ({"adapter": "legal@v1"}, "adapter: Extra inputs are not permitted"),
])
def test_generate_rejects_wrong_types_out_of_range_and_unknown_fields_with_422(
        http, fp32_server, change, field):
    r = http.post(f"{fp32_server.url}/generate", json={**_greedy("legal", "hello"), **change})
    assert field in _error(r, 422, "invalid_request")["message"]


def test_missing_required_fields_are_422_naming_them(http, fp32_server):
    r = http.post(f"{fp32_server.url}/generate", json={})
    message = _error(r, 422, "invalid_request")["message"]
    assert "tenant_id: Field required" in message and "prompt: Field required" in message


@pytest.mark.parametrize(("route", "change", "field"), [
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/completions", {"prompt": ["one", "two"]}, "exactly one prompt"),
    ("/v1/completions", {"temperature": -1}, "temperature"),
    ("/v1/completions", {"top_p": 0}, "top_p"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}, "at most 8"),
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_openai_routes_reject_unsupported_and_out_of_range_fields_with_422(
        http, fp32_server, route, change, field):
    body = {"model": "legal", "prompt": "hello", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}], **change}
    r = http.post(f"{fp32_server.url}{route}", json=body)
    assert field in _error(r, 422, "invalid_request")["message"]


def test_openai_routes_ignore_unknown_fields_as_openai_does(http, fp32_server):
    r = http.post(f"{fp32_server.url}/v1/completions", json={
        "model": "legal", "prompt": "hello", "max_tokens": 2, "logit_bias": {}, "user": "u1"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("route", "body"), [
    ("/generate", {"tenant_id": "legal", "prompt": "hi", "max_new_tokens": 2049}),
    ("/v1/completions", {"model": "legal", "prompt": "hi", "max_tokens": 2049}),
    ("/v1/chat/completions", {"model": "legal", "max_completion_tokens": 5000,
                              "messages": [{"role": "user", "content": "hi"}]}),
])
def test_max_new_tokens_above_the_server_limit_is_422_naming_the_limit(
        http, fp32_server, route, body):
    error = _error(http.post(f"{fp32_server.url}{route}", json=body), 422,
                   "max_tokens_too_large")
    assert "2048" in error["message"]


# ====================================================================== names and tenants
INVALID_NAMES = ["../etc", "UPPER", "under_score", "-dash", "a" * 64, "legal@", "legal@V1",
                 "legal@v1@v2", "tenant/../x"]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_tenant_name_is_422_on_generate(http, fp32_server, name):
    r = http.post(f"{fp32_server.url}/generate", json=_greedy(name, "hi", 2))
    error = _error(r, 422, "invalid_name")
    reasons = ("not a DNS-1123 label", "empty version after '@'", "longer than 63")
    assert any(reason in error["message"] for reason in reasons), error


@pytest.mark.parametrize("name", INVALID_NAMES)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_invalid_model_name_is_404_model_not_found_on_openai_routes(http, fp32_server, route,
                                                                   name):
    r = http.post(f"{fp32_server.url}{route}", json={
        "model": name, "prompt": "hi", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]})
    assert "not found" in _error(r, 404, "model_not_found")["message"]


@pytest.mark.parametrize("name", ["nosuch", "legal@v9"])
def test_unknown_tenant_or_version_is_404(http, fp32_server, name):
    r = http.post(f"{fp32_server.url}/generate", json=_greedy(name, "hi", 2))
    assert name in _error(r, 404, "model_not_found")["message"]
    r = http.post(f"{fp32_server.url}/v1/completions",
                  json={"model": name, "prompt": "hi", "max_tokens": 2})
    _error(r, 404, "model_not_found")


def test_base_model_by_name_is_served_with_adapter_null(http, fp32_server):
    r = http.post(f"{fp32_server.url}/generate", json=_greedy(BASE, "hi", 3))
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] is None and r.json()["version"] is None


# ====================================================================== health and metrics
def test_healthz_and_readyz_are_200(http, fp32_server):
    assert http.get(f"{fp32_server.url}/healthz").json() == {"status": "ok"}
    ready = http.get(f"{fp32_server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_metrics_expose_requests_tokens_latencies_batch_queue_and_cache(http, fp32_server):
    before = http.get(f"{fp32_server.url}/admin/metrics").text
    ok_before = metric_value(before, "loramux_requests_total", tenant="legal", outcome="ok")
    done = http.post(f"{fp32_server.url}/generate", json=_greedy("legal", "count me", 5)).json()
    text = http.get(f"{fp32_server.url}/admin/metrics").text

    def value(name: str, **labels: str) -> float:
        return metric_value(text, name, **labels)

    assert value("loramux_requests_total", tenant="legal", outcome="ok") == ok_before + 1
    assert value("loramux_prompt_tokens_total", tenant="legal") >= done["usage"]["prompt_tokens"]
    assert value("loramux_completion_tokens_total", tenant="legal") >= 5
    assert value("loramux_time_to_first_token_seconds_count", tenant="legal") >= 1
    assert value("loramux_time_to_first_token_seconds_bucket", tenant="legal", le="+Inf") >= 1
    assert value("loramux_request_latency_seconds_count", tenant="legal") >= 1
    assert value("loramux_request_latency_seconds_sum", tenant="legal") > 0
    assert value("loramux_batch_size_count") >= 4  # one per decode step
    assert "loramux_batch_size_bucket{le=" in text
    assert "\nloramux_queue_depth 0.0" in text
    # Preloading read every adapter from disk; the first request promoted legal to the device.
    assert value("loramux_adapter_load_seconds_count", source="disk", target="host") >= 6
    assert value("loramux_adapter_load_seconds_count", source="host", target="device") >= 1
    assert value("loramux_adapter_cache_hits_total", tier="host") >= 1
    assert value("loramux_adapter_cache_misses_total", tier="device") >= 1
    assert value("loramux_resident_adapters", tier="disk") == 6
    assert "# TYPE loramux_adapter_cache_evictions_total counter" in text


# ====================================================================== streaming
def test_generate_stream_deltas_concatenate_to_the_non_streamed_text(http, fp32_server):
    body = _greedy("medical", "Stream me the chart", 24)
    plain = http.post(f"{fp32_server.url}/generate", json=body).json()
    with http.stream("POST", f"{fp32_server.url}/generate", json={**body, "stream": True}) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["finish_reason"] == plain["finish_reason"] == "length"
    assert final["adapter"] == "medical@v1" and final["usage"] == plain["usage"]
    deltas = [e["text"] for e in events[:-2]]
    assert len(deltas) > 1
    assert "".join(deltas) == plain["text"]


def test_completions_stream_deltas_concatenate_to_the_non_streamed_text(http, fp32_server):
    body = {"model": "finance", "prompt": "Quarterly revenue", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True}
    plain = http.post(f"{fp32_server.url}/v1/completions", json=body).json()
    with http.stream("POST", f"{fp32_server.url}/v1/completions",
                     json={**body, "stream": True}) as r:
        assert r.headers["x-loramux-adapter"] == "finance@v1"
        events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == plain["usage"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == plain["choices"][0]["text"]
    assert len({c["id"] for c in chunks}) == 1


def test_chat_stream_content_deltas_concatenate_to_the_non_streamed_message(http, fp32_server):
    body = {"model": "support", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Where is my parcel?"}]}
    plain = http.post(f"{fp32_server.url}/v1/chat/completions", json=body).json()
    with http.stream("POST", f"{fp32_server.url}/v1/chat/completions",
                     json={**body, "stream": True}) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == plain["choices"][0]["message"]["content"]
    assert plain["choices"][0]["message"]["role"] == "assistant"


# ====================================================================== stop strings
def _stop_candidate(text: str) -> tuple[str, int]:
    """A 3-character piece from the middle third of ``text``, and where it first occurs.

    The piece holds no replacement character (an incomplete UTF-8 sequence decodes to one
    until its last byte arrives), so it appears in the growing text exactly where it does in
    the final one.
    """
    for start in range(len(text) // 3, 2 * len(text) // 3):
        piece = text[start:start + 3]
        if piece.strip() and "\ufffd" not in piece:
            return piece, text.find(piece)
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_cuts_the_text_before_it_with_finish_reason_stop(http, fp32_server):
    body = _greedy("travel", "Plan a trip to Lisbon", 40)
    full = http.post(f"{fp32_server.url}/generate", json=body).json()
    assert full["finish_reason"] == "length"
    stop, cut = _stop_candidate(full["text"])
    stopped = http.post(f"{fp32_server.url}/generate", json={**body, "stop": [stop]}).json()
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == full["text"][:cut]
    assert stop not in stopped["text"]
    assert stopped["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    # The streamed deltas never leak the stop string either.
    with http.stream("POST", f"{fp32_server.url}/generate",
                     json={**body, "stop": stop, "stream": True}) as r:
        events = _sse(r)
    assert "".join(e["text"] for e in events[:-2]) == full["text"][:cut]
    assert events[-2]["finish_reason"] == "stop"


def test_stop_string_on_completions_cuts_the_text_with_finish_reason_stop(http, fp32_server):
    body = {"model": "retail", "prompt": "Return policy", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    full = http.post(f"{fp32_server.url}/v1/completions", json=body).json()["choices"][0]
    stop, cut = _stop_candidate(full["text"])
    choice = http.post(f"{fp32_server.url}/v1/completions",
                       json={**body, "stop": stop}).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full["text"][:cut]


# ====================================================================== limits (strict)
@pytest.mark.parametrize(("route", "body"), [
    ("/generate", {"tenant_id": "legal", "prompt": "word " * 40, "max_new_tokens": 2}),
    ("/v1/completions", {"model": "legal", "prompt": "word " * 40, "max_tokens": 2}),
])
def test_prompt_above_max_prompt_tokens_is_413(http, strict, route, body):
    error = _error(http.post(f"{strict.url}{route}", json=body), 413, "prompt_too_long")
    assert "at most 16" in error["message"]


def test_prompt_within_max_prompt_tokens_is_served(http, strict):
    r = http.post(f"{strict.url}/generate", json=_greedy("legal", "word " * 10, 4))
    assert r.status_code == 200, r.text


def test_chat_prompt_above_max_prompt_tokens_is_413(http, strict):
    r = http.post(f"{strict.url}/v1/chat/completions", json={
        "model": "legal", "max_tokens": 2, "messages": [{"role": "user", "content": "hi " * 30}]})
    _error(r, 413, "prompt_too_long")


def test_max_new_tokens_above_the_configured_limit_is_422(http, strict):
    r = http.post(f"{strict.url}/generate", json=_greedy("legal", "hi", 65))
    assert "limit of 64" in _error(r, 422, "max_tokens_too_large")["message"]


def test_body_above_max_body_bytes_is_413_by_content_length(http, strict):
    body = json.dumps(_greedy("legal", "x" * 5000, 2)).encode()
    r = http.post(f"{strict.url}/generate", content=body,
                  headers={"content-type": "application/json"})
    assert "4096 bytes" in _error(r, 413, "body_too_large")["message"]


def test_chunked_body_above_max_body_bytes_is_413(http, strict):
    body = json.dumps(_greedy("legal", "x" * 5000, 2)).encode()
    chunks = iter([body[i:i + 1000] for i in range(0, len(body), 1000)])
    r = http.post(f"{strict.url}/generate", content=chunks,
                  headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "4096 bytes" in _error(r, 413, "body_too_large")["message"]


def test_unknown_tenant_falls_back_to_the_base_and_is_counted(http, strict):
    def fallbacks() -> float:
        return metric_value(http.get(f"{strict.url}/metrics").text,
                            "loramux_base_fallback_requests_total")

    before = fallbacks()
    r = http.post(f"{strict.url}/generate", json=_greedy("newcomer", "hello", 4))
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] is None and r.json()["tenant_id"] == "newcomer"
    r = http.post(f"{strict.url}/v1/completions",
                  json={"model": "newcomer", "prompt": "hello", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] is None and r.headers["x-loramux-adapter"] == "none"
    assert fallbacks() == before + 2
    # An unknown version of a known tenant is a 404, not silently the base model.
    r = http.post(f"{strict.url}/generate", json=_greedy("legal@v9", "hello", 2))
    assert "legal@v9" in _error(r, 404, "model_not_found")["message"]
    assert fallbacks() == before + 2
    # Known tenants still get their adapter, and invalid names are still refused.
    assert http.post(f"{strict.url}/generate",
                     json=_greedy("legal", "hello", 2)).json()["adapter"] == "legal@v1"
    _error(http.post(f"{strict.url}/generate", json=_greedy("UPPER", "hello", 2)), 422)


# ====================================================================== admin auth and pins
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}])
def test_admin_routes_without_the_right_bearer_token_are_401(http, strict, headers):
    for method, path, body in [
        ("GET", "/admin/adapters", None),
        ("PUT", "/admin/adapters/legal/v9", {"path": "/nowhere"}),
        ("DELETE", "/admin/adapters/legal/v1", None),
        ("PUT", "/admin/tenants/legal/active", {"version": "v1"}),
    ]:
        r = http.request(method, f"{strict.url}{path}", json=body, headers=headers)
        _error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    # Nothing was changed by the refused calls.
    assert http.post(f"{strict.url}/generate",
                     json=_greedy("legal", "hi", 2)).json()["adapter"] == "legal@v1"


def test_admin_routes_with_the_bearer_token_are_200(http, strict):
    assert http.get(f"{strict.url}/admin/adapters", headers=ADMIN).status_code == 200
    r = http.put(f"{strict.url}/admin/tenants/legal/active", json={"version": "v1"},
                 headers=ADMIN)
    assert r.status_code == 200 and r.json()["active"] is True


def test_admin_adapter_list_is_the_contract_and_names_the_base_model(http, strict):
    from loramux.contracts import AdapterList, AdapterState

    body = http.get(f"{strict.url}/admin/adapters", headers=ADMIN).json()
    listing = AdapterList.model_validate(body)
    assert listing.base_model == BASE and BASE in (listing.base_names or ())
    legal = next(a for a in listing.adapters if str(a.ref) == "legal@v1")
    assert legal.state == AdapterState.READY and legal.active and legal.pinned


def test_pinned_adapter_becomes_device_resident_and_then_readyz_is_200(http, strict):
    _wait_until(lambda: http.get(f"{strict.url}/readyz").status_code == 200, what="/readyz")
    listing = http.get(f"{strict.url}/admin/adapters", headers=ADMIN).json()["adapters"]
    legal = next(a for a in listing if a["tenant"] == "legal" and a["version"] == "v1")
    assert legal["pinned"] is True
    assert legal["residency"] == "device"
    assert legal["state"] == "ready"
    assert http.get(f"{strict.url}/healthz").status_code == 200


# ====================================================================== admin: bad adapters
BAD_LOADS = [
    # tenant, adapter key, code, words the message must hold
    ("badbase", "wrong_base", "wrong_base", [OTHER_BASE, "tiny-llama"]),
    ("badrank", "rank16", "rank_too_high", ["rank 16", "maximum of 8"]),
    ("badpickle", "pickle", "pickle_refused", ["adapter_model.bin", "pickle"]),
    ("badtrunc", "truncated", "corrupt_weights", ["adapter_model.safetensors", "truncated"]),
    ("badshape", "shape", "shape_mismatch", ["lora_A (4, 32)", "expected (4, 64)"]),
    ("badtarget", "unknown_target", "unknown_target_module", ["nonexistent_proj"]),
    ("baddora", "dora", "unsupported", ["DoRA"]),
    ("badconfig", "no_config", "missing_files", ["adapter_config.json"]),
]


def _put(client: httpx.Client, url: str, ref: str, path: Path | str, **extra) -> httpx.Response:
    tenant, _, version = ref.partition("@")
    return client.put(f"{url}/admin/adapters/{tenant}/{version}",
                      json={"path": str(path), **extra}, headers=ADMIN)


@pytest.fixture(scope="module")
def rejected_loads(strict, bad_adapters) -> dict:
    """PUT every bad adapter of BAD_LOADS while two tenants' traffic runs, and record both."""
    async def scenario() -> dict:
        served: list[tuple[float, float, int]] = []  # (start, end, status) per request
        loads_done = asyncio.Event()
        async with _aclient() as client:
            async def traffic(tenant: str) -> None:
                while not loads_done.is_set():
                    start = time.monotonic()
                    r = await client.post(f"{strict.url}/generate",
                                          json=_greedy(tenant, "keep serving", 8))
                    served.append((start, time.monotonic(), r.status_code))

            async def loads() -> dict:
                await asyncio.sleep(0.2)
                start = time.monotonic()
                try:
                    responses = {}
                    for tenant, key, _, _ in BAD_LOADS:
                        responses[tenant] = await client.put(
                            f"{strict.url}/admin/adapters/{tenant}/v1", headers=ADMIN,
                            json={"path": str(bad_adapters[key])})
                finally:
                    loads_done.set()
                return {"window": (start, time.monotonic()), "responses": responses}

            *_, result = await asyncio.gather(traffic("legal"), traffic("finance"), loads())
        return {**result, "served": served}

    return asyncio.run(scenario())


@pytest.mark.parametrize(("tenant", "code", "words"),
                         [(t, c, w) for t, _, c, w in BAD_LOADS], ids=[b[1] for b in BAD_LOADS])
def test_bad_adapter_load_is_422_with_its_reason_code_and_a_precise_message(
        rejected_loads, tenant, code, words):
    error = _error(rejected_loads["responses"][tenant], 422, code)
    assert error["message"].startswith(f"adapter {tenant}@v1 rejected: ")
    for word in words:
        assert word in error["message"], error


def test_other_tenants_keep_serving_during_and_after_rejected_loads(http, strict,
                                                                   rejected_loads):
    served = rejected_loads["served"]
    load_start, load_end = rejected_loads["window"]
    assert {status for _, _, status in served} == {200}
    during = [s for s in served if s[0] < load_end and s[1] > load_start]
    assert during, "no request overlapped the rejected loads"
    for tenant in ("legal", "finance"):
        r = http.post(f"{strict.url}/generate", json=_greedy(tenant, "after", 4))
        assert r.json()["adapter"] == f"{tenant}@v1"


def test_failed_adapters_are_listed_with_their_reason(http, strict, rejected_loads):
    listing = http.get(f"{strict.url}/admin/adapters", headers=ADMIN).json()["adapters"]
    by_tenant = {a["tenant"]: a for a in listing}
    for tenant, _, code, words in BAD_LOADS:
        entry = by_tenant[tenant]
        assert entry["state"] == "failed"
        assert entry["reason_code"] == code
        assert words[0] in entry["reason"]
        assert entry["active"] is False and entry["residency"] == "disk"
    assert by_tenant["legal"]["state"] == "ready"
    models = {m["id"] for m in http.get(f"{strict.url}/v1/models").json()["data"]}
    assert "legal" in models and not any(m.startswith("bad") for m in models)


@pytest.mark.parametrize("model", ["badbase@v1", "badbase"])
def test_request_for_a_failed_adapter_is_503_with_the_reason(http, strict, rejected_loads,
                                                             model):
    # Even with --unknown-tenant base, a tenant whose adapter failed is not silently
    # served by the base model: it is known, and broken.
    r = http.post(f"{strict.url}/generate", json=_greedy(model, "hi", 2))
    error = _error(r, 503, "adapter_unavailable")
    assert "badbase@v1" in error["message"] and OTHER_BASE in error["message"]
    # Retrying cannot help until a fixed adapter is published, so no Retry-After.
    assert "retry-after" not in r.headers
    r = http.post(f"{strict.url}/v1/completions",
                  json={"model": model, "prompt": "hi", "max_tokens": 2})
    assert OTHER_BASE in _error(r, 503, "adapter_unavailable")["message"]


def test_failed_version_of_a_serving_tenant_leaves_its_active_version_serving(
        http, strict, bad_adapters):
    r = _put(http, strict.url, "finance@v2", bad_adapters["truncated"], activate=True)
    _error(r, 422, "corrupt_weights")
    ok = http.post(f"{strict.url}/generate", json=_greedy("finance", "still v1", 4))
    assert ok.json()["adapter"] == "finance@v1"
    _error(http.post(f"{strict.url}/generate", json=_greedy("finance@v2", "x", 2)), 503,
           "adapter_unavailable")
    r = http.put(f"{strict.url}/admin/tenants/finance/active", json={"version": "v2"},
                 headers=ADMIN)
    error = _error(r, 409, "not_ready")
    assert "failed" in error["message"] and "truncated" in error["message"]


def test_failed_version_can_be_loaded_again_from_a_fixed_path(http, strict, bad_adapters):
    _error(_put(http, strict.url, "retry@v1", bad_adapters["truncated"]), 422, "corrupt_weights")
    r = _put(http, strict.url, "retry@v1", bad_adapters["good"])
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "ready" and r.json()["reason"] is None
    served = http.post(f"{strict.url}/generate", json=_greedy("retry", "fixed", 4)).json()
    assert served["adapter"] == "retry@v1"


def test_same_version_from_a_different_path_is_409_and_from_the_same_path_is_200(
        http, strict, adapter_root):
    first = _put(http, strict.url, "retail@v1", adapter_root / "retail" / "v1")
    assert first.status_code == 200, first.text
    again = _put(http, strict.url, "retail@v1", adapter_root / "retail" / "v1")
    assert again.status_code == 200, again.text
    error = _error(_put(http, strict.url, "retail@v1", adapter_root / "travel" / "v1"), 409,
                   "conflict")
    assert "immutable" in error["message"]
    served = http.post(f"{strict.url}/generate", json=_greedy("retail", "x", 2)).json()
    assert served["adapter"] == "retail@v1"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "/admin/adapters/UPPER/v1", {"path": "/abs"}),
    ("PUT", "/admin/adapters/legal/V2", {"path": "/abs"}),
    ("PUT", "/admin/adapters/under_score/v1", {"path": "/abs"}),
    ("PUT", "/admin/adapters/%2E%2E/v1", {"path": "/abs"}),
    ("PUT", f"/admin/adapters/{'a' * 64}/v1", {"path": "/abs"}),
    ("DELETE", "/admin/adapters/UPPER/v1", None),
    ("PUT", "/admin/tenants/UPPER/active", {"version": "v1"}),
    ("PUT", "/admin/tenants/legal/active", {"version": "V1"}),
])
def test_invalid_names_in_admin_urls_are_422(http, strict, method, path, body):
    r = http.request(method, f"{strict.url}{path}", json=body, headers=ADMIN)
    assert "DNS-1123" in _error(r, 422, "invalid_name")["message"] or "63" in r.text


@pytest.mark.parametrize("path", ["relative/dir", "./legal/v1", "~/adapters"])
def test_relative_adapter_path_is_422(http, strict, path):
    r = _put(http, strict.url, "relpath@v1", path)
    assert "absolute" in _error(r, 422, "bad_path")["message"]


def test_load_request_with_unknown_or_missing_fields_is_422(http, strict):
    r = http.put(f"{strict.url}/admin/adapters/x/v1", json={"path": "/abs", "force": True},
                 headers=ADMIN)
    assert "force" in _error(r, 422, "invalid_request")["message"]
    r = http.put(f"{strict.url}/admin/adapters/x/v1", json={}, headers=ADMIN)
    assert "path" in _error(r, 422, "invalid_request")["message"]


def test_nonexistent_adapter_directory_is_422_missing_files(http, strict, tmp_path):
    r = _put(http, strict.url, "ghost@v1", tmp_path / "nowhere")
    assert "does not exist" in _error(r, 422, "missing_files")["message"]


# ====================================================================== busy server
def test_full_queue_answers_429_with_retry_after_and_the_rest_finish(busy):
    async def scenario() -> list[httpx.Response]:
        async with _aclient() as client:
            return await asyncio.gather(*(
                client.post(f"{busy.url}/generate", json=_greedy(BASE, f"long {i}", 200))
                for i in range(6)))

    responses = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert refused, statuses
    for r in refused:
        assert "limit 1" in _error(r, 429, "queue_full")["message"]
        assert int(r.headers["retry-after"]) >= 1
    served = [r.json() for r in responses if r.status_code == 200]
    assert served and all(s["usage"]["completion_tokens"] == 200 for s in served)
    with _client() as http:
        text = http.get(f"{busy.url}/metrics").text
        assert metric_value(text, "loramux_queue_depth") == 0
        # Once the queue drained, the server accepts work again.
        assert http.post(f"{busy.url}/generate", json=_greedy(BASE, "next", 2)).status_code == 200


def test_admin_token_from_a_file_guards_admin_routes(http, busy):
    _error(http.get(f"{busy.url}/admin/adapters"), 401, "unauthorized")
    _error(http.get(f"{busy.url}/admin/adapters", headers=ADMIN), 401, "unauthorized")
    r = http.get(f"{busy.url}/admin/adapters",
                 headers={"Authorization": "Bearer from-a-file"})
    assert r.status_code == 200 and len(r.json()["adapters"]) == 3


def test_cache_metrics_count_hits_misses_and_evictions_per_tier(http, busy):
    # One device slot and one host byte: every tenant switch evicts on both tiers.
    for tenant in ("legal", "finance", "retail", "legal"):
        r = http.post(f"{busy.url}/generate", json=_greedy(tenant, "tiers", 2))
        assert r.json()["adapter"] == f"{tenant}@v1"
    text = http.get(f"{busy.url}/metrics").text
    for tier in ("device", "host"):
        assert metric_value(text, "loramux_adapter_cache_misses_total", tier=tier) >= 3, tier
        assert metric_value(text, "loramux_adapter_cache_evictions_total", tier=tier) >= 2, tier
    # Each device miss is served exactly once further down: by a host hit or a host miss
    # (a disk read); a disk read followed by promotion is one lookup, not two.
    device_misses = metric_value(text, "loramux_adapter_cache_misses_total", tier="device")
    assert device_misses == (
        metric_value(text, "loramux_adapter_cache_hits_total", tier="host")
        + metric_value(text, "loramux_adapter_cache_misses_total", tier="host"))
    r = http.post(f"{busy.url}/generate", json=_greedy("legal", "again", 2))
    assert r.status_code == 200
    text = http.get(f"{busy.url}/metrics").text
    assert metric_value(text, "loramux_adapter_cache_hits_total", tier="device") >= 1
    # Re-reads from disk after host evictions are timed like the first reads.
    assert metric_value(text, "loramux_adapter_load_seconds_count",
                        source="disk", target="host") >= 6
    assert metric_value(text, "loramux_adapter_load_seconds_count",
                        source="host", target="device") >= 4
    assert metric_value(text, "loramux_resident_adapters", tier="device") == 1


# ====================================================================== body content type
# A body is JSON when it says so (application/json, application/*+json) or says nothing;
# any other type is a 415 that says what to send (curl -d's form default most of all).
_JSON_BODIES = {
    "/generate": _greedy("legal", "hello", 2),
    "/v1/completions": {"model": "legal", "prompt": "hello", "max_tokens": 2},
    "/v1/chat/completions": {"model": "legal", "max_tokens": 2,
                             "messages": [{"role": "user", "content": "hello"}]},
}


def _unsupported(response: httpx.Response) -> str:
    message = _error(response, 415, "unsupported_media_type")["message"]
    assert "Content-Type: application/json" in message
    assert "-H 'Content-Type: application/json'" in message  # the curl flag to add
    return message


@pytest.mark.parametrize("route", list(_JSON_BODIES))
def test_json_sent_as_a_form_like_curl_d_does_is_415_saying_what_to_send(http, fp32_server,
                                                                         route):
    r = http.post(f"{fp32_server.url}{route}", content=json.dumps(_JSON_BODIES[route]),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert "'application/x-www-form-urlencoded'" in _unsupported(r)


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain; charset=utf-8",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_other_non_json_content_types_are_415(http, fp32_server, content_type):
    r = http.post(f"{fp32_server.url}/generate", content=json.dumps(_JSON_BODIES["/generate"]),
                  headers={"content-type": content_type})
    _unsupported(r)


@pytest.mark.parametrize("route", list(_JSON_BODIES))
@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8",
                                          "APPLICATION/JSON", "application/vnd.loramux+json"])
def test_json_without_a_content_type_or_with_a_json_one_is_served(http, fp32_server, route,
                                                                  content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    r = http.post(f"{fp32_server.url}{route}", content=json.dumps(_JSON_BODIES[route]),
                  headers=headers)
    assert r.request.headers.get("content-type") == content_type
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == "legal@v1"


def test_no_content_type_with_bad_json_is_still_422(http, fp32_server):
    r = http.post(f"{fp32_server.url}/generate", content=b'{"tenant_id": "legal", "prompt": ')
    assert "JSON decode error" in _error(r, 422, "invalid_request")["message"]
    r = http.post(f"{fp32_server.url}/generate", content=b'{"tenant_id": "legal"}')
    assert "prompt" in _error(r, 422, "invalid_request")["message"]


def test_routes_without_a_body_ignore_the_content_type(http, fp32_server):
    plain = {"content-type": "text/plain"}
    assert http.get(f"{fp32_server.url}/v1/models", headers=plain).status_code == 200
    _error(http.post(f"{fp32_server.url}/nowhere", content=b"x", headers=plain), 404)


@pytest.mark.parametrize(("path", "body"), [
    ("/admin/adapters/legal/v9", {"path": "/nowhere"}),
    ("/admin/tenants/legal/active", {"version": "v1"}),
    ("/admin/tenants/nobody/route", {"url": "http://127.0.0.1:9"}),
])
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_admin_routes_with_a_non_json_body_are_415_not_500(http, strict, path, body,
                                                          content_type):
    r = http.put(f"{strict.url}{path}", content=json.dumps(body),
                 headers={**ADMIN, "content-type": content_type})
    _unsupported(r)


def test_admin_route_without_a_content_type_reads_json(http, strict):
    r = http.put(f"{strict.url}/admin/tenants/legal/active", content=b'{"version": "v1"}',
                 headers=ADMIN)
    assert r.status_code == 200 and r.json()["active"] is True, r.text


def test_sync_sidecar_applies_the_same_rule_in_its_error_shape(tmp_path):
    from loramux.sync.app import create_app
    from loramux.sync.settings import SyncSettings

    app = create_app(SyncSettings(root=tmp_path, token=TOKEN))  # lifespan not run: no loop

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://sidecar", headers=ADMIN) as client:
            body = b'{"adapters": []}'
            return [await client.put("/v1/desired", content=body, headers=headers)
                    for headers in ({"content-type": "application/x-www-form-urlencoded"},
                                    {"content-type": "text/plain"}, {},
                                    {"content-type": "application/json; charset=utf-8"})]

    form, plain, bare, json_type = asyncio.run(scenario())
    for r in (form, plain):
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert "-H 'Content-Type: application/json'" in error["message"]
    for r in (bare, json_type):
        assert r.status_code == 202 and r.json() == {"accepted": 0}, r.text


# ====================================================================== admin surfaces
@pytest.mark.parametrize("header", [b"Bearer \xff\xfe", b"Bearer s\xe9cret", b"Bearer",
                                    b"Bearer\tsecret", b"\xffBearer secret",
                                    b"bearer secret extra"])
def test_malformed_or_non_ascii_authorization_is_401_not_500(http, strict, header):
    r = http.get(f"{strict.url}/admin/adapters", headers={"Authorization": header})
    _error(r, 401, "unauthorized")


@pytest.mark.parametrize("header", [{"X-Forwarded-For": "127.0.0.1"},
                                    {"X-Forwarded-For": "203.0.113.9"},
                                    {"Forwarded": "for=127.0.0.1"},
                                    {"X-Real-IP": "127.0.0.1"}])
def test_requests_forwarded_over_loopback_get_no_loopback_exemption(http, fp32_server, header):
    # fp32_server has no admin token: only direct loopback clients may use /admin.
    assert http.get(f"{fp32_server.url}/admin/adapters").status_code == 200
    r = http.get(f"{fp32_server.url}/admin/adapters", headers=header)
    assert "proxy" in _error(r, 403, "forbidden")["message"]
    r = http.delete(f"{fp32_server.url}/admin/adapters/legal/v1", headers=header)
    _error(r, 403, "forbidden")
    # The public routes do not care.
    assert http.get(f"{fp32_server.url}/healthz", headers=header).status_code == 200


@pytest.fixture(scope="module")
def rotating_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rotating") / "admin-token"
    path.write_text("first-token\n")
    return path


@pytest.fixture(scope="module")
def split(start_server, tiny_model_dir: Path, adapter_root: Path, rotating_token: Path):
    """/admin on its own loopback port (LORAMUX_ADMIN_PORT, 0: the kernel picks), the admin
    token in a file that the test rotates. Returns (server, admin URL)."""
    server = start_server(
        "--model", str(tiny_model_dir), "--quantization", "none", "--log-format", "text",
        "--admin-token-file", str(rotating_token), *preload_flags(adapter_root, ["legal"]),
        env={"LORAMUX_ADMIN_PORT": "0"},
    )
    match = re.search(r"admin API listening on (http://127\.0\.0\.1:\d+)", server.log())
    assert match, server.log()[-3000:]
    return server, match.group(1)


def test_admin_port_serves_admin_and_the_public_port_answers_404_for_it(http, split):
    server, admin_url = split
    first = {"Authorization": "Bearer first-token"}
    assert admin_url != server.url
    for path in ("/admin/adapters", "/admin/routes", "/admin"):
        _error(http.get(f"{server.url}{path}", headers=first), 404, "not_found")
    _error(http.put(f"{server.url}/admin/tenants/legal/active", json={"version": "v1"},
                    headers=first), 404, "not_found")
    r = http.get(f"{admin_url}/admin/adapters", headers=first)
    assert r.status_code == 200 and [a["tenant"] for a in r.json()["adapters"]] == ["legal"]
    # The admin port still wants the token, and serves nothing but /admin.
    _error(http.get(f"{admin_url}/admin/adapters"), 401, "unauthorized")
    _error(http.post(f"{admin_url}/generate", json=_greedy("legal", "hi", 2)), 404)
    # The public port serves the public routes.
    assert http.post(f"{server.url}/generate",
                     json=_greedy("legal", "hi", 2)).json()["adapter"] == "legal@v1"


def test_rotated_admin_token_file_takes_effect_without_a_restart(http, split, rotating_token):
    server, admin_url = split
    old, new = {"Authorization": "Bearer first-token"}, {"Authorization": "Bearer second"}
    assert http.get(f"{admin_url}/admin/adapters", headers=old).status_code == 200
    _error(http.get(f"{admin_url}/admin/adapters", headers=new), 401, "unauthorized")
    # The kubelet swaps a Secret's file: a new file renamed over the old path.
    staged = rotating_token.with_name("admin-token.new")
    staged.write_text("second\n")
    staged.replace(rotating_token)
    _error(http.get(f"{admin_url}/admin/adapters", headers=old), 401, "unauthorized")
    assert http.get(f"{admin_url}/admin/adapters", headers=new).status_code == 200
    # Rewritten in place (same inode, new size and mtime) works too.
    rotating_token.write_text("third-token\n")
    _error(http.get(f"{admin_url}/admin/adapters", headers=new), 401, "unauthorized")
    r = http.get(f"{admin_url}/admin/adapters", headers={"Authorization": "Bearer third-token"})
    assert r.status_code == 200
    assert server.proc.poll() is None


# ====================================================================== logs
def test_no_server_logged_a_traceback_or_an_unhandled_error(fp32_server, strict, busy, split):
    for server in (fp32_server, strict, busy, split[0]):
        log = server.log()
        assert "Traceback" not in log, log[-4000:]
        assert "unhandled error" not in log
        assert not re.search(r'HTTP/[\d.]+" 500\s*$', log, re.MULTILINE)
