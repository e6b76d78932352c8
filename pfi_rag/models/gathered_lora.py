"""Gathered LoRA: every loaded adapter's A and B stacked in slots, one gather per layer per batch.

PEFT's mixed-adapter forward loops over the adapters present in a batch inside every LoRA layer,
so a batch of 8 rows on 8 adapters runs like 8 small batches. Here each LoRA layer keeps

    A  (S, r, in)   the adapters' lora_A weights, slot s holding one adapter (slot 0: none)
    B  (S, out, r)  the adapters' lora_B weights
    scaling (S,)    alpha / r (or alpha / sqrt(r) with rsLoRA); 0 in an empty slot

and a forward pass over a batch whose row b uses slot ``idx[b]`` adds, after the base layer::

    delta = ((x @ A[idx].T) @ B[idx].T) * scaling[idx]      # (B, T, out), two batched matmuls

which is vLLM's CPU path (gather each row's A/B, one batched product per layer) and costs the
same whatever the number of distinct adapters. The base weights are read once per step for the
whole batch. When every row shares one slot (a request alone, or a batch on one adapter), the
plain ``F.linear`` pair runs instead, in PEFT's own order of operations, so a row alone gives the
same floats as PEFT would.

The adapters stay loaded in the ``PeftModel`` as well (probes and scoring use PEFT's own
``adapter_names`` path); :meth:`GatheredLoRA.fill` copies one adapter's weights into a slot after
PEFT loaded it. While :meth:`GatheredLoRA.rows` is active, PEFT's LoRA layers are switched off
(their ``_disable_adapters`` flag, which PEFT's ``forward`` checks first) and forward hooks add
the gathered delta instead. Slots are filled and cleared under the caller's model lock, between
forward passes, so adapters come and go while serving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from peft.tuners.lora import LoraLayer


class UnsupportedAdapter(ValueError):
    """An adapter the gathered path cannot serve (DoRA, a non-Linear target, ...)."""


@dataclass(eq=False)
class _Stack:
    """One LoRA layer's slots."""

    layer: LoraLayer
    A: torch.Tensor  # (S, r, in)
    B: torch.Tensor  # (S, out, r)
    scaling: torch.Tensor  # (S,)


class GatheredLoRA:
    """Slots holding the loaded adapters of ``model``, and the gathered forward that uses them."""

    def __init__(self, model, *, slots: int, rank: int, dtype: torch.dtype = torch.float32):
        self.model = model
        self.rank = rank
        self.dtype = dtype  # the LoRA path stays in this dtype whatever the base model's
        self.capacity = max(2, slots + 1)  # slot 0 is "no adapter" and stays zero
        self._free = list(range(self.capacity - 1, 0, -1))
        # Bumped whenever a slot is filled or emptied: what was computed with a slot (a cached
        # prompt prefix) is valid only for the version it was computed with.
        self.versions = [0] * self.capacity
        self._stacks: dict[str, _Stack] = {}
        self._idx: torch.Tensor | None = None  # (B,) slots of the rows in the current forward
        self._single: int | None = None  # the one slot every row shares, if they do
        self._find_layers()

    # -- slots --------------------------------------------------------------------------------

    def _find_layers(self) -> None:
        """Give every LoRA Linear layer a stack (new ones appear when an adapter targets more)."""
        for name, module in self.model.named_modules():
            if name in self._stacks or not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            if not isinstance(base, torch.nn.Linear):
                continue  # filled only if an adapter uses it; fill() refuses that
            device = base.weight.device
            stack = _Stack(
                layer=module,
                A=torch.zeros(self.capacity, self.rank, base.in_features, dtype=self.dtype, device=device),
                B=torch.zeros(self.capacity, base.out_features, self.rank, dtype=self.dtype, device=device),
                scaling=torch.zeros(self.capacity, dtype=self.dtype, device=device),
            )
            module.register_forward_hook(self._hook(stack))
            self._stacks[name] = stack

    def _grow(self, *, capacity: int | None = None, rank: int | None = None) -> None:
        """More slots or a larger rank: zero-padded copies (call between forward passes)."""
        capacity, rank = capacity or self.capacity, rank or self.rank
        for stack in self._stacks.values():
            a = stack.A.new_zeros(capacity, rank, stack.A.shape[2])
            b = stack.B.new_zeros(capacity, stack.B.shape[1], rank)
            s = stack.scaling.new_zeros(capacity)
            a[: self.capacity, : self.rank] = stack.A
            b[: self.capacity, :, : self.rank] = stack.B
            s[: self.capacity] = stack.scaling
            stack.A, stack.B, stack.scaling = a, b, s
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.versions.extend([0] * (capacity - self.capacity))
        self.capacity, self.rank = capacity, rank

    def fill(self, adapter_name: str) -> int:
        """Copy PEFT adapter ``adapter_name`` into a free slot and return it. Call under the model lock."""
        self._find_layers()
        used = [(stack, stack.layer) for stack in self._stacks.values() if adapter_name in stack.layer.lora_A]
        if not used:
            raise UnsupportedAdapter(f"adapter {adapter_name!r} has no LoRA Linear layer in this model")
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
                if name not in self._stacks:
                    raise UnsupportedAdapter(f"adapter {adapter_name!r} targets {name}, which is not Linear")
                if module.use_dora.get(adapter_name) or adapter_name in getattr(module, "lora_variant", {}):
                    raise UnsupportedAdapter(f"adapter {adapter_name!r} is a LoRA variant (e.g. DoRA)")
        rank = max(layer.lora_A[adapter_name].weight.shape[0] for _, layer in used)
        if rank > self.rank:
            self._grow(rank=rank)
        if not self._free:
            self._grow(capacity=self.capacity * 2)
        slot = self._free.pop()
        self.versions[slot] += 1
        with torch.no_grad():
            for stack, layer in used:
                a = layer.lora_A[adapter_name].weight  # (r, in)
                b = layer.lora_B[adapter_name].weight  # (out, r)
                stack.A[slot].zero_()
                stack.B[slot].zero_()
                stack.A[slot, : a.shape[0]] = a.to(self.dtype)
                stack.B[slot, :, : b.shape[1]] = b.to(self.dtype)
                stack.scaling[slot] = float(layer.scaling[adapter_name])
        return slot

    def clear(self, slot: int) -> None:
        """Empty ``slot`` so a later adapter can take it. Call under the model lock."""
        if slot <= 0 or slot in self._free:
            return
        for stack in self._stacks.values():
            stack.A[slot].zero_()
            stack.B[slot].zero_()
            stack.scaling[slot] = 0
        self.versions[slot] += 1
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # -- the forward --------------------------------------------------------------------------

    @contextlib.contextmanager
    def rows(self, slots: Sequence[int]) -> Iterator[None]:
        """Within this block, forward passes use the gathered path, row ``b`` with ``slots[b]``."""
        unique = set(slots)
        layers = [stack.layer for stack in self._stacks.values()]
        before = [layer._disable_adapters for layer in layers]
        self._single = next(iter(unique)) if len(unique) == 1 else None
        if self._single is None:
            device = next(iter(self._stacks.values())).A.device if self._stacks else None
            self._idx = torch.tensor(list(slots), dtype=torch.long, device=device)
        for layer in layers:
            layer._disable_adapters = True  # PEFT's forward: base layer only; our hook adds the rest
        try:
            yield
        finally:
            for layer, flag in zip(layers, before, strict=True):
                layer._disable_adapters = flag
            self._idx = self._single = None

    @property
    def active(self) -> bool:
        """Whether a :meth:`rows` block is routing the current forward pass."""
        return self._idx is not None or self._single is not None

    @property
    def routes_adapters(self) -> bool:
        """Whether some row of the current forward pass has an adapter (a slot other than 0)."""
        return self._idx is not None or self._single not in (None, 0)

    def delta(self, stack: _Stack, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA delta of ``stack``'s layer for input ``x`` (B, T, in) or (B, in), each row with
        its slot (inside :meth:`rows`); None when every row is on slot 0 (no adapter)."""
        x = x.to(self.dtype)
        if self._single is not None:
            slot = self._single
            if slot == 0:
                return None
            # PEFT's order of operations: lora_B(lora_A(x)) * scaling.
            return F.linear(F.linear(x, stack.A[slot]), stack.B[slot]) * stack.scaling[slot]
        idx = self._idx
        rows = x if x.dim() == 3 else x[:, None, :]  # (B, T, in)
        low = torch.bmm(rows, stack.A[idx].transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(low, stack.B[idx].transpose(1, 2))  # (B, T, out)
        delta = delta * stack.scaling[idx][:, None, None]
        return delta if x.dim() == 3 else delta[:, 0]

    def _hook(self, stack: _Stack):
        def add_delta(module, args, output):
            if not self.active:
                return None  # not inside rows(): PEFT's own path ran
            delta = self.delta(stack, args[0])
            return None if delta is None else output + delta.to(output.dtype)

        return add_delta
