#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine whose python3 already holds torch/torchvision.
# Wheels for what that image lacks (zarr, numcodecs, pydantic, ...) travel in .whl/ (see the device notes).
#   bash bench/gpu_checks.sh            # writes logs under ${OUT:-/tmp/phpn-gpu}
set -u -o pipefail
OUT=${OUT:-/tmp/phpn-gpu}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/test_gpu.py \
  "tests/test_extract.py::test_cuda_extraction_matches_cpu" 2>&1 | tee "$OUT/pytest.log"
python3 bench/nmf_vs_sklearn.py --device cuda --skip-sklearn 2>&1 | tee "$OUT/nmf_cuda.log"
python3 bench/nmf_vs_sklearn.py --device cpu --skip-sklearn --threads "$(nproc)" 2>&1 | tee "$OUT/nmf_cpu.log"
