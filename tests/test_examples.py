"""Every script in examples/ runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_compress_collection_example():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "compress_collection.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line[:22].strip(): line[22:].split() for line in proc.stdout.splitlines()[1:5]}
    assert set(rows) == {"svd (per adapter)", "jd-full", "jd-diag", "jd-full, 3 clusters"}
    # 3 planted groups: one shared basis cannot hold them, three clusters can.
    assert float(rows["jd-full, 3 clusters"][1]) < 0.05 < float(rows["jd-full"][1])
    assert "saved and reloaded 200 adapters" in proc.stdout
