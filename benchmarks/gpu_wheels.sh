#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.py needs that a bare GPU image lacks, fetched on a machine with
# PyPI for the GPU machine's Python (3.12, manylinux x86-64): 64 MiB at most in all, what such a
# machine accepts beside the repository. Never torch, triton or NVIDIA libraries: the check
# measures the machine's own. Each is a pinned --no-deps download; the check unpacks a wheel only
# where the machine lacks that package or has an older one.
#
#   bash benchmarks/gpu_wheels.sh                 # download into benchmarks/wheels (git-ignored)
#   bash benchmarks/gpu_wheels.sh --list          # print the pins only (no network)
#   bash benchmarks/gpu_wheels.sh --dest DIR --python 3.12
#
# The GPU image this list is made for has torch 2.11 (CUDA 13), triton 3.6, transformers 5.x,
# peft, safetensors, accelerate, pybind11, cmake, ninja and nvcc; not diffusers, torchao,
# bitsandbytes, torchcodec or torch-optimi (benchmarks/README.md, "Running on a bare GPU image").
set -euo pipefail

PINS=(
    "diffusers==0.42.1"            # the numerical reference (parity, step)
    "torchao==0.18.0"              # int8 base; 0.18 loads its kernels on torch >= 2.11
    "huggingface-hub==1.33.0"      # diffusers 0.42.1 needs >= 1.32; still < 2 for transformers 5.0
    "pillow==13.0.0"               # imported by diffusers
    "requests==2.34.2"             # diffusers checks it at import
    "urllib3==2.8.0"               # requests' dependencies ...
    "charset-normalizer==3.5.3"
    "certifi==2026.10.19.post1"
    "idna==3.20"
)
LIMIT_MIB=64

dest="$(cd "$(dirname "$0")" && pwd)/wheels"
python_version="3.12"
while [ $# -gt 0 ]; do
    case "$1" in
        --list) printf '%s\n' "${PINS[@]}"; exit 0 ;;
        --dest) dest="$2"; shift 2 ;;
        --python) python_version="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

abi="cp${python_version/./}"
mkdir -p "$dest"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp --abi "$abi" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any --dest "$dest" "${PINS[@]}"

total=0
for whl in "$dest"/*.whl; do
    name="$(basename "$whl")"
    case "${name,,}" in
        torch-*|triton-*|pytorch_triton*|nvidia_*)
            echo "gpu_wheels.sh: $name must not be shipped (the check uses the machine's own); delete it" >&2
            exit 1 ;;
    esac
    bytes=$(stat -c %s "$whl")
    total=$((total + bytes))
    awk -v b="$bytes" -v n="$name" 'BEGIN { printf "%8.2f MiB  %s\n", b / 1048576, n }'
done
awk -v b="$total" -v l="$LIMIT_MIB" 'BEGIN { printf "%8.2f MiB  total (limit %d MiB)\n", b / 1048576, l }'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "gpu_wheels.sh: over ${LIMIT_MIB} MiB: the GPU machine would refuse the folder" >&2
    exit 1
fi
