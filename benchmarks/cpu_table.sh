#!/usr/bin/env bash
# The CPU throughput table of BENCHMARKS.md: `retinanet bench` and
# torchvision (benchmarks/torchvision_bench.py) in the same configurations,
# one after the other on the same machine, with the same thread count.
#
#   cargo build --release && bash benchmarks/cpu_table.sh [STEPS] [ROUNDS]
#
# Each row runs ROUNDS times (default 1), ours and torchvision alternating,
# and reports each side's median images/s, their ratio, and the range of
# the rounds' own ratios: on a shared virtual machine one run of either
# side can be 30% off, and alternating rounds sees both through the same
# spells. Memory is the median too.
#
# Needs torch and torchvision (pip install torch torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
rounds=${2:-1}
threads=$(nproc)
bin=target/release/retinanet
tv="python3 benchmarks/torchvision_bench.py --threads $threads --steps $steps --classes 80"
ours() { # depth recipe mode size width batch
    local norm=bn freeze=0
    if [ "$2" = finetune ]; then norm=frozen_bn; freeze=2; fi
    $bin bench --config torchvision_retinanet_r50_fpn --json --steps "$steps" --mode "$3" --size "$4" --width "$5" \
        --batch "$6" --set model.num_classes=80 --set model.backbone.depth="$1" \
        --set model.backbone.norm=$norm --set model.backbone.freeze_at=$freeze
}
print_row() { # label ours-json-lines torchvision-json-lines (one line a round)
    python3 - "$1" "$2" "$3" <<'PY'
import json, statistics, sys
label = sys.argv[1]
a, b = ([json.loads(line) for line in arg.splitlines()] for arg in sys.argv[2:4])
median = lambda runs, key: statistics.median(r[key] for r in runs)
ours, theirs = median(a, "images_per_second"), median(b, "images_per_second")
rounds = sorted(x["images_per_second"] / y["images_per_second"] for x, y in zip(a, b))
spread = f"{rounds[0]:.2f}-{rounds[-1]:.2f}" if len(rounds) > 1 else "-"
print(f"| {label} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x | {spread} "
      f"| {median(a, 'peak_rss_model_mib'):.0f} | {median(b, 'peak_rss_model_mib'):.0f} "
      f"| {median(a, 'peak_rss_mib'):.0f} | {median(b, 'peak_rss_mib'):.0f} |")
PY
}
row() { # label depth recipe mode size width batch
    local a="" b="" round
    for round in $(seq "$rounds"); do
        a+="$(ours "$2" "$3" "$4" "$5" "$6" "$7")"$'\n'
        b+="$($tv --depth "$2" --recipe "$3" --mode "$4" --size "$5" --image-width "$6" --batch "$7")"$'\n'
    done
    print_row "$1" "$a" "$b"
}
shapes_row() { # label mode (the shapes preset's model, 128x128, its batch of 8)
    local a="" b="" round
    for round in $(seq "$rounds"); do
        a+="$($bin bench --config shapes --json --steps "$steps" --mode "$2" --size 128 --batch 8 --set model.num_classes=3)"$'\n'
        b+="$($tv --preset shapes --classes 3 --mode "$2")"$'\n'
    done
    print_row "$1" "$a" "$b"
}
bccd_row() { # label (the `bccd` preset's model and step: R18, FPN 128, GroupNorm heads, 384x512, batch 4)
    local a="" b="" round
    for round in $(seq "$rounds"); do
        a+="$($bin bench --config bccd --json --steps "$steps" --mode train --size 384 --width 512 --batch 4 --set model.num_classes=3)"$'\n'
        b+="$($tv --depth 18 --fpn 128 --head-gn --classes 3 --recipe scratch --init torch_default --mode train \
            --size 384 --image-width 512 --batch 4)"$'\n'
    done
    print_row "$1" "$a" "$b"
}
flags=$(grep -o -w 'avx512f\|avx2\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads, flags: ${flags:-unknown}; $(date -u +%F)"
echo
echo "Memory: the peak resident memory less the process's before the model was built"
echo "(the interpreter and torch's libraries on one side), then the raw peaks."
echo
echo "Images/s: the median of $rounds alternating round(s) of $steps timed steps a side."
echo
echo "| configuration | ours img/s | torchvision img/s | ratio | rounds' ratios | ours MiB | torchvision MiB | ours raw peak | torchvision raw peak |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
row "(a) R18-FPN 512x512 b2 train, fine-tune recipe" 18 finetune train 512 512 2
row "(a) R18-FPN 512x512 b2 train, from scratch" 18 scratch train 512 512 2
row "(b) R50-FPN 512x512 b2 train, fine-tune recipe" 50 finetune train 512 512 2
row "(b) R50-FPN 512x512 b2 train, from scratch" 50 scratch train 512 512 2
row "(c) R18-FPN 512x512 b1 inference" 18 finetune infer 512 512 1
row "(c) R50-FPN 512x512 b1 inference" 50 finetune infer 512 512 1
row "(d) R50-FPN 800x1333 b1 inference" 50 finetune infer 800 1333 1
shapes_row "(e) shapes model 128x128 b8 train" train
shapes_row "(e) shapes model 128x128 b8 inference" infer
bccd_row "(f) bccd recipe 384x512 b4 train"
