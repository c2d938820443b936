#!/usr/bin/env bash
# Does the search run at llama.cpp's speed? Runs the default command on a
# model (the fixture unless MODEL is given), then, in the same run, plain
# llama.cpp decodes of the same kinds of rows on the same model
# (examples/bench_decode.rs: prompt rows and generated rows, with no eval
# callback). For each stage of the cost account it prints the seconds the
# stage's rows would take at that plain speed and the ratio of the stage's
# own seconds to them: 1.00 is llama.cpp's speed, above it the overhead of
# the hooks, the judge and our code. Verification's rows sit deeper in
# longer sequences (whole replies, 512-token perplexity chunks) than the
# plain decode's, so its ratio also counts their longer attention.
#
#   scripts/bench-search.sh [MODEL.gguf]
#
# BENCH_DIR=DIR keeps the run's output GGUF and report there.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-../shared/models/smollm2-135m-refusal-q8_0.gguf}
[ -f "$model" ] || { echo "error: no model at $model (scripts/fetch-models.sh fetches the test models)" >&2; exit 1; }
cargo build --release --quiet --bin gguf-abliterate --example bench_decode
if [ -n "${BENCH_DIR:-}" ]; then
  work=$BENCH_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
echo "== the default command on $model (the original measured, not cached)" >&2
target/release/gguf-abliterate "$model" "$work/out.gguf" --no-cache --report "$work/report.json" -q -f \
  >"$work/run.out" 2>"$work/run.log" || { tail -5 "$work/run.log" >&2; exit 1; }
echo "== plain decodes of the same kinds of rows" >&2
target/release/examples/bench_decode "$model" >"$work/plain.json"
python3 - "$work/report.json" "$work/plain.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
plain = json.load(open(sys.argv[2]))
p, g = plain["prompt_rows_per_s"], plain["generated_rows_per_s"]
print(f"plain llama.cpp ({plain['threads']} threads): {p:.0f} prompt rows/s, {g:.0f} generated rows/s")
print(f"through the search's hook: {plain['hooked_prompt_rows_per_s']:.0f} and "
      f"{plain['hooked_generated_rows_per_s']:.0f} rows/s "
      f"(x{p / plain['hooked_prompt_rows_per_s']:.2f} and x{g / plain['hooked_generated_rows_per_s']:.2f} the plain time)")
print(f"{'stage':<10} {'seconds':>8} {'rows':>8} {'generated':>9} {'at plain':>9} {'ratio':>6}")
total = [0.0, 0, 0, 0.0]
for s in report["cost"]:
    if s["rows"] == 0:
        continue
    prompt_rows = s["rows"] - s["generated"]
    at_plain = prompt_rows / p + s["generated"] / g
    total = [total[0] + s["seconds"], total[1] + s["rows"], total[2] + s["generated"], total[3] + at_plain]
    print(f"{s['stage']:<10} {s['seconds']:>8.1f} {s['rows']:>8} {s['generated']:>9} {at_plain:>9.1f} {s['seconds'] / at_plain:>6.2f}")
print(f"{'total':<10} {total[0]:>8.1f} {total[1]:>8} {total[2]:>9} {total[3]:>9.1f} {total[0] / total[3]:>6.2f}")
PY
