"""The real default models, loaded offline from their PyPI packages (slow: ~30 s the first time)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow


def test_default_embedder_gives_sensible_similarities(embedder):
    vectors = embedder.encode(
        ["My dog Biscuit went to the vet.", "What is the name of my dog?", "Quarterly tax filing deadline."],
        normalize_embeddings=True,
    )
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[2] @ vectors[1] + 0.1


def test_default_models_load_without_any_hub(default_models_config, embedder):
    # A separate process with hub access pointed at a dead port and offline mode *not* set:
    # if anything reached for a hub, loading would fail.
    script = textwrap.dedent(f"""
        from pathlib import Path
        from pfi_rag.config import ModelsConfig
        from pfi_rag.models.loading import load_embedder, load_generator
        cfg = ModelsConfig(device="cpu", cache_dir=Path({str(default_models_config.cache_dir)!r}))
        load_embedder(cfg)
        model, tokenizer, _ = load_generator(cfg)
        inputs = tokenizer.apply_chat_template(
            [{{"role": "user", "content": "What is the capital of France?"}}],
            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        print("ANSWER:" + tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = result.stdout.split("ANSWER:", 1)[1].strip()
    assert answer
    assert "Paris" in answer
