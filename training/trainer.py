"""Training several tenants' LoRA adapters at once over one frozen (optionally NF4) base.

The base is loaded once, exactly as the server loads it, and every task gets its own LoRA
adapter inside one PeftModel. Each optimisation step draws a task (temperature sampling),
activates only that adapter and steps only that task's optimizer, so one tenant's step can
never move another tenant's weights: the isolation the server promises starts here. Each
adapter is exported as a version directory the server accepts as is: PEFT files directly in
``<output_dir>/<tenant>/<version>/``, the served base name in ``adapter_config.json``, and a
``manifest.json`` listing every file with its digest and the training data's digest.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from loramux.manifest import AdapterManifest, describe_files, write_manifest
from loramux.training.config import TrainConfig
from loramux.training.data import (
    DatasetError,
    Example,
    TaskData,
    collate,
    load_task_data,
    split_eval,
)
from loramux.training.sampling import TaskSampler, task_probabilities

log = logging.getLogger("loramux.training")

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says what to fix."""


@dataclass
class TaskResult:
    """What one task's training produced."""

    name: str
    version: str
    steps: int
    tokens: int
    eval_loss: float | None
    output: Path | None = None
    manifest_sha256: str | None = None


class _Batches:
    """An endless, seeded, checkpointable stream of shuffled batches from one task."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.pos = 0

    def next(self) -> list[Example]:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos >= len(self.order):
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
                self.pos = 0
            batch.append(self.examples[self.order[self.pos]])
            self.pos += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])
        self.pos = int(state["pos"])


def _lr_lambda(config: TrainConfig):
    """The schedule's multiplier by global step, from transformers.get_scheduler.

    Every task has its own optimizer but they share one clock: the global step. The
    scheduler is built once on a throwaway optimizer and only its lambda is used.
    """
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        name, optimizer=dummy, num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )
    return scheduler.lr_lambdas[0]


def adapter_name(task: str) -> str:
    """The adapter's name inside the PeftModel. A bare tenant name such as "a" or "lo"
    would be a substring of PEFT's "lora_" prefix, which PEFT warns can re-initialise
    weights on load, so every task's adapter is prefixed."""
    return f"task-{task}"


class MultiTaskTrainer:
    """One base, one PeftModel, one LoRA adapter and one optimizer per task."""

    def __init__(self, config: TrainConfig, base: Any | None = None) -> None:
        self.config = config
        self._check_outputs_free()
        # Fail on a missing data file now, not after the base model has loaded.
        for task in config.tasks:
            if not Path(task.data).exists():
                raise DatasetError(f"{task.data}: data file does not exist")
        torch.manual_seed(config.seed)
        if base is None:
            from loramux.inference.model_loader import load_base_model

            base = load_base_model(config.base_model, config.quantization, config.device,
                                   compute_dtype=config.compute_dtype)
        self.base = base
        self.tokenizer = base.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.data: dict[str, TaskData] = {}
        self.train_examples: dict[str, list[Example]] = {}
        self.eval_examples: dict[str, list[Example]] = {}
        for task in config.tasks:
            data = load_task_data(task.data, self.tokenizer, config.max_length)
            train, held = split_eval(data.examples, config.eval_fraction, config.seed)
            self.data[task.name] = data
            self.train_examples[task.name] = train
            self.eval_examples[task.name] = held
        self._check_targets()
        self.model = self._build_peft_model()
        self.params = {task.name: self._adapter_params(task.name) for task in config.tasks}
        self.optimizers = {
            name: torch.optim.AdamW(
                list(params.values()), lr=config.lr, weight_decay=config.weight_decay
            )
            for name, params in self.params.items()
        }
        self.lr_factor = _lr_lambda(config)
        probabilities = task_probabilities(
            {n: len(e) for n, e in self.train_examples.items()},
            config.temperature, {t.name: t.weight for t in config.tasks},
        )
        self.probabilities = probabilities
        self.sampler = TaskSampler(probabilities, config.seed)
        self.batches = {
            name: _Batches(examples, config.batch_size, config.seed + i + 1)
            for i, (name, examples) in enumerate(self.train_examples.items())
        }
        self.step = 0
        self.task_steps = dict.fromkeys(self.params, 0)
        self.task_tokens = dict.fromkeys(self.params, 0)
        self.running_loss: dict[str, float] = {}
        self.eval_loss: dict[str, float | None] = dict.fromkeys(self.params)
        if config.resume_from is not None:
            self.load_checkpoint(config.resume_from)

    # -- setup ------------------------------------------------------------------------------

    def _version_dir(self, name: str) -> Path:
        task = self.config.task(name)
        return self.config.output_dir / task.name / task.version

    def _check_outputs_free(self) -> None:
        for task in self.config.tasks:
            out = self.config.output_dir / task.name / task.version
            if out.exists() and any(out.iterdir()):
                raise TrainingError(
                    f"{out} already holds an adapter version; published versions are "
                    "immutable, so pick a new version or remove it"
                )

    def _check_targets(self) -> None:
        from loramux.inference.adapters import BaseFacts

        suffixes = BaseFacts.from_model(self.base.model, self.base.aliases).module_suffixes()
        suffixes.discard("lm_head")
        for task in self.config.tasks:
            missing = sorted(t for t in task.target_modules if t.rsplit(".", 1)[-1] not in suffixes)
            if missing:
                raise TrainingError(
                    f"task {task.name!r}: target modules {missing} do not exist in the base "
                    f"(its linear modules are {sorted(suffixes)})"
                )

    def _build_peft_model(self):
        from peft import LoraConfig, get_peft_model

        model = self.base.model
        if self.base.quantization == "nf4":
            # QLoRA: peft's k-bit preparation (fp32 norms, input grads for checkpointing)
            # works on CPU with bitsandbytes' CPU backend; if a build lacks it, training
            # still works without it, just with bf16 norms.
            from peft import prepare_model_for_kbit_training

            try:
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=self.config.gradient_checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                )
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                log.warning("skipping prepare_model_for_kbit_training: %s", exc)
        if self.config.gradient_checkpointing:
            # transformers 5 renamed it; the old name still works but warns.
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        peft_model = None
        for task in self.config.tasks:
            lora = LoraConfig(
                r=task.r, lora_alpha=task.lora_alpha, lora_dropout=task.dropout,
                target_modules=list(task.target_modules), bias="none", task_type="CAUSAL_LM",
            )
            if peft_model is None:
                peft_model = get_peft_model(model, lora, adapter_name=adapter_name(task.name))
            else:
                peft_model.add_adapter(adapter_name(task.name), lora)
        assert peft_model is not None
        return peft_model

    def _adapter_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        internal = adapter_name(name)

        def owned(param_name: str) -> bool:  # "...q_proj.lora_A.task-<name>.weight"
            parts = param_name.split(".")
            return any(a.startswith("lora_") and b == internal
                       for a, b in itertools.pairwise(parts))

        params = {n: p for n, p in self.model.named_parameters() if owned(n)}
        if not params:
            raise TrainingError(f"task {name!r}: no LoRA parameters were created")
        return params

    def activate(self, name: str) -> None:
        """Make ``name`` the only active adapter and the only trainable parameters."""
        self.model.set_adapter(adapter_name(name))
        for task, params in self.params.items():
            for p in params.values():
                p.requires_grad_(task == name)

    def _keep_4bit_trainable(self) -> None:
        """Keep bitsandbytes' 4-bit layers in training mode during eval.

        On CPU, a Linear4bit in eval mode repacks its weight, once and for good, into an
        inference layout whose kernel has no autograd; training after an eval would then
        backpropagate wrongly through the base. Their training flag changes nothing else.
        """
        if self.base.quantization != "nf4":
            return
        for module in self.model.modules():
            if type(module).__name__ == "Linear4bit" and hasattr(module.weight, "quant_state"):
                module.training = True

    # -- training ---------------------------------------------------------------------------

    def _loss(self, batch: list[Example]) -> torch.Tensor:
        tensors = {
            k: v.to(self.base.device)
            for k, v in collate(batch, self.pad_id, self.config.padding_side).items()
        }
        return self.model(**tensors).loss

    def train_step(self, name: str | None = None) -> tuple[str, float]:
        """One optimizer step (``grad_accum`` micro-batches) on ``name`` or a sampled task."""
        name = name or self.sampler.sample()
        self.activate(name)
        self.model.train()
        optimizer = self.optimizers[name]
        for group in optimizer.param_groups:
            group["lr"] = self.config.lr * self.lr_factor(self.step)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(self.config.grad_accum):
            batch = self.batches[name].next()
            loss = self._loss(batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"task {name!r}: loss became {loss.item()} at step {self.step}")
            (loss / self.config.grad_accum).backward()
            total += loss.item()
            self.task_tokens[name] += sum(e.loss_tokens for e in batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.task_steps[name] += 1
        loss_value = total / self.config.grad_accum
        previous = self.running_loss.get(name)
        smoothed = loss_value if previous is None else 0.9 * previous + 0.1 * loss_value
        self.running_loss[name] = smoothed
        return name, loss_value

    @torch.no_grad()
    def evaluate(self, name: str, examples: list[Example] | None = None) -> float | None:
        """Mean per-token loss of adapter ``name`` on its held-out examples."""
        examples = self.eval_examples[name] if examples is None else examples
        if not examples:
            return None
        self.activate(name)
        self.model.eval()
        self._keep_4bit_trainable()
        size = self.config.batch_size
        total, tokens = 0.0, 0
        for start in range(0, min(len(examples), size * self.config.eval_batches), size):
            batch = examples[start:start + size]
            # HF's loss is a mean over the batch's shifted label tokens; weight it back.
            count = sum(max(sum(1 for x in e.labels[1:] if x != -100), 0) for e in batch)
            if count == 0:
                continue
            total += self._loss(batch).item() * count
            tokens += count
        self.model.train()
        return total / tokens if tokens else None

    def evaluate_all(self) -> dict[str, float | None]:
        for name in self.params:
            self.eval_loss[name] = self.evaluate(name)
        return dict(self.eval_loss)

    def run(self, progress: bool = True) -> list[TaskResult]:
        """Train to ``config.steps``, evaluating and checkpointing as configured; export."""
        from tqdm import tqdm

        config = self.config
        bar = tqdm(total=config.steps, initial=self.step, disable=not progress,
                   desc="training", unit="step", dynamic_ncols=True)
        with contextlib.closing(bar):
            while self.step < config.steps:
                self.train_step()
                bar.update(1)
                bar.set_postfix({n: f"{v:.3f}" for n, v in self.running_loss.items()})
                if config.eval_every and self.step % config.eval_every == 0:
                    self.evaluate_all()
                    bar.write(f"step {self.step} eval: " + ", ".join(
                        f"{n}={v:.4f}" for n, v in self.eval_loss.items() if v is not None))
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint(config.checkpoints / f"step-{self.step}")
        self.evaluate_all()
        return self.export()

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, directory: Path) -> Path:
        """Adapter weights, optimizer states and every RNG: enough to resume exactly."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "task_steps": dict(self.task_steps),
            "task_tokens": dict(self.task_tokens),
            "running_loss": dict(self.running_loss),
            "adapters": {
                name: {n: p.detach().cpu().clone() for n, p in params.items()}
                for name, params in self.params.items()
            },
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "sampler": self.sampler.state_dict(),
            "batches": {n: b.state_dict() for n, b in self.batches.items()},
            "torch_rng": torch.get_rng_state(),
        }
        tmp = directory / f".{CHECKPOINT_FILE}.tmp"
        torch.save(state, tmp)
        tmp.replace(directory / CHECKPOINT_FILE)
        return directory

    def load_checkpoint(self, directory: Path) -> None:
        path = Path(directory)
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        if not path.is_file():
            raise TrainingError(f"resume_from: no checkpoint at {path}")
        try:
            # Only tensors and plain containers: refuse anything that would run code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise TrainingError(f"resume_from: {path} cannot be read: {exc}") from exc
        if set(state.get("adapters", {})) != set(self.params):
            raise TrainingError(
                f"resume_from: checkpoint has tasks {sorted(state.get('adapters', {}))}, "
                f"this run has {sorted(self.params)}"
            )
        with torch.no_grad():
            for name, params in self.params.items():
                saved = state["adapters"][name]
                if set(saved) != set(params):
                    raise TrainingError(
                        f"resume_from: task {name!r} LoRA shape differs from the checkpoint"
                    )
                for n, p in params.items():
                    p.copy_(saved[n])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.sampler.load_state_dict(state["sampler"])
        for name, batches in self.batches.items():
            batches.load_state_dict(state["batches"][name])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.task_steps.update(state["task_steps"])
        self.task_tokens.update(state["task_tokens"])
        self.running_loss.update(state["running_loss"])

    # -- export -----------------------------------------------------------------------------

    def export(self) -> list[TaskResult]:
        """Write every adapter as ``<output_dir>/<tenant>/<version>/`` with its manifest."""
        results = []
        for task in self.config.tasks:
            if self.task_steps[task.name] == 0:
                log.warning("task %s was never sampled; its adapter is untrained (a no-op)",
                            task.name)
            out = self._version_dir(task.name)
            sha = self.export_adapter(task.name, out)
            results.append(TaskResult(
                task.name, task.version, self.task_steps[task.name],
                self.task_tokens[task.name], self.eval_loss.get(task.name), out, sha,
            ))
        return results

    def export_adapter(self, name: str, out: Path) -> str:
        task = self.config.task(name)
        served = self.base.aliases[0]
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
        try:
            internal = adapter_name(name)
            self.model.save_pretrained(staging, selected_adapters=[internal])
            # PEFT writes a non-"default" adapter into a subfolder named after it.
            source = staging / internal if (staging / internal).is_dir() else staging
            for file in source.iterdir():
                if file.is_file():
                    shutil.move(str(file), out / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        config_path = out / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = served
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        manifest = AdapterManifest(
            tenant=task.name, version=task.version, base_model=served, rank=task.r,
            lora_alpha=task.lora_alpha, target_modules=list(task.target_modules),
            files=describe_files(out), training_data_sha256=self.data[name].sha256,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return write_manifest(out, manifest)


def summary_table(results: list[TaskResult]):
    """A rich table: task, steps, tokens, eval loss, where the adapter went."""
    from rich.table import Table

    table = Table(title="loramux train")
    for column in ("task", "version", "steps", "tokens", "eval loss", "output"):
        table.add_column(column, justify="right" if column in ("steps", "tokens") else "left")
    for r in results:
        loss = "-" if r.eval_loss is None or math.isnan(r.eval_loss) else f"{r.eval_loss:.4f}"
        table.add_row(r.name, r.version, str(r.steps), str(r.tokens), loss, str(r.output or "-"))
    return table


def train(config: TrainConfig, progress: bool = True, base: Any | None = None) -> list[TaskResult]:
    """Train every task in ``config`` and export the adapters; print a summary table."""
    trainer = MultiTaskTrainer(config, base=base)
    results = trainer.run(progress=progress)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(summary_table(results))
    return results
