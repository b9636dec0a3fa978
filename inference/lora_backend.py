"""The seam between the engine and the per-row LoRA computation.

The engine hands a backend one forward pass: token ids, masks, positions, the KV cache and
one adapter slot per row. The backend alone knows how adapters live in the model. The first
implementation is PEFT's mixed-batch forward (``adapter_names``); a batched kernel (one
gathered matmul over all rows' adapters, as in Punica/S-LoRA) can replace it without the
engine changing.
"""

from __future__ import annotations

import logging
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
