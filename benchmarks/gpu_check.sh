#!/usr/bin/env bash
# kilolora's GPU check: one script, no arguments, for a fresh CUDA machine with no network.
#
#   bash benchmarks/gpu_check.sh                # on the GPU: < 8 minutes, every step bounded
#   bash benchmarks/gpu_check.sh --cpu-dry-run  # the same steps on CPU at tiny shapes (CI runs it)
#
# Steps, each under its own timeout; a failed, timed-out or skipped step never stops the next:
#   1 kernel tests   tests/serving/test_kernels.py + the engine through the kernels, on CUDA
#                    without the interpreter (the dry run: CPU under TRITON_INTERPRET=1)
#   2 engine parity  tests/serving/test_on_device.py: the engine on CUDA vs transformers / peft
#   3 bench_serving  decode throughput at a 7B-like shape, bank K=1/8 and dense vs base (+ peft)
#   4 bench_compression  1000 adapters at Mistral-7B q/k/v shapes, r=16, on CUDA
#   5 kernel micro-benchmarks  bank_lora / dense_lora vs the torch path and a matmul of equal FLOPs
# It ends with a compact summary (benchmarks/gpu_check_summary.py), also written to $OUT when
# set: gpu_check_summary.txt, gpu_check_summary.json and gpu_check.log (every step's output).
#
# Runs the project from the working tree (PYTHONPATH; nothing is pip-installed) with $PYTHON
# (default python3). A step whose packages do not import is skipped and says which; wheels in
# .whl/ (benchmarks/gpu_wheels.sh downloads them) are installed into a temporary --target first.
# For tests of this script: GPU_CHECK_SKIP="2 4" skips steps, GPU_CHECK_TIMEOUT_<n>=SECONDS sets
# one step's timeout, GPU_CHECK_BUDGET=SECONDS the whole run's.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (accepted: --cpu-dry-run)" >&2; exit 2 ;;
  esac
done

W=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
START=$SECONDS
mkdir -p "$W/tmp"
export TMPDIR="$W/tmp"  # the steps' scratch (models, pytest's tmp_path), removed at the end
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error

if [ "$DRY" = 1 ]; then
  MODE=cpu-dry-run DEV=cpu BUDGET=${GPU_CHECK_BUDGET:-600}
  # CPU even on a GPU machine: tests/conftest.py then sets TRITON_INTERPRET=1 for the kernel tests
  export CUDA_VISIBLE_DEVICES="" KILOLORA_TEST_DEVICE=cpu
  TIMEOUTS=(0 150 120 120 120 120)
else
  MODE=cuda DEV=cuda BUDGET=${GPU_CHECK_BUDGET:-465}
  # sums to 460 s: the whole run stays under 8 minutes even if every step runs to its limit
  TIMEOUTS=(0 120 50 140 100 50)
  unset TRITON_INTERPRET  # the point of step 1: the kernels compiled for the GPU
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels from .whl/ into $W/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .whl/*.whl \
      || echo "warning: installing .whl/ failed; steps needing those packages will be skipped"
    export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# -- which packages import (each one tried alone, so one broken import hides no other) --------
"$PY" - "$W/env.json" "$DEV" <<'EOF' 2>"$W/env.log"
import importlib, importlib.metadata, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "modules": {}}
for name in ("torch", "triton", "pytest", "transformers", "peft", "safetensors", "tokenizers", "rich"):
    try:
        importlib.import_module(name)
        out["modules"][name] = importlib.metadata.version(name)
    except Exception as e:  # noqa: BLE001 - any failure to import means the step cannot run
        out["modules"][name] = None
        print(f"import {name}: {type(e).__name__}: {e}", file=sys.stderr)
if out["modules"]["torch"]:
    import torch
    out["cuda"] = torch.cuda.is_available()
    out["gpu"] = torch.cuda.get_device_name() if out["cuda"] else None
json.dump(out, open(sys.argv[1], "w"))
EOF
present() {  # present MODULE: 0 when it imported in the probe above
  "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$W/env.json'))['modules'].get('$1') else 1)" 2>/dev/null
}
missing_of() {  # missing_of MOD...: prints the first module that did not import
  for m in "$@"; do present "$m" || { echo "$m"; return; }; done
}
CUDA_OK=$("$PY" -c "import json; print(int(bool(json.load(open('$W/env.json')).get('cuda'))))" 2>/dev/null || echo 0)
echo "gpu_check ($MODE): $PY, work dir $W"
[ -s "$W/env.log" ] && sed 's/^/  /' "$W/env.log"

: >"$W/steps.tsv"
record() {  # record N NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$W/steps.tsv"
  printf '[%s] step %s %-26s %-8s %4ss  %s\n' "$(date +%H:%M:%S)" "$1" "$2" "$3" "$4" "$5"
}

# run_step N NAME "MODULES" COMMAND...: the command runs in bash under the step's timeout
run_step() {
  local n=$1 name=$2 mods=$3
  shift 3
  local limit="${TIMEOUTS[$n]}" var="GPU_CHECK_TIMEOUT_$n" miss left t0 rc status note=""
  limit=${!var:-$limit}
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $n "* ]]; then
    record "$n" "$name" skipped 0 "GPU_CHECK_SKIP"; return
  fi
  miss=$(missing_of $mods)
  if [ -n "$miss" ]; then
    record "$n" "$name" skipped 0 "missing $miss (carry it as a wheel in .whl/: benchmarks/gpu_wheels.sh)"; return
  fi
  if [ "$DEV" = cuda ] && [ "$CUDA_OK" != 1 ]; then
    record "$n" "$name" skipped 0 "torch sees no CUDA device (use --cpu-dry-run off the GPU)"; return
  fi
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 5 ]; then
    record "$n" "$name" skipped 0 "out of time (budget ${BUDGET}s)"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$SECONDS
  timeout --kill-after=5 "$limit" bash -c "$*" >"$W/step$n.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status=timeout; note="killed after ${limit}s" ;;
    *) status=failed; note="exit code $rc" ;;
  esac
  record "$n" "$name" "$status" $((SECONDS - t0)) "$note"
  if [ "$status" != passed ]; then tail -n 15 "$W/step$n.log" | sed 's/^/    | /'; fi
}

# no langsmith: its pytest plugin (installed with langchain-openai, a dev extra) imports pydantic,
# which the steps do not need
PYTEST="\"$PY\" -m pytest -q -p no:cacheprovider -p no:langsmith_plugin -rfE"
KTESTS="tests/serving/test_kernels.py tests/serving/test_on_device.py::test_engine_through_triton_matches_torch_path"
run_step 1 "kernel tests" "torch triton pytest transformers tokenizers safetensors" \
  "$PYTEST --junitxml='$W/step1.xml' $KTESTS"
run_step 2 "engine parity" "torch pytest transformers tokenizers safetensors peft" \
  "$PYTEST --junitxml='$W/step2.xml' tests/serving/test_on_device.py -k 'not triton'"

NO_PEFT=""; present peft || NO_PEFT="--no-peft"
if [ "$DRY" = 1 ]; then
  SERVING="--device cpu --dtype bfloat16 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --layers 2 \
    --batch 8 --n 1 4 --steps 4 --repeats 2 --rank 4 --bank-rank 4 --peft-max 4"
  COMPRESSION="--device cpu --hidden 64 --layers 1 --n 8"
  KERNEL="--device cpu --dtype bfloat16 --tokens 16 --d-in 64 --d-out 48 --rank 8 --adapters 20 --repeat 3"
  KERNEL_ENV="export TRITON_INTERPRET=1;"
else
  # 7B-like layers (Llama-2/Mistral-7B: hidden 4096, MLP 14336, GQA 32/8), 4 of them; N=1000
  # resident adapters at batch 256 puts ~226 distinct adapters in every step
  SERVING="--device cuda --dtype bfloat16 --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --layers 4 \
    --batch 256 --n 1 64 1000 --steps 16 --repeats 3 --rank 16 --bank-rank 16 --clusters 1 8 --peft-max 64 --dense-max-gb 24"
  # one layer of Mistral-7B's q/k/v (the summary extrapolates to 32): data generation is on CPU
  COMPRESSION="--device cuda --hidden 4096 --layers 1 --n 1000"
  KERNEL="--device cuda --dtype bfloat16 --tokens 256 --d-in 4096 --d-out 4096 --rank 16 --adapters 1000"
  KERNEL_ENV=""
fi
run_step 3 "bench_serving" "torch transformers safetensors" \
  "\"$PY\" benchmarks/bench_serving.py $SERVING $NO_PEFT --json '$W/serving.json'"
run_step 4 "bench_compression" "torch safetensors rich" \
  "\"$PY\" benchmarks/bench_compression.py $COMPRESSION --methods svd jd-full+clusters --clusters 4 --repeats 1 \
    --json '$W/compression.json'"
run_step 5 "kernel micro-benchmarks" "torch triton" \
  "set -e; $KERNEL_ENV \
   \"$PY\" -m serving.kernels.bank_lora $KERNEL --clusters 1 --json '$W/kernel_bank_K1.json'; \
   \"$PY\" -m serving.kernels.bank_lora $KERNEL --clusters 8 --json '$W/kernel_bank_K8.json'; \
   \"$PY\" -m serving.kernels.dense_lora $KERNEL --json '$W/kernel_dense.json'"

# -- summary -------------------------------------------------------------------------------------
for n in 1 2 3 4 5; do
  [ -f "$W/step$n.log" ] && { echo "===== step $n ====="; cat "$W/step$n.log"; } >>"$W/gpu_check.log"
done
echo
"$PY" benchmarks/gpu_check_summary.py "$W" --mode "$MODE" --seconds $((SECONDS - START)) \
  || echo "the summariser failed; the raw results are in $W"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in gpu_check_summary.txt gpu_check_summary.json; do [ -f "$W/$f" ] && cp "$W/$f" "$OUT/"; done
  tail -c 8000000 "$W/gpu_check.log" >"$OUT/gpu_check.log" 2>/dev/null
fi
rm -rf "$W/tmp"
# 0 only when every step ran and passed (or was skipped on purpose by GPU_CHECK_SKIP)
rc=0
while IFS=$'\t' read -r _ _ status _ note; do
  [ "$status" = passed ] || [ "$status/$note" = skipped/GPU_CHECK_SKIP ] || rc=1
done <"$W/steps.tsv"
exit $rc
