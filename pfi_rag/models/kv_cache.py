"""A KV cache layer with room to grow, so a decoding step writes in place instead of reallocating.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``: every
step copies the whole cache of every layer (for 8 rows of 300 tokens on SmolLM2-135M, ~110 MB a
step, a fifth of the weights' own traffic). :class:`PreallocatedLayer` keeps them in a buffer
``(B, kv_heads, capacity, head_dim)`` with ``headroom`` free positions, writes new positions into
it and hands attention a view of the filled part; it reallocates once per ``headroom`` steps.

It stays a ``DynamicLayer`` in every other respect (same mask sizes, same ``keys``/``values``
attributes, assignable), so the decode loop's row merging and dropping, which replace
``layer.keys`` wholesale, keep working unchanged: an assigned tensor becomes a full buffer.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` over a buffer with ``headroom`` free positions at its end."""

    def __init__(self, headroom: int = 64, **kwargs):
        self.headroom = headroom
        self._buffers: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
        self._length = {"keys": 0, "values": 0}
        super().__init__(**kwargs)

    def _view(self, which: str) -> torch.Tensor | None:
        buffer = self._buffers[which]
        return None if buffer is None else buffer[:, :, : self._length[which]]

    def _assign(self, which: str, value: torch.Tensor | None) -> None:
        self._buffers[which] = value
        self._length[which] = value.shape[-2] if value is not None and value.dim() == 4 else 0

    keys = property(lambda self: self._view("keys"), lambda self, v: self._assign("keys", v))
    values = property(lambda self: self._view("values"), lambda self, v: self._assign("values", v))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for which, new in (("keys", key_states), ("values", value_states)):
            buffer, length = self._buffers[which], self._length[which]
            end = length + new.shape[-2]
            if buffer is None or end > buffer.shape[-2] or buffer.shape[0] != new.shape[0]:
                grown = new.new_empty(new.shape[0], new.shape[1], end + self.headroom, new.shape[3])
                if length:
                    grown[:, :, :length] = buffer[:, :, :length]
                buffer = self._buffers[which] = grown
            buffer[:, :, length:end] = new  # (B, kv_heads, t, head_dim) written in place
            self._length[which] = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length["keys"] if self.is_initialized else 0


def preallocated_cache(config, *, headroom: int = 64) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain layers are :class:`PreallocatedLayer` ones."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(headroom) if type(lay) is DynamicLayer else lay for lay in cache.layers]
    return cache
