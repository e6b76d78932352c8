"""The ``transposed`` weight format on the tiny random Llama: same values, faster order, set by config."""

from __future__ import annotations

import copy

import pytest
import torch

from pfi_rag.config import Config, ServingConfig
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.adapters import client_adapter_dir
from pfi_rag.models.quantization import is_input_major, quantize_linear_layers
from tests.generation_support import (
    PASSAGES,
    QUESTION,
    engines_by_weight_format,
    last_token_logits,
    save_strong_adapter,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def base_linears(engine: Engine) -> dict[str, torch.nn.Linear]:
    model = engine.model.get_base_model()
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}


def test_transposed_weights_keep_the_values_and_the_greedy_tokens_under_an_adapter(tiny_generator, tmp_path):
    base, tokenizer, _ = tiny_generator
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=1)
    engines = engines_by_weight_format(base, tokenizer, tmp_path, ("none", "transposed"), max_new_tokens=12)

    reference, transposed = base_linears(engines["none"]), base_linears(engines["transposed"])
    assert reference.keys() == transposed.keys() and len(reference) == 15
    for name, layer in transposed.items():
        assert is_input_major(layer.weight) and not is_input_major(reference[name].weight)
        assert torch.equal(layer.weight, reference[name].weight)  # same values, other order in memory
    lora = [p for n, p in engines["transposed"].model.named_parameters() if "lora_" in n]
    assert lora and all(p.is_contiguous() for p in lora)  # the adapter's matrices are left alone

    request = GenerationRequest("c1", QUESTION, passages=PASSAGES)
    slots, logits = last_token_logits(engines, request)
    assert slots["transposed"] != 0  # the adapter is applied on the transposed model too
    torch.testing.assert_close(logits["transposed"], logits["none"], rtol=1e-4, atol=1e-4)
    answers = {fmt: engine.generate(request).token_ids for fmt, engine in engines.items()}
    assert len(answers["none"]) == 12 and answers["transposed"] == answers["none"]


@pytest.mark.parametrize("fmt", ["none", "transposed"])
def test_the_weight_format_setting_decides_the_served_layout(tiny_models_config, tmp_path, fmt):
    serving = ServingConfig(weight_format=fmt, decode_step="transformers")
    engine = Engine.from_config(Config(data_root=tmp_path, models=tiny_models_config, serving=serving))
    layouts = [is_input_major(layer.weight) for layer in base_linears(engine).values()]
    assert len(layouts) == 15 and layouts == [fmt == "transposed"] * 15
    assert engine.generate(GenerationRequest("c1", QUESTION, passages=PASSAGES, max_new_tokens=4)).token_ids
    # The lean decode step (the default) lays every Linear out as its one-row steps read it,
    # whatever the format: out-major for its compiled products (the CPU default), input-major for
    # MKL's (compile_decode = off).
    for compile_decode, input_major in (("auto", False), ("off", True)):
        serving = ServingConfig(weight_format=fmt, compile_decode=compile_decode)
        lean = Engine.from_config(Config(data_root=tmp_path, models=tiny_models_config, serving=serving))
        assert lean.lean is not None and lean.lean.input_major is input_major
        assert all(is_input_major(m.weight) is input_major for m in base_linears(lean).values())


def test_transposed_refuses_a_wrapped_model(tiny_generator, tmp_path):
    serving = ServingConfig(decode_step="transformers")  # the lean step would re-lay the weights itself
    engine = Engine(copy.deepcopy(tiny_generator[0]), tiny_generator[1], data_root=tmp_path, serving=serving)
    with pytest.raises(ValueError, match="before LoRA"):
        quantize_linear_layers(engine.model, "transposed")
    assert not any(is_input_major(layer.weight) for layer in base_linears(engine).values())
