#!/usr/bin/env bash
# Quick start, step 2: run the test suite (installs what it needs first).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# Tests run in parallel, one worker per core (MODELDIFF_TEST_WORKERS=0 runs them in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh >/dev/null
ruff check engine dashboard tests benchmarks scripts
python -m pytest -n "${MODELDIFF_TEST_WORKERS:-auto}" --dist loadscope --durations=25 "$@"
