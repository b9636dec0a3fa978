"""Merge mode (one adapter merged into the base) and the embedded SmolLM2 model in NF4."""

from __future__ import annotations

import httpx
import pytest

from conftest import preload_flags
from factories import make_adapter
from helpers import generate
from loramux.inference.model_loader import resolve_precision

PROMPTS = ["Merged prompt one", "A second, longer prompt for the merged model", "Third"]


def test_merged_server_matches_unmerged_adapter_output_fp32(start_server, tiny_model_dir,
                                                            adapter_root):
    unmerged = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                            "--log-format", "text",
                            *preload_flags(adapter_root, ["medical"]))
    merged = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text",
                          "--merge-adapter", str(adapter_root / "medical" / "v1"))
    for prompt in PROMPTS:
        expected = generate(unmerged.url, "medical", prompt, tokens=20)
        got = generate(merged.url, "medical", prompt, tokens=20)
        assert got["text"] == expected["text"]
        assert got["adapter"] == "medical@v1"
    # The merged deployment serves only its tenant, not the plain base.
    r = httpx.post(f"{merged.url}/v1/completions", json={"model": "tiny-llama", "prompt": "x"})
    assert r.status_code == 404
    listing = httpx.get(f"{merged.url}/admin/adapters").json()["adapters"]
    assert listing[0]["merged"] is True and listing[0]["residency"] == "device"


def test_merge_mode_loads_the_base_dequantized_even_when_nf4_is_asked(
    start_server, tiny_model_dir, adapter_root
):
    merged = start_server("--model", str(tiny_model_dir), "--quantization", "nf4",
                          "--log-format", "text",
                          "--merge-adapter", str(adapter_root / "legal" / "v1"))
    models = httpx.get(f"{merged.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["legal@v1", "legal"]
    assert "merge mode: loading the base unquantized" in merged.log()


@pytest.fixture(scope="module")
def smollm_adapters(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("smol-adapters")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    make_adapter(default_model_dir, root / "legal" / "v1", rank=16, targets=targets, seed=1,
                 scale=0.02, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    make_adapter(default_model_dir, root / "medical" / "v1", rank=8, targets=targets, seed=2,
                 scale=0.02, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    return root


def test_embedded_smollm2_at_auto_precision_answers_and_serves_two_tenants(
        start_server, smollm_adapters, default_model_dir):
    server = start_server("--log-format", "text",  # no --model: the embedded default
                          *preload_flags(smollm_adapters, ["legal", "medical"]))
    models = httpx.get(f"{server.url}/v1/models").json()
    base = models["data"][0]
    # auto: what this CPU (or its emulated ISA, which the server inherits) makes fastest.
    expected = resolve_precision("auto", "auto", "cpu", default_model_dir)
    assert base["id"] == "SmolLM2-135M-Instruct"
    assert (base["quantization"], base["compute_dtype"]) == (expected.quantization,
                                                             expected.compute_dtype)
    assert models["precision"]["reason"] == expected.reason
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    legal = generate(server.url, "legal", "The contract says", tokens=8)
    medical = generate(server.url, "medical", "The contract says", tokens=8)
    assert legal["adapter"] == "legal@v1" and medical["adapter"] == "medical@v1"
    assert legal["usage"]["completion_tokens"] == 8
