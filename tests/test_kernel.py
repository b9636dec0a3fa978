"""loramux's CPU decode kernel (inference/bgmv.py): built here, exact against plain torch,
isolating rows, and optional: where it cannot be built the server says why and runs torch."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import greedy_decode, reference_and_batched
from loramux.inference import bgmv
from loramux.inference.lora_backend import BatchedLoraBackend


@pytest.fixture(scope="module")
def kernel():
    op, reason = bgmv.load()
    # This kind of machine has a C++ compiler and `make setup` builds the kernel; a failure
    # here is a broken build, not a reason to skip.
    assert op is not None, reason
    return op


def _reference(y, x, a, b, ids, ranks):
    out = y.float().clone()
    r_max = a.shape[1]
    for i, (adapter, rank) in enumerate(zip(ids.tolist(), ranks.tolist(), strict=True)):
        rank = min(rank, r_max)
        if adapter <= 0 or adapter >= a.shape[0] or rank <= 0:
            continue
        out[i] += (x[i].float() @ a[adapter, :rank].float().T) @ b[adapter, :rank].float()
    return out


@pytest.mark.parametrize("stacks", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("width", [(37, 21), (64, 128), (200, 19)], ids=lambda w: f"{w[0]}x{w[1]}")
def test_the_kernel_adds_each_rows_own_pair(kernel, stacks, act, width):
    """Every dtype pair, dimensions with and without a tail past the 8 lanes, ranks below,
    at and above the stacks' padded rank, base rows (id 0) and an id past the stacks
    (skipped, never read out of bounds)."""
    in_features, out_features = width
    g = torch.Generator().manual_seed(in_features)
    a = torch.randn(6, 24, in_features, generator=g).to(stacks)
    b = torch.randn(6, 24, out_features, generator=g).to(stacks)
    x = torch.randn(7, in_features, generator=g).to(act)
    y = torch.randn(7, out_features, generator=g).to(act)
    ids = torch.tensor([0, 3, 1, 5, 3, 9, 2])
    ranks = torch.tensor([8, 24, 4, 30, 1, 8, 0])
    expected = _reference(y, x, a, b, ids, ranks)
    got = y.clone()
    kernel(got, x, a, b, ids, ranks)
    # fp32 sums in a different order than torch's; a bf16 output is rounded once at the end
    tol = 1e-4 if act == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * expected.abs().max())
    assert torch.equal(got[0], y[0]) and torch.equal(got[5], y[5]) and torch.equal(got[6], y[6])


def test_the_kernel_refuses_what_does_not_fit(kernel):
    a = torch.zeros(4, 8, 16)
    b = torch.zeros(4, 8, 12)
    ids = torch.tensor([1, 2])
    ranks = torch.tensor([8, 8])
    x, y = torch.zeros(2, 16), torch.zeros(2, 12)
    for bad in (
        (y, torch.zeros(2, 15), a, b, ids, ranks),  # x does not fit A
        (y, x, a, b, torch.tensor([1]), ranks),  # one id for two rows
        (y, x, a, b.to(torch.bfloat16), ids, ranks),  # A and B of two dtypes
        (y, x, a, b, ids.int(), ranks),  # int32 ids
        (torch.zeros(12, 2).T, x, a, b, ids, ranks),  # a transposed (strided) output
        (y.half(), x, a, b, ids, ranks),  # fp16
    ):
        with pytest.raises(RuntimeError, match="bgmv_"):
            kernel(*bad)


@pytest.fixture(scope="module")
def models(tiny_model_dir, adapter_root, kernel):
    return reference_and_batched(tiny_model_dir, adapter_root, kernel=kernel)


def test_decode_steps_through_the_kernel_equal_pefts_token_for_token(models):
    """Six tenants of ranks 2 to 32 on different layers and a base row, fp32: the decode
    steps run the kernel (checked), and every step's logits and the greedy tokens equal
    PEFT's reference forward."""
    reference, batched, _ = models
    config = reference.model.config
    slots = ["legal", "medical", "finance", "retail", "support", "travel", None]
    calls = []
    real = batched._ctx.kernel

    def counting(*args):
        calls.append(1)
        return real(*args)

    batched._ctx.kernel = counting
    try:
        got_tokens, got = greedy_decode(batched, config, slots, steps=6)
    finally:
        batched._ctx.kernel = real
    want_tokens, want = greedy_decode(reference, config, slots, steps=6)
    assert calls, "no decode step ran the kernel"
    for step_got, step_want in zip(got, want, strict=True):
        torch.testing.assert_close(step_got, step_want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_tokens, want_tokens)


def test_a_row_never_reads_another_rows_overflowing_adapter_in_the_kernel(models):
    import dataclasses

    from transformers import DynamicCache

    _, batched, adapters = models
    config = batched.model.config
    legal = adapters["legal"]
    loud = dataclasses.replace(legal, tensors={
        k: torch.full_like(v, 3e38) if "lora_A" in k else v for k, v in legal.tensors.items()})
    slots = ["loud", "medical", None, "legal"]

    def decode(rows: slice) -> torch.Tensor:
        torch.manual_seed(2)
        ids = torch.randint(10, 1000, (4, 7))[rows]
        mask = torch.ones_like(ids)
        positions = mask.cumsum(1) - 1
        cache = DynamicCache(config=config)
        batched.forward(ids, mask, positions, cache, slots[rows])
        step = torch.full((ids.shape[0], 1), 17)
        mask = torch.cat([mask, torch.ones_like(step)], 1)
        return batched.forward(step, mask, positions[:, -1:] + 1, cache, slots[rows])

    batched.add("loud", loud)
    try:
        mixed = decode(slice(None))
        alone = decode(slice(1, None))
    finally:
        batched.remove("loud")
    assert not torch.isfinite(mixed[0]).all()
    torch.testing.assert_close(mixed[1:], alone, rtol=1e-4, atol=1e-4)


def test_without_a_compiler_the_kernel_is_reported_unavailable(tmp_path):
    """A fresh process whose C++ compiler fails: load() reports why instead of raising,
    and the server then runs plain torch (see the server test below)."""
    env = {**os.environ, "CXX": "/bin/false", "PYTHONSAFEPATH": "1"}
    code = ("from pathlib import Path; from loramux.inference import bgmv; "
            f"op, reason = bgmv.load(Path({str(tmp_path)!r})); print(op is None); print(reason)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=240, check=True).stdout.splitlines()
    assert out[0] == "True"
    assert out[1].startswith("unavailable (")
    assert not list(Path(tmp_path).glob("*.so"))


def test_the_server_builds_the_kernel_in_the_background_and_switches_to_it(
        tiny_model_dir, kernel, monkeypatch):
    """Where the library is not built yet, start_kernel serves with torch ("building") and
    hands the backend the kernel when the build ends; --lora-kernel off never does."""
    from transformers import AutoModelForCausalLM

    from loramux.inference import server
    from loramux.inference.settings import ServeSettings

    backend = BatchedLoraBackend(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    release = threading.Event()

    def slow_load(directory=None, allow_build=True):  # the build: held until released
        release.wait(30)
        return kernel, "built"

    monkeypatch.setattr(bgmv, "built", lambda directory=None: False)
    monkeypatch.setattr(bgmv, "load", slow_load)
    server.start_kernel(backend, ServeSettings())
    assert backend.kernel_state == "building" and backend._ctx.kernel is None
    release.set()
    for _ in range(300):
        if backend.kernel_state == "kernel":
            break
        threading.Event().wait(0.05)
    assert backend.kernel_state == "kernel" and backend._ctx.kernel is kernel

    off = BatchedLoraBackend(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    server.start_kernel(off, ServeSettings(lora_kernel="off"))
    assert off.kernel_state == "torch" and off._ctx.kernel is None
