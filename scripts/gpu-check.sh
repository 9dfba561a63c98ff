#!/usr/bin/env bash
# The GPU checks, in one command on a GPU node (after `make install TORCH=<a CUDA build of torch>`):
#
#   scripts/gpu-check.sh [OUT]        default OUT: gpu-check-<date>-<time>
#
#   1. the architecture matrix's invariants on the GPU (tests/unit/test_architectures.py, fp32
#      with TF32 off, so the tolerances of the CPU run hold);
#   2. every architecture through sft -> rm -> ppo by the CLI on one GPU (tests/integration/
#      test_architectures.py; the stages pick the GPU up themselves);
#   3. SmolLM2-135M-Instruct on the chat task through the CLI in bf16 under ZeRO-3 on every GPU of
#      the node: LoRA SFT, the reward model, PPO, each stage's wall time and the exact-answer rate
#      before and after (OUT/smollm2/figures.json);
#   4. `make bench` (bf16, SDPA, torch.cuda.max_memory_allocated per rank).
#
# Everything lands in OUT: machine.txt (GPU, driver, CUDA, torch), one log per part, the registry
# of part 3 and the bench's JSON lines. Exit status: 2 without a visible CUDA device, else the
# number of parts that failed. Put the figures in BENCHMARKS.md ("GPU").
set -uo pipefail

OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
RLHF=$(dirname "$PY")/rlhf

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device visible to $PY; install a CUDA build of torch (make install TORCH=...) on a GPU node" >&2
    exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c 'import torch, transformers, deepspeed as ds; print("torch", torch.__version__, "cuda", torch.version.cuda)
print("transformers", transformers.__version__, "deepspeed", ds.__version__)'
    echo "GPUs visible: $GPUS"
} >"$OUT/machine.txt"

failed=0
part() {  # part NAME COMMAND...: run one part, its output in OUT/NAME.log, and say how it went
    local name=$1
    shift
    local start=$SECONDS
    if (cd "$REPO" && "$@") >"$OUT/$name.log" 2>&1; then
        echo "gpu-check: $name passed in $((SECONDS - start)) s"
    else
        echo "gpu-check: $name FAILED after $((SECONDS - start)) s (see $OUT/$name.log)"
        failed=$((failed + 1))
    fi
}

part matrix env RLHF_TEST_DEVICE=cuda "$PY" -m pytest -q tests/unit/test_architectures.py
part matrix-cli env CUDA_VISIBLE_DEVICES=0 "$PY" -m pytest -q tests/integration/test_architectures.py
part smollm2 "$PY" scripts/chat_task.py run "$OUT/smollm2" -n "$GPUS" --precision bf16 --zero-stage 3
part bench "$PY" scripts/bench.py --out "$OUT/bench.jsonl"

echo "gpu-check: $failed part(s) failed; results in $OUT"
exit "$failed"
