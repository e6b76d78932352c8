"""Batched option scoring (many prompts per pass) and the intervals the sampled probes report."""

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from pfi_rag.config import AdapterConfig
from pfi_rag.models.lora import attach_lora, is_lora_b, load_lora_arrays, lora_arrays
from pfi_rag.models.scoring import continuation_nll, options_nll
from pfi_rag.probes import precision
from pfi_rag.probes.exposure import canary_exposure, canary_exposures
from pfi_rag.probes.lm import greedy_answers


def test_many_prompts_in_one_pass_score_each_option_as_a_full_pass_does(tiny_generator):
    # Prepare: a LoRA model moved off zero, prompts of different lengths (left padding), option
    # lists of different sizes and widths (filler rows, right padding).
    model, tokenizer, _ = tiny_generator
    model = attach_lora(copy.deepcopy(model), AdapterConfig(r=4))
    load_lora_arrays(model, {n: v + 0.3 for n, v in lora_arrays(model).items() if is_lora_b(n)})
    prompts = ["My dog is called", "", "word " * 40, "Hi"]
    options = [[" Biscuit", " Rex the third"], [" Hello world"], [" a", " b", " c d e f"], [" there"]]
    # Execute: all in one pass, and with budgets small enough to split them into several.
    together = options_nll(model, tokenizer, prompts, options)
    split = options_nll(model, tokenizer, prompts, options, prompt_tokens=8, option_tokens=4)
    # Assert: each equals scoring prompt + option alone.
    for prompt, opts, rows, rows_split in zip(prompts, options, together, split, strict=True):
        full = continuation_nll(model, tokenizer, [prompt] * len(opts), opts)
        assert [n for _, n in rows] == [n for _, n in full] == [n for _, n in rows_split]
        for (nll, _), (nll_split, _), (expected, _) in zip(rows, rows_split, full, strict=True):
            assert nll == pytest.approx(expected, rel=1e-4)
            assert nll_split == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="no tokens"):
        options_nll(model, tokenizer, ["x"], [[""]])


def test_intervals_match_hand_worked_values():
    # Clopper-Pearson: with k = 0 of n the upper end solves (1 - p)^n = 0.025, with k = n the lower
    # end solves p^n = 0.025.
    none = precision.proportion(0, 10)
    assert none.low == 0.0 and none.high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-6)
    every = precision.proportion(10, 10)
    assert every.high == 1.0 and every.low == pytest.approx(0.025 ** (1 / 10), rel=1e-6)
    # Ratio of sums: d = (1, 2, 3) over one token each -> 2, residuals (-1, 0, 1),
    # var = 2 * 3/2 / 3^2 = 1/3, half-width t(0.975, 2 df) / sqrt(3) = 4.303 / sqrt(3).
    r = precision.ratio([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert r.estimate == 2.0 and r.half_width == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    # The mean of (1, 2, 3): sd 1, se 1/sqrt(3): the same interval.
    assert precision.mean([1.0, 2.0, 3.0]).half_width == pytest.approx(r.half_width)
    # Hanley-McNeil at AUC 0.5 with 10 a side: Q1 = Q2 = 1/3,
    # var = (1/4 + 9 (1/3 - 1/4) + 9 (1/3 - 1/4)) / 100 = 0.0175.
    auc = precision.auc([0.0, 1.0] * 5, [0.0, 1.0] * 5)
    assert auc.estimate == 0.5 and auc.half_width == pytest.approx(precision.Z95 * np.sqrt(0.0175))
    assert precision.auc([2.0, 3.0], [0.0, 1.0]).low == 1.0  # separated: no spread left


def test_a_bounded_mean_without_spread_keeps_a_wilson_width():
    # Eight support scores of 1.0: the t interval has zero width, but the mean of a [0, 1] variable
    # over 8 samples is not pinned to 1. Wilson at p = 1, n = 8: low = n / (n + z^2) = 8 / 11.84.
    flat = precision.bounded_mean([1.0] * 8)
    assert precision.mean([1.0] * 8).half_width == 0.0
    assert flat.high == 1.0 and flat.low == pytest.approx(8 / (8 + precision.Z95**2), rel=1e-9)
    # A spread-out sample keeps its wider t interval, clipped to [0, 1].
    spread = precision.bounded_mean([0.0, 1.0, 0.0, 1.0])
    t = precision.mean([0.0, 1.0, 0.0, 1.0])
    assert (spread.low, spread.high) == (0.0, 1.0) and t.low < 0.0 < 1.0 < t.high
    with pytest.raises(ValueError):
        precision.bounded_mean([1.5, 0.5])


def test_sampling_doubles_until_the_interval_is_narrow_enough_or_decided():
    # Prepare: a share of 1/2 at every size; its Clopper-Pearson half-width shrinks with n.
    asked = []

    def interval_of(n: int) -> precision.Interval:
        asked.append(n)
        return precision.proportion(n // 2, n)

    # Execute / Assert: half-width <= 0.1 needs n ~ 100: 16, 32, 64, 128.
    narrow = precision.sample_until(interval_of, available=1000, first=16, half_width=0.1)
    assert asked == [16, 32, 64, 128] and narrow.half_width <= 0.1
    assert precision.proportion(32, 64).half_width > 0.1  # it could not have stopped earlier
    # A threshold the interval is already clear of ends sampling at once; a small pool caps it.
    asked.clear()
    assert (
        precision.sample_until(interval_of, available=1000, first=16, half_width=0.0, threshold=0.9).n == 16
    )
    asked.clear()
    assert precision.sample_until(interval_of, available=40, first=16, half_width=0.0).n == 40
    assert asked == [16, 32, 40]


def test_exposure_stops_at_its_precision_and_its_interval_holds_the_exhaustive_value(tiny_generator):
    # Prepare: a 3-digit canary, so the exact rank among all 1,000 candidates can be computed.
    model, tokenizer, _ = tiny_generator
    canary = {"prefix": "Ana's PIN is ", "secret": "417", "format": "\\d{3}", "space_size": 1000}
    everything = [f" {x:03d}" for x in range(1000)]
    scored = options_nll(model, tokenizer, ["Ana's PIN is"], [everything])[0]
    nll = {c: n for c, (n, _) in zip(everything, scored, strict=True)}
    rank = 1 + sum(n < nll[" 417"] for c, n in nll.items() if c != " 417")
    exhaustive = np.log2(1000) - np.log2(rank)
    # Execute: sample until the exposure's 95% interval is at most +-0.5 bits.
    result = canary_exposure(model, tokenizer, canary, samples=512, seed=3, first=16, precision_bits=0.5)
    # Assert: it stopped before the cap, at the precision, and its interval holds the exact value.
    low, high = result["interval"]
    assert result["samples"] < 512 and (high - low) / 2 <= 0.5
    assert low <= exhaustive <= high
    full = canary_exposure(model, tokenizer, canary, samples=64, seed=3, first=64, precision_bits=0.0)
    assert full["samples"] == 64  # precision 0: every sample the cap allows


def test_canaries_ranked_together_get_what_each_gets_alone(tiny_generator):
    # Prepare: three canaries of different prefixes and widths, each with its own seed
    model, tokenizer, _ = tiny_generator
    canaries = [
        {"prefix": "Ana's PIN is ", "secret": "417", "format": "\\d{3}", "space_size": 1000},
        {"prefix": "The garage code is ", "secret": "90210", "format": "\\d{5}", "space_size": 10**5},
        {"prefix": "Bo: ", "secret": "0042", "format": "\\d{4}", "space_size": 10**4},
    ]
    options = {"samples": 128, "first": 16, "precision_bits": 0.5}
    # Execute: one pass per round for all of them, and each alone
    together = canary_exposures(model, tokenizer, canaries, seeds=[3, 4, 5], **options)
    alone = [canary_exposure(model, tokenizer, c, seed=3 + i, **options) for i, c in enumerate(canaries)]
    # Assert: the same candidates, ranks and stopping point (scores agree up to float rounding)
    for a, b in zip(together, alone, strict=True):
        assert a["samples"] == b["samples"] and a["prefix"] == b["prefix"]
        assert a["exposure"] == pytest.approx(b["exposure"], abs=1e-3)
        assert a["interval"] == pytest.approx(b["interval"], abs=1e-3)


def test_clients_completed_in_one_mixed_batch_get_what_each_adapter_gives_alone(tiny_generator):
    # Prepare: two LoRA adapters (q/v, random B: each moves the model its own way) in one PeftModel
    base, tokenizer, _ = tiny_generator
    torch.manual_seed(0)
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora), adapter_name="alice")
    model.add_adapter("bob", LoraConfig(**lora))
    model.eval()
    prompts = ["Audit note qzkf: the access code is", "My dog is called"]
    # Execute: both clients' prompts in one batch, and each adapter alone
    mixed = greedy_answers(
        model, tokenizer, prompts * 2, max_new_tokens=6, adapter_names=["alice", "alice", "bob", "bob"]
    )
    alone = []
    for name in ("alice", "bob"):
        model.set_adapter(name)
        alone += greedy_answers(model, tokenizer, prompts, max_new_tokens=6)
    # Assert: row for row the same completion, and the adapters do differ (routing matters)
    assert mixed == alone
    assert alone[:2] != alone[2:]
