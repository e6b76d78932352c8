"""Serving options on the tiny random Llama: int8 base weights under LoRA, when the decode step compiles."""

from __future__ import annotations

import copy

import pytest
import torch

from pfi_rag.config import Config, ServingConfig
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.adapters import client_adapter_dir
from pfi_rag.models.compiled import wants_compile
from pfi_rag.models.quantization import Int8Linear, quantize_linear_layers, weight_bytes_read_per_token
from tests.generation_support import (
    PASSAGES,
    QUESTION,
    engines_by_weight_format,
    last_token_logits,
    save_strong_adapter,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("fmt", ["int8", "int8-dynamic"])
def test_int8_base_weights_keep_the_logits_and_the_fp32_lora_path(tiny_generator, tmp_path, fmt):
    base, tokenizer, _ = tiny_generator
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=1)
    engines = engines_by_weight_format(base, tokenizer, tmp_path, ("none", fmt), max_new_tokens=8)
    quantized = engines[fmt].model.get_base_model()
    assert weight_bytes_read_per_token(quantized) < weight_bytes_read_per_token(base) / 3
    lora = [p for n, p in engines[fmt].model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # only the base model is int8

    request = GenerationRequest("c1", QUESTION, passages=PASSAGES)
    slots, logits = last_token_logits(engines, request)
    assert slots[fmt] != 0  # the adapter took a slot on the int8 model too
    correlation = torch.corrcoef(torch.stack([logits[fmt], logits["none"]]))[0, 1]
    assert correlation > 0.98  # close, not equal
    assert not torch.equal(logits[fmt], logits["none"])
    assert len(engines[fmt].generate(request).token_ids) == 8


def test_int8_refuses_a_wrapped_model_and_unknown_formats(tiny_generator, tmp_path):
    engine = Engine(copy.deepcopy(tiny_generator[0]), tiny_generator[1], data_root=tmp_path)
    with pytest.raises(ValueError, match="before LoRA"):
        quantize_linear_layers(engine.model, "int8")
    with pytest.raises(ValueError, match="int8-dynamic"):
        quantize_linear_layers(copy.deepcopy(tiny_generator[0]), "int4")
    assert not any(isinstance(m, Int8Linear) for m in engine.model.modules())


def test_the_whole_decode_step_compiles_on_cuda_only_and_the_lean_rows_on_a_cpu(tiny_generator, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [wants_compile("auto", cpu), wants_compile("auto", cuda)] == [False, True]
    assert [wants_compile("on", cpu), wants_compile("off", cuda)] == [True, False]
    engine = Engine(copy.deepcopy(tiny_generator[0]), tiny_generator[1], data_root=tmp_path)
    assert engine.compiled is None and engine.new_batch().compiled is None  # CPU: the model eager
    assert engine.lean.compiled_rows is not None  # ... and the lean step's one-row products compiled
    serving = ServingConfig(compile_decode="off")
    eager = Engine(copy.deepcopy(tiny_generator[0]), tiny_generator[1], data_root=tmp_path, serving=serving)
    assert eager.compiled is None and eager.lean.compiled_rows is None


def test_the_weight_format_setting_quantizes_the_served_model(tiny_models_config, tmp_path):
    cfg = Config(data_root=tmp_path, models=tiny_models_config, serving=ServingConfig(weight_format="int8"))
    engine = Engine.from_config(cfg)
    layers = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 15 and not layers[0].dynamic
    assert engine.generate(GenerationRequest("c1", QUESTION, passages=PASSAGES, max_new_tokens=4)).token_ids
