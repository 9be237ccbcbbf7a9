"""`dicomflow run` with autoscaling on: the autoscaler owns the store workers; `dicomflow autoscaler --once`."""

from __future__ import annotations

import json
from pathlib import Path

from dicomflow.synthetic import write_study
from tests.helpers import wait_for


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (by parent pid: a child started from any of its threads)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return sorted(out)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _role(pid: int) -> str:
    args = _cmdline(pid)
    for role in ("autoscaler", "store", "ingest", "router"):
        if role in args:
            return role
    return ""


def test_run_with_autoscaler_owns_store_workers(tmp_path, nats_server, stack_factory):
    stack = stack_factory(nats_server.url, autoscaler={"enabled": True, "interval_s": 1, "groups": {
        "store": {"min_replicas": 1, "max_replicas": 2, "target_lag": 50}}})
    run_children = _children(stack.proc.pid)
    roles = {_role(p) for p in run_children}
    assert "autoscaler" in roles and "store" not in roles, [(_cmdline(p)) for p in run_children]
    scaler = next(p for p in run_children if _role(p) == "autoscaler")
    workers = wait_for(lambda: [p for p in _children(scaler) if _role(p) == "store"], 60,
                       what="a store worker started by the autoscaler")
    assert len(workers) == 1  # min_replicas

    study_uid, _ = write_study(tmp_path / "study", 10, rows=32, cols=32)
    res = stack.storescu(tmp_path / "study")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: stack.instances_of(study_uid) == 10, 60, what="10 stored instances")

    # One round of decisions, printed, nothing changed (the local actuator's --once is a dry run).
    out = stack.cli("autoscaler", "--once", "--json").stdout.strip().splitlines()
    decisions = [json.loads(line) for line in out]
    (d,) = [x for x in decisions if x["group"] == "store"]
    assert d["lag"] == 0 and d["desired"] == 1 and d["partitions"] == 8
    assert [p for p in _children(scaler) if _role(p) == "store"] == workers

    stack.stop()
    assert stack.proc.returncode == 0
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), 30, what="the store worker gone")
