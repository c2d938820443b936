#!/usr/bin/env bash
# Benchmark `apply` against what it cannot avoid, measured in the same run:
# `cp` of the file plus the quantize floor (ggml quantizing the edited
# tensors' f32 rows to their own types with the same threads,
# examples/bench_quantize_floor.rs). Also its peak memory, and the single
# pass (--exact-grid off) for comparison. Usage: scripts/bench-apply.sh [MODEL.gguf …]
# Defaults to Gemma 3 270M and the largest GGUF under models/ and ../shared/models/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin gguf-abliterate --example bench_quantize_floor
bin=target/release/gguf-abliterate
floor_bin=target/release/examples/bench_quantize_floor
models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  models=(models/gemma-3-270m-Q4_K_M.gguf)
  largest=$(ls -S models/*.gguf ../shared/models/*.gguf 2>/dev/null | head -1)
  [ "$largest" != "${models[0]}" ] && models+=("$largest")
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

now() { date +%s.%N; }
for model in "${models[@]}"; do
  n_embd=$("$bin" inspect "$model" | awk '/^n_embd:/ {print $2}')
  python3 -c "import json,random; random.seed(7); json.dump({'direction':[random.gauss(0,1) for _ in range($n_embd)]}, open('$work/dir.json','w'))"
  cat "$model" > /dev/null # same page-cache state for both
  t0=$(now); cp "$model" "$work/copy.gguf"; t1=$(now)
  rm -f "$work/copy.gguf"
  floor=$("$floor_bin" "$model" "$work/dir.json")
  t2=$(now)
  /usr/bin/time -v "$bin" apply --quiet --direction "$work/dir.json" "$model" "$work/out.gguf" 2> "$work/time.log" >/dev/null
  t3=$(now)
  rm -f "$work/out.gguf"
  "$bin" apply --quiet --exact-grid off --direction "$work/dir.json" "$model" "$work/out.gguf" 2>/dev/null >/dev/null
  t4=$(now)
  rm -f "$work/out.gguf"
  rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.log")
  # Largest edited tensor in f32, from inspect's table.
  largest_f32=$("$bin" inspect "$model" | awk '$NF != "-" && $4 ~ /x|^[0-9]+$/ && /output side|embedding rows|bias/ {n=1; for(i=3;i<=NF;i++){ if($i ~ /^[0-9]+$/) n*=$i; if($i ~ /^(output|embedding|bias)/) break } if(n>m) m=n} END {print m*4}')
  python3 - "$model" "$t0" "$t1" "$t2" "$t3" "$t4" "$floor" "$rss_kb" "$largest_f32" <<'PY'
import sys, os
model, t0, t1, t2, t3, t4, floor, rss_kb, big = sys.argv[1], *map(float, sys.argv[2:])
cp, ap, single = t1 - t0, t3 - t2, t4 - t3
rss = rss_kb / 1024
target = 1024 + big / 2**20
print(f"{os.path.basename(model)}: size {os.path.getsize(model)/2**20:.0f} MiB, {os.cpu_count()} cores")
print(f"  cp                   {cp:7.2f} s")
print(f"  quantize floor       {floor:7.2f} s")
print(f"  apply                {ap:7.2f} s   ratio apply/(cp + floor) = {ap/(cp + floor):.2f} (target <= 1.5)")
print(f"  apply, single pass   {single:7.2f} s   ratio {single/(cp + floor):.2f}")
print(f"  peak RSS {rss:7.0f} MiB   target < {target:.0f} MiB (1 GiB + largest edited tensor in f32): {'ok' if rss < target else 'MISSED'}")
PY
done
