#!/usr/bin/env bash
# Benchmark `apply` against what it cannot avoid, measured in the same run:
# `cp` of the file plus the quantize floor (ggml quantizing the edited
# tensors' f32 rows to their own types with the same threads,
# examples/bench_quantize_floor.rs). Also its peak memory, and the single
# pass (--exact-grid off) for comparison.
# Each measurement is repeated REPEAT times (default 5), alternating, since
# a shared machine's speed drifts by ±15 % from one minute to the next: the
# ratio is printed per repetition, as their median, and as the ratio of the
# fastest times. Usage: scripts/bench-apply.sh [MODEL.gguf …]
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
  cat "$model" > /dev/null # same page-cache state for every run
  : > "$work/times"
  for rep in $(seq "${REPEAT:-5}"); do
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
    echo "$t0 $t1 $t2 $t3 $t4 $floor $(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.log")" >> "$work/times"
  done
  # Largest edited tensor in f32, from inspect's table.
  largest_f32=$("$bin" inspect "$model" | awk '$NF != "-" && $4 ~ /x|^[0-9]+$/ && /output side|embedding rows|bias/ {n=1; for(i=3;i<=NF;i++){ if($i ~ /^[0-9]+$/) n*=$i; if($i ~ /^(output|embedding|bias)/) break } if(n>m) m=n} END {print m*4}')
  python3 - "$model" "$work/times" "$largest_f32" <<'PY'
import sys, os, statistics
model, times, big = sys.argv[1], sys.argv[2], float(sys.argv[3])
runs = []
for line in open(times):
    t0, t1, t2, t3, t4, floor, rss_kb = map(float, line.split())
    runs.append(dict(cp=t1 - t0, floor=floor, apply=t3 - t2, single=t4 - t3, rss=rss_kb / 1024))
ratio = lambda r, k: r[k] / (r["cp"] + r["floor"])
best = {k: min(r[k] for r in runs) for k in runs[0]}
rss = max(r["rss"] for r in runs)
target = 1024 + big / 2**20
print(f"{os.path.basename(model)}: size {os.path.getsize(model)/2**20:.0f} MiB, {os.cpu_count()} cores, {len(runs)} repetitions (fastest)")
print(f"  cp                   {best['cp']:7.2f} s")
print(f"  quantize floor       {best['floor']:7.2f} s")
print(f"  apply                {best['apply']:7.2f} s   ratio apply/(cp + floor) = {ratio(best, 'apply'):.2f} (target <= 1.5)")
print(f"  apply, single pass   {best['single']:7.2f} s   ratio {ratio(best, 'single'):.2f}")
per_rep = [ratio(r, "apply") for r in runs]
print(f"  ratio per repetition {', '.join(f'{x:.2f}' for x in per_rep)}; median {statistics.median(per_rep):.2f}")
print(f"  peak RSS {rss:7.0f} MiB   target < {target:.0f} MiB (1 GiB + largest edited tensor in f32): {'ok' if rss < target else 'MISSED'}")
PY
done
