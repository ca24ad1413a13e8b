#!/usr/bin/env bash
# The GPU figures in one run (about 8 minutes on one GPU) and one table: the CUDA tests (pytest -m gpu), the
# explain-speed benchmark on cuda (ResNet-50: LRP, Grad-CAM, distributions against a plain forward) and the
# serving benchmark with onnxruntime-gpu on cuda:0 (TorchServe gives its worker the GPU).
#
#   benchmarks/gpu.sh [OUT_DIR]        (default out/gpu; each step's full output and RESULTS.md go there)
#
# It makes its own virtualenv (GPU_VENV, default .venv-gpu) with the gpu extra, because onnxruntime-gpu and
# the CPU onnxruntime of .venv must never share one. Exit status: 0 every step passed, 1 a step failed,
# 2 no usable GPU (nothing is measured then).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu}
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$OUT/gpu.txt" 2>&1; then
    echo "benchmarks/gpu.sh: no NVIDIA GPU on this host (nvidia-smi -L failed): nothing measured" >&2
    exit 2
fi
VENV=${GPU_VENV:-.venv-gpu}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet -e ".[gpu,dev,bench]" >"$OUT/install.txt" 2>&1 || {
    echo "benchmarks/gpu.sh: installing .[gpu,dev,bench] failed, see $OUT/install.txt" >&2
    exit 1
}
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, onnxruntime as ort; assert torch.cuda.is_available(), 'torch sees no CUDA'; \
assert 'CUDAExecutionProvider' in ort.get_available_providers(), 'onnxruntime-gpu has no CUDA provider'" \
    >"$OUT/check.txt" 2>&1; then
    echo "benchmarks/gpu.sh: CUDA is not usable: $(tail -1 "$OUT/check.txt")" >&2
    exit 2
fi

status=0
rows=()
step() {  # step NAME TIMEOUT_S COMMAND...: run it, keep its output, add a row (status, seconds, headline)
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || status=1
    local headline
    headline=$(grep -E '^\| |passed|failed' "$OUT/$name.txt" | grep -vE '^\|[-|: ]+\|$' | tail -1 | tr -s ' ' | cut -c1-150)
    rows+=("| $name | $([ "$rc" -eq 0 ] && echo ok || echo "exit $rc") | $((SECONDS - start)) | ${headline//|/\\|} |")
}

step cuda-tests 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider
step explain-speed 150 "$PY" -m benchmarks.explain_speed --device cuda --archs resnet50 --pairs 3 --ks 2,10,100 \
    --write "$OUT/RESULTS.md"
step serving 200 "$PY" -m benchmarks.serving --model resnet50 --duration 20 --users 16 --rounds 5 \
    --write "$OUT/RESULTS.md"

echo "GPU run $(date -u +%F) on $(head -1 "$OUT/gpu.txt"); tables in $OUT/RESULTS.md"
echo
echo "| step | result | seconds | last line of its table or summary |"
echo "|---|---|---:|---|"
printf '%s\n' "${rows[@]}"
exit $status
