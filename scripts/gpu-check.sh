#!/usr/bin/env bash
# The GPU check: this project's CUDA ops against the CPU's (and Candle's
# stock ops), parity with torchvision on CUDA, a short training run through
# the multi-GPU launcher, and training and inference throughput against
# torchvision on the same GPU, in f32 and bf16, the stock ops beside ours.
#
# Two halves, because the GPU machine has no Rust and no network:
#
#   bash scripts/gpu-check.sh --prepare
#       here: builds the CUDA binary (with cuDNN, as torch uses it, and NCCL)
#       and the two parity test binaries (scripts/build-cuda.sh's toolchain,
#       target folder target-cuda/) and puts them, xz-compressed, in .gpu/
#       (about 20 MB; ignored by git).
#
#   bash scripts/gpu-check.sh [OUT_DIR]
#       there, from the repository root with .gpu/ beside it: needs an NVIDIA
#       driver >= 580 and torch + torchvision (cu130) in python3, whose pip
#       packages supply the CUDA and NCCL libraries (scripts/run-cuda-binary.sh).
#       Writes OUT_DIR/gpu-check.md (the table for BENCHMARKS.md) and one log
#       per step; exits 1 if a check failed. About 6 minutes on an H200.
#
# Knobs: DEVICE (cuda), BATCH (8), STEPS (5 timed steps per figure),
# SIZES ("640x640 800x1333"), TRAIN_STEPS (150), BINARIES (.gpu), BUDGET
# (420: throughput rows that would start later are skipped). With
# DEVICE=cpu, small sizes and a folder of the CPU build's binaries, the same
# script checks its own plumbing on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda} CUDNN=1
    if ! command -v nvcc >/dev/null 2>&1; then
        bash scripts/setup-cuda-build.sh >&2
        eval "$(bash scripts/setup-cuda-build.sh --print-env)"
    fi
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    cargo build --release --features cudnn,nccl
    tests=$(cargo test --release --features cudnn,nccl --no-run --message-format=json \
        --test model_parity --test train_parity --test cuda_ops \
        | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])')
    mkdir -p .gpu
    xz -T0 -6 -c "$CARGO_TARGET_DIR/release/retinanet" > .gpu/retinanet.xz
    while read -r name exe; do xz -T0 -6 -c "$exe" > ".gpu/$name.xz"; done <<<"$tests"
    ls -l .gpu >&2
    exit 0
fi

DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-8}
STEPS=${STEPS:-5}
SIZES=${SIZES:-640x640 800x1333}
TRAIN_STEPS=${TRAIN_STEPS:-150}
BINARIES=${BINARIES:-.gpu}
out=$(realpath -m "${1:-gpu-check-out}")
work=$(mktemp -d)
mkdir -p "$out"
report="$out/gpu-check.md"
failed=0

# Binaries: BINARIES/NAME.xz (or plain BINARIES/NAME), unpacked once.
unpack() {
    if [[ -f "$BINARIES/$1.xz" ]]; then
        xz -dc "$BINARIES/$1.xz" > "$work/$1" 2>/dev/null \
            || python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BINARIES/$1.xz" "$work/$1"
    else
        cp "$BINARIES/$1" "$work/$1"
    fi && chmod +x "$work/$1"
}
for bin in retinanet model_parity train_parity cuda_ops; do
    unpack "$bin" 2>/dev/null || { echo "error: no $BINARIES/$bin[.xz]; run --prepare first" >&2; exit 1; }
done
# run-cuda-binary.sh finds the CUDA and NCCL libraries and execs the binary.
run() { timeout "$1" bash scripts/run-cuda-binary.sh "${@:2}"; }

# step NAME TIMEOUT CMD...: runs CMD, logs to OUT/NAME.log, records pass/fail.
step() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if run "$limit" "$@" > "$out/$name.log" 2>&1; then
        echo "| $name | pass | $((SECONDS - start)) s |" >> "$work/steps.md"
    else
        echo "| $name | **FAIL** (exit $?, see $name.log) | $((SECONDS - start)) s |" >> "$work/steps.md"
        failed=1
    fi
}

{
    echo "# GPU check, $(date -u +%Y-%m-%d)"
    echo
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /'
    python3 -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")' 2>&1
    echo "device $DEVICE, batch $BATCH, $STEPS timed steps per figure after 2 warm-up steps"
} > "$report"
echo "| step | result | time |" > "$work/steps.md"
echo "| --- | --- | --- |" >> "$work/steps.md"

# 1. This project's CUDA ops (cuDNN convolution and its backward) and
#    Candle's stock ones against the CPU, f32 with and without TF32 and bf16;
#    then parity with torchvision on identical weights: the CPU tests'
#    fixtures and tolerances, on the GPU (bf16 within 1.25x of
#    torch.autocast's error).
export CARGO_MANIFEST_DIR=$PWD RETINANET_TEST_DEVICE=$DEVICE RETINANET_CACHE=$work/cache
step cuda_ops 180 "$work/cuda_ops" --nocapture
step model_parity 240 "$work/model_parity" --nocapture
step train_parity 240 "$work/train_parity" --nocapture

# 2. A short training run through the launcher (`--gpus 0`: one rank, NCCL
#    all-reduce included); the logged loss must fall.
train_device=(--gpus 0)
[[ $DEVICE == cpu ]] && train_device=(--device cpu)
step train_loss_falls 300 "$work/retinanet" train "${train_device[@]}" --out "$work/run" \
    --set data.synth.train=800 --set data.synth.val=50 --set train.max_steps="$TRAIN_STEPS" \
    --set train.eval_every=0 --set train.log_every=10 --set loss.normalizer=per_image
python3 - "$work/run/metrics.jsonl" >> "$report" <<'PY' || failed=1
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
loss = [r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r]
first, last = sum(loss[:3]) / 3, sum(loss[-3:]) / 3
ips = [r["images_per_second"] for r in rows if "images_per_second" in r]
print(f"\nTraining (shapes preset, {len(loss)} log lines): loss {first:.3f} -> {last:.3f}, "
      f"{ips[-1]:.1f} img/s at the end")
sys.exit(0 if last < 0.7 * first else 1)
PY

# 3. Throughput: ResNet-50-FPN, fine-tune recipe, ours and torchvision.
bench_row() { # mode precision HxW [kernels: fused (default) or stock]
    local h=${3%x*} w=${3#*x} kernels=${4:-fused} a b
    a=$(run 90 "$work/retinanet" bench --device "$DEVICE" --config torchvision_retinanet_r50_fpn --json \
        --mode "$1" --size "$h" --width "$w" --batch "$BATCH" --steps "$STEPS" \
        --set model.num_classes=80 --set model.backbone.norm=frozen_bn --set model.backbone.freeze_at=2 \
        --set train.precision="$2" --set runtime.cuda_kernels="$kernels" 2>> "$out/bench.log" | tail -1)
    b=$(timeout 90 python3 benchmarks/torchvision_bench.py --device "$DEVICE" --precision "$2" --depth 50 \
        --recipe finetune --classes 80 --mode "$1" --size "$h" --image-width "$w" --batch "$BATCH" \
        --steps "$STEPS" 2>> "$out/bench.log" | tail -1)
    python3 - "$1 $2 ${h}x${w} b$BATCH $kernels" "$a" "$b" <<'PY'
import json, sys
label = sys.argv[1]
def parse(s):
    try:
        return json.loads(s)
    except ValueError:
        return None
a, b = parse(sys.argv[2]), parse(sys.argv[3])
cell = lambda r: f"{r['images_per_second']:.1f}" if r else "failed"
ratio = f"{a['images_per_second'] / b['images_per_second']:.2f}x" if a and b else "-"
mem = f"{b['peak_gpu_mib']:.0f}" if b and "peak_gpu_mib" in b else "-"
print(f"| {label} | {cell(a)} | {cell(b)} | {ratio} | {mem} |")
sys.exit(0 if a and b else 1)
PY
}
{
    echo
    echo "| R50-FPN, fine-tune recipe | ours img/s | torchvision img/s | ratio | torchvision peak GPU MiB |"
    echo "| --- | ---: | ---: | ---: | ---: |"
} >> "$report"
# Rows that would start past BUDGET seconds are skipped, to stay inside the
# lent machine's time (each row may take up to 3 minutes when stuck).
BUDGET=${BUDGET:-420}
# The stock ops (runtime.cuda_kernels = "stock") once per mode, at the first
# size in f32, beside the fused rows.
rows=()
for precision in f32 bf16; do
    for size in $SIZES; do
        for mode in train infer; do
            rows+=("$mode $precision $size fused")
            [[ $precision == f32 && $size == "${SIZES%% *}" ]] && rows+=("$mode $precision $size stock")
        done
    done
done
for row in "${rows[@]}"; do
    read -r mode precision size kernels <<<"$row"
    if (( SECONDS > BUDGET )); then
        echo "| $mode $precision $size b$BATCH $kernels | skipped: past ${BUDGET} s | | | |" >> "$report"
        failed=1
        continue
    fi
    bench_row "$mode" "$precision" "$size" "$kernels" >> "$report" || failed=1
done

{ echo; cat "$work/steps.md"; } >> "$report"
cat "$report"
rm -rf "$work"
exit $failed
