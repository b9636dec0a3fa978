"""Metrics with many tenants (issue 17): the public ``/metrics`` keeps its sums over tenants
as they are observed (its size does not grow with the tenants), and per-tenant latency
histograms are bounded (the least recently observed tenants fold into ``tenant="_other"``),
with nothing lost: per-tenant series plus ``_other`` add up to the public totals.

- In process: :class:`Metrics` driven directly with traffic over 1,000 tenants.
- A real ``loramux serve`` (``--metrics-tenant-histograms 2``, ``--metrics-port``) with six
  tenants: the same invariants over HTTP, on all three views.
- ``loramux_tenant_in_flight`` reads per-tenant in-flight counts the engine keeps as requests
  start and end (no walk per scrape): equal to the engine's own counts under load.
- The chart value ``inference.metricsTenantHistograms`` reaches the server's settings.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import test_chart as chart
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import TENANTS, preload_flags
from loramux.inference.metrics import OTHER_LABEL, Metrics
from loramux.inference.settings import ServeSettings

helm_env = chart.helm_env  # the fixture, for the chart test
TTFT = "loramux_time_to_first_token_seconds"
E2E = "loramux_request_latency_seconds"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _summed_per_tenant(per_tenant: Samples) -> Samples:
    """The per-tenant samples summed over the tenant label (``_created`` left out: a sum of
    creation times means nothing)."""
    sums: Samples = defaultdict(float)
    for (name, labels), value in per_tenant.items():
        if any(k == "tenant" for k, _ in labels) and not name.endswith("_created"):
            sums[(name, tuple((k, v) for k, v in labels if k != "tenant"))] += value
    return sums


def assert_public_is_the_sum(public_text: str, per_tenant_text: str) -> None:
    """Every public sample of a tenant family equals the sum of the per-tenant samples (with
    ``_other``), and every per-tenant series has its public sum; the rest is identical."""
    public, per_tenant = _samples(public_text), _samples(per_tenant_text)
    assert 'tenant="' not in public_text
    sums = _summed_per_tenant(per_tenant)
    untenanted = {k: v for k, v in per_tenant.items() if not any(n == "tenant" for n, _ in k[1])}
    assert set(public) == set(sums) | set(untenanted), (
        set(public) ^ (set(sums) | set(untenanted)))
    for key, value in public.items():
        if key in sums:
            assert value == pytest.approx(sums[key], rel=1e-9, abs=1e-9), key
        elif not key[0].endswith("_created"):
            assert value == untenanted[key], key


def _histogram_tenants(text: str, name: str) -> set[str]:
    return set(re.findall(rf'^{name}_count{{tenant="([^"]+)"}}', text, re.M))


def _scrape(m: Metrics) -> tuple[str, str]:
    return generate_latest(m.public_registry).decode(), generate_latest(m.registry).decode()


def _traffic(m: Metrics, tenants: int, requests: int, seed: int) -> dict[str, float]:
    """``requests`` requests over ``tenants`` tenants (``t<i>``), uniform, as the engine
    records them; returns the expected totals."""
    rng = random.Random(seed)
    totals: dict[str, float] = defaultdict(float)
    for _ in range(requests):
        tenant = f"t{rng.randrange(tenants)}"
        outcome = rng.choice(("ok", "ok", "ok", "timeout", "cancelled"))
        m.requests.labels(tenant, outcome).inc()
        totals[outcome] += 1
        if outcome == "ok":
            prompt, completion = rng.randint(1, 500), rng.randint(1, 200)
            m.prompt_tokens.labels(tenant).inc(prompt)
            m.completion_tokens.labels(tenant).inc(completion)
            totals["prompt"] += prompt
            totals["completion"] += completion
            m.ttft.labels(tenant).observe(rng.uniform(0.001, 2))
            m.e2e.labels(tenant).observe(rng.uniform(0.1, 400))
            totals["observed"] += 1
    return totals


def test_public_sums_equal_per_tenant_series_after_traffic_over_a_thousand_tenants() -> None:
    m = Metrics(tenant_histograms=16)
    totals = _traffic(m, tenants=1000, requests=5000, seed=17)
    public, per_tenant = _scrape(m)
    assert_public_is_the_sum(public, per_tenant)
    samples = _samples(public)
    assert samples[("loramux_requests_total", (("outcome", "ok"),))] == totals["ok"]
    assert samples[("loramux_requests_total", (("outcome", "timeout"),))] == totals["timeout"]
    assert samples[("loramux_prompt_tokens_total", ())] == totals["prompt"]
    assert samples[("loramux_completion_tokens_total", ())] == totals["completion"]
    for name in (TTFT, E2E):
        assert samples[(f"{name}_count", ())] == totals["observed"]
        assert samples[(f"{name}_bucket", (("le", "+Inf"),))] == totals["observed"]
        # Bounded: 16 tenants of their own plus _other, of ~900 with traffic.
        seen = _histogram_tenants(per_tenant, name)
        assert len(seen) == 17 and OTHER_LABEL in seen
    # Counters stay per tenant (the operator reads the token counters per tenant).
    assert len(re.findall(r"^loramux_prompt_tokens_total\{", per_tenant, re.M)) > 900


def test_the_public_scrape_does_not_grow_with_the_number_of_tenants() -> None:
    few, many = Metrics(tenant_histograms=8), Metrics(tenant_histograms=8)
    _traffic(few, tenants=3, requests=300, seed=1)
    _traffic(many, tenants=1000, requests=3000, seed=1)
    few_public, few_per_tenant = _scrape(few)
    many_public, many_per_tenant = _scrape(many)
    assert len(few_public.splitlines()) == len(many_public.splitlines())
    # The per-tenant histograms are bounded too: only the counters grow.
    assert len(_histogram_tenants(many_per_tenant, TTFT)) == 9
    assert len(many_per_tenant) > len(few_per_tenant)


def test_the_histogram_set_never_exceeds_the_bound() -> None:
    m = Metrics(tenant_histograms=5)
    rng = random.Random(3)
    for i in range(2000):
        # Mostly a few busy tenants, sometimes one of many others.
        tenant = f"busy{rng.randrange(3)}" if rng.random() < 0.7 else f"t{rng.randrange(500)}"
        m.ttft.labels(tenant).observe(rng.uniform(0, 1))
        assert len(m.ttft.tenants()) <= 5, i
    _, per_tenant = _scrape(m)
    assert len(_histogram_tenants(per_tenant, TTFT)) <= 6  # five tenants and _other
    # The most recently active stay: the busy ones were observed within the last few.
    m.ttft.labels("busy0").observe(0.1)
    assert m.ttft.tenants()[-1] == "busy0"


def test_a_dropped_out_tenant_s_observations_go_to_other_and_stay_in_the_totals() -> None:
    m = Metrics(tenant_histograms=3)
    m.e2e.labels("slow").observe(300.0)  # the le="320.0" bucket, nobody else's
    m.e2e.labels("slow").observe(250.0)
    public, per_tenant = _scrape(m)
    assert _histogram_tenants(per_tenant, E2E) == {"slow"}
    for i in range(3):  # three newer tenants push "slow" out of the set of three
        m.e2e.labels(f"fast{i}").observe(0.02)
    public, per_tenant = _scrape(m)
    assert _histogram_tenants(per_tenant, E2E) == {"fast0", "fast1", "fast2", OTHER_LABEL}
    samples, totals = _samples(per_tenant), _samples(public)
    other = (("tenant", OTHER_LABEL),)
    assert samples[(f"{E2E}_count", other)] == 2
    assert samples[(f"{E2E}_sum", other)] == pytest.approx(550.0)
    assert samples[(f"{E2E}_bucket", (("le", "160.0"), *other))] == 0
    assert samples[(f"{E2E}_bucket", (("le", "320.0"), *other))] == 2
    assert totals[(f"{E2E}_count", ())] == 5
    assert totals[(f"{E2E}_bucket", (("le", "320.0"),))] == 5
    assert_public_is_the_sum(public, per_tenant)
    # Back again: a new series from its new observations; the old ones stay in _other.
    m.e2e.labels("slow").observe(1.0)
    public, per_tenant = _scrape(m)
    samples = _samples(per_tenant)
    assert samples[(f"{E2E}_count", (("tenant", "slow"),))] == 1
    assert samples[(f"{E2E}_count", other)] == 3  # slow's two and fast0's one
    assert _samples(public)[(f"{E2E}_count", ())] == 6
    assert_public_is_the_sum(public, per_tenant)


def test_zero_tenant_histograms_keeps_only_other_and_other_is_reserved() -> None:
    m = Metrics(tenant_histograms=0)
    for i in range(50):
        m.ttft.labels(f"t{i}").observe(0.2)
    public, per_tenant = _scrape(m)
    assert _histogram_tenants(per_tenant, TTFT) == {OTHER_LABEL}
    assert _samples(per_tenant)[(f"{TTFT}_count", (("tenant", OTHER_LABEL),))] == 50
    assert_public_is_the_sum(public, per_tenant)
    with pytest.raises(ValueError):
        m.ttft.labels(OTHER_LABEL)
    with pytest.raises(ValueError):
        Metrics(tenant_histograms=-1)


def test_both_views_have_the_same_families_and_tenant_labels_only_per_tenant() -> None:
    m = Metrics()
    m.track_tenant_load(lambda: [("a", "device", 2), ("b", "host", 1), ("c", "device", 1)])
    _traffic(m, tenants=10, requests=50, seed=5)
    public, per_tenant = _scrape(m)
    names = {f.name for f in text_string_to_metric_families(public)}
    assert names == {f.name for f in text_string_to_metric_families(per_tenant)}
    assert "loramux_tenant_in_flight" in names
    assert_public_is_the_sum(public, per_tenant)
    assert _samples(public)[("loramux_tenant_in_flight", (("residency", "device"),))] == 3
    # A plain prometheus metric with a tenant label would leak tenants on the public port:
    # Metrics' registration refuses it.
    from prometheus_client import Counter

    from loramux.inference.metrics import _BothRegistries

    with pytest.raises(ValueError, match="tenant label"):
        Counter("leaky_total", "x", ["tenant"],
                registry=_BothRegistries(m.registry, m.public_registry))


def _generate(url: str, tenant: str) -> None:
    r = httpx.post(f"{url}/generate", json={"tenant_id": tenant, "prompt": "hello",
                                            "max_new_tokens": 3, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text


def test_a_real_server_bounds_histograms_and_its_public_metrics_are_the_sums(
        start_server, tiny_model_dir: Path, adapter_root: Path) -> None:
    tenants = list(TENANTS)
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text", "--metrics-port", "0",
                          "--metrics-tenant-histograms", "2",
                          *preload_flags(adapter_root, tenants))
    match = re.search(r"per-tenant metrics listening on (http://127\.0\.0\.1:\d+)", server.log())
    assert match, server.log()[-2000:]
    for tenant in tenants + tenants[:2]:
        _generate(server.url, tenant)
    requests = len(tenants) + 2
    # Nothing in flight now: the three views describe the same state.
    public = httpx.get(f"{server.url}/metrics", timeout=10).text
    admin = httpx.get(f"{server.url}/admin/metrics", timeout=10).text
    port = httpx.get(f"{match.group(1)}/metrics", timeout=10).text
    for per_tenant in (admin, port):
        assert_public_is_the_sum(public, per_tenant)
        for name in (TTFT, E2E):
            # The last two tenants asked have their own series; the other four are _other.
            assert _histogram_tenants(per_tenant, name) == {*tenants[:2], OTHER_LABEL}
        assert {f"{t}" for t in tenants} <= set(
            re.findall(r'^loramux_requests_total\{outcome="ok",tenant="([^"]+)"}', per_tenant,
                       re.M))
    totals = _samples(public)
    assert totals[("loramux_requests_total", (("outcome", "ok"),))] == requests
    assert totals[(f"{TTFT}_count", ())] == requests
    assert totals[(f"{E2E}_count", ())] == requests
    # Each of the six was pushed out once (t0 and t1 before they came back): six in _other.
    assert _samples(admin)[(f"{E2E}_count", (("tenant", OTHER_LABEL),))] == requests - 2


def test_the_chart_sets_the_bound_and_its_schema_refuses_a_negative_one(helm_env) -> None:
    def server_env(*args: str) -> dict[str, str]:
        return chart.env_of(chart.container(chart.inference_pod(chart.render(helm_env, *args)),
                                            "server"))

    assert server_env()["LORAMUX_METRICS_TENANT_HISTOGRAMS"] == "64"
    env = server_env("--set", "inference.metricsTenantHistograms=8")
    assert ServeSettings(metrics_tenant_histograms=env["LORAMUX_METRICS_TENANT_HISTOGRAMS"]
                         ).metrics_tenant_histograms == 8
    bad = chart._helm(helm_env, "template", chart.RELEASE, str(chart.CHART), "--set",
                "inference.metricsTenantHistograms=-1", check=False)
    assert bad.returncode != 0 and "metricsTenantHistograms" in bad.stderr


def test_in_flight_per_tenant_is_kept_by_the_engine_and_matches_its_fair_share_counts(
        tiny_model_dir: Path, adapter_root: Path) -> None:
    """``loramux_tenant_in_flight`` reads what the engine counts as requests start and end
    (not a walk over every tenant): while requests run and wait, it equals the engine's own
    per-tenant count (both read under the engine's tenant lock), and it empties after."""
    import asyncio

    from loramux.inference.app import _tenant_load, create_app
    from loramux.inference.engine import FinishEvent, Sequence
    from loramux.inference.sampling import SamplingParams
    from loramux.inference.server import build_runtime
    from loramux.names import AdapterRef, TenantRef

    tenants = ["legal", "finance", "travel"]
    rt = build_runtime(ServeSettings(model=tiny_model_dir, quantization="none", device="cpu",
                                     auth="none", max_batch_size=2, device_adapter_slots=2))
    create_app(rt)  # wires the loramux_tenant_in_flight source
    rt.engine.start()
    try:
        for t in tenants:
            rt.tenants.register(AdapterRef(t, "v1"), adapter_root / t / "v1").result(60)
        seen: list[dict[str, int]] = []

        def compare() -> None:
            with rt.engine._tenant_lock:
                engine = {t: u.in_flight for t, u in rt.engine._usage.items() if u.in_flight}
                ours = rt.metrics.in_flight_by_tenant()
            assert ours == engine
            seen.append(ours)

        async def one(tenant: str) -> None:
            seq = Sequence(prompt_ids=rt.tokenizer.encode("hello there"),
                           params=SamplingParams(max_new_tokens=6, ignore_eos=True),
                           entry=rt.tenants.acquire(TenantRef(tenant)),
                           loop=asyncio.get_running_loop(), timeout_s=120)
            rt.engine.submit(seq)
            while not isinstance(await seq.events.get(), FinishEvent):
                pass

        async def go() -> None:
            requests = asyncio.gather(*(one(tenants[i % 3]) for i in range(12)))
            while not requests.done():
                compare()
                await asyncio.sleep(0.001)
            await requests

        asyncio.run(go())
        assert max(sum(s.values()) for s in seen) > 2  # some ran while others waited
        assert rt.metrics.in_flight_by_tenant() == {}
        rows = _tenant_load(rt)
        on_device = {a.tenant for a in rt.tenants.views() if a.residency == "device"}
        assert rows == [(t, "device", 0) for t in sorted(on_device)] and len(on_device) == 2
    finally:
        rt.engine.stop()
        rt.cache.shutdown()
