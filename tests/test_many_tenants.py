"""A thousand tenants on one pod (issue 17): behaviour, not timing.

- A real ``loramux serve`` with 1,000 adapters registered through the admin API and 64
  device slots (a host tier smaller than the adapters, so the disk tier is used too): every
  version is listed ready, the admin metrics answer, and requests spread over the tenants
  get their own adapter (the same text as the adapter they were copied from).
- In process: the engine's per-step pass and a request's end do not walk every registered
  adapter. The cache's registry and host LRU are counting dicts; a decode run of one tenant
  with 1,000 registered touches neither, and a cold read with the host tier over budget
  walks only as far as it drops copies.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loramux.contracts import Residency
from loramux.inference.engine import FinishEvent, Sequence
from loramux.inference.sampling import SamplingParams
from loramux.inference.server import build_runtime
from loramux.inference.settings import ServeSettings
from loramux.names import AdapterRef, TenantRef

SOURCES = ("legal", "finance", "travel")  # small adapters of conftest.TENANTS
COUNT = 1000
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def many_adapters(tmp_path_factory: pytest.TempPathFactory, adapter_root: Path) -> Path:
    """``<root>/x<i>/v1``: a copy of ``SOURCES[i % 3]``'s v1, for i < 1,000."""
    root = tmp_path_factory.mktemp("many")
    for i in range(COUNT):
        shutil.copytree(adapter_root / SOURCES[i % 3] / "v1", root / f"x{i}" / "v1")
    return root


def _generate(url: str, tenant: str) -> dict:
    r = httpx.post(f"{url}/generate", json={"tenant_id": tenant, "prompt": PROMPT,
                                            "max_new_tokens": 6, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_thousand_adapters_on_64_device_slots_serve_and_list(
        start_server, tiny_model_dir: Path, adapter_root: Path, many_adapters: Path) -> None:
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text", "--device-adapter-slots", "64",
                          "--host-cache-bytes", "3000000", "--max-batch-size", "16")
    url = server.url
    with httpx.Client(base_url=url, timeout=60) as client:
        for source in SOURCES:
            r = client.put(f"/admin/adapters/{source}/v1",
                           json={"path": str(adapter_root / source / "v1")})
            assert r.status_code == 200, r.text
        reference = {source: _generate(url, source)["text"] for source in SOURCES}
        assert len(set(reference.values())) == 3  # the three adapters answer differently

        def put(i: int) -> int:
            return client.put(f"/admin/adapters/x{i}/v1",
                              json={"path": str(many_adapters / f"x{i}" / "v1")}).status_code

        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(put, range(COUNT))) == {200}

        listed = client.get("/admin/adapters").json()["adapters"]
        mine = [a for a in listed if a["tenant"].startswith("x")]
        assert len(mine) == COUNT
        assert {a["state"] for a in mine} == {"ready"}
        assert all(a["active"] for a in mine)
        tiers = {tier: sum(1 for a in listed if a["residency"] == tier)
                 for tier in ("device", "host", "disk")}
        assert tiers["disk"] > 0 and tiers["host"] > 0, tiers  # both lower tiers in use
        assert client.get("/admin/metrics").status_code == 200

        # Every 9th tenant, 16 at a time: more distinct tenants than device slots.
        sample = list(range(0, COUNT, 9))
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: (i, _generate(url, f"x{i}")), sample))
        for i, body in answers:
            assert body["adapter"] == f"x{i}@v1"
            assert body["text"] == reference[SOURCES[i % 3]], i

        listed = client.get("/admin/adapters").json()["adapters"]
        on_device = sum(1 for a in listed if a["residency"] == "device")
        assert 0 < on_device <= 64
        assert sum(a["hits"] for a in listed if a["tenant"].startswith("x")) == len(sample)
        # A tenant nobody registered is still a 404, not the base model.
        r = client.post("/generate", json={"tenant_id": "nobody", "prompt": PROMPT,
                                           "max_new_tokens": 2})
        assert r.status_code == 404, r.text


class CountingDict(dict):
    """A dict that counts the keys any walk over it yields (iteration, keys/values/items)."""

    touched = 0

    def __iter__(self) -> Iterator:
        for key in super().__iter__():
            self.touched += 1
            yield key

    def _walk(self, view):
        for item in view:
            self.touched += 1
            yield item

    def keys(self):
        return self._walk(super().keys())

    def values(self):
        return self._walk(super().values())

    def items(self):
        return self._walk(super().items())


@pytest.fixture
def runtime(tiny_model_dir: Path) -> Iterator:
    settings = ServeSettings(model=tiny_model_dir, quantization="none", device="cpu",
                             device_adapter_slots=64, host_cache_bytes=3_000_000)
    rt = build_runtime(settings)
    rt.engine.start()
    yield rt
    rt.engine.stop()
    rt.cache.shutdown()


def _run(rt, tenant: str, tokens: int) -> str:
    async def go() -> str:
        seq = Sequence(prompt_ids=rt.tokenizer.encode(PROMPT),
                       params=SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                       entry=rt.tenants.acquire(TenantRef(tenant)),
                       loop=asyncio.get_running_loop(), timeout_s=120)
        rt.engine.submit(seq)
        while True:
            event = await seq.events.get()
            if isinstance(event, FinishEvent):
                return event.text
            if not hasattr(event, "text"):
                raise AssertionError(f"request failed: {event}")

    return asyncio.run(go())


def test_per_step_and_per_request_work_does_not_walk_every_tenant(
        runtime, many_adapters: Path) -> None:
    cache = runtime.cache
    futures = [runtime.tenants.register(AdapterRef(f"x{i}", "v1"), many_adapters / f"x{i}" / "v1")
               for i in range(COUNT)]
    for future in futures:
        future.result(60)
    # A pinned adapter: the per-step pass has something to look at.
    runtime.tenants.register(AdapterRef("x0", "v1"), many_adapters / "x0" / "v1",
                             pinned=True).result(60)
    _run(runtime, "x1", 2)  # t1 on the device; every lazy start-up cost paid
    size = cache.per_step_footprint()
    assert size["registered"] == COUNT and size["pinned"] == 1
    assert 0 < size["host"] < COUNT, size  # the host tier is full: some copies are on disk

    with cache._lock:  # swap in counting dicts (same contents, same order)
        cache._entries = CountingDict(cache._entries)
        cache._host_lru = CountingDict(cache._host_lru)
    steps = runtime.engine.steps
    _run(runtime, "x1", 40)
    assert runtime.engine.steps - steps >= 39  # one decode step per token after the first
    # 40 engine steps, a request's admission and its end: not one walk over the registry or
    # the host tier (before: every step walked all 1,000 entries, every end all host copies).
    assert cache._entries.touched == 0
    assert cache._host_lru.touched == 0

    # A cold tenant (disk only) with the host tier over budget: its read drops the least
    # recently used copies, walking only those (and the ones it must keep), not the tier.
    cold = next(i for i in range(COUNT)
                if cache.get(AdapterRef(f"x{i}", "v1")).residency == Residency.DISK)
    held = len(cache._host_lru)
    _run(runtime, f"x{cold}", 2)
    assert cache.get(AdapterRef(f"x{cold}", "v1")).residency == Residency.DEVICE
    assert cache._entries.touched == 0
    assert 0 < cache._host_lru.touched <= 8, (cache._host_lru.touched, held)
    assert cache.consistency_problems() == []
    assert cache.get(AdapterRef("x0", "v1")).residency == Residency.DEVICE  # pinned
