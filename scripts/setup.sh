#!/usr/bin/env bash
# Install modeldiff into ./.venv (or into the virtual environment already active).
# Installs the CPU build torch==2.13.0 only where no torch is present, so a GPU
# machine keeps its own CUDA build. EXTRAS selects optional dependency groups.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "installing torch 2.13.0 ..."
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[${EXTRAS:-test}]"
echo "modeldiff installed in ${VIRTUAL_ENV}"
