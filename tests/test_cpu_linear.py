"""The base's linear layers through oneDNN on packed weights (inference/cpu_linear.py).

Real torch and oneDNN on this CPU (also in the AVX2-restricted pass, `make test-avx2`);
nothing is mocked. Results are compared with tolerances, never bit for bit: oneDNN and MKL
may sum in different orders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import greedy_decode, reference_and_batched
from loramux.inference import cpu_linear
from loramux.inference.cpu_linear import (
    CpuLinearError,
    OneDnnLinear,
    pack_linears,
    pack_weight,
    packed_linear,
    probe,
)


@pytest.mark.parametrize("rows", [0, 1, 8, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_the_packed_linear_equals_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 72, generator=gen)
    b = torch.randn(300, generator=gen) if bias else None
    for x in (torch.randn(rows, 72, generator=gen),
              torch.randn(2, rows, 72, generator=gen),
              torch.randn(72, rows, generator=gen).T):  # a strided input
        got = packed_linear(x, pack_weight(weight), b)
        assert got.shape == (*x.shape[:-1], 300)
        torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def _tied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_packing_keeps_every_module_and_parameter_and_the_tied_embedding():
    model = _tied_model()
    linears = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    params = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        want = model(ids).logits
        state = pack_linears(model)
        got = model(ids).logits
    assert state.state == "onednn" and state.layers == len(linears) == 2 * 7 + 1
    assert state.packed_bytes == sum(m.weight.numel() * 4 for m in linears.values())
    assert all(type(m) is OneDnnLinear for m in linears.values())
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Packing twice packs nothing more.
    assert pack_linears(model).state == "torch"


def test_a_weight_changed_after_packing_is_seen():
    layer = torch.nn.Linear(48, 40)
    pack_linears(torch.nn.Sequential(layer))
    x = torch.randn(5, 48)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the version counter moves, the next call repacks
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.data.add_(1)  # through .data the counter does not move: repack() says so
        layer.repack()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_autograd_and_other_dtypes_take_f_linear():
    layer = torch.nn.Linear(16, 8)
    pack_linears(torch.nn.Sequential(layer))
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()  # a graph: the packed op has none, so F.linear runs
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        xb = torch.randn(3, 16).double()
        assert layer.double()(xb).dtype == torch.float64


def test_auto_packs_bf16_only_where_bf16_is_native_and_torch_packs_nothing():
    model = _tied_model()
    assert pack_linears(model, "torch").state == "torch"
    assert not any(isinstance(m, OneDnnLinear) for m in model.modules())
    emulated = _tied_model().to(torch.bfloat16)
    state = pack_linears(emulated, "auto", native_bf16=False)
    assert state.state == "torch" and "no plain fp32 linear layers" in state.reason
    assert not any(isinstance(m, OneDnnLinear) for m in emulated.modules())

    native = _tied_model().to(torch.bfloat16)
    ids = torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        want = native(ids).logits.float()
        state = pack_linears(native, "auto", native_bf16=True)
        got = native(ids).logits.float()
    refusal = probe(torch.bfloat16)
    if refusal is None:  # oneDNN runs bf16 here (natively or not): packed, same logits
        assert state.state == "onednn" and state.layers == 2 * 7 + 1, state
        assert state.packed_bytes == sum(m.weight.numel() * 2 for m in native.modules()
                                         if isinstance(m, OneDnnLinear))
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    else:  # the probe's refusal is reported, nothing is packed
        assert state.state == "torch" and state.reason == refusal
        assert not any(isinstance(m, OneDnnLinear) for m in native.modules())


def test_auto_follows_this_cpus_bf16_by_default():
    from loramux.inference.precision import cpu_info

    model = _tied_model().to(torch.bfloat16)
    state = pack_linears(model)
    packed = any(isinstance(m, OneDnnLinear) for m in model.modules())
    assert packed == (cpu_info().native_bf16 and probe(torch.bfloat16) is None), state


# torch warns about Intel-GPU TF32 whenever the mkldnn flags are set on a CPU-only build.
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_disabled_onednn_is_refused_by_name_and_auto_keeps_torch():
    model = _tied_model()
    with torch.backends.mkldnn.flags(enabled=False):
        state = pack_linears(model, "auto")
        assert state.state == "torch" and "mkldnn.enabled is False" in state.reason
        with pytest.raises(CpuLinearError, match=r"--cpu-linear onednn: .*mkldnn"):
            pack_linears(model, "onednn")
    assert not any(isinstance(m, OneDnnLinear) for m in model.modules())


@pytest.fixture(scope="module")
def packed_models(tiny_model_dir, adapter_root):
    from loramux.inference import bgmv

    op, reason = bgmv.load()
    assert op is not None, reason
    reference, batched, _ = reference_and_batched(tiny_model_dir, adapter_root,
                                                         kernel=op)
    state = pack_linears(batched.model)
    assert state.state == "onednn", state
    return reference, batched


@pytest.mark.parametrize("slots", [
    ["legal", "medical", "finance", "retail", "support", "travel", None],  # distinct + base
    ["medical"] * 4,  # one adapter on every row: the merged-weights path
])
def test_greedy_decoding_on_packed_linears_equals_pefts_token_for_token(
        packed_models, slots, monkeypatch):
    """fp32: the batched backend on a packed base (with the CPU kernel for decode steps)
    against PEFT's reference forward on an unpacked copy, every step's logits and the greedy
    tokens; the packed op is checked to have run."""
    reference, batched = packed_models
    calls = []
    real = cpu_linear.packed_linear

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cpu_linear, "packed_linear", counting)
    got_tokens, got = greedy_decode(batched, batched.model.config, slots, steps=6)
    want_tokens, want = greedy_decode(reference, reference.model.config, slots, steps=6)
    assert calls, "no layer ran the packed op"
    for step_got, step_want in zip(got, want, strict=True):
        torch.testing.assert_close(step_got, step_want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_tokens, want_tokens)
    if len(set(slots)) == 1:
        merged = [layer for layer in batched._layers.values() if layer.merged_id is not None]
        assert merged and all(layer._merged_packed is not None for layer in merged)
