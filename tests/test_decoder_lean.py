"""The lean decode step (models/lean_step.py) against transformers' forward, on the tiny random Llama."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from pfi_rag.config import AdapterConfig, ServingConfig
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.adapters import client_adapter_dir
from tests.generation_support import PASSAGES, QUESTION, save_strong_adapter

# One torch thread (tests/conftest.py): on the shared 2-core machine two threads decoded ~5x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(base, tokenizer, root, step: str, *, max_new_tokens: int = 12, **serving) -> Engine:
    serving = ServingConfig(max_new_tokens=max_new_tokens, decode_step=step, **serving)
    return Engine(copy.deepcopy(base), tokenizer, data_root=root, serving=serving,
                  adapter=AdapterConfig(cache_size=4))  # fmt: skip


@pytest.fixture()
def engines(tiny_generator, tmp_path):
    """A lean engine and a transformers engine over the same data root, with three strong adapters."""
    base, tokenizer, _ = tiny_generator
    for i in range(1, 4):
        save_strong_adapter(base, client_adapter_dir(tmp_path, f"c{i}"), seed=i)
    lean = make_engine(base, tokenizer, tmp_path, "lean")
    plain = make_engine(base, tokenizer, tmp_path, "transformers")
    assert lean.lean is not None and plain.lean is None
    return lean, plain


def test_lean_weights_are_views_of_one_buffer_with_the_same_values(tiny_generator, engines):
    base = tiny_generator[0]
    lean, _ = engines
    served = dict(lean.model.get_base_model().named_modules())
    buffer = lean.lean.buffer.untyped_storage().data_ptr()
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear):
            layer = served[name].get_base_layer() if hasattr(served[name], "get_base_layer") else served[name]
            assert layer.weight.untyped_storage().data_ptr() == buffer  # no second copy of the weights
            assert torch.equal(layer.weight, module.weight)


def test_lean_logprobs_match_transformers_and_greedy_tokens_are_equal(engines):
    # Prepare: each client (three adapters, and one without: the base model) alone, with logprobs.
    lean, plain = engines
    clients = ("c1", "c2", "c3", "x")
    requests = [GenerationRequest(c, QUESTION, passages=PASSAGES, logprobs=3) for c in clients]

    # Execute
    got = [lean.generate(r) for r in requests]
    want = [plain.generate(r) for r in requests]

    # Assert: fp32 throughout, only the order of additions differs (fused products, the residual
    # added inside the product), so logprobs agree to ~1e-6 relative; 1e-4 leaves margin and still
    # catches any wrong weight, head or position (those move logprobs by > 1e-2).
    assert len({tuple(r.token_ids) for r in want}) == 4  # the adapters change the answers
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids and len(g.token_ids) > 3
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in g.logprobs]), torch.tensor([t.logprob for t in w.logprobs]),
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


def test_mixed_adapter_batch_with_rows_joining_and_leaving_gives_each_rows_tokens(engines):
    # Prepare: every request's answer alone through transformers' forward.
    lean, plain = engines
    plan = [("c1", "", 12), ("c2", " Tell me.", 5), ("x", "", 9), ("c3", " Briefly?", 12)]
    asks = [GenerationRequest(c, QUESTION + more, passages=PASSAGES, max_new_tokens=n) for c, more, n in plan]
    alone = [plain.generate(r).token_ids for r in asks]
    assert lean.prefix_cache() is not None  # rows start from the cached system prompt

    # Execute: two rows start, a third joins after two steps, a fourth after four; short ones leave.
    batch = lean.new_batch()
    jobs = [lean.prepare(r) for r in asks]
    batch.add([jobs[0].row, jobs[1].row])
    for step in range(40):
        if step == 2:
            batch.add([jobs[2].row])
        if step == 4:
            batch.add([jobs[3].row])
        if step > 4 and not len(batch):
            break
        batch.step()

    # Assert
    assert [lean.finish(job).token_ids for job in jobs] == alone


def test_batched_steps_read_a_packed_copy_made_at_the_first_batch_with_the_same_logprobs(
    tiny_generator, engines, tmp_path
):
    # Prepare: the four clients alone through transformers' forward; a lean engine that keeps one
    # copy of the weights; one row through the packing engine, which must not pack for it.
    lean, plain = engines
    shared = make_engine(tiny_generator[0], tiny_generator[1], tmp_path, "lean", batched_weights="shared")
    requests = [
        GenerationRequest(c, QUESTION, passages=PASSAGES, logprobs=3) for c in ("c1", "c2", "c3", "x")
    ]
    alone = [plain.generate(r) for r in requests]
    lean.generate(requests[0])
    assert lean.lean._packed is None

    # Execute
    packed_rows = lean.generate_together(requests)
    shared_rows = shared.generate_together(requests)

    # Assert: the packed copy exists now, in memory of its own, and rows decode as they do alone
    # (oneDNN's sums run in another order than MKL's: ~1e-6, as in the test above).
    assert lean.lean._packed is not None and shared.lean._packed is None
    assert lean.lean._packed.nbytes == lean.lean.buffer.numel() * lean.lean.buffer.element_size()
    assert_same_answers(packed_rows, alone)
    assert_same_answers(shared_rows, alone)


def test_without_a_cpp_compiler_one_row_steps_stay_eager_and_say_why(tiny_generator, tmp_path, caplog):
    # Prepare: inductor pointed at a compiler that does not exist, its caches off, and dynamo's
    # compiled functions forgotten, so building the engine really compiles (and fails).
    import torch._inductor.config as inductor

    base, tokenizer, _ = tiny_generator
    torch._dynamo.reset()
    no_compiler = {"force_disable_caches": True, "cpp.cxx": ("/nonexistent/c++",)}

    # Execute
    with inductor.patch(no_compiler), caplog.at_level(logging.WARNING):
        engine = make_engine(base, tokenizer, tmp_path, "lean", compile_decode="on")
    torch._dynamo.reset()

    # Assert: the lean step decodes eagerly on input-major weights, and the log says why, once.
    assert engine.lean is not None and engine.lean.compiled_rows is None and engine.lean.input_major
    assert [r.message for r in caplog.records if "stay eager" in r.message][0].count("C++ compiler") == 1
    request = GenerationRequest("x", QUESTION, passages=PASSAGES)
    plain = make_engine(base, tokenizer, tmp_path, "transformers")
    assert engine.generate(request).token_ids == plain.generate(request).token_ids


def test_a_model_the_lean_step_does_not_fit_decodes_with_its_own_forward(tiny_generator, tmp_path, caplog):
    # Prepare: a tiny random Qwen2 (biased q/k/v projections: not what the lean step fuses).
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_generator[1]
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()

    # Execute
    with caplog.at_level(logging.INFO, logger="pfi_rag.models.lean_step"):
        engine = Engine(model, tokenizer, data_root=tmp_path, serving=ServingConfig(max_new_tokens=6))
        result = engine.generate(GenerationRequest("alice", QUESTION, passages=PASSAGES))

    # Assert: served, through the model's own forward, and said once why.
    assert engine.lean is None and result.completion_tokens > 0
    notes = [r.getMessage() for r in caplog.records if "lean decode step does not fit" in r.getMessage()]
    assert len(notes) == 1 and "Qwen2ForCausalLM" in notes[0]


@pytest.mark.slow  # the real default model (SmolLM2-135M): ~20 s
def test_lean_step_on_the_default_model_gives_transformers_greedy_answers(default_models_config, tmp_path):
    # Prepare: the default model twice, one engine per decode step.
    from pfi_rag.models.loading import load_generator

    base, tokenizer, _ = load_generator(default_models_config)
    requests = [GenerationRequest("alice", q, passages=PASSAGES, max_new_tokens=24, logprobs=1)
                for q in (QUESTION, "What does Bob drink in the morning?")]  # fmt: skip

    # Execute
    answers = {}
    for step in ("lean", "transformers"):
        engine = make_engine(base, tokenizer, tmp_path, step, max_new_tokens=24)
        answers[step] = [engine.generate(r) for r in requests]

    # Assert: same tokens; logprobs within 1e-3 (30 layers of reordered fp32 sums: ~1e-5 seen).
    for lean, plain in zip(answers["lean"], answers["transformers"], strict=True):
        assert lean.token_ids == plain.token_ids and len(lean.token_ids) > 5
        got, want = ([t.logprob for t in result.logprobs] for result in (lean, plain))
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-3, atol=1e-3)


def save_wide_adapter(base, root) -> None:
    """Client "wide": strong LoRA on q/v and also on o, gate, up and down."""
    from pfi_rag.models.adapters import save_adapter
    from pfi_rag.models.lora import attach_lora

    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wide = attach_lora(copy.deepcopy(base), AdapterConfig(r=8, alpha=16, target_modules=targets), seed=5)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in wide.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                scale = 2.0 if "lora_B" in name else 0.5  # save_strong_adapter's scales
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(wide, client_adapter_dir(root, "wide"), source="local")


def assert_same_answers(got: list, want: list) -> None:
    """Equal greedy tokens, and token logprobs within 1e-4 (the order of additions differs)."""
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in g.logprobs]), torch.tensor([t.logprob for t in w.logprobs]),
            rtol=1e-4, atol=1e-4,
        )  # fmt: skip


def test_an_adapter_targeting_more_projections_gets_its_delta_on_every_one(tiny_generator, tmp_path):
    # Prepare: c1 targets q/v (the default); "wide" also targets o, gate, up and down, which no
    # adapter had wrapped when the lean step was built, so PEFT wraps them on its first load.
    base, tokenizer, _ = tiny_generator
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=1)
    save_wide_adapter(base, tmp_path)
    lean = make_engine(base, tokenizer, tmp_path, "lean")
    plain = make_engine(base, tokenizer, tmp_path, "transformers")
    requests = [GenerationRequest(c, QUESTION, passages=PASSAGES, logprobs=1) for c in ("c1", "wide")]

    # Execute: c1 first, so the lean step meets the newly wrapped projections only afterwards.
    got = [lean.generate(r) for r in requests]
    want = [plain.generate(r) for r in requests]

    # Assert
    assert got[1].token_ids != got[0].token_ids
    assert_same_answers(got, want)


def test_compiled_one_row_functions_compute_what_their_eager_arithmetic_does():
    # The tiny model's answers barely move when a base product is off by a few percent in a layer
    # whose adapter deltas dominate, so each compiled function is checked against eager torch too.
    from pfi_rag.models.lean_rows import CompiledRows

    norm = torch.nn.RMSNorm(48, eps=1e-5)  # its weight and variance_epsilon, as LlamaRMSNorm's
    norm.variance_epsilon = norm.eps
    norm.weight.requires_grad_(False)
    shapes = {"qkv": (80, 48), "o": (48, 32), "gate_up": (192, 48), "down": (48, 96), "head": (300, 48)}
    rows = CompiledRows(shapes, norm=norm)
    generator = torch.Generator().manual_seed(0)
    w = {name: torch.randn(shape, generator=generator) * 0.2 for name, shape in shapes.items()}
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=generator) + 0.5)
    with torch.inference_mode():
        h, attn = torch.randn(1, 48, generator=generator), torch.randn(1, 32, generator=generator)
        act = torch.randn(1, 96, generator=generator)
        x, qkv = rows.normed_product(h, norm.weight, w["qkv"], 1e-5)
        after = rows.mlp_block(h, attn, w["o"], norm.weight, w["gate_up"], w["down"], 1e-5)
        product = rows.product(act, w["down"])

        want_x = torch.nn.functional.rms_norm(h, (48,), norm.weight, 1e-5)
        mid = h + attn @ w["o"].t()
        gate, up = (torch.nn.functional.rms_norm(mid, (48,), norm.weight, 1e-5) @ w["gate_up"].t()).chunk(
            2, -1
        )
        want_after = mid + (torch.nn.functional.silu(gate) * up) @ w["down"].t()
    close = {"rtol": 1e-5, "atol": 1e-5}  # fp32 sums in another order
    torch.testing.assert_close(x, want_x, **close)
    torch.testing.assert_close(qkv, want_x @ w["qkv"].t(), **close)
    torch.testing.assert_close(after, want_after, **close)
    torch.testing.assert_close(product, act @ w["down"].t(), **close)


def test_warming_up_is_not_stopped_by_dynamos_cap_on_compilations_per_function():
    # One process may serve several models, or run a test suite: dynamo's cap on compilations of
    # one function (8 by default) counts them all. Under a cap of 2, one model's 3 product shapes
    # already pass it; warming up must lift it while it compiles.
    from pfi_rag.models.lean_rows import CompiledRows

    norm = torch.nn.RMSNorm(24, eps=1e-5)
    norm.variance_epsilon = norm.eps
    norm.weight.requires_grad_(False)
    shapes = {"qkv": (40, 24), "o": (24, 16), "gate_up": (80, 24), "down": (24, 40), "head": (90, 24)}
    with torch._dynamo.config.patch(recompile_limit=2):
        rows = CompiledRows(shapes, norm=norm)
    with torch.inference_mode():
        x = torch.ones(1, 40)
        assert torch.equal(rows.product(x, torch.ones(24, 40)), torch.full((1, 24), 40.0))


def test_compiled_one_row_steps_give_transformers_answers_alone_and_batched(tiny_generator, tmp_path):
    # Prepare: adapters on q/v (c1) and on every projection (wide: its layers take the compiled
    # products one by one, not the fused block), an engine compiling its one-row steps.
    base, tokenizer, _ = tiny_generator
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=1)
    save_wide_adapter(base, tmp_path)
    compiled = make_engine(base, tokenizer, tmp_path, "lean", compile_decode="on")
    plain = make_engine(base, tokenizer, tmp_path, "transformers")
    requests = [GenerationRequest(c, QUESTION, passages=PASSAGES, logprobs=3) for c in ("c1", "wide", "x")]
    assert compiled.lean.compiled_rows is not None and compiled.compiled is None
    layer = compiled.model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert not compiled.lean.input_major and layer.weight.is_contiguous()  # out-major rows of the buffer

    # Execute
    alone = [compiled.generate(r) for r in requests]
    batched = compiled.generate_together(requests)  # steps of 3 rows, then fewer as rows finish
    want = [plain.generate(r) for r in requests]

    # Assert
    assert len({tuple(r.token_ids) for r in want}) == 3
    assert_same_answers(alone, want)
    assert_same_answers(batched, want)


@pytest.mark.parametrize(
    ("attention", "step", "prefills_with"),
    [("auto", "lean", "sdpa"), ("eager", "lean", "eager"), ("auto", "transformers", "eager")],
)
def test_served_engine_prefills_with_sdpa_only_where_auto_and_the_lean_step_decodes(
    tiny_models_config, tmp_path, attention, step, prefills_with
):
    from pfi_rag.config import Config

    models = tiny_models_config.model_copy(update={"attn_implementation": attention})
    config = Config(data_root=tmp_path, models=models, serving=ServingConfig(decode_step=step))

    engine = Engine.from_config(config)  # what `pfi-rag serve` builds
    result = engine.generate(GenerationRequest("alice", QUESTION, passages=PASSAGES, max_new_tokens=4))

    assert engine.model.config._attn_implementation == prefills_with  # an explicit setting is kept
    assert result.completion_tokens > 0
