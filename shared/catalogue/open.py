"""Which catalogue a URL names."""

from __future__ import annotations

from pathlib import Path

from shared.catalogue.sql import SqlCatalogue


def open_catalogue(url: str, data_dir: Path) -> SqlCatalogue:
    """``postgresql://...`` (or ``postgres://``): PostgreSQL; ``sqlite:///path`` or empty: SQLite
    (empty: ``<data_dir>/catalogue.sqlite``)."""
    if url.startswith(("postgresql://", "postgres://")):
        from shared.catalogue.postgres import open_postgres  # psycopg only where PostgreSQL is used
        return open_postgres(url)
    from shared.catalogue.sqlite import open_sqlite
    if not url:
        return open_sqlite(Path(data_dir) / "catalogue.sqlite")
    if url.startswith("sqlite:///"):
        return open_sqlite(Path(url[len("sqlite:///"):]))
    raise ValueError(f"catalogue URL {url!r}: expected postgresql://... or sqlite:///path")
