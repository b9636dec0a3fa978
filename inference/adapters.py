"""Reading a PEFT LoRA adapter from disk, validated before any of it touches the model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Every
check runs here, in a loader thread, and a failure names its reason precisely, so a bad
adapter fails alone and never reaches the engine.

A read records a :class:`DiskStamp` of the directory (each file's inode, size and mtime, and
the manifest's digest). The cache reads a version again from disk after dropping its host
copy; that read must find the files it validated the first time (``expect``), else the
version fails with ``changed_on_disk`` (or ``missing_files``), alone. Files that were
rewritten but still match an unchanged ``manifest.json`` pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("loramux.adapters")

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MANIFEST_FILE = "manifest.json"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")


class AdapterRejected(ValueError):
    """An adapter failed validation. ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseFacts:
    """What adapters are checked against: the served base's names and its linear layers."""

    aliases: tuple[str, ...]
    linear_modules: dict[str, LinearShape]

    @classmethod
    def from_model(cls, model: torch.nn.Module, aliases: tuple[str, ...]) -> BaseFacts:
        linear: dict[str, LinearShape] = {}
        for name, module in model.named_modules():
            # Linear, bitsandbytes Linear4bit and friends all carry in/out_features.
            in_f = getattr(module, "in_features", None)
            out_f = getattr(module, "out_features", None)
            if isinstance(in_f, int) and isinstance(out_f, int) and name:
                linear[name] = LinearShape(in_f, out_f)
        return cls(tuple(aliases), linear)

    def module_suffixes(self) -> set[str]:
        return {name.rsplit(".", 1)[-1] for name in self.linear_modules}

    def accepts_base(self, claimed: str) -> bool:
        claimed = claimed.rstrip("/")
        names = {a.rstrip("/") for a in self.aliases}
        basenames = {n.rsplit("/", 1)[-1] for n in names}
        return claimed in names or claimed.rsplit("/", 1)[-1] in basenames


@dataclass(frozen=True)
class DiskStamp:
    """An adapter directory's files as read: (relative path, inode, size, mtime ns) each,
    and the sha256 of its ``manifest.json`` (None without one)."""

    files: tuple[tuple[str, int, int, int], ...]
    manifest_sha256: str | None

    @classmethod
    def of(cls, path: Path) -> DiskStamp:
        files: list[tuple[str, int, int, int]] = []
        for root, _, names in os.walk(path):
            for name in names:
                full = Path(root) / name
                try:
                    st = full.stat()
                except OSError:
                    continue  # vanished under us: it is missing from the stamp
                files.append((full.relative_to(path).as_posix(), st.st_ino, st.st_size,
                              st.st_mtime_ns))
        try:
            digest: str | None = hashlib.sha256((path / MANIFEST_FILE).read_bytes()).hexdigest()
        except OSError:
            digest = None
        return cls(tuple(sorted(files)), digest)

    def differences(self, other: DiskStamp) -> list[str]:
        """What changed from ``self`` (the first read) to ``other`` (now), by file."""
        before = {f[0]: f[1:] for f in self.files}
        after = {f[0]: f[1:] for f in other.files}
        changed = [f"{name}: deleted" for name in sorted(before.keys() - after.keys())]
        changed += [f"{name}: added" for name in sorted(after.keys() - before.keys())]
        changed += [f"{name}: replaced or modified" for name in sorted(before.keys() & after.keys())
                    if before[name] != after[name]]
        return changed


def _check_unchanged(path: Path, expect: DiskStamp, now: DiskStamp) -> None:
    """Refuse a re-read of ``path`` whose files are not those read the first time."""
    if now == expect:
        return
    if not path.is_dir():
        raise AdapterRejected("missing_files", f"adapter directory {path} was deleted after it "
                                               "was first loaded")
    changes = expect.differences(now) or ["manifest.json rewritten"]
    if expect.manifest_sha256 is not None and now.manifest_sha256 == expect.manifest_sha256:
        # Same manifest: files rewritten with the same content (a re-download) still pass.
        from loramux.manifest import AdapterManifest, verify_directory

        try:
            manifest = AdapterManifest.from_json((path / MANIFEST_FILE).read_bytes())
            problems = verify_directory(path, manifest)
        except (OSError, ValueError) as exc:
            problems = [str(exc)]
        if not problems:
            return
        changes = problems
    raise AdapterRejected(
        "changed_on_disk",
        f"adapter files in {path} changed on disk since they were first loaded and validated "
        f"({'; '.join(changes[:5])}); load it again (PUT) or publish a new version",
    )


@dataclass
class HostAdapter:
    """A validated adapter held in host memory: its PEFT config and its LoRA tensors."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: list[str]
    nbytes: int
    modules: set[str] = field(default_factory=set)
    stamp: DiskStamp | None = None  # the directory as it was read

    def peft_config(self):  # -> peft.LoraConfig
        from peft import LoraConfig

        known = set(LoraConfig.__dataclass_fields__)
        kwargs = {k: v for k, v in self.config.items() if k in known}
        kwargs["inference_mode"] = True
        return LoraConfig(**kwargs)


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterRejected("missing_files", f"{CONFIG_FILE} not found in {path}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected("bad_config", f"{CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterRejected("bad_config", f"{CONFIG_FILE} must hold a JSON object")
    return config


def _check_config(config: dict, base: BaseFacts, max_rank: int) -> tuple[int, float, list[str]]:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterRejected("unsupported", f"peft_type {peft_type or None!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterRejected("unsupported", "DoRA adapters cannot be batched per request")
    if config.get("modules_to_save"):
        raise AdapterRejected(
            "unsupported",
            "modules_to_save replaces whole base modules, which cannot be shared across tenants",
        )
    if config.get("bias", "none") != "none":
        raise AdapterRejected("unsupported", "adapters that train base biases cannot be isolated")
    claimed = config.get("base_model_name_or_path")
    if claimed and not base.accepts_base(str(claimed)):
        raise AdapterRejected(
            "wrong_base",
            f"adapter was trained for base {claimed!r}; this server serves {base.aliases[0]!r}",
        )
    if not claimed:
        log.warning("adapter names no base model; relying on shape checks")
    try:
        rank = int(config.get("r", 0))
        alpha = float(config.get("lora_alpha", rank))
    except (TypeError, ValueError) as exc:
        raise AdapterRejected("bad_config", f"r and lora_alpha must be numbers: {exc}") from exc
    ranks = [rank, *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    if min(ranks) < 1:
        raise AdapterRejected("bad_config", f"rank must be at least 1, got {min(ranks)}")
    if max(ranks) > max_rank:
        raise AdapterRejected(
            "rank_too_high", f"rank {max(ranks)} exceeds this server's maximum of {max_rank}"
        )
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as exc:
            raise AdapterRejected("bad_config", f"target_modules regex is invalid: {exc}") from exc
        if not any(pattern.fullmatch(name) for name in base.linear_modules):
            raise AdapterRejected(
                "unknown_target_module", f"target_modules {targets!r} matches no base module"
            )
        target_list = [targets]
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        suffixes = base.module_suffixes()
        missing = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in suffixes)
        if missing:
            raise AdapterRejected(
                "unknown_target_module",
                f"target modules {missing} do not exist in the base "
                f"(it has {sorted(suffixes)})",
            )
        target_list = list(targets)
    else:
        raise AdapterRejected("bad_config", "target_modules must be a non-empty list or a regex")
    return rank, alpha, target_list


def _load_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st_path = path / SAFETENSORS_FILE
    if st_path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st_path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterRejected(
                "corrupt_weights",
                f"{SAFETENSORS_FILE} cannot be read (truncated or corrupt): {exc}",
            ) from exc
    if (path / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise AdapterRejected(
                "pickle_refused",
                f"{PICKLE_FILE} is a pickle, which can run code when loaded; convert it to "
                "safetensors (or start the server with --allow-pickle-adapters)",
            )
        try:
            # weights_only refuses arbitrary objects even when pickles are allowed.
            state = torch.load(path / PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise AdapterRejected(
                "corrupt_weights", f"{PICKLE_FILE} cannot be read: {exc}"
            ) from exc
        if not isinstance(state, dict):
            raise AdapterRejected("corrupt_weights", f"{PICKLE_FILE} does not hold a state dict")
        return state
    raise AdapterRejected("missing_files", f"{SAFETENSORS_FILE} not found in {path}")


def _check_tensors(
    tensors: dict[str, torch.Tensor], base: BaseFacts, max_rank: int
) -> set[str]:
    if not tensors:
        raise AdapterRejected("corrupt_weights", "the adapter holds no tensors")
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stripped = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.fullmatch(stripped)
        if not match:
            raise AdapterRejected("unsupported", f"tensor {key!r} is not a LoRA A/B weight")
        module = match["module"]
        if module not in base.linear_modules:
            raise AdapterRejected(
                "unknown_target_module", f"tensor {key!r} targets {module!r}, not in the base"
            )
        if not tensor.is_floating_point():
            raise AdapterRejected("corrupt_weights", f"tensor {key!r} is not floating point")
        if not torch.isfinite(tensor).all():
            raise AdapterRejected("corrupt_weights", f"tensor {key!r} holds NaN or Inf")
        seen.setdefault(module, {})[match["kind"]] = tensor
    for module, pair in seen.items():
        shape = base.linear_modules[module]
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterRejected("shape_mismatch", f"{module} lacks its lora_A or lora_B weight")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterRejected("shape_mismatch", f"{module} LoRA weights must be matrices")
        r = a.shape[0]
        if r > max_rank:
            raise AdapterRejected(
                "rank_too_high", f"{module} has rank {r}, above this server's maximum {max_rank}"
            )
        expected_a, expected_b = (r, shape.in_features), (shape.out_features, r)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise AdapterRejected(
                "shape_mismatch",
                f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"base layer ({shape.in_features} -> {shape.out_features}); expected "
                f"{expected_a} / {expected_b}",
            )
    return set(seen)


def read_adapter(
    path: Path, base: BaseFacts, max_rank: int, allow_pickle: bool = False,
    expect: DiskStamp | None = None,
) -> HostAdapter:
    """Read and validate an adapter directory into host memory, or raise AdapterRejected.
    ``expect``: the stamp of an earlier read; the files must still be those."""
    path = Path(path)
    before = DiskStamp.of(path)
    if expect is not None:
        _check_unchanged(path, expect, before)
    if not path.is_dir():
        raise AdapterRejected("missing_files", f"adapter directory {path} does not exist")
    config = _read_config(path)
    rank, alpha, targets = _check_config(config, base, max_rank)
    tensors = _load_tensors(path, allow_pickle)
    modules = _check_tensors(tensors, base, max_rank)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    after = DiskStamp.of(path)
    if after != before:
        raise AdapterRejected(
            "changed_on_disk",
            f"adapter files in {path} changed while they were being read "
            f"({'; '.join(before.differences(after)[:5])}); load it again once they are "
            "complete",
        )
    return HostAdapter(path, config, tensors, rank, alpha, targets, nbytes, modules,
                       stamp=before)
