# Every target builds .venv when it is missing or pyproject.toml changed (idempotent, quick when up to date).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.phpn-installed
OUT     ?= runs/demo

.PHONY: venv test demo bench browser clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v -e "is ignored" -e "^ *$$" || true
	@$(BIN)/python -c "import torch, torchvision, prefect, ray, zarr" 
	@touch $(STAMP)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The report test opens report.html in real headless Chromium (Debian's package); install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "chromium not installed: the browser test will be skipped"; }

demo: $(STAMP)
	$(BIN)/phpn demo --out $(OUT)

bench: $(STAMP)
	$(BIN)/python bench/nmf_vs_sklearn.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
