"""``loramux train``: train tenants' adapters from ``--config train.yaml`` or, for one task,
from flags.

Bad input (a missing file, a malformed record, an unknown field or target module) is
reported as one clear message and exit code 2, never as a traceback: the person running
this is preparing a tenant's data, not debugging loramux.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Flags that set TrainConfig fields, with or without --config (with it, they override).
_TRAIN_FLAGS: dict[str, tuple[str, type | None, str]] = {
    "model": ("base_model", Path, "local HF checkpoint of the base (default: embedded SmolLM2)"),
    "quantization": ("quantization", str, "nf4 (QLoRA, default), bf16 or none"),
    "compute_dtype": ("compute_dtype", str,
                      "auto (default: bf16 only where the hardware has it), bf16, fp16, fp32"),
    "device": ("device", str, "auto, cpu or cuda"),
    "output_dir": ("output_dir", Path, "adapters go to <output-dir>/<tenant>/<version>/"),
    "steps": ("steps", int, "optimizer steps in total, over all tasks"),
    "batch_size": ("batch_size", int, "examples per micro-batch"),
    "grad_accum": ("grad_accum", int, "micro-batches per optimizer step"),
    "lr": ("lr", float, "peak learning rate"),
    "warmup_steps": ("warmup_steps", int, "linear warmup steps"),
    "schedule": ("schedule", str, "linear, cosine or constant"),
    "max_length": ("max_length", int, "truncate examples to this many tokens"),
    "padding_side": ("padding_side", str, "right or left"),
    "seed": ("seed", int, "seed for adapters, data order and task sampling"),
    "eval_every": ("eval_every", int, "evaluate every N steps (0: only at the end)"),
    "eval_fraction": ("eval_fraction", float, "fraction of each task held out for eval"),
    "temperature": ("temperature", float, "task sampling temperature T"),
    "checkpoint_every": ("checkpoint_every", int, "checkpoint every N steps (0: never)"),
    "checkpoint_dir": ("checkpoint_dir", Path, "default <output-dir>/.checkpoints"),
    "resume_from": ("resume_from", Path, "checkpoint directory to resume from"),
}
# Flags that describe the single task when there is no --config.
_TASK_FLAGS: dict[str, tuple[str, type, str]] = {
    "data": ("data", Path, "JSONL (text | prompt+completion | messages) or datasets dir"),
    "tenant": ("name", str, "tenant the adapter is for"),
    "version": ("version", str, "adapter version (default v1)"),
    "r": ("r", int, "LoRA rank"),
    "alpha": ("alpha", float, "LoRA alpha (default 2·r)"),
    "dropout": ("dropout", float, "LoRA dropout"),
    "target_modules": ("target_modules", str, "comma-separated, e.g. q_proj,v_proj"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; we return 2
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loramux train", description="Train tenants' LoRA adapters.")
    parser.add_argument("--config", type=Path, help="train.yaml with the run and its tasks")
    for flag, (_, kind, help_text) in {**_TRAIN_FLAGS, **_TASK_FLAGS}.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help=help_text)
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None,
                        help="trade compute for activation memory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or table")
    return parser


def config_from_args(args: argparse.Namespace):
    """The TrainConfig the parsed flags describe (raises ConfigError)."""
    from loramux.training.config import ConfigError, build_config, load_config

    train: dict[str, Any] = {
        field: getattr(args, flag)
        for flag, (field, _, _) in _TRAIN_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if args.gradient_checkpointing:
        train["gradient_checkpointing"] = True
    task: dict[str, Any] = {
        field: getattr(args, flag)
        for flag, (field, _, _) in _TASK_FLAGS.items()
        if getattr(args, flag) is not None
    }
    if "target_modules" in task:
        task["target_modules"] = [t.strip() for t in task["target_modules"].split(",") if t.strip()]
    if args.config is not None:
        if task:
            flags = ", ".join(f"--{f.replace('_', '-')}" for f in _TASK_FLAGS if
                              getattr(args, f) is not None)
            raise ConfigError(f"{flags}: task flags cannot be combined with --config; "
                              "put the task in the YAML file")
        return load_config(args.config, overrides=train)
    if "data" not in task or "name" not in task:
        raise ConfigError("give --config train.yaml, or --data FILE and --tenant NAME")
    return build_config({**train, "tasks": [task]}, "flags")


def main(argv: list[str]) -> int:
    """Run ``loramux train``; returns the exit code (2 for bad input)."""
    from loramux.inference.adapters import AdapterRejected
    from loramux.inference.model_loader import ModelLoadError
    from loramux.names import InvalidName
    from loramux.training.config import ConfigError
    from loramux.training.data import DatasetError
    from loramux.training.trainer import TrainingError, train

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"loramux train: {exc} (see 'loramux train --help')", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        config = config_from_args(args)
        results = train(config, progress=not args.no_progress)
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
