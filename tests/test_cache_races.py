"""A hammer on the adapter cache and the admin API: no race loses the house.

Many threads PUT (pinned or not), DELETE, activate and generate on a few adapter versions
at once, for a bounded time, against the real app (real engine, tiny model) served by
uvicorn in this process, so that the test can look at the cache's bookkeeping while it
runs. Disk reads are slowed down at random, so loads overlap evictions, re-registrations and
promotions. Afterwards: every request had a defined status (never a 500, never a hang),
every load and eviction future resolved, the budgets held and the cache's LRU dicts match
its entries; a checker thread looked at the same invariants all along.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from loramux.inference import adapter_cache
from loramux.inference.app import create_app
from loramux.inference.server import build_runtime
from loramux.inference.settings import ServeSettings

SECONDS = 25.0
THREADS = 12
ALLOWED = {200, 202, 404, 409, 422, 429, 503}
VERSIONS = [("legal", "v1"), ("legal", "v2"), ("retail", "v1"), ("finance", "v1"),
            ("support", "v1")]


def _nbytes(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size()
               for t in load_file(str(path / "adapter_model.safetensors")).values())


@pytest.fixture
def served(tiny_model_dir, adapter_root, monkeypatch):
    """The app on a real uvicorn server in a thread: (url, runtime)."""
    real_read = adapter_cache.read_adapter

    def jittery_read(path, *args, **kwargs):
        time.sleep(random.uniform(0, 0.15))  # a disk that is sometimes slow
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(adapter_cache, "read_adapter", jittery_read)
    sizes = sorted(_nbytes(adapter_root / t / v) for t, v in VERSIONS)
    settings = ServeSettings(model=tiny_model_dir, quantization="none", device="cpu",
                             device_adapter_slots=3, host_cache_bytes=sizes[0] + sizes[1],
                             drain_timeout_s=3, request_timeout_s=60, max_batch_size=8)
    runtime = build_runtime(settings)
    config = uvicorn.Config(create_app(runtime), host="127.0.0.1", port=0, log_config=None,
                            proxy_headers=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", runtime
    server.should_exit = True
    thread.join(30)


def _op(client: httpx.Client, url: str, root: Path, rng: random.Random) -> tuple[str, int]:
    tenant, version = rng.choice(VERSIONS)
    roll = rng.random()
    if roll < 0.3:
        # Only legal is ever pinned (at most 2 of the 3 slots), so others always get a slot.
        pinned = tenant == "legal" and rng.random() < 0.5
        r = client.put(f"{url}/admin/adapters/{tenant}/{version}",
                       json={"path": str(root / tenant / version), "pinned": pinned,
                             "activate": rng.random() < 0.5})
        return "put", r.status_code
    if roll < 0.45:
        return "delete", client.delete(f"{url}/admin/adapters/{tenant}/{version}").status_code
    if roll < 0.55:
        r = client.put(f"{url}/admin/tenants/{tenant}/active", json={"version": version})
        return "activate", r.status_code
    if roll < 0.6:
        return "list", client.get(f"{url}/admin/adapters").status_code
    name = tenant if rng.random() < 0.5 else f"{tenant}@{version}"
    r = client.post(f"{url}/generate", json={"tenant_id": name, "prompt": "race",
                                             "max_new_tokens": rng.randint(1, 4)})
    return "generate", r.status_code


def test_concurrent_put_delete_activate_generate_keep_the_cache_consistent(
        served, adapter_root, caplog):
    url, runtime = served
    cache = runtime.cache
    caplog.set_level(logging.WARNING, logger="loramux")
    statuses: collections.Counter[tuple[str, int | str]] = collections.Counter()
    errors: list[str] = []
    problems: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + SECONDS

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < stop_at:
                try:
                    op, status = _op(client, url, adapter_root, rng)
                except httpx.TimeoutException as exc:  # a hang
                    op, status = "timeout", type(exc).__name__
                except Exception as exc:
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    statuses[(op, status)] += 1

    def checker() -> None:
        while time.monotonic() < stop_at:
            found = cache.consistency_problems()
            if found:
                with lock:
                    problems.extend(found)
            time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    threads.append(threading.Thread(target=checker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 120)
    assert not any(t.is_alive() for t in threads), "a thread hung"

    by_status = collections.Counter()
    for (_, status), n in statuses.items():
        by_status[status] += n
    print(f"\n{THREADS} threads, {SECONDS:g} s, {sum(statuses.values())} requests; "
          f"by status {dict(sorted(by_status.items(), key=str))}; "
          f"by op {dict(sorted(statuses.items(), key=str))}")
    assert not errors, errors[:5]
    assert set(by_status) <= ALLOWED, statuses
    assert statuses[("generate", 200)] > 0 and statuses[("put", 200)] > 0
    assert statuses[("delete", 200)] + statuses[("delete", 202)] > 0
    assert not problems, sorted(set(problems))[:10]

    # Quiescence: every load and every eviction resolves, no references are left.
    deadline = time.monotonic() + 30
    while True:
        entries = cache.entries()
        pending = [str(e.ref) for e in entries
                   if (e.loading is not None and not e.loading.done())
                   or (e.evicted is not None and not e.evicted.done()) or e.refcount]
        if not pending:
            break
        assert time.monotonic() < deadline, f"futures never resolved: {pending}"
        time.sleep(0.1)
    assert cache.consistency_problems() == []
    assert runtime.engine.alive
    for view in runtime.tenants.views():
        assert view.state in ("ready", "draining"), view
    # The directory names only registered versions as active.
    registered = {(e.ref.tenant, e.ref.version) for e in cache.entries()}
    for tenant in {t for t, _ in VERSIONS}:
        version = runtime.tenants._active.get(tenant)
        assert version is None or (tenant, version) in registered, (tenant, version)
    # Nothing crashed in a loader thread or in the engine, nothing was logged as broken.
    broken = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not broken, [r.getMessage() for r in broken][:5]

    # And the house still serves: a fresh load and a generation.
    with httpx.Client(timeout=60) as client:
        client.delete(f"{url}/admin/adapters/retail/v1")
        r = client.put(f"{url}/admin/adapters/retail/v1",
                       json={"path": str(adapter_root / "retail" / "v1"), "activate": True})
        assert r.status_code == 200, r.text
        r = client.post(f"{url}/generate", json={"tenant_id": "retail", "prompt": "after",
                                                 "max_new_tokens": 2})
        assert r.status_code == 200 and r.json()["adapter"] == "retail@v1", r.text
