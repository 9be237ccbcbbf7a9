"""Store replicas share one PostgreSQL catalogue: while a study streams in and a replica hands its partitions
over (SIGTERM, then a new one), every instance is catalogued once and the study's counts are right."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from dicomflow.synthetic import write_study
from tests.helpers import REPO, make_config, scu_send, start_nats, wait_for, write_config
from tests.test_rolling_restart import Deployment

BATCH, BATCHES, PAUSE_S = 4, 20, 0.3


@pytest.mark.timeout(300)
def test_two_store_replicas_one_postgresql_catalogue_while_a_study_streams(tmp_path, pg_cluster):
    server = start_nats(tmp_path)
    dsn = pg_cluster.new_database("replicas")
    tree = make_config(tmp_path, server.url, catalogue={"url": dsn})
    tree["stream"]["partitions"] = 4
    dep = Deployment(tmp_path, write_config(tmp_path, tree))
    study, files = write_study(tmp_path / "study", BATCH * BATCHES, series=3)
    other, other_files = write_study(tmp_path / "other", 12)
    statuses: list[int] = []
    halfway = threading.Event()

    def stream() -> None:
        for i in range(BATCHES):
            statuses.extend(scu_send(tree["ingest"]["port"], files[i * BATCH:(i + 1) * BATCH]))
            if i == BATCHES // 2:
                halfway.set()
            time.sleep(PAUSE_S)
    try:
        dep.wait_ready(dep.start("ingest", "ingest"))
        first, second = dep.start("store-1", "store"), dep.start("store-2", "store")
        dep.wait_ready(first)
        dep.wait_ready(second)
        sender = threading.Thread(target=stream)
        sender.start()
        statuses.extend(scu_send(tree["ingest"]["port"], other_files))
        assert halfway.wait(120)
        assert dep.terminate(first) == 0  # its partitions move to store-2, then some to store-3
        dep.wait_ready(dep.start("store-3", "store"))
        sender.join(180)
        assert statuses == [0] * (len(files) + len(other_files))

        def catalogued() -> dict[str, int]:
            res = subprocess.run([sys.executable, "-m", "dicomflow", "--config", str(dep.config), "studies", "--json"],
                                 cwd=REPO, env=dep.env, capture_output=True, text=True, timeout=60)
            return {s["study_uid"]: s["instances"] for s in json.loads(res.stdout or "[]")}
        wait_for(lambda: catalogued() == {study: len(files), other: len(other_files)}, 120, interval=1,
                 what="both studies fully catalogued")
        with psycopg.connect(dsn) as conn:
            rows, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT sop_uid) FROM instances").fetchone()
            assert rows == distinct == len(files) + len(other_files)  # nothing missing, nothing doubled
            series = conn.execute("SELECT SUM(n_instances), COUNT(*) FROM series WHERE study_uid = %s",
                                  (study,)).fetchone()
            assert series == (len(files), 3)
            assert conn.execute("SELECT n_series, n_instances FROM studies WHERE study_uid = %s",
                                (study,)).fetchone() == (3, len(files))
    finally:
        dep.cleanup()
        server.kill()
