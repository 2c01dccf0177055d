#!/usr/bin/env bash
# Fresh machine -> installed venv -> CPU demo (tiny random model, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
.venv/bin/python -m vidtune.demo "$@"
