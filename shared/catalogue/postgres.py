"""The PostgreSQL catalogue: one database shared by every store replica and every query service."""

from __future__ import annotations

import psycopg
from psycopg import errors

from shared.catalogue.sql import Dialect, SqlCatalogue


def open_postgres(dsn: str) -> SqlCatalogue:
    """The catalogue in the PostgreSQL database at ``dsn`` (a libpq URL or key=value string); the schema
    is created when missing.
    """
    def connect() -> psycopg.Connection:
        return psycopg.connect(dsn, autocommit=False, connect_timeout=10)

    # LIKE 'prefix%' uses an index outside the C collation only with text_pattern_ops (a database created in
    # en_US.UTF-8 scanned every study for PatientName=smi*).
    # Writers lock their studies in one order, so a deadlock means another client's order: retry it.
    # CREATE TABLE IF NOT EXISTS is not safe against itself in PostgreSQL (two store replicas starting
    # together: a unique violation on pg_type): one transaction-scoped advisory lock serialises them.
    return SqlCatalogue(Dialect("postgresql", connect, "%s",
                                retryable=(errors.DeadlockDetected, errors.SerializationFailure),
                                schema_lock="SELECT pg_advisory_xact_lock(7364201)", pattern_ops="text_pattern_ops",
                                broken=lambda conn: conn.closed or conn.broken))
