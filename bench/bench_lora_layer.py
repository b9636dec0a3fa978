"""One batched LoRA layer's extra time over its base layer, dense against gathered form.

In process, no model: a bf16 ``Linear(576, out)`` (the default model's q/o or k/v shape)
wrapped by ``BatchedLoraLinear`` with ``adapters`` resident adapters of rank ``r``, one
decode step of ``rows`` rows on distinct adapters. Each case is timed in both forms
(``DENSE_BUDGET`` forced high or to 0) and without any adapter row, interleaved, best of
5 repetitions (this VM's noise is one-sided: a slow repetition is a neighbour, not the
code). This is the measurement behind ``DENSE_BUDGET`` in ``inference/lora_backend.py``.

    .venv/bin/python bench/bench_lora_layer.py [--dtype fp32|bf16] [--threads N]
"""

from __future__ import annotations

import argparse
import time

CASES = [  # (rows, resident adapters, rank)
    (4, 4, 16), (8, 8, 16), (16, 16, 16), (32, 32, 16), (8, 8, 64), (8, 16, 16),
    (32, 16, 8),
]


def best_us(fn, n: int = 300, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="the LoRA stacks' dtype (the base layer is bf16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import torch

    from loramux.inference import lora_backend as lb

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, LoRA stacks "
          f"{args.dtype}, base bf16; extra us over the base layer, best of 5")
    print()
    print("| out | rows | adapters | rank | width (used x r_max) | rows x width | base layer | "
          "gathered | dense |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    saved = lb.DENSE_BUDGET, lb.DENSE_MAX_WASTE
    try:
        for out in (576, 192):
            for rows, adapters, rank in CASES:
                base = torch.nn.Linear(576, out, bias=False).to(torch.bfloat16)
                ctx = lb._RowContext()
                layer = lb.BatchedLoraLinear(base, ctx, dtype, capacity=adapters + 1)
                for i in range(1, adapters + 1):
                    layer.add(i, torch.randn(rank, 576) / 24, torch.randn(out, rank) / 24)
                ids = [1 + (i % adapters) for i in range(rows)]
                x = torch.randn(rows, 1, 576, dtype=torch.bfloat16)
                times = {"gathered": float("inf"), "dense": float("inf"), "base": float("inf")}

                def step(layer=layer, x=x) -> object:
                    return layer(x)

                for _ in range(3):
                    ctx.set(ids, [rank] * rows, 1)
                    for form, budget in (("gathered", 0), ("dense", 10**9)):
                        lb.DENSE_BUDGET, lb.DENSE_MAX_WASTE = budget, 10**9
                        times[form] = min(times[form], best_us(step))
                    ctx.set([0] * rows, [0] * rows, 1)
                    times["base"] = min(times["base"], best_us(step))
                width = (adapters + 1) * rank
                print(f"| {out} | {rows} | {adapters} | {rank} | {width} | {rows * width} | "
                      f"{times['base']:.0f} | {times['gathered'] - times['base']:.0f} | "
                      f"{times['dense'] - times['base']:.0f} |", flush=True)
    finally:
        lb.DENSE_BUDGET, lb.DENSE_MAX_WASTE = saved


if __name__ == "__main__":
    main()
