"""In-process decode-step time of each LoRA backend, on the main thread and on a worker thread.

No HTTP, no engine: the backend's ``forward`` for one decode step of a batch (8 rows after
a short prompt), median over ``--steps`` steps, on the NF4 SmolLM2-135M base with 8 rank-16
q/k/v/o tenants resident. The same is timed on a second thread after the main thread has
run torch (as in ``loramux serve``, whose engine thread runs the forward passes), which
shows the OpenMP effect described in docs/benchmarks.md and bench/repro_openmp_threads.py.

    .venv/bin/python bench/bench_decode_step.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_adapters import tenant_adapters  # noqa: E402

PROMPT = "Explain the difference between a virus and a bacterium."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backends", default="batched,peft")
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    from loramux.inference import lora_backend
    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.model_loader import load_base_model

    torch.set_grad_enabled(False)
    adapters = tenant_adapters(8)
    results: list[tuple[str, str, str, float]] = []

    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        base = load_base_model(None, "nf4", "cpu")
        facts = BaseFacts.from_model(base.model, base.aliases)
        backend = (lora_backend.BatchedLoraBackend(base.model) if name == "batched"
                   else lora_backend.PeftMixedBatchBackend(base.model))
        slots = []
        for i, path in enumerate(adapters.values()):
            backend.add(f"s{i}", read_adapter(path, facts, max_rank=64))
            slots.append(f"s{i}")
        prompt = base.tokenizer(PROMPT, return_tensors="pt").input_ids
        cases: dict[str, list[str | None]] = {
            "8 rows, 8 distinct tenants": list(slots),
            "8 rows, 1 tenant": [slots[0]] * 8,
            "8 rows, base only": [None] * 8,
            "1 row, 1 tenant": [slots[0]],
        }

        def step_ms(row_slots: list[str | None], steps: int, backend=backend,
                    prompt=prompt, base=base) -> float:
            rows = len(row_slots)
            ids = prompt.repeat(rows, 1)
            length = ids.shape[1]
            cache = DynamicCache(config=base.model.config)
            mask = torch.ones(rows, length, dtype=torch.long)
            positions = torch.arange(length).repeat(rows, 1)
            last = backend.forward(ids, mask, positions, cache, row_slots).argmax(-1)
            pos = torch.full((rows,), length)
            samples = []
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], 1)
                t = time.perf_counter()
                logits = backend.forward(last[:, None], mask, pos[:, None], cache, row_slots)
                samples.append(time.perf_counter() - t)
                last, pos = logits.argmax(-1), pos + 1
            return statistics.median(samples) * 1000

        def run_all(where: str, name: str = name, cases: dict = cases, step_ms=step_ms) -> None:
            for label, row_slots in cases.items():
                step_ms(row_slots, 3)
                results.append((name, where, label, step_ms(row_slots, args.steps)))

        run_all("main thread")
        worker = threading.Thread(target=run_all, args=("worker thread",))
        worker.start()
        worker.join()
        print(f"{name} done", flush=True)

    print(f"\ndecode step, ms (median of {args.steps}); torch threads: {torch.get_num_threads()}")
    print(f"{'backend':8} {'thread':14} {'batch':28} {'ms/step':>8} {'tok/s':>7}")
    for name, where, label, ms in results:
        rows = 1 if label.startswith("1 row") else 8
        print(f"{name:8} {where:14} {label:28} {ms:8.1f} {rows * 1000 / ms:7.1f}")


if __name__ == "__main__":
    main()
