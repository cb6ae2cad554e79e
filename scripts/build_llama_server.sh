#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the llama.cpp sources vendored in the llama-cpp-python sdist of
# the version installed in the venv, so that bench/bench_serve.py --llama-server compares edgeia3 serve
# with the very llama.cpp that edgeia3's GGUF runtime links.
#
#   scripts/build_llama_server.sh [OUT_DIR] [SDIST]
#
# OUT_DIR: where the binary goes (default: $HOME/.cache/edgeia3/llama-server/)
# SDIST:   a llama_cpp_python-<version>.tar.gz to use instead of `pip download` (also: $LLAMA_SDIST)
# Env:     PYTHON (default: .venv/bin/python of this checkout), JOBS (default: 2), KEEP_BUILD=1 keeps
#          the temporary build tree.
#
# The binary is linked statically against llama/ggml (-DBUILD_SHARED_LIBS=OFF), built for this CPU
# (GGML_NATIVE, the llama.cpp default), without the web UI, HTTPS or curl. Prints its path last.
# Note: on CPUs with AMX, this llama-server segfaults at model load unless run with --no-repack.
set -euo pipefail

die() { echo "build_llama_server: error: $*" >&2; exit 1; }
say() { echo "build_llama_server: $*" >&2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$HOME/.cache/edgeia3/llama-server}"
SDIST="${2:-${LLAMA_SDIST:-}}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"

[ -x "$PYTHON" ] || die "no Python at $PYTHON (set PYTHON=... or create the venv: scripts/setup.sh)"
command -v cmake >/dev/null || die "cmake not found (apt-get install cmake)"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler found (apt-get install g++)"

VER="$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null)" \
    || die "llama-cpp-python is not installed in $PYTHON's environment"
say "llama-cpp-python $VER"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
cleanup() { if [ "${KEEP_BUILD:-0}" = 1 ]; then say "build tree kept: $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT

if [ -n "$SDIST" ]; then
    [ -f "$SDIST" ] || die "sdist $SDIST does not exist"
    case "$(basename "$SDIST")" in
        llama_cpp_python-"$VER".tar.gz) ;;
        *) die "sdist $SDIST is not llama_cpp_python-$VER.tar.gz (the installed version)" ;;
    esac
else
    say "downloading the llama-cpp-python==$VER sdist"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$TMP" \
        || die "pip download of the llama-cpp-python==$VER sdist failed (offline? pass its path as SDIST)"
    SDIST="$TMP/llama_cpp_python-$VER.tar.gz"
    [ -f "$SDIST" ] || die "pip download did not produce $SDIST"
fi

say "unpacking $SDIST"
tar -xzf "$SDIST" -C "$TMP" || die "cannot unpack $SDIST"
SRC="$TMP/llama_cpp_python-$VER/vendor/llama.cpp"
[ -f "$SRC/tools/server/CMakeLists.txt" ] || die "no llama.cpp server sources at $SRC/tools/server"

GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
t0=$(date +%s)
say "configuring"
cmake -S "$SRC" -B "$TMP/build" "${GEN[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    >"$TMP/configure.log" 2>&1 || { tail -n 40 "$TMP/configure.log" >&2; die "cmake configure failed"; }
say "building llama-server with $JOBS jobs (several minutes)"
cmake --build "$TMP/build" --target llama-server -j "$JOBS" >"$TMP/build.log" 2>&1 \
    || { tail -n 60 "$TMP/build.log" >&2; die "cmake build failed"; }
say "built in $(( $(date +%s) - t0 )) s"

BIN="$TMP/build/bin/llama-server"
[ -x "$BIN" ] || BIN="$(find "$TMP/build" -type f -name llama-server -perm -u+x | head -n 1)"
[ -n "$BIN" ] && [ -x "$BIN" ] || die "the build produced no llama-server binary"

mkdir -p "$OUT" || die "cannot create $OUT"
cp "$BIN" "$OUT/llama-server" || die "cannot copy llama-server to $OUT"
if ldd "$OUT/llama-server" 2>/dev/null | grep -q "not found"; then
    ldd "$OUT/llama-server" >&2
    die "$OUT/llama-server misses shared libraries"
fi
"$OUT/llama-server" --version >/dev/null 2>&1 || die "$OUT/llama-server --version failed"
echo "$VER" >"$OUT/llama-cpp-python.version"
echo "$OUT/llama-server"
