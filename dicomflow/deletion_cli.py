"""``dicomflow delete`` and ``dicomflow retention``: deleting studies, series or instances, by hand or by age."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime

from shared.config import Config

log = logging.getLogger("dicomflow.deletion")

# Exit statuses: 0 done, 1 nothing there, 2 bad arguments, 3 deleted but not everything after it happened
# (an object not removed, events not published: the report names them).
NOT_FOUND, BAD_ARGS, INCOMPLETE = 1, 2, 3


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """The ``delete`` and ``retention`` subcommands."""
    d = sub.add_parser("delete", parents=[common], help="delete a study, a series or an instance (catalogue entries, "
                                                        "objects no other instance holds; audited, dicom.deleted events)")
    d.add_argument("--study", required=True, help="StudyInstanceUID")
    d.add_argument("--series", help="SeriesInstanceUID: only this series")
    d.add_argument("--instance", help="SOPInstanceUID: only this instance (with --series)")
    d.add_argument("--tenant", help="only this tenant's (default: every tenant's with these UIDs)")
    d.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    d.add_argument("--json", action="store_true")
    r = sub.add_parser("retention", parents=[common], help="delete the studies past their tenant's retention "
                                                           "(deletion.retention_days), except holds and studies "
                                                           "with a forward in flight")
    r.add_argument("--tenant", help="only this tenant's studies")
    r.add_argument("--dry-run", action="store_true", help="list what would be deleted and why the rest is kept")
    r.add_argument("--every", action="store_true", help="a pass every deletion.retention_interval_s, until stopped")
    r.add_argument("--json", action="store_true", help="one JSON line per study (and per pass)")


def _target(args: argparse.Namespace):
    from shared.contract.uids import validate_uid
    from shared.deletion.plan import Target

    if args.instance and not args.series:
        raise ValueError("--instance needs --series")
    return Target(args.tenant, validate_uid(args.study, "StudyInstanceUID"),
                  validate_uid(args.series, "SeriesInstanceUID") if args.series else None,
                  validate_uid(args.instance, "SOPInstanceUID") if args.instance else None)


async def _publish(config: Config, events) -> int:
    """Publish deleted events from a short-lived command; the number not published."""
    if not events:
        return 0
    from shared.bus.connection import connect_once, ensure_streams
    from shared.deletion.announce import announce

    try:
        nc = await connect_once(config, "dicomflow-delete")
    except Exception as exc:  # noqa: BLE001 - reported by the caller as events not published
        log.error("deleted events: NATS unreachable: %s", exc)
        return len(events)
    try:
        await ensure_streams(nc, config)
        return await announce(nc.jetstream(), events, config.nats.publish_timeout_s)
    finally:
        await nc.close()


def _run_deletions(config: Config, targets, reason: str, requested_by: str):
    """Delete each target, publish the events, keep one audit record each; the outcomes and the events not
    published."""
    from shared.catalogue.open import open_catalogue
    from shared.deletion.execute import audit_record, delete
    from shared.storage.objectstore import Backends

    from .audit_cli import operator, record_command

    user, host = operator()
    catalogue = open_catalogue(config.catalogue.url, config.data_path())
    backends = Backends(config)
    outcomes = []
    try:
        for target in targets:
            outcomes.append(delete(catalogue, backends, target, reason, requested_by or user))
    finally:
        catalogue.close()
        backends.close()
    events = [e for o in outcomes for e in o.events]
    unpublished = asyncio.run(_publish(config, events))
    for o in outcomes:
        record = audit_record(o, user, host)
        if record is not None:
            tenants = sorted({r["tenant"] for r in o.rows})
            record = record.model_copy(update={"tenant": tenants[0] if len(tenants) == 1 else "",
                                               "detail": {**record.detail, "reason": reason}})
            record_command(config, record, "delete" if reason == "request" else "retention")
    return outcomes, unpublished


def cmd_delete(config: Config, args: argparse.Namespace) -> int:
    from shared.contract.uids import InvalidUID
    from shared.deletion.execute import preview

    try:
        target = _target(args)
    except (InvalidUID, ValueError) as exc:
        print(f"dicomflow delete: {exc}", file=sys.stderr)
        return BAD_ARGS
    if args.dry_run:
        from shared.catalogue.open import open_catalogue

        catalogue = open_catalogue(config.catalogue.url, config.data_path())
        try:
            outcome = preview(catalogue, target)
        finally:
            catalogue.close()
        unpublished = 0
    else:
        [outcome], unpublished = _run_deletions(config, [target], "request", "")
    if not outcome.found:
        print(f"dicomflow delete: {target.describe()} is not stored", file=sys.stderr)
        return NOT_FOUND
    report = {**outcome.summary(), "dry_run": args.dry_run, "events_not_published": unpublished,
              "sop_uids": [r["sop_uid"] for r in outcome.rows]}
    if args.json:
        print(json.dumps(report))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(outcome.rows)} instances of {target.describe()}")
        if not args.dry_run:
            print(f"  objects removed: {report['objects_removed'] or 'none (all shared with other instances)'}")
        for line in outcome.failed:
            print(f"  not removed: {line}", file=sys.stderr)
        if unpublished:
            print(f"  {unpublished} dicom.deleted events not published (NATS)", file=sys.stderr)
    return INCOMPLETE if (outcome.failed or unpublished) else 0


async def _in_flight(config: Config, study_uids: list[str]) -> set[str]:
    """The studies the router is not done with: open in its state (forwards on completion pending), or with
    jobs queued in ROUTER_OUT or dead-lettered in DICOM_DLQ. NATS unreachable: every study (nothing is
    proven safe to delete)."""
    if not study_uids:
        return set()
    from nats.js.errors import NotFoundError

    from services.router.state import open_state
    from shared.bus.connection import connect_once
    from shared.contract import subjects
    from shared.contract.uids import uid_token

    try:
        nc = await connect_once(config, "dicomflow-retention")
    except Exception as exc:  # noqa: BLE001
        log.error("retention: NATS unreachable (%s): no study is deleted", exc)
        return set(study_uids)
    busy: set[str] = set()
    try:
        js = nc.jetstream()
        book = None
        if config.router.rules_file:
            book, _, _ = await open_state(nc, config.router.study_ttl_days, config.stream.replicas)
        for uid in study_uids:
            if book is not None:
                state, _ = await book.get(uid)
                if state is not None and state.is_open:
                    busy.add(uid)
                    continue
            for stream, filt in ((subjects.OUT_STREAM, f"{subjects.OUT_PREFIX}.*.{uid_token(uid)}.*"),
                                 (subjects.DLQ_STREAM, subjects.dead_letter_filter(None, uid))):
                try:
                    info = await js.stream_info(stream, subjects_filter=filt)
                except NotFoundError:
                    continue  # no router has run: nothing queued
                if info.state.subjects:
                    busy.add(uid)
                    break
    finally:
        await nc.close()
    return busy


def retention_pass(config: Config, tenant: str | None, dry_run: bool) -> tuple[list, list]:
    """One retention pass: (the verdicts, the outcomes of the deletions made)."""
    from shared.catalogue.open import open_catalogue
    from shared.deletion.plan import Target
    from shared.deletion.retention import DELETE, decide

    cfg = config.deletion
    catalogue = open_catalogue(config.catalogue.url, config.data_path())
    try:
        ages = catalogue.study_ages(tenant)
    finally:
        catalogue.close()
    now = datetime.now(UTC)
    # the router is asked only about the studies old enough to go
    candidates = [v.study_uid for v in decide(ages, now, cfg.retention_days, cfg.holds, set()) if v.action == DELETE]
    busy = asyncio.run(_in_flight(config, sorted(set(candidates))))
    verdicts = decide(ages, now, cfg.retention_days, cfg.holds, busy)
    doomed = [Target(v.tenant, v.study_uid) for v in verdicts if v.action == DELETE]
    if dry_run or not doomed:
        return verdicts, []
    outcomes, unpublished = _run_deletions(config, doomed, "retention", "retention")
    if unpublished:
        log.error("retention: %d dicom.deleted events not published", unpublished)
    return verdicts, outcomes


def cmd_retention(config: Config, args: argparse.Namespace) -> int:
    while True:
        verdicts, outcomes = retention_pass(config, args.tenant, args.dry_run)
        deleting = [v for v in verdicts if v.action == "delete"]
        if args.json:
            for v in verdicts:
                print(json.dumps({**v.as_dict(), "dry_run": args.dry_run}))
        else:
            verb = "would delete" if args.dry_run else "deleted"
            for v in verdicts:
                mark = verb if v.action == "delete" else "keep"
                print(f"{mark:12} {v.tenant or '-':10} {v.study_uid}  ({v.why})")
            print(f"{len(deleting)} of {len(verdicts)} studies {verb}"
                  + (f", {sum(len(o.rows) for o in outcomes)} instances" if outcomes else ""))
        sys.stdout.flush()
        if not args.every:
            return 0
        time.sleep(config.deletion.retention_interval_s)
