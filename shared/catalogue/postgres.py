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

    # Writers lock their studies in one order, so a deadlock means another client's order: retry it.
    # CREATE TABLE IF NOT EXISTS is not safe against itself in PostgreSQL (two store replicas starting
    # together: a unique violation on pg_type): one transaction-scoped advisory lock serialises them.
    return SqlCatalogue(Dialect("postgresql", connect, "%s",
                                retryable=(errors.DeadlockDetected, errors.SerializationFailure),
                                schema_lock="SELECT pg_advisory_xact_lock(7364201)",
                                # a prefix LIKE uses a plain index only under the C collation: these serve any
                                extra_schema=tuple(
                                    f"CREATE INDEX IF NOT EXISTS studies_by_{c}_prefix ON studies (tenant, {c} "
                                    "text_pattern_ops)" for c in ("patient_name", "patient_id", "accession_number"))))
