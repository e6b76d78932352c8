import copy

import numpy as np
import pytest

from pfi_rag.config import AdapterConfig
from pfi_rag.models.lora import attach_lora, is_lora_a, is_lora_b, load_lora_arrays, lora_arrays
from pfi_rag.models.scoring import continuation_nll, mean_token_nll


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
