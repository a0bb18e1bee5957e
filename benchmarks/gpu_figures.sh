#!/usr/bin/env bash
# Issue 17's GPU figures in one prepared run, for a machine with one CUDA GPU (run from the repository root):
#
#     OUT=/some/folder bash benchmarks/gpu_figures.sh
#
# bf16, dense against ratios 0.2 / 0.4 / 0.6, each model built from a config with random weights (speed and
# memory depend on the shapes only, and neither checkpoint needs to travel): SmolLM2-135M's shapes and a 1.1B
# LLaMA (TinyLlama-1.1B's). Per model, two benchmarks:
#   - llm_efficiency.py: prefill and batch-1 decode tokens/s beside their bounds and the peak GPU memory of
#     every model (the GEMM timings measured in the run);
#   - compression_cost.py: calibration (131,072 random-token positions: naive float64 hooks against ours with
#     float64 / float32 / bfloat16 GEMMs) and the decomposition time on the GPU, split by cuSOLVER call, with the
#     defaults against their alternatives (`solver: svd`; svd_llm_v2's `root: eigh`) (the 1.1B model: svd_llm
#     only, one matrix at a time: its float64 SVDs take minutes).
# Each step runs under `timeout`, within DEADLINE seconds from the start (default 540), and a step that fails
# or runs out of time does not stop the next one; all output goes to $OUT/log.txt too. COMPILE=1 adds, as the
# last step, SmolLM2's torch.compile'd models (8 graphs to compile: minutes; it gets what time is left).
# One markdown file per benchmark under $OUT (default docs/results/gpu). It needs torch with CUDA, transformers
# >= 5.0 and PyYAML; the project's packages are read from this checkout (PYTHONPATH), so nothing is installed.
# PYTHON picks the interpreter (default python3).
set -uo pipefail
out="${OUT:-docs/results/gpu}"
mkdir -p "$out"
log="$out/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')" \
    || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" || true
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$log"
deadline="${DEADLINE:-540}"

step() {  # step CAP_SECONDS ARGS...: one benchmark, stopped after CAP seconds or at the deadline
    local cap=$1 left=$((deadline - SECONDS))
    shift
    if [ "$left" -lt 20 ]; then echo "== skipped (deadline): $*" | tee -a "$log"; return; fi
    if [ "$cap" -gt "$left" ]; then cap=$left; fi
    echo "== $(date -u +%T) (${SECONDS} s in, ${cap} s allowed): $*" | tee -a "$log"
    timeout "$cap" "$py" "$@" 2>&1 | tee -a "$log"
    echo "== exit ${PIPESTATUS[0]} after ${SECONDS} s" | tee -a "$log"
}

step 120 benchmarks/llm_efficiency.py --model smollm2-135m-config --device cuda --ratios 0.2 0.4 0.6 --repeats 3 \
    --out "$out/llm_efficiency_smollm2.md"
step 120 benchmarks/compression_cost.py --model smollm2-135m-config --device cuda --calib-samples 128 --seq-len 1024 \
    --repeats 3 --out "$out/compression_cost_smollm2.md"
step 200 benchmarks/llm_efficiency.py --model llama-1b --device cuda --ratios 0.2 0.4 0.6 --repeats 3 \
    --out "$out/llm_efficiency_llama1b.md"
step 200 benchmarks/compression_cost.py --model llama-1b --device cuda --calib-samples 128 --seq-len 1024 --repeats 2 \
    --methods svd_llm --decompose-threads 1 --out "$out/compression_cost_llama1b.md"
if [ "${COMPILE:-0}" = 1 ]; then
    step 600 benchmarks/llm_efficiency.py --model smollm2-135m-config --device cuda --ratios 0.2 0.4 0.6 --repeats 3 \
        --compile --out "$out/llm_efficiency_smollm2_compiled.md"
fi
