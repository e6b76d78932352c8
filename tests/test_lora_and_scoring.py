import copy

import numpy as np
import pytest

from pfi_rag.config import AdapterConfig
from pfi_rag.models.lora import attach_lora, is_lora_a, is_lora_b, load_lora_arrays, lora_arrays
from pfi_rag.models.scoring import continuation_nll, mean_token_nll, shared_prompt_nll


@pytest.fixture()
def tiny_peft(tiny_generator):
    model, tokenizer, _ = tiny_generator
    return attach_lora(copy.deepcopy(model), AdapterConfig(r=4)), tokenizer


def test_lora_arrays_round_trip_and_refuse_foreign_names(tiny_peft):
    model, _ = tiny_peft
    arrays = lora_arrays(model)
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(arrays) == 8
    assert sum(map(is_lora_a, arrays)) == 4 and sum(map(is_lora_b, arrays)) == 4
    shifted = {name: value + 0.5 for name, value in arrays.items() if is_lora_b(name)}
    load_lora_arrays(model, shifted)
    after = lora_arrays(model)
    for name in arrays:
        expected = arrays[name] + 0.5 if is_lora_b(name) else arrays[name]
        np.testing.assert_allclose(after[name], expected)
    with pytest.raises(KeyError):
        load_lora_arrays(model, {"not.a.weight": np.zeros(1)})


def test_batched_scores_equal_one_at_a_time(tiny_generator):
    model, tokenizer, _ = tiny_generator
    prompts, targets = ["My dog is called", "Hi", ""], [" Biscuit", " there, friend", "Hello world"]
    batched = continuation_nll(model, tokenizer, prompts, targets)
    single = [continuation_nll(model, tokenizer, [p], [t])[0] for p, t in zip(prompts, targets, strict=True)]
    for (b_nll, b_n), (s_nll, s_n) in zip(batched, single, strict=True):
        assert b_n == s_n
        assert b_nll == pytest.approx(s_nll, rel=1e-4)
    # A random model is close to uniform: mean NLL near log(vocab size).
    assert mean_token_nll(model, tokenizer, ["The cat sat on the mat."]) == pytest.approx(
        np.log(len(tokenizer)), rel=0.1
    )


@pytest.mark.parametrize("prompt", ["My dog is called", "", "word " * 40])
def test_a_prompt_computed_once_scores_each_option_as_a_full_pass_does(tiny_peft, prompt):
    model, tokenizer = tiny_peft
    load_lora_arrays(model, {n: v + 0.3 for n, v in lora_arrays(model).items() if is_lora_b(n)})
    options = [" Biscuit", " there, friend of mine", "x", " Biscuit"]
    full = continuation_nll(model, tokenizer, [prompt] * len(options), options)
    shared = shared_prompt_nll(model, tokenizer, prompt, options)
    assert [n for _, n in shared] == [n for _, n in full]
    for (s_nll, _), (f_nll, _) in zip(shared, full, strict=True):
        assert s_nll == pytest.approx(f_nll, rel=1e-4)
    assert shared[0] == shared[3]  # the same option, padded differently, scores the same
    with pytest.raises(ValueError, match="no tokens"):
        shared_prompt_nll(model, tokenizer, prompt, [""])


def test_adapter_saves_are_versioned_and_loadable_by_peft(tiny_peft, tiny_generator, tmp_path):
    from peft import PeftModel

    from pfi_rag.models.adapters import client_adapter_dir, read_adapter_info, save_adapter

    model, _ = tiny_peft
    directory = client_adapter_dir(tmp_path, "alice")
    assert read_adapter_info(directory) is None
    first = save_adapter(model, directory)
    second = save_adapter(model, directory, round=3, source="federated")
    assert (first.version, second.version, second.round) == (1, 2, 3)
    assert read_adapter_info(directory) == second

    base, _, _ = tiny_generator
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), directory)
    for name, value in lora_arrays(model).items():
        np.testing.assert_allclose(lora_arrays(loaded)[name], value)
