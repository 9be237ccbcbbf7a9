"""``dicomflow events``: the change feed (every instance stored, replaced or deleted, every study completed or
updated) from a sequence or a time, one tenant's or every tenant's, and with ``--follow`` what comes after."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from datetime import UTC, datetime

from shared.config import Config

from .audit_cli import BadTime, parse_since

FOLLOW_POLL_S = 1.0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``events`` subcommand."""
    p = sub.add_parser("events", parents=[common], help="the change feed: what was stored, replaced, deleted, "
                                                        "completed, from a sequence or a time")
    p.add_argument("--since", default="1", help="a sequence (the first entry wanted: 1 is the start) or a time: ISO "
                                                "8601 (2026-12-01T08:00Z) or an age (30m, 12h, 7d); default 1")
    p.add_argument("--tenant", help="only this tenant's changes (default: every tenant's, as an administrator)")
    p.add_argument("--limit", type=int, help="at most this many entries (default: all up to now)")
    p.add_argument("--follow", action="store_true", help="after the last entry, wait for new ones and print them "
                                                         "as they come (until interrupted)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (the HTTP feed's entries, with "
                                                       "their State now)")


def parse_cursor(text: str, now: datetime) -> tuple[int, datetime | None]:
    """(first sequence, start time) that ``--since`` names: a whole number is a sequence, anything else a time."""
    value = text.strip()
    if value.isascii() and value.isdigit():
        return max(int(value), 1), None
    return 1, parse_since(value, now)


def known_tenants(config: Config) -> set[str]:
    """Every tenant the configuration can give an instance: the listed ones, the default and anonymous tenants,
    and those a trusted gateway maps institutions to."""
    access = config.access
    named = {access.default_tenant, access.anonymous_tenant} | {t for m in access.gateways.values() for t in m.values()}
    return set(access.tenants) | {t for t in named if t}


def cmd_events(config: Config, args: argparse.Namespace) -> int:
    from shared.bus.connection import Unreachable, connect_once
    from shared.catalogue.open import open_catalogue
    from shared.changefeed import reading
    from shared.changefeed.describe import describe
    from shared.changefeed.entries import event_line

    try:
        start, since = parse_cursor(args.since, datetime.now(UTC))
    except BadTime as exc:
        print(f"dicomflow events: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print("dicomflow events: --limit must be at least 1", file=sys.stderr)
        return 2
    if args.tenant is not None and args.tenant not in known_tenants(config):
        print(f"dicomflow events: no tenant {args.tenant!r} in the configuration", file=sys.stderr)
        return 2
    catalogue = open_catalogue(config.catalogue.url, config.data_path())

    def show(changes) -> None:
        if args.json:
            for entry in describe(catalogue, changes, False, ""):
                print(json.dumps(entry, ensure_ascii=False), flush=True)
        else:
            for change in changes:
                print(event_line(change), flush=True)

    async def go() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        nc = await connect_once(config, "dicomflow-events")
        try:
            cursor, when, left = start, since, args.limit
            while not stop.is_set():
                page = await reading.read(nc, config.access, args.tenant, min(left or 1000, 1000), cursor, when)
                show(page.changes)
                if left is not None:
                    left -= len(page.changes)
                    if left <= 0:
                        break
                if page.through >= cursor:  # a time cursor becomes a sequence once the place is found
                    cursor, when = page.through + 1, None
                if len(page.changes) < min(left or 1000, 1000) and not args.follow:
                    break  # read up to the end there was
                if not page.changes:
                    try:
                        await asyncio.wait_for(stop.wait(), FOLLOW_POLL_S)
                    except TimeoutError:
                        pass
        finally:
            await nc.close()
        return 0

    try:
        return asyncio.run(go())
    except Unreachable as exc:
        print(f"dicomflow events: {exc}", file=sys.stderr)
        return 1
    finally:
        catalogue.close()
