"""How many bytes of weights one decode step reads: the base's, and each distinct adapter's.

A decode step of a small model on a CPU reads every weight once and does little arithmetic
per byte, so its time is close to (bytes read) / (memory bandwidth). Serving B distinct
adapters adds their LoRA weights to what each step reads, and that alone bounds loramux's
throughput against the base model alone, whatever the kernel:

    loramux / base  <=  base bytes / (base bytes + B x adapter bytes)

This prints that bound for the embedded default model and the suite's rank-16 q/k/v/o
adapters, with LoRA stacks in fp32 and in bf16. No timing: counts from the checkpoint's
config and the adapter's safetensors header.

    .venv/bin/python bench/lora_bytes.py
    .venv/bin/python bench/lora_bytes.py --adapter PATH --weights-dtype bf16 --batches 8,16
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE_ADAPTER = HERE / ".cache" / "suite" / "adapters" / "r16" / "s0" / "v1"
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "nf4": 0.5}


def base_linear_params(config: dict) -> int:
    """Parameters of every projection a decode step multiplies by, lm_head included (the
    embedding lookup reads one row per token, negligible)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * 2 + hidden * inter * 3
    return per_layer * config["num_hidden_layers"] + hidden * config["vocab_size"]


def adapter_params(path: Path) -> int:
    """LoRA parameters in an adapter's safetensors file (read from its header only)."""
    with (path / "adapter_model.safetensors").open("rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in meta["shape"]:
            n *= d
        total += n
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: the "
                   "embedded default model, converted on first use)")
    p.add_argument("--adapter", type=Path, default=SUITE_ADAPTER,
                   help="an adapter dir (default: the suite's rank-16 q/k/v/o s0; run "
                   "bench/suite.py once to build it)")
    p.add_argument("--weights-dtype", default="bf16", choices=sorted(BYTES),
                   help="the base's weights as served (auto picks bf16 on a CPU with native "
                   "bf16, fp32 on an AVX2-only one)")
    p.add_argument("--batches", default="1,4,8,16,32")
    args = p.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(HERE.parent))
        from loramux.inference.model_loader import ensure_default_model

        args.model = ensure_default_model()
    if not (args.adapter / "adapter_model.safetensors").is_file():
        raise SystemExit(f"no adapter at {args.adapter} (run bench/suite.py once, or pass "
                         "--adapter)")
    config = json.loads((args.model / "config.json").read_text())
    base = base_linear_params(config) * BYTES[args.weights_dtype]
    lora = adapter_params(args.adapter)
    print(f"base: {base_linear_params(config) / 1e6:.1f} M projection parameters, "
          f"{base / 1e6:.0f} MB as {args.weights_dtype}")
    print(f"adapter {args.adapter}: {lora / 1e6:.3f} M parameters, "
          f"{lora * 4 / 1e6:.2f} MB fp32, {lora * 2 / 1e6:.2f} MB bf16")
    print()
    print("| distinct adapters in a step | LoRA MB (fp32) | bound (fp32 stacks) | "
          "LoRA MB (bf16) | bound (bf16 stacks) |")
    print("|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batches.split(",")):
        f32, b16 = b * lora * 4, b * lora * 2
        print(f"| {b} | {f32 / 1e6:.1f} | {base / (base + f32):.2f} | {b16 / 1e6:.1f} | "
              f"{base / (base + b16):.2f} |")


if __name__ == "__main__":
    main()
