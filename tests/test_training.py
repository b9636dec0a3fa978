"""Training adapters: data shapes and masking, task sampling, isolation between tasks,
resume, and that what training writes is accepted by the real server."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import generate
from loramux.inference.model_loader import load_base_model
from loramux.manifest import AdapterManifest, verify_directory
from loramux.training.cli_train import main as train_main
from loramux.training.config import ConfigError, build_config, load_config
from loramux.training.data import IGNORE_INDEX, DatasetError, encode_record, load_task_data
from loramux.training.sampling import TaskSampler, task_probabilities
from loramux.training.trainer import MultiTaskTrainer, TrainingError

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "the early bird catches the worm",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def tiny_base(tiny_model_dir: Path):
    """A fresh fp32 base per test: training wraps (mutates) the model it is given."""
    return load_base_model(tiny_model_dir, "none", "cpu")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_config(tmp_path: Path, tiny_model_dir: Path, tasks: list[dict], **train) -> object:
    return build_config({
        "base_model": str(tiny_model_dir), "quantization": "none", "device": "cpu",
        "output_dir": str(tmp_path / "out"), "steps": 30, "batch_size": 4, "lr": 1e-2,
        "eval_fraction": 0.0, "seed": 0, **train, "tasks": tasks,
    })


def text_task(tmp_path: Path, name: str, **extra) -> dict:
    data = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": s} for s in SENTENCES] * 2)
    return {"name": name, "data": str(data), "r": 4, "dropout": 0.0, **extra}


# -- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "weights"), [
    (1.0, None), (2.0, None), (1e9, None), (1.0, {"a": 3.0}), (2.0, {"c": 0.5}),
])
def test_sampling_proportions_match_formula(temperature, weights):
    sizes = {"a": 100, "b": 400, "c": 1600}
    probs = task_probabilities(sizes, temperature, weights)
    w = weights or {}
    raw = {n: w.get(n, 1.0) * sizes[n] ** (1 / temperature) for n in sizes}
    for name in sizes:
        assert probs[name] == pytest.approx(raw[name] / sum(raw.values()))
    draws = 20000
    sampler = TaskSampler(probs, seed=1)
    counts = Counter(sampler.sample() for _ in range(draws))
    for name, p in probs.items():
        assert counts[name] / draws == pytest.approx(p, abs=0.015)
    if temperature == 1e9 and weights is None:
        assert all(p == pytest.approx(1 / 3) for p in probs.values())


def test_sampler_is_seeded_and_resumable():
    probs = task_probabilities({"a": 1, "b": 2, "c": 3})
    first = TaskSampler(probs, seed=7)
    head = [first.sample() for _ in range(10)]
    state = first.state_dict()
    tail = [first.sample() for _ in range(10)]
    again = TaskSampler(probs, seed=7)
    assert [again.sample() for _ in range(10)] == head
    resumed = TaskSampler(probs, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.sample() for _ in range(10)] == tail


# -- data ------------------------------------------------------------------------------------


def test_prompt_tokens_are_masked(tokenizer):
    tok = tokenizer
    ex = encode_record({"prompt": "Question: two plus two?", "completion": " four"}, tok, 512, "x")
    n_prompt = len(tok("Question: two plus two?", add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id

    chat = encode_record({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"},
    ]}, tok, 512, "x")
    learned = tok.decode([i for i, label in zip(chat.input_ids, chat.labels, strict=True)
                          if label != IGNORE_INDEX])
    assert "hello there" in learned and "see you" in learned
    assert "hi" not in learned.replace("there", "") and "bye" not in learned
    assert "user" not in learned

    short = encode_record({"text": " ".join(SENTENCES)}, tok, 5, "x")
    assert len(short.input_ids) == 5


def test_malformed_jsonl_names_file_and_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(DatasetError, match=rf"{bad}:3: not valid JSON"):
        load_task_data(bad, tokenizer, 64)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "ok"}, {"input": "what"}])
    with pytest.raises(DatasetError, match=rf"{wrong}:2: a record needs 'text'"):
        load_task_data(wrong, tokenizer, 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        load_task_data(empty, tokenizer, 64)


def test_datasets_directory_needs_datasets(tmp_path, tokenizer):
    try:
        import datasets
    except ImportError:
        with pytest.raises(DatasetError, match="pip install datasets"):
            load_task_data(tmp_path, tokenizer, 64)
        return
    datasets.Dataset.from_list([{"text": s} for s in SENTENCES]).save_to_disk(tmp_path / "ds")
    data = load_task_data(tmp_path / "ds", tokenizer, 64)
    assert len(data.examples) == len(SENTENCES) and len(data.sha256) == 64


# -- config and CLI --------------------------------------------------------------------------


def test_config_errors_are_clear(tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("steps: 5\nlearning_rate: 0.1\ntasks:\n  - name: a\n    data: a.jsonl\n"
                         "    rank: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_config(yaml_file)
    assert "learning_rate: unknown field" in str(exc.value)
    assert "tasks.0.rank: unknown field" in str(exc.value)
    yaml_file.write_text("tasks:\n  - name: a\n    data: a.jsonl\n")
    config = load_config(yaml_file)
    assert config.tasks[0].data == tmp_path / "a.jsonl"  # relative to the YAML file


def test_cli_bad_input_exits_2(tmp_path, capsys):
    assert train_main(["--data", str(tmp_path / "missing.jsonl"), "--tenant", "a"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_main(["--steps", "x"]) == 2
    assert train_main(["--data", "d.jsonl", "--tenant", "Not_Valid"]) == 2
    assert "DNS-1123" in capsys.readouterr().err


def test_unknown_target_module_is_rejected(tmp_path, tiny_model_dir, tiny_base):
    config = make_config(tmp_path, tiny_model_dir,
                         [text_task(tmp_path, "a", target_modules=["q_proj", "query_key"])])
    with pytest.raises(TrainingError, match=r"\['query_key'\] do not exist in the base"):
        MultiTaskTrainer(config, base=tiny_base)


# -- training --------------------------------------------------------------------------------


def test_loss_decreases(tmp_path, tiny_model_dir, tiny_base):
    config = make_config(tmp_path, tiny_model_dir, [text_task(
        tmp_path, "a", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])])
    trainer = MultiTaskTrainer(config, base=tiny_base)
    examples = trainer.train_examples["a"]
    before = trainer.evaluate("a", examples)
    losses = [trainer.train_step()[1] for _ in range(30)]
    after = trainer.evaluate("a", examples)
    assert after < before * 0.7, (before, after, losses)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_other_adapters_are_untouched(tmp_path, tiny_model_dir, tiny_base):
    config = make_config(tmp_path, tiny_model_dir, [
        text_task(tmp_path, "a"), text_task(tmp_path, "b", r=8, target_modules=["v_proj"]),
        text_task(tmp_path, "c", dropout=0.1),
    ], weight_decay=0.1)
    trainer = MultiTaskTrainer(config, base=tiny_base)
    trainer.train_step("c")
    trainer.train_step("b")  # every optimizer has state now
    snapshot = {
        name: {n: p.detach().clone() for n, p in params.items()}
        for name, params in trainer.params.items()
    }
    for _ in range(3):
        trainer.train_step("a")
    for name in ("b", "c"):
        for n, p in trainer.params[name].items():
            assert torch.equal(p, snapshot[name][n]), n
    assert any(not torch.equal(p, snapshot["a"][n]) for n, p in trainer.params["a"].items())


def test_resume_continues_step_count(tmp_path, tiny_model_dir, tiny_base):
    tasks = [text_task(tmp_path, "a"), text_task(tmp_path, "b")]
    config = make_config(tmp_path, tiny_model_dir, tasks, steps=6, checkpoint_every=3)
    straight = MultiTaskTrainer(config, base=tiny_base)
    straight.run(progress=False)
    checkpoint = config.checkpoints / "step-3"
    assert (checkpoint / "checkpoint.pt").is_file()

    resumed_config = make_config(tmp_path, tiny_model_dir, tasks, steps=6,
                                 output_dir=str(tmp_path / "out2"), resume_from=str(checkpoint))
    resumed = MultiTaskTrainer(resumed_config, base=load_base_model(tiny_model_dir, "none", "cpu"))
    assert resumed.step == 3
    resumed.run(progress=False)
    assert resumed.step == 6
    assert resumed.task_steps == straight.task_steps
    for name, params in straight.params.items():
        for n, p in params.items():
            torch.testing.assert_close(resumed.params[name][n], p)


def test_export_verifies_and_serves(tmp_path, tiny_model_dir, tiny_base, start_server):
    from loramux.inference.adapters import BaseFacts, read_adapter

    data = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": f"Say something about {w}:", "completion": " banana banana banana banana"}
        for w in ("cats", "dogs", "the sea", "rain", "cities", "music")
    ])
    output = tmp_path / "out"
    code = train_main([
        "--model", str(tiny_model_dir), "--quantization", "none", "--device", "cpu",
        "--output-dir", str(output), "--steps", "40", "--lr", "1e-2", "--batch-size", "4",
        "--data", str(data), "--tenant", "t", "--version", "v1", "--r", "8",
        "--target-modules", "q_proj,v_proj,o_proj,up_proj,down_proj", "--dropout", "0",
        "--no-progress",
    ])
    assert code == 0
    version_dir = output / "t" / "v1"
    assert {p.name for p in version_dir.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"}
    manifest = AdapterManifest.from_json((version_dir / "manifest.json").read_bytes())
    assert verify_directory(version_dir, manifest) == []
    assert manifest.base_model == "tiny-llama" and manifest.rank == 8
    assert manifest.training_data_sha256 is not None
    facts = BaseFacts.from_model(tiny_base.model, tiny_base.aliases)
    adapter = read_adapter(version_dir, facts, max_rank=64)
    assert adapter.rank == 8

    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--adapter", f"t@v1={version_dir}")
    prompt = "Say something about the sea:"
    tuned = generate(server.url, "t", prompt, tokens=8)["text"]
    plain = generate(server.url, "tiny-llama", prompt, tokens=8)["text"]
    assert tuned != plain
    assert "banana" in tuned


def test_nf4_qlora_trains_and_exports(tmp_path, tiny_model_dir):
    from loramux.inference.adapters import BaseFacts, read_adapter

    config = make_config(tmp_path, tiny_model_dir, [text_task(tmp_path, "q")], steps=4,
                         quantization="nf4", gradient_checkpointing=True, eval_every=2,
                         eval_fraction=0.25)
    trainer = MultiTaskTrainer(config)
    trainer.train_step()
    assert trainer.evaluate("q") is not None
    # Eval must not leave 4-bit layers in bitsandbytes' CPU inference layout (no autograd).
    layers = [m for m in trainer.model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in layers)
    results = trainer.run(progress=False)
    assert results[0].steps == 4 and results[0].tokens > 0
    assert results[0].eval_loss is not None and math.isfinite(results[0].eval_loss)
    version_dir = results[0].output

    fp32 = load_base_model(tiny_model_dir, "none", "cpu")
    facts = BaseFacts.from_model(fp32.model, fp32.aliases)
    assert read_adapter(version_dir, facts, max_rank=64).rank == 4
