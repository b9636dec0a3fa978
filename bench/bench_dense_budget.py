"""Whole decode steps with distinct tenants, dense against gathered LoRA form, and the base.

In process, the default model with ``--adapters`` rank-16 q/k/v/o residents at ids 1..N
(LoRA stacks in the compute dtype ``auto`` picks: fp32 on a CPU without native bf16). For
each row count, each repetition runs 8 decode steps per case (median kept): every row on
its own tenant with the dense budget forced high (``DENSE_BUDGET``, and
``DENSE_BUDGET_FP32_AVX2``) and forced to 0 (gathered), and the base rows alone; the cases
interleaved. This is the measurement behind ``DENSE_BUDGET_FP32_AVX2`` in
``inference/lora_backend.py``.

    .venv/bin/python bench/bench_dense_budget.py [--rows 4,8,16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_adapters import tenant_adapters  # noqa: E402
from bench_decode_step import decode_step_times  # noqa: E402

PROMPT = "Explain the difference between a virus and a bacterium."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="4,8,16")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from loramux.inference import lora_backend
    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.model_loader import load_base_model

    torch.set_grad_enabled(False)
    base = load_base_model(None, "auto", "cpu")
    facts = BaseFacts.from_model(base.model, base.aliases)
    dtype = base.precision.torch_dtype if base.precision is not None else torch.float32
    backend = lora_backend.BatchedLoraBackend(base.model, lora_dtype=dtype)
    for i, path in enumerate(tenant_adapters(args.adapters).values()):
        backend.add(f"s{i}", read_adapter(path, facts, max_rank=64))
    prompt = base.tokenizer(PROMPT, return_tensors="pt").input_ids
    print(f"LoRA stacks {dtype}, fp32-on-AVX2 budget in use: {backend._ctx.fp32_avx2}")
    saved = lora_backend.DENSE_BUDGET, lora_backend.DENSE_BUDGET_FP32_AVX2
    results: dict[tuple[int, str], list[float]] = {}

    def median_ms(slots: list[str | None]) -> float:
        times = decode_step_times(backend, base.model.config, prompt, slots, 8)
        return statistics.median(times) * 1000

    try:
        for _ in range(args.repeats):
            for rows in (int(r) for r in args.rows.split(",")):
                distinct = [f"s{i % args.adapters}" for i in range(rows)]
                for form, budget in (("dense", 10**9), ("gathered", 0)):
                    lora_backend.DENSE_BUDGET = lora_backend.DENSE_BUDGET_FP32_AVX2 = budget
                    results.setdefault((rows, form), []).append(median_ms(distinct))
                results.setdefault((rows, "base"), []).append(median_ms([None] * rows))
    finally:
        lora_backend.DENSE_BUDGET, lora_backend.DENSE_BUDGET_FP32_AVX2 = saved
    for (rows, case), values in sorted(results.items()):
        print(f"{rows} rows, {case}: median {statistics.median(values):.1f} ms "
              f"(repetitions {[round(v, 1) for v in values]})")


if __name__ == "__main__":
    main()
