"""The seam between the engine and the per-row LoRA computation.

The engine hands a backend one forward pass: token ids, masks, positions, the KV cache and
one adapter slot per row. The backend alone knows how adapters live in the model. The first
implementation is PEFT's mixed-batch forward (``adapter_names``); a batched kernel (one
gathered matmul over all rows' adapters, as in Punica/S-LoRA) can replace it without the
engine changing.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Protocol

import torch
import torch.nn.functional as F

from . import cpu_linear
from .adapters import HostAdapter
from .bgmv import Kernel
from .precision import cpu_info

log = logging.getLogger("loramux.backend")

BASE_ROW = "__base__"  # PEFT's name for "no adapter on this row"


def last_position(input_ids: torch.Tensor) -> int | torch.Tensor:
    """``logits_to_keep`` for the last position only.

    An int ``1`` makes transformers slice ``hidden[:, -1:, :]``: for a prompt of more than
    one token that view is not contiguous, and ``matmul`` then expands the lm_head weight to
    every row and copies it (one [rows, hidden, vocab] copy, 57 MB per row for the default
    model in bf16) before a bmm: most of a prefill's time. A 1-D index gives a contiguous
    [rows, 1, hidden] copy, which folds to one plain matmul. Same values either way.
    """
    length = int(input_ids.shape[1])
    return 1 if length == 1 else torch.tensor([length - 1], device=input_ids.device)


class LoraBackend(Protocol):
    def add(self, slot: str, adapter: HostAdapter) -> None: ...

    def remove(self, slot: str) -> None: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object,
        slots: list[str | None],
    ) -> torch.Tensor:
        """Return the logits of each row's last position, shape [rows, vocab], float32."""
        ...


class PeftMixedBatchBackend:
    """Adapters as PEFT LoRA modules; each row picks its own through ``adapter_names``.

    PEFT loops in Python over the distinct adapters present in each layer, so its cost grows
    with the number of distinct tenants in a batch; that is the part a batched kernel removes.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._base = model
        self._peft: torch.nn.Module | None = None
        self._slots: set[str] = set()

    @property
    def model(self) -> torch.nn.Module:
        return self._peft if self._peft is not None else self._base

    def add(self, slot: str, adapter: HostAdapter) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        config = adapter.peft_config()
        if self._peft is None:
            self._peft = get_peft_model(
                self._base, config, adapter_name=slot, low_cpu_mem_usage=True
            )
        else:
            self._peft.add_adapter(slot, config, low_cpu_mem_usage=True)
        result = set_peft_model_state_dict(
            self._peft, adapter.tensors, adapter_name=slot, low_cpu_mem_usage=True
        )
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            self._peft.delete_adapter(slot)
            raise ValueError(f"adapter tensors did not fit the model: {unexpected[:3]}")
        self._peft.eval()
        self._slots.add(slot)

    def remove(self, slot: str) -> None:
        if self._peft is None or slot not in self._slots:
            return
        self._peft.delete_adapter(slot)
        self._slots.discard(slot)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object,
        slots: list[str | None],
    ) -> torch.Tensor:
        kwargs: dict[str, object] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": cache,
            "use_cache": True,
            "logits_to_keep": last_position(input_ids),
        }
        if self._peft is None:
            out = self._base(**kwargs)
        else:
            # Drive the LoRA tuner directly rather than PeftModel.forward: the latter consults a
            # model-wide "active adapter", which this server does not have (and which PEFT
            # leaves dangling once the last adapter is deleted). The hook context is the same
            # one PeftModel.forward enters for `adapter_names`.
            tuner = self._peft.base_model
            names = [s if s is not None else BASE_ROW for s in slots]
            with tuner._enable_peft_forward_hooks(adapter_names=names):
                out = tuner.model(**kwargs)
        return out.logits[:, -1, :].float()


# What one extra row group costs, in rows x tokens x rank units (an index_select of the
# rows, one of A and B, two bmm and an index_add: fixed dispatch cost on a CPU, kernel
# launches on a GPU). Measured with bench/suite.py's mixed-rank workload on the embedded
# default model (2 CPU cores): 7 rank-8 rows + 1 rank-64 row ran 22% faster as two groups
# than padded to 64 (extra padding 392 units), while ranks 8/16/32/64 x 2 ran 26% slower as
# four groups than as one (padding 16 + 64 + 192 units): so one group is worth 256.
GROUP_COST = 256


def rank_bucket(rank: int) -> int:
    """The width a row group runs at: the next power of two of its rank, at least 8."""
    return max(8, 1 << (max(rank, 1) - 1).bit_length())


def plan_groups(ranks: list[int], tokens: int, group_cost: int | None = None
                ) -> list[tuple[list[int], int]]:
    """Rows (by adapter rank, 0 = the base model) split into groups, each run at one width:
    ``[(row positions, width)]``. Every row with the same power-of-two bucket starts in one
    group; neighbouring groups merge (the lower padded to the higher width) while padding
    costs less than a group: ``rows x tokens x extra width <= group_cost``. Base rows join
    the narrowest group when that is cheaper than indexing the others around them."""
    group_cost = GROUP_COST if group_cost is None else group_cost
    buckets: dict[int, list[int]] = {}
    base: list[int] = []
    for row, rank in enumerate(ranks):
        if rank <= 0:
            base.append(row)
        else:
            buckets.setdefault(rank_bucket(rank), []).append(row)
    groups = [(rows, width) for width, rows in sorted(buckets.items())]
    merged = True
    while merged and len(groups) > 1:
        merged = False
        costs = [len(groups[i][0]) * tokens * (groups[i + 1][1] - groups[i][1])
                 for i in range(len(groups) - 1)]
        best = min(range(len(costs)), key=costs.__getitem__)
        if costs[best] <= group_cost:
            low, high = groups[best], groups[best + 1]
            groups[best:best + 2] = [(sorted(low[0] + high[0]), high[1])]
            merged = True
    if base and groups and len(base) * tokens * groups[0][1] <= group_cost:
        groups[0] = (sorted(groups[0][0] + base), groups[0][1])
    return groups


# When a step's LoRA runs *dense*: every row's input times every adapter in use at once (A
# read as one [used x r_max, in] matrix), the other adapters' columns zeroed per row, then
# one matmul with every B. Four small ops per layer, against about ten for gathering each
# row's pair (index_select of A and B, two bmm, an index_add); on a CPU a decode step is
# made of small ops that each pay a fixed dispatch cost, so the dense form wins until its
# wasted columns cost real compute. The budget is in rows x tokens x width units.
# bench/bench_lora_layer.py (2 cores, bf16 base, in 576, out 576, extra us over the base
# layer, gathered / dense): fp32 stacks, 8 rows at width 144: 118 / 86; 8 rows at rank 64
# (width 576): 298 / 165; 32 rows at width 528 (16,896 units): 279 / 303, past the budget.
# bf16 stacks: 142 / 96, 342 / 173, 295 / 229. Prefills (rows x tokens in the hundreds)
# take the gathered path.
DENSE_BUDGET = 12_288
# ... but with fp32 stacks on a CPU without native bf16 (AVX2 FMA only, as AMD EPYC and
# older Xeons), the dense form's wasted columns are real compute from a few rows on: in
# process on an AVX2 EPYC (bench/bench_lora_layer.py --dtype fp32, extra us, gathered /
# dense), 16 rows at width 272: 152 / 213; 8 rows on 16 adapters (2,176 units): 118 / 132;
# 8 rows at width 144: 119 / 126; 4 rows: 103 / 100. Whole decode steps, the default model
# with 16 rank-16 q/k/v/o tenants, 5 interleaved repetitions, median ms: 16 distinct rows
# 144.9 gathered against 161.6 dense (the base rows alone 126.8); 8 rows 134.3 / 136.1.
DENSE_BUDGET_FP32_AVX2 = 1_024
# ... and never when it would read more than this many times the adapter weights the step
# needs: the dense form reads positions 0..used-1 at the layer's padded rank, whether or
# not a row uses them, and reading weights is most of a CPU decode step (8 rows on ids
# 24-31 of 32 in use). A layer padded wide by a resident high-rank adapter is read only up
# to the widest rank bucket of the step's adapters (_RowContext.rank_width).
DENSE_MAX_WASTE = 2
# On such a widened layer the dense form copies the used positions' leading ranks first; past
# this many columns the copy costs more than gathering each row's pair. In process, 32
# residents at scattered ids with two rank-64 ones among them, bf16, best step in ms
# (bench/bench_decode_wide.py, two runs): 16 rows (30 positions x 16 = 480 columns) copy
# 116.3 / 91.3, gathered 106.0 / 86.4; 8 rows (18 x 16 = 288 columns) copy 91.5 / 76.6,
# gathered 95.9 / 71.8.
DENSE_MAX_COPY = 256
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class _RowContext:
    """The per-step adapter index the engine prepares; wrapped layers only read it.

    Every adapter sits at its global id in every layer's stack (see
    :class:`BatchedLoraLinear`), so one index per step serves every layer: for the dense
    form, which positions each row may read (a boolean mask per padded rank, built at most
    once per distinct rank per step); for the gathered form, the rows split into groups
    once per step (:func:`plan_groups`). Indices reach the device in one copy per step
    (into a reused buffer on CUDA), never one per layer.
    """

    def __init__(self) -> None:
        self.present: set[int] = set()  # global adapter ids in this step
        self.uniform: int | None = None  # set when every row uses the same adapter
        self.merge = False  # a uniform step may run on weights with the adapter merged in
        # fp32 stacks on a CPU without native bf16: dense only for the smallest steps
        # (DENSE_BUDGET_FP32_AVX2)
        self.fp32_avx2 = False
        # loramux's CPU decode kernel (inference/bgmv.py), when it is loaded and the stacks
        # are on the CPU; kernel_rows is (each row's adapter id, the ranks it reads) for a
        # one-token step that runs it
        self.kernel: Kernel | None = None
        self.kernel_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows = 0
        self.tokens = 1
        self.used = 0  # adapter positions 0..used-1 cover every row's adapter
        self.needed = 0  # sum of the step's distinct adapters' rank buckets
        self.widest = 0  # the widest of them
        # (row positions, or None when the group is every row; adapter ids; width)
        self.groups: list[tuple[torch.Tensor | None, torch.Tensor, int]] = []
        self._ids: torch.Tensor | None = None  # each row's adapter id, on the device
        self._masks: dict[int, torch.Tensor] = {}
        self._device_buffer: torch.Tensor | None = None

    def set(self, row_ids: list[int], ranks: list[int] | None = None, tokens: int = 1,
            device: torch.device | None = None) -> None:
        self.present = set(row_ids) - {0}
        self.uniform = row_ids[0] if row_ids and len(set(row_ids)) == 1 else None
        self.rows, self.tokens = len(row_ids), tokens
        self.used = max(row_ids, default=0) + 1
        rank_of = dict(zip(row_ids, ranks or [1] * len(row_ids), strict=True))
        self.needed = sum(rank_bucket(rank_of[i]) for i in self.present)
        self.widest = max((rank_bucket(rank_of[i]) for i in self.present), default=0)
        self.groups = []
        self._masks = {}
        self._ids = None
        self.kernel_rows = None
        if not self.present or self.uniform is not None:
            return
        if self.kernel is not None and tokens == 1:
            row_ranks = [rank_of[i] if i else 0 for i in row_ids]
            self.kernel_rows = (torch.tensor(row_ids, dtype=torch.long),
                                torch.tensor(row_ranks, dtype=torch.long))
        plan = plan_groups(ranks if ranks is not None else [1 if i else 0 for i in row_ids],
                           tokens)
        flat: list[int] = list(row_ids)
        for rows, _width in plan:
            flat += rows + [row_ids[r] for r in rows]
        host = torch.tensor(flat, dtype=torch.long)
        if device is None or device.type == "cpu":
            values = host
        else:  # GPU-only path: never run on these machines
            buf = self._device_buffer
            if buf is None or buf.device != device or buf.numel() < len(flat):
                buf = torch.empty(max(128, 2 * len(flat)), dtype=torch.long, device=device)
                self._device_buffer = buf
            values = buf[: len(flat)]
            values.copy_(host, non_blocking=True)
        self._ids = values[: len(row_ids)]
        offset = len(row_ids)
        for rows, width in plan:
            n = len(rows)
            positions = None if n == len(row_ids) else values[offset:offset + n]
            self.groups.append((positions, values[offset + n:offset + 2 * n], width))
            offset += 2 * n

    def rank_width(self, r_max: int) -> int:
        """The ranks a layer of this padded rank reads per position this step: the widest
        rank bucket among the step's adapters, so a resident wider adapter (which padded the
        layer) costs a dense step one small copy (DENSE_MAX_COPY), not its padding."""
        return min(r_max, self.widest)

    def dense(self, r_max: int) -> bool:
        """Whether a layer of this padded rank runs this step dense (see DENSE_BUDGET).
        Never when most adapter positions it would read belong to no row of this step:
        the dense form reads every position in use, and reading weights is most of a CPU
        decode step."""
        rank = self.rank_width(r_max)
        width = self.used * rank
        budget = DENSE_BUDGET_FP32_AVX2 if self.fp32_avx2 else DENSE_BUDGET
        return (self.rows * self.tokens * width <= budget
                and width <= DENSE_MAX_WASTE * self.needed + rank
                and (rank == r_max or width <= DENSE_MAX_COPY))

    def foreign(self, rank: int) -> torch.Tensor:
        """[rows, used x rank], True where a column belongs to another row's adapter (or,
        for a base row, to any adapter): the columns the dense form zeroes."""
        mask = self._masks.get(rank)
        if mask is None:
            assert self._ids is not None
            owner = torch.arange(self.used, device=self._ids.device).repeat_interleave(rank)
            mask = (owner[None, :] != self._ids[:, None]) | (self._ids[:, None] == 0)
            self._masks[rank] = mask
        return mask

    def clear(self) -> None:
        self.set([])


class BatchedLoraLinear(torch.nn.Module):
    """A base linear layer plus every resident adapter's LoRA pair for it, stacked.

    Adapter weights live in preallocated stacks ``A [in, capacity, r_max]`` (A transposed)
    and ``B [capacity, r_max, out]`` (B transposed, scaling folded into it), ranks
    zero-padded to the largest rank on this layer. An adapter sits at its *global* id in
    every layer's stack; position 0, and the position of any adapter that does not target
    this layer, is all zeros. So one index per step serves every layer. The layouts make
    both stacks plain matrices, ``[in, capacity x r_max]`` and ``[capacity x r_max, out]``,
    whose leading columns (rows) are the adapters in use: a CPU matmul with the reduced
    dimension contiguous runs in a third of the time of one that reads a transposed operand
    (9 against 29 us for 8 rows at width 144, fp32, 2 cores).

    A step runs in one of four forms. Every row on one adapter: on a plain float base, one
    matmul with that adapter merged into the weight (``merged_weight``: the base alone's
    cost, after one merge when the merged adapter changes); on a quantized base, that
    adapter's own pair at its own rank. Few tokens and a narrow stack (a decode step):
    *dense*, every row's input times every adapter in use, each row's foreign columns
    zeroed between the two matmuls.
    Else *gathered*: each row group's pairs gathered sliced to the group's width and
    applied with two batched matmuls (Punica's BGMV idea, in plain torch). Neither form's
    cost grows with the number of distinct tenants in the batch, and adding an adapter
    writes its rows in place: O(adapter size).

    On a CPU with loramux's kernel loaded (inference/bgmv.py), a one-token step of
    distinct adapters runs neither: the kernel reads each row's pair where it lies in the
    stacks, at that row's own rank, and adds the delta into the base output in place (one
    call per layer instead of the gathered form's copies of every row's pair).
    """

    def __init__(self, base_layer: torch.nn.Module, ctx: _RowContext, dtype: torch.dtype,
                 capacity: int = 2) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.lora_dtype = dtype
        device = _module_device(base_layer)
        self.register_buffer(
            "A", torch.zeros(capacity, 1, self.in_features, dtype=dtype, device=device),
            persistent=False)
        self.register_buffer(
            "B", torch.zeros(capacity, 1, self.out_features, dtype=dtype, device=device),
            persistent=False)
        self.rank_of: dict[int, int] = {}  # global adapter id -> its rank on this layer
        # The base weight with one adapter merged in (see merged_weight); None until a
        # uniform step first needs it, then reused for every later merge.
        self._merged: torch.Tensor | None = None
        self._merged_id: int | None = None
        # The merged weight packed for oneDNN, when the base layer runs packed (cpu_linear).
        self._merged_packed: torch.Tensor | None = None
        # Whether the base weight is a plain float matrix an adapter can be merged into (not
        # NF4/int8: a merge there would need a dequantized copy of the layer, and rounds).
        weight = getattr(base_layer, "weight", None)
        self.mergeable = (isinstance(base_layer, torch.nn.Linear) and weight is not None
                          and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
                          and not hasattr(weight, "quant_state"))

    @property
    def merged_id(self) -> int | None:
        return self._merged_id

    def merged_weight(self, adapter_id: int) -> torch.Tensor:
        """``W + B A`` for one adapter (scale folded into B), in the base weight's dtype,
        summed in fp32 and rounded once. Computed when a uniform step on this adapter first
        comes, kept until another adapter's uniform step or until this adapter's id is
        removed or rewritten; one buffer per layer, so the memory is one copy of the
        wrapped layers' weights, allocated once."""
        if self._merged_id != adapter_id or self._merged is None:
            weight = self.base_layer.weight
            if self._merged is None:
                self._merged = torch.empty_like(weight, memory_format=torch.contiguous_format)
            rank = self.rank_of[adapter_id]
            a = self.A[adapter_id, :rank].float()
            b = self.B[adapter_id, :rank].float()
            self._merged.copy_(torch.addmm(weight.float(), b.T, a))
            self._merged_packed = (cpu_linear.pack_weight(self._merged)
                                   if getattr(self.base_layer, "_packed", None) is not None
                                   else None)
            self._merged_id = adapter_id
        return self._merged

    def _forget_merge(self, adapter_id: int) -> None:
        if self._merged_id == adapter_id:
            self._merged_id = None

    @property
    def r_max(self) -> int:
        return int(self.B.shape[1])

    @property
    def capacity(self) -> int:
        return int(self.B.shape[0])

    def pair(self, adapter_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An adapter's ``(lora_A [rank, in], lora_B [out, rank])`` on this layer, PEFT's
        layout, scale folded into B (views into the stacks)."""
        rank = self.rank_of[adapter_id]
        return self.A[adapter_id, :rank], self.B[adapter_id, :rank].T

    def resize(self, capacity: int, r_max: int) -> None:
        """Reallocate the stacks (rare: a wider rank, or more adapters than ever before)."""
        old_a, old_b = self.A, self.B
        keep = min(r_max, self.r_max)
        rows = min(capacity, self.capacity)
        a = old_a.new_zeros(capacity, r_max, self.in_features)
        b = old_b.new_zeros(capacity, r_max, self.out_features)
        a[:rows, :keep] = old_a[:rows, :keep]
        b[:rows, :keep] = old_b[:rows, :keep]
        self.A, self.B = a, b

    def add(self, adapter_id: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """``lora_a [rank, in]`` and ``lora_b [out, rank]``, PEFT's layout, scale folded."""
        rank = int(lora_a.shape[0])
        self._forget_merge(adapter_id)
        if rank > self.r_max or adapter_id >= self.capacity:
            self.resize(max(self.capacity, adapter_id + 1), max(self.r_max, rank))
        self.A[adapter_id].zero_()
        self.B[adapter_id].zero_()
        self.A[adapter_id, :rank] = lora_a.to(self.A)
        self.B[adapter_id, :rank] = lora_b.T.to(self.B)
        self.rank_of[adapter_id] = rank

    def remove(self, adapter_id: int) -> None:
        self._forget_merge(adapter_id)
        rank = self.rank_of.pop(adapter_id, None)
        if rank is None:
            return
        self.A[adapter_id].zero_()
        self.B[adapter_id].zero_()
        # Every row pays the padded rank: once the widest adapter leaves, narrow the stack
        # so one high-rank tenant does not slow the others on this layer until a restart.
        widest = max(self.rank_of.values(), default=1)
        if rank == self.r_max and widest < self.r_max:
            self.resize(self.capacity, widest)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        ctx = self.ctx
        if ctx.merge and ctx.uniform in self.rank_of and self.mergeable:
            # every row on one adapter: one matmul with the merged weight, as the base alone
            merged = self.merged_weight(ctx.uniform)
            return cpu_linear.linear(x, merged, self.base_layer.bias, self._merged_packed)
        result = self.base_layer(x, *args, **kwargs)
        if not self.rank_of or ctx.present.isdisjoint(self.rank_of):
            return result
        if ctx.kernel_rows is not None and self._kernel(x, result):
            return result
        math = _math_dtype(x.dtype, self.lora_dtype)
        xf = x.reshape(-1, self.in_features).to(math)
        r_max = self.r_max
        if ctx.uniform is not None:  # every row: the adapter's own rank, no padding
            rank = self.rank_of[ctx.uniform]
            a, b = self.A[ctx.uniform, :rank].to(math), self.B[ctx.uniform, :rank].to(math)
            delta = F.linear(xf, a) @ b
        elif ctx.dense(r_max):
            rank = ctx.rank_width(r_max)
            width = ctx.used * rank
            # views when rank == r_max (and the stacks are in the math dtype); else one copy
            # of the used positions' leading ranks
            a = self.A[:ctx.used, :rank].reshape(width, self.in_features).to(math)
            b = self.B[:ctx.used, :rank].reshape(width, self.out_features).to(math)
            h = F.linear(xf, a)  # [rows x tokens, width]
            # masked_fill, not a multiply by 0/1: another tenant's inf must not become NaN
            foreign = ctx.foreign(rank)
            if ctx.tokens == 1:
                h.masked_fill_(foreign, 0)
            else:
                h.view(ctx.rows, -1, width).masked_fill_(foreign[:, None, :], 0)
            delta = h @ b
        else:
            return self._gathered(xf, result)
        if result.is_contiguous():  # the base layer's fresh output: add in place
            result.view(-1, self.out_features).add_(delta)
            return result
        return result + delta.view(result.shape).to(result.dtype)

    def _kernel(self, x: torch.Tensor, result: torch.Tensor) -> bool:
        """One decode step through loramux's CPU kernel: each row's pair read in place, the
        delta added into ``result``. False (nothing done) where the kernel does not apply."""
        kernel, rows = self.ctx.kernel, self.ctx.kernel_rows
        if (kernel is None or rows is None or self.A.device.type != "cpu"
                or not result.is_contiguous() or result.dtype not in _KERNEL_DTYPES
                or x.dtype not in _KERNEL_DTYPES):
            return False
        kernel(result.view(-1, self.out_features), x.reshape(-1, self.in_features).contiguous(),
               self.A, self.B, rows[0], rows[1])
        return True

    def _gathered(self, xf: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        rows = self.ctx.rows
        flat = xf.view(rows, -1, self.in_features)
        out = result.reshape(rows, -1, self.out_features)
        for positions, index, width in self.ctx.groups:
            index = index.to(self.B.device)  # a no-op unless the model spans devices
            width = min(width, self.r_max)
            a = self.A[:, :width].index_select(0, index).to(flat.dtype)  # [rows, width, in]
            b = self.B[:, :width].index_select(0, index).to(flat.dtype)  # [rows, width, out]
            part = flat if positions is None else flat.index_select(0, positions.to(index))
            delta = torch.bmm(torch.bmm(part, a.transpose(1, 2)), b)
            if positions is None:
                out = out + delta.to(out.dtype)
            else:
                out = out.index_add(0, positions.to(index), delta.to(out.dtype))
        return out.reshape(result.shape)


def _math_dtype(activations: torch.dtype, stacks: torch.dtype) -> torch.dtype:
    """The dtype the plain-torch LoRA paths multiply in: fp32 when either the activations or
    the stacks are fp32 (bf16 stacks under an fp32 model are upcast after slicing: storage
    only), else the stacks' dtype."""
    return torch.float32 if torch.float32 in (activations, stacks) else stacks


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = float(value)
            break
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


class BatchedLoraBackend:
    """loramux's own multi-adapter layers: per step and layer, one merged matmul (every row
    on one adapter), the CPU kernel (decode steps), or one gathered or dense matmul pair.

    Each targeted linear layer of the base is wrapped once by :class:`BatchedLoraLinear`;
    the engine's per-row adapter list becomes integer ids in a shared context that the
    layers read. Nothing in a layer knows about tenants.
    """

    def __init__(self, model: torch.nn.Module, lora_dtype: torch.dtype = torch.float32,
                 merge_uniform: bool = True, kernel: Kernel | None = None) -> None:
        self.model = model
        self.lora_dtype = lora_dtype
        self._ctx = _RowContext()
        self._ctx.merge = merge_uniform
        # What decode steps of distinct tenants run, for /v1/models: "kernel", "torch", or
        # "building" (torch until the kernel is ready), and why.
        self.kernel_state, self.kernel_reason = "torch", "not requested"
        self._ctx.fp32_avx2 = (lora_dtype == torch.float32 and _module_device(model).type == "cpu"
                               and not cpu_info().native_bf16)
        self._ids: dict[str, int] = {}
        self._ranks: dict[int, int] = {}  # global id -> the adapter's largest rank
        self._free_ids: list[int] = []
        self._next_id = 1
        self._layers: dict[str, BatchedLoraLinear] = {}
        self._slot_layers: dict[str, list[BatchedLoraLinear]] = {}
        # Every layer's stacks have this many positions (ids 0..capacity-1; doubled when an
        # id does not fit), so any row's id indexes every layer.
        self._capacity = 8
        self._device = _module_device(model)
        if kernel is not None:
            self.enable_kernel(kernel)

    def enable_kernel(self, kernel: Kernel, reason: str = "loaded") -> bool:
        """Run one-token steps of distinct tenants through loramux's CPU kernel from the next
        step on (safe while the engine runs: a step reads the context once, when it starts).
        Only for a model on the CPU; False otherwise."""
        if self._device.type != "cpu":
            self.set_kernel_state("torch", f"the model is on {self._device.type}: the "
                                  "kernel is CPU-only")
            return False
        self._ctx.kernel = kernel
        self.set_kernel_state("kernel", reason)
        return True

    @property
    def model_device(self) -> torch.device:
        return self._device

    def set_kernel_state(self, state: str, reason: str) -> None:
        self.kernel_state, self.kernel_reason = state, reason

    def _layer(self, path: str) -> BatchedLoraLinear:
        layer = self._layers.get(path)
        if layer is None:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            layer = BatchedLoraLinear(getattr(parent, child), self._ctx, self.lora_dtype,
                                      capacity=self._capacity)
            setattr(parent, child, layer)
            self._layers[path] = layer
        return layer

    def add(self, slot: str, adapter: HostAdapter) -> None:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in adapter.tensors.items():
            stripped = key.removeprefix("base_model.model.")
            module, _, _weight = stripped.rpartition(".")
            module, _, which = module.rpartition(".")
            pairs.setdefault(module, {})[which] = tensor
        self._free_ids.sort(reverse=True)  # reuse the lowest free id: stacks stay small
        adapter_id = self._free_ids.pop() if self._free_ids else self._next_id
        if adapter_id == self._next_id:
            self._next_id += 1
        if adapter_id >= self._capacity:
            while adapter_id >= self._capacity:
                self._capacity *= 2
            for layer in self._layers.values():
                layer.resize(self._capacity, layer.r_max)
        touched: list[BatchedLoraLinear] = []
        try:
            for module, pair in pairs.items():
                rank = int(pair["lora_A"].shape[0])
                layer = self._layer(module)
                scale = _scaling(adapter.config, module, rank)
                layer.add(adapter_id, pair["lora_A"], pair["lora_B"] * scale)
                touched.append(layer)
        except Exception:
            for layer in touched:
                layer.remove(adapter_id)
            self._free_ids.append(adapter_id)
            raise
        self._ids[slot] = adapter_id
        self._ranks[adapter_id] = max((layer.rank_of[adapter_id] for layer in touched),
                                      default=1)
        self._slot_layers[slot] = touched

    def remove(self, slot: str) -> None:
        adapter_id = self._ids.pop(slot, None)
        if adapter_id is None:
            return
        for layer in self._slot_layers.pop(slot, []):
            layer.remove(adapter_id)
        self._ranks.pop(adapter_id, None)
        self._free_ids.append(adapter_id)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object,
        slots: list[str | None],
    ) -> torch.Tensor:
        ids = [self._ids[s] if s is not None else 0 for s in slots]
        self._ctx.set(ids, [self._ranks.get(i, 0) for i in ids], int(input_ids.shape[1]),
                      self._device)
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
                logits_to_keep=last_position(input_ids),
            )
        finally:
            self._ctx.clear()
        return out.logits[:, -1, :].float()
