"""In-process decode-step time of each LoRA backend and precision, on the main and a worker thread.

No HTTP, no engine: the backend's ``forward`` for one decode step of a batch (8 rows after
a short prompt), median over ``--steps`` steps, on the SmolLM2-135M base with 8 rank-16
q/k/v/o tenants resident. ``--precisions`` lists weight formats, each optionally with a
compute dtype (``nf4:fp32``); ``auto`` is what ``loramux serve`` would choose here. This is
the measurement behind ``--quantization auto`` (docs/benchmarks.md, "Precision by CPU kind"):

    .venv/bin/python bench/bench_decode_step.py --backends batched \
        --precisions nf4:bf16,nf4:fp32,bf16,none,auto --no-worker-thread
 The same is timed on a second thread after the main thread has
run torch (as in ``loramux serve``, whose engine thread runs the forward passes), which
shows the OpenMP effect described in docs/benchmarks.md and bench/repro_openmp_threads.py.

    .venv/bin/python bench/bench_decode_step.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_adapters import tenant_adapters  # noqa: E402

PROMPT = "Explain the difference between a virus and a bacterium."


def decode_step_times(backend, model_config, prompt, row_slots: list[str | None],
                      steps: int) -> list[float]:
    """Prefill ``prompt`` once per row, then time ``steps`` decode steps of the backend's
    ``forward`` (seconds each), every row on its slot in ``row_slots``."""
    import torch
    from transformers import DynamicCache

    rows = len(row_slots)
    ids = prompt.repeat(rows, 1)
    length = ids.shape[1]
    cache = DynamicCache(config=model_config)
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
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backends", default="batched,peft")
    parser.add_argument("--precisions", default="nf4:auto",
                        help="comma list of QUANT[:COMPUTE], e.g. nf4:bf16,nf4:fp32,bf16,none,auto")
    parser.add_argument("--cpu-linear", default="auto",
                        help="comma list of --cpu-linear modes (auto,onednn,torch), each packed "
                             "after the backend as loramux serve does")
    parser.add_argument("--no-worker-thread", action="store_true",
                        help="time the main thread only")
    args = parser.parse_args()

    import torch

    from loramux.inference import lora_backend
    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.cpu_linear import CpuLinearError, pack_linears
    from loramux.inference.model_loader import load_base_model
    from loramux.inference.precision import cpu_info

    torch.set_grad_enabled(False)
    adapters = tenant_adapters(8)
    results: list[tuple[str, str, str, str, float]] = []
    combos = [(p.partition(":")[0], p.partition(":")[2] or "auto")
              for p in (x.strip() for x in args.precisions.split(",")) if p]

    modes = [m.strip() for m in args.cpu_linear.split(",") if m.strip()]
    for (quant, compute), name, mode in itertools.product(
            combos, [b.strip() for b in args.backends.split(",") if b.strip()], modes):
        base = load_base_model(None, quant, "cpu", compute_dtype=compute)  # type: ignore[arg-type]
        facts = BaseFacts.from_model(base.model, base.aliases)
        backend = (lora_backend.BatchedLoraBackend(base.model) if name == "batched"
                   else lora_backend.PeftMixedBatchBackend(base.model))
        try:
            linear = pack_linears(base.model, mode)  # type: ignore[arg-type]
        except CpuLinearError as exc:
            print(f"{quant}:{compute} {name} --cpu-linear {mode}: skipped ({exc})", flush=True)
            continue
        label_p = f"{base.quantization}/{base.compute_dtype}/{linear.state}"
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
            samples = decode_step_times(backend, base.model.config, prompt, row_slots, steps)
            return statistics.median(samples) * 1000

        def run_all(where: str, name: str = name, cases: dict = cases, step_ms=step_ms,
                    label_p: str = label_p) -> None:
            for label, row_slots in cases.items():
                step_ms(row_slots, 3)
                results.append((label_p, name, where, label, step_ms(row_slots, args.steps)))

        run_all("main thread")
        if not args.no_worker_thread:
            worker = threading.Thread(target=run_all, args=("worker thread",))
            worker.start()
            worker.join()
        print(f"{label_p} {name} done ({base.precision.reason if base.precision else ''})",
              flush=True)

    print(f"\nCPU: {json.dumps(cpu_info().describe())}")
    print(f"decode step, ms (median of {args.steps}); torch threads: {torch.get_num_threads()}")
    print(f"{'precision':20} {'backend':8} {'thread':14} {'batch':28} {'ms/step':>8} {'tok/s':>7}")
    for label_p, name, where, label, ms in results:
        rows = 1 if label.startswith("1 row") else 8
        print(f"{label_p:20} {name:8} {where:14} {label:28} {ms:8.1f} {rows * 1000 / ms:7.1f}")


if __name__ == "__main__":
    main()
