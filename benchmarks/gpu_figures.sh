#!/usr/bin/env bash
# Issue 17's GPU figures in one prepared run, for a machine with one CUDA GPU (run from the repository root):
#
#     OUT=/some/folder bash benchmarks/gpu_figures.sh
#
# bf16, dense against ratios 0.2 / 0.4 / 0.6, each model built from a config with random weights (speed and
# memory depend on the shapes only, and neither checkpoint needs to travel): SmolLM2-135M's shapes and a 1.1B
# LLaMA (TinyLlama-1.1B's). Prefill and batch-1 decode tokens/s beside their bounds, eager and compiled, and
# the peak GPU memory of every model; the GEMM timings are measured in the run. One markdown file per model
# under $OUT (default docs/results/gpu). COMPILE=1 adds the torch.compile'd models (8 more graphs per model to
# compile: minutes each, mind a lease's time). It needs torch with CUDA, transformers >= 5.0 and PyYAML; the
# project's packages are read from this checkout (PYTHONPATH), so nothing is installed. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
out="${OUT:-docs/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python() { "${PYTHON:-python3}" "$@"; }
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true

compile=()
if [ "${COMPILE:-0}" = 1 ]; then compile=(--compile); fi
python benchmarks/llm_efficiency.py --model smollm2-135m-config --device cuda --ratios 0.2 0.4 0.6 "${compile[@]}" --out "$out/llm_efficiency_smollm2.md"
python benchmarks/llm_efficiency.py --model llama-1b --device cuda --ratios 0.2 0.4 0.6 "${compile[@]}" --out "$out/llm_efficiency_llama1b.md"
