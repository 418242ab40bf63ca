#!/usr/bin/env bash
# GPU check of psmsearch.kernels, meant for a CUDA machine, run from the repo root:
#   bash benchmarks/gpu_kernels.sh
# 1. prints the machine (nvidia-smi) and the torch / triton versions;
# 2. runs the CUDA tests: pytest -m gpu tests/kernels;
# 3. runs the CUDA benchmarks: benchmarks/scan.py --cuda-only --json and
#    benchmarks/chunkwise.py --cuda-only --quick --json, then the tables from them;
# 4. where psmsearch itself is installed, the decay layers' fused training path:
#    pytest -m gpu tests/plugins/test_affine.py and benchmarks/affine_layers.py --cuda-only --quick.
# Results go to $OUT (default ./gpu_kernels_out): env.txt, pytest_gpu.txt,
# scan_cuda.json, scan_cuda_table.txt, scan_cuda_progress.txt, chunkwise_cuda.json,
# chunkwise_cuda_table.txt, chunkwise_cuda_progress.txt, and pytest_gpu_layers.txt,
# affine_layers_cuda.txt (or layers_skipped.txt).
#
# Budget (H200, 2026-11-29, a fresh machine, so every Triton kernel compiles): the 83 GPU tests need
# about 4-5 minutes (71 ran in 180 s), the scan benchmark about 50 s, and the chunkwise one more than
# 90 s (compiling its kernels); the step timeouts below add up to 590 s.
#
# The kernels are imported through a throw-away package shim (psmsearch/kernels ->
# ./kernels), so the machine needs only torch, triton and pytest, not the rest of
# psmsearch's dependencies; conftest files are not loaded for the same reason.
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_kernels_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

{
    nvidia-smi || echo "nvidia-smi failed"
    if ! "$PY" -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available())'; then
        echo "torch/triton missing: trying pip install"
        "$PY" -m pip install -q torch triton pytest
        "$PY" -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available())'
    fi
} 2>&1 | tee "$OUT/env.txt"

SHIM="$(mktemp -d)"
mkdir -p "$SHIM/psmsearch"
: > "$SHIM/psmsearch/__init__.py"
ln -s "$PWD/kernels" "$SHIM/psmsearch/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
unset PSMSEARCH_KERNEL_BACKEND TRITON_INTERPRET

echo "== pytest -m gpu tests/kernels"
# -P: the repository root must not come first on sys.path, or its psmsearch/ (which has no
# kernels/ subfolder: setuptools maps it at install time) hides the shim.
timeout "${TEST_TIMEOUT:-270}" "$PY" -P -m pytest -m gpu tests/kernels -q -rfEs --timeout 90 --noconftest -p no:cacheprovider \
    --durations=5 2>&1 | tee "$OUT/pytest_gpu.txt"
echo "pytest exit: $?"

echo "== benchmarks/scan.py --cuda-only --json"
timeout "${BENCH_TIMEOUT:-100}" "$PY" benchmarks/scan.py --cuda-only --json ${BENCH_FLAGS:-} \
    > "$OUT/scan_cuda.json" 2> >(tee "$OUT/scan_cuda_progress.txt" >&2)
echo "benchmark exit: $?"
"$PY" benchmarks/scan.py --from-json "$OUT/scan_cuda.json" | tee "$OUT/scan_cuda_table.txt"

echo "== benchmarks/chunkwise.py --cuda-only --quick --json"
timeout "${CHUNK_BENCH_TIMEOUT:-180}" "$PY" benchmarks/chunkwise.py --cuda-only --quick --json \
    > "$OUT/chunkwise_cuda.json" 2> >(tee "$OUT/chunkwise_cuda_progress.txt" >&2)
echo "benchmark exit: $?"
"$PY" benchmarks/chunkwise.py --from-json "$OUT/chunkwise_cuda.json" | tee "$OUT/chunkwise_cuda_table.txt"

# 4. Only where psmsearch itself is installed (its plugins need pydantic, pluggy, ...): the decay
#    layers' fused training path on CUDA, tested and timed against the generic path.
if PYTHONPATH="${PYTHONPATH#"$SHIM"}" "$PY" -c 'import psmsearch.plugins.affine' 2>/dev/null; then
    echo "== pytest -m gpu tests/plugins/test_affine.py; benchmarks/affine_layers.py --cuda-only --quick"
    PYTHONPATH="${PYTHONPATH#"$SHIM"}" timeout "${LAYER_TIMEOUT:-20}" "$PY" -m pytest -m gpu tests/plugins/test_affine.py \
        -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu_layers.txt"
    PYTHONPATH="${PYTHONPATH#"$SHIM"}" timeout "${LAYER_TIMEOUT:-20}" "$PY" benchmarks/affine_layers.py --cuda-only \
        --quick 2>&1 | tee "$OUT/affine_layers_cuda.txt"
else
    echo "== psmsearch is not installed here: the layer checks (step 4) did not run" | tee "$OUT/layers_skipped.txt"
fi
