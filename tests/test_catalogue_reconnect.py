"""A catalogue whose PostgreSQL server crashed and came back is used again (found by the chaos suite: a store
worker failed every batch with "the connection is lost" until it was restarted, so acknowledged instances waited
for a process restart that nothing made)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import psycopg
import pytest

from dicomflow.synthetic import ct_instance, new_uid
from shared.catalogue.open import open_catalogue
from tests.pg_cluster import PgCluster
from tests.test_catalogue import entry


def test_the_catalogue_connects_again_after_the_database_restarted(tmp_path):
    pg = PgCluster(Path(tempfile.mkdtemp(prefix="dicomflow-pg-reconnect-"))).start()
    try:
        catalogue = open_catalogue(pg.dsn, tmp_path)
        study = new_uid()
        first = ct_instance(study, new_uid(), 1)
        catalogue.record_batch([entry(first)])
        assert len(catalogue.instances(None, study)) == 1
        pg.kill("immediate")  # a crash: every connection is cut
        pg.restart()
        # The call that finds the connection dead fails (the caller retries it: a redelivery) ...
        with pytest.raises(psycopg.OperationalError):
            catalogue.instances(None, study)
        # ... and the next one works on a new connection, writes and reads alike.
        catalogue.record_batch([entry(ct_instance(study, new_uid(), 2))])
        assert len(catalogue.instances(None, study)) == 2
        catalogue.close()
    finally:
        pg.stop()
