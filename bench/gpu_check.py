"""The suite's distinct / identical / base figures on a CUDA GPU, in under 10 minutes.

loramux's CUDA path cannot be measured on the machines it is developed on (no GPU). A user
with one runs this and sends back ``bench/results/gpu_check.json`` and the markdown it
writes: the same closed-loop workloads as ``bench/suite.py`` (B concurrent clients, each on
its own tenant, then all on one tenant, B in {1, 4, 8, 16, 32}) against loramux and the base
model alone, on ``--device cuda``, with the ratios the issue's targets use.

    .venv/bin/python bench/gpu_check.py               # needs torch with CUDA and a GPU
    .venv/bin/python bench/gpu_check.py --quick --allow-cpu   # the plumbing, on a CPU

What it checks first, and says plainly if missing: torch sees a CUDA device, and
bitsandbytes imports (NF4 on CUDA). It records the GPU's name, memory, and the CUDA and
driver versions with the results. Nothing here is a test: it reports numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def gpu_facts() -> dict[str, object]:
    """What CUDA device this machine has (empty ``devices`` when none)."""
    import torch

    facts: dict[str, object] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                                "available": torch.cuda.is_available(), "devices": []}
    if torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                            "capability": f"{p.major}.{p.minor}",
                            "bf16": torch.cuda.is_bf16_supported()})
        facts["devices"] = devices
    try:
        import bitsandbytes

        facts["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # reported, not fatal: --quantization none still runs
        facts["bitsandbytes"] = f"unavailable: {type(exc).__name__}: {exc}"
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (plumbing check)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on the CPU when there is no GPU (to check the script only)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    parser.add_argument("--docs", type=Path, default=HERE / "results" / "gpu_check.md")
    parser.add_argument("--loramux-arg", action="append", default=[],
                        help="extra flags for both servers (repeatable)")
    args = parser.parse_args(argv)

    facts = gpu_facts()
    print(json.dumps(facts, indent=2), flush=True)
    device = "cuda"
    if not facts["available"]:
        if not args.allow_cpu:
            print("no CUDA device visible to torch: install a CUDA build of torch "
                  "(README, 'Installing on a GPU machine') and check nvidia-smi; "
                  "--allow-cpu runs the same workloads on the CPU", file=sys.stderr)
            return 2
        device = "cpu"

    import suite

    suite_argv = ["--systems", "loramux,base", "--workloads", "distinct",
                  "--no-vllm", "--out", str(args.out), "--docs", str(args.docs),
                  f"--loramux-arg=--device {device}", *[f"--loramux-arg={a}"
                                                       for a in args.loramux_arg]]
    if args.quick:
        suite_argv.append("--quick")
    if not args.docs.exists():
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        args.docs.write_text("# loramux on a GPU (bench/gpu_check.py)\n\n")
    suite.main(suite_argv)
    report = json.loads(args.out.read_text())
    report["gpu"] = facts
    report["gpu_check_device"] = device
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} and {args.docs}: please send both back")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
