# Every target builds .venv when it is missing or pyproject.toml changed (idempotent, quick when up to date).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.phpn-installed
OUT     ?= runs/demo

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/phpn demo --out $(OUT)

bench: $(STAMP)
	$(BIN)/python bench/nmf_vs_sklearn.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
