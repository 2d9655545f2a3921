#!/usr/bin/env bash
# Quick start, step 1: install modeldiff and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
modeldiff demo "$@"
