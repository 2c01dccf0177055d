# Sourced by scripts/test.sh and scripts/demo.sh: creates .venv with the CPU torch the tests pin.
# torch is installed first and alone so nothing later can pull a different (CUDA) build.
if ! command -v ffmpeg >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null
    else
        echo "ffmpeg is missing: sudo apt-get install -y ffmpeg" >&2
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
# The one torchcodec that loads beside torch 2.13 (a newer one would import-fail, not downgrade torch).
.venv/bin/pip install -q --disable-pip-version-check torchcodec==0.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
