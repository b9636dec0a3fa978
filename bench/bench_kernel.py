"""In-process decode steps, distinct tenants: the CPU kernel against the plain-torch path.

The default model in the dtype ``auto`` picks, 32 of the suite's rank-16 q/k/v/o tenants
resident at scattered ids (added in a shuffled order, as after the suite's concurrent
warm-up), B distinct rows. Four cases per B, interleaved within each repetition:

- ``base``: the same rows on no adapter (the upper bound);
- ``torch``: the plain-torch path (gathered or dense) with fp32 stacks;
- ``kernel-fp32``: loramux's CPU kernel (inference/bgmv.py) on fp32 stacks;
- ``kernel-bf16``: the kernel on bf16 stacks (read as bf16, summed in fp32).

Each case runs ``--steps`` decode steps per repetition (median kept); the report gives the
median over repetitions and each case's ratio to the base, both from the same repetitions.
Needs the suite's adapters (run ``bench/suite.py`` once).

    .venv/bin/python bench/bench_kernel.py [--rows 1,4,8,16,32] [--repeats 5] [--out F]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_decode_step import decode_step_times  # noqa: E402

ROOT = HERE / ".cache" / "suite" / "adapters"
PROMPT = "Explain the difference between a virus and a bacterium."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    import torch

    from loramux.inference import lora_backend
    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.bgmv import load
    from loramux.inference.model_loader import load_base_model
    from loramux.inference.precision import cpu_info

    torch.set_grad_enabled(False)
    kernel, reason = load()
    if kernel is None:
        raise SystemExit(f"the CPU kernel is not available here: {reason}")
    base = load_base_model(None, "auto", "cpu")
    print("precision:", base.precision)
    facts = BaseFacts.from_model(base.model, base.aliases)
    backend = lora_backend.BatchedLoraBackend(base.model, lora_dtype=torch.float32)
    names = [f"s{i}" for i in range(32)]
    order = names[:]
    random.Random(0).shuffle(order)
    for name in order:
        backend.add(name, read_adapter(ROOT / "r16" / name / "v1", facts, max_rank=64))
    prompt = base.tokenizer(PROMPT, return_tensors="pt").input_ids
    ctx = backend._ctx

    def set_stacks(dtype: torch.dtype) -> None:
        for layer in backend._layers.values():
            layer.A, layer.B = layer.A.to(dtype), layer.B.to(dtype)
            layer.lora_dtype = dtype
        backend.lora_dtype = dtype

    def case(name: str, rows: int) -> float:
        slots: list[str | None] = [None] * rows if name == "base" else list(names[:rows])
        ctx.kernel = None if name in ("base", "torch") else kernel
        set_stacks(torch.bfloat16 if name == "kernel-bf16" else torch.float32)
        times = decode_step_times(backend, base.model.config, prompt, slots, args.steps)
        return statistics.median(times) * 1000

    cases = ["base", "torch", "kernel-fp32", "kernel-bf16"]
    results: dict[str, dict[str, list[float]]] = {}
    started = time.time()
    for rows in (int(r) for r in args.rows.split(",")):
        samples: dict[str, list[float]] = {c: [] for c in cases}
        for rep in range(args.repeats):
            for name in cases:
                samples[name].append(case(name, rows))
            print(f"B={rows} rep {rep + 1}/{args.repeats}: "
                  + ", ".join(f"{c} {samples[c][-1]:.1f}" for c in cases), flush=True)
        results[str(rows)] = samples
        base_ms = statistics.median(samples["base"])
        medians = {c: statistics.median(samples[c]) for c in cases}
        print(f"B={rows} median ms: " + ", ".join(
            f"{c} {medians[c]:.1f} ({base_ms / medians[c]:.2f})" for c in cases), flush=True)
    print(f"took {time.time() - started:.0f} s")
    if args.out is not None:
        info = cpu_info()
        args.out.write_text(json.dumps({
            "command": " ".join(["bench/bench_kernel.py", *sys.argv[1:]]),
            "cpu": info.model, "native_bf16": info.native_bf16,
            "machine": platform.machine(), "kernel": reason,
            "precision": str(base.precision), "steps": args.steps, "repeats": args.repeats,
            "ms": results}, indent=1))


if __name__ == "__main__":
    main()
