#!/usr/bin/env bash
# Cross-checks the perplexity figures of a run's report against a second
# llama.cpp: llama-perplexity of llama.cpp b11434, built natively for this
# CPU by scripts/build-llama-cpp.sh.
#
#   scripts/check-perplexity.sh REPORT.json [--which before|after|both] [--server-bin DIR]
#
# The report carries report["input"] (the input model), report["output"]
# (the output models; the first is used) and
# report["verification"]["perplexity"] = {"text": PATH (relative to the
# repository root), "n_ctx": N_CTX, "chunks": N, "tokens": T, "before":
# PPL_IN, "after": PPL_OUT}. For the input (before) and/or the output
# (after) this runs
#
#   llama-perplexity -m MODEL -f TEXT -c N_CTX -b N_CTX --chunks N -t $(nproc)
#
# reads its "Final estimate: PPL = X +/- Y" and prints both figures side by
# side. Exit 0 when each agrees with the report within 1 % (relative to
# llama.cpp's figure), 1 otherwise. A relative model path in the report is
# looked up from the current folder, the repository root, then the
# report's folder.
#
# --server-bin DIR (or env LLAMA_CPP_BIN) uses the llama-perplexity in DIR
# instead of building one; PPL_TOLERANCE (default 0.01) sets the allowed
# relative difference.
set -euo pipefail
caller=$PWD
root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  echo "usage: $0 REPORT.json [--which before|after|both] [--server-bin DIR]" >&2
  exit 1
}
[ $# -ge 1 ] || usage
report=$1
shift
which=both
bin=${LLAMA_CPP_BIN:-}
while [ $# -gt 0 ]; do
  case $1 in
  --which)
    [ $# -ge 2 ] || usage
    which=$2
    shift
    case $which in before | after | both) ;; *) usage ;; esac
    ;;
  --server-bin) [ $# -ge 2 ] || usage; bin=$2; shift ;;
  *) usage ;;
  esac
  shift
done
[ -f "$report" ] || { echo "error: $report does not exist" >&2; exit 1; }
report=$(realpath "$report")
tolerance=${PPL_TOLERANCE:-0.01}

# One field a line: input, output, text, n_ctx, chunks, tokens, before, after.
fields=$(python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
try:
    p = r["verification"]["perplexity"]
    out = r["output"]
    out = out[0] if isinstance(out, list) else out
    vals = [r["input"], out, p["text"], int(p["n_ctx"]), int(p["chunks"]), p.get("tokens", ""),
            float(p["before"]), float(p["after"])]
except (KeyError, TypeError, ValueError, IndexError) as e:
    sys.exit(f"error: {sys.argv[1]} has no usable input / output / verification.perplexity ({type(e).__name__}: {e})")
for v in vals:
    print(v)
PY
) || exit 1
mapfile -t f <<<"$fields"
input=${f[0]} output=${f[1]} text=${f[2]} n_ctx=${f[3]} chunks=${f[4]} tokens=${f[5]}
ours_before=${f[6]} ours_after=${f[7]}

# A relative path: from the caller's folder, the repository root, or the
# report's folder, the first that exists.
resolve() {
  local p=$1 d
  if [ "${p#/}" != "$p" ]; then
    echo "$p"
    return
  fi
  for d in "$caller" "$root" "$(dirname "$report")"; do
    if [ -e "$d/$p" ]; then
      realpath "$d/$p"
      return
    fi
  done
  echo "$p"
}
text_path=$root/$text
[ "${text#/}" = "$text" ] || text_path=$text
[ -f "$text_path" ] || { echo "error: the perplexity text $text_path does not exist" >&2; exit 1; }

if [ -z "$bin" ]; then
  bin=$("$root/scripts/build-llama-cpp.sh" | tail -n 1) || {
    echo "error: could not build llama.cpp (scripts/build-llama-cpp.sh)" >&2
    exit 1
  }
fi
[ -x "$bin/llama-perplexity" ] || { echo "error: $bin/llama-perplexity does not exist or is not executable" >&2; exit 1; }
threads=$(nproc)

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# run NAME MODEL: sets ppl, ppl_err, n_chunk_run, seconds
run() {
  local name=$1 model t0
  model=$(resolve "$2")
  [ -f "$model" ] || { echo "error: the $name model $model does not exist" >&2; exit 1; }
  local cmd=("$bin/llama-perplexity" -m "$model" -f "$text_path" -c "$n_ctx" -b "$n_ctx" --chunks "$chunks" -t "$threads")
  echo "$name: ${cmd[*]}"
  t0=$(date +%s)
  if ! "${cmd[@]}" >"$log" 2>&1; then
    tail -n 15 "$log" >&2
    echo "error: llama-perplexity failed on $model" >&2
    exit 1
  fi
  seconds=$(($(date +%s) - t0))
  ppl='' ppl_err=''
  read -r ppl ppl_err < <(sed -n 's/.*Final estimate: PPL = \([0-9.]*\) +\/- \([0-9.]*\).*/\1 \2/p' "$log" | tail -n 1) || true
  if [ -z "${ppl:-}" ]; then
    tail -n 15 "$log" >&2
    echo "error: no \"Final estimate: PPL = ...\" line from llama-perplexity on $model" >&2
    exit 1
  fi
  n_chunk_run=$(sed -n 's/.*calculating perplexity over \([0-9]*\) chunks.*/\1/p' "$log" | head -n 1)
}

rows=()
fail=0
compare() { # NAME OURS
  local name=$1 ours=$2 line
  line=$(python3 - "$name" "$ours" "$ppl" "$ppl_err" "$tolerance" <<'PY'
import sys
name, ours, theirs, err, tol = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
rel = (ours - theirs) / theirs
ok = abs(rel) <= tol
print(f"{name:<7} {ours:>12.4f} {theirs:>12.4f} {'+/- %.4f' % err:>13} {100 * rel:>+9.3f} %  {'ok' if ok else 'FAIL'}")
PY
)
  rows+=("$line")
  case $line in *FAIL) fail=1 ;; esac
}

for name in before after; do
  [ "$which" = both ] || [ "$which" = "$name" ] || continue
  if [ "$name" = before ]; then
    run before "$input"
    compare before "$ours_before"
  else
    run after "$output"
    compare after "$ours_after"
  fi
  echo "  PPL = $ppl +/- $ppl_err ($n_chunk_run chunks of $n_ctx tokens, $seconds s)"
  if [ "$n_chunk_run" != "$chunks" ]; then
    echo "  FAIL: llama-perplexity scored $n_chunk_run chunks, the report $chunks" >&2
    fail=1
  fi
done

echo
echo "perplexity of $text (n_ctx $n_ctx, $chunks chunks${tokens:+, $tokens tokens}), llama.cpp-11434 native CPU build"
printf '%-7s %12s %12s %13s %11s\n' "" report llama.cpp "" "rel. diff"
printf '%s\n' "${rows[@]}"
if [ $fail -ne 0 ]; then
  echo "error: the report's perplexity differs from llama-perplexity's by more than $(python3 -c "print(100 * $tolerance)") %" >&2
  exit 1
fi
echo "ok: the report's perplexity agrees with llama-perplexity within $(python3 -c "print(100 * $tolerance)") %"
