"""The one process supervisor: its restart policy (pure) and its processes (real ones)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from shared.supervisor import ChildSpec, RestartPolicy, RestartState, Supervisor, after_exit, after_start, is_due
from tests.helpers import wait_for

POLICY = RestartPolicy(initial_s=0.5, max_s=4.0, healthy_after_s=10.0)


def test_first_exit_restarts_at_once_then_the_backoff_doubles_up_to_its_cap():
    state, delays = after_start(RestartState(), 0.0), []
    now = 100.0  # a healthy first run
    for _ in range(6):
        state = after_exit(state, POLICY, now)
        delays.append(state.restart_at - now)
        now = state.restart_at
        state = after_start(state, now)
        now += 1.0  # each run dies after a second: not healthy
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert state.failures == 6


def test_a_healthy_run_forgets_the_exits_before_it():
    state = RestartState(failures=5, started_at=0.0)
    state = after_exit(state, POLICY, 10.0)  # ran healthy_after_s
    assert state.failures == 1 and state.restart_at == 10.0
    state = after_exit(after_start(state, 10.0), POLICY, 11.0)
    assert state.failures == 2 and state.restart_at == 11.5


def test_due_only_once_its_backoff_has_passed():
    state = after_exit(RestartState(failures=2, started_at=0.0), POLICY, 1.0)  # third exit in a row: 1 s
    assert not is_due(state, 1.5)
    assert is_due(state, 2.0)
    assert not is_due(after_start(state, 2.0), 5.0)  # running: nothing due


def _sleeper() -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(600)"]


def test_one_childs_backoff_does_not_hold_the_restart_of_another():
    sup = Supervisor(RestartPolicy(initial_s=30.0, max_s=30.0, healthy_after_s=60.0))
    try:
        crashing = sup.start(ChildSpec("crashing", [sys.executable, "-c", "raise SystemExit(3)"]))
        crashing.wait(10)
        sup.poll()  # first exit: restarted at once
        wait_for(lambda: sup.process("crashing").poll() is not None, 10, what="the second crash")
        sup.poll()  # second exit in a row: 30 s backoff
        steady = sup.start(ChildSpec("steady", _sleeper()))
        os.kill(steady.pid, signal.SIGKILL)
        steady.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: sup.poll() is not None and sup.alive("steady"), 5, what="steady restarted")
        assert time.monotonic() - t0 < 2
        assert sup.process("steady").pid != steady.pid
        assert not sup.alive("crashing")  # still in its backoff
        assert sup.poll(0.5) <= 0.5  # the caller polls again soon, not after the 30 s backoff
    finally:
        sup.stop(timeout=5)


def test_a_child_killed_again_and_again_after_healthy_runs_comes_back_at_once_each_time():
    sup = Supervisor(RestartPolicy(initial_s=5.0, max_s=5.0, healthy_after_s=1.0))
    try:
        sup.start(ChildSpec("worker", _sleeper()))
        for _ in range(3):
            time.sleep(1.2)  # healthy by the policy
            victim = sup.process("worker")
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            t0 = time.monotonic()
            wait_for(lambda v=victim: sup.poll() is not None and sup.process("worker") is not v, 5, interval=0.05,
                     what="the worker restarted")
            assert time.monotonic() - t0 < 1.0  # not the 5 s backoff
        assert sup.restarts == 3
    finally:
        sup.stop(timeout=5)


def test_stop_sends_sigterm_waits_then_kills_the_late(tmp_path):
    graceful = textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        open(sys.argv[1], "w").close()
        time.sleep(600)
    """)
    stubborn = "import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" \
               "open(sys.argv[1], 'w').close()\ntime.sleep(600)"
    sup = Supervisor()
    a = sup.start(ChildSpec("graceful", [sys.executable, "-c", graceful, str(tmp_path / "a")], stop_timeout_s=10))
    b = sup.start(ChildSpec("stubborn", [sys.executable, "-c", stubborn, str(tmp_path / "b")], stop_timeout_s=1))
    wait_for(lambda: (tmp_path / "a").exists() and (tmp_path / "b").exists(), 20, what="both children up")
    t0 = time.monotonic()
    sup.stop()
    assert a.returncode == 7
    assert b.returncode == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert sup.names() == []


def test_children_get_their_niceness_fds_and_log_file(tmp_path):
    r, w = os.pipe()
    code = f"import os; os.write({w}, str(os.nice(0)).encode()); print('to stdout'); raise SystemExit(0)"
    sup = Supervisor()
    proc = sup.start(ChildSpec("nice", [sys.executable, "-c", code], nice=5, pass_fds=(w,),
                               log_file=tmp_path / "nice.log"))
    os.close(w)
    proc.wait(10)
    sup.stop()
    assert int(os.read(r, 16)) == os.nice(0) + 5
    os.close(r)
    assert "to stdout" in (tmp_path / "nice.log").read_text()


def test_children_end_with_their_supervisor_when_it_is_killed(tmp_path):
    # A supervisor in a process of its own, killed with SIGKILL: its children get SIGTERM from the kernel.
    pids = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import sys, time
        from shared.supervisor import ChildSpec, Supervisor
        sup = Supervisor()
        procs = [sup.start(ChildSpec(f"c{{i}}", [sys.executable, "-c", "import time; time.sleep(600)"],
                                     new_session=i == 0)) for i in range(2)]
        open({str(pids)!r}, "w").write(" ".join(str(p.pid) for p in procs))
        while True:
            time.sleep(sup.poll())
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(), env={**os.environ})
    try:
        wait_for(lambda: pids.exists() and pids.read_text(), 30, what="the children's pids")
        children = [int(p) for p in pids.read_text().split()]
        assert all(_alive(p) for p in children)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not any(_alive(p) for p in children), 10, what="the children to end")
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
