#!/usr/bin/env bash
# Capture throughput against a plain llama.cpp decode of the same tokens (same
# run), then the time of a whole direction search on the fixture.
# Usage: scripts/bench-capture.sh [MODEL.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-../shared/models/smollm2-135m-refusal-q8_0.gguf}
cargo build --release --quiet --example bench_capture
target/release/examples/bench_capture "$model"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$(date +%s.%N)
target/release/gguf-abliterate direction "$model" -o "$out/dir.json" --quiet 2>&1 | grep -E '^(direction|searched)'
echo "whole selection: $(python3 -c "print(f'{$(date +%s.%N) - $start:.0f}')") s"
