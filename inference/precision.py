"""Which precision runs fast and correctly on the device at hand.

``--compute-dtype auto`` and ``--quantization auto`` are decided here, once per process, from
facts about the device: the CPU's instruction set (native bf16 or not), CUDA's bf16 support,
and the memory free for the weights. Everything below takes those facts as arguments, so the
decision can be tested with any CPU's flags on any machine.

Why it matters: on a CPU without native bf16 (AVX2 only, most laptops and many cloud CPUs),
a bf16 matmul is emulated and runs about 20x slower than fp32. Measured numbers behind the
choices are in docs/benchmarks.md ("Precision by CPU kind", ``bench/bench_precision.py``).

Developers on an AVX512-BF16/AMX machine can reproduce an AVX2-only CPU with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``; both limits are honoured here, so
``auto`` then chooses what it would choose on such a CPU.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]
Quantization = Literal["auto", "nf4", "bf16", "fp16", "none"]

# CPU flags (as /proc/cpuinfo spells them) that give bf16 matmuls in hardware.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) under which oneDNN, which runs torch's CPU bf16
# matmuls, still uses bf16 instructions. Anything lower emulates bf16.
_ONEDNN_BF16_ISAS = frozenset({
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT",
})
# torch's own kernels (ATEN_CPU_CAPABILITY) below avx512 have no bf16 fast path either.
_ATEN_BF16_CAPABILITIES = frozenset({"avx512", "default_avx512", ""})

# Weights may take at most this share of the memory free when the model loads: the rest is
# for the KV cache, the adapter tiers and activations.
WEIGHT_MEMORY_SHARE = 0.5
# Bytes per parameter of each weight format (NF4 with double quantization: 4 bits plus
# about 0.13 bits of scales; embeddings and norms stay in the compute dtype, so this is a
# lower bound that the headroom above covers).
_BYTES_PER_PARAM = {"nf4": 0.52, "bf16": 2.0, "fp16": 2.0, "none": 4.0}

# What is fastest, per kind of device, among the unquantized/NF4 settings, measured with
# bench/bench_precision.py (docs/benchmarks.md, "Precision by CPU kind"). The first one that
# fits in memory wins.
#  - CPU with native bf16: bf16 weights (8 clients on 8 tenants: 88 tok/s against 65-75 for
#    NF4 with bf16 compute and 65 for fp32, one machine, one hour); NF4 when bf16 does not fit.
#  - CPU without: fp32 weights (79 tok/s under the AVX2 emulation, against 53 for NF4 with
#    fp32 compute), then NF4 with fp32 compute; anything bf16 is emulated (~20x slower).
#  - CUDA: half-precision weights are faster than NF4 (which dequantizes every layer on every
#    step); NF4 is for models whose half-precision weights do not fit. Not measurable on
#    these machines (no GPU): this follows bitsandbytes' own guidance.
_CPU_NATIVE_BF16_ORDER = ("bf16", "nf4")
_CPU_FP32_ORDER = ("none", "nf4")
_CUDA_ORDER = ("half", "nf4")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and instruction-set flags, and any ISA limit set by the user."""

    model: str
    flags: frozenset[str]
    onednn_max_isa: str | None = None
    aten_capability: str | None = None

    @property
    def hardware_bf16(self) -> bool:
        return bool(self.flags & NATIVE_BF16_FLAGS)

    @property
    def limited_by(self) -> str | None:
        """The environment variable that hides the CPU's bf16 units, if one does."""
        if self.onednn_max_isa and self.onednn_max_isa.upper() not in _ONEDNN_BF16_ISAS:
            return f"ONEDNN_MAX_CPU_ISA={self.onednn_max_isa}"
        if self.aten_capability is not None and (
                self.aten_capability.lower() not in _ATEN_BF16_CAPABILITIES):
            return f"ATEN_CPU_CAPABILITY={self.aten_capability}"
        return None

    @property
    def native_bf16(self) -> bool:
        return self.hardware_bf16 and self.limited_by is None

    def describe(self) -> dict[str, object]:
        return {"model": self.model,
                "flags": [f for f in REPORTED_FLAGS if f in self.flags],
                "native_bf16": self.native_bf16,
                "isa_limit": self.limited_by}


def parse_cpuinfo(text: str, environ: Mapping[str, str] | None = None) -> CpuInfo:
    """The first processor's model name and flags from ``/proc/cpuinfo`` text."""
    env = os.environ if environ is None else environ
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return CpuInfo(model or platform.processor() or "unknown", flags,
                   env.get("ONEDNN_MAX_CPU_ISA") or None, env.get("ATEN_CPU_CAPABILITY"))


def cpu_info(environ: Mapping[str, str] | None = None) -> CpuInfo:
    """This machine's CPU. Linux reads /proc/cpuinfo; elsewhere torch's CPUID checks."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(), environ)
    except OSError:
        pass
    env = os.environ if environ is None else environ
    flags: set[str] = set()
    try:
        import torch

        if torch.cpu._is_avx512_bf16_supported():
            flags.add("avx512_bf16")
        if torch.cpu._is_amx_tile_supported():
            flags.update({"amx_tile", "amx_bf16"})
    except (ImportError, AttributeError):
        pass
    return CpuInfo(platform.processor() or "unknown", frozenset(flags),
                   env.get("ONEDNN_MAX_CPU_ISA") or None, env.get("ATEN_CPU_CAPABILITY"))


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision choice depends on."""

    device: Literal["cpu", "cuda"]
    cpu: CpuInfo
    cuda_bf16: bool = False
    free_memory_bytes: int | None = None  # None: unknown, assume it fits
    have_bitsandbytes: bool = True


def probe_device(device: str) -> DeviceFacts:
    import importlib.util

    import torch

    free: int | None = None
    cuda_bf16 = False
    if device == "cuda":
        free, _total = torch.cuda.mem_get_info()
        cuda_bf16 = bool(torch.cuda.is_bf16_supported())
    else:
        free = _mem_available()
    return DeviceFacts("cuda" if device == "cuda" else "cpu", cpu_info(), cuda_bf16, free,
                       importlib.util.find_spec("bitsandbytes") is not None)


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Precision:
    """The weight format and compute dtype a process runs, and why."""

    quantization: Literal["nf4", "bf16", "fp16", "none"]
    compute_dtype: Literal["bf16", "fp16", "fp32"]
    reason: str
    details: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            self.compute_dtype]


class PrecisionError(ValueError):
    """The asked-for precision cannot run here; the message says why and what to use."""


_WEIGHT_DTYPE = {"bf16": "bf16", "fp16": "fp16", "none": "fp32"}


def unquantized_weights(compute_dtype: ComputeDtype, facts: DeviceFacts
                        ) -> Literal["bf16", "fp16", "none"]:
    """The unquantized weight format that computes in ``compute_dtype`` (auto: resolved)."""
    if compute_dtype == "auto":
        compute_dtype = auto_compute_dtype(facts)[0]
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "none"}[  # type: ignore[return-value]
        compute_dtype]


def auto_compute_dtype(facts: DeviceFacts) -> tuple[Literal["bf16", "fp16", "fp32"], str]:
    if facts.device == "cuda":
        if facts.cuda_bf16:
            return "bf16", "CUDA device supports bf16"
        return "fp16", "CUDA device has no bf16 support"
    if facts.cpu.native_bf16:
        return "bf16", "CPU has native bf16 (AVX512-BF16/AMX)"
    if facts.cpu.hardware_bf16:
        return "fp32", f"CPU bf16 units hidden by {facts.cpu.limited_by}: bf16 is emulated"
    return "fp32", "CPU has no native bf16 (bf16 would be emulated, ~20x slower)"


def _fits(quantization: str, param_count: int | None, facts: DeviceFacts) -> bool:
    if param_count is None or facts.free_memory_bytes is None:
        return True
    need = param_count * _BYTES_PER_PARAM[quantization]
    return need <= facts.free_memory_bytes * WEIGHT_MEMORY_SHARE


def choose_precision(
    quantization: Quantization,
    compute_dtype: ComputeDtype,
    facts: DeviceFacts,
    param_count: int | None = None,
) -> Precision:
    """Resolve ``auto`` in either setting; reject contradictions with a clear reason.

    Unquantized weights are computed in their own dtype (``none`` is fp32), so an explicit
    compute dtype other than theirs is a contradiction. NF4 dequantizes to the compute dtype.
    """
    if compute_dtype == "auto":
        compute, compute_reason = auto_compute_dtype(facts)
    else:
        compute, compute_reason = compute_dtype, "--compute-dtype"
    if compute == "bf16" and facts.device == "cpu" and not facts.cpu.native_bf16 and \
            compute_dtype == "bf16":
        compute_reason += " (this CPU has no native bf16: expect ~20x slower matmuls)"
    details: dict[str, object] = {"device": facts.device}
    if facts.device == "cpu":
        details["cpu"] = facts.cpu.describe()

    if quantization != "auto":
        if quantization == "nf4" and not facts.have_bitsandbytes:
            raise PrecisionError("--quantization nf4 needs the bitsandbytes package")
        if quantization in _WEIGHT_DTYPE:
            own = _WEIGHT_DTYPE[quantization]
            if compute_dtype not in ("auto", own):
                raise PrecisionError(
                    f"--quantization {quantization} computes in {own}; --compute-dtype "
                    f"{compute_dtype} contradicts it (use --quantization nf4 to pick a "
                    "compute dtype, or leave --compute-dtype auto)")
            return Precision(quantization, own, "--quantization " + quantization, details)
        return Precision("nf4", compute, f"--quantization nf4; compute {compute_reason}",
                         details)

    if facts.device == "cuda":
        order = tuple("bf16" if q == "half" and compute == "bf16" else
                      "fp16" if q == "half" else q for q in _CUDA_ORDER)
        table = "CUDA: half-precision weights, else NF4 when they do not fit"
    elif facts.cpu.native_bf16 and compute == "bf16":
        order, table = _CPU_NATIVE_BF16_ORDER, "CPU with native bf16: bf16 weights"
    else:
        order, table = _CPU_FP32_ORDER, "CPU without native bf16: fp32 weights"
    if compute_dtype != "auto":
        # An explicit compute dtype keeps only the settings that compute in it.
        order = tuple(q for q in order if q == "nf4" or _WEIGHT_DTYPE.get(q) == compute)
    if not facts.have_bitsandbytes:
        order = tuple(q for q in order if q != "nf4") or (
            {"bf16": "bf16", "fp16": "fp16", "fp32": "none"}[compute],)
    for candidate in order:
        if _fits(candidate, param_count, facts):
            chosen = candidate
            break
    else:
        chosen = order[-1]
        table += "; nothing fits the free memory comfortably, taking the smallest"
    if chosen != order[0]:
        table += f"; {order[0]} does not fit in memory"
    own_dtype = _WEIGHT_DTYPE.get(chosen)
    final_compute = own_dtype if own_dtype else compute
    return Precision(chosen, final_compute,  # type: ignore[arg-type]
                     f"auto ({table}); compute {compute_reason}", details)
