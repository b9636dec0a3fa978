"""Repro: small torch ops run ~2x slower once a SECOND thread has used torch's OpenMP pool.

This is what halves loramux's decode speed on CPU (see docs/benchmarks.md): the model is
loaded on the main thread, adapters are validated on loader threads, and the forward passes
run on the engine thread. Every thread that runs a parallel torch op gets its own OpenMP
team; once libgomp manages more threads than there are CPUs it stops spinning between
parallel regions ("throttled" spin), and every small op pays a futex wake-up.

Each scenario runs in a fresh process and times a decode-sized matmul (8 x 576 @ 576 x 1536,
the shape of SmolLM2's MLP projections at batch 8) on the thread that matters:

- main-only:        everything on the main thread (what a plain script does);
- engine-thread:    main thread ran torch ops first (model loading), the op runs on a worker
                    thread (what ``loramux serve`` does today);
- engine-confined:  main thread ran its torch ops with ``torch.set_num_threads(1)``, the
                    worker sets the real thread count (a possible fix).

    .venv/bin/python bench/repro_openmp_threads.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

SCENARIOS = ("main-only", "engine-thread", "engine-confined")


def _time_op() -> tuple[float, float]:
    import torch

    a, w = torch.randn(8, 576), torch.randn(1536, 576)
    for _ in range(20):
        torch.nn.functional.linear(a, w)
    samples = []
    cpu = time.process_time()
    for _ in range(2000):
        t = time.perf_counter()
        torch.nn.functional.linear(a, w)
        samples.append(time.perf_counter() - t)
    cores = (time.process_time() - cpu) / sum(samples)
    return statistics.median(samples) * 1e6, cores


def _scenario(name: str) -> None:
    import torch

    threads = torch.get_num_threads()
    result: list[tuple[float, float]] = []
    if name == "main-only":
        result.append(_time_op())
    else:
        if name == "engine-confined":
            torch.set_num_threads(1)
        torch.randn(512, 512) @ torch.randn(512, 512)  # "model loading" on the main thread

        def engine() -> None:
            torch.set_num_threads(threads)
            result.append(_time_op())

        worker = threading.Thread(target=engine)
        worker.start()
        worker.join()
    us, cores = result[0]
    print(f"{name:16s} {us:8.1f} us/op   {cores:4.2f} cores busy   (torch threads: {threads})")


def main() -> None:
    if len(sys.argv) == 2 and sys.argv[1] in SCENARIOS:
        _scenario(sys.argv[1])
        return
    for name in SCENARIOS:
        subprocess.run([sys.executable, __file__, name], check=True)


if __name__ == "__main__":
    main()
