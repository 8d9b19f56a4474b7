#!/usr/bin/env bash
# Copies the type stub of lmcache_cpp._core that the build generated (nanobind's stubgen, see
# bindings/CMakeLists.txt) from the installed package into python/lmcache_cpp/, where mypy and
# editors look for it. Run after `pip install .`; the copy is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$PWD/.venv/bin/python}
stub=$(cd / && "$PY" -c 'import lmcache_cpp, pathlib; print(pathlib.Path(lmcache_cpp.__file__).with_name("_core.pyi"))')
if [ ! -f "$stub" ]; then
  echo "sync_stub: $stub does not exist; build with LMCACHE_CPP_GENERATE_STUB=ON" >&2
  exit 1
fi
cp "$stub" python/lmcache_cpp/_core.pyi
