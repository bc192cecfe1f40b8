#!/usr/bin/env bash
# The device check: on a machine with one NVIDIA GPU, from a fresh clone,
#
#     bench/gpu_check.sh OUT_DIR
#
# installs a CUDA build of torch and the project into .venv-gpu, fetches the default model, runs
# the CUDA test suite (pytest -m gpu: the CPU suite's oracles on the GPU), then the generate,
# serve and train benchmarks with --device cuda --dtype bfloat16 on the default model, and writes
# into OUT_DIR:
#     environment.json   GPU, driver, torch and CUDA versions
#     pytest_gpu.txt     the test run's output;  pytest_gpu.xml  the same as JUnit XML
#     generate.json  serve.json  train.json   each benchmark's JSON (stderr beside it as *.log)
#     summary.txt        one line per step: ok / FAILED (exit code) / TIMED OUT, with its seconds
# Every step runs even if an earlier one fails; the exit code is non-zero if any failed.
# Budget: about 10 minutes on an H100/H200-class GPU with a warm pip cache; the torch download
# (~2.5 GB) is the one part that depends on the network.
#
# Environment: PYTHON (default python3), VENV (default .venv-gpu), TORCH_INDEX_URL (a PyTorch
# wheel index, e.g. https://download.pytorch.org/whl/cu128; default: PyPI, whose Linux x86_64
# torch wheels are CUDA builds), SKIP_INSTALL=1 (rerun in an existing VENV without installing).
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}
BIN=$VENV/bin
FAILED=0
: > "$OUT/summary.txt"

step() {  # step NAME TIMEOUT_SECONDS COMMAND... (stdout -> NAME's file by the caller's redirection)
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@"
    local code=$?
    local took=$((SECONDS - started))
    if [ $code -eq 0 ]; then
        echo "$name: ok (${took}s)" | tee -a "$OUT/summary.txt" >&2
    elif [ $code -eq 124 ]; then
        echo "$name: TIMED OUT after ${limit}s" | tee -a "$OUT/summary.txt" >&2
        FAILED=1
    else
        echo "$name: FAILED (exit $code, ${took}s)" | tee -a "$OUT/summary.txt" >&2
        FAILED=1
    fi
    return $code
}

install() {
    "$PYTHON" -m venv "$VENV" || return 1
    "$BIN/pip" install -q --upgrade pip || return 1
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$BIN/pip" install -q torch --index-url "$TORCH_INDEX_URL" || return 1
    else
        "$BIN/pip" install -q torch || return 1
    fi
    "$BIN/pip" install -q -e '.[dev]'
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
    step install 900 install || { echo "cannot continue without the environment" >&2; exit 1; }
fi

step cuda_available 120 "$BIN/python" - > "$OUT/environment.json" <<'PY' || { echo "torch sees no CUDA device; set TORCH_INDEX_URL to a CUDA wheel index matching the driver" >&2; exit 1; }
import json, subprocess, torch
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA device"
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0),
                  "bf16_supported": torch.cuda.is_bf16_supported(), "nvidia_smi": smi}, indent=2))
PY

step model_pull 300 "$BIN/loraplex" model pull > /dev/null

step pytest_gpu 600 "$BIN/python" -m pytest -m gpu tests/gpu -q -rs --junitxml="$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.txt" 2>&1
FLAGS=(--device cuda --dtype bfloat16)
step bench_generate 300 "$BIN/python" bench/generate.py "${FLAGS[@]}" > "$OUT/generate.json" 2> "$OUT/generate.log"
step bench_serve 600 "$BIN/python" bench/serve.py --quick "${FLAGS[@]}" > "$OUT/serve.json" 2> "$OUT/serve.log"
step bench_train 600 "$BIN/python" bench/train.py --quick "${FLAGS[@]}" > "$OUT/train.json" 2> "$OUT/train.log"

cat "$OUT/summary.txt" >&2
exit $FAILED
