"""In-process decode steps when every row uses one adapter: the adapter merged into the
weights against its own LoRA pair, and the base alone.

One backend (bf16 weights and LoRA stacks on a CPU with native bf16, as ``loramux serve``
picks by default), 8 rank-16 q/k/v/o tenants resident. For B identical rows on one tenant,
each repetition times 10 decode steps (best step kept) three ways, interleaved: the base
rows alone, the tenant's LoRA pair (``merge_uniform`` off) and the merged weights (on).
4 repetitions. Also times one merge (the first uniform step on a new adapter after another
one's). This is the measurement behind ``--merge-uniform-batches`` (docs/benchmarks.md).

    .venv/bin/python bench/bench_uniform_merge.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_adapters import tenant_adapters  # noqa: E402
from bench_decode_step import decode_step_times  # noqa: E402

PROMPT = "Explain the difference between a virus and a bacterium."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    import torch

    from loramux.inference import lora_backend
    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.model_loader import load_base_model
    from loramux.inference.precision import cpu_info

    torch.set_grad_enabled(False)
    base = load_base_model(None, "auto", "cpu")
    facts = BaseFacts.from_model(base.model, base.aliases)
    dtype = base.precision.torch_dtype if base.precision is not None else torch.float32
    backend = lora_backend.BatchedLoraBackend(base.model, lora_dtype=dtype)
    for i, path in enumerate(tenant_adapters(8).values()):
        backend.add(f"s{i}", read_adapter(path, facts, max_rank=64))
    prompt = base.tokenizer(PROMPT, return_tensors="pt").input_ids
    ctx = backend._ctx

    def best_ms(slots: list[str | None], merge: bool) -> float:
        ctx.merge = merge
        return min(decode_step_times(backend, base.model.config, prompt, slots, 10)) * 1000

    results: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeats):
        for rows in (int(r) for r in args.rows.split(",")):
            for form, slots, merge in (("base alone", [None] * rows, False),
                                       ("LoRA pair", ["s0"] * rows, False),
                                       ("merged", ["s0"] * rows, True)):
                results.setdefault((rows, form), []).append(best_ms(slots, merge))

    # One merge: a one-token forward whose every row is on an adapter other than the merged
    # one, less the same forward once that adapter is merged (best of 5 each).
    ctx.merge = True
    merge_ms, steady_ms = [], []
    ids = prompt[:, :1]
    for k in range(5):
        slot = f"s{1 + k % 7}"
        for out in (merge_ms, steady_ms):
            from transformers import DynamicCache

            t = time.perf_counter()
            backend.forward(ids, torch.ones_like(ids), torch.zeros_like(ids),
                            DynamicCache(config=base.model.config), [slot])
            out.append((time.perf_counter() - t) * 1000)

    print(f"CPU: {cpu_info().describe()}")
    print(f"weights {base.quantization}, compute {base.compute_dtype}, stacks {dtype}")
    print(f"{'rows':>4} {'form':12} {'best ms':>8} {'tok/s':>7} {'/ base':>7}  repetitions")
    for (rows, form), values in results.items():
        best = min(values)
        ratio = min(results[(rows, "base alone")]) / best
        print(f"{rows:4} {form:12} {best:8.1f} {rows * 1000 / best:7.1f} {ratio:7.2f}  "
              f"{[round(v, 1) for v in values]}")
    print(f"one-token forward with a merge: median {statistics.median(merge_ms):.1f} ms; "
          f"without: {statistics.median(steady_ms):.1f} ms")


if __name__ == "__main__":
    main()
