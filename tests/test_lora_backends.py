"""loramux's batched LoRA layers compute what PEFT's reference mixed-batch forward computes."""

from __future__ import annotations

import pytest
import torch

from conftest import reference_and_batched
from loramux.inference.adapters import BaseFacts, read_adapter
from loramux.inference.lora_backend import BatchedLoraBackend


@pytest.fixture(scope="module")
def backends(tiny_model_dir, adapter_root):
    return reference_and_batched(tiny_model_dir, adapter_root)


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
        adapter_id = backend._ids[tenant]
        for path, layer in backend._layers.items():
            if adapter_id in layer.rank_of:
                lora_a, lora_b = layer.pair(adapter_id)
                out[(tenant, path)] = (lora_a.clone(), lora_b.clone())
    return out


@pytest.fixture(params=["dense", "gathered"])
def form(request, monkeypatch):
    """Every mixed batch through each of the two forms a layer can run a step in."""
    from loramux.inference import lora_backend

    dense = request.param == "dense"
    monkeypatch.setattr(lora_backend, "DENSE_BUDGET", 10**9 if dense else 0)
    monkeypatch.setattr(lora_backend, "DENSE_BUDGET_FP32_AVX2", 10**9 if dense else 0)
    monkeypatch.setattr(lora_backend, "DENSE_MAX_WASTE", 10**9 if dense else 0)
    return request.param


@pytest.mark.parametrize("slots", [
    ["legal", "medical", "finance", "retail", "support", "travel", None],
    ["medical"] * 4,
    [None, None, "retail"],
    [None, None],
    ["support", "legal", "support", None, "legal"],
])
def test_batched_layers_match_peft_mixed_batch(backends, slots, form):
    reference, batched, _ = backends
    config = reference.model.config
    expected = _logits(reference, config, slots)
    got = _logits(batched, config, slots)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_row_never_reads_another_adapters_overflow(backends, form):
    """Both forms compute other adapters' columns for a row (dense) or share a group with
    them (gathered). An adapter whose activations overflow (finite weights, so loading
    accepts it; fp16 on a GPU overflows at 65504) must leave other rows exact: the dense
    form zeroes foreign columns with masked_fill, since 0 x inf would be NaN."""
    import dataclasses

    reference, batched, adapters = backends
    config = reference.model.config
    legal = adapters["legal"]
    loud = dataclasses.replace(legal, tensors={
        k: torch.full_like(v, 3e38) if "lora_A" in k else v for k, v in legal.tensors.items()})
    from transformers import DynamicCache

    torch.manual_seed(2)
    ids = torch.randint(10, 1000, (4, 7))  # no padding: rows are independent
    mask = torch.ones_like(ids)
    positions = mask.cumsum(1) - 1
    slots = ["loud", "medical", None, "legal"]

    def run(rows: slice) -> torch.Tensor:
        return batched.forward(ids[rows], mask[rows], positions[rows],
                               DynamicCache(config=config), slots[rows])

    batched.add("loud", loud)
    try:
        mixed = run(slice(None))
        alone = run(slice(1, None))
    finally:
        batched.remove("loud")
    assert not torch.isfinite(mixed[0]).all()  # the loud row itself overflows
    torch.testing.assert_close(mixed[1:], alone, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(mixed[1:]).all()


@pytest.mark.parametrize("group_cost", [0, 10**9], ids=["a-group-per-bucket", "one-group"])
def test_every_grouping_of_rows_computes_the_same(backends, monkeypatch, group_cost):
    """Rows split by rank bucket (each group at its own width) or padded into one group:
    the same logits as PEFT either way (ranks 2 to 32 and a base row in one batch)."""
    from loramux.inference import lora_backend

    reference, batched, _ = backends
    slots = ["legal", "medical", "finance", "retail", "support", "travel", None]
    monkeypatch.setattr(lora_backend, "GROUP_COST", group_cost)
    ranks = [batched._ranks.get(batched._ids[s], 0) if s else 0 for s in slots]
    groups = lora_backend.plan_groups(ranks, tokens=9)
    # buckets 8, 16 and 32, the base row in none; or everything in one group at 32
    assert [w for _, w in groups] == ([8, 16, 32] if group_cost == 0 else [32])
    assert (6 in groups[0][0]) == (group_cost != 0)
    config = reference.model.config
    torch.testing.assert_close(_logits(batched, config, slots),
                               _logits(reference, config, slots), rtol=1e-4, atol=1e-4)


def test_plan_groups_merges_neighbours_while_padding_is_cheaper_than_a_group():
    from loramux.inference.lora_backend import plan_groups, rank_bucket

    assert [rank_bucket(r) for r in (1, 2, 8, 9, 16, 17, 64)] == [8, 8, 8, 16, 16, 32, 64]
    # decode (1 token): 7 rank-8 rows and one rank-64 row stay apart (7 x 56 = 392 > 256)
    assert plan_groups([8] * 7 + [64], tokens=1) == [(list(range(7)), 8), ([7], 64)]
    # two rows each of ranks 8..64: padding is cheap, one group at 64
    assert plan_groups([8, 16, 32, 64] * 2, tokens=1) == [(list(range(8)), 64)]
    # a long prefill makes padding dear: every bucket its own group
    assert [w for _, w in plan_groups([8, 16, 32, 64] * 2, tokens=512)] == [8, 16, 32, 64]
    # a base row joins when cheap, and stays out of the product when not
    assert plan_groups([0, 8, 8], tokens=1) == [([0, 1, 2], 8)]
    assert plan_groups([0, 8, 8], tokens=512) == [([1, 2], 8)]


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
    # ...and so are their outputs, up to float rounding: when the widest adapter of a layer
    # leaves, the stack narrows, and a matmul over a shorter zero-padded rank sums in another
    # order on some CPUs (differences of ~4e-6 were seen on an AVX2-only EPYC).
    torch.testing.assert_close(_logits(batched, config, slots), before, rtol=1e-5, atol=1e-5)
    batched.add("medical-again", adapters["medical"])
    mixed = ["medical-again", "legal", None]
    torch.testing.assert_close(
        _logits(batched, config, mixed),
        _logits(reference, config, ["medical", "legal", None]), rtol=1e-4, atol=1e-4)
    batched.remove("medical-again")
    for tenant in ("medical", "finance", "retail"):
        batched.add(tenant, adapters[tenant])


def test_a_higher_rank_adapter_widens_a_layer_without_changing_others(tiny_model_dir,
                                                                      adapter_root):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    backend = BatchedLoraBackend(model)
    facts = BaseFacts.from_model(model, ("tiny-llama",))
    small = read_adapter(adapter_root / "retail" / "v1", facts, max_rank=64)  # rank 2
    big = read_adapter(adapter_root / "support" / "v1", facts, max_rank=64)  # rank 32
    backend.add("small", small)
    before = _logits(backend, model.config, ["small", None])
    backend.add("big", big)  # shares down_proj with "small": that layer grows to rank 32
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.r_max == 32
    after = _logits(backend, model.config, ["small", None])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    backend.remove("big")  # and narrows back once the wide adapter is gone
    assert layer.r_max == 2
    torch.testing.assert_close(_logits(backend, model.config, ["small", None]), before,
                               rtol=1e-5, atol=1e-5)


def test_more_adapters_than_the_initial_stacks_hold_and_one_index_for_every_layer(backends):
    """Stacks grow past their first 8 positions; every adapter sits at its global id in every
    layer, so a mixed batch of 12 distinct adapters (built once into one index per step)
    gives each row what that row alone gives."""
    reference, batched, adapters = backends
    config = reference.model.config
    names = sorted(adapters)
    slots = [f"many-{i}" for i in range(12)]
    for i, slot in enumerate(slots):
        batched.add(slot, adapters[names[i % len(names)]])
    try:
        assert all(layer.capacity >= 16 for layer in batched._layers.values())
        ids = {batched._ids[s] for s in slots}
        assert len(ids) == 12 and max(ids) >= 8
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


@pytest.mark.parametrize("quantization,compute", [("none", "fp32"), ("bf16", "bf16")])
def test_a_prefill_projects_only_the_last_position_without_copying_the_lm_head(
        tiny_model_dir, quantization, compute):
    """A multi-token prefill keeps the last position by index, so the lm_head runs as one
    plain matmul on [rows, hidden]. With ``logits_to_keep=1`` the non-contiguous slice made
    matmul expand the weight to every row and copy it ([rows, hidden, vocab]) before a bmm:
    an 8-row prefill of the default model took ~1 s instead of ~0.1 s. The logits are the
    model's own last-position logits. Loaded as the server loads it (load_base_model)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from loramux.inference.model_loader import load_base_model

    model = load_base_model(tiny_model_dir, quantization, "cpu", compute_dtype=compute).model
    backend = BatchedLoraBackend(model)
    rows, length = 3, 7
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (rows, length))
    mask = torch.ones_like(ids)
    positions = torch.arange(length).repeat(rows, 1)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        got = backend.forward(ids, mask, positions, DynamicCache(config=model.config),
                              [None] * rows)
    vocab, hidden = model.lm_head.weight.shape
    expanded = [e.key for e in prof.key_averages(group_by_input_shape=True)
                if any(list(s) == [rows, hidden, vocab] for s in e.input_shapes)]
    assert expanded == [], f"the lm_head weight was expanded per row by {expanded}"
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    tol = 1e-4 if compute == "fp32" else 2e-2  # the same math, summed in another order
    torch.testing.assert_close(got, want.float(), rtol=tol, atol=tol)


def test_a_step_runs_dense_only_when_it_reads_little_more_than_it_needs():
    """The dense form reads adapter positions 0..used-1, each up to the widest rank bucket
    of the step: it is chosen for a decode step of adapters packed at low ids (also on a
    layer a resident rank-64 adapter padded, read at rank 16 then, while the copy that
    takes is small), never for a prefill or for few rows on high ids."""
    from loramux.inference.lora_backend import _RowContext

    ctx = _RowContext()
    ctx.set(list(range(1, 9)), [16] * 8, tokens=1)
    assert ctx.dense(16) and ctx.rank_width(16) == 16
    assert ctx.dense(64) and ctx.rank_width(64) == 16  # padded to 64 by a resident one
    assert ctx.foreign(16).shape == (8, 9 * 16)
    ctx.set(list(range(1, 17)), [16] * 16, tokens=1)
    assert ctx.dense(16)  # the stacks as they are: views
    assert not ctx.dense(64)  # a copy of 17 x 16 columns first: gathering is cheaper
    ctx.set(list(range(1, 9)), [16] * 8, tokens=40)
    assert not ctx.dense(16)  # a prefill
    ctx.set(list(range(25, 33)), [16] * 8, tokens=1)
    assert not ctx.dense(16)  # 32 positions read for 8 adapters
    ctx.set([1, 2, 0, 0], [64, 64, 0, 0], tokens=1)
    assert ctx.dense(64)  # wide adapters that the rows do use
    mask = ctx.foreign(64)
    assert mask.shape == (4, 3 * 64)
    assert not mask[0, 64:128].any() and mask[0, :64].all() and mask[0, 128:].all()
    assert mask[2].all() and mask[3].all()  # base rows read no adapter column
    # fp32 stacks on a CPU without native bf16: dense only for the smallest steps
    ctx.fp32_avx2 = True
    ctx.set(list(range(1, 17)), [16] * 16, tokens=1)
    assert not ctx.dense(16)
    ctx.set(list(range(1, 5)), [16] * 4, tokens=1)
    assert ctx.dense(16)


@pytest.mark.parametrize("flags,dtype,expected", [
    ({"avx2"}, torch.float32, True),
    ({"avx2", "avx512_bf16", "amx_bf16"}, torch.float32, False),
    ({"avx2"}, torch.bfloat16, False),
])
def test_the_dense_budget_follows_the_cpu_and_the_stacks_dtype(tiny_model_dir, monkeypatch,
                                                               flags, dtype, expected):
    """fp32 stacks on a CPU without native bf16 get the small dense budget; any other
    combination keeps DENSE_BUDGET."""
    from loramux.inference import lora_backend
    from loramux.inference.model_loader import load_base_model
    from loramux.inference.precision import CpuInfo

    monkeypatch.setattr(lora_backend, "cpu_info",
                        lambda: CpuInfo("test cpu", frozenset(flags)))
    model = load_base_model(tiny_model_dir, "none", "cpu", compute_dtype="fp32").model
    assert BatchedLoraBackend(model, lora_dtype=dtype)._ctx.fp32_avx2 is expected


def test_lora_stacks_follow_the_compute_dtype_and_compute_the_same_function(tiny_model_dir,
                                                                          adapter_root):
    """``--lora-dtype auto`` keeps the stacks in the base's compute dtype (bf16 halves the
    bytes a decode step reads per adapter), ``fp32`` keeps them in fp32; both compute the
    same logits on a bf16 base, to bf16's precision, in the dense and the gathered form."""
    from types import SimpleNamespace

    from transformers import DynamicCache

    from loramux.inference import lora_backend
    from loramux.inference.model_loader import load_base_model
    from loramux.inference.server import lora_dtype
    from loramux.inference.settings import ServeSettings

    base = load_base_model(tiny_model_dir, "bf16", "cpu", compute_dtype="bf16")
    assert lora_dtype(ServeSettings(), base) == torch.bfloat16
    assert lora_dtype(ServeSettings(lora_dtype="fp32"), base) == torch.float32
    assert lora_dtype(ServeSettings(), SimpleNamespace(precision=None)) == torch.float32

    facts = BaseFacts.from_model(base.model, ("tiny-llama",))
    torch.manual_seed(3)
    ids = torch.randint(10, 1000, (4, 6))
    mask = torch.ones_like(ids)
    positions = mask.cumsum(1) - 1
    slots = ["legal", "medical", None, "retail"]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_base_model(tiny_model_dir, "bf16", "cpu", compute_dtype="bf16").model
        backend = BatchedLoraBackend(model, lora_dtype=dtype)
        for tenant in ("legal", "medical", "retail"):
            backend.add(tenant, read_adapter(adapter_root / tenant / "v1", facts, max_rank=64))
        layer = next(iter(backend._layers.values()))
        assert layer.A.dtype == dtype and layer.B.dtype == dtype
        for budget in (0, 10**9):  # gathered, dense
            backend._ctx.fp32_avx2 = False  # DENSE_BUDGET decides on any CPU
            lora_backend.DENSE_BUDGET, saved = budget, lora_backend.DENSE_BUDGET
            lora_backend.DENSE_MAX_WASTE, saved_waste = 10**9, lora_backend.DENSE_MAX_WASTE
            try:
                logits[(dtype, budget)] = backend.forward(
                    ids, mask, positions, DynamicCache(config=model.config), slots)
            finally:
                lora_backend.DENSE_BUDGET, lora_backend.DENSE_MAX_WASTE = saved, saved_waste
        if dtype == torch.float32:
            no_adapter = backend.forward(ids, mask, positions, DynamicCache(config=model.config),
                                         [None] * 4)
    want = logits[(torch.float32, 0)]
    scale = float(want.abs().max())
    for key, got in logits.items():
        torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * scale, msg=str(key))
    # the tolerance is tight enough to see the adapters: their rows move beyond it
    for row in (0, 1, 3):
        assert not torch.allclose(no_adapter[row], want[row], rtol=0.03, atol=0.03 * scale)


def _merged_ids(backend: BatchedLoraBackend) -> set[int | None]:
    return {layer.merged_id for layer in backend._layers.values()}


def test_a_uniform_batch_runs_on_merged_weights_and_computes_what_the_pair_does(backends):
    """Every row on one adapter: the layers run one matmul with W + BA (computed once,
    kept for later uniform steps) instead of base + pair. Same logits as the pair and as
    PEFT in fp32; the base weights are never written, so mixed batches are unaffected."""
    reference, batched, _ = backends
    config = reference.model.config
    weights = {path: layer.base_layer.weight.clone() for path, layer in batched._layers.items()}
    slots = ["medical"] * 3
    batched._ctx.merge = False
    try:
        pair = _logits(batched, config, slots)
    finally:
        batched._ctx.merge = True
    merged = _logits(batched, config, slots)
    medical = batched._ids["medical"]
    touched = [layer for layer in batched._layers.values() if medical in layer.rank_of]
    assert touched and all(layer.merged_id == medical for layer in touched)
    torch.testing.assert_close(merged, pair, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, _logits(reference, config, slots), rtol=1e-4, atol=1e-4)
    # the adapter is visible at this tolerance: its rows are not the base's
    assert not torch.allclose(merged, _logits(batched, config, [None] * 3), rtol=1e-4, atol=1e-4)
    for path, layer in batched._layers.items():
        assert torch.equal(layer.base_layer.weight, weights[path]), path
    mixed = ["medical", "legal", None]
    torch.testing.assert_close(_logits(batched, config, mixed),
                               _logits(reference, config, mixed), rtol=1e-4, atol=1e-4)


def test_a_merge_never_outlives_its_adapter(tiny_model_dir, adapter_root):
    """A removed adapter's id is reused by the next one: a uniform step on the newcomer must
    merge the newcomer, not reuse the weights merged for the adapter that held the id."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    backend = BatchedLoraBackend(model)
    facts = BaseFacts.from_model(model, ("tiny-llama",))
    legal = read_adapter(adapter_root / "legal" / "v1", facts, max_rank=64)
    medical = read_adapter(adapter_root / "medical" / "v1", facts, max_rank=64)
    backend.add("legal", legal)
    legal_logits = _logits(backend, model.config, ["legal"] * 2)
    legal_id = backend._ids["legal"]
    assert legal_id in _merged_ids(backend)
    backend.remove("legal")
    backend.add("medical", medical)
    assert backend._ids["medical"] == legal_id  # the id was reused
    merged = _logits(backend, model.config, ["medical"] * 2)
    backend._ctx.merge = False
    pair = _logits(backend, model.config, ["medical"] * 2)
    torch.testing.assert_close(merged, pair, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, legal_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantization,compute", [("bf16", "bf16"), ("nf4", "fp32")])
def test_merging_follows_the_weights_format(tiny_model_dir, adapter_root, quantization,
                                            compute):
    """A bf16 base merges (summed in fp32, rounded once to bf16: the same logits as the pair
    to bf16's precision, which still sees the adapter); a 4-bit base never does (a merge
    would need a dequantized copy) and runs the pair."""
    from loramux.inference.model_loader import load_base_model

    base = load_base_model(tiny_model_dir, quantization, "cpu", compute_dtype=compute)
    backend = BatchedLoraBackend(base.model, lora_dtype=torch.float32)
    facts = BaseFacts.from_model(base.model, ("tiny-llama",))
    backend.add("legal", read_adapter(adapter_root / "legal" / "v1", facts, max_rank=64))
    slots = ["legal"] * 3
    merged = _logits(backend, base.model.config, slots)
    backend._ctx.merge = False
    pair = _logits(backend, base.model.config, slots)
    none = _logits(backend, base.model.config, [None] * 3)
    if quantization == "nf4":
        assert not any(layer.mergeable for layer in backend._layers.values())
        assert _merged_ids(backend) == {None}
        torch.testing.assert_close(merged, pair, rtol=1e-5, atol=1e-5)  # the same ops
        return
    assert all(layer.mergeable for layer in backend._layers.values())
    assert _merged_ids(backend) == {backend._ids["legal"]}
    scale = float(pair.abs().max())
    torch.testing.assert_close(merged, pair, rtol=0.03, atol=0.03 * scale)
    assert not torch.allclose(none, pair, rtol=0.03, atol=0.03 * scale)
