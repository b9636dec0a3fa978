"""Plot a suite run's closed-loop workloads: tokens/s against B for every system.

One panel per workload (distinct, identical). ``--before`` adds an earlier run's systems as
dashed lines (e.g. the run before a change), labelled with ``--before-label``.

    .venv/bin/python bench/plot_closed_loop.py bench/results/suite-epyc-onednn.json \
        --before bench/results/suite-epyc-kernel.json --before-label "torch F.linear" \
        --out docs/img/suite_epyc_onednn.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = {"loramux": "tab:blue", "base": "tab:green", "seed": "tab:red", "vllm": "tab:purple"}


def _series(run: dict, workload: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in run.get("closed", []):
        # The base alone runs once per B (workload "base"): the bound of both panels.
        if row["workload"] in (workload, "base") and row.get("tokens_per_s"):
            out.setdefault(row["system"], []).append((int(row["B"]), float(row["tokens_per_s"])))
    return {k: sorted(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--before-label", default="before")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = json.loads(args.run.read_text())
    before = json.loads(args.before.read_text()) if args.before else None
    workloads = [w for w in ("distinct", "identical")
                 if any(r["workload"] == w for r in run.get("closed", []))]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        for system, points in _series(run, workload).items():
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", color=COLORS.get(system), label=system)
        if before is not None:
            for system, points in _series(before, workload).items():
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, "x--", color=COLORS.get(system), alpha=0.5,
                        label=f"{system} ({args.before_label})")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 8, 16, 32], labels=["1", "4", "8", "16", "32"])
        ax.set_xlabel("B (concurrent clients)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{workload} tenants")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cpu = run.get("machine", {}).get("cpu_model", "")
    fig.suptitle(f"{cpu}: {run.get('precision_label', '')}", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
