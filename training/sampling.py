"""Which task trains next: temperature sampling over tasks of very different sizes.

Training every tenant's adapter in one run would starve small tenants if tasks were drawn in
proportion to their size, and overfit them if drawn uniformly. Temperature sampling sits
between: ``P_i ∝ w_i · N_i^(1/T)``, where ``N_i`` is the task's example count and ``w_i`` an
optional per-task weight. ``T = 1`` is proportional to size, a large ``T`` is uniform. The
sampler is seeded and its state can be checkpointed, so a resumed run draws the same tasks.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Mapping
from typing import Any


def task_probabilities(
    sizes: Mapping[str, int],
    temperature: float = 1.0,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """``P_i = w_i · N_i^(1/T) / Σ_j w_j · N_j^(1/T)`` for every task in ``sizes``."""
    if not sizes:
        raise ValueError("there are no tasks to sample from")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    weights = weights or {}
    unknown = sorted(set(weights) - set(sizes))
    if unknown:
        raise ValueError(f"weights name unknown tasks {unknown}")
    logs: dict[str, float] = {}
    for name, size in sizes.items():
        weight = weights.get(name, 1.0)
        if size < 1:
            raise ValueError(f"task {name!r} has no examples")
        if not weight > 0:
            raise ValueError(f"task {name!r} weight must be positive, got {weight}")
        logs[name] = math.log(weight) + math.log(size) / temperature
    top = max(logs.values())  # log space: N^(1/T) overflows for small T
    scaled = {name: math.exp(value - top) for name, value in logs.items()}
    total = sum(scaled.values())
    return {name: value / total for name, value in scaled.items()}


class TaskSampler:
    """A seeded, checkpointable stream of task names drawn with given probabilities."""

    def __init__(self, probabilities: Mapping[str, float], seed: int = 0) -> None:
        if not probabilities:
            raise ValueError("there are no tasks to sample from")
        self.names = list(probabilities)
        total = sum(probabilities.values())
        self.cumulative = list(itertools.accumulate(p / total for p in probabilities.values()))
        self._rng = random.Random(seed)

    def sample(self) -> str:
        index = bisect.bisect_right(self.cumulative, self._rng.random())
        return self.names[min(index, len(self.names) - 1)]

    def __iter__(self) -> TaskSampler:
        return self

    def __next__(self) -> str:
        return self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
