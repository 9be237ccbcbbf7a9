"""Measure the project modules one DICOM instance passes, from the SCP's C-STORE handling to the store's write and index.

Run it from the root of the tree to measure, with that tree on PYTHONPATH::

    PYTHONPATH=$PWD .venv/bin/python scripts/instance_path.py [--functions | --json]
    cd ../other-tree && PYTHONPATH=$PWD /path/to/.venv/bin/python /path/to/scripts/instance_path.py

The default configuration's lean SCP engine is measured; ``DICOMFLOW__INGEST__ENGINE=pynetdicom`` in the
environment measures the other (the services inherit the environment).

Method:

1. A nats-server is started (``NatsServer`` of ``--natsserver``; the module moved, so both of its homes are tried),
   then the store and one ingest receiver as subprocesses of this script, each through the ``dicomflow`` command's
   entry point (``--entry``, default ``dicomflow.cli:main``) with ``store`` and ``ingest --single``, on a fresh data
   directory and the default configuration otherwise. No project module is imported by name beyond those two.
2. Each subprocess runs under ``sys.settrace``/``threading.settrace`` (set before the entry point is imported, so
   every thread is traced). Only frames of project modules (``shared``, ``services``, ``dicomflow``) are followed.
   Until the window opens, the tracer only notes every line of project code that runs: start-up, then
   ``--warmup`` seconds of idle running, long enough for every periodic job (membership heartbeats, pull expiries,
   partition reconciliation) to have run.
3. The window opens (SIGUSR1 to both processes), then dcmtk's storescu sends one synthetic CT instance. The window
   closes (SIGUSR2) ``--settle`` seconds after ``dicomflow studies`` lists the instance, so the store has also
   finished with it (stored event, acknowledgement).
4. A function call inside the window is on the instance's path when it runs a line of project code that had not
   run before the window (code only an instance reaches: the association, the write, the index row, a pull that
   brings a message), or is a caller of such a call (up its stack, through coroutine await chains), or is called
   by one. A stack ends where a thread starts or where the event loop runs a task step or callback. Idle work
   in the same window (a heartbeat, another partition's empty pull) runs only code that ran
   before and is left out; it is listed apart as "also ran during the window" so nothing is hidden.
5. A module is on the path when one of its functions is; modules are ordered by the first such call (both
   processes read the same monotonic clock). The count is of distinct modules over both processes.

Lines rather than functions (``sys.setprofile``): a module whose functions all run idle too would be missed (the
puller that hands over the message also receives the idle pulls' timeouts); lines only a message reaches are not.
The instance is the first after start, so once-only work it triggers counts too: the store opens the staging
backend on first use (importing fs_store and fs_wal, recovering the write-ahead log). Modules whose functions
are never called (constants read, pydantic models validated in Rust) are not counted. Every module's file is
checked to lie in the measured tree (an installed copy of dicomflow would otherwise fill in a missing module).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_PACKAGES = ("shared", "services", "dicomflow")
AE_TITLE = "DICOMFLOW"
# Log lines that say a service is up; both layouts print them.
READY_LINES = {"store": "store member", "ingest": "DICOM SCP"}


# ------------------------------------------------------------------ the tracer (runs in each service process)
def _caller(frame):
    """The frame that called ``frame``; None at the root of a thread or of an event-loop callback.

    Every task step and callback runs from the loop's ``Handle._run``, itself under whatever started the loop
    (``asyncio.run`` in the command's ``main``): that chain is not a call of the task, so it ends the stack.
    """
    caller = frame.f_back
    if caller is not None and caller.f_globals.get("__name__") == "asyncio.events":
        return None
    return caller


class PathTracer:
    """Notes project lines before the window; during it, records the calls on the instance's path (see module doc)."""

    def __init__(self) -> None:
        self.seen: set[tuple[object, int]] = set()
        self.armed = False
        self.done = False
        self.hot: dict[int, object] = {}  # id(frame) -> its code: frames on the path (the code guards id reuse)
        self.seq = 0
        self.path: dict[tuple[str, str], dict] = {}  # (module, function) -> first call on the path
        self.window: dict[str, float] = {}  # module -> first call in the window, on the path or not

    @staticmethod
    def _module(frame) -> str | None:
        name = frame.f_globals.get("__name__", "")
        return name if name.split(".", 1)[0] in PROJECT_PACKAGES else None

    def install(self) -> None:
        threading.settrace(self._on_call)
        sys.settrace(self._on_call)

    def _on_call(self, frame, event, arg):
        if self.done:
            return None
        module = self._module(frame)
        if module is None:
            return None  # no line events for other code
        if self.armed:
            self.window.setdefault(module, time.monotonic())
            caller = _caller(frame)
            while caller is not None and self._module(caller) is None:
                caller = _caller(caller)
            if caller is not None and self.hot.get(id(caller)) is caller.f_code:
                self._mark(frame)  # called by a call on the path
        return self._on_line

    def _on_line(self, frame, event, arg):
        if event == "line" and not self.done:
            key = (frame.f_code, frame.f_lineno)
            if not self.armed:
                self.seen.add(key)
            elif key not in self.seen and self.hot.get(id(frame)) is not frame.f_code:
                self._mark(frame)  # new code: this call and its callers are on the path
        return self._on_line

    def _mark(self, frame) -> None:
        chain = []
        f = frame
        while f is not None:
            if self._module(f) is not None:
                if self.hot.get(id(f)) is f.f_code:
                    break  # its callers were marked with it
                chain.append(f)
            f = _caller(f)
        now = time.monotonic()
        thread = threading.current_thread().name
        for f in reversed(chain):  # callers first
            self.hot[id(f)] = f.f_code
            key = (self._module(f), f.f_code.co_qualname)
            if key not in self.path:
                self.seq += 1
                self.path[key] = {"module": key[0], "function": key[1], "t": now, "seq": self.seq, "thread": thread,
                                  "file": f.f_globals.get("__file__") or f.f_code.co_filename}

    def report(self) -> dict:
        return {"path": sorted(self.path.values(), key=lambda c: (c["t"], c["seq"])),
                "window": [{"module": m, "t": t} for m, t in sorted(self.window.items(), key=lambda i: i[1])]}


def child(role: str, entry: str, out: Path, argv: list[str]) -> int:
    """A service process under the tracer: SIGUSR1 opens the window, SIGUSR2 closes it and writes ``out``."""
    tracer = PathTracer()

    def arm(*_):
        tracer.armed = True
        Path(f"{out}.armed").touch()

    def dump(*_):
        tracer.done = True
        tracer.armed = False
        report = tracer.report()
        report["role"] = role
        tmp = Path(f"{out}.tmp")
        tmp.write_text(json.dumps(report))
        tmp.rename(out)

    signal.signal(signal.SIGUSR1, arm)
    signal.signal(signal.SIGUSR2, dump)
    tracer.install()
    module, _, func = entry.partition(":")
    main = getattr(importlib.import_module(module), func)
    return main(argv) or 0


# ------------------------------------------------------------------ the measurement (the parent process)
def _nats_server_class(module_names: list[str]):
    for name in module_names:
        try:
            return importlib.import_module(name).NatsServer
        except ModuleNotFoundError:
            continue
    raise SystemExit(f"no NatsServer in any of {module_names}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dcmtk_storescu() -> str:
    """dcmtk's storescu (the venv's bin/ has pynetdicom's of the same name)."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    found = shutil.which("storescu", path=path)
    if not found:
        raise SystemExit("dcmtk's storescu not found (apt-get install dcmtk)")
    return found


def write_instance(path: Path) -> str:
    """One small synthetic CT instance (Explicit VR Little Endian); returns its SOP Instance UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PATH-1"
    ds.PatientName = "Path^Measure"
    ds.Modality = "CT"
    ds.InstitutionName = "Measurement"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(64 * 64 * 2)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s")
        time.sleep(0.1)


def measure(entry: str, nats_modules: list[str], warmup_s: float, settle_s: float, timeout_s: float) -> dict:
    """Start NATS, store and ingest under the tracer, send one instance, return both processes' reports."""
    tree = Path.cwd()
    tmp = Path(tempfile.mkdtemp(prefix="instance-path-"))
    nats = _nats_server_class(nats_modules)(tmp / "nats", _free_port()).start()
    dicom_port = _free_port()
    env = {**os.environ, "DICOMFLOW_DATA_DIR": str(tmp / "data"), "DICOMFLOW__NATS__URL": nats.url,
           "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    args = {"store": ["store", "--metrics-port", "0"],
            "ingest": ["ingest", "--single", "--dicom-port", str(dicom_port), "--metrics-port", "0"]}
    procs: dict[str, subprocess.Popen] = {}
    logs = {role: tmp / f"{role}.log" for role in args}
    outs = {role: tmp / f"{role}.json" for role in args}
    try:
        for role in ("store", "ingest"):
            with open(logs[role], "wb") as log:
                procs[role] = subprocess.Popen(
                    [sys.executable, __file__, "--child", role, "--entry", entry, "--out", str(outs[role]), "--",
                     *args[role]], env=env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
        for role, proc in procs.items():
            def ready(role=role, proc=proc) -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"{role} exited with {proc.returncode}:\n{logs[role].read_text()}")
                return READY_LINES[role] in logs[role].read_text()
            _wait(ready, timeout_s, f"{role} not ready")
        time.sleep(warmup_s)
        for role, proc in procs.items():
            proc.send_signal(signal.SIGUSR1)
            _wait(lambda role=role: Path(f"{outs[role]}.armed").exists(), timeout_s, f"{role} not armed")
        study = write_instance(tmp / "instance.dcm")
        sent = subprocess.run([_dcmtk_storescu(), "-aet", "PATHSCU", "-aec", AE_TITLE, "127.0.0.1", str(dicom_port),
                               str(tmp / "instance.dcm")], capture_output=True, text=True, timeout=timeout_s)
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stdout}{sent.stderr}")

        def stored() -> bool:
            out = subprocess.run([sys.executable, "-m", "dicomflow", "studies", "--json"], env=env, cwd=tree,
                                 capture_output=True, text=True, timeout=timeout_s)
            return out.returncode == 0 and any(s.get("study_uid") == study for s in json.loads(out.stdout or "[]"))
        _wait(stored, timeout_s, "instance not in the index")
        time.sleep(settle_s)
        for proc in procs.values():
            proc.send_signal(signal.SIGUSR2)
        for role in procs:
            _wait(outs[role].exists, timeout_s, f"no report from {role}")
        return {role: json.loads(outs[role].read_text()) for role in procs}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def summarise(reports: dict) -> dict:
    """The ordered modules on the path over both processes, their count, and the window's other modules."""
    first: dict[str, dict] = {}
    roles: dict[str, list[str]] = {}
    for role, report in reports.items():
        for call in report["path"]:
            roles.setdefault(call["module"], [])
            if role not in roles[call["module"]]:
                roles[call["module"]].append(role)
            if call["module"] not in first or call["t"] < first[call["module"]]["t"]:
                first[call["module"]] = {**call, "role": role}
    ordered = sorted(first.values(), key=lambda c: (c["t"], c["seq"]))
    calls = sorted(({**c, "role": role} for role, r in reports.items() for c in r["path"]),
                   key=lambda c: (c["t"], c["seq"]))
    modules = [{"module": c["module"], "process": c["role"], "first_function": c["function"], "file": c["file"],
                "processes": roles[c["module"]],
                "functions": [f"{k['role']}: {k['function']}" for k in calls if k["module"] == c["module"]]}
               for c in ordered]
    background = sorted({w["module"] for r in reports.values() for w in r["window"]} - set(first))
    return {"count": len(modules), "modules": modules, "also_ran_during_window": background,
            "per_process": {role: len({c["module"] for c in r["path"]}) for role, r in reports.items()}}


def main(argv: list[str] | None = None) -> int:
    """Command line: measure the tree in the current directory, or (internally) run one traced service."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--entry", default="dicomflow.cli:main", help="the dicomflow command's entry point (module:function)")
    p.add_argument("--natsserver", action="append",
                   help="module holding NatsServer (repeatable; default: dicomflow.natsserver, then shared.natsserver)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of idle running before the window opens")
    p.add_argument("--settle", type=float, default=1.0, help="seconds after the instance is indexed before it closes")
    p.add_argument("--timeout", type=float, default=60.0, help="bound of every wait")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--functions", action="store_true", help="under each module, every function of it on the path")
    p.add_argument("--child", choices=sorted(READY_LINES), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return child(args.child, args.entry, Path(args.out), rest)
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the measured tree, for NatsServer
    reports = measure(args.entry, args.natsserver or ["dicomflow.natsserver", "shared.natsserver"],
                      args.warmup, args.settle, args.timeout)
    summary = summarise(reports)
    outside = [m["file"] for m in summary["modules"] if not Path(m["file"]).resolve().is_relative_to(Path.cwd())]
    if outside:  # e.g. a module missing from this tree found in an installed copy of dicomflow
        print("warning: modules from outside the measured tree: " + ", ".join(outside), file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(len(m["module"]) for m in summary["modules"]) if summary["modules"] else 10
    for i, m in enumerate(summary["modules"], 1):
        also = " (also " + ", ".join(r for r in m["processes"] if r != m["process"]) + ")" \
            if len(m["processes"]) > 1 else ""
        print(f"{i:3d}  {m['process']:<7} {m['module']:<{width}}  {m['first_function']}{also}")
        if args.functions:
            for f in m["functions"]:
                print(f"{'':14}{f}")
    print(f"modules on the path: {summary['count']} "
          f"({', '.join(f'{r} {n}' for r, n in summary['per_process'].items())})")
    if summary["also_ran_during_window"]:
        print("also ran during the window, not on the path: " + ", ".join(summary["also_ran_during_window"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
