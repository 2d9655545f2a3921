#!/usr/bin/env bash
# Quick start, step 1: install modeldiff and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the demo and the dashboard need; `scripts/test.sh` adds the test tools and Chromium.
EXTRAS="${EXTRAS:-models,app}" BROWSER="${BROWSER:-0}" source scripts/setup.sh
modeldiff demo "$@"
