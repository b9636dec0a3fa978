"""Pure units: name validation, references, stop-string streaming, sampling rules."""

from __future__ import annotations

import pytest
import torch

from loramux.inference.sampling import (
    RowError,
    RowSampler,
    SamplingParams,
    StopTextTracker,
    sample_rows,
)
from loramux.names import AdapterRef, InvalidName, TenantRef, validate_label


@pytest.mark.parametrize("good", ["a", "legal", "tenant-42", "v1", "x" * 63, "0abc"])
def test_dns1123_labels_are_accepted(good):
    assert validate_label(good) == good


@pytest.mark.parametrize(
    "bad", ["", "UPPER", "-lead", "trail-", "has.dot", "../etc", "a/b", "x" * 64, "sp ace",
            "ünï", "a_b"],
)
def test_names_that_could_escape_paths_or_labels_are_refused(bad):
    with pytest.raises(InvalidName):
        validate_label(bad)


def test_tenant_references_parse_with_and_without_version():
    assert TenantRef.parse("legal") == TenantRef("legal", None)
    assert TenantRef.parse("legal@v2") == TenantRef("legal", "v2")
    assert str(AdapterRef("legal", "v2")) == "legal@v2"
    for bad in ["legal@", "@v1", "legal@v1@v2", "Legal"]:
        with pytest.raises(InvalidName):
            TenantRef.parse(bad)


def test_stop_string_is_cut_and_never_streamed_even_across_tokens():
    tracker = StopTextTracker(("END",))
    sent = [tracker.update("Hello E"), tracker.update("Hello EN"), tracker.update("Hello END!")]
    assert "".join(sent) == "Hello "
    assert tracker.stopped and tracker.text == "Hello "


def test_text_held_back_for_a_possible_stop_is_released_when_it_is_not_one():
    tracker = StopTextTracker(("END",))
    assert tracker.update("an E") == "an "
    assert tracker.update("an Ex") == "Ex"
    assert tracker.update("an Exit", final=True) == "it"
    assert not tracker.stopped


def test_incomplete_utf8_is_not_streamed_until_complete():
    tracker = StopTextTracker(())
    assert tracker.update("caf\ufffd") == "caf"
    assert tracker.update("café") == "é"


def test_greedy_rows_take_argmax_and_sampled_rows_respect_top_p():
    logits = torch.tensor([[0.0, 5.0, 1.0], [10.0, 9.9, -50.0]])
    greedy = RowSampler(SamplingParams(temperature=0.0))
    nucleus = RowSampler(SamplingParams(temperature=1.0, top_p=0.5, seed=7))
    picks = {sample_rows(logits, [greedy, nucleus])[1] for _ in range(50)}
    assert sample_rows(logits, [greedy, greedy]) == [1, 0]
    # top_p=0.5 keeps only the most likely token of row 2 (p≈0.52).
    assert picks == {0}


def test_seeded_sampling_is_reproducible_per_request():
    logits = torch.randn(1, 100)
    a = [sample_rows(logits, [s])[0] for s in [RowSampler(SamplingParams(temperature=1.0,
                                                                         seed=3))] * 1]
    b = [sample_rows(logits, [s])[0] for s in [RowSampler(SamplingParams(temperature=1.0,
                                                                         seed=3))] * 1]
    assert a == b


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 1e-5, 1.0, 5.0])
@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 0.5, 1.0])
@pytest.mark.parametrize("seed", [None, 0, 2**63 - 1])
def test_sampling_never_raises_for_values_the_schema_accepts(temperature, top_p, seed):
    logits = torch.randn(3, 50) * 30
    logits[1, 7] = 1e4  # a very peaked row
    sampler = RowSampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed))
    picks = sample_rows(logits, [sampler] * 3)
    assert all(isinstance(p, int) and 0 <= p < 50 for p in picks)
    if temperature <= 1e-30 or top_p <= 1e-300:
        assert picks == logits.argmax(dim=-1).tolist()  # the limit is argmax


def test_rows_with_non_finite_logits_get_an_error_and_the_others_a_token():
    logits = torch.randn(4, 20)
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    greedy, sampled = RowSampler(SamplingParams()), RowSampler(SamplingParams(temperature=1.0))
    picks = sample_rows(logits, [greedy, greedy, sampled, sampled])
    assert isinstance(picks[0], int) and isinstance(picks[3], int)
    assert isinstance(picks[1], RowError) and isinstance(picks[2], RowError)
    assert "non-finite" in str(picks[1])


def test_stop_strings_unicode_many_overlapping_and_longer_than_the_text():
    tracker = StopTextTracker(("日本語", "本", "ab", "abc", "b", "🙂" * 5, "x" * 128, "é"))
    pieces = [tracker.update(t) for t in ["a", "aa", "aaa日", "aaa日x", "aaa日xb"]]
    assert "".join(pieces) == "aaa日x" and tracker.stopped
    long_only = StopTextTracker(("x" * 128,))
    assert long_only.update("short", final=True) == "short" and not long_only.stopped
