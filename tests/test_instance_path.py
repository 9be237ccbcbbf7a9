"""scripts/instance_path.py measures the modules one instance passes (real nats-server, ingest, store, storescu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def test_instance_path_follows_the_instance_and_leaves_idle_work_out():
    res = subprocess.run([sys.executable, "scripts/instance_path.py", "--json", "--warmup", "3"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    modules = [m["module"] for m in summary["modules"]]
    assert summary["count"] == len(modules) == len(set(modules))
    # From the SCP's handling, through the staging write and the publish, to the store's write and index row.
    on_path = ["services.ingest.scp", "services.ingest.intake", "shared.storage.fs_store", "shared.bus.publish_blocking",
               "shared.bus.jetstream", "shared.bus.consumer_group", "services.store.storing", "services.store.cataloguing",
               "shared.catalogue.sql", "services.store.index"]
    assert set(on_path) <= set(modules), modules
    assert modules[0] == "services.ingest.scp"
    assert modules.index("services.store.storing") < modules.index("services.store.index")
    # The membership heartbeats run all along in the store, but no instance passes through them.
    assert "shared.bus.membership" not in modules
    assert all(m["file"].startswith(str(REPO)) for m in summary["modules"])
