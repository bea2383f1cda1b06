#!/usr/bin/env bash
# Runs the MLX engine's tests (engine/src/mlx, engine/tests/mlx.rs) on Linux, on MLX's CPU
# backend. For testing only: the engine's real target is macOS on Apple Silicon, where
# `cargo test -p canopy-engine --features mlx --test mlx` needs none of this.
#
#   scripts/mlx-linux/test.sh                         # the mlx unit tests, then tests/mlx.rs
#   scripts/mlx-linux/test.sh --release -- --ignored --nocapture throughput
#   just test-mlx-linux [ARGS...]                     # the same
#
# Arguments go to `cargo test -p canopy-engine --features mlx --test mlx`. Without test-binary
# arguments (nothing after `--`) the library's `mlx::` unit tests run first, with the same
# cargo options (e.g. `--release`); with them, only tests/mlx.rs runs, since they name its
# tests.
#
# How: mlx-rs 0.33 builds only on macOS as published, so this
#   1. downloads the `mlx-cpu` 0.32.2 wheel with pip (the wheel with the prebuilt libmlx.so,
#      its headers and cmake config; `mlx[cpu]` is the Python bindings plus this one as a
#      dependency) and unpacks it;
#   2. takes mlx-sys 0.7.0 from cargo's own download (checked against Cargo.lock's checksum)
#      and applies mlx-sys-0.7.0-linux.patch (next to this script; its header says what each
#      part is for);
#   3. copies the working tree (tracked and untracked, non-ignored files, as they are on disk,
#      so uncommitted changes are tested; not .git or target/), adds
#      `[patch.crates-io] mlx-sys = { path = ... }` to the COPY's Cargo.toml, and runs the
#      tests there with RUSTFLAGS="--cfg mlx_linux", MLX_SYSTEM_DIR (the wheel's mlx/) and
#      LD_LIBRARY_PATH (its lib/).
# The repository itself is only read: its Cargo.toml and Cargo.lock are never changed.
#
# Everything lives under the work directory, CANOPY_MLX_WORK (default /tmp/canopy-mlx-linux):
# wheel/ and mlx-cpu-0.32.2/ (the wheel), mlx-sys-0.7.0/ (patched; redone when the patch
# changes), target/ (CARGO_TARGET_DIR, so reruns only rebuild what changed) and src/ (the
# copy, removed at exit unless CANOPY_MLX_KEEP_SRC=1). The first run builds mlx-c and the
# engine (several minutes); later ones take about as long as the tests.
#
# Needs: Linux on x86_64 (aarch64 untested) with glibc >= 2.35 (the wheel is manylinux_2_35),
# cargo, git, patch, tar, python3 with pip, cmake (pip's is fine), /usr/bin/cc and /usr/bin/c++
# (mlx-sys's build script names them; C++20) and libclang for bindgen. Checked up front.
set -euo pipefail

MLX_VERSION=0.32.2    # the MLX that mlx-sys 0.7.0's mlx-c is written against
MLX_SYS_VERSION=0.7.0 # the mlx-sys that mlx-rs 0.33 uses (Cargo.lock); the patch is for it

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCH_FILE="$HERE/mlx-sys-$MLX_SYS_VERSION-linux.patch"
WORK="${CANOPY_MLX_WORK:-/tmp/canopy-mlx-linux}"

say() { echo "mlx-linux: $*" >&2; }
die() { echo "mlx-linux: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites
[ "$(uname -s)" = Linux ] || die "this is for Linux; on macOS (Apple Silicon) run
    cargo test -p canopy-engine --features mlx --test mlx"
case "$(uname -m)" in
    x86_64 | aarch64) ;;
    *) die "no mlx-cpu wheel for $(uname -m) (x86_64 and aarch64 only)" ;;
esac

# libclang, where clang-sys (bindgen) looks for it, plus clang's builtin headers (stddef.h...)
# that Debian/Ubuntu ship separately (libclang-common-N-dev).
libclang_ok() {
    local dirs=() d
    [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
    command -v llvm-config >/dev/null && dirs+=("$(llvm-config --libdir)")
    dirs+=(/usr/lib/llvm-*/lib /usr/lib64/llvm*/lib /usr/local/lib /usr/lib64 /usr/lib
        "/usr/lib/$(uname -m)-linux-gnu" "/lib/$(uname -m)-linux-gnu")
    for d in "${dirs[@]}"; do
        if compgen -G "$d/libclang.so*" >/dev/null || compgen -G "$d/libclang-[0-9]*.so*" >/dev/null; then
            # The builtin headers, next to an LLVM install's lib/ (or anywhere LIBCLANG_PATH says).
            [ "$d" = "${LIBCLANG_PATH:-}" ] && return 0
            compgen -G "/usr/lib/llvm-*/lib/clang/*/include/stddef.h" >/dev/null && return 0
            compgen -G "$d/clang/*/include/stddef.h" >/dev/null && return 0
            return 2
        fi
    done
    return 1
}

missing=()
for tool in cargo git patch tar; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
python3 -m pip --version >/dev/null 2>&1 \
    || missing+=("python3 with pip (python3 -m pip; e.g. apt-get install python3-pip)")
command -v cmake >/dev/null \
    || missing+=("cmake (python3 -m pip install cmake, or apt-get install cmake)")
[ -x /usr/bin/cc ] && [ -x /usr/bin/c++ ] \
    || missing+=("/usr/bin/cc and /usr/bin/c++, a C++20 compiler (apt-get install build-essential)")
rc=0 && libclang_ok || rc=$?
case "$rc" in
    0) ;;
    1) missing+=("libclang for bindgen: apt-get install libclang1-14 libclang-common-14-dev (or libclang-dev; LIBCLANG_PATH names another directory)") ;;
    *) missing+=("clang's builtin headers for bindgen (stddef.h): apt-get install libclang-common-14-dev (the version of your libclang)") ;;
esac
if [ "${#missing[@]}" -gt 0 ]; then
    echo "mlx-linux: missing prerequisites:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi

REPO="$(git -C "$HERE" rev-parse --show-toplevel)"
WORK="$(realpath -m "$WORK")"
case "$WORK/" in
    "$(realpath "$REPO")"/*) die "CANOPY_MLX_WORK must be outside the repository ($REPO)" ;;
esac
mkdir -p "$WORK"

# One run per work directory at a time (they share src/ and target/).
if command -v flock >/dev/null; then
    exec 9>"$WORK/.lock"
    flock -n 9 || die "another run is using $WORK (or set CANOPY_MLX_WORK)"
fi

SRC="$WORK/src"
cleanup() {
    if [ "${CANOPY_MLX_KEEP_SRC:-0}" = 1 ]; then
        say "kept the copy in $SRC"
    else
        rm -rf "$SRC"
    fi
}
rm -rf "$SRC"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- 1. the mlx-cpu wheel
MLX_ROOT="$WORK/mlx-cpu-$MLX_VERSION" # the unpacked wheel: mlx/{lib,include,share}, mlx_cpu.libs/
MLX_DIR="$MLX_ROOT/mlx"
if [ ! -f "$MLX_DIR/lib/libmlx.so" ]; then
    wheel="$(compgen -G "$WORK/wheel/mlx_cpu-$MLX_VERSION-*.whl" | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        say "downloading the mlx-cpu $MLX_VERSION wheel into $WORK/wheel"
        # Only a wheel that fits this machine (pip checks the platform tag, glibc included).
        python3 -m pip download --no-deps --only-binary=:all: "mlx-cpu==$MLX_VERSION" \
            -d "$WORK/wheel" >&2 \
            || die "pip could not download mlx-cpu==$MLX_VERSION (its Linux wheels need glibc >= 2.35)"
        wheel="$(compgen -G "$WORK/wheel/mlx_cpu-$MLX_VERSION-*.whl" | head -n 1 || true)"
        [ -n "$wheel" ] || die "pip downloaded no mlx_cpu-$MLX_VERSION-*.whl into $WORK/wheel"
    fi
    say "unpacking $(basename "$wheel")"
    tmp="$(mktemp -d "$WORK/unpack.XXXXXX")"
    python3 -m zipfile -e "$wheel" "$tmp"
    [ -f "$tmp/mlx/lib/libmlx.so" ] && [ -f "$tmp/mlx/share/cmake/MLX/MLXConfig.cmake" ] \
        || { rm -rf "$tmp"; die "$(basename "$wheel") has no mlx/lib/libmlx.so or MLXConfig.cmake"; }
    # zipfile keeps no permissions; libmlx.so and the bundled BLAS/LAPACK just need to be readable.
    rm -rf "$MLX_ROOT"
    mv "$tmp" "$MLX_ROOT"
fi

# ---------------------------------------------------------------- 3a. the copy of the tree
say "copying the working tree of $REPO into $SRC"
mkdir -p "$SRC"
# Tracked files that still exist, plus untracked files that are not ignored; mtimes are kept
# so that cargo's fingerprints in target/ stay valid between runs.
(
    cd "$REPO"
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do
            if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
        done \
        | tar --null --no-recursion -T - -cf -
) | tar -xf - -C "$SRC"

# ---------------------------------------------------------------- 2. patched mlx-sys
lock_checksum() { # the checksum Cargo.lock records for mlx-sys $MLX_SYS_VERSION
    awk -v want="$MLX_SYS_VERSION" '
        /^\[\[package\]\]/ { name = ""; version = "" }
        /^name = /     { name = $3; gsub(/"/, "", name) }
        /^version = /  { version = $3; gsub(/"/, "", version) }
        /^checksum = / { sum = $3; gsub(/"/, "", sum)
                         if (name == "mlx-sys" && version == want) print sum }
    ' "$SRC/Cargo.lock"
}
find_crate() { # cargo's download of mlx-sys $MLX_SYS_VERSION with the locked checksum
    local c
    for c in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"mlx-sys-$MLX_SYS_VERSION.crate"; do
        [ -f "$c" ] || continue
        if [ "$(sha256sum "$c" | cut -d' ' -f1)" = "$want_sum" ]; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

MLX_SYS="$WORK/mlx-sys-$MLX_SYS_VERSION"
MLX_SYS_STAMP="$WORK/mlx-sys-$MLX_SYS_VERSION.applied.patch" # the patch MLX_SYS was made with
if [ ! -f "$MLX_SYS/Cargo.toml" ] || ! cmp -s "$PATCH_FILE" "$MLX_SYS_STAMP"; then
    want_sum="$(lock_checksum)"
    [ -n "$want_sum" ] || die "Cargo.lock no longer locks mlx-sys $MLX_SYS_VERSION; \
$(basename "$PATCH_FILE") has to be redone for the new version"
    if ! crate="$(find_crate)"; then
        say "cargo fetch (for the mlx-sys $MLX_SYS_VERSION sources), in the copy"
        (cd "$SRC" && cargo fetch >&2)
        crate="$(find_crate)" \
            || die "no mlx-sys-$MLX_SYS_VERSION.crate with Cargo.lock's checksum under ${CARGO_HOME:-$HOME/.cargo}/registry/cache"
    fi
    say "patching mlx-sys $MLX_SYS_VERSION into $MLX_SYS"
    tmp="$(mktemp -d "$WORK/mlx-sys.XXXXXX")"
    tar -xzf "$crate" -C "$tmp"
    (cd "$tmp/mlx-sys-$MLX_SYS_VERSION" && patch -p1 --batch --forward --quiet <"$PATCH_FILE") \
        || { rm -rf "$tmp"; die "$(basename "$PATCH_FILE") does not apply to mlx-sys $MLX_SYS_VERSION"; }
    rm -rf "$MLX_SYS" "$MLX_SYS_STAMP"
    mv "$tmp/mlx-sys-$MLX_SYS_VERSION" "$MLX_SYS"
    rmdir "$tmp"
    cp "$PATCH_FILE" "$MLX_SYS_STAMP"
fi

# ---------------------------------------------------------------- 3b. the copy uses it
patch_line="mlx-sys = { path = \"$MLX_SYS\" }"
manifest="$SRC/Cargo.toml"
touch -r "$manifest" "$WORK/.manifest-mtime"
if grep -q '^\[patch\.crates-io\]' "$manifest"; then
    sed -i "/^\[patch\.crates-io\]/a $patch_line" "$manifest"
else
    printf '\n[patch.crates-io]\n%s\n' "$patch_line" >>"$manifest"
fi
touch -r "$WORK/.manifest-mtime" "$manifest" # an unchanged mtime: no needless rebuilds

export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }--cfg mlx_linux"
export MLX_SYSTEM_DIR="$MLX_DIR"
export LD_LIBRARY_PATH="$MLX_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="$WORK/target"

# Cargo options (before `--`) and test-binary arguments (after it).
cargo_args=()
test_args=()
after=0
for arg in "$@"; do
    if [ "$after" = 0 ] && [ "$arg" = -- ]; then
        after=1
    elif [ "$after" = 0 ]; then
        cargo_args+=("$arg")
    else
        test_args+=("$arg")
    fi
done

cd "$SRC"
if [ "${#test_args[@]}" -eq 0 ]; then
    say "cargo test -p canopy-engine --features mlx --lib ${cargo_args[*]-} -- mlx::"
    cargo test -p canopy-engine --features mlx --lib ${cargo_args[@]+"${cargo_args[@]}"} -- mlx::
fi
say "cargo test -p canopy-engine --features mlx --test mlx $*"
cargo test -p canopy-engine --features mlx --test mlx "$@"
