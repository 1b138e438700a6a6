"""benchmarks/gpu_check.sh --cpu-dry-run: every step runs and passes here, with the packages the
GPU machine lacks made unimportable; a timed-out step or a missing package stops nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Installed here, absent from the GPU machine's python3 (its package list): the check must not need them.
NOT_ON_GPU = ("fastapi", "starlette", "uvicorn", "openai", "pydantic", "pydantic_core", "annotated_types",
              "typing_inspection", "prompt_toolkit", "pexpect")
BLOCKER = '''import os, sys
_BLOCKED = set(filter(None, os.environ.get("GPU_CHECK_TEST_BLOCK", "").split(",")))
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by tests/test_gpu_check.py)", name=name)
        return None
sys.meta_path.insert(0, _Block())
'''


def dry_run(tmp_path: Path, block: tuple[str, ...], **env) -> tuple[subprocess.CompletedProcess, dict, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)  # imported at interpreter start, before any test code
    out = tmp_path / "out"
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "PYTHONPATH": str(site),
            "GPU_CHECK_TEST_BLOCK": ",".join(block), **env}
    full.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run"], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=900)
    assert (out / "gpu_check_summary.txt").is_file(), proc.stdout + proc.stderr
    summary = json.loads((out / "gpu_check_summary.json").read_text())
    return proc, summary, (out / "gpu_check_summary.txt").read_text()


def test_dry_run_passes_every_step_without_the_packages_the_gpu_lacks(tmp_path):
    proc, summary, text = dry_run(tmp_path, NOT_ON_GPU)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [(n, "passed") for n in range(1, 6)], text
    for s in summary["steps"][:2]:  # the pytest steps really ran tests
        assert s["tests"]["passed"] > 0 and s["tests"]["failed"] == s["tests"]["errors"] == 0
    assert (tmp_path / "out" / "gpu_check.log").stat().st_size > 0
    figures = summary["figures"]
    for n in (1, 4):  # decode throughput ratios to base, every config, in the same run
        for config in ("bank K=1", "bank K=8", "dense", "transformers+peft"):
            assert 0 < figures["serving_ratio_to_base"][f"N={n} {config}"] < 10
    assert any(k.endswith("clusters s") and v > 0 for k, v in figures["compression"].items())
    for op in ("bank K=1", "bank K=8", "dense"):  # the Triton kernels ran (interpreted) beside a matmul
        assert figures["kernels"][f"{op} matmul/triton"] > 0
    # the printed summary carries the same figures as numbers
    assert re.search(r"^\s+4\s+\d+\s+\d+(\s+\d+\.\d\d){4}$", text, re.M), text
    assert "kernel tests" in proc.stdout and text in proc.stdout


def test_a_timed_out_step_and_a_missing_package_stop_nothing(tmp_path):
    proc, summary, text = dry_run(tmp_path, ("peft",), GPU_CHECK_TIMEOUT_1="1", GPU_CHECK_SKIP="3 4")
    assert proc.returncode == 1
    status = {s["step"]: (s["status"], s["note"]) for s in summary["steps"]}
    assert status[1] == ("timeout", "killed after 1s")
    assert status[2][0] == "skipped" and status[2][1].startswith("missing peft")
    assert status[3] == status[4] == ("skipped", "GPU_CHECK_SKIP")
    assert status[5] == ("passed", "")  # ran after the timeout
    assert "missing peft" in text and "timeout" in text
