"""Incremental detokenization gives exactly the text a full decode gives."""

from __future__ import annotations

import random

import pytest

from loramux.inference.sampling import IncrementalDetokenizer

TEXTS = [
    "Plain ASCII, with  double spaces and punctuation!",
    "café, naïve, Ærøskøbing — and 日本語のテキスト, plus emoji 🙂🚀 at the end",
    "S: 37-year-old patient.\nO: Temperature 38.4 C.\n\nA: ok\tP: rest",
    "   leading spaces and trailing   ",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode_of_real_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    for i, token in enumerate(ids, start=1):
        partial = detok.add(token)
        full = tokenizer.decode(ids[:i], skip_special_tokens=True)
        # Never ahead of the truth, never a broken character.
        assert full.startswith(partial) and "\ufffd" not in partial
    assert detok.finish() == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_text_equals_full_decode_of_random_tokens(tokenizer):
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(tokenizer)
        for token in ids:
            detok.add(token)
        assert detok.finish() == tokenizer.decode(ids, skip_special_tokens=True)
