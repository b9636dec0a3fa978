"""Pure units: name validation, references, stop-string streaming, sampling rules."""

from __future__ import annotations

import pytest
import torch

from loramux.inference.sampling import RowSampler, SamplingParams, StopTextTracker, sample_rows
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
