"""OpenAI's sampling extras: logit bias, penalties and logprobs, by hand and in the decoder."""

from __future__ import annotations

import math

import pytest
import torch

from pfi_rag.models import Engine, GenerationRequest, InvalidRequest
from pfi_rag.models.decoding import SamplingParams
from pfi_rag.models.sampling import adjust_logits, token_logprob


def test_penalties_and_bias_by_hand():
    params = SamplingParams(
        max_new_tokens=1, frequency_penalty=0.5, presence_penalty=1.0, logit_bias=((3, 2.0), (4, -100.0))
    )

    out = adjust_logits(torch.zeros(5), [1, 1, 2], params)

    # token 1: twice (-0.5 * 2 - 1), token 2: once (-0.5 - 1), 3: +2, 4: -100
    assert out.tolist() == [0.0, -2.0, -1.5, 2.0, -100.0]


def test_logprobs_are_the_models_own_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))

    chosen = token_logprob(logits, 1, top=2)

    assert chosen.logprob == pytest.approx(math.log(0.3))
    assert [t for t, _ in chosen.top] == [0, 1] and chosen.top[0][1] == pytest.approx(math.log(0.5))


@pytest.fixture(scope="module")
def engine(tiny_generator, tmp_path_factory):
    model, tokenizer, _ = tiny_generator
    import copy

    return Engine(copy.deepcopy(model), tokenizer, data_root=tmp_path_factory.mktemp("sampling"))


def ask(engine: Engine, **kwargs):
    return engine.generate(GenerationRequest(client_id="c", question="Say something.", passages=[], **kwargs))


def test_decoder_applies_bias_and_penalties_and_reports_logprobs(engine):
    plain = ask(engine, max_new_tokens=6, logprobs=2)
    forced_token = 1000
    forced = ask(engine, max_new_tokens=6, logit_bias=[(forced_token, 100.0)])
    penalised = ask(engine, max_new_tokens=6, logit_bias=[(forced_token, 100.0)], presence_penalty=2.0)

    assert len(plain.logprobs) == len(plain.token_ids) == 6
    for step, token in zip(plain.logprobs, plain.token_ids, strict=True):
        assert step.token_id == token and len(step.top) == 2
        assert step.top[0][0] == token and step.logprob == pytest.approx(step.top[0][1])  # greedy: the best
    assert forced.token_ids == [forced_token] * 6  # +100 wins every step
    assert penalised.token_ids == [forced_token] * 6  # a penalty of 2 does not beat +100 ...
    both = ask(engine, max_new_tokens=3, logit_bias=[(forced_token, 3.0)], frequency_penalty=2.0)
    assert both.token_ids.count(forced_token) < 3  # ... but with a +3 bias it does after repeats


def test_out_of_range_extras_are_refused():
    for bad in ({"frequency_penalty": 2.5}, {"logit_bias": [(1, 101.0)]}, {"logprobs": 21}):
        with pytest.raises(InvalidRequest):
            GenerationRequest(client_id="c", question="q", **bad)
