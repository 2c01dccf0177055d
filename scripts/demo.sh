#!/usr/bin/env bash
# Fresh machine -> installed venv -> a LoRA trained on CPU (small random Wan, ffmpeg clips, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
.venv/bin/python -m vidtune.testing demo-setup demo     # demo/model (diffusers layout) + demo/videos
.venv/bin/vidtune-train examples/quickstart.toml "$@"   # caches, trains, checkpoints, exports the LoRA
.venv/bin/python -m vidtune.testing demo-check demo/run # learned (last 10 steps < half the first 10); ComfyUI and diffusers load the LoRA
