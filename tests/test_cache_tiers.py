"""The tiered adapter cache, in process: LRU, pinning, reference counts, non-blocking loads.

These tests drive the real engine and cache on the tiny model without HTTP, so they can
look at tiers directly and slow the disk down on purpose.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
import time

import pytest

from loramux.contracts import Residency
from loramux.inference import adapter_cache
from loramux.inference.adapter_cache import Prepared
from loramux.inference.engine import FinishEvent, Sequence, TokenEvent
from loramux.inference.sampling import SamplingParams
from loramux.inference.server import build_runtime
from loramux.inference.settings import ServeSettings
from loramux.names import AdapterRef, TenantRef


@pytest.fixture
def make_runtime(tiny_model_dir):
    runtimes = []

    def make(**overrides):
        settings = ServeSettings(model=tiny_model_dir, quantization="none", device="cpu",
                                 **overrides)
        runtime = build_runtime(settings)
        runtime.engine.start()
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        runtime.engine.stop()
        runtime.cache.shutdown()


def _register(runtime, adapter_root, tenant, version="v1", **kwargs):
    ref = AdapterRef(tenant, version)
    return runtime.tenants.register(ref, adapter_root / tenant / version, **kwargs).result(30)


def _prepare(runtime, entry) -> Prepared:
    return runtime.engine.call(lambda: runtime.cache.prepare(entry)).result(30)


def test_device_tier_evicts_least_recently_used_and_keeps_pinned(make_runtime, adapter_root):
    runtime = make_runtime(device_adapter_slots=2)
    pinned = _register(runtime, adapter_root, "legal", pinned=True)
    retail = _register(runtime, adapter_root, "retail")
    finance = _register(runtime, adapter_root, "finance")
    assert _prepare(runtime, pinned) == Prepared.READY
    assert _prepare(runtime, retail) == Prepared.READY
    assert _prepare(runtime, finance) == Prepared.READY
    # Two slots: the pinned adapter stays; retail (least recently used) went down a tier.
    assert pinned.residency == Residency.DEVICE
    assert finance.residency == Residency.DEVICE
    assert retail.residency == Residency.HOST
    assert _prepare(runtime, retail) == Prepared.READY
    assert finance.residency == Residency.HOST and pinned.residency == Residency.DEVICE


def test_adapter_with_inflight_requests_is_never_evicted(make_runtime, adapter_root):
    runtime = make_runtime(device_adapter_slots=1)
    legal = _register(runtime, adapter_root, "legal")
    retail = _register(runtime, adapter_root, "retail")
    held = runtime.tenants.acquire(TenantRef("legal"))
    assert _prepare(runtime, held) == Prepared.READY
    # The only slot is busy with an in-flight request: retail waits instead of evicting it.
    assert _prepare(runtime, retail) == Prepared.WAIT
    assert legal.residency == Residency.DEVICE
    runtime.cache.release(held)
    assert _prepare(runtime, retail) == Prepared.READY
    assert legal.residency == Residency.HOST


def _until_ready(runtime, entry, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _prepare(runtime, entry) != Prepared.READY:
        assert time.monotonic() < deadline, f"{entry.ref} never became ready"
        time.sleep(0.02)


def test_host_tier_respects_its_byte_budget(make_runtime, adapter_root):
    runtime = make_runtime(host_cache_bytes=1, device_adapter_slots=1)
    legal = _register(runtime, adapter_root, "legal")
    retail = _register(runtime, adapter_root, "retail")
    _until_ready(runtime, legal)
    first_read = legal.disk_load_seconds
    _until_ready(runtime, retail)
    # legal left the device, and its host copy does not fit a 1-byte budget: disk tier only.
    assert legal.residency == Residency.DISK
    assert retail.residency == Residency.DEVICE
    # Asking for it again reads it from disk once more, and it serves.
    _until_ready(runtime, legal)
    assert legal.residency == Residency.DEVICE
    assert legal.disk_load_seconds is not None and legal.disk_load_seconds != first_read


async def _collect(seq: Sequence) -> tuple[str, list[float]]:
    stamps: list[float] = []
    while True:
        event = await seq.events.get()
        if isinstance(event, TokenEvent):
            stamps.append(time.monotonic())
        elif isinstance(event, FinishEvent):
            return event.text, stamps
        else:
            raise AssertionError(event)


def test_loading_an_adapter_from_a_slow_disk_does_not_stall_other_tenants(
    make_runtime, adapter_root, monkeypatch
):
    runtime = make_runtime()
    _register(runtime, adapter_root, "legal")
    # Simulate a slow disk: reading 'support' takes 1.5 s in the loader thread.
    real_read = adapter_cache.read_adapter
    started = threading.Event()

    def slow_read(path, *args, **kwargs):
        if "support" in str(path):
            started.set()
            time.sleep(1.5)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(adapter_cache, "read_adapter", slow_read)
    tokenizer = runtime.tokenizer

    async def scenario():
        loop = asyncio.get_running_loop()
        legal = Sequence(prompt_ids=tokenizer.encode("keep decoding"),
                         params=SamplingParams(max_new_tokens=400, ignore_eos=True),
                         entry=runtime.tenants.acquire(TenantRef("legal")), loop=loop,
                         timeout_s=60, stream=True)
        runtime.engine.submit(legal)
        legal_task = asyncio.ensure_future(_collect(legal))
        await asyncio.sleep(0.2)
        future = runtime.tenants.register(AdapterRef("support", "v1"),
                                          adapter_root / "support" / "v1")
        support_entry = await asyncio.wrap_future(future)
        return await legal_task, support_entry

    (text, stamps), support = asyncio.run(scenario())
    assert started.is_set() and support.residency == Residency.HOST
    # Tokens kept flowing while the loader thread sat on the slow read: no gap near 1.5 s.
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < 0.75, max(gaps)
    assert len(stamps) > 0 and text


def test_request_for_disk_only_adapter_triggers_its_load(make_runtime, adapter_root):
    runtime = make_runtime(host_cache_bytes=0, device_adapter_slots=1)
    _register(runtime, adapter_root, "legal")
    travel = _register(runtime, adapter_root, "travel")
    legal = runtime.tenants.resolve(TenantRef("legal"))
    _until_ready(runtime, legal)
    assert travel.residency == Residency.DISK and legal.residency == Residency.DEVICE
    tokenizer = runtime.tokenizer

    async def ask(tenant: str) -> str:
        seq = Sequence(prompt_ids=tokenizer.encode("hello"),
                       params=SamplingParams(max_new_tokens=5, ignore_eos=True),
                       entry=runtime.tenants.acquire(TenantRef(tenant)),
                       loop=asyncio.get_running_loop(), timeout_s=60)
        runtime.engine.submit(seq)
        text, _ = await _collect(seq)
        return text

    first = asyncio.run(ask("travel"))
    assert travel.residency == Residency.DEVICE
    assert asyncio.run(ask("travel")) == first
    assert travel.disk_load_seconds is not None and travel.host_to_device_seconds is not None


def test_evicting_the_active_version_hands_the_tenant_to_its_newest_ready_version(
    make_runtime, adapter_root
):
    from loramux.inference.adapter_cache import UnknownAdapter

    runtime = make_runtime()
    v1 = _register(runtime, adapter_root, "legal", "v1")
    v2 = _register(runtime, adapter_root, "legal", "v2")
    assert runtime.tenants.resolve(TenantRef("legal")) is v1  # the first ready version
    runtime.tenants.evict(v1.ref).result(30)
    assert runtime.tenants.is_active(v2.ref)
    held = runtime.tenants.acquire(TenantRef("legal"))
    assert held is v2
    runtime.cache.release(held)
    runtime.tenants.evict(v2.ref).result(30)
    with pytest.raises(UnknownAdapter):
        runtime.tenants.acquire(TenantRef("legal"))


# ---------------------------------------------------------------------- re-reads from disk
def _disk_only(runtime, tmp_path, adapter_root, *, manifest: bool = False):
    """legal (a private copy, so the test may change its files) read once, then pushed down
    to the disk tier by retail (one device slot, no host room). Returns (legal, retail)."""
    from factories import stage_adapter

    if manifest:
        path, _ = stage_adapter(adapter_root, tmp_path, "legal", "v1")
    else:
        path = tmp_path / "legal" / "v1"
        shutil.copytree(adapter_root / "legal" / "v1", path)
    legal = runtime.tenants.register(AdapterRef("legal", "v1"), path).result(30)
    retail = _register(runtime, adapter_root, "retail")
    _until_ready(runtime, legal)
    _until_ready(runtime, retail)
    assert legal.residency == Residency.DISK and legal.stamp is not None
    return legal, retail


def _ask(runtime, tenant: str) -> tuple[int, str]:
    """(200, text) or (status, reason) of one request through the engine."""
    from loramux.inference.adapter_cache import AdapterUnavailable
    from loramux.inference.engine import ErrorEvent

    try:
        entry = runtime.tenants.acquire(TenantRef(tenant))
    except AdapterUnavailable as exc:
        return 503, str(exc)

    async def run() -> tuple[int, str]:
        seq = Sequence(prompt_ids=runtime.tokenizer.encode("hello"),
                       params=SamplingParams(max_new_tokens=3, ignore_eos=True),
                       entry=entry, loop=asyncio.get_running_loop(), timeout_s=60)
        runtime.engine.submit(seq)
        while True:
            event = await seq.events.get()
            if isinstance(event, FinishEvent):
                return 200, event.text
            if isinstance(event, ErrorEvent):
                return event.status, event.reason

    return asyncio.run(run())


def test_adapter_changed_on_disk_after_its_first_load_fails_alone_when_read_again(
        make_runtime, adapter_root, tmp_path):
    runtime = make_runtime(host_cache_bytes=0, device_adapter_slots=1)
    legal, _ = _disk_only(runtime, tmp_path, adapter_root)
    # Someone swaps the weights under the served version (another adapter's, same shapes).
    shutil.copy(adapter_root / "legal" / "v2" / "adapter_model.safetensors",
                legal.path / "adapter_model.safetensors")
    status, reason = _ask(runtime, "legal")
    assert status == 503 and "changed on disk" in reason, reason
    assert legal.state == "failed" and legal.reason_code == "changed_on_disk"
    assert "adapter_model.safetensors" in legal.reason
    # Later requests are refused with the reason; other tenants never noticed.
    status, reason = _ask(runtime, "legal")
    assert status == 503 and "changed on disk" in reason
    assert _ask(runtime, "retail")[0] == 200
    assert runtime.cache.consistency_problems() == []


def test_adapter_deleted_after_its_first_load_fails_alone_when_read_again(
        make_runtime, adapter_root, tmp_path):
    runtime = make_runtime(host_cache_bytes=0, device_adapter_slots=1)
    legal, _ = _disk_only(runtime, tmp_path, adapter_root)
    shutil.rmtree(legal.path)
    status, reason = _ask(runtime, "legal")
    assert status == 503 and "deleted" in reason, reason
    assert legal.reason_code == "missing_files"
    assert _ask(runtime, "retail")[0] == 200


def test_adapter_rewritten_with_the_same_content_under_its_manifest_is_read_again(
        make_runtime, adapter_root, tmp_path):
    runtime = make_runtime(host_cache_bytes=0, device_adapter_slots=1)
    legal, _ = _disk_only(runtime, tmp_path, adapter_root, manifest=True)
    expected = _ask(runtime, "legal")
    assert expected[0] == 200
    _until_ready(runtime, runtime.tenants.resolve(TenantRef("retail")))
    assert legal.residency == Residency.DISK
    # A re-download: the same bytes in a new file (new inode and mtime), same manifest.
    weights = legal.path / "adapter_model.safetensors"
    fresh = weights.with_name("fresh")
    shutil.copy(weights, fresh)
    fresh.replace(weights)
    assert _ask(runtime, "legal") == expected
    assert legal.state == "ready"
    # The same manifest but different bytes is refused.
    _until_ready(runtime, runtime.tenants.resolve(TenantRef("retail")))
    shutil.copy(adapter_root / "legal" / "v2" / "adapter_model.safetensors", weights)
    status, reason = _ask(runtime, "legal")
    assert status == 503 and "sha256 does not match" in reason, reason


# ---------------------------------------------------------------------- races, one at a time
def test_version_evicted_while_it_is_read_resolves_its_load_and_leaves_no_trace(
        make_runtime, adapter_root, monkeypatch):
    from loramux.inference.adapter_cache import AdapterConflict, AdapterUnavailable

    runtime = make_runtime(host_cache_bytes=1)
    real_read = adapter_cache.read_adapter
    reading, release = threading.Event(), threading.Event()

    def held_read(path, *args, **kwargs):
        if "support" in str(path):
            reading.set()
            release.wait(10)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(adapter_cache, "read_adapter", held_read)
    ref = AdapterRef("support", "v1")
    load = runtime.tenants.register(ref, adapter_root / "support" / "v1", activate=True)
    assert reading.wait(10)
    # DELETE while the loader thread reads: the idle version goes at once.
    runtime.tenants.evict(ref).result(10)
    assert runtime.cache.get(ref) is None
    release.set()
    # The load's waiter (a PUT) hears that the version went, instead of waiting forever,
    # and the loader put nothing into the host tier for a version no one knows.
    with pytest.raises(AdapterUnavailable, match="evicted while loading"):
        load.result(10)
    assert runtime.cache.consistency_problems() == []
    assert not runtime.tenants.is_active(ref)
    # The same version loads again; while it drains, a PUT of it is a conflict, not a hang.
    entry = _register(runtime, adapter_root, "support")
    held = runtime.cache.acquire(entry)
    draining = runtime.tenants.evict(ref)
    with pytest.raises(AdapterConflict):
        runtime.tenants.register(ref, adapter_root / "support" / "v1")
    runtime.cache.release(held)
    draining.result(10)
    assert runtime.cache.consistency_problems() == []


@pytest.mark.parametrize(("prefetch", "slots", "expect"), [
    (True, 4, Residency.DEVICE),  # a free slot: the waiting request's adapter is put there
    (False, 4, Residency.HOST),  # prefetch off: it waits for its turn on the host
    (True, 1, Residency.HOST),  # no free slot: nothing is evicted for it
])
def test_a_waiting_requests_adapter_is_prefetched_into_a_free_device_slot(
        make_runtime, adapter_root, prefetch, slots, expect):
    """The batch is full (one row) with a long legal request; a support request waits. While
    legal still decodes, support's adapter goes onto the device only when prefetching is
    on and a slot is free, so its turn finds it ready; legal is never evicted for it."""
    runtime = make_runtime(max_batch_size=1, device_adapter_slots=slots,
                           prefetch_adapters=prefetch)
    legal = _register(runtime, adapter_root, "legal")
    support = _register(runtime, adapter_root, "support")
    _until_ready(runtime, legal)
    assert support.residency == Residency.HOST
    tokenizer = runtime.tokenizer

    def seq(tenant: str, tokens: int, loop) -> Sequence:
        return Sequence(prompt_ids=tokenizer.encode("keep decoding"),
                        params=SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                        entry=runtime.tenants.acquire(TenantRef(tenant)), loop=loop,
                        timeout_s=120, stream=True)

    async def scenario():
        loop = asyncio.get_running_loop()
        long = seq("legal", 400, loop)
        runtime.engine.submit(long)
        long_task = asyncio.ensure_future(_collect(long))
        while not runtime.engine.running:
            await asyncio.sleep(0.01)
        waiting = seq("support", 2, loop)
        runtime.engine.submit(waiting)
        waiting_task = asyncio.ensure_future(_collect(waiting))
        steps = runtime.engine.steps
        while runtime.engine.steps < steps + 30 and not long_task.done():
            await asyncio.sleep(0.01)  # 30 engine steps of legal with support waiting
        during = (support.residency, legal.residency, long_task.done(), waiting_task.done())
        await long_task
        await waiting_task
        return during

    support_during, legal_during, long_done, waiting_done = asyncio.run(scenario())
    assert not long_done and not waiting_done, "legal ended before the check: too fast"
    assert legal_during == Residency.DEVICE
    assert support_during == expect
