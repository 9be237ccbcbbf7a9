"""Run the fuzz targets of :mod:`tests.fuzz.targets` under atheris (libFuzzer, coverage-guided).

One target, in this process (libFuzzer's own flags after it)::

    .venv/bin/python -m tests.fuzz.run associate_rq -max_total_time=60

Every target in turn, each in its own process, for a long run (the script for nightly or by hand)::

    .venv/bin/python -m tests.fuzz.run --all --seconds 600

The corpus grows under ``var/fuzz/<target>/`` (seeded with valid inputs each start); a crash is written to
``var/fuzz/<target>/crashes/`` and the run fails. Copy the crash file to ``tests/fuzz/regressions/<target>/``
once fixed: ``tests/test_fuzz.py`` replays every file there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / "var" / "fuzz"


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from, so the fuzzer mutates protocol rather than discovering it."""
    from tests import adversarial as a

    if target == "associate_rq":
        return [a.associate_rq()[6:], a.associate_rq(user=a.user_info(extra=a.item(0x58, b"\x01\x01\x00\x04jane\x00\x00")))[6:]]
    if target == "data_phase":
        return [a.store_rq() + a.p_data(a.pdv(1, 0x02, b"\x08\x00\x16\x00UI\x02\x001\x00")) + a.echo_rq() + a.release_rq()]
    if target == "tag_reader":
        ui = b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"
        seq = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff\xfe\xff\x0d\xe0\x00\x00\x00\x00" \
              b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        study = b"\x20\x00\x0d\x00UI\x06\x001.2.5\x00"
        return [b"\x01" + ui + seq + study, b"\x00" + b"\x08\x00\x18\x00\x08\x00\x00\x001.2.3.4\x00"]
    return [b"PatientName=DOE*&limit=10", b"window=40,400,linear&viewport=256,256", b"multipart/related; type=\"application/octet-stream\"; transfer-syntax=*"]


def run_one(target: str, argv: list[str]) -> None:
    """Fuzz ``target`` in this process (does not return: libFuzzer exits)."""
    import atheris

    with atheris.instrument_imports(include=["services", "shared", "tests.fuzz.targets"]):
        from tests.fuzz import targets
    fn = targets.TARGETS[target]
    corpus = WORK / target / "corpus"
    crashes = WORK / target / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds(target)):
        (corpus / f"seed-{i}").write_bytes(seed)
    sys.setrecursionlimit(3000)
    atheris.Setup([sys.argv[0], *argv, f"-artifact_prefix={crashes}/", "-timeout=10", "-rss_limit_mb=2048",
                   str(corpus)], fn)
    atheris.Fuzz()


def run_all(seconds: int, names: list[str]) -> int:
    """Each target for ``seconds`` in its own process; the failed ones' names, and a non-zero exit."""
    from tests.fuzz.targets import TARGETS

    failed = []
    for name in names or list(TARGETS):
        start = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "tests.fuzz.run", name, f"-max_total_time={seconds}"], cwd=REPO,
                             capture_output=True, text=True)
        tail = [line for line in res.stderr.splitlines() if line.startswith("#") or "ERROR" in line or "Done" in line]
        print(f"{name}: {'ok' if res.returncode == 0 else 'CRASH'} in {time.monotonic() - start:.0f} s; "
              f"{tail[-1] if tail else ''}", flush=True)
        if res.returncode != 0:
            failed.append(name)
            print(res.stderr[-4000:], file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 1 and not sys.argv[1].startswith("--"):
        run_one(sys.argv[1], sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="every target in turn (or those named)")
    parser.add_argument("--seconds", type=int, default=600, help="per target")
    parser.add_argument("targets", nargs="*")
    args = parser.parse_args()
    return run_all(args.seconds, args.targets)


if __name__ == "__main__":
    sys.exit(main())
