"""Per-row sampling and stop-string handling; each sequence keeps its own parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None


@dataclass
class RowSampler:
    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    def __post_init__(self) -> None:
        if self.params.seed is not None and self.params.temperature > 0:
            self.generator = torch.Generator().manual_seed(self.params.seed)


class RowError(Exception):
    """One row's sampling cannot go on (its logits are not finite): that row ends, alone."""


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int | RowError]:
    """Pick one token per row. Greedy rows share one argmax; sampled rows go one by one.

    Never raises for parameters the request schema accepts: a row whose logits hold inf or
    nan (an adapter whose weights overflow the compute dtype) gets a :class:`RowError`
    instead of a token, and so does a row whose own sampling fails for any other reason, so
    the caller can end that row and keep the others. Such a row is ended, not sanitized: a
    token drawn from garbage logits would be garbage text that looks like an answer.
    """
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    greedy = logits.argmax(dim=-1).tolist()
    out: list[int | RowError] = []
    for row, sampler in enumerate(samplers):
        if not finite[row]:
            out.append(RowError("the model produced non-finite logits for this request "
                                "(its adapter's weights overflow the compute dtype)"))
            continue
        p = sampler.params
        if p.temperature <= 0:
            out.append(int(greedy[row]))
            continue
        try:
            out.append(_sample_one(logits[row], sampler))
        except Exception as exc:  # one row's failure is that row's alone
            out.append(RowError(f"sampling failed: {type(exc).__name__}"))
    return out


def _sample_one(row_logits: torch.Tensor, sampler: RowSampler) -> int:
    p = sampler.params
    # In float64 and relative to the row's maximum: any temperature the schema allows
    # (down to the smallest subnormal) gives finite scaled logits <= 0 with the best at 0,
    # so softmax never sees inf - inf; a tiny temperature degrades to argmax, as it should.
    scaled = (row_logits.double().cpu() - row_logits.max().double().cpu()) / p.temperature
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        cut = cumulative - sorted_probs > p.top_p
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    token = torch.multinomial(probs, 1, generator=sampler.generator)
    return int(token.item())


class StopTextTracker:
    """Turns the decoded text of a growing sequence into safe-to-send deltas.

    Text that might still become a stop string, or an incomplete UTF-8 character, is held
    back until it is known; a stop string found anywhere ends the sequence and is cut off.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.sent = 0
        self.text = ""
        self.stopped = False

    def update(self, full_text: str, final: bool = False) -> str:
        cut = min((i for s in self.stop if (i := full_text.find(s)) != -1), default=-1)
        if cut != -1:
            full_text = full_text[:cut]
            self.stopped = True
            final = True
        self.text = full_text
        safe = len(full_text)
        if not final:
            if full_text.endswith("\ufffd"):
                safe -= 1
            safe -= self._partial_stop_suffix(full_text[:safe])
        safe = max(safe, self.sent)
        delta = full_text[self.sent:safe]
        self.sent = safe
        return delta

    def _partial_stop_suffix(self, text: str) -> int:
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


class IncrementalDetokenizer:
    """Text of a growing token list, decoding only a short window per new token.

    Re-decoding the whole sequence every step costs O(length) per token, O(length²) per
    sequence. Decoding the tokens since a recent offset and keeping the text before it is
    the scheme TGI and vLLM use: a token's text can depend on its left neighbours (leading
    spaces, multi-byte characters split across tokens), so the window starts a little before
    the new token, and text is only committed once it no longer ends in an incomplete
    character.
    """

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def add(self, token: int) -> str:
        """Append a token; return the full text known so far (complete characters only)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        window = self._decode(self.ids[self._prefix_offset:])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self.text += window[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self.text

    def finish(self) -> str:
        """The final text, including a trailing partial character if the tokens end in one."""
        if self._read_offset < len(self.ids):
            prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
            window = self._decode(self.ids[self._prefix_offset:])
            self.text += window[len(prefix):]
            self._prefix_offset = self._read_offset = len(self.ids)
        return self.text
