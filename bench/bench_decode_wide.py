"""In-process decode steps with wide adapters resident: dense (with its copy) against gathered.

32 residents added in a shuffled order (so the tenants' ids are scattered, as after the
suite's concurrent warm-up), two of them rank 64 (so every q/k/v/o layer is padded to 64),
the others the suite's rank-16 ``s<i>``; LoRA stacks in the compute dtype ``auto`` picks
(bf16 on a CPU with native bf16, else fp32; ``--dtype`` to force); 8 and 16 distinct rows,
and the base rows alone. A dense step on such a layer first copies the used positions' leading
ranks. Each case runs 10 decode steps per repetition (best step kept), 4 interleaved
repetitions. Needs the suite's adapters (run ``bench/suite.py`` once). This is the
measurement behind ``DENSE_MAX_COPY`` in ``inference/lora_backend.py``.

    .venv/bin/python bench/bench_decode_wide.py [--dtype auto|fp32|bf16]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_decode_step import decode_step_times  # noqa: E402

ROOT = HERE / ".cache" / "suite" / "adapters"
PROMPT = "Explain the difference between a virus and a bacterium."


def main() -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    args = parser.parse_args()

    from loramux.inference import lora_backend
    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.model_loader import load_base_model

    torch.set_grad_enabled(False)
    base = load_base_model(None, "auto", "cpu")
    facts = BaseFacts.from_model(base.model, base.aliases)
    paths = {f"a{i}": ROOT / "r16" / f"s{i}" / "v1" for i in range(30)}
    paths.update(w0=ROOT / "r64" / "m64-0" / "v1", w1=ROOT / "r64" / "m64-1" / "v1")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype) or (
        base.precision.torch_dtype if base.precision is not None else torch.float32)
    print("LoRA stacks:", dtype)
    backend = lora_backend.BatchedLoraBackend(base.model, lora_dtype=dtype)
    order = list(paths)
    random.Random(0).shuffle(order)
    for name in order:
        backend.add(name, read_adapter(paths[name], facts, max_rank=64))
    prompt = base.tokenizer(PROMPT, return_tensors="pt").input_ids

    def best_step_ms(slots: list[str | None], steps: int = 10) -> float:
        return min(decode_step_times(backend, base.model.config, prompt, slots, steps)) * 1000

    print("ids of a0..a15:", sorted(backend._ids[f"a{i}"] for i in range(16)),
          "rank-64 ids:", backend._ids["w0"], backend._ids["w1"])
    cases = {"8 distinct": [f"a{i}" for i in range(8)],
             "16 distinct": [f"a{i}" for i in range(16)],
             "8 base": [None] * 8, "16 base": [None] * 16}
    results: dict[tuple[str, str], list[float]] = {}
    saved = lora_backend.DENSE_MAX_COPY
    try:
        for _ in range(4):
            for case, slots in cases.items():
                for form, limit in (("dense with copy", 10**9), ("gathered", 0)):
                    if slots[0] is None and form == "gathered":
                        continue
                    lora_backend.DENSE_MAX_COPY = limit
                    results.setdefault((case, form), []).append(best_step_ms(slots))
    finally:
        lora_backend.DENSE_MAX_COPY = saved
    for (case, form), values in results.items():
        print(f"{case}, {form}: best {min(values):.1f} ms "
              f"(repetitions {[round(v, 1) for v in values]})")


if __name__ == "__main__":
    main()
