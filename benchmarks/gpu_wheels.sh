#!/usr/bin/env bash
# Download, here, the wheels of packages the GPU machine's python3 lacks into .whl/ (git-ignored);
# benchmarks/gpu_check.sh installs whatever is there into a temporary --target (that machine has
# no network). gpu_check.sh needs none today: tests/test_gpu_check.py runs its dry run with them
# unimportable. Name what a new step needs:
#
#   bash benchmarks/gpu_wheels.sh                      # pydantic + its 3 deps, at this venv's versions
#   bash benchmarks/gpu_wheels.sh NAME==VERSION ...
#
# Wheels are fetched for that machine (CPython $GPU_PYTHON_VERSION, default 3.12, x86-64 manylinux),
# not for this one, with --no-deps: name every dependency too (each wheel's Requires-Dist is
# printed). Keep one version of each package, and the total under 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ $# -eq 0 ]; then
  # shellcheck disable=SC2046  # one word per requirement
  set -- $("$PY" -c 'from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
fi
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" -d .whl "$@"

"$PY" - <<'EOF'
import collections, re, sys, zipfile
from pathlib import Path

wheels = sorted(Path(".whl").glob("*.whl"))
names = collections.Counter(re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels)
total = 0
for w in wheels:
    total += w.stat().st_size
    print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                print("             needs", line.split(":", 1)[1].strip())
print(f"{total / 2**20:7.2f} MiB  in all, in .whl/ (at most 64 MiB travels with the working tree)")
twice = [n for n, c in names.items() if c > 1]
if twice:
    sys.exit(f"more than one version of {', '.join(twice)} in .whl/: keep one, or the install there stops")
if total >= 64 * 2**20:
    sys.exit("too large: the working tree and .whl/ together must stay under 64 MiB")
EOF
