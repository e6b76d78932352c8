"""One-row decode steps' products compiled into reductions over out-major weights.

A request decoding alone multiplies one row by every weight matrix, so it streams the weights
and its speed is bounded by how fast one core reads them. Measured on the default model's shapes
(1 thread, every product of one step): MKL's one-row kernels read fused input-major weights at
17 GB/s and out-major ones at 12 GB/s, where a plain sum reads 30 GB/s. ``torch.compile``
(inductor) turns ``(weight * x).sum(-1)`` over out-major weights into one streaming reduction
per matrix that read them faster than either (18.6 GB/s against MKL's 16.6 in the same run of
``bench/one_stream.py``), and fuses what surrounds the products (RMSNorm, the SiLU gate, the
residual adds) into the same generated kernels.

:class:`CompiledRows` compiles three functions of one decoder step, each once for the model's
shapes (the layers share them), and runs them once on zeros when built, so a missing C++
compiler or an inductor error shows at start-up, where the caller falls back to eager products,
and not in a request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)


def normed_product(h: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(x, x @ weight.T)`` with ``x = rms_norm(h)``: h (1, in), weight (out, in) -> (1, in), (1, out)."""
    x = F.rms_norm(h, (h.shape[-1],), norm_weight, eps)
    return x, (weight * x).sum(-1)[None]


def mlp_block(h, attn, o, norm_weight, gate_up, down, eps: float) -> torch.Tensor:
    """The rest of a Llama decoder layer after attention, for one row: the residual add of
    ``o_proj(attn)``, RMSNorm, SiLU-gated MLP and its residual add (no LoRA on these projections)."""
    h = h + (o * attn).sum(-1)[None]
    x = F.rms_norm(h, (h.shape[-1],), norm_weight, eps)
    gate, up = (gate_up * x).sum(-1).chunk(2)
    return h + (down * (F.silu(gate) * up)).sum(-1)[None]


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for one row x (1, in) and an out-major weight (out, in)."""
    return (weight * x).sum(-1)[None]


class CompiledRows:
    """The compiled one-row functions for a model's shapes, warmed up (compiled) when built.

    ``shapes``: the out-major (out, in) shapes of a layer's ``qkv``, ``o``, ``gate_up``, ``down``
    and of the output projection ``head``; ``norm``: one of the model's RMSNorm weights (the
    calls' guards check its type). Raises whatever compiling raised.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], *, norm: torch.nn.Module):
        # Not fullgraph: should a call ever miss the compilations made here (and dynamo's cap on
        # compilations per function be reached), it runs eagerly instead of failing a request.
        self.normed_product = torch.compile(normed_product, dynamic=False)
        self.mlp_block = torch.compile(mlp_block, dynamic=False)
        self.product = torch.compile(product, dynamic=False)
        # Each function compiles once per shape it serves (products: 3 a model), and dynamo keeps
        # one cache per function for the whole process, capped at 8 compilations by default: a
        # process with several models (or the test suite) would reach it while warming up.
        with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
            self._warm_up(shapes, norm)

    def _warm_up(self, shapes: dict[str, tuple[int, int]], norm: torch.nn.Module) -> None:
        # The weights as the step passes them (plain tensors, made outside inference mode), the
        # activations as it makes them (inside it), so the real calls reuse these compilations.
        dtype, eps = norm.weight.dtype, norm.variance_epsilon
        weights = {name: torch.zeros(shape, dtype=dtype) for name, shape in shapes.items()}
        hidden, norm_weight = shapes["qkv"][1], norm.weight
        with torch.inference_mode():
            h = torch.zeros(1, hidden, dtype=dtype)
            attn = torch.zeros(1, shapes["o"][1], dtype=dtype)
            self.normed_product(h, norm_weight, weights["qkv"], eps)
            self.normed_product(h, norm_weight, weights["head"], eps)
            self.mlp_block(h, attn, weights["o"], norm_weight, weights["gate_up"], weights["down"], eps)
            self.product(attn, weights["o"])
            self.product(torch.zeros(1, shapes["down"][1], dtype=dtype), weights["down"])
            self.product(h, weights["gate_up"])
