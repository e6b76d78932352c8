"""The data root's layout: every path is named by pfi_rag.layout, and the product puts files there.

A client made through the CLI (ingest, then DP training on the tiny model) must leave every file
in a place layout names inside that client's directory, and touch no other client's.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfi_rag import layout
from pfi_rag.cli import app
from pfi_rag.layout import InvalidClientId, client_dir, validate_client_id

ROOT = Path("/srv/pfi-data")


def named_places(root: Path, client: str) -> dict[str, Path]:
    """Every path function of layout, called for ``client`` and round 1: name -> path."""
    places = {}
    for name, function in inspect.getmembers(layout, inspect.isfunction):
        if function.__module__ != layout.__name__ or name.startswith("_"):
            continue
        params = list(inspect.signature(function).parameters)
        if params[:1] != ["data_root"]:
            continue  # validate_client_id, round_adapter_dir_of (a path in, not the root)
        arguments = {"client_id": client, "round_number": 1}
        if name in ("list_clients", "round_record_files"):
            continue  # listings, not places
        places[name] = function(root, *(arguments[p] for p in params[1:]))
    return places


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under ``directory``."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("bad", ["", "../alice", "/etc", "Alice", "a/b", "-x", "a" * 65, "a b", "..", "é"])
def test_invalid_client_ids_are_refused(bad, tmp_path):
    with pytest.raises(InvalidClientId, match="invalid client id"):
        client_dir(tmp_path, bad)


@pytest.mark.parametrize("good", ["alice", "client-00", "a", "0_x-y", "a" * 64])
def test_valid_client_ids(good, tmp_path):
    assert validate_client_id(good) == good
    assert client_dir(tmp_path, good).parent == tmp_path / "clients"


def test_every_place_is_under_the_data_root_and_client_places_under_the_client():
    # Execute
    places = named_places(ROOT, "alice")

    # Assert: under the root; one function per place; a client's places inside its directory
    assert len(places) >= 25, sorted(places)
    assert all(path.is_relative_to(ROOT) and path != ROOT for path in places.values()), places
    assert len(set(places.values())) == len(places), "two functions name the same place"
    alice = ROOT / "clients" / "alice"
    for name, path in places.items():
        if name.startswith("client_"):
            assert path == alice or path.is_relative_to(alice), (name, path)
        else:
            assert not path.is_relative_to(alice), (name, path)
    assert layout.round_adapter_dir(ROOT, 7) == layout.round_adapter_dir_of(layout.round_record_file(ROOT, 7))


def test_layout_imports_no_other_part_of_the_package():
    # Execute: a fresh interpreter, so modules other tests imported do not count
    code = "import sys, pfi_rag.layout; print(sorted(m for m in sys.modules if m.startswith('pfi_rag')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    # Assert: every layer may import layout because layout imports none of them
    assert loaded.stdout.strip() == "['pfi_rag', 'pfi_rag.layout']"


def test_round_record_files_are_listed_in_round_order(tmp_path):
    # Prepare: rounds written out of order, past 9999, and a file that is not a round record
    for number in (10, 2, 10000, 1):
        path = layout.round_record_file(tmp_path, number)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    (layout.rounds_dir(tmp_path) / "round-0003.json.tmp").write_text("{}")

    # Execute
    found = layout.round_record_files(tmp_path)

    # Assert
    assert found == [layout.round_record_file(tmp_path, n) for n in (1, 2, 10, 10000)]


def test_a_client_made_by_the_cli_keeps_its_files_where_layout_says(isolated_env, model_cache):
    # Prepare: two clients' documents, ingested through the CLI
    root = isolated_env / "data"
    options = ["--data-root", str(root)]
    for key, value in {
        "models.generator": "tiny-random",
        "models.device": "cpu",
        "models.cache_dir": model_cache,
        "privacy.max_seq_len": 16,
    }.items():
        options += ["--set", f"{key}={value}"]
    runner = CliRunner()
    for client in ("alice", "bob"):
        documents = isolated_env / f"{client}-docs"
        documents.mkdir()
        for i in range(6):
            (documents / f"note-{i}.txt").write_text(f"{client} wrote note {i} about the garden and bees.")
        ingested = runner.invoke(app, [*options, "ingest", "--client", client, f"{documents}/"])
        assert ingested.exit_code == 0, ingested.output
    bob_before = snapshot(layout.client_dir(root, "bob"))

    # Execute: DP training of alice's adapter on the tiny model
    trained = runner.invoke(app, [*options, "train", "--client", "alice", "--steps", "2", "--json"])

    # Assert: what ingest and train made is where layout says, and nothing outside the clients
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["adapter_version"] == 1
    assert {p.name for p in root.iterdir()} == {"clients"}
    assert snapshot(layout.client_dir(root, "bob")) == bob_before
    assert (layout.client_adapter_dir(root, "alice") / "adapter_config.json").is_file()
    made = (layout.client_docstore_file, layout.client_store_lock_file, layout.client_split_file)
    for place in (*made, layout.client_ledger_file):
        assert place(root, "alice").is_file(), place.__name__
    named = named_places(root, "alice")
    places = [path for name, path in named.items() if name.startswith("client_") and name != "client_dir"]
    unnamed = [
        path
        for path in layout.client_dir(root, "alice").rglob("*")
        if path.is_file() and not any(path == place or path.is_relative_to(place) for place in places)
    ]
    assert unnamed == [], "files in a client's directory that layout does not name"
