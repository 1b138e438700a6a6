#!/usr/bin/env bash
# The main job: `kilolora demo` on the embedded default world. Held-out arithmetic problems go
# through greedy decoding, majority vote, verifier-guided best-of-n, tool-augmented generation and
# the full agent (tools + step checks with backtracking + verifier), all served by one engine that
# switches adapters per step; it prints one comparison table and a solved problem's trace.
# Extra arguments go to `kilolora demo` (e.g. --problems 50, --json, --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
kilolora demo "$@"
