"""loramux's batched LoRA layers compute what PEFT's reference mixed-batch forward computes."""

from __future__ import annotations

import pytest
import torch

from conftest import TENANTS
from loramux.inference.adapters import BaseFacts, read_adapter
from loramux.inference.lora_backend import BatchedLoraBackend, PeftMixedBatchBackend


@pytest.fixture(scope="module")
def backends(tiny_model_dir, adapter_root):
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    reference, batched = PeftMixedBatchBackend(base()), BatchedLoraBackend(base())
    facts = BaseFacts.from_model(reference.model, ("tiny-llama",))
    adapters = {t: read_adapter(adapter_root / t / "v1", facts, max_rank=64) for t in TENANTS}
    for tenant, adapter in adapters.items():
        reference.add(tenant, adapter)
        batched.add(tenant, adapter)
    return reference, batched, adapters


def _logits(backend, config, slots):
    from transformers import DynamicCache

    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (len(slots), 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # one left-padded row
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return backend.forward(ids, mask, positions, DynamicCache(config=config), slots)


def _stacked_weights(backend: BatchedLoraBackend, tenants: tuple[str, ...]
                     ) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Each tenant's (A, B) in every layer it touches, sliced to its own rank, copied."""
    out = {}
    for tenant in tenants:
        key = backend._keys[tenant]
        for path, layer in backend._layers.items():
            if key in layer.rank_of:
                a, b = layer.weights(key)
                out[(tenant, path)] = (a.clone(), b.clone())
    return out


@pytest.mark.parametrize("slots", [
    ["legal", "medical", "finance", "retail", "support", "travel", None],
    ["medical"] * 4,
    [None, None, "retail"],
    [None, None],
    ["support", "legal", "support", None, "legal"],
])
def test_batched_layers_match_peft_mixed_batch(backends, slots):
    reference, batched, _ = backends
    config = reference.model.config
    expected = _logits(reference, config, slots)
    got = _logits(batched, config, slots)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_removing_and_re_adding_adapters_keeps_rows_exact(backends):
    reference, batched, adapters = backends
    config = reference.model.config
    slots = ["legal", "support", None, "travel"]
    before = _logits(batched, config, slots)
    kept = _stacked_weights(batched, ("legal", "support", "travel"))
    for tenant in ("medical", "finance", "retail"):
        batched.remove(tenant)
    # Slots were freed and reused: the remaining adapters' weights are untouched, bit for
    # bit (a copy, exact by construction)...
    after = _stacked_weights(batched, ("legal", "support", "travel"))
    assert after.keys() == kept.keys()
    for key, (a, b) in kept.items():
        assert torch.equal(after[key][0], a) and torch.equal(after[key][1], b), key
    # ...and so are their outputs, up to float rounding: when the last adapter of a rank
    # bucket leaves a layer, the batch's row groups change, and a matmul over another shape
    # may sum in another order on some CPUs (differences of ~4e-6 were seen on an AVX2 EPYC).
    torch.testing.assert_close(_logits(batched, config, slots), before, rtol=1e-5, atol=1e-5)
    batched.add("medical-again", adapters["medical"])
    mixed = ["medical-again", "legal", None]
    torch.testing.assert_close(
        _logits(batched, config, mixed),
        _logits(reference, config, ["medical", "legal", None]), rtol=1e-4, atol=1e-4)
    batched.remove("medical-again")
    for tenant in ("medical", "finance", "retail"):
        batched.add(tenant, adapters[tenant])


def test_a_higher_rank_adapter_lives_in_its_own_bucket_and_costs_other_rows_nothing(
        tiny_model_dir, adapter_root):
    """Rows are grouped by rank bucket: a rank-32 adapter sharing a layer with a rank-2 one
    gets its own rank-32 stack; the rank-2 rows keep their width-8 product, and the wide
    stack is freed when its adapter leaves."""
    from transformers import AutoModelForCausalLM

    from loramux.inference.lora_backend import rank_bucket

    assert [rank_bucket(r) for r in (1, 2, 8, 9, 16, 17, 64)] == [8, 8, 8, 16, 16, 32, 64]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = PeftMixedBatchBackend(AutoModelForCausalLM.from_pretrained(tiny_model_dir)
                                      .eval())
    backend = BatchedLoraBackend(model)
    facts = BaseFacts.from_model(model, ("tiny-llama",))
    small = read_adapter(adapter_root / "retail" / "v1", facts, max_rank=64)  # rank 2
    big = read_adapter(adapter_root / "support" / "v1", facts, max_rank=64)  # rank 32
    backend.add("small", small)
    before = _logits(backend, model.config, ["small", None])
    backend.add("big", big)  # shares down_proj with "small"
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert sorted(layer.stacks) == [8, 32]
    assert layer.stacks[8][0].shape[1] == 8 and layer.stacks[32][0].shape[1] == 32
    after = _logits(backend, model.config, ["small", None])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for name, adapter in (("small", small), ("big", big)):
        reference.add(name, adapter)
    mixed = ["big", "small", None, "big"]  # two groups and a base row in one batch
    torch.testing.assert_close(_logits(backend, model.config, mixed),
                               _logits(reference, model.config, mixed), rtol=1e-4, atol=1e-4)
    backend.remove("big")  # the wide stack goes with its last adapter
    assert sorted(layer.stacks) == [8]
    torch.testing.assert_close(_logits(backend, model.config, ["small", None]), before,
                               rtol=1e-5, atol=1e-5)


def test_more_adapters_than_the_initial_stacks_hold_and_one_index_for_every_layer(backends):
    """Stacks grow past their first 8 positions; every adapter sits at the same position of
    its bucket in every layer, so a mixed batch of 12 distinct adapters (grouped once per
    step) gives each row what that row alone gives."""
    reference, batched, adapters = backends
    config = reference.model.config
    names = sorted(adapters)
    slots = [f"many-{i}" for i in range(12)]
    for i, slot in enumerate(slots):
        batched.add(slot, adapters[names[i % len(names)]])
    try:
        keys = {batched._keys[s] for s in slots}
        assert len(keys) == 12 and max(position for _, position in keys) >= 8
        grown = {bucket for bucket, position in keys if position >= 8}
        assert all(layer.capacity(bucket) >= 16 for layer in batched._layers.values()
                   for bucket in grown if layer.capacity(bucket))
        from transformers import DynamicCache

        torch.manual_seed(1)
        ids = torch.randint(10, 1000, (len(slots), 7))  # no padding: rows are independent
        mask = torch.ones_like(ids)
        positions = mask.cumsum(1) - 1

        def run(backend, rows, row_slots):
            return backend.forward(ids[rows], mask[rows], positions[rows],
                                   DynamicCache(config=config), row_slots)

        mixed = run(batched, slice(None), slots)
        for row, slot in enumerate(slots):
            alone = run(batched, slice(row, row + 1), [slot])  # the uniform path
            torch.testing.assert_close(mixed[row], alone[0], rtol=1e-4, atol=1e-4)
            peft = run(reference, slice(row, row + 1), [names[row % len(names)]])
            torch.testing.assert_close(alone[0], peft[0], rtol=1e-4, atol=1e-4)
    finally:
        for slot in slots:
            batched.remove(slot)
