"""The base's linear layers: torch's ``F.linear`` (MKL) against oneDNN on packed weights.

Two parts, both on the default model in the dtype ``auto`` picks, threads = all CPUs:

- ``shapes``: each distinct linear shape of the model (q, k/v, o, gate/up, down, the output
  layer) at several row counts, ms per call: ``F.linear``, oneDNN on the dense weight, and
  oneDNN on the weight packed for 8 rows (``inference/cpu_linear.py``'s hint) and for the
  exact row count;
- ``steps``: whole decode steps of B base rows through loramux's batched backend, with the
  model unpacked and packed (``pack_linears``), interleaved within each repetition (median).

    .venv/bin/python bench/bench_cpu_linear.py [--rows 1,8,16,32] [--repeats 3] [--out F]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_decode_step import decode_step_times  # noqa: E402

PROMPT = "Explain the difference between a virus and a bacterium."


def _ms(fn, *args, repeats: int = 20) -> float:
    for _ in range(3):
        fn(*args)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]

    import torch
    import torch.nn.functional as F

    from loramux.inference import lora_backend
    from loramux.inference.cpu_linear import OneDnnLinear, pack_linears, pack_weight, packed_linear
    from loramux.inference.model_loader import load_base_model
    from loramux.inference.precision import cpu_info

    torch.set_grad_enabled(False)
    base = load_base_model(None, "auto", "cpu")
    print("precision:", base.precision, "threads:", torch.get_num_threads())
    shapes: dict[tuple[int, int], str] = {}
    for name, module in base.model.named_modules():
        if type(module) is torch.nn.Linear:
            shapes.setdefault(tuple(module.weight.shape), name.rsplit(".", 1)[-1])
    shape_rows = []
    for (out_f, in_f), name in shapes.items():
        weight = torch.randn(out_f, in_f, dtype=base.precision.torch_dtype)
        packed8 = pack_weight(weight, 8)
        for rows in rows_list:
            x = torch.randn(rows, in_f, dtype=weight.dtype)
            exact = pack_weight(weight, rows)
            rec = {"layer": name, "out": out_f, "in": in_f, "rows": rows,
                   "torch_ms": _ms(F.linear, x, weight),
                   "onednn_dense_ms": _ms(packed_linear, x, weight, None),
                   "onednn_packed8_ms": _ms(packed_linear, x, packed8, None),
                   "onednn_packed_exact_ms": _ms(packed_linear, x, exact, None)}
            shape_rows.append(rec)
            print(f"{name:10s} {out_f:6d}x{in_f:<5d} rows {rows:3d}: torch "
                  f"{rec['torch_ms']:.3f}  dense {rec['onednn_dense_ms']:.3f}  packed8 "
                  f"{rec['onednn_packed8_ms']:.3f}  exact {rec['onednn_packed_exact_ms']:.3f}")

    backend = lora_backend.BatchedLoraBackend(base.model, lora_dtype=torch.float32)
    prompt = base.tokenizer(PROMPT, return_tensors="pt").input_ids
    linears = [m for m in base.model.modules() if type(m) is torch.nn.Linear]

    def set_packed(on: bool) -> None:
        if on:
            pack_linears(base.model)
        else:
            for module in linears:
                if isinstance(module, OneDnnLinear):
                    module.__class__ = torch.nn.Linear
                    module._packed = None

    samples: dict[str, dict[int, list[float]]] = {"torch": {}, "onednn": {}}
    for rep in range(args.repeats):
        for rows in rows_list:
            for case in ("torch", "onednn"):
                set_packed(case == "onednn")
                times = decode_step_times(backend, base.model.config, prompt, [None] * rows,
                                          args.steps)
                samples[case].setdefault(rows, []).append(statistics.median(times) * 1e3)
        print(f"repetition {rep + 1}/{args.repeats} done")
    steps = []
    for rows in rows_list:
        t, o = (statistics.median(samples[c][rows]) for c in ("torch", "onednn"))
        ratios = [a / b for a, b in zip(samples["torch"][rows], samples["onednn"][rows],
                                        strict=True)]
        steps.append({"rows": rows, "torch_ms": t, "onednn_ms": o,
                      "speedup_median": statistics.median(ratios)})
        print(f"B={rows:3d}: step torch {t:.1f} ms, oneDNN packed {o:.1f} ms, "
              f"x{statistics.median(ratios):.2f}")
    if args.out:
        info = cpu_info()
        args.out.write_text(json.dumps({
            "machine": {"cpu": info.model, "flags": sorted(info.flags & {
                "avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"}),
                "python": platform.python_version(), "torch": torch.__version__,
                "threads": torch.get_num_threads()},
            "precision": str(base.precision), "command": " ".join(sys.argv),
            "shapes": shape_rows, "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
