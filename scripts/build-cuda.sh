#!/usr/bin/env bash
# Builds the CUDA binary: target/release/retinanet with `--features cuda`.
#
# With a CUDA toolkit installed (nvcc on PATH), this is plain
#   CUDA_COMPUTE_CAP=<your GPU, e.g. 90> cargo build --release --features cuda
# Without one (as on our GPU-less build machines), setup-cuda-build.sh beside
# this script assembles CUDA 13.0's compiler and libraries from NVIDIA's PyPI
# wheels first (about 1 GB, cached), for an H100/H200 (compute capability 90)
# unless CUDA_COMPUTE_CAP says otherwise. Run the result on a GPU machine with
# run-cuda-binary.sh, which finds the CUDA libraries there.
#
#   bash scripts/build-cuda.sh [extra cargo args, e.g. --features cudnn]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."
# cuDNN comes from its own wheel, fetched only when a cudnn build asks.
[[ " $* " == *cudnn* ]] && export CUDNN=1
if ! command -v nvcc >/dev/null 2>&1; then
    bash "$here/setup-cuda-build.sh" >&2
    eval "$(bash "$here/setup-cuda-build.sh" --print-env)"
fi
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
cargo build --release --features cuda "$@"
echo "built ${CARGO_TARGET_DIR:-target}/release/retinanet with CUDA (compute capability $CUDA_COMPUTE_CAP)" >&2
