#!/usr/bin/env bash
# Builds one of llama.cpp's tools, `llama-bench` (the default) for the engine benchmark
# (`just bench-engine`) or `llama-server` for the serving benchmark (`just bench-serve`), and
# prints the binary's path as the only line on stdout (everything else goes to stderr).
#
#   scripts/build-llama-cpp.sh                  # llama-bench, portable build (GGML_NATIVE=OFF)
#   scripts/build-llama-cpp.sh llama-server     # llama-server, same source and build tree
#   LLAMA_CPP_NATIVE=ON scripts/build-llama-cpp.sh   # -march=native build, separate tree
#
# The argument (or LLAMA_CPP_TOOL) names the binary to build and print: llama-bench or
# llama-server. Both come out of the same build tree, configured the same way, so their numbers
# are from the same ggml.
#
# Idempotent: the source is downloaded and extracted once, each build tree is configured
# once, and a binary that is already there is only printed (cmake's incremental build is
# still run, so a half-finished earlier build is completed). Nothing is ever written inside
# the repository.
#
# Where the source comes from: the `llama-cpp-python` sdist on PyPI vendors llama.cpp
# (`vendor/llama.cpp`); pip downloads it, so this works wherever `pip download` does. Version
# 0.3.36 vendors ggml-org/llama.cpp@0c1e57098, the same one that made the tokenizer table in
# engine/tests/data (see gen_tokenizer_table.sh).
#
# Build flags: Release, -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON (only
# the requested targets are built, so llama-bench alone never compiles the server; a tree
# configured by an earlier version of this script with the server OFF is reconfigured once)
# -DGGML_OPENMP=OFF (ggml's own thread pool, like candle's rayon pool) -DBUILD_SHARED_LIBS=OFF,
# and -DGGML_NATIVE=$LLAMA_CPP_NATIVE. With GGML_NATIVE=OFF ggml still compiles its x86 CPU
# backend with AVX, AVX2, FMA and F16C statically (its defaults), so "portable" here means
# "any x86-64 from Haswell on", not baseline x86-64; GGML_NATIVE=ON adds whatever this CPU has
# (AVX-512, VNNI, ...). Canopy's own build is the stock Rust target (no -C target-cpu).
#
# Environment:
#   LLAMA_CPP_DIR             cache directory (default /tmp/canopy-llama.cpp)
#   LLAMA_CPP_NATIVE          ON or OFF (default OFF); ON builds in build-native/
#   LLAMA_CPP_PYTHON_VERSION  llama-cpp-python sdist version (default 0.3.36)
#   LLAMA_CPP_TOOL            the tool to build and print, as the argument (default llama-bench)
#   LLAMA_CPP_TARGETS         cmake targets (default: the tool)
#   JOBS                      parallel build jobs (default: nproc)
set -euo pipefail

DIR="${LLAMA_CPP_DIR:-/tmp/canopy-llama.cpp}"
NATIVE="${LLAMA_CPP_NATIVE:-OFF}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TOOL="${1:-${LLAMA_CPP_TOOL:-llama-bench}}"
case "$TOOL" in
    llama-bench | llama-server) ;;
    *) echo "usage: $0 [llama-bench|llama-server] (not '$TOOL')" >&2; exit 2 ;;
esac
TARGETS="${LLAMA_CPP_TARGETS:-$TOOL}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

case "$NATIVE" in
    ON | on | 1 | true) NATIVE=ON BUILD="$DIR/build-native" ;;
    OFF | off | 0 | false | "") NATIVE=OFF BUILD="$DIR/build" ;;
    *) echo "LLAMA_CPP_NATIVE must be ON or OFF, not '$NATIVE'" >&2; exit 2 ;;
esac

REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
case "$(realpath -m "$DIR")/" in
    "$REPO_ROOT"/*) echo "LLAMA_CPP_DIR must be outside the repository ($REPO_ROOT)" >&2; exit 2 ;;
esac

SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$BUILD/bin/$TOOL"

# Everything but the final path goes to stderr, so `B=$(scripts/build-llama-cpp.sh)` works.
{
    mkdir -p "$DIR"
    if [ ! -f "$SRC/CMakeLists.txt" ]; then
        TARBALL="$DIR/llama_cpp_python-$VERSION.tar.gz"
        if [ ! -f "$TARBALL" ]; then
            echo "downloading the llama-cpp-python $VERSION sdist (vendors llama.cpp) into $DIR" >&2
            # Only llama-cpp-python itself as source: `--no-binary :all:` would also build its
            # build dependencies (cmake!) from source just to read its metadata.
            python3 -m pip download --no-deps --no-binary llama-cpp-python \
                "llama-cpp-python==$VERSION" -d "$DIR"
        fi
        # Extract next to the final place and move it there, so that an interrupted run never
        # leaves a half-extracted tree that looks complete.
        TMP="$(mktemp -d "$DIR/extract.XXXXXX")"
        tar -xzf "$TARBALL" -C "$TMP"
        rm -rf "$DIR/llama_cpp_python-$VERSION"
        mv "$TMP/llama_cpp_python-$VERSION" "$DIR/"
        rmdir "$TMP"
    fi

    if ! command -v cmake >/dev/null; then
        echo "cmake not found; installing it with pip" >&2
        python3 -m pip install --only-binary :all: cmake
    fi
    if [ ! -f "$BUILD/CMakeCache.txt" ]; then
        cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
            -DGGML_NATIVE="$NATIVE" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_SERVER=ON -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF
    elif ! grep -q '^LLAMA_BUILD_SERVER:BOOL=ON$' "$BUILD/CMakeCache.txt"; then
        # Configured before the server was part of it: turn it on, keep everything else (the
        # objects llama-bench is made of do not change).
        cmake -S "$SRC" -B "$BUILD" -DLLAMA_BUILD_SERVER=ON
    fi
    # shellcheck disable=SC2086 # TARGETS is a list
    cmake --build "$BUILD" --target $TARGETS -j"$JOBS"
} 1>&2

if [ ! -x "$BIN" ]; then
    echo "the build finished but $BIN is missing" >&2
    exit 1
fi
echo "$BIN"
