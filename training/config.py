"""What a training run is: one frozen base, several tenants' adapter tasks, typed and checked.

A run is described by ``train.yaml`` (or, for one task, by CLI flags). Everything is
validated before a model is loaded: an unknown field or a typo'd option is an error naming
it, not a silently ignored setting an hour into training. Relative data and output paths in
a YAML file are taken relative to that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loramux.names import TenantName, VersionName

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message says which field and why."""


class TaskConfig(BaseModel):
    """One tenant's adapter: its data and its LoRA shape."""

    model_config = ConfigDict(extra="forbid")

    name: TenantName = Field(description="the tenant this adapter is for")
    version: VersionName = "v1"
    data: Path
    r: int = Field(8, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="lora_alpha; defaults to 2·r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    weight: float = Field(1.0, gt=0, description="multiplies the task's sampling probability")

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class TrainConfig(BaseModel):
    """The whole run: the base model, the optimisation, and the tasks."""

    model_config = ConfigDict(extra="forbid")

    base_model: Path | None = Field(None, description="local HF checkpoint; None = embedded")
    quantization: Literal["nf4", "bf16", "none"] = "nf4"
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="NF4 compute dtype; auto = bf16 where the CPU/GPU has it natively, "
        "else fp32 (CPU) or fp16 (CUDA)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: Path = Path("adapters")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_length: int = Field(512, ge=2)
    padding_side: Literal["right", "left"] = "right"
    gradient_checkpointing: bool = False
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="0 = evaluate only at the end")
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    eval_batches: int = Field(8, ge=1, description="at most this many eval batches per task")
    temperature: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="0 = no checkpoints")
    checkpoint_dir: Path | None = Field(None, description="default <output_dir>/.checkpoints")
    resume_from: Path | None = None
    tasks: list[TaskConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_tasks(self) -> TrainConfig:
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise ValueError(f"task {task.name!r} appears twice; train one version per run")
            seen.add(task.name)
        return self

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.output_dir / ".checkpoints"

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise ConfigError(f"unknown task {name!r}; tasks are {[t.name for t in self.tasks]}")


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {loc}: {message}")
    return f"{source} is invalid:\n" + "\n".join(lines)


def build_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a plain dict into a TrainConfig, or raise ConfigError listing every problem."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def _rebase(value: Any, root: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str(root / value)
    return value


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read ``train.yaml``; relative paths in it are relative to the file's directory."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of settings with a 'tasks' list")
    root = path.parent
    for key in ("base_model", "output_dir", "checkpoint_dir", "resume_from"):
        if key in data:
            data[key] = _rebase(data[key], root)
    tasks = data.get("tasks")
    if isinstance(tasks, list):
        for task in tasks:
            if isinstance(task, dict) and "data" in task:
                task["data"] = _rebase(task["data"], root)
    data.update(overrides or {})
    return build_config(data, str(path))
