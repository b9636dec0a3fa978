"""A real runtime (tiny model, real engine thread) driven in-process, for engine tests."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from loramux.names import TenantRef

HANG_GUARD_S = 300.0  # only against a hang; nothing asserts on time


class EngineRig:
    """A real runtime (tiny model, real engine thread) driven in-process: sequences are
    submitted straight to the engine; the engine can be held between forward passes so that
    what waits at one admission is exact."""

    def __init__(self, tiny_model_dir: Path, adapter_root: Path, tenants: list[str],
                 **settings: object) -> None:
        from loramux.inference.server import build_runtime
        from loramux.inference.settings import ServeSettings

        flags = [f"{t}@v1={adapter_root / t / 'v1'}" for t in tenants]
        self.runtime = build_runtime(ServeSettings(
            model=tiny_model_dir, quantization="none", device="cpu", auth="none",
            adapter=flags, **settings))
        self.engine = self.runtime.engine
        self.loop = asyncio.new_event_loop()  # never run: events are not read here
        self.admitted: list = []
        queue = self.engine._waiting
        real_take = queue.take

        def take(item):  # a spy on the real queue: records the admission order
            self.admitted.append(item)
            return real_take(item)

        queue.take = take
        self.engine.start()

    def seq(self, tenant: str | None, tokens: int, prompt_len: int = 12,
            timeout_s: float = 600.0):
        from loramux.inference.engine import Sequence
        from loramux.inference.sampling import SamplingParams

        entry = (self.runtime.tenants.acquire(TenantRef.parse(tenant))
                 if tenant is not None else None)
        params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
        return Sequence(prompt_ids=list(range(5, 5 + prompt_len)), params=params, entry=entry,
                        loop=self.loop, timeout_s=timeout_s)

    def submit(self, seq) -> None:
        try:
            self.engine.submit(seq)
        except Exception:
            if seq.entry is not None:
                self.runtime.cache.release(seq.entry)
            raise

    def hold(self) -> threading.Event:
        """Hold the engine thread between forward passes until the returned event is set."""
        gate, holding = threading.Event(), threading.Event()

        def wait() -> None:
            holding.set()
            gate.wait(HANG_GUARD_S)

        self.engine.call(wait)
        assert holding.wait(HANG_GUARD_S)
        return gate

    def wait_until(self, condition) -> None:
        deadline = time.monotonic() + HANG_GUARD_S
        while not condition():
            assert time.monotonic() < deadline, "the engine did not get there"
            time.sleep(0.01)

    def close(self) -> None:
        self.engine.stop()
        self.loop.close()
