"""The decode step compiled with ``torch.compile`` on a GPU: fewer, fused kernels per step.

On a GPU a decoding step of a 135M model is thousands of small kernel launches (every norm,
rotary embedding, LoRA product and residual add is its own kernel), so the GPU idles between
launches and batching cannot help much. ``torch.compile`` (inductor) fuses the elementwise work
into a few kernels. The step keeps dynamic shapes (``dynamic=True``): the batch's rows and the
cache length change between steps, as rows join and leave mid-flight, so one compiled graph
serves every step rather than one per shape. CUDA graphs (``mode="reduce-overhead"``) would cut
launches further but record one graph per shape, i.e. per step here; they are not used.

Only the one-token decode steps are compiled; prefill runs eagerly (its shapes vary most and it
is compute-bound anyway). The first compiled steps take seconds to compile; should compiling
or a compiled step fail (an unsupported op, a driver issue), the failure is logged once and
every later step runs eagerly, so a serving process never fails because of the compiler.

``serving.compile_decode``: ``auto`` compiles on CUDA only (CPU behaviour unchanged), ``on``
compiles on any device (inductor's CPU backend needs a C++ compiler), ``off`` never.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)


def wants_compile(setting: str, device: torch.device) -> bool:
    if setting == "on":
        return True
    return setting == "auto" and device.type == "cuda"


class CompiledDecode:
    """Callable like the model; runs it compiled, or eagerly once compiling has failed."""

    def __init__(self, model, *, mode: str | None = None):
        self.model = model
        self._compiled = torch.compile(model, dynamic=True, mode=mode)
        self.failed: str | None = None  # why compiled steps stopped, once they did
        self.calls = 0  # steps that ran compiled
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            layers = [layer for layer in getattr(cache, "layers", ()) if hasattr(layer, "_length")]
            lengths = [dict(layer._length) for layer in layers]
            try:
                out = self._compiled(*args, **kwargs)
            except Exception as exc:  # the compiler's own errors vary by backend and version
                # A graph break may have run part of the step already: undo its cache writes
                # (PreallocatedLayer only appends past its length) before running it eagerly.
                for layer, length in zip(layers, lengths, strict=True):
                    layer._length = length
                with self._lock:
                    if self.failed is None:
                        self.failed = f"{type(exc).__name__}: {exc}"[:500]
                        logger.warning("compiled decode step failed, decoding eagerly from now on: %s",
                                       self.failed)  # fmt: skip
            else:
                self.calls += 1
                return out
        return self.model(*args, **kwargs)
