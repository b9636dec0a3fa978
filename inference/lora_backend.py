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

from .adapters import HostAdapter

log = logging.getLogger("loramux.backend")

BASE_ROW = "__base__"  # PEFT's name for "no adapter on this row"


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
            "logits_to_keep": 1,
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


_MIN_BUCKET = 8


def rank_bucket(rank: int) -> int:
    """The stack width an adapter of this (largest) rank joins: the next power of two, >= 8.

    Rows are grouped by bucket and each group runs at its own width, so one rank-64 tenant
    costs its own rows a rank-64 product and every rank-8 row still a rank-8 one (a single
    stack padded to the widest resident rank taxed every row: -22% measured in the suite).
    Powers of two keep the number of groups per step small and padding below 2x.
    """
    return max(_MIN_BUCKET, 1 << (max(rank, 1) - 1).bit_length())


Key = tuple[int, int]  # (rank bucket, position in that bucket's stacks)


class _RowContext:
    """The per-step adapter index the engine prepares; wrapped layers only read it.

    Rows are grouped by rank bucket once per forward pass, and every layer reads the same
    groups: each adapter sits at the same position of its bucket's stack in every layer (see
    :class:`BatchedLoraBackend`). All groups' indices go to the device in one copy per step
    (into a reused buffer on CUDA), never one per layer.
    """

    def __init__(self) -> None:
        self.present: set[Key] = set()
        self.uniform: Key | None = None  # set when every row uses the same adapter
        # bucket -> (row positions, or None when the group is every row; positions in stack)
        self.groups: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._device_buffer: torch.Tensor | None = None

    def set(self, rows: list[Key | None], device: torch.device | None = None) -> None:
        self.present = {key for key in rows if key is not None}
        self.uniform = rows[0] if rows and len(set(rows)) == 1 else None
        self.groups = {}
        if not self.present or self.uniform is not None:
            return
        grouped: dict[int, tuple[list[int], list[int]]] = {}
        for row, key in enumerate(rows):
            if key is not None:
                positions, locals_ = grouped.setdefault(key[0], ([], []))
                positions.append(row)
                locals_.append(key[1])
        flat: list[int] = []
        for positions, locals_ in grouped.values():
            flat += positions + locals_
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
        offset = 0
        for bucket, (positions, _locals) in grouped.items():
            n = len(positions)
            every_row = n == len(rows)
            self.groups[bucket] = (None if every_row else values[offset:offset + n],
                                   values[offset + n:offset + 2 * n])
            offset += 2 * n

    def clear(self) -> None:
        self.set([])


class BatchedLoraLinear(torch.nn.Module):
    """A base linear layer plus every resident adapter's LoRA pair for it, in rank buckets.

    Adapters live in preallocated stacks per rank bucket, ``A [capacity, bucket, in]`` and
    ``B [capacity, out, bucket]`` (scaling folded into B, ranks zero-padded to the bucket).
    An adapter sits at the same position of its bucket's stack in every layer; a layer it
    does not target holds zeros there. A forward pass gathers each row group's pairs and
    applies them with two batched matmuls per bucket present, so its cost does not grow with
    the number of distinct tenants in the batch (Punica's BGMV idea, in plain torch), and a
    row pays for its own bucket's width only. Adding an adapter writes its rows in place:
    O(adapter size). A bucket's stack is freed when its last adapter leaves the layer.
    """

    def __init__(self, base_layer: torch.nn.Module, ctx: _RowContext,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.lora_dtype = dtype
        self.device = _module_device(base_layer)
        self.stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rank_of: dict[Key, int] = {}  # (bucket, position) -> its rank on this layer

    def capacity(self, bucket: int) -> int:
        stack = self.stacks.get(bucket)
        return 0 if stack is None else int(stack[0].shape[0])

    def resize(self, bucket: int, capacity: int) -> None:
        """(Re)allocate one bucket's stacks with room for ``capacity`` adapters."""
        a = torch.zeros(capacity, bucket, self.in_features, dtype=self.lora_dtype,
                        device=self.device)
        b = torch.zeros(capacity, self.out_features, bucket, dtype=self.lora_dtype,
                        device=self.device)
        old = self.stacks.get(bucket)
        if old is not None:
            rows = min(capacity, old[0].shape[0])
            a[:rows] = old[0][:rows]
            b[:rows] = old[1][:rows]
        self.stacks[bucket] = (a, b)

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter's (A, B) on this layer, sliced to its own rank (views)."""
        rank = self.rank_of[key]
        a, b = self.stacks[key[0]]
        return a[key[1], :rank], b[key[1], :, :rank]

    def add(self, key: Key, lora_a: torch.Tensor, lora_b: torch.Tensor, capacity: int) -> None:
        bucket, position = key
        rank = int(lora_a.shape[0])
        if rank > bucket:
            raise ValueError(f"rank {rank} does not fit bucket {bucket}")
        if self.capacity(bucket) < capacity:
            self.resize(bucket, capacity)
        a, b = self.stacks[bucket]
        a[position].zero_()
        b[position].zero_()
        a[position, :rank] = lora_a.to(a)
        b[position, :, :rank] = lora_b.to(b)
        self.rank_of[key] = rank

    def remove(self, key: Key) -> None:
        if self.rank_of.pop(key, None) is None:
            return
        bucket, position = key
        if not any(other[0] == bucket for other in self.rank_of):
            del self.stacks[bucket]
            return
        a, b = self.stacks[bucket]
        a[position].zero_()
        b[position].zero_()

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        ctx = self.ctx
        if not self.rank_of or ctx.present.isdisjoint(self.rank_of):
            return result
        xf = x.to(self.lora_dtype)
        if ctx.uniform is not None:
            a, b = self.weights(ctx.uniform)  # every row: the adapter's exact rank
            return result + ((xf @ a.T) @ b.T).to(result.dtype)
        rows = xf.shape[0]
        flat = xf.reshape(rows, -1, self.in_features)
        out = result.reshape(rows, -1, self.out_features)
        for bucket, (positions, index) in ctx.groups.items():
            stack = self.stacks.get(bucket)
            if stack is None:
                continue
            index = index.to(self.device)  # a no-op unless the model spans devices
            a = stack[0].index_select(0, index)  # [group rows, bucket, in]
            b = stack[1].index_select(0, index)  # [group rows, out, bucket]
            part = flat if positions is None else flat.index_select(0, positions.to(index))
            delta = torch.bmm(torch.bmm(part, a.transpose(1, 2)), b.transpose(1, 2))
            if positions is None:
                out = out + delta.to(out.dtype)
            else:
                out = out.index_add(0, positions.to(index), delta.to(out.dtype))
        return out.reshape(result.shape)


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
    """loramux's own multi-adapter layers: one gathered matmul pair per rank bucket per layer.

    Each targeted linear layer of the base is wrapped once by :class:`BatchedLoraLinear`;
    the engine's per-row adapter list becomes (bucket, position) keys in a shared context
    that the layers read. Nothing in a layer knows about tenants.
    """

    def __init__(self, model: torch.nn.Module, lora_dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.lora_dtype = lora_dtype
        self._ctx = _RowContext()
        self._keys: dict[str, Key] = {}
        self._free: dict[int, list[int]] = {}  # bucket -> free positions
        self._next: dict[int, int] = {}  # bucket -> first never-used position
        # Every layer's stack of a bucket has this many positions (doubled when a position
        # does not fit), so any row's key indexes every layer.
        self._capacity: dict[int, int] = {}
        self._layers: dict[str, BatchedLoraLinear] = {}
        self._slot_layers: dict[str, list[BatchedLoraLinear]] = {}
        self._device = _module_device(model)

    def _layer(self, path: str) -> BatchedLoraLinear:
        layer = self._layers.get(path)
        if layer is None:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            layer = BatchedLoraLinear(getattr(parent, child), self._ctx, self.lora_dtype)
            setattr(parent, child, layer)
            self._layers[path] = layer
        return layer

    def _take_position(self, bucket: int) -> int:
        free = self._free.setdefault(bucket, [])
        free.sort(reverse=True)  # reuse the lowest free position: stacks stay small
        if free:
            return free.pop()
        position = self._next.get(bucket, 0)
        self._next[bucket] = position + 1
        capacity = self._capacity.get(bucket, 8)
        if position >= capacity:
            while position >= capacity:
                capacity *= 2
            for layer in self._layers.values():
                if layer.capacity(bucket):
                    layer.resize(bucket, capacity)
        self._capacity[bucket] = capacity
        return position

    def add(self, slot: str, adapter: HostAdapter) -> None:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in adapter.tensors.items():
            stripped = key.removeprefix("base_model.model.")
            module, _, _weight = stripped.rpartition(".")
            module, _, which = module.rpartition(".")
            pairs.setdefault(module, {})[which] = tensor
        bucket = rank_bucket(max((int(p["lora_A"].shape[0]) for p in pairs.values()),
                                 default=1))
        key = (bucket, self._take_position(bucket))
        touched: list[BatchedLoraLinear] = []
        try:
            for module, pair in pairs.items():
                rank = int(pair["lora_A"].shape[0])
                layer = self._layer(module)
                scale = _scaling(adapter.config, module, rank)
                layer.add(key, pair["lora_A"], pair["lora_B"] * scale, self._capacity[bucket])
                touched.append(layer)
        except Exception:
            for layer in touched:
                layer.remove(key)
            self._free[bucket].append(key[1])
            raise
        self._keys[slot] = key
        self._slot_layers[slot] = touched

    def remove(self, slot: str) -> None:
        key = self._keys.pop(slot, None)
        if key is None:
            return
        for layer in self._slot_layers.pop(slot, []):
            layer.remove(key)
        self._free.setdefault(key[0], []).append(key[1])

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object,
        slots: list[str | None],
    ) -> torch.Tensor:
        self._ctx.set([self._keys[s] if s is not None else None for s in slots], self._device)
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
        finally:
            self._ctx.clear()
        return out.logits[:, -1, :].float()
