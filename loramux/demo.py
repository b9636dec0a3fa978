"""``make demo``: train two tenants' adapters, then serve them beside the base, batched.

1. Trains the `legal` (contract clauses) and `medical` (SOAP notes) adapters in one
   multi-task QLoRA run on the embedded SmolLM2-135M in NF4 (``examples/train-demo.yaml``,
   with the compute dtype that is fast on this CPU: about three minutes on 2 cores of either
   CPU kind), once; later runs reuse them from the cache.
2. Starts a real ``loramux serve`` process on loopback, loads both adapters through the
   admin API, and sends the same prompts to the base and to each tenant concurrently, so the
   engine decodes them together.
3. Prints each answer, the batch sizes the engine ran, and the adapter tiers.

An orchestration script, not part of any server: it imports training and inference lazily.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "examples" / "train-demo.yaml"
PROMPTS = {
    "legal": "Draft a non-solicitation clause for a consulting agreement.",
    "medical": "Write a SOAP note: the patient reports a runny nose and mild fever since "
    "yesterday.",
}


def train_demo_adapters(cache: Path) -> dict[str, Path]:
    """Train (once) and return {tenant: adapter dir}."""
    from loramux.manifest import MANIFEST_FILE
    from loramux.training.config import load_config
    from loramux.training.trainer import train

    config = load_config(DEMO_CONFIG, overrides={"output_dir": str(cache)})
    wanted = {t.name: cache / t.name / t.version for t in config.tasks}
    if all((path / MANIFEST_FILE).is_file() for path in wanted.values()):
        print(f"demo adapters already trained: {cache}")
        return wanted
    print(f"training {sorted(wanted)} on the NF4 base (one multi-task run)...")
    train(config, progress=True)  # prints its own summary table
    return wanted


def _start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")  # noqa: SIM115 - the child process holds it
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "loramux.cli", "serve", "--port", "0", "--log-format", "text",
         "--auth", "none"],  # local demo: no API keys (logged loudly by the server)
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", log_path.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


async def _ask_all(url: str, base_name: str) -> list[tuple[str, str, str, float]]:
    """Every prompt to the base and to its tenant, all at once: one shared batch."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def ask(model: str, prompt: str) -> tuple[str, str, str, float]:
            started = time.monotonic()
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": model, "temperature": 0, "max_tokens": 90,
                "messages": [{"role": "user", "content": prompt}]})
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"].strip()
            return model, prompt, text, time.monotonic() - started

        jobs = []
        for tenant, prompt in PROMPTS.items():
            jobs += [ask(base_name, prompt), ask(tenant, prompt)]
        return await asyncio.gather(*jobs)


def main() -> None:
    from loramux.inference.model_loader import default_cache_dir, ensure_default_model

    demo_started = time.monotonic()
    print("== loramux demo: train two tenants, serve them beside the base, one batch ==")
    print(f"base model: {ensure_default_model()}")
    cache = default_cache_dir()
    adapters = train_demo_adapters(cache / "demo-adapters")
    log_path = cache / "demo-server.log"
    proc, url = _start_server(log_path)
    try:
        print(f"\nserver: {url} (log: {log_path})")
        for tenant, path in adapters.items():
            r = httpx.put(f"{url}/admin/adapters/{tenant}/v1",
                          json={"path": str(path), "activate": True}, timeout=60)
            r.raise_for_status()
            print(f"loaded {tenant}@v1: rank {r.json()['rank']}, {r.json()['bytes']} bytes")
        models = httpx.get(f"{url}/v1/models").json()
        base_name, precision = models["base_model"], models["precision"]
        print(f"precision: {precision['quantization']} weights, {precision['compute_dtype']} "
              f"compute ({precision['reason']})")
        started = time.monotonic()
        results = asyncio.run(_ask_all(url, base_name))
        print(f"\n{len(results)} concurrent chat requests in {time.monotonic() - started:.1f} s")
        for model, prompt, text, seconds in results:
            who = "base model" if model == base_name else f"tenant {model}"
            print(f"\n--- {who} ({seconds:.1f} s)\n> {prompt}\n{text}")
        metrics = httpx.get(f"{url}/metrics").text
        rows = re.search(r"^loramux_batch_size_sum ([\d.e+]+)$", metrics, re.M)
        steps = re.search(r"^loramux_batch_size_count ([\d.e+]+)$", metrics, re.M)
        if rows and steps and float(steps.group(1)):
            mean = float(rows.group(1)) / float(steps.group(1))
            print(f"\nmean rows per decode step: {mean:.2f} over {int(float(steps.group(1)))}"
                  " steps (base and tenants share forward passes)")
        listing = httpx.get(f"{url}/admin/adapters").json()["adapters"]
        print("adapter tiers:", json.dumps(
            [{k: a[k] for k in ("tenant", "version", "residency", "hits", "bytes")}
             for a in listing]))
    finally:
        proc.terminate()
        proc.wait(20)
    print(f"\ndemo finished in {time.monotonic() - demo_started:.0f} s")


if __name__ == "__main__":
    main()
