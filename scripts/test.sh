#!/usr/bin/env bash
# Fresh machine -> installed venv -> full test suite. Safe to re-run; pip reuses its cache.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
export TRITON_INTERPRET=1
.venv/bin/python -m pytest -q tests "$@"
