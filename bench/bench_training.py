"""Training throughput and memory of MultiTaskTrainer: NF4 (QLoRA) vs bf16, 1 vs 2 tasks.

On the embedded SmolLM2-135M-Instruct, with the demo's data and LoRA shapes
(``examples/train-demo.yaml``: legal r16/alpha32 on q,k,v,o; medical r8/alpha16 on
q,v,gate,up,down), batch 4, max_length 160, lr 1e-3 (constant schedule, no warm-up, so
every timed step runs at the same lr), seed 7. Four configurations:

- ``nf4-1task``  / ``bf16-1task``:  medical only;
- ``nf4-2tasks`` / ``bf16-2tasks``: legal + medical, interleaved by temperature sampling (1.0).

Each configuration runs in a fresh subprocess (the script re-invokes itself with
``--one CONFIG``), because peak RSS only ever grows within a process. There it builds a
``MultiTaskTrainer`` (output_dir in a temporary directory), runs ``--warmup`` untimed
``train_step()`` calls, then times ``--steps`` calls one by one.

Tokens: the trainer's own counter (``task_tokens``, reported as ``TaskResult.tokens``) counts
only *loss* tokens (assistant replies). To count every non-padding token the forward and
backward passes process, the script wraps each task's batch stream (``trainer.batches[t].next``)
so it records the exact batches ``train_step`` draws, and sums ``len(example.input_ids)``
(the attention-mask ones of the collated batch). Padded tokens (batch x longest example) and
loss tokens are reported too; the loss-token sum is checked against ``task_tokens``.

Memory: ``ru_maxrss`` of the subprocess (model load included; also sampled just before the
first training step), and the model's parameter + buffer bytes (tied tensors counted once;
for NF4 the quantisation state's absmax/code tensors are included).

    .venv/bin/python bench/bench_training.py            # --steps 20 by default
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT / "examples" / "data"
RESULTS = HERE / "results" / "training.json"

LEGAL = {
    "name": "legal", "version": "v1", "data": str(DATA / "legal.jsonl"),
    "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
MEDICAL = {
    "name": "medical", "version": "v1", "data": str(DATA / "medical.jsonl"),
    "r": 8, "alpha": 16,
    "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
}
CONFIGS: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "nf4-1task": ("nf4", [MEDICAL]),
    "nf4-2tasks": ("nf4", [LEGAL, MEDICAL]),
    "bf16-1task": ("bf16", [MEDICAL]),
    "bf16-2tasks": ("bf16", [LEGAL, MEDICAL]),
}


def _cpu_busy_jiffies() -> int:
    """All CPUs' non-idle jiffies since boot (first line of /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def model_bytes(model: Any) -> dict[str, int]:
    """Parameter and buffer bytes, each storage counted once (tied embeddings)."""
    seen: set[int] = set()
    out: dict[str, Any] = {"params": 0, "buffers": 0, "quant_state": 0, "lora_params": 0}
    by_dtype: dict[str, int] = {}

    def add(kind: str, t: Any) -> None:
        ptr = t.data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        out[kind] += t.numel() * t.element_size()
        if kind == "params":
            dtype = str(t.dtype).removeprefix("torch.")
            by_dtype[dtype] = by_dtype.get(dtype, 0) + t.numel() * t.element_size()

    for name, p in model.named_parameters():
        add("lora_params" if ".lora_" in name else "params", p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None),
                      getattr(qs.state2, "code", None), getattr(qs, "offset", None)):
                if t is not None:
                    add("quant_state", t)
    for b in model.buffers():
        add("buffers", b)
    out["total"] = out["params"] + out["buffers"] + out["quant_state"] + out["lora_params"]
    out["base_params_by_dtype"] = by_dtype
    return out


def run_one(key: str, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    import torch

    from loramux.training.config import build_config
    from loramux.training.trainer import MultiTaskTrainer

    quantization, tasks = CONFIGS[key]
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        config = build_config({
            "base_model": None, "quantization": quantization, "device": "cpu",
            "output_dir": tmp, "steps": warmup + steps, "batch_size": 4,
            "max_length": 160, "lr": 1e-3, "schedule": "constant", "warmup_steps": 0,
            "seed": seed, "temperature": 1.0, "tasks": [dict(t) for t in tasks],
        }, f"bench {key}")
        t0 = time.perf_counter()
        trainer = MultiTaskTrainer(config)
        build_s = time.perf_counter() - t0
        rss_after_build = _rss_mib()
        peak_after_build = _peak_rss_mib()
        mem = model_bytes(trainer.model)

        # Record exactly the batches train_step draws from each task's stream.
        drawn: list[tuple[str, list[Any]]] = []
        for name, stream in trainer.batches.items():
            def recording(stream=stream, name=name):
                batch = stream.__class__.next(stream)
                drawn.append((name, batch))
                return batch
            stream.next = recording

        for _ in range(warmup):
            trainer.train_step()
        drawn.clear()
        loss_tokens_before = dict(trainer.task_tokens)

        step_s: list[float] = []
        losses: list[tuple[str, float]] = []
        busy0, own0, wall0 = _cpu_busy_jiffies(), _own_cpu_seconds(), time.perf_counter()
        for _ in range(steps):
            s = time.perf_counter()
            task, loss = trainer.train_step()
            step_s.append(time.perf_counter() - s)
            losses.append((task, loss))
        wall = time.perf_counter() - wall0
        busy = (_cpu_busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
        own = _own_cpu_seconds() - own0

    tokens = sum(len(e.input_ids) for _, b in drawn for e in b)
    padded = sum(len(b) * max(len(e.input_ids) for e in b) for _, b in drawn)
    loss_tokens = sum(e.loss_tokens for _, b in drawn for e in b)
    counted = sum(trainer.task_tokens[n] - loss_tokens_before[n] for n in trainer.task_tokens)
    assert loss_tokens == counted, (loss_tokens, counted)
    assert len(drawn) == steps * config.grad_accum
    per_task: dict[str, Any] = {}
    for name in trainer.params:
        mine = [loss for t, loss in losses if t == name]
        times = [t for (task, _), t in zip(losses, step_s, strict=True) if task == name]
        per_task[name] = {
            "steps": len(mine),
            "step_s_mean": statistics.fmean(times) if times else None,
            "tokens": sum(len(e.input_ids) for t, b in drawn if t == name for e in b),
            "first_loss": mine[0] if mine else None,
            "final_loss": mine[-1] if mine else None,
            "final_running_loss": trainer.running_loss.get(name),
        }
    return {
        "config": key, "quantization": quantization,
        "tasks": [t["name"] for t in tasks],
        "probabilities": dict(trainer.probabilities),
        "train_examples": {n: len(e) for n, e in trainer.train_examples.items()},
        "steps": steps, "warmup_steps": warmup,
        "build_s": build_s, "wall_s": wall,
        "step_s_mean": statistics.fmean(step_s), "step_s_median": statistics.median(step_s),
        "step_s_min": min(step_s), "step_s_max": max(step_s), "step_s": step_s,
        "step_tasks": [task for task, _ in losses],
        "tokens": tokens, "padded_tokens": padded, "loss_tokens": loss_tokens,
        "tokens_per_s": tokens / wall, "padded_tokens_per_s": padded / wall,
        "loss_tokens_per_s": loss_tokens / wall,
        "per_task": per_task,
        "peak_rss_mib": _peak_rss_mib(), "peak_rss_mib_after_build": peak_after_build,
        "rss_mib_after_build": rss_after_build, "rss_mib_end": _rss_mib(),
        "model_bytes": mem,
        "cpu": {"own_cores": own / wall, "foreign_cores": max(busy - own, 0.0) / wall},
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'config':<12} {'s/step':>7} {'med':>6} {'tok/s':>7} {'pad tok/s':>9} "
            f"{'peak RSS MiB':>12} {'model MiB':>9} {'foreign':>7}  final loss")
    print(head)
    print("-" * len(head))
    for r in rows:
        final = ", ".join(f"{n}={t['final_loss']:.3f} ({t['steps']} st)"
                          for n, t in r["per_task"].items() if t["final_loss"] is not None)
        print(f"{r['config']:<12} {r['step_s_mean']:>7.3f} {r['step_s_median']:>6.3f} "
              f"{r['tokens_per_s']:>7.0f} {r['padded_tokens_per_s']:>9.0f} "
              f"{r['peak_rss_mib']:>12.0f} {_mib(r['model_bytes']['total']):>9} "
              f"{r['cpu']['foreign_cores']:>7.2f}  {final}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.one:
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_one(args.one, args.steps, args.warmup, args.seed)), flush=True)
        return

    rows = []
    for key in args.configs:  # one at a time: never two measurements at once
        print(f"== {key} ...", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", key,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{key} failed (exit {proc.returncode})")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"   {row['step_s_mean']:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s, "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "training", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit, "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "batch_size": 4, "max_length": 160, "lr": 1e-3, "results": rows,
    }, indent=2) + "\n")
    print()
    print_table(rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
