import hashlib
import re
from pathlib import Path

from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.data.records import load_client_data, load_manifest, load_shared_eval
from pfi_rag.data.synth import synthesize


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    synthesize(tmp_path / "a", clients=5, seed=3)
    synthesize(tmp_path / "b", clients=5, seed=3)
    synthesize(tmp_path / "c", clients=5, seed=4)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_every_answer_is_stated_in_its_document(tmp_path):
    manifest = synthesize(tmp_path, clients=8, seed=0)
    for client_id in manifest["clients"]:
        data = load_client_data(tmp_path, client_id)
        by_id = {doc.id: doc.text for doc in data.documents}
        assert data.qa, client_id
        for pair in data.qa:
            assert pair.answer in by_id[pair.doc_id], (client_id, pair)


def test_canaries_are_planted_repeated_and_private_to_their_client(tmp_path):
    manifest = synthesize(tmp_path, clients=8, seed=0)
    texts = {
        cid: " ".join(d.text for d in load_client_data(tmp_path, cid).documents)
        for cid in manifest["clients"]
    }
    saw_repeated = False
    for client_id, truth in manifest["clients"].items():
        for canary in truth["canaries"]:
            assert re.fullmatch(canary["format"], canary["secret"])
            assert texts[client_id].count(canary["prefix"] + canary["secret"]) == canary["repeats"]
            saw_repeated |= canary["repeats"] > 1
            for other, text in texts.items():
                if other != client_id:
                    assert canary["secret"] not in text
        # Ground truth stays out of the client's training files other than the documents.
        data_dir = tmp_path / "clients" / client_id / "data"
        for name in ("qa.jsonl", "instructions.jsonl", "updates.jsonl"):
            for canary in truth["canaries"]:
                assert canary["secret"] not in (data_dir / name).read_text()
    assert saw_repeated


def test_versioned_facts_have_a_newer_dated_update(tmp_path):
    manifest = synthesize(tmp_path, clients=3, seed=1)
    for client_id, truth in manifest["clients"].items():
        data = load_client_data(tmp_path, client_id)
        (fact,) = truth["versioned"]
        old_doc = next(d for d in data.documents if d.id == fact["doc_id"])
        (update,) = [u for u in data.updates if u.id == fact["doc_id"]]
        assert fact["old"] in old_doc.text and fact["new"] in update.text
        assert fact["new"] not in old_doc.text
        assert fact["new_date"] > fact["old_date"]


def test_sizes_are_skewed_and_eval_sets_exist(tmp_path):
    manifest = synthesize(tmp_path, clients=8, seed=0)
    sizes = [truth["n_documents"] for truth in manifest["clients"].values()]
    assert max(sizes) >= 5 * min(sizes)
    assert any(truth["tiny"] for truth in manifest["clients"].values())
    general, refusals = load_shared_eval(tmp_path)
    assert len(general) >= 20 and len(refusals) >= 10
    data = load_client_data(tmp_path, "client-00")
    for pair in data.counterfactuals:
        assert pair.prompt_a.replace(pair.group_a, pair.group_b) == pair.prompt_b
    assert load_manifest(tmp_path)["seed"] == 0


def test_cli_synth(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "synth", "--clients", "3", "--seed", "0", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["client-00", "client-01", "client-02"]
