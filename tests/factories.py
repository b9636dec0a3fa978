"""Builders for test fixtures: a tiny random-weight Llama and PEFT adapters for it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_LAYERS = 2


def make_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer (so chat templates work)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
        max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # A wider init than the default gives peaked logits, so greedy ties (which would
        # make "same text" comparisons flaky at fp32 rounding level) do not occur.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(
    base_dir: Path, out: Path, *, rank: int, targets: list[str], seed: int,
    alpha: float | None = None, base_name: str | None = None, scale: float = 1.0,
) -> Path:
    """A random (non-zero) LoRA adapter for ``base_dir`` saved in PEFT's format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                        init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
    model.save_pretrained(out)
    if base_name is not None:
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(cfg))
    return out


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def stage_adapter(adapter_root: Path, staging: Path, tenant: str, version: str, *,
                  files_of: str | None = None,
                  extra: dict[str, bytes] | None = None,
                  base_model: str = "tiny-llama") -> tuple[Path, str]:
    """A publishable copy of ``adapter_root/<tenant>/<files_of or version>``: the files at
    ``staging/<tenant>/<version>`` plus a manifest for them (and ``extra`` files), ready for
    ``loramux push`` or a ``file://`` URI. Returns the directory and the manifest's sha256."""
    from loramux.manifest import AdapterManifest, describe_files, write_manifest

    src = staging / tenant / version
    shutil.copytree(adapter_root / tenant / (files_of or version), src)
    for name, data in (extra or {}).items():
        (src / name).write_bytes(data)
    config = json.loads((src / "adapter_config.json").read_text())
    digest = write_manifest(src, AdapterManifest(
        tenant=tenant, version=version, base_model=base_model, rank=config["r"],
        lora_alpha=float(config.get("lora_alpha", config["r"])),
        target_modules=config["target_modules"], files=describe_files(src)))
    return src, digest


def publish_v1(s3: object, adapter_root: Path, staging: Path, bucket: str,
               tenants: tuple[str, ...]) -> dict[str, str]:
    """Each tenant's v1, staged and pushed to ``s3://bucket/pub/<tenant>/v1/`` with the same
    code as ``loramux push``; tenant -> its URI. ``s3`` is the tests' moto server (``S3``)."""
    from loramux.training.publish import push

    s3.create_bucket(bucket)  # type: ignore[attr-defined]
    uris = {}
    for tenant in tenants:
        uris[tenant] = f"s3://{bucket}/pub/{tenant}/v1/"
        src, _ = stage_adapter(adapter_root, staging, tenant, "v1")
        push(src, uris[tenant], client=s3.client, progress=False)  # type: ignore[attr-defined]
    return uris
