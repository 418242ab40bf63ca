#!/usr/bin/env bash
# GPU check of psmsearch.kernels, meant for a CUDA machine, run from the repo root:
#   bash benchmarks/gpu_kernels.sh                  # every step
#   STEPS="tests scan" bash benchmarks/gpu_kernels.sh  # some steps (tests scan chunkwise layers)
# 1. prints the machine (nvidia-smi) and the torch / triton versions (always);
# 2. tests: the CUDA tests, pytest -m gpu tests/kernels;
# 3. scan, chunkwise: the CUDA benchmarks benchmarks/scan.py --cuda-only --json and
#    benchmarks/chunkwise.py --cuda-only --quick --json, then the tables from them;
# 4. layers: where psmsearch itself is installed, the decay layers' fused training path:
#    pytest -m gpu tests/plugins/test_affine.py and benchmarks/affine_layers.py --cuda-only --quick.
# Results go to $OUT (default ./gpu_kernels_out): env.txt, pytest_gpu.txt,
# scan_cuda.json, scan_cuda_table.txt, scan_cuda_progress.txt, chunkwise_cuda.json,
# chunkwise_cuda_table.txt, chunkwise_cuda_progress.txt, and pytest_gpu_layers.txt,
# affine_layers_cuda.txt (or layers_skipped.txt).
#
# Time (H200, 2026-11-29, on a fresh machine, so every Triton kernel compiled first): 71 of the GPU tests
# ran in 180 s and 28 others in 150 s (there are 87 now), the scan benchmark took about 50 s, and the
# chunkwise one had timed only two rows after 90 s (compiling its kernels). The step timeouts below add up
# to about 12 minutes; where one call may take 10, run "tests scan" and "chunkwise layers" as two calls.
#
# The kernels are imported through a throw-away package shim (psmsearch/kernels ->
# ./kernels), so the machine needs only torch, triton and pytest (pytest-timeout is used where
# present), not the rest of psmsearch's dependencies; conftest files are not loaded for the same reason.
set -u -o pipefail

OUT="${OUT:-$PWD/gpu_kernels_out}"
STEPS=" ${STEPS:-tests scan chunkwise layers} "
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

wanted() { [[ "$STEPS" == *" $1 "* ]]; }

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

# pytest with the working directory off sys.path (what `python -P` does on 3.11+): the repository's
# psmsearch/ (which has no kernels/ subfolder: setuptools maps it at install time) would hide the shim.
PYTEST_MAIN='import os, sys; sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
import pytest; sys.exit(pytest.main(sys.argv[1:]))'
PER_TEST=()
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then PER_TEST=(--timeout 90); fi

if wanted tests; then
    echo "== pytest -m gpu tests/kernels"
    timeout "${TEST_TIMEOUT:-360}" "$PY" -c "$PYTEST_MAIN" -m gpu tests/kernels -q -rfEs "${PER_TEST[@]}" \
        --noconftest -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/pytest_gpu.txt"
    echo "pytest exit: $?"
fi

if wanted scan; then
    echo "== benchmarks/scan.py --cuda-only --json"
    timeout "${BENCH_TIMEOUT:-120}" "$PY" benchmarks/scan.py --cuda-only --json ${BENCH_FLAGS:-} \
        > "$OUT/scan_cuda.json" 2> >(tee "$OUT/scan_cuda_progress.txt" >&2)
    echo "benchmark exit: $?"
    "$PY" benchmarks/scan.py --from-json "$OUT/scan_cuda.json" | tee "$OUT/scan_cuda_table.txt"
fi

if wanted chunkwise; then
    echo "== benchmarks/chunkwise.py --cuda-only --quick --json"
    timeout "${CHUNK_BENCH_TIMEOUT:-180}" "$PY" benchmarks/chunkwise.py --cuda-only --quick --json \
        > "$OUT/chunkwise_cuda.json" 2> >(tee "$OUT/chunkwise_cuda_progress.txt" >&2)
    echo "benchmark exit: $?"
    "$PY" benchmarks/chunkwise.py --from-json "$OUT/chunkwise_cuda.json" | tee "$OUT/chunkwise_cuda_table.txt"
fi

# 4. Only where psmsearch itself is installed (its plugins need pydantic, pluggy, ...): the decay
#    layers' fused training path on CUDA, tested and timed against the generic path. Not yet run on a GPU.
if wanted layers; then
    if PYTHONPATH="${PYTHONPATH#"$SHIM"}" "$PY" -c 'import psmsearch.plugins.affine' 2>/dev/null; then
        echo "== pytest -m gpu tests/plugins/test_affine.py; benchmarks/affine_layers.py --cuda-only --quick"
        PYTHONPATH="${PYTHONPATH#"$SHIM"}" timeout "${LAYER_TIMEOUT:-45}" "$PY" -m pytest -m gpu \
            tests/plugins/test_affine.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu_layers.txt"
        PYTHONPATH="${PYTHONPATH#"$SHIM"}" timeout "${LAYER_TIMEOUT:-45}" "$PY" benchmarks/affine_layers.py \
            --cuda-only --quick 2>&1 | tee "$OUT/affine_layers_cuda.txt"
    else
        echo "== psmsearch is not installed here: the layer checks (step 4) did not run" | tee "$OUT/layers_skipped.txt"
    fi
fi
