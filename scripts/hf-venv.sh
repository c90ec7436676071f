#!/usr/bin/env bash
# Prints the python of a venv with scripts/requirements-hf.txt installed, installing it first
# when it is missing or holds other versions. The venv: $TORCH_VENV, default
# ~/.cache/basin/torch-cpu-venv (kept across clones, like the build cache).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${TORCH_VENV:-$HOME/.cache/basin/torch-cpu-venv}"
req="$here/requirements-hf.txt"
want=$(grep -E '^[a-z]' "$req" | sort | tr '\n' ' ')
have() {
    "$venv/bin/python" - "$want" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(p.split("==") for p in sys.argv[1].split())
sys.exit(any(version(name) != v for name, v in want.items()))
PY
}
if ! have; then
    echo "hf-venv: installing $want into $venv (once; about 5.6 GB)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
    have || { echo "hf-venv: $venv still lacks $want" >&2; exit 1; }
fi
echo "$venv/bin/python"
