"""``auto`` precision: what each kind of device gets, decided from faked hardware facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramux.inference.precision import (
    CpuInfo,
    DeviceFacts,
    PrecisionError,
    choose_precision,
    cpu_info,
    parse_cpuinfo,
    unquantized_weights,
)

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: ignored second processor
flags\t\t: fpu
"""
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""
AVX512_NO_BF16 = """model name\t: Intel(R) Xeon(R) Platinum 8259CL
flags\t\t: avx2 avx512f avx512bw avx512_vnni
"""
GiB = 1024**3
PARAMS_135M = 134_515_008


def cpu(text: str, **env: str) -> DeviceFacts:
    return DeviceFacts("cpu", parse_cpuinfo(text, env), free_memory_bytes=20 * GiB)


def test_cpuinfo_parsing_reads_the_first_processor():
    info = parse_cpuinfo(XEON_AMX, {})
    assert info.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert {"avx512_bf16", "amx_bf16"} <= info.flags
    assert info.native_bf16 and info.limited_by is None
    assert info.describe()["flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                        "amx_tile"]
    assert not parse_cpuinfo(EPYC_AVX2, {}).native_bf16
    assert not parse_cpuinfo(AVX512_NO_BF16, {}).native_bf16  # AVX512 alone emulates bf16


def test_cpu_with_native_bf16_gets_bf16_and_nf4_when_bf16_does_not_fit():
    p = choose_precision("auto", "auto", cpu(XEON_AMX), PARAMS_135M)
    assert (p.quantization, p.compute_dtype) == ("bf16", "bf16")
    assert "native bf16" in p.reason
    assert p.details["cpu"]["native_bf16"] is True
    # 8B parameters: 16 GB in bf16 is more than half of the 20 GB free; NF4 (4.2 GB) fits.
    p = choose_precision("auto", "auto", cpu(XEON_AMX), 8_000_000_000)
    assert (p.quantization, p.compute_dtype) == ("nf4", "bf16")
    assert "does not fit" in p.reason
    # NF4 asked for: it computes in bf16 here.
    assert choose_precision("nf4", "auto", cpu(XEON_AMX)).compute_dtype == "bf16"


@pytest.mark.parametrize("cpuinfo", [EPYC_AVX2, AVX512_NO_BF16])
def test_cpu_without_native_bf16_gets_fp32(cpuinfo):
    p = choose_precision("auto", "auto", cpu(cpuinfo), PARAMS_135M)
    assert (p.quantization, p.compute_dtype) == ("none", "fp32")
    assert "no native bf16" in p.reason
    # NF4 asked for explicitly: it computes in fp32 there, never in emulated bf16.
    nf4 = choose_precision("nf4", "auto", cpu(cpuinfo))
    assert (nf4.quantization, nf4.compute_dtype) == ("nf4", "fp32")


@pytest.mark.parametrize("env", [{"ONEDNN_MAX_CPU_ISA": "AVX2"},
                                 {"ATEN_CPU_CAPABILITY": "avx2"},
                                 {"ONEDNN_MAX_CPU_ISA": "avx512_core"}])
def test_isa_limits_emulate_an_avx2_cpu(env):
    facts = cpu(XEON_AMX, **env)
    assert facts.cpu.hardware_bf16 and not facts.cpu.native_bf16
    p = choose_precision("nf4", "auto", facts)
    assert p.compute_dtype == "fp32"
    assert next(iter(env)) in p.reason  # the reason names the variable that hid bf16


@pytest.mark.parametrize("env", [{"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
                                 {"ONEDNN_MAX_CPU_ISA": "ALL"},
                                 {"ATEN_CPU_CAPABILITY": "avx512"}])
def test_isa_limits_that_keep_bf16_change_nothing(env):
    assert choose_precision("nf4", "auto", cpu(XEON_AMX, **env)).compute_dtype == "bf16"


def test_cuda_prefers_half_precision_and_falls_back_to_nf4_when_it_does_not_fit():
    big_gpu = DeviceFacts("cuda", CpuInfo("x", frozenset()), cuda_bf16=True,
                          free_memory_bytes=80 * GiB)
    p = choose_precision("auto", "auto", big_gpu, 7_000_000_000)
    assert (p.quantization, p.compute_dtype) == ("bf16", "bf16")
    # 7B in bf16 is 14 GB: more than half of a 16 GB card, so NF4 (3.6 GB) it is.
    small_gpu = DeviceFacts("cuda", CpuInfo("x", frozenset()), cuda_bf16=True,
                            free_memory_bytes=16 * GiB)
    p = choose_precision("auto", "auto", small_gpu, 7_000_000_000)
    assert (p.quantization, p.compute_dtype) == ("nf4", "bf16")
    assert "does not fit" in p.reason
    old_gpu = DeviceFacts("cuda", CpuInfo("x", frozenset()), cuda_bf16=False,
                          free_memory_bytes=16 * GiB)
    p = choose_precision("auto", "auto", old_gpu, 1_000_000_000)
    assert (p.quantization, p.compute_dtype) == ("fp16", "fp16")
    assert choose_precision("nf4", "auto", old_gpu).compute_dtype == "fp16"


def test_cpu_memory_decides_between_fp32_and_nf4():
    tight = DeviceFacts("cpu", parse_cpuinfo(EPYC_AVX2, {}), free_memory_bytes=8 * GiB)
    # 3B parameters: 12 GB in fp32 does not fit half of 8 GB; NF4 (1.6 GB) does.
    p = choose_precision("auto", "auto", tight, 3_000_000_000)
    assert (p.quantization, p.compute_dtype) == ("nf4", "fp32")
    assert choose_precision("auto", "auto", tight, PARAMS_135M).quantization == "none"


def test_without_bitsandbytes_auto_never_picks_nf4_and_nf4_says_why():
    facts = DeviceFacts("cpu", parse_cpuinfo(XEON_AMX, {}), have_bitsandbytes=False,
                        free_memory_bytes=20 * GiB)
    # bf16 would not fit, but NF4 is not installed: the last candidate, with the reason.
    p = choose_precision("auto", "auto", facts, 8_000_000_000)
    assert p.quantization == "bf16" and "nothing fits" in p.reason
    with pytest.raises(PrecisionError, match="bitsandbytes"):
        choose_precision("nf4", "auto", facts)
    # An explicit compute dtype is still honoured without NF4: weights in that dtype.
    avx2 = DeviceFacts("cpu", parse_cpuinfo(EPYC_AVX2, {}), have_bitsandbytes=False)
    assert choose_precision("auto", "fp16", avx2).quantization == "fp16"


def test_explicit_settings_win_and_contradictions_are_refused():
    amx, avx2 = cpu(XEON_AMX), cpu(EPYC_AVX2)
    assert choose_precision("nf4", "fp32", amx).compute_dtype == "fp32"
    explicit = choose_precision("nf4", "bf16", avx2)
    assert explicit.compute_dtype == "bf16" and "20x slower" in explicit.reason
    assert choose_precision("auto", "fp32", amx).quantization == "none"
    assert choose_precision("auto", "bf16", avx2).quantization == "nf4"
    assert choose_precision("none", "auto", amx).compute_dtype == "fp32"
    assert choose_precision("bf16", "bf16", avx2).quantization == "bf16"
    with pytest.raises(PrecisionError, match="contradicts"):
        choose_precision("none", "bf16", amx)
    with pytest.raises(PrecisionError, match="contradicts"):
        choose_precision("bf16", "fp32", amx)


def test_merged_servers_take_unquantized_weights_in_the_compute_dtype():
    assert unquantized_weights("auto", cpu(XEON_AMX)) == "bf16"
    assert unquantized_weights("auto", cpu(EPYC_AVX2)) == "none"
    assert unquantized_weights("fp16", cpu(EPYC_AVX2)) == "fp16"


def test_this_machine_is_described_and_decided(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    info = cpu_info()
    assert info.model and info.model != "unknown"
    facts = DeviceFacts("cpu", info)
    expected = "bf16" if info.flags & {"avx512_bf16", "amx_bf16"} else "fp32"
    assert choose_precision("nf4", "auto", facts).compute_dtype == expected


# --- each path: the server, the merged (hot-tenant) server and training -----------------
# A real process cannot be given another CPU, but the ISA limits are environment variables
# that the decision honours: with ONEDNN_MAX_CPU_ISA=AVX2 a process decides as an AVX2-only
# CPU would. Without it, it decides for this machine.

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _native_here() -> bool:
    return parse_cpuinfo(open("/proc/cpuinfo").read(), {}).native_bf16


def test_server_reports_its_choice_in_models_and_metrics(start_server, tiny_model_dir):
    import httpx

    from helpers import metrics

    emulated = start_server("--model", str(tiny_model_dir), "--quantization", "nf4",
                            "--log-format", "text", "--lora-kernel", "off", env=AVX2_ENV)
    models = httpx.get(f"{emulated.url}/v1/models").json()
    assert models["lora_kernel"] == {"state": "torch", "reason": "--lora-kernel off"}
    # NF4 layers stay bitsandbytes'; the fp32 output layer runs through oneDNN, packed.
    assert models["cpu_linear"]["state"] == "onednn" and models["cpu_linear"]["layers"] == 1
    assert models["data"][0]["compute_dtype"] == "fp32"
    assert models["precision"]["quantization"] == "nf4"
    assert models["precision"]["cpu"]["native_bf16"] is False
    assert 'loramux_precision_info{compute_dtype="fp32"' in metrics(emulated.url)
    # The reason names the limit where it hides real bf16 units; on an AVX2-only CPU there
    # are none to hide. In the start-up log too, whatever the log format (this one: text).
    if parse_cpuinfo(Path("/proc/cpuinfo").read_text(), {}).hardware_bf16:
        assert "ONEDNN_MAX_CPU_ISA=AVX2" in models["precision"]["reason"]
        why = "bf16 units hidden by ONEDNN_MAX_CPU_ISA=AVX2"
    else:
        assert "no native bf16" in models["precision"]["reason"]
        why = "has no native bf16"
    assert ("base model loaded: nf4 weights, fp32 compute (--quantization nf4; compute CPU "
            f"{why}") in emulated.log()

    auto = start_server("--model", str(tiny_model_dir), "--log-format", "text",
                        env={"ONEDNN_MAX_CPU_ISA": "", "ATEN_CPU_CAPABILITY": ""})
    models = httpx.get(f"{auto.url}/v1/models").json()
    base = models["data"][0]
    # `make setup` built the CPU kernel on this machine, so the server loads it at start
    assert models["lora_kernel"]["state"] == "kernel", models["lora_kernel"]
    if _native_here():
        assert (base["quantization"], base["compute_dtype"]) == ("bf16", "bf16")
    else:
        assert (base["quantization"], base["compute_dtype"]) == ("none", "fp32")
    # auto packs fp32 weights, and bf16 ones where bf16 is native: every linear of the tiny
    # model either way
    assert models["cpu_linear"]["state"] == "onednn", models["cpu_linear"]
    assert models["cpu_linear"]["layers"] == 2 * 7 + 1


def test_a_contradictory_precision_is_refused_at_start_with_the_reason(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-P", "-m", "loramux.cli", "serve", "--model", str(tiny_model_dir),
         "--quantization", "none", "--compute-dtype", "bf16", "--port", "0"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "contradicts" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_merged_server_computes_in_the_auto_dtype(start_server, tiny_model_dir, adapter_root):
    import httpx

    merged = start_server("--model", str(tiny_model_dir), "--log-format", "text",
                          "--merge-adapter", str(adapter_root / "legal" / "v1"), env=AVX2_ENV)
    precision = httpx.get(f"{merged.url}/v1/models").json()["precision"]
    assert (precision["quantization"], precision["compute_dtype"]) == ("none", "fp32")


@pytest.mark.parametrize("emulate_avx2", [True, False])
def test_training_uses_nf4_with_the_fast_compute_dtype(tiny_model_dir, tmp_path, monkeypatch,
                                                       emulate_avx2):
    from loramux.training.config import TrainConfig
    from loramux.training.trainer import MultiTaskTrainer

    for key in AVX2_ENV:
        monkeypatch.delenv(key, raising=False)
    if emulate_avx2:
        for key, value in AVX2_ENV.items():
            monkeypatch.setenv(key, value)
    data = tmp_path / "a.jsonl"
    data.write_text("".join(f'{{"text": "example number {i} of the task"}}\n'
                            for i in range(8)))
    config = TrainConfig(base_model=tiny_model_dir, device="cpu", steps=1, batch_size=2,
                         output_dir=tmp_path / "out", tasks=[{"name": "a", "data": data}])
    assert (config.quantization, config.compute_dtype) == ("nf4", "auto")
    trainer = MultiTaskTrainer(config)
    fast = "bf16" if _native_here() and not emulate_avx2 else "fp32"
    assert (trainer.base.quantization, trainer.base.compute_dtype) == ("nf4", fast)
    layers = [m for m in trainer.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers
    if fast == "fp32":
        # bitsandbytes' fused CPU kernel always computes in bf16: it is switched off.
        assert not any(m.support_avx512bf16_for_cpu for m in layers)
    name, loss = trainer.train_step()
    assert name == "a" and loss > 0
