#!/usr/bin/env bash
# Seeds the corpora from the repository's own files and runs the fuzz
# targets, two at a time, for SECONDS each (default 600).
#
#   cargo install cargo-fuzz
#   bash fuzz/run.sh [SECONDS]
#
# cargo-fuzz needs nightly flags (AddressSanitizer, SanitizerCoverage);
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. Crashes land in
# fuzz/artifacts/<target>/; reproduce one with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"

corpus=fuzz/corpus
mkdir -p "$corpus"/{coco_reader,results_reader,config_parser,image_decode}
for case in tests/fixtures/coco_eval/*/; do
  name=$(basename "$case")
  cp "$case/gt.json" "$corpus/coco_reader/$name.json"
  cp "$case/dt.json" "$corpus/results_reader/$name.json"
done
cp configs/*.toml "$corpus/config_parser/"
cp tests/fixtures/images/*.jpg "$corpus/image_decode/"
synth=$(mktemp -d)
cargo run --release --quiet -- synth --out "$synth" --train 2 --val 0 --size 64 >/dev/null
cp "$synth"/images/*.png "$corpus/image_decode/"
rm -rf "$synth"

# Only now: the flag changes cargo's fingerprints, and the synth step above
# should reuse the normal build.
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
run() {
  cargo fuzz run -O "$1" "$corpus/$1" -- -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 \
    >"fuzz/$1.log" 2>&1 && echo "$1: no crash in ${seconds}s" || echo "$1: FAILED, see fuzz/$1.log and fuzz/artifacts/$1/"
}
run coco_reader & run results_reader & wait
run config_parser & run image_decode & wait
