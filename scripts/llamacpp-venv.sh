#!/usr/bin/env bash
# Prints the python of a venv with llama-cpp-python's OpenAI-compatible server
# (scripts/requirements-llamacpp.txt), installing it first when it is missing or holds
# another version. PyPI has it as source only: pip builds llama.cpp with cmake (from PyPI)
# and the system's g++, about ten minutes on two cores, once. The venv: $LLAMACPP_VENV,
# default ~/.cache/basin/llamacpp-venv (kept across clones, like the build cache).
# The endpoint tests (evaluate/tests/endpoint_server.rs) serve the SmolLM2 GGUF with it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${LLAMACPP_VENV:-$HOME/.cache/basin/llamacpp-venv}"
req="$here/requirements-llamacpp.txt"
want=$(grep -E '^[a-z]' "$req" | sed -E 's/\[[a-z,]*\]//' | sort | tr '\n' ' ')
have() {
    "$venv/bin/python" - "$want" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(p.split("==") for p in sys.argv[1].split())
if any(version(name) != v for name, v in want.items()):
    sys.exit(1)
import llama_cpp.server.app  # the server and its dependencies import
PY
}
if ! have; then
    echo "llamacpp-venv: installing $want into $venv (once; builds llama.cpp, about ten minutes)" >&2
    python3 -m venv "$venv"
    # Only the library and the server: llama.cpp's tests, examples and tools are not needed.
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    have || { echo "llamacpp-venv: $venv still lacks $want" >&2; exit 1; }
fi
echo "$venv/bin/python"
