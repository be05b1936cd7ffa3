#!/usr/bin/env bash
# The ranks' rendezvous (src/train/rendezvous.rs) under torchrun itself, as
# users start multi-machine runs: torchrun sets the variables and its agent
# holds MASTER_PORT. The ranks are the rendezvous test's binary in its rank
# role (tests/rendezvous.rs), so no GPU or NCCL is needed: each prints the
# group id it got, and every rank must print rank 0's.
#
#   bash scripts/torchrun-check.sh      # needs torchrun on PATH (pip install torch)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(cargo test --release --test rendezvous --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; messages = [json.loads(line) for line in sys.stdin]  # all of them: cargo fails on a closed pipe
print(next(m["executable"] for m in messages if m.get("executable") and m["target"]["name"] == "rendezvous"))')
export RENDEZVOUS_TEST_RANK=1
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT

# Every line a rank printed must be `id <rank 0's id>`, the same on all.
same_id() {
    local ids
    ids=$(grep -ho 'id rank-0-of-pid-[0-9]*' "$@" | sort | uniq -c)
    echo "$ids"
    [[ $(echo "$ids" | wc -l) == 1 && $(echo "$ids" | awk '{print $1}') == "$expected" ]]
}

echo "one machine, 3 ranks (torchrun --standalone):"
torchrun --no-python --standalone --nproc-per-node 3 --tee 3 "$bin" >"$log/standalone" 2>&1 ||
    { grep -h ']:error: ' "$log/standalone"; exit 1; }
expected=3 same_id "$log/standalone"

echo "two torchrun nodes of 2 ranks on 127.0.0.1 (static rendezvous):"
port=$((29500 + RANDOM % 1000))
for node in 1 0; do
    torchrun --no-python --nnodes 2 --node-rank $node --master-addr 127.0.0.1 --master-port $port \
        --nproc-per-node 2 --tee 3 "$bin" >"$log/node$node" 2>&1 &
done
wait -n && wait -n || { grep -h ']:error: ' "$log"/node*; exit 1; }
expected=4 same_id "$log/node0" "$log/node1"
echo "torchrun-check: every rank got rank 0's id"
