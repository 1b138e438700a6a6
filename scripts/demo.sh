#!/usr/bin/env bash
# The main job. Until `kilolora demo` lands (the orchestrator issue), it shows compression:
# write 500 synthetic PEFT adapters in 4 planted groups, compress them into one bank with
# JD-Full + 4 clusters, and print the bank's summary. Outputs go to ./out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
rm -rf out/demo && mkdir -p out/demo
kilolora make-collection -o out/demo/adapters --n 500 --groups 4 --hidden 256 --layers 2 --r 8 --shared-rank 8
kilolora compress out/demo/adapters -o out/demo/bank --method jd-full --rank 8 --clusters 4
kilolora bank export out/demo/bank adapter_0042 -o out/demo/adapter_0042_from_bank
