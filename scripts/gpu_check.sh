#!/usr/bin/env bash
# The GPU data path on a machine with an NVIDIA GPU, in one go (docs/design/gpu.md):
#   1. finds nvcc, cmake and a python3 whose torch sees the GPU; takes googletest, OpenSSL's
#      headers and nanobind from the system, or else from packages carried in .gpu-deps/;
#   2. configures and builds (Release, LMCACHE_CPP_ENABLE_CUDA=ON, this GPU's architecture) the
#      CUDA gtest binary and the Python module with the GPU bindings;
#   3. runs the CUDA gtests, tests/test_cuda_copy.py, tests/test_cuda_transfer.py (through a real
#      server) and the stub check, then both transfer modes with a real server process and an
#      engine process holding torch CUDA tensors (tests/test_device_cuda.py: engine-driven and
#      --device cuda server-driven, every layout; tests/test_device_transfers.py, the same
#      protocol on the fake layer), all with LMCACHE_CPP_REQUIRE_GPU=1, so a test that would skip
#      for want of a GPU fails instead;
#   4. runs benchmarks/gpu_copy.py: gather/scatter GB/s next to pinned cudaMemcpyAsync of the same
#      bytes, and registering an arena of 8 and 32 GiB;
#   5. prints a short table, last, and writes it with the logs under $OUT (or build/gpu-check/out).
# Every step runs even when an earlier one failed (the table says which); the exit status is
# non-zero when any failed. Each step has a time limit (GPU_CHECK_STEP_S, default 240 s; the build
# 300 s, GPU_CHECK_BUILD_S) so that the whole run stays under 8 minutes on a 16-core GPU machine.
#
#   bash scripts/gpu_check.sh fetch   where pip and apt reach their registries (not on the GPU
#                                     machine): downloads into .gpu-deps/ (ignored by git) what a
#                                     bare GPU machine may lack: libgtest-dev, libssl-dev and
#                                     libssl3 (.deb, unpacked under /tmp there, never into /), the
#                                     nanobind wheel pinned in pyproject.toml and a pyzmq wheel for
#                                     Python ${GPU_PY_VERSION:-3.12} (installed there only if missing).
#   bash scripts/gpu_check.sh         on the GPU machine, from the repository root.
#
# Environment: PYTHON (default python3), JOBS (default nproc), GPU_CHECK_QUICK=1 (shorter
# benchmark), GPU_CHECK_ALLOW_NO_GPU=1 (rehearsal on a machine without a GPU: tests skip instead
# of failing; the benchmark then reports that it cannot run), GPU_CHECK_FORCE_CARRIED=1 (use the
# packages in .gpu-deps/ even where the system has googletest and OpenSSL: rehearses a bare machine).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEPS_DIR="$ROOT/.gpu-deps"
NANOBIND_PIN=$(sed -n 's/.*"nanobind==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n1)

if [ "${1:-}" = "fetch" ]; then
  set -e
  mkdir -p "$DEPS_DIR"
  rm -f "$DEPS_DIR"/*.deb "$DEPS_DIR"/*.whl
  (cd "$DEPS_DIR" && apt-get download libgtest-dev libssl-dev libssl3)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEPS_DIR" "nanobind==${NANOBIND_PIN}"
  # pyzmq for the transfer tests' server (the GPU machines' image lacks it), for their Python.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PY_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEPS_DIR" "pyzmq>=25"
  echo "gpu_check fetch: $(ls "$DEPS_DIR" | tr '\n' ' ')($(du -sh "$DEPS_DIR" | cut -f1))"
  echo "carry .gpu-deps to the GPU machine and run: bash scripts/gpu_check.sh"
  exit 0
fi

OUT_DIR=${OUT:-$ROOT/build/gpu-check/out}
BUILD="$ROOT/build/gpu-check/build"
STAGE="$ROOT/build/gpu-check/stage"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lmcache-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/gpu_check.txt"
: >"$SUMMARY"
JOBS=${JOBS:-$(nproc)}
PY=${PYTHON:-python3}
STEP_S=${GPU_CHECK_STEP_S:-240}
export PYTHONUNBUFFERED=1
declare -a ROWS=()
FAILED=0
row() { ROWS+=("$(printf '%-26s %-5s %s' "$1" "$2" "$3")"); [ "$2" = ok ] || [ "$2" = skip ] || FAILED=1; }
say() { echo "== gpu_check: $*"; }

if [ "${GPU_CHECK_ALLOW_NO_GPU:-0}" = 1 ]; then
  say "rehearsal: GPU tests may skip (GPU_CHECK_ALLOW_NO_GPU=1)"
else
  export LMCACHE_CPP_REQUIRE_GPU=1
fi

# ---- 1. tools and dependencies -------------------------------------------------------------------
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
GPU=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -n1)
ARCH=$(echo "$GPU" | awk -F', ' '{gsub(/\./, "", $2); print $2}')
[ -n "$ARCH" ] || ARCH=90
say "GPU: ${GPU:-none found by nvidia-smi}; building for sm_$ARCH"
for tool in nvcc cmake "$PY"; do
  command -v "$tool" >/dev/null || { echo "gpu_check: $tool not found" >&2; exit 2; }
done
TORCH=$("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1 | tail -n1)
say "nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), cmake $(cmake --version | head -n1 | cut -d' ' -f3), $("$PY" --version), torch $TORCH"

CMAKE_ARGS=()
EXTRA=""
SYS_GTEST=0
SYS_SSL=0
if [ "${GPU_CHECK_FORCE_CARRIED:-0}" != 1 ]; then
  [ -f /usr/include/gtest/gtest.h ] && SYS_GTEST=1
  [ -f /usr/include/openssl/evp.h ] && SYS_SSL=1
fi
if [ "$SYS_GTEST" = 0 ] || [ "$SYS_SSL" = 0 ]; then
  if ! ls "$DEPS_DIR"/*.deb >/dev/null 2>&1; then
    echo "gpu_check: googletest or OpenSSL headers are missing and .gpu-deps/ holds no packages;" \
      "run 'bash scripts/gpu_check.sh fetch' where apt works and carry .gpu-deps" >&2
    exit 2
  fi
  EXTRA="$WORK/deps"
  for deb in "$DEPS_DIR"/*.deb; do dpkg-deb -x "$deb" "$EXTRA"; done
  MULTIARCH=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
  # Debian keeps opensslconf.h under the multiarch include directory, which only /usr gets for free.
  export CPATH="$EXTRA/usr/include/$MULTIARCH:$EXTRA/usr/include${CPATH:+:$CPATH}"
  [ "$SYS_GTEST" = 1 ] || CMAKE_ARGS+=(-DGTest_DIR="$EXTRA/usr/lib/$MULTIARCH/cmake/GTest")
  [ "$SYS_SSL" = 1 ] || CMAKE_ARGS+=(-DOPENSSL_ROOT_DIR="$EXTRA/usr"
    -DOPENSSL_INCLUDE_DIR="$EXTRA/usr/include"
    -DOPENSSL_CRYPTO_LIBRARY="$EXTRA/usr/lib/$MULTIARCH/libcrypto.so")
  ldconfig -p 2>/dev/null | grep -q 'libcrypto.so.3 ' ||
    export LD_LIBRARY_PATH="$EXTRA/usr/lib/$MULTIARCH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  say "using carried packages: $(cd "$DEPS_DIR" && ls *.deb | tr '\n' ' ')"
fi
NB_SITE="$WORK/site"
WHEELS=()
ls "$DEPS_DIR"/nanobind-*.whl >/dev/null 2>&1 && WHEELS+=("$DEPS_DIR"/nanobind-*.whl)
if ! "$PY" -c 'import zmq' 2>/dev/null && ls "$DEPS_DIR"/pyzmq-*.whl >/dev/null 2>&1; then
  WHEELS+=("$DEPS_DIR"/pyzmq-*.whl)
fi
if ((${#WHEELS[@]})); then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$NB_SITE" "${WHEELS[@]}"
  say "carried wheels: $(basename -a "${WHEELS[@]}" | tr '\n' ' ')"
fi
NB_DIR=$(PYTHONPATH="$NB_SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m nanobind --cmake_dir 2>/dev/null)
NB_VERSION=$(PYTHONPATH="$NB_SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import nanobind; print(nanobind.__version__)' 2>/dev/null)
[ -n "$NB_DIR" ] || { echo "gpu_check: nanobind not found for $PY (carry its wheel: fetch)" >&2; exit 2; }
say "nanobind $NB_VERSION (pyproject pins $NANOBIND_PIN)"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
command -v ccache >/dev/null && CMAKE_ARGS+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)

# ---- 2. build ----------------------------------------------------------------------------------
say "configure + build (log: $OUT_DIR/build.log)"
start=$(date +%s)
rm -f "$BUILD/CMakeCache.txt"  # dependency paths of an earlier run may point into its temp dir
if cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DLMCACHE_CPP_ENABLE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCH" -DLMCACHE_CPP_BUILD_TESTS=ON -DLMCACHE_CPP_BUILD_PYTHON=ON \
  -DLMCACHE_CPP_INSTALL=OFF -DPython_EXECUTABLE="$(command -v "$PY")" -Dnanobind_DIR="$NB_DIR" \
  "${CMAKE_ARGS[@]}" >"$OUT_DIR/build.log" 2>&1 &&
  timeout "${GPU_CHECK_BUILD_S:-300}" cmake --build "$BUILD" -j"$JOBS" --target lmcache_cpp_cuda_tests _core _core_stub \
    >>"$OUT_DIR/build.log" 2>&1; then
  row "build (sm_$ARCH)" ok "$(($(date +%s) - start)) s"
  BUILT=1
else
  tail -n 40 "$OUT_DIR/build.log"
  row "build (sm_$ARCH)" FAIL "see build.log"
  BUILT=0
fi

# ---- 3. tests ----------------------------------------------------------------------------------
if [ "$BUILT" = 1 ]; then
  say "CUDA gtests"
  "$BUILD/cpp_tests/lmcache_cpp_cuda_tests" --gtest_color=no 2>&1 | tee "$OUT_DIR/gtest_cuda.log"
  rc=${PIPESTATUS[0]}
  counts=$(grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$OUT_DIR/gtest_cuda.log" |
    sed -E 's/^\[  ([A-Z]+) +\] ([0-9]+) tests?.*/\2 \1/' | tr '\n' ' ' | tr 'A-Z' 'a-z')
  [ "$rc" = 0 ] && row "C++ CUDA tests" ok "$counts" || row "C++ CUDA tests" FAIL "$counts(rc $rc)"

  # The package from the source tree plus the module just built, without installing anything.
  rm -rf "$STAGE" && mkdir -p "$STAGE/lmcache_cpp"
  for f in "$ROOT"/python/lmcache_cpp/*; do ln -s "$f" "$STAGE/lmcache_cpp/"; done
  ln -s "$BUILD"/bindings/_core*.so "$STAGE/lmcache_cpp/"
  # The CUDA module's own generated stub (it declares the GPU bindings), not a CPU build's copy.
  ln -sf "$BUILD"/bindings/_core.pyi "$STAGE/lmcache_cpp/_core.pyi"
  export PYTHONPATH="$STAGE:$NB_SITE${PYTHONPATH:+:$PYTHONPATH}"
  say "pytest tests/test_cuda_copy.py tests/test_cuda_transfer.py tests/test_core_status.py"
  pytest_step() {  # name, log, test files...
    local name=$1 log=$2
    shift 2
    (cd "$ROOT/tests" && timeout "$STEP_S" "$PY" -m pytest -q -p no:cacheprovider --noconftest \
      -rfEs "$@") 2>&1 | tee "$OUT_DIR/$log"
    local rc=${PIPESTATUS[0]}
    local counts
    counts=$(tail -n1 "$OUT_DIR/$log" | sed -E 's/=+//g; s/ in [0-9.]+s.*//')
    [ "$rc" = 0 ] && row "$name" ok "$counts" || row "$name" FAIL "$counts (rc $rc)"
  }
  pytest_step "pytest (GPU copies)" pytest_cuda.log \
    test_cuda_copy.py test_cuda_transfer.py test_core_status.py
  say "pytest tests/test_device_cuda.py tests/test_device_transfers.py (both modes, processes)"
  pytest_step "pytest (both modes)" pytest_modes.log test_device_cuda.py test_device_transfers.py

  # ---- 4. benchmark ----------------------------------------------------------------------------
  say "benchmarks/gpu_copy.py"
  QUICK=()
  [ "${GPU_CHECK_QUICK:-0}" = 1 ] && QUICK=(--quick)
  timeout "$STEP_S" "$PY" benchmarks/gpu_copy.py "${QUICK[@]}" --reg-sizes 8,32 \
    --json "$OUT_DIR/gpu_copy.json" 2>&1 |
    tee "$OUT_DIR/gpu_copy.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    row "benchmark gpu_copy" ok "see below"
  elif [ "$rc" = 2 ] && [ "${GPU_CHECK_ALLOW_NO_GPU:-0}" = 1 ]; then
    row "benchmark gpu_copy" skip "$(tail -n1 "$OUT_DIR/gpu_copy.log")"
  else
    row "benchmark gpu_copy" FAIL "rc $rc, see gpu_copy.log"
  fi
fi

# ---- 5. the table ------------------------------------------------------------------------------
{
  echo
  echo "gpu_check on ${GPU:-no GPU}; torch $TORCH; $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
  for r in "${ROWS[@]}"; do echo "  $r"; done
  if [ -f "$OUT_DIR/gpu_copy.log" ]; then
    grep -E '^gpu_copy ' "$OUT_DIR/gpu_copy.log" | sed 's/^gpu_copy /  /'
  fi
  [ "$FAILED" = 0 ] && echo "gpu_check: all steps passed" || echo "gpu_check: SOME STEPS FAILED"
} | tee -a "$SUMMARY"
exit "$FAILED"
