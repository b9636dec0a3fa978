"""The base model's linear layers on a CPU through oneDNN, with each weight packed once.

Why: torch's fp32 ``F.linear`` on a CPU calls MKL's sgemm, and for the shapes of a decode
step (a few rows against a wide weight) MKL picks a slow path on some CPUs. On an AMD EPYC
(AVX2) the default model's output layer (8 rows x 576 -> 49152) took 48 ms through MKL and
14 ms through oneDNN with the weight reordered once into oneDNN's blocked layout; a whole
8-row decode step went from 184 to 126 ms (docs/benchmarks.md, "The base's linear layers
through oneDNN"). torch's bf16 ``F.linear`` runs oneDNN already, but reorders the weight on
every call: on an AMD EPYC with AVX512-BF16 (Zen 4), packing bf16 weights once made the
server's 8-tenant decode 1.4x faster (docs/benchmarks.md, "bf16 weights packed too").
vLLM's CPU backend also runs its linear layers through oneDNN, and IPEX packs bf16 weights
the same way.

torch ships the two ops its compiler uses for this when it freezes a model,
``mkldnn::_reorder_linear_weight`` (pack once) and ``mkldnn::_linear_pointwise`` (run on the
packed weight). They are private, so this module probes them on start-up and keeps torch's
``F.linear`` wherever they are missing, disabled (``torch.backends.mkldnn``) or wrong.

Packing swaps each plain ``nn.Linear``'s class to :class:`OneDnnLinear`: the module, its
``weight`` Parameter and everything that refers to them stay as they were (tied embeddings,
merges, PEFT's wrappers), and the packed copy is extra memory, the size of those weights.
A weight changed in place after packing is seen through its version counter and repacked on
the next call; ``repack()`` does it at once (for writes through ``.data``, which the counter
does not see).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

log = logging.getLogger("loramux.cpu_linear")

CpuLinearMode = Literal["auto", "onednn", "torch"]
# The row count oneDNN tunes the packed layout for; 8 measured as fast as the exact count
# from 1 to 200 rows on the default model's shapes (bench/bench_cpu_linear.py).
PACK_ROWS_HINT = 8


class CpuLinearError(RuntimeError):
    """``--cpu-linear onednn`` was asked for and cannot run here."""


def pack_weight(weight: torch.Tensor, rows_hint: int = PACK_ROWS_HINT) -> torch.Tensor:
    """A copy of ``weight [out, in]`` in oneDNN's blocked layout for :func:`packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` packed by :func:`pack_weight`; any leading dims."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def probe(dtype: torch.dtype = torch.float32) -> str | None:
    """None if the packed path runs here and agrees with ``F.linear``; else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch is built without oneDNN (mkldnn)"
    if not torch.backends.mkldnn.enabled:
        return "torch.backends.mkldnn.enabled is False"
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return f"torch {torch.__version__} lacks mkldnn::_reorder_linear_weight/_linear_pointwise"
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 72, generator=gen).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    x = torch.randn(3, 5, 72, generator=gen).to(dtype)
    try:
        with torch.no_grad():
            got = packed_linear(x, pack_weight(weight), bias)
    except RuntimeError as exc:  # oneDNN found no implementation for this dtype or CPU
        return f"oneDNN refused a {dtype} linear: {str(exc).splitlines()[0][:160]}"
    want = F.linear(x.float(), weight.float(), bias.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if got.shape != want.shape or not torch.allclose(got.float(), want, rtol=tol, atol=tol):
        return "oneDNN's packed linear disagreed with F.linear on a probe"
    return None


class OneDnnLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose CPU forward runs oneDNN on a packed copy of its weight.

    Made by :func:`pack_linears` by swapping the class of an existing ``nn.Linear``; falls back
    to ``F.linear`` for inputs of another dtype or device, or when autograd needs a graph."""

    _packed: torch.Tensor | None
    _packed_version: int | None

    def repack(self) -> None:
        self._packed = pack_weight(self.weight)
        # Inference tensors keep no version counter: such a weight is never written anyway.
        self._packed_version = None if self.weight.is_inference() else self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x, self.weight, self._packed):
            return F.linear(x, self.weight, self.bias)
        if self._packed_version is not None and self.weight._version != self._packed_version:
            self.repack()
        return packed_linear(x, self._packed, self.bias)


def _applies(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> bool:
    # A CPU input and weight of the packed dtype, and no autograd graph to build.
    return (packed is not None and x.dtype == packed.dtype and weight.dtype == packed.dtype
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, run on ``packed`` (``weight`` packed by
    :func:`pack_weight`) where that applies, else on the dense weight."""
    if _applies(x, weight, packed):
        return packed_linear(x, packed, bias)  # type: ignore[arg-type]
    return F.linear(x, weight, bias)


@dataclass
class CpuLinearState:
    """What the base's linear layers run, for /v1/models and the logs."""

    state: Literal["onednn", "torch"]
    reason: str
    layers: int = 0
    packed_bytes: int = 0

    def view(self) -> dict[str, object]:
        return {"state": self.state, "reason": self.reason, "layers": self.layers,
                "packed_bytes": self.packed_bytes}


def _packable(name: str, module: torch.nn.Module, dtypes: tuple[torch.dtype, ...]) -> bool:
    # Exactly nn.Linear (not NF4/int8 subclasses, not already packed), never a LoRA factor
    # that PEFT's wrappers own, weights on the CPU in a dtype the probe passed.
    if type(module) is not torch.nn.Linear or "lora_" in name:
        return False
    weight = module.weight
    return weight.device.type == "cpu" and weight.dtype in dtypes


def pack_linears(model: torch.nn.Module, mode: CpuLinearMode = "auto",
                 native_bf16: bool | None = None) -> CpuLinearState:
    """Pack every plain ``nn.Linear`` of ``model`` for oneDNN where ``mode`` asks for it.

    ``auto`` packs fp32 weights, and bf16 weights on a CPU with native bf16
    (``native_bf16``; default: this CPU, as ``precision.cpu_info`` sees it, ISA limits
    included): both measured faster than torch's ``F.linear`` for decode steps
    (docs/benchmarks.md). Where bf16 is emulated (AVX2 only), bf16 weights stay on torch:
    not measured to pay. ``onednn`` packs both dtypes anywhere and raises
    :class:`CpuLinearError` where the ops cannot run; ``torch`` packs nothing."""
    if mode == "torch":
        return CpuLinearState("torch", "--cpu-linear torch")
    if mode == "auto":
        if native_bf16 is None:
            from .precision import cpu_info
            native_bf16 = cpu_info().native_bf16
        dtypes = (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,)
    else:
        dtypes = (torch.float32, torch.bfloat16)
    layers = [(n, m) for n, m in model.named_modules() if _packable(n, m, dtypes)]
    if not layers:
        kinds = " or ".join(str(d).removeprefix("torch.").replace("float32", "fp32")
                            .replace("bfloat16", "bf16") for d in dtypes)
        return CpuLinearState("torch", f"no plain {kinds} linear layers on the CPU to pack "
                              "(a GPU, NF4 weights, or bf16 weights where bf16 is emulated)")
    for dtype in sorted({m.weight.dtype for _, m in layers}, key=str):
        reason = probe(dtype)
        if reason is not None:
            if mode == "onednn":
                raise CpuLinearError(f"--cpu-linear onednn: {reason}")
            return CpuLinearState("torch", reason)
    nbytes = 0
    with torch.no_grad():
        for _, module in layers:
            module.__class__ = OneDnnLinear
            module.repack()  # type: ignore[attr-defined]
            nbytes += module.weight.numel() * module.weight.element_size()
    state = CpuLinearState("onednn", "oneDNN with packed weights", len(layers), nbytes)
    log.info("linear layers packed for oneDNN", extra=state.view())
    return state
