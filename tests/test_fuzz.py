"""The fuzz targets (tests/fuzz/targets.py) under atheris for a few seconds each, and every crash the fuzzer
ever found (tests/fuzz/regressions/<target>/) replayed as a regression test. Long runs:
``.venv/bin/python -m tests.fuzz.run --all --seconds 600``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS
from tests.helpers import REPO

REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"
SECONDS = 3


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_fuzzing_run_finds_no_crash(target, tmp_path):
    res = subprocess.run([sys.executable, "-m", "tests.fuzz.run", target, f"-max_total_time={SECONDS}", "-seed=1"],
                         cwd=REPO, capture_output=True, text=True, timeout=SECONDS + 60)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Done" in res.stderr, res.stderr[-2000:]


def _regressions() -> list[tuple[str, Path]]:
    return [(d.name, f) for d in sorted(REGRESSIONS.iterdir()) if d.is_dir() for f in sorted(d.iterdir())]


def test_every_regression_names_a_target():
    assert _regressions(), "no regression inputs"
    assert {name for name, _ in _regressions()} <= set(TARGETS)


@pytest.mark.parametrize("target,path", _regressions(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_each_crash_the_fuzzer_found_stays_fixed(target, path):
    TARGETS[target](path.read_bytes())


def test_qido_integers_the_fuzzer_broke_are_a_400_or_read_as_meant():
    """Found by the qido target: "1\\x1d" passed the integer check (str.strip drops \\x1d, int() does not) and "²"
    passed isdigit(); both were a ValueError, i.e. a 500, instead of a match or a 400."""
    from shared.catalogue.query import QueryError, parse_qido

    query = parse_qido("SERIES", [("SeriesNumber", "1\x1d"), ("limit", "5\x1c"), ("offset", " 2 ")])
    assert [m.values for m in query.matches] == [("1",)] and (query.limit, query.offset) == (5, 2)
    for key in ("limit", "offset"):
        with pytest.raises(QueryError):
            parse_qido("STUDY", [(key, "²")])


def test_the_long_run_script_runs_the_named_targets():
    res = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "--all", "--seconds", "1", "qido"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == ["qido"], res.stdout
    assert all(": ok in" in line for line in res.stdout.splitlines()), res.stdout
