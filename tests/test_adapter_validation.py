"""`read_adapter` rejects each kind of bad adapter with its precise code and a clear message.

These are unit tests against the facts of the real tiny base model (no server process). The
builders at the top are shared with ``test_http_errors.py``, which sends the same bad adapters
through the admin API.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factories import make_adapter
from loramux.inference.adapters import (
    CONFIG_FILE,
    PICKLE_FILE,
    SAFETENSORS_FILE,
    AdapterRejected,
    BaseFacts,
    read_adapter,
)

MAX_RANK = 64
OTHER_BASE = "meta-llama/Llama-2-7b-hf"


# ---------------------------------------------------------------------- builders (shared)
def edit_config(adapter_dir: Path, **changes: object) -> Path:
    """Rewrite keys of ``adapter_config.json`` in place."""
    path = adapter_dir / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return adapter_dir


def to_pickle(adapter_dir: Path) -> Path:
    """Replace the safetensors weights by a torch.save()d state dict (adapter_model.bin)."""
    st_path = adapter_dir / SAFETENSORS_FILE
    torch.save(load_file(str(st_path)), adapter_dir / PICKLE_FILE)
    st_path.unlink()
    return adapter_dir


def truncate_weights(adapter_dir: Path) -> Path:
    """Cut ``adapter_model.safetensors`` in half, as an interrupted copy would."""
    st_path = adapter_dir / SAFETENSORS_FILE
    data = st_path.read_bytes()
    st_path.write_bytes(data[: len(data) // 2])
    return adapter_dir


def make_narrow_model(out: Path, hidden_size: int = 32) -> Path:
    """A random tiny Llama whose layers are narrower than the served tiny model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=512, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_bad_adapters(base_dir: Path, root: Path) -> dict[str, Path]:
    """One adapter directory per rejection reason, all made for ``base_dir`` unless noted."""
    def fresh(name: str, rank: int = 4, targets: list[str] | None = None) -> Path:
        return make_adapter(base_dir, root / name, rank=rank,
                            targets=targets or ["q_proj", "v_proj"], seed=7)

    good = fresh("good")
    bad: dict[str, Path] = {"good": good}
    bad["wrong_base"] = edit_config(fresh("wrong-base"), base_model_name_or_path=OTHER_BASE)
    bad["rank16"] = fresh("rank16", rank=16)
    bad["pickle"] = to_pickle(shutil.copytree(good, root / "pickle"))
    bad["truncated"] = truncate_weights(shutil.copytree(good, root / "truncated"))
    bad["unknown_target"] = edit_config(shutil.copytree(good, root / "unknown-target"),
                                        target_modules=["nonexistent_proj"])
    narrow = make_narrow_model(root / "narrow-base")
    bad["shape"] = make_adapter(narrow, root / "shape", rank=4, targets=["q_proj", "v_proj"],
                                seed=7, base_name=str(base_dir))
    bad["dora"] = edit_config(shutil.copytree(good, root / "dora"), use_dora=True)
    bad["not_lora"] = edit_config(shutil.copytree(good, root / "ia3"), peft_type="IA3")
    no_config = shutil.copytree(good, root / "no-config")
    (no_config / CONFIG_FILE).unlink()
    bad["no_config"] = no_config
    no_weights = shutil.copytree(good, root / "no-weights")
    (no_weights / SAFETENSORS_FILE).unlink()
    bad["no_weights"] = no_weights
    return bad


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_facts(tiny_model_dir: Path) -> BaseFacts:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # The aliases the server derives for a --model directory (see model_loader).
    return BaseFacts.from_model(model, (tiny_model_dir.name, str(tiny_model_dir)))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    return build_bad_adapters(tiny_model_dir, tmp_path_factory.mktemp("bad-adapters"))


def _rejected(path: Path, facts: BaseFacts, max_rank: int = MAX_RANK,
              allow_pickle: bool = False) -> AdapterRejected:
    with pytest.raises(AdapterRejected) as info:
        read_adapter(path, facts, max_rank, allow_pickle)
    return info.value


def _expected_bytes(facts: BaseFacts, rank: int, targets: list[str]) -> int:
    """fp32 bytes of lora_A [r, in] + lora_B [out, r] over every targeted base layer."""
    shapes = [s for name, s in facts.linear_modules.items() if name.rsplit(".", 1)[-1] in targets]
    assert shapes
    return sum(4 * rank * (s.in_features + s.out_features) for s in shapes)


# ---------------------------------------------------------------------- the good case
def test_valid_adapter_loads_with_its_rank_targets_and_exact_byte_count(adapters, base_facts):
    host = read_adapter(adapters["good"], base_facts, MAX_RANK)
    assert host.rank == 4
    assert host.alpha == 4.0
    assert sorted(host.target_modules) == ["q_proj", "v_proj"]
    assert host.nbytes == _expected_bytes(base_facts, 4, ["q_proj", "v_proj"])
    assert host.nbytes == sum(t.numel() * t.element_size() for t in host.tensors.values())
    # One module per targeted layer: 2 layers x (q_proj, v_proj).
    assert len(host.modules) == 4
    assert all(m.endswith(("q_proj", "v_proj")) for m in host.modules)


def test_adapter_at_exactly_the_rank_limit_is_accepted(adapters, base_facts):
    assert read_adapter(adapters["rank16"], base_facts, max_rank=16).rank == 16


# ---------------------------------------------------------------------- rejections
def test_adapter_for_another_base_model_is_rejected_as_wrong_base(adapters, base_facts):
    exc = _rejected(adapters["wrong_base"], base_facts)
    assert exc.code == "wrong_base"
    assert OTHER_BASE in exc.message
    assert "tiny-llama" in exc.message  # and it names the base this server serves


def test_rank_above_the_server_maximum_is_rejected_as_rank_too_high(adapters, base_facts):
    exc = _rejected(adapters["rank16"], base_facts, max_rank=8)
    assert exc.code == "rank_too_high"
    assert "16" in exc.message and "8" in exc.message


def test_pickle_weights_are_refused_by_default(adapters, base_facts):
    exc = _rejected(adapters["pickle"], base_facts)
    assert exc.code == "pickle_refused"
    assert PICKLE_FILE in exc.message and "pickle" in exc.message


def test_pickle_weights_load_when_pickles_are_allowed_and_match_the_safetensors(
        adapters, base_facts):
    from_pickle = read_adapter(adapters["pickle"], base_facts, MAX_RANK, allow_pickle=True)
    from_st = read_adapter(adapters["good"], base_facts, MAX_RANK)
    assert from_pickle.rank == from_st.rank == 4
    assert from_pickle.nbytes == from_st.nbytes
    assert from_pickle.tensors.keys() == from_st.tensors.keys()
    for key, tensor in from_st.tensors.items():
        assert torch.equal(from_pickle.tensors[key], tensor)


def test_pickle_holding_arbitrary_objects_is_refused_even_when_pickles_are_allowed(
        adapters, base_facts, tmp_path):
    evil = shutil.copytree(adapters["pickle"], tmp_path / "evil")
    # weights_only=True loading refuses classes outside torch's allow-list.
    torch.save({"payload": _NotATensor()}, evil / PICKLE_FILE)
    exc = _rejected(evil, base_facts, allow_pickle=True)
    assert exc.code == "corrupt_weights"
    assert PICKLE_FILE in exc.message


class _NotATensor:
    pass


def test_truncated_safetensors_is_rejected_as_corrupt_weights(adapters, base_facts):
    exc = _rejected(adapters["truncated"], base_facts)
    assert exc.code == "corrupt_weights"
    assert SAFETENSORS_FILE in exc.message and "truncated" in exc.message


def test_target_module_absent_from_the_base_is_rejected_as_unknown_target_module(
        adapters, base_facts):
    exc = _rejected(adapters["unknown_target"], base_facts)
    assert exc.code == "unknown_target_module"
    assert "nonexistent_proj" in exc.message
    assert "q_proj" in exc.message  # it lists what the base does have


def test_tensors_shaped_for_a_narrower_model_are_rejected_as_shape_mismatch(
        adapters, base_facts):
    # The config claims the right base; only the tensor shapes give the adapter away.
    exc = _rejected(adapters["shape"], base_facts)
    assert exc.code == "shape_mismatch"
    assert "lora_A (4, 32)" in exc.message
    assert "64 ->" in exc.message and "expected (4, 64)" in exc.message


def test_missing_adapter_config_is_rejected_as_missing_files(adapters, base_facts):
    exc = _rejected(adapters["no_config"], base_facts)
    assert exc.code == "missing_files"
    assert CONFIG_FILE in exc.message


def test_missing_weights_file_is_rejected_as_missing_files(adapters, base_facts):
    exc = _rejected(adapters["no_weights"], base_facts)
    assert exc.code == "missing_files"
    assert SAFETENSORS_FILE in exc.message


def test_missing_adapter_directory_is_rejected_as_missing_files(base_facts, tmp_path):
    exc = _rejected(tmp_path / "nowhere", base_facts)
    assert exc.code == "missing_files"
    assert "does not exist" in exc.message


def test_dora_adapter_is_rejected_as_unsupported(adapters, base_facts):
    exc = _rejected(adapters["dora"], base_facts)
    assert exc.code == "unsupported"
    assert "DoRA" in exc.message


def test_non_lora_peft_type_is_rejected_as_unsupported(adapters, base_facts):
    exc = _rejected(adapters["not_lora"], base_facts)
    assert exc.code == "unsupported"
    assert "IA3" in exc.message and "LORA" in exc.message


@pytest.mark.parametrize(("changes", "code", "words"), [
    ({"modules_to_save": ["lm_head"]}, "unsupported", "modules_to_save"),
    ({"bias": "all"}, "unsupported", "biases"),
    ({"r": 0}, "bad_config", "at least 1"),
    ({"r": "many"}, "bad_config", "must be numbers"),
    ({"target_modules": []}, "bad_config", "target_modules"),
    ({"target_modules": r".*\.nonexistent_proj"}, "unknown_target_module", "matches no"),
    ({"target_modules": "(unclosed"}, "bad_config", "regex is invalid"),
])
def test_bad_config_values_are_rejected_with_their_reason(adapters, base_facts, tmp_path,
                                                          changes, code, words):
    adapter = edit_config(shutil.copytree(adapters["good"], tmp_path / "a"), **changes)
    exc = _rejected(adapter, base_facts)
    assert exc.code == code
    assert words in exc.message


def test_config_that_is_not_json_is_rejected_as_bad_config(adapters, base_facts, tmp_path):
    adapter = shutil.copytree(adapters["good"], tmp_path / "a")
    (adapter / CONFIG_FILE).write_text("{not json")
    exc = _rejected(adapter, base_facts)
    assert exc.code == "bad_config"
    assert "not valid JSON" in exc.message


def test_weights_holding_nan_are_rejected_as_corrupt_weights(adapters, base_facts, tmp_path):
    from safetensors.torch import save_file

    adapter = shutil.copytree(adapters["good"], tmp_path / "a")
    tensors = load_file(str(adapter / SAFETENSORS_FILE))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(adapter / SAFETENSORS_FILE))
    exc = _rejected(adapter, base_facts)
    assert exc.code == "corrupt_weights"
    assert first in exc.message and "NaN" in exc.message


# ---------------------------------------------------------------------- re-reads
def test_a_re_read_must_find_the_files_of_the_first_read(adapters, base_facts, tmp_path):
    import os

    path = shutil.copytree(adapters["good"], tmp_path / "good")
    first = read_adapter(path, base_facts, MAX_RANK)
    assert first.stamp is not None and first.stamp.manifest_sha256 is None
    # Unchanged: the same files pass.
    assert read_adapter(path, base_facts, MAX_RANK, expect=first.stamp).stamp == first.stamp
    # A file whose mtime moved (rewritten, even with the same bytes) is a change without a
    # manifest to check it against.
    st = (path / CONFIG_FILE).stat()
    os.utime(path / CONFIG_FILE, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AdapterRejected) as info:
        read_adapter(path, base_facts, MAX_RANK, expect=first.stamp)
    assert info.value.code == "changed_on_disk"
    assert f"{CONFIG_FILE}: replaced or modified" in info.value.message
    # An added file, and a deleted directory.
    second = read_adapter(path, base_facts, MAX_RANK)
    (path / "extra.txt").write_text("x")
    with pytest.raises(AdapterRejected) as info:
        read_adapter(path, base_facts, MAX_RANK, expect=second.stamp)
    assert "extra.txt: added" in info.value.message
    shutil.rmtree(path)
    with pytest.raises(AdapterRejected) as info:
        read_adapter(path, base_facts, MAX_RANK, expect=second.stamp)
    assert info.value.code == "missing_files" and "deleted" in info.value.message
