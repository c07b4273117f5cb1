"""bench/nmf_limit.py in miniature: it runs, every stage costs something, the stages add up to the total, and the
NMF error it reports is decompose_head's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_nmf_limit_reports_passes_per_stage():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "nmf_limit.py"), "--classes", "2", "--rows-per-class", "98", "--dim",
         "32", "--k", "3", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("passes_total", "passes", "gbps", "device", "rel_error"):
        assert key in res, key
    assert res["passes"] and all(v > 0 for v in res["passes"].values()), res["passes"]
    assert res["passes_total"] == pytest.approx(sum(res["passes"].values()), rel=1e-6)
    assert 0 < res["rel_error"] < 1 and res["gbps"] > 0 and res["device"] == "cpu"
