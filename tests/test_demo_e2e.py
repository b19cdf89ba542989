"""The whole loop, end to end, as `make demo` runs it (tiny data): must finish with 0 failed requests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.own_ray_cluster
def test_demo_loop_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SEGLOOP_STORE")}
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.demo", "--data-dir", str(tmp_path / "demo"), "--n", "120",
         "--shift-n", "120", "--epochs", "10", "--annotate", "40", "--timeout", "900"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "alert FIRED" in log, log[-6000:]
    assert re.search(r"job \S+: SUCCEEDED on pets@", log), log[-6000:]
    assert re.search(r"failed requests: 0\b", log)
    m = re.search(r"\| held-out score \(same data\) \| ([0-9.]+) \| ([0-9.]+) \|", log)
    assert m and float(m[2]) > float(m[1]), log[-3000:]
    assert re.search(r"Serve answers with v(\d+) \(champion v\1\)", log), log[-3000:]
