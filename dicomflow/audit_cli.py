"""``dicomflow audit``: list and filter the audit trail (the DICOM_AUDIT stream); and the audit records of the
commands that change or take data (export, DLQ replay)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import re
import socket
import sys
import typing
from datetime import UTC, datetime, timedelta

from shared.config import Config
from shared.contract.events import AuditEventKind, AuditOutcome, AuditRecord

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
KINDS = typing.get_args(AuditEventKind)
OUTCOMES = typing.get_args(AuditOutcome)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    """The ``audit`` subcommand."""
    p = sub.add_parser("audit", parents=[common], help="list the audit trail (PS3.15 audit records), filtered")
    p.add_argument("--since", help="only records from this time on: ISO 8601 (2026-12-01, 2026-12-01T08:00Z) "
                                   "or an age (30m, 12h, 7d)")
    p.add_argument("--event", choices=KINDS, help="only records of this kind")
    p.add_argument("--study", help="only records that name this StudyInstanceUID")
    p.add_argument("--user", help="only records with this participant (AE title, principal or user name)")
    p.add_argument("--outcome", choices=OUTCOMES, help="only records with this outcome")
    p.add_argument("--limit", type=int, default=100, help="the newest N matching records (default 100)")
    p.add_argument("--xml", action="store_true", help="each record as its DICOM audit message (XML)")
    p.add_argument("--json", action="store_true")


class BadTime(ValueError):
    """--since is neither an ISO 8601 time nor an age."""


def parse_since(text: str, now: datetime) -> datetime:
    """The start time --since names: an age before ``now`` (``30m``, ``12h``, ``7d``) or an ISO 8601 time
    (UTC unless it says otherwise)."""
    m = _RELATIVE.match(text.strip())
    if m:
        return now - timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadTime(f"--since {text!r}: give an ISO 8601 time (2026-12-01T08:00Z) or an age (30m, 12h, 7d)") \
            from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def matches(record: AuditRecord, study: str | None, user: str | None) -> bool:
    """Whether ``record`` names ``study`` and has a participant ``user`` (the filters the subject cannot do)."""
    if study and not any(s.study_uid == study for s in record.studies):
        return False
    if user:
        u = user.strip()
        return any(u in (p.user_id, p.user_name) or p.alternative_user_id == f"AETITLES={u}"
                   for p in record.participants)
    return True


def format_line(record: AuditRecord) -> str:
    """One record as one line: when, what, outcome, who (requestor first), which studies."""
    who = " ".join(f"{p.user_id}{'@' + p.host if p.host else ''}{'*' if p.requestor else ''}"
                   for p in sorted(record.participants, key=lambda p: not p.requestor))
    studies = ""
    if record.studies:
        n = sum(sum(s.sop_classes.values()) for s in record.studies)
        studies = f" {len(record.studies)} stud{'y' if len(record.studies) == 1 else 'ies'}, {n} inst: " + \
            ",".join(s.study_uid for s in record.studies[:3]) + (" ..." if len(record.studies) > 3 else "")
    extra = f" query {record.query.sop_class_uid} {record.query.query[:80]}" if record.query else ""
    why = f" ({record.outcome_description})" if record.outcome_description else ""
    return (f"{record.event_time.isoformat(timespec='seconds').replace('+00:00', 'Z')}  {record.kind:20} "
            f"{record.outcome:15} {who}{studies}{extra}{why}")


async def read_records(nc, event: str | None, outcome: str | None, since: datetime | None) -> list[AuditRecord]:
    """Every record of the audit stream with this kind/outcome from ``since`` on, oldest first (an ordered
    ephemeral consumer that acknowledges nothing: reading changes nothing)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from shared.bus.jetstream import JetStreamAPIError, api
    from shared.contract import subjects

    try:
        info = await api(nc, f"STREAM.INFO.{subjects.AUDIT_STREAM}")
    except JetStreamAPIError as exc:
        if exc.err_code == 10059:  # no stream yet: nothing was ever audited
            return []
        raise
    if not info["state"].get("messages"):
        return []
    cfg = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=30.0, max_ack_pending=-1,
                         deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
                         opt_start_time=since.astimezone(UTC).isoformat().replace("+00:00", "Z") if since else None)
    js = nc.jetstream()
    sub = await js.pull_subscribe(subjects.audit_filter(event, outcome), stream=subjects.AUDIT_STREAM, config=cfg)
    out: list[AuditRecord] = []
    try:
        while True:
            pending = (await sub.consumer_info()).num_pending
            if not pending:
                break
            try:
                msgs = await sub.fetch(min(pending, 512), timeout=5)
            except TimeoutError:
                break
            for msg in msgs:
                try:
                    out.append(AuditRecord.model_validate_json(msg.data))
                except ValueError:  # not one of ours: listed by nobody, never fatal
                    continue
    finally:
        await sub.unsubscribe()
    return out


def cmd_audit(config: Config, args: argparse.Namespace) -> int:
    from shared.audit.message import audit_message
    from shared.bus.connection import Unreachable, connect_once

    try:
        since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    except BadTime as exc:
        print(f"dicomflow audit: {exc}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("dicomflow audit: --limit must be at least 1", file=sys.stderr)
        return 2

    async def go() -> list[AuditRecord]:
        nc = await connect_once(config, "dicomflow-audit")
        try:
            return await read_records(nc, args.event, args.outcome, since)
        finally:
            await nc.close()

    try:
        found = asyncio.run(go())
    except Unreachable as exc:
        print(f"dicomflow audit: {exc}", file=sys.stderr)
        return 1
    # the stream's start time is when a record was stored; --since is about when the action happened
    chosen = [r for r in found if matches(r, args.study, args.user) and (since is None or r.event_time >= since)
              ][-args.limit:]
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in chosen], indent=2))
    elif args.xml:
        source = config.audit.source_id or f"dicomflow@{socket.gethostname()}"
        for r in chosen:
            print(audit_message(r, source, config.audit.site_id).decode())
    elif not chosen:
        print("audit trail: nothing matches")
    else:
        for r in chosen:
            print(format_line(r))
    return 0


def record_command(config: Config, record: AuditRecord, command: str) -> None:
    """Keep the audit record of a short-lived command (export, DLQ replay) before it exits: it waits up to
    a few seconds for NATS and says so on stderr when the record could not be kept."""
    from shared.audit import trail

    t = trail.AuditTrail(config, command) if config.audit.enabled else None
    if t is None:
        return
    t.emit(record)
    if not t.close(config.nats.connect_timeout_s + config.nats.publish_timeout_s):
        print(f"dicomflow {command}: the audit record of this command was not stored (NATS unreachable)",
              file=sys.stderr)


def operator() -> tuple[str, str]:
    """(OS user, host name) of whoever runs this command: the requesting participant of its audit record."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "uid-unknown"
    return user, socket.gethostname()
