"""``loramux train``: train tenants' adapters from ``--config train.yaml`` or, for one task,
from flags.

Flags and ``LORAMUX_TRAIN_*`` environment variables fill one typed settings object,
:class:`TrainSettings` (through :func:`loramux.settings_cli.settings_from_cli`, like every
loramux command). Bad input (a missing file, a malformed record, an unknown field or target
module) is reported as one clear message and exit code 2, never as a traceback: the person
running this is preparing a tenant's data, not debugging loramux.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loramux.logs import LogSettings

# TrainSettings fields that set TrainConfig fields, with or without --config (with it, they
# override the file): settings field -> TrainConfig field.
_TRAIN_FIELDS = {
    "model": "base_model", "quantization": "quantization", "compute_dtype": "compute_dtype",
    "device": "device", "output_dir": "output_dir", "steps": "steps",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr",
    "warmup_steps": "warmup_steps", "schedule": "schedule", "max_length": "max_length",
    "padding_side": "padding_side", "seed": "seed", "eval_every": "eval_every",
    "eval_fraction": "eval_fraction", "temperature": "temperature",
    "checkpoint_every": "checkpoint_every", "checkpoint_dir": "checkpoint_dir",
    "resume_from": "resume_from", "gradient_checkpointing": "gradient_checkpointing",
}
# Fields that describe the single task when there is no --config: field -> TaskConfig field.
_TASK_FIELDS = {
    "data": "data", "tenant": "name", "version": "version", "r": "r", "alpha": "alpha",
    "dropout": "dropout", "target_modules": "target_modules",
}


class TrainSettings(LogSettings, BaseSettings):
    """``loramux train``. Unset fields take TrainConfig's defaults (or the --config file's)."""

    model_config = SettingsConfigDict(env_prefix="LORAMUX_TRAIN_", extra="forbid")

    config: Path | None = Field(None, description="train.yaml with the run and its tasks")
    model: Path | None = Field(None, description="local HF checkpoint of the base "
                                                  "(default: embedded SmolLM2)")
    quantization: str | None = Field(None, description="nf4 (QLoRA, default), bf16 or none")
    compute_dtype: str | None = Field(None, description="auto (default: bf16 only where the "
                                                        "hardware has it), bf16, fp16, fp32")
    device: str | None = Field(None, description="auto, cpu or cuda")
    output_dir: Path | None = Field(None, description="adapters go to "
                                                      "<output-dir>/<tenant>/<version>/")
    steps: int | None = Field(None, description="optimizer steps in total, over all tasks")
    batch_size: int | None = Field(None, description="examples per micro-batch")
    grad_accum: int | None = Field(None, description="micro-batches per optimizer step")
    lr: float | None = Field(None, description="peak learning rate")
    warmup_steps: int | None = Field(None, description="linear warmup steps")
    schedule: str | None = Field(None, description="linear, cosine or constant")
    max_length: int | None = Field(None, description="truncate examples to this many tokens")
    padding_side: str | None = Field(None, description="right or left")
    seed: int | None = Field(None, description="seed for adapters, data order and task sampling")
    eval_every: int | None = Field(None, description="evaluate every N steps (0: only at the end)")
    eval_fraction: float | None = Field(None, description="fraction of each task held out for "
                                                          "eval")
    temperature: float | None = Field(None, description="task sampling temperature T")
    checkpoint_every: int | None = Field(None, description="checkpoint every N steps (0: never)")
    checkpoint_dir: Path | None = Field(None, description="default <output-dir>/.checkpoints")
    resume_from: Path | None = Field(None, description="checkpoint directory to resume from")
    gradient_checkpointing: bool = Field(
        False, description="trade compute for activation memory (default: the config's)")
    data: Path | None = Field(None, description="JSONL (text | prompt+completion | messages) "
                                                "or datasets dir")
    tenant: str | None = Field(None, description="tenant the adapter is for")
    version: str | None = Field(None, description="adapter version (default v1)")
    r: int | None = Field(None, description="LoRA rank")
    alpha: float | None = Field(None, description="LoRA alpha (default 2·r)")
    dropout: float | None = Field(None, description="LoRA dropout")
    target_modules: str | None = Field(None, description="comma-separated, e.g. q_proj,v_proj")
    progress: bool = Field(True, description="progress bar and table (--no-progress: none)")
    # A command run by hand: only warnings and errors unless asked.
    log_level: Literal["debug", "info", "warning", "error"] = "warning"


def config_from_settings(settings: TrainSettings):
    """The TrainConfig the settings describe (raises ConfigError)."""
    from loramux.training.config import ConfigError, build_config, load_config

    train: dict[str, Any] = {field: getattr(settings, name)
                             for name, field in _TRAIN_FIELDS.items()
                             if getattr(settings, name) not in (None, False)}
    task: dict[str, Any] = {field: getattr(settings, name)
                            for name, field in _TASK_FIELDS.items()
                            if getattr(settings, name) is not None}
    if "target_modules" in task:
        task["target_modules"] = [t.strip() for t in task["target_modules"].split(",") if t.strip()]
    if settings.config is not None:
        if task:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in _TASK_FIELDS
                              if getattr(settings, name) is not None)
            raise ConfigError(f"{flags}: task flags cannot be combined with --config; "
                              "put the task in the YAML file")
        return load_config(settings.config, overrides=train)
    if "data" not in task or "name" not in task:
        raise ConfigError("give --config train.yaml, or --data FILE and --tenant NAME")
    return build_config({**train, "tasks": [task]}, "flags")


def main(argv: list[str]) -> int:
    """Run ``loramux train``; returns the exit code (2 for bad input)."""
    from loramux.inference.adapters import AdapterRejected
    from loramux.inference.model_loader import ModelLoadError
    from loramux.logs import configure_logging
    from loramux.names import InvalidName
    from loramux.settings_cli import settings_from_cli
    from loramux.training.config import ConfigError
    from loramux.training.data import DatasetError
    from loramux.training.trainer import TrainingError, train

    # pydantic-settings spells the one-letter field as -r; --r (the documented flag) stays.
    argv = [part for arg in argv for part in (
        ["-r"] if arg == "--r" else ["-r", arg[4:]] if arg.startswith("--r=") else [arg])]
    try:
        settings = settings_from_cli(TrainSettings, argv, "loramux train")
    except SystemExit as exc:  # --help (0), or bad flags already explained (2)
        return exc.code if isinstance(exc.code, int) else 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        config = config_from_settings(settings)
        results = train(config, progress=settings.progress)
    except (ConfigError, DatasetError, TrainingError, ModelLoadError, InvalidName,
            AdapterRejected) as exc:
        print(f"loramux train: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loramux train: interrupted", file=sys.stderr)
        return 130
    for result in results:
        print(f"{result.name}@{result.version} {result.output} manifest sha256 "
              f"{result.manifest_sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
