"""Random PEFT LoRA adapters for the embedded SmolLM2-135M base, cached on disk.

Shared by ``bench_server.py`` and ``bench_adapter_load.py``. An adapter is built once
(``get_peft_model`` on the fp32 base, random A and B, B scaled down so that generations stay
sensible) and reused while its directory holds both PEFT files.
"""

from __future__ import annotations

from pathlib import Path

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "adapters"
B_SCALE = 0.05


def _complete(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (
        path / "adapter_model.safetensors"
    ).is_file()


def make_adapters(
    specs: list[tuple[Path, int, list[str], int]], base_dir: Path | None = None
) -> list[Path]:
    """Build every ``(out_dir, rank, targets, seed)`` not already on disk; return the dirs."""
    missing = [s for s in specs if not _complete(s[0])]
    if missing:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from loramux.inference.model_loader import ensure_default_model

        base_dir = base_dir or ensure_default_model()
        for out, rank, targets, seed in missing:
            base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            torch.manual_seed(seed)
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                init_lora_weights=False, lora_dropout=0.0)
            model = get_peft_model(base, config)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        param.mul_(B_SCALE)
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out)
            print(f"built adapter r={rank} {len(targets)} modules seed={seed} -> {out}",
                  flush=True)
    return [s[0] for s in specs]


def tenant_adapters(count: int, root: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """``count`` distinct rank-16 q/k/v/o tenants: ``tenant-<i>`` -> ``root/tenant-<i>/v1``."""
    names = [f"tenant-{i}" for i in range(count)]
    specs = [(root / name / "v1", 16, ATTENTION, 1000 + i) for i, name in enumerate(names)]
    return dict(zip(names, make_adapters(specs), strict=True))
