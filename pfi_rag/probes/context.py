"""What probes read: the config, the models (base and with any adapter), data, history, retrievers.

Everything is loaded lazily and once per context, so a run that only audits the round history
never loads a model, and twelve probes over eight clients load each adapter once. Probes only
read: nothing here writes to a client's adapter, index or ledger.

Adapters are loaded into one ``PeftModel`` over a private copy of the base model (one named
adapter per client / global / round), so the base model itself stays unwrapped and "before
personalization" always means the base weights.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pfi_rag import layout
from pfi_rag.config import Config, with_probe_thresholds
from pfi_rag.data.audit_canaries import AuditCanary, load_canaries
from pfi_rag.data.corpus import ClientCorpus, load_corpus
from pfi_rag.data.records import (
    ClientData,
    CounterfactualPair,
    Document,
    EvalText,
    Instruction,
    QAPair,
    RefusalPrompt,
    read_jsonl,
)
from pfi_rag.probes import eval_sets
from pfi_rag.probes.history import Round, read_history
from pfi_rag.probes.items import EvalItem, ItemScores, cloze_items, qa_items, score_items
from pfi_rag.probes.registry import file_thresholds

logger = logging.getLogger(__name__)


class SearchHit(Protocol):
    doc_id: str
    text: str
    score: float


class Retriever(Protocol):
    """The least the retrieval probes need; ``pfi_rag.retriever.ClientStore`` satisfies it."""

    def search(self, query: str, k: int) -> list[SearchHit]: ...


RetrieverFactory = Callable[[str], Retriever | None]
# (client_id, question, hits) -> the answer the client's system gives from those hits.
Answerer = Callable[[str, str, list[SearchHit]], str]


def has_adapter(directory: Path) -> bool:
    return (Path(directory) / "adapter_config.json").is_file()


class ProbeContext:
    def __init__(
        self,
        config: Config,
        *,
        generator: tuple[Any, Any] | None = None,
        retriever_factory: RetrieverFactory | None = None,
        embedder: Any = None,
        answerer: Answerer | None = None,
    ) -> None:
        """``generator`` = (model, tokenizer) already loaded (tests, a server); else loaded on use.

        ``retriever_factory(client_id)`` returns that client's retriever or None; by default the
        client's ``ClientStore`` is opened when its index exists (with ``embedder``, loaded on use).
        ``answerer`` produces grounded answers; by default the client's model generates greedily
        from the retrieved context (probes/answers.py).
        """
        self.config = with_probe_thresholds(config)
        # Thresholds from probes.thresholds_file of probes without a config key: name -> value.
        self.thresholds = file_thresholds(config)
        self.data_root = Path(config.data_root)
        self._generator = generator
        self._retriever_factory = retriever_factory
        self._embedder = embedder
        self.answerer = answerer
        self._peft = None
        self._engine = None
        self._loaded: dict[str, Path] = {}
        self._client_data: dict[str, ClientData] = {}
        self._corpora: dict[str, ClientCorpus] = {}
        self._items: dict[str, list[EvalItem]] = {}
        self._retrievers: dict[str, Retriever | None] = {}
        self._history: list[Round] | None = None
        self._manifest: dict[str, Any] | None = None
        self._opened: list[Any] = []
        # Scores several probes (or clients) read: computed once per context (``memo``).
        self._memo: dict[tuple, Any] = {}

    # ---- models -------------------------------------------------------------------------
    def _ensure_generator(self) -> tuple[Any, Any]:
        if self._generator is None:
            from pfi_rag.models.loading import load_generator, torch_threads

            with torch_threads():  # loading applies models.threads; the probe run chose its own
                model, tokenizer, _ = load_generator(self.config.models)
            self._generator = (model, tokenizer)
        return self._generator

    @property
    def tokenizer(self):
        return self._ensure_generator()[1]

    def base_model(self):
        return self._ensure_generator()[0]

    def _with_adapter(self, key: str, directory: Path):
        """The PeftModel with adapter ``key`` (loaded from ``directory`` once) active, or None."""
        if not has_adapter(directory):
            return None
        if key not in self._loaded:
            from peft import PeftModel

            if self._peft is None:
                # A copy: PEFT injects LoRA layers into the model it wraps.
                base = copy.deepcopy(self.base_model())
                self._peft = PeftModel.from_pretrained(base, directory, adapter_name=key)
            else:
                self._peft.load_adapter(directory, adapter_name=key)
            self._peft.eval()
            self._loaded[key] = Path(directory)
        self._peft.set_adapter(key)
        return self._peft

    def engine(self):
        """Serving's engine (pfi_rag.models.generation.Engine) over a private copy of the base model:
        the same weight format, adapter resolution (client, else global, else base), prompt,
        gathered-LoRA batches, prefix cache and repetition controls as the HTTP service, so a
        probe that generates judges the answers users get. Built on first use."""
        if self._engine is None:
            from pfi_rag.models.generation import Engine
            from pfi_rag.models.quantization import quantize_linear_layers

            model = copy.deepcopy(self.base_model())  # the engine wraps the model it is given
            quantize_linear_layers(model, self.config.serving.weight_format)
            self._engine = Engine(
                model,
                self.tokenizer,
                data_root=self.data_root,
                serving=self.config.serving,
                adapter=self.config.adapter,
                retrieval_k=self.config.retrieval.top_k,
                relevance_floor=self.config.retrieval.relevance_floor,
            )
            # As `pfi-rag serve` does; prefill is most of the probe's work (prompts of 100-900 tokens).
            self._engine.choose_prefill_attention(self.config.models.attn_implementation)
        return self._engine

    def client_model(self, client_id: str):
        """Base + the client's personalized adapter (``clients/<id>/adapter/``), or None."""
        return self._with_adapter(f"client:{client_id}", layout.client_adapter_dir(self.data_root, client_id))

    def local_model(self, client_id: str):
        """Base + the adapter the client trained alone (``clients/<id>/local_adapter/``), or None."""
        local = layout.client_local_adapter_dir(self.data_root, client_id)
        return self._with_adapter(f"local:{client_id}", local)

    def global_model(self):
        return self._with_adapter("global", layout.global_adapter_dir(self.data_root))

    def model(self, key: str):
        """The model ``key`` names: "base", "global", "client:<id>" or "local:<id>" (None: no adapter)."""
        if key == "base":
            return self.base_model()
        if key == "global":
            return self.global_model()
        kind, _, client_id = key.partition(":")
        if kind == "client":
            return self.client_model(client_id)
        if kind == "local":
            return self.local_model(client_id)
        raise KeyError(f"no model {key!r}: base, global, client:<id> or local:<id>")

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the stored value afterwards.

        Probes share scores through it: the base model's scores of the shipped evaluation sets
        are the same for every client, and refusal and erosion, or calibration, dp_collapse,
        fairness and ood, read the same passes. A key names the model and the data scored.
        """
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def prefix(self, key: tuple, n: int, score: Callable[[int, int], list]) -> list:
        """The first ``n`` per-element results under ``key``: ``score(start, end)`` is called only
        for the elements not scored yet, so a probe that samples more extends its sample and one
        that needs fewer reads what another computed (``key`` names the model and the data)."""
        done = self._memo.setdefault(key, [])
        if len(done) < n:
            done.extend(score(len(done), n))
        return done[:n]

    def item_scores(self, model_key: str, client_id: str, count: int | None = None) -> ItemScores | None:
        """Scores of ``model_key``'s model on the first ``count`` of the client's evaluation items
        (all when None): every option's NLL, so option probabilities and the true answer's NLL
        come from one pass. Extends what an earlier call scored instead of starting over; None
        when the model does not exist (no such adapter)."""
        items = self.eval_items(client_id)
        count = len(items) if count is None else min(count, len(items))
        key = ("items", model_key, client_id)
        done: ItemScores | None = self._memo.get(key)
        if done is None or len(done) < count:
            model = self.model(model_key)
            if model is None:
                return None
            start = 0 if done is None else len(done)
            new = score_items(model, self.tokenizer, items[start:count])
            done = new if done is None else done.extended(new)
            self._memo[key] = done
        return done.head(count)

    def round_model(self, round_: Round):
        if round_.adapter_dir is None:
            return None
        return self._with_adapter(f"round:{round_.number}", round_.adapter_dir)

    # ---- data ---------------------------------------------------------------------------
    def client_ids(self) -> list[str]:
        """Clients with documents: a store (however it was written), or synthetic data files."""
        return [
            c
            for c in layout.list_clients(self.data_root)
            if layout.client_docstore_file(self.data_root, c).is_file()
            or layout.client_data_dir(self.data_root, c).is_dir()
        ]

    def client_data(self, client_id: str) -> ClientData:
        """The client's optional extras beside its store (``clients/<id>/data/*.jsonl``), empty
        where absent: a synthetic client's planted questions and counterfactual pairs, anyone's
        instruction pairs. Its documents are in :meth:`corpus`."""
        if client_id not in self._client_data:
            directory = layout.client_data_dir(self.data_root, client_id)

            def read(name: str, record_type):
                path = directory / name
                return read_jsonl(path, record_type) if path.is_file() else []

            self._client_data[client_id] = ClientData(
                client_id=client_id,
                documents=read("documents.jsonl", Document),
                qa=read("qa.jsonl", QAPair),
                instructions=read("instructions.jsonl", Instruction),
                updates=read("updates.jsonl", Document),
                counterfactuals=read("counterfactuals.jsonl", CounterfactualPair),
            )
        return self._client_data[client_id]

    def corpus(self, client_id: str) -> ClientCorpus:
        """The client's current documents, split into what it trains on and what it holds out."""
        if client_id not in self._corpora:
            self._corpora[client_id] = load_corpus(
                self.data_root, client_id, held_out_share=self.config.data.held_out_share
            )
        return self._corpora[client_id]

    def eval_items(self, client_id: str) -> list[EvalItem]:
        """The client's evaluation items: its planted questions when it has them (synthetic data),
        else cloze items from its held-out documents (probes/items.py); [] when it has neither."""
        if client_id not in self._items:
            cfg = self.config
            qa = self.client_data(client_id).qa
            if qa:
                items = qa_items(qa, choices=cfg.probes.calibration_choices, seed=cfg.seed)
            else:
                corpus = self.corpus(client_id)
                items = cloze_items(
                    corpus.held_out,
                    [*corpus.train, *corpus.held_out],
                    count=cfg.probes.cloze_items,
                    choices=cfg.probes.calibration_choices,
                    seed=cfg.seed,
                )
            # A seeded shuffle: the item probes score a prefix of the list (as many as their
            # precision needs), which must be a random sample, not the first documents' items.
            random.Random(f"items-{cfg.seed}-{client_id}").shuffle(items)
            self._items[client_id] = items
        return self._items[client_id]

    def audit_canaries(self, client_id: str) -> list[AuditCanary]:
        """The client's audit canaries (``privacy.audit_canaries``); [] when it never enabled them."""
        return load_canaries(self.data_root, client_id)

    def shared_eval(self) -> tuple[list[EvalText], list[RefusalPrompt]]:
        """General texts and refusal prompts: the data root's ``shared/`` files when it has them
        (a synthetic world), else the sets shipped with the package (probes/eval_sets/)."""
        general = layout.general_eval_file(self.data_root)
        refusal = layout.refusal_prompts_file(self.data_root)
        return (
            read_jsonl(general, EvalText) if general.is_file() else eval_sets.general_texts(),
            read_jsonl(refusal, RefusalPrompt) if refusal.is_file() else eval_sets.refusal_prompts(),
        )

    def counterfactuals(self, client_id: str) -> list[CounterfactualPair]:
        """The client's own counterfactual pairs (synthetic data), else the shipped ones."""
        return self.client_data(client_id).counterfactuals or eval_sets.counterfactual_pairs()

    def manifest(self) -> dict[str, Any] | None:
        """Ground truth of the planted items (synthetic data only); None for real data."""
        if self._manifest is None:
            path = layout.manifest_file(self.data_root)
            self._manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return self._manifest or None

    def truth(self, client_id: str) -> dict[str, Any] | None:
        manifest = self.manifest()
        return None if manifest is None else manifest.get("clients", {}).get(client_id)

    def history(self) -> list[Round]:
        if self._history is None:
            self._history = read_history(self.data_root)
        return self._history

    def ledger(self, client_id: str) -> dict[str, Any] | None:
        """``clients/<id>/privacy.json`` as a dict, None when absent (see probes/budget.py)."""
        path = layout.client_ledger_file(self.data_root, client_id)
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return data

    # ---- retrieval ----------------------------------------------------------------------
    def retriever(self, client_id: str) -> Retriever | None:
        if client_id not in self._retrievers:
            if self._retriever_factory is not None:
                self._retrievers[client_id] = self._retriever_factory(client_id)
            else:
                self._retrievers[client_id] = self._open_store(client_id)
        return self._retrievers[client_id]

    def search(self, client_id: str, query: str, k: int) -> list[SearchHit]:
        """``retriever(client_id).search(query, k)``, each query searched once per context
        (retrieval_hit and leakage ask the same client's store the same item queries)."""
        return self.memo(("search", client_id, query, k), lambda: self.retriever(client_id).search(query, k))

    def search_many(self, client_id: str, queries: list[str], k: int) -> list[list[SearchHit]]:
        """``search`` for many queries: those not searched yet are embedded as one batch where the
        store can (``search_many``); one at a time, each query cost a pass of the embedder."""
        retriever = self.retriever(client_id)
        new = [q for q in dict.fromkeys(queries) if ("search", client_id, q, k) not in self._memo]
        if new:
            many = getattr(retriever, "search_many", None)
            found = many(new, k) if many is not None else [retriever.search(q, k) for q in new]
            for query, hits in zip(new, found, strict=True):
                self._memo[("search", client_id, query, k)] = hits
        return [self._memo[("search", client_id, q, k)] for q in queries]

    def _open_store(self, client_id: str) -> Retriever | None:
        # Only an existing index: ClientStore.open would create an empty one, and probes never write.
        if not layout.client_index_dir(self.data_root, client_id).is_dir():
            return None
        try:
            from pfi_rag.retriever import ClientStore
        except ImportError:
            return None
        if self._embedder is None:
            from pfi_rag.models.loading import load_embedder, torch_threads

            with torch_threads():
                self._embedder = load_embedder(self.config.models)
        store = ClientStore.open(self.data_root, client_id, self.config.retrieval, self._embedder)
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()
        self._opened.clear()
