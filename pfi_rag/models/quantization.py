"""Base-model weight formats for serving on a CPU: fewer bytes, or bytes in a faster order.

A request decoding alone reads every weight once per token, so on a CPU its speed is bounded by
memory bandwidth over the weights' size (docs/serving.md, "One stream on a CPU").

- ``transposed`` (``serving.weight_format = "transposed"``): fp32 weights, the same values,
  stored input-major: each Linear's ``weight`` is a (out, in) view of an (in, out) contiguous
  tensor, so ``F.linear`` of one row is a row-times-matrix product that streams the weight in
  memory order. Measured on the default model's shapes, one thread (bench/one_stream.py
  --kernels): every Linear once on one row 47.6 ms instead of 54.0, on 8 rows 87.7 instead of
  98.7, on 100 rows the same. A tied output projection shares its storage with the embedding
  table, whose row lookups then gather strided values (one row per decoded token: negligible).

Two int8 formats, both with one scale per output channel (symmetric, ``scale = max|w| / 127``):

- ``int8`` (weight only, ``serving.weight_format = "int8"``): the weights are int8, the
  activations stay floating point (bf16 inside the kernel, ``torch._weight_int8pack_mm``).
  On the synthetic QA it keeps fp32's exact-answer rate; on a batch of 100 prompt tokens the
  kernel is a little slower than fp32's, on one decoded token ~2x faster.
- ``int8-dynamic``: activations are quantized too, per row at run time (``quantize_dynamic``'s
  kernel, fbgemm/oneDNN with VNNI): faster still, but exact answers on the synthetic QA fell
  from 70% to 15% (bench/answers.py --weights), so it is measured, not offered as a setting.

Only the base model is quantized: LoRA matrices stay fp32 (PEFT and gathered LoRA see an int8
base layer, ask it for nothing but its output, and add their fp32 delta). The output projection
gets its own int8 copy; the embedding table stays fp32 for lookups (one row read per token).
Serving only: training needs the fp32 weights' gradients. CPU only.
"""

from __future__ import annotations

import torch

FORMATS = ("none", "transposed", "int8", "int8-dynamic")


def _per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 codes (out, in) and scales (out,) of a float weight."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


class Int8Linear(torch.nn.Linear):
    """A ``Linear`` whose weight is int8 with one scale per output row (serving only, no grad).

    It stays an ``nn.Linear`` (``in_features``, ``out_features``, ``weight`` with the int8 codes),
    so PEFT wraps it as a LoRA target like any other Linear layer.
    """

    def __init__(self, linear: torch.nn.Linear, *, dynamic: bool):
        torch.nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dynamic = dynamic
        codes, scales = _per_channel(linear.weight)
        self.weight = torch.nn.Parameter(codes, requires_grad=False)  # (out, in) int8
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().float(), False)
        if dynamic:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            values = codes.float() * scales[:, None]
            qweight = torch.quantize_per_channel(values, scales, zeros, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, self.bias)
        else:
            self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, in)
        if self.dynamic:
            # reduce_range: 7-bit activations, as quantize_dynamic's x86 default (no VNNI overflow).
            y = torch.ops.quantized.linear_dynamic(flat.float(), self._packed, True)
        else:
            y = torch._weight_int8pack_mm(flat.to(torch.bfloat16), self.weight, self.scales)
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The float weight these codes stand for (out, in) (tests, comparisons)."""
        scales = self.scales.float() if not self.dynamic else self._scales_from_packed()
        return self.weight.float() * scales[:, None]

    def _scales_from_packed(self) -> torch.Tensor:
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.q_per_channel_scales().float()

    def extra_repr(self) -> str:
        kind = "int8 weights and activations" if self.dynamic else "int8 weights"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def quantize_linear_layers(model, fmt: str) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (before PEFT wraps it) by an :class:`Int8Linear`,
    or store its weight input-major (``"transposed"``).

    ``fmt`` is one of :data:`FORMATS`; ``"none"`` leaves the model as is. Returns how many layers
    were changed. For int8 a tied output projection is untied first (its int8 copy is separate
    from the fp32 embedding table).
    """
    if fmt not in FORMATS:
        raise ValueError(f"weight format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "none":
        return 0
    if hasattr(model, "peft_config"):
        raise ValueError("quantize the base model before LoRA layers are attached")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"{fmt} weights are for a CPU (the model is on {device}); use models.dtype on a GPU")
    if fmt == "transposed":
        return _store_input_major(model)
    replaced = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(module, name, Int8Linear(child, dynamic=fmt == "int8-dynamic"))
                    replaced += 1
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so nothing re-ties the int8 head to the embedding
    return replaced


def _store_input_major(model) -> int:
    """Re-lay every plain Linear weight as the (out, in) view of a contiguous (in, out) tensor."""
    changed = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module) is torch.nn.Linear and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()  # (out, in) view, in-major
                changed += 1
    return changed


def is_input_major(weight: torch.Tensor) -> bool:
    """Whether a (out, in) weight is stored input-major (the ``transposed`` format, or a slice of the
    lean decode step's fused (in, outs) tensors): consecutive outputs of one input lie side by side."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) >= weight.shape[0] > 1


def weight_bytes_read_per_token(model) -> int:
    """Bytes of weights one decoded token reads: every parameter once, but one row of an embedding
    table that is not also the output projection (int8 models keep an fp32 table for lookups)."""
    total, seen = 0, set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, torch.nn.Embedding) and not tied:
                total += param.shape[1] * param.element_size()
            else:
                total += param.numel() * param.element_size()
        if isinstance(module, Int8Linear):
            total += module.out_features * (4 if module.dynamic else 2)  # the scales
    return total
