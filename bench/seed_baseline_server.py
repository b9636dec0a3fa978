"""Naive multi-LoRA server that copies the seed articles' pattern on purpose.

This file exists ONLY as the comparison baseline for loramux benchmarks. Do not use it for
anything else. It copies the naive design from the seed articles on purpose: one transformers
model, one peft ``PeftModel`` holding every adapter, and ONE global lock held around
``set_adapter`` + ``model.generate()``, so every request runs alone (batch size 1) and tenants
take turns. It exposes the same ``POST /generate`` contract as the real server so that the same
load generator (``bench/loadgen.py``) can drive both.

    python bench/seed_baseline_server.py --model DIR --quantization nf4 --compute-dtype auto \
        --host 127.0.0.1 --port 8001 --adapter legal=/path --adapter medical=/path
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from peft import PeftModel
from pydantic import BaseModel


class GenerateRequest(BaseModel):
    tenant_id: str
    prompt: str
    max_new_tokens: int = 64
    ignore_eos: bool = False
    temperature: float | None = None  # accepted for contract parity; decoding is always greedy


def load_model(model_dir: str, quantization: str, compute_dtype: str,
               adapters: dict[str, str]) -> tuple[Any, Any]:
    # The base is loaded exactly as loramux loads it (same weights format, compute dtype and
    # kernels), so the comparison measures the serving design alone.
    from loramux.inference.model_loader import load_base_model

    loaded = load_base_model(Path(model_dir), quantization, "auto",  # type: ignore[arg-type]
                             compute_dtype=compute_dtype)  # type: ignore[arg-type]
    base, tokenizer = loaded.model, loaded.tokenizer
    items = list(adapters.items())
    first_name, first_path = items[0]
    model = PeftModel.from_pretrained(base, first_path, adapter_name=first_name)
    for name, path in items[1:]:
        model.load_adapter(path, adapter_name=name)
    model.eval()
    return model, tokenizer


def create_app(model: Any, tokenizer: Any, tenants: set[str]) -> FastAPI:
    app = FastAPI(title="seed-baseline (benchmark only)")
    lock = asyncio.Lock()  # the one global lock: every request is served alone
    # Same thread discipline as loramux (one thread runs torch with every core; see
    # bench/repro_openmp_threads.py), so the comparison measures batching, not that pitfall.
    worker = concurrent.futures.ThreadPoolExecutor(
        1, initializer=torch.set_num_threads, initargs=(len(os.sched_getaffinity(0)),))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    def run(req: GenerateRequest) -> tuple[str, int, int]:
        model.set_adapter(req.tenant_id)
        inputs = tokenizer(req.prompt, return_tensors="pt").to(model.device)
        prompt_len = int(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=req.max_new_tokens,
                min_new_tokens=req.max_new_tokens if req.ignore_eos else None,
                do_sample=False,
                pad_token_id=pad_id,
            )
        new_tokens = out[0, prompt_len:]
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        return text, prompt_len, int(new_tokens.shape[0])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> dict[str, Any]:
        if req.tenant_id not in tenants:
            raise HTTPException(status_code=404, detail=f"unknown tenant {req.tenant_id!r}")
        if req.max_new_tokens < 1:
            raise HTTPException(status_code=422, detail="max_new_tokens must be >= 1")
        async with lock:
            loop = asyncio.get_running_loop()
            text, n_prompt, n_completion = await loop.run_in_executor(worker, run, req)
        return {
            "tenant_id": req.tenant_id,
            "version": None,
            "text": text,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion},
        }

    return app


def parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected tenant=PATH, got {spec!r}")
    return name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local base checkpoint directory")
    parser.add_argument("--quantization", choices=["auto", "nf4", "bf16", "fp16", "none"],
                        default="auto")
    parser.add_argument("--compute-dtype", choices=["auto", "bf16", "fp16", "fp32"],
                        default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--adapter",
        type=parse_adapter,
        action="append",
        required=True,
        help="tenant=PATH, repeatable",
    )
    args = parser.parse_args()
    adapters = dict(args.adapter)
    torch.set_num_threads(1)  # the main thread never runs the model (see create_app)
    model, tokenizer = load_model(args.model, args.quantization, args.compute_dtype, adapters)
    app = create_app(model, tokenizer, set(adapters))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
