#!/usr/bin/env bash
# Everything a GPU machine checks, in one run: every `gpu` test, then the GPU benchmarks.
#
#     bash tools/gpu_checks.sh [RESULTS_DIR]      # default RESULTS_DIR: $OUT, else gpu-results/
#
# Writes pytest's report and each benchmark's JSON to RESULTS_DIR; exits non-zero if a test failed.
# Tests needing two GPUs (EP = 2: alltoall dispatcher, grouped GEMM, routing replay; CP = 2) skip themselves
# on a one-GPU machine. Add new gpu tests by marking them
# `@pytest.mark.gpu` (collected here) and new GPU benchmarks as a line below.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
RESULTS="${1:-${OUT:-gpu-results}}"
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$RESULTS/gpu.txt"

python -m pytest -q -m gpu -p no:cacheprovider tests/ --junitxml="$RESULTS/gpu-tests.xml" 2>&1 \
    | tee "$RESULTS/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

# Training-step MFU (BENCHMARKS.md): dense Qwen3 shapes, then a Qwen3-30B-A3B MoE layer stack.
python -m bench.mfu --out "$RESULTS/mfu-dense.json" 2>&1 | tail -5
python -m bench.mfu --models qwen3-30b-a3b --out "$RESULTS/mfu-moe.json" 2>&1 | tail -5

exit "$tests_rc"
