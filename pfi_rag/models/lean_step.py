"""A lean one-token decode step for Llama-architecture models, on fused weights.

One request decoding alone on a CPU reads every weight once per token, so its speed is bounded
by memory bandwidth over the weights' bytes (docs/serving.md, "One stream on a CPU"). Two things
kept transformers' own forward far from that bound: its products read (out, in) weights across
rows, and everything around them (hooks, masks built per layer, rotary per layer, attention that
copies the whole KV cache to repeat 3 key/value heads for 9 query heads) cost as much again as
the products. :class:`LeanStep` runs the same arithmetic as ``LlamaForCausalLM`` for one new token
per row, with

- the weights fused and stored once, input-major for MKL's one-row products (out-major for the
  compiled ones, below): per layer ``qkv`` (hidden, (H + 2 KV) d), ``o`` (H d, hidden),
  ``gate_up`` (hidden, 2 I), ``down`` (I, hidden), and the output projection (hidden, V). The
  model's own ``nn.Linear`` weights become (out, in) views into these tensors, so there is no
  second copy and prefill (still transformers' forward) reads the same memory;
- the residual adds fused into the products (``torch.addmm``);
- rotary cos/sin from the model's own rotary module (every rope type it knows), computed once
  per step instead of once per layer;
- grouped-query attention without repeating keys: a row's G query heads that share a key/value
  head attend as one (G, d) block against that head's (T, d) keys;
- new keys and values written into the decode loop's cache layers (``PreallocatedLayer``), so
  prefill and row merging stay on transformers' forward and the loop's own code;
- each row's gathered-LoRA delta (``GatheredLoRA.delta``, fp32) added to its projection's slice
  of the fused outputs;
- for steps of two rows or more on a CPU (``packed_batches``), a second copy of the fused
  weights packed once for oneDNN's inner product (:class:`_PackedWeights`);
- optionally (``compiled_rows``), one-row steps through products compiled into reductions over
  out-major weights, with the norms, the SiLU gate and the residual adds fused around them
  (:mod:`pfi_rag.models.lean_rows`); the fused weights are then stored out-major.

:func:`lean_step_for` says why a model cannot take this path (another architecture, biases,
another activation, int8 weights); the decode loop then keeps transformers' forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)

logger = logging.getLogger(__name__)

_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")


def _base_linear(module) -> torch.nn.Linear:
    """The plain Linear under a PEFT LoRA wrapper (or the module itself)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """``LlamaRMSNorm`` in one call (bit for bit the same values on CPU fp32, measured; ~2x faster)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def unsupported_reason(model) -> str | None:
    """Why ``model`` (a PeftModel or a plain causal LM) cannot decode with :class:`LeanStep`, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if type(base).__name__ != "LlamaForCausalLM" or getattr(config, "model_type", None) != "llama":
        return f"{type(base).__name__} is not LlamaForCausalLM"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model's projections have biases"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    layers = base.model.layers
    norms = [base.model.norm]
    norms += [norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    if any(type(norm).__name__ != "LlamaRMSNorm" for norm in norms):
        return "its norms are not LlamaRMSNorm"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in [*(getattr(attn, n) for n in (*_ATTENTION, "o_proj")),
                       *(getattr(mlp, n) for n in (*_MLP, "down_proj"))]:  # fmt: skip
            linear = _base_linear(module)
            if type(linear) is not torch.nn.Linear or not linear.weight.is_floating_point():
                return f"{type(linear).__name__} layers (only float nn.Linear weights are fused)"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "the output projection is not a plain Linear"
    return None


class _Arena:
    """One flat buffer holding every fused weight in the order a step reads them.

    Measured on the default model's shapes (1 thread): the same one-row products over weights
    laid end to end in one buffer ran ~5% faster than over separate allocations (the hardware
    prefetcher keeps streaming from one matrix into the next).
    """

    def __init__(self, groups: list[list[torch.nn.Linear]], *, input_major: bool = True):
        first = groups[0][0].weight
        total = sum(linear.weight.numel() for group in groups for linear in group)
        self.buffer = torch.empty(total, dtype=first.dtype, device=first.device)
        self.input_major = input_major
        self._offset = 0

    def fuse(self, linears: list[torch.nn.Linear]) -> torch.Tensor:
        """The Linears' weights as one tensor in the buffer, (in, sum of outs) input-major or
        (sum of outs, in) out-major; each Linear's weight becomes a (out, in) view of it, so the
        model keeps no second copy."""
        width = sum(linear.out_features for linear in linears)
        size = linears[0].in_features * width
        flat = self.buffer[self._offset : self._offset + size]
        self._offset += size
        # (sum of outs, in) either way: stored so, or the transpose of the stored input-major tensor
        fused = flat.view(linears[0].in_features, width).t() if self.input_major else flat.view(width, -1)
        start = 0
        for linear in linears:
            end = start + linear.out_features
            fused[start:end] = linear.weight.detach()
            linear.weight.data = fused[start:end]  # (out, in) view into the buffer
            start = end
        return fused.t() if self.input_major else fused


@dataclass(eq=False)
class _Layer:
    """One decoder layer's fused weights and where its projections (and their LoRA wrappers) live."""

    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    qkv: torch.Tensor  # (hidden, (H + 2 KV) d)
    o: torch.Tensor  # (H d, hidden)
    gate_up: torch.Tensor  # (hidden, 2 I)
    down: torch.Tensor  # (I, hidden)
    # projection name -> its parent (self_attn or mlp). The projection itself is looked up there
    # at each step: loading an adapter that targets a projection no earlier adapter did makes PEFT
    # replace that module with a LoRA wrapper, whose delta the step must then add.
    parents: dict[str, torch.nn.Module]


class _PackedWeights:
    """The fused weights again, each packed once into oneDNN's blocked layout, for steps of two
    rows or more.

    MKL's products of a few rows re-pack the weights they read on every call. Measured on the
    default model's shapes (1 thread, every product of one step): 8 rows took 2.5x as long as one
    row on the input-major weights, against about 1.2x through oneDNN on weights packed once.
    One row stays on MKL and the input-major weights, which it reads faster than oneDNN does.
    The copy costs the weights' bytes again (538 MB for the default model in fp32), so it is made
    at the first step of two rows or more, not at load.
    """

    def __init__(self, weights: list[torch.Tensor], *, input_major: bool):
        # The packing reads (out, in) weights; a transposed copy of one matrix lives at a time.
        pack = torch.ops.mkldnn._reorder_linear_weight  # (out, in) weight, expected rows
        self._packed = {id(w): pack((w.t() if input_major else w).contiguous(), 8) for w in weights}
        self.nbytes = sum(w.numel() * w.element_size() for w in weights)

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return (
            weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
        )

    def mm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` times the fused ``weight`` (either layout), through its packed copy."""
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[id(weight)], None, "none", [], "")

    def addmm(self, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``h + x`` times ``weight``, the add fused into the product."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, h, self._packed[id(weight)], None, "add")


class LeanStep:
    """One-token decode steps of a Llama model, sharing its weights and the decode loop's cache.

    ``packed_batches``: steps of two rows or more read a packed second copy of the weights
    (:class:`_PackedWeights`, made at the first such step) where the CPU's oneDNN can; else every
    step reads the shared fused weights. ``compiled_rows``: one-row steps run compiled
    (:class:`~pfi_rag.models.lean_rows.CompiledRows`) over out-major fused weights; when
    compiling fails (no C++ compiler, say) the step says why once and stays eager."""

    def __init__(self, model, *, gathered=None, packed_batches: bool = True, compiled_rows: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean decode step does not support this model: {reason}")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        self.gathered = gathered
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.intermediate = config.intermediate_size
        self.scaling = self.head_dim**-0.5
        self.embed = base.get_input_embeddings()
        self.rotary = base.model.rotary_emb
        self.final_norm = base.model.norm
        self.layers: list[_Layer] = []
        groups_of = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            parents = {n: attn for n in (*_ATTENTION, "o_proj")} | {n: mlp for n in (*_MLP, "down_proj")}
            linears = {n: _base_linear(getattr(parent, n)) for n, parent in parents.items()}
            groups = [[linears[n] for n in _ATTENTION], [linears["o_proj"]],
                      [linears[n] for n in _MLP], [linears["down_proj"]]]  # fmt: skip
            groups_of.append((layer, parents, groups))
        head = base.get_output_embeddings()
        first = base.model.layers[0].input_layernorm
        self.compiled_rows = _compiled_rows(first, groups_of[0][2], head) if compiled_rows else None
        groups = [g for _, _, layer_groups in groups_of for g in layer_groups] + [[head]]
        arena = _Arena(groups, input_major=self.compiled_rows is None)
        self.input_major = arena.input_major
        with torch.no_grad():
            for layer, parents, groups in groups_of:
                qkv, o, gate_up, down = (arena.fuse(group) for group in groups)
                self.layers.append(_Layer(layer.input_layernorm, layer.post_attention_layernorm,
                                          qkv, o, gate_up, down, parents))  # fmt: skip
            # A tied output projection shares this tensor with the embedding table, whose row
            # lookups read strided values when it is input-major: the step looks its tokens up
            # in ``head`` itself.
            self.head = arena.fuse([head])  # (hidden, V), or (V, hidden) out-major
        self._tied = head.weight is self.embed.weight
        self.buffer = arena.buffer
        self._stacks: dict[int, object] = {}  # id(LoRA wrapper) -> its gathered-LoRA stack
        self._stack_count = -1
        self._packed: _PackedWeights | None = None
        self._pack_batches = packed_batches and _PackedWeights.fits(self.head)

    def _weights_for(self, rows: int) -> _PackedWeights | None:
        """The packed weights for a step of ``rows`` rows (None: the shared fused ones)."""
        if rows < 2 or not self._pack_batches:
            return None
        if self._packed is None:
            weights = [w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
            try:
                self._packed = _PackedWeights([*weights, self.head], input_major=self.input_major)
            except RuntimeError as exc:  # a oneDNN build that cannot pack these: stay on MKL
                logger.info("batched decode steps read the shared weights: packing failed (%s)", exc)
                self._pack_batches = False
                return None
            logger.info(
                "batched decode steps read a packed copy of the weights (%.0f MB more memory; "
                "serving.batched_weights = shared keeps one copy)",
                self._packed.nbytes / 2**20,
            )
        return self._packed

    def _stack(self, layer: _Layer, name: str):
        """The gathered-LoRA stack of ``layer``'s projection ``name`` (None: no LoRA layer there)."""
        wrapper = getattr(layer.parents[name], name)
        stacks = self.gathered._stacks
        if len(stacks) != self._stack_count:  # an adapter targeting more layers added stacks
            self._stacks = {id(stack.layer): stack for stack in stacks.values()}
            self._stack_count = len(stacks)
        return self._stacks.get(id(wrapper))

    def _add_lora(self, out: torch.Tensor, x: torch.Tensor, layer: _Layer, names, sizes) -> None:
        """Add each named projection's gathered LoRA delta to its slice of ``out`` (B, sum of sizes)."""
        start = 0
        for name, size in zip(names, sizes, strict=True):
            stack = self._stack(layer, name)
            if stack is not None:
                delta = self.gathered.delta(stack, x)  # (B, size) or None
                if delta is not None:
                    out[:, start : start + size] += delta.to(out.dtype)
            start += size

    def __call__(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        """Logits (B, V) of the next token after ``tokens`` (B, 1) at ``positions`` (B, 1).

        ``mask`` (B, T) marks the cached positions (this step's included) that are real tokens;
        ``cache`` holds each layer's keys/values before this step and receives this step's. Call it
        inside ``GatheredLoRA.rows`` (with gathered LoRA) and ``torch.inference_mode``.
        """
        lora = self.gathered is not None and self.gathered.routes_adapters
        if not self._tied:
            h = self.embed(tokens[:, 0])  # (B, hidden)
        elif self.input_major:  # a column of the head (the embedding's view would copy it whole)
            h = self.head[:, tokens[:, 0]].t().contiguous()  # (B, hidden)
        else:
            h = self.head[tokens[:, 0]]  # (B, hidden)
        B, hd, kv, d = h.shape[0], self.heads * self.head_dim, self.kv_heads, self.head_dim
        mm, addmm = self._products(B)
        rows = self.compiled_rows if B == 1 else None  # compiled one-row blocks, or None
        cos, sin = self.rotary(h, positions)  # (B, 1, d) each, the model's own rope
        half = d // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2] (a sign flip is exact)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        # Padding positions (a row that joined a longer batch): -inf before the softmax, as the
        # additive mask of transformers' eager attention does; none for a batch without padding.
        bias = None
        if not bool(mask.all()):
            bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device)
            bias.masked_fill_(mask == 0, torch.finfo(h.dtype).min)
            bias = bias[:, None, None, :]  # (B, 1, 1, T)
        sizes_qkv = (hd, kv * d, kv * d)
        for index, layer in enumerate(self.layers):
            if rows is not None:
                norm = layer.input_norm
                x, qkv = rows.normed_product(h, norm.weight, layer.qkv, norm.variance_epsilon)
            else:
                x = _rms_norm(h, layer.input_norm)  # (B, hidden)
                qkv = mm(x, layer.qkv)  # (B, (H + 2 KV) d)
            if lora:
                self._add_lora(qkv, x, layer, _ATTENTION, sizes_qkv)
            qk = qkv[:, : hd + kv * d].view(B, self.heads + kv, d)  # queries and keys rotate alike
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)  # (B, H + KV, d)
            q = qk[:, : self.heads].view(B, kv, self.group, d)  # (B, KV, G, d): G queries per key head
            k = qk[:, self.heads :, None, :]  # (B, KV, 1, d)
            v = qkv[:, hd + kv * d :].view(B, kv, 1, d)
            keys, values = cache.layers[index].update(k, v)  # (B, KV, T, d) each, written in place
            scores = torch.matmul(q, keys.transpose(2, 3))  # (B, KV, G, T)
            scores.mul_(self.scaling)
            if bias is not None:
                scores.add_(bias)
            attn = torch.matmul(torch.softmax(scores, dim=-1), values).reshape(B, hd)  # (B, H d)
            if rows is not None and not (lora and self._lora_after_attention(layer)):
                norm = layer.post_norm
                h = rows.mlp_block(h, attn, layer.o, norm.weight, layer.gate_up, layer.down,
                                   norm.variance_epsilon)  # fmt: skip
                continue
            h = self._residual(h, attn, layer.o, layer, "o_proj", lora, mm, addmm)  # h + o_proj(attn)
            x = _rms_norm(h, layer.post_norm)
            gate_up = mm(x, layer.gate_up)  # (B, 2 I)
            if lora:
                self._add_lora(gate_up, x, layer, _MLP, (self.intermediate, self.intermediate))
            act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]  # (B, I)
            h = self._residual(h, act, layer.down, layer, "down_proj", lora, mm, addmm)  # h + down_proj(act)
        if rows is not None:
            norm = self.final_norm
            return rows.normed_product(h, norm.weight, self.head, norm.variance_epsilon)[1].float()
        return mm(_rms_norm(h, self.final_norm), self.head).float()  # (B, V)

    def _products(self, rows: int):
        """``(mm, addmm)`` for a step of ``rows`` rows: ``mm(x, w)`` is x times the fused weight w
        and ``addmm(h, x, w)`` adds h to it, for the weights and kernels this step reads."""
        packed = self._weights_for(rows)
        if packed is not None:
            return packed.mm, packed.addmm
        if rows == 1 and self.compiled_rows is not None:
            product = self.compiled_rows.product
            return product, lambda h, x, weight: h + product(x, weight)
        if self.input_major:
            return torch.mm, torch.addmm
        return F.linear, lambda h, x, weight: torch.addmm(h, x, weight.t())

    def _lora_after_attention(self, layer: _Layer) -> bool:
        """Whether a loaded adapter has LoRA on ``layer``'s o, gate, up or down projection."""
        return any(self._stack(layer, name) is not None for name in ("o_proj", *_MLP, "down_proj"))

    def _residual(self, h, x, weight, layer: _Layer, name: str, lora: bool, mm, addmm) -> torch.Tensor:
        """``h + x @ weight`` (+ the projection's LoRA delta), the residual add fused into the product."""
        stack = self._stack(layer, name) if lora else None
        delta = None if stack is None else self.gathered.delta(stack, x)
        if delta is None:
            return addmm(h, x, weight)
        return h + (mm(x, weight) + delta.to(h.dtype))  # PEFT's order: base output + delta, then residual


def _compiled_rows(norm, groups: list[list[torch.nn.Linear]], head: torch.nn.Linear):
    """:class:`~pfi_rag.models.lean_rows.CompiledRows` for the model's shapes (``groups``: one
    layer's q/k/v, o, gate/up and down Linears; ``norm``: one of its RMSNorms), or None, logged,
    when compiling fails."""
    from pfi_rag.models.lean_rows import CompiledRows

    qkv, (o,), gate_up, (down,) = groups
    shapes = {
        "qkv": (sum(linear.out_features for linear in qkv), o.out_features),
        "o": (o.out_features, o.in_features),
        "gate_up": (sum(linear.out_features for linear in gate_up), o.out_features),
        "down": (down.out_features, down.in_features),
        "head": (head.out_features, head.in_features),
    }
    try:
        return CompiledRows(shapes, norm=norm)
    except Exception as exc:  # the compiler's own errors vary by backend and version
        logger.warning("one-row decode steps stay eager: compiling them failed (%s)", f"{exc}"[:300])
        return None


def lean_step_for(
    model, *, gathered=None, packed_batches: bool = True, compiled_rows: bool = False
) -> LeanStep | None:
    """A :class:`LeanStep` for ``model``, or None (logged once, with the reason) when it has none."""
    reason = unsupported_reason(model)
    if reason is not None:
        logger.info("decoding with the model's own forward: the lean decode step does not fit (%s)", reason)
        return None
    return LeanStep(model, gathered=gathered, packed_batches=packed_batches, compiled_rows=compiled_rows)
