#!/usr/bin/env bash
# Installs meshpilot and its dependencies into the current Python environment.
#   bash scripts/install.sh           # the package (editable) and what the main job needs
#   bash scripts/install.sh --test    # plus what the test suite needs
# torch: an importable torch (e.g. the user's CUDA build) is kept. Without one, on a machine
# without a GPU, the CPU build is installed (MESHPILOT_TORCH, default torch==2.13.0) so set-up
# does not pull a multi-GB CUDA build; with a GPU, pip's default (CUDA) build is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! $PY -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install: GPU found, installing torch (CUDA build)"
    $PY -m pip install -q torch
  else
    echo "install: no GPU, installing the CPU build of torch (${MESHPILOT_TORCH:-torch==2.13.0})"
    $PY -m pip install -q "${MESHPILOT_TORCH:-torch==2.13.0}"
  fi
fi
echo "install: meshpilot${extras} and dependencies"
$PY -m pip install -q -e ".${extras}"
$PY -c 'import torch, deepspeed, ray, omegaconf; print("install: ok: torch", torch.__version__, "| deepspeed", deepspeed.__version__, "| ray", ray.__version__)' 2>&1 | grep -v "real_accelerator" || true
