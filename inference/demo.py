"""``make demo``: the embedded SmolLM2-135M in NF4 serving several tenants at once.

It starts a real ``loramux serve`` process on loopback, registers tenants' adapters through
the admin API, sends them concurrent requests (batched together in the engine), and shows
what each tenant got, the batch sizes the engine ran, and the adapter tiers.

The demo adapters are small random LoRA weights, not trained ones: they make each tenant's
output visibly its own. (Trained `legal` and `medical` adapters come with `loramux train`.)
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DEMO_TENANTS = {
    "legal": (16, ["q_proj", "k_proj", "v_proj", "o_proj"], 0.1),
    "medical": (8, ["q_proj", "v_proj"], 0.05),
    "support": (4, ["gate_proj", "up_proj", "down_proj"], 0.05),
}
PROMPTS = {
    "legal": "Write one sentence of a confidentiality clause.",
    "medical": "Write the Subjective part of a SOAP note for a patient with a cough.",
    "support": "Reply politely to a customer asking where their parcel is.",
}


def make_demo_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    """Random, small LoRA adapters (seeded) in PEFT's on-disk format, made once and cached."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out: dict[str, Path] = {}
    for seed, (tenant, (rank, targets, scale)) in enumerate(DEMO_TENANTS.items(), start=1):
        path = root / tenant / "v1"
        out[tenant] = path
        if (path / "adapter_model.safetensors").is_file():
            continue
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        torch.manual_seed(seed)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                init_lora_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
        model.save_pretrained(path)
    return out


def _start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    log = open(log_path, "w")  # noqa: SIM115 - the child process holds it
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "loramux.cli", "serve", "--port", "0", "--log-format", "text"],
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


async def _ask_all(url: str, base_name: str) -> list[tuple[str, dict, float]]:
    async with httpx.AsyncClient(timeout=300) as client:
        async def ask(model: str, prompt: str) -> tuple[str, dict, float]:
            started = time.monotonic()
            r = await client.post(f"{url}/v1/chat/completions", json={
                "model": model, "temperature": 0, "max_tokens": 40,
                "messages": [{"role": "user", "content": prompt}]})
            r.raise_for_status()
            return model, r.json(), time.monotonic() - started

        jobs = [ask(t, p) for t, p in PROMPTS.items()]
        jobs.append(ask(base_name, PROMPTS["legal"]))
        return await asyncio.gather(*jobs)


def main() -> None:
    from loramux.inference.model_loader import ensure_default_model

    print("== loramux demo: one NF4 base, several tenants, one batch ==")
    base_dir = ensure_default_model()
    print(f"base model: {base_dir}")
    work = Path(tempfile.gettempdir()) / "loramux-demo"
    adapters = make_demo_adapters(base_dir, work / "adapters")
    proc, url = _start_server(work.with_suffix(".log"))
    try:
        print(f"server: {url} (log: {work.with_suffix('.log')})")
        for tenant, path in adapters.items():
            r = httpx.put(f"{url}/admin/adapters/{tenant}/v1",
                          json={"path": str(path), "activate": True}, timeout=60)
            r.raise_for_status()
            print(f"loaded {tenant}@v1: rank {r.json()['rank']}, {r.json()['bytes']} bytes")
        base_name = httpx.get(f"{url}/v1/models").json()["base_model"]
        started = time.monotonic()
        results = asyncio.run(_ask_all(url, base_name))
        wall = time.monotonic() - started
        print(f"\n{len(results)} concurrent chat requests in {wall:.1f} s:")
        for model, body, seconds in results:
            text = body["choices"][0]["message"]["content"].strip().replace("\n", " ")
            print(f"\n[{model} -> adapter {body['adapter']}] ({seconds:.1f} s)\n  {text[:200]}")
        metrics = httpx.get(f"{url}/metrics").text
        batch = re.search(r"^loramux_batch_size_sum ([\d.e+]+)$", metrics, re.M)
        steps = re.search(r"^loramux_batch_size_count ([\d.e+]+)$", metrics, re.M)
        if batch and steps and float(steps.group(1)):
            mean = float(batch.group(1)) / float(steps.group(1))
            print(f"\nmean rows per decode step: {mean:.2f} over {int(float(steps.group(1)))}"
                  " steps (tenants share forward passes)")
        listing = httpx.get(f"{url}/admin/adapters").json()["adapters"]
        print("\nadapter tiers:")
        print(json.dumps([{k: a[k] for k in ("tenant", "version", "residency", "hits", "bytes")}
                          for a in listing], indent=1))
    finally:
        proc.terminate()
        proc.wait(20)


if __name__ == "__main__":
    main()
