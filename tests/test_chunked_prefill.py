"""Chunked prefill (``--prefill-chunk-tokens``): while rows decode, a long admitted group is
prefilled a chunk per step, the running rows keep getting tokens in between, and the group
starts from the same logits as a one-pass prefill. Real engine thread, tiny model, fp32."""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_rig import HANG_GUARD_S, EngineRig

CHUNK = 16
LONG_PROMPT = 60


@pytest.fixture(scope="module")
def rig(tiny_model_dir, adapter_root):
    made = EngineRig(tiny_model_dir, adapter_root, ["legal", "medical", "retail"],
                     max_batch_size=4, prefill_chunk_tokens=CHUNK)
    yield made
    made.close()


def _spy(rig: EngineRig, runner) -> tuple[list[int], list[torch.Tensor]]:
    """Record the runner's token count at each chunk, and the logits each group joins with."""
    engine = rig.engine
    counts: list[int] = []
    joined: list[torch.Tensor] = []
    real_chunk, real_join = engine._prefill_chunk, engine._join

    def chunk(tokens: int) -> None:
        counts.append(len(runner.generated))
        real_chunk(tokens)

    def join(seqs, cache, mask, logits) -> None:
        joined.append(logits.clone())
        real_join(seqs, cache, mask, logits)

    engine._prefill_chunk, engine._join = chunk, join
    return counts, joined


def _unspy(rig: EngineRig) -> None:
    for name in ("_prefill_chunk", "_join"):
        rig.engine.__dict__.pop(name, None)


def _one_pass_logits(rig: EngineRig, seqs) -> torch.Tensor:
    """The group's logits from one forward pass over the whole prompts, on the engine
    thread (the backend's per-step context is the engine's alone)."""
    engine = rig.engine

    def run() -> torch.Tensor:
        ids, mask, positions = engine._group_inputs(seqs)
        return engine.backend.forward(ids, mask, positions, engine._new_cache(),
                                      engine._slots(seqs))

    return engine.call(run).result(HANG_GUARD_S)


def _start_runner(rig: EngineRig, tokens: int = 48):
    runner = rig.seq("legal", tokens, prompt_len=6)
    rig.submit(runner)
    rig.wait_until(lambda: len(runner.generated) >= 1)
    return runner


def test_a_long_group_is_prefilled_between_decode_steps_with_one_pass_logits(rig):
    runner = _start_runner(rig)
    counts, joined = _spy(rig, runner)
    try:
        gate = rig.hold()  # both long prompts wait at the same admission: one group
        group = [rig.seq("medical", 6, prompt_len=LONG_PROMPT),
                 rig.seq(None, 6, prompt_len=LONG_PROMPT - 17)]
        for seq in group:
            rig.submit(seq)
        chunks_before = rig.engine.prefill_chunks
        gate.set()
        rig.wait_until(lambda: all(s.done for s in [*group, runner]))
    finally:
        _unspy(rig)
    # 2 rows, CHUNK // 2 columns per chunk, 60 columns: 8 chunks while the runner decodes
    assert rig.engine.prefill_chunks - chunks_before == -(-LONG_PROMPT // (CHUNK // 2))
    assert len(counts) == rig.engine.prefill_chunks - chunks_before
    # the running row got a token between every two chunks: nothing stalled it
    assert all(b > a for a, b in itertools.pairwise(counts)), counts
    assert [len(s.generated) for s in group] == [6, 6] and len(runner.generated) == 48
    assert len(joined) == 1
    torch.testing.assert_close(joined[0], _one_pass_logits(rig, group), rtol=1e-4, atol=1e-4)


def test_a_short_request_does_not_wait_for_a_long_prefill(rig):
    """While a long group is chunked, a request whose prompt fits in half the chunk budget
    is admitted and prefilled in one pass, in the same step as a (narrower) chunk."""
    engine = rig.engine
    runner = _start_runner(rig)
    short = rig.seq("retail", 3, prompt_len=CHUNK // 2)
    real_chunk = engine._prefill_chunk
    widths: list[int] = []

    def chunk(tokens: int) -> None:
        if not widths:
            rig.submit(short)  # arrives while the long group is being chunked
        widths.append(tokens)
        real_chunk(tokens)

    engine._prefill_chunk = chunk
    try:
        long = rig.seq("medical", 4, prompt_len=LONG_PROMPT)
        rig.submit(long)
        rig.wait_until(lambda: long.done and short.done and runner.done)
    finally:
        engine.__dict__.pop("_prefill_chunk", None)
    assert short.first_token_at < long.first_token_at
    assert len(short.generated) == 3 and len(long.generated) == 4
    # the step that prefilled the short prompt gave the chunk only what was left
    assert widths[0] == CHUNK and CHUNK - CHUNK // 2 in widths


def test_a_short_group_or_an_idle_engine_prefills_in_one_pass(rig):
    before = rig.engine.prefill_chunks
    alone = rig.seq("retail", 3, prompt_len=LONG_PROMPT)  # nobody decodes: one pass
    rig.submit(alone)
    rig.wait_until(lambda: alone.done)
    assert rig.engine.prefill_chunks == before and len(alone.generated) == 3
    runner = _start_runner(rig, tokens=24)
    short = rig.seq("medical", 3, prompt_len=CHUNK)  # within the budget: one pass
    rig.submit(short)
    rig.wait_until(lambda: short.done and runner.done)
    assert rig.engine.prefill_chunks == before and len(short.generated) == 3


def test_a_chunk_that_fails_costs_nobody(rig):
    """A chunk after the first raises (as an out-of-memory would): the group is prefilled
    again one row at a time, every request still completes, the runner is untouched."""
    engine = rig.engine
    runner = _start_runner(rig)
    real_forward = engine._forward
    calls = {"prefill": 0}

    def forward(seqs, phase, ids, *rest):
        if phase == "prefill" and engine._chunked is not None:
            calls["prefill"] += 1
            if calls["prefill"] == 3:
                raise torch.OutOfMemoryError("injected by the test: out of memory mid-prefill")
        return real_forward(seqs, phase, ids, *rest)

    engine._forward = forward
    try:
        gate = rig.hold()
        group = [rig.seq("medical", 5, prompt_len=LONG_PROMPT),
                 rig.seq("retail", 5, prompt_len=LONG_PROMPT)]
        for seq in group:
            rig.submit(seq)
        gate.set()
        rig.wait_until(lambda: all(s.done for s in [*group, runner]))
    finally:
        engine.__dict__.pop("_forward", None)
    assert calls["prefill"] >= 3
    assert [len(s.generated) for s in group] == [5, 5] and len(runner.generated) == 48
    assert engine._chunked is None and not engine._prefilling


@pytest.mark.parametrize("ending", ["cancel", "timeout"])
def test_cancelled_or_timed_out_rows_stop_their_chunked_prefill(rig, ending):
    """The client goes away (or the request's timeout passes) during the first chunk: the
    next step drops the group (499 or 504) instead of prefilling the rest for nobody. While
    chunked, its row counts in the load the placement table sees."""
    engine = rig.engine
    runner = _start_runner(rig)
    seq = rig.seq("medical", 5, prompt_len=LONG_PROMPT)
    outcome = {"cancel": "cancelled", "timeout": "timeout"}[ending]
    counts = engine.metrics.requests._per_tenant
    before = counts.get(("medical", outcome), 0.0)
    real_chunk = engine._prefill_chunk
    chunks: list[int] = []
    load: list[int] = []

    def chunk(tokens: int) -> None:
        chunks.append(engine._chunked.done)
        real_chunk(tokens)
        load.append(engine.rows_in_use)
        if ending == "cancel":
            seq.cancel()  # as the HTTP side does when the client disconnects
        else:
            seq.timeout_s = 0.0

    engine._prefill_chunk = chunk
    try:
        rig.submit(seq)
        rig.wait_until(lambda: seq.done and runner.done)
    finally:
        engine.__dict__.pop("_prefill_chunk", None)
    assert chunks == [0, CHUNK]  # one chunk ran; the next call saw nobody left and stopped
    assert load[0] == 2  # the runner's row and the chunked one
    assert counts.get(("medical", outcome), 0.0) == before + 1  # ended 499 / 504
    assert len(seq.generated) == 0 and len(runner.generated) == 48
    assert engine._chunked is None and not engine._prefilling
