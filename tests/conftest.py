import shutil

import pytest

from tests.helpers import Stack, make_config, start_nats
from tests.pg_cluster import PgCluster


@pytest.fixture
def nats_server(tmp_path):
    server = start_nats(tmp_path)
    yield server
    server.kill()


@pytest.fixture(scope="session")
def pg_cluster():
    """One real PostgreSQL server for the session; tests take fresh databases on it (``new_database``)."""
    cluster = PgCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture
def stack_factory(tmp_path):
    stacks = []

    def make(nats_url: str = "", **sections) -> Stack:
        stack = Stack(tmp_path, make_config(tmp_path, nats_url, **sections)).start()
        stacks.append(stack)
        return stack

    yield make
    for s in stacks:
        s.stop()


def pytest_collection_modifyitems(config, items):
    if not shutil.which("storescu"):
        raise pytest.UsageError("dcmtk (storescu) is missing: run `make test`, which installs it")
