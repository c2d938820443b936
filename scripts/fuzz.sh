#!/usr/bin/env bash
# A long fuzz campaign: scripts/fuzz.sh [CASES] [FIRST_SEED]
# Runs tests/fuzz.rs's harness (fuzz::fuzz_every_reader in the tests' one
# binary, tests/main.rs) in rounds of 100,000 cases with successive
# seeds until CASES (default 1,000,000) have run, niced, and prints the
# total. Failing inputs are saved under target/fuzz-failures/.
set -euo pipefail
cd "$(dirname "$0")/.."
total=${1:-1000000}
seed=${2:-1000}
round=100000
done_cases=0
failures=0
# The test binary itself, copied, so that rebuilding meanwhile is harmless.
exe=$(nice -n 15 cargo test --release --test main --no-run --message-format=json 2>/dev/null |
  grep '"name":"main"' | grep '"test":true' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
harness=$(mktemp /tmp/fuzz-harness.XXXXXX)
cp "$exe" "$harness" && chmod +x "$harness"
trap 'rm -f "$harness"' EXIT
start=$(date +%s)
while [ "$done_cases" -lt "$total" ]; do
  n=$(( total - done_cases < round ? total - done_cases : round ))
  log=$(FUZZ_CASES=$n FUZZ_SEED=$seed nice -n 15 "$harness" fuzz::fuzz_every_reader --exact --nocapture 2>&1) || failures=$((failures + 1))
  line=$(grep '^fuzz:' <<<"$log" || true)
  if [ -z "$line" ]; then
    # A panic aborts the summary; show the harness's report.
    grep -E 'case [0-9]+:|panicked|error' <<<"$log" | head -20 || true
    echo "fuzz: seed $seed failed" >&2
    failures=$((failures + 1))
  else
    echo "$line"
    grep -E '^[a-z]+ case [0-9]+:' <<<"$log" || true
    ran=$(sed -E 's/^fuzz: ([0-9]+) cases.*/\1/' <<<"$line")
    done_cases=$((done_cases + ran))
  fi
  seed=$((seed + 1))
  [ "$failures" -gt 0 ] && break
done
echo "campaign: $done_cases cases in $(( $(date +%s) - start )) s, seeds ${2:-1000}..$((seed - 1)), $failures failing rounds"
[ "$failures" -eq 0 ]
