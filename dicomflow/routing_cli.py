"""``dicomflow router``, ``dicomflow rules test|check`` and ``dicomflow dlq list|replay``."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from pathlib import Path

from shared.config import Config, load_config


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """The router's subcommands."""
    rt = sub.add_parser("router", parents=[common], help="one router member (completion, rules, forwarding)")
    rt.add_argument("--metrics-port", type=int)
    rules = sub.add_parser("rules", parents=[common], help="check the rules file, or dry-run it on DICOM files")
    rules.add_argument("action", choices=["test", "check"], help="test: which rules match PATH and what would happen; "
                                                                 "check: validate the rules file")
    rules.add_argument("path", nargs="?", help="test: a DICOM file or a folder of them")
    rules.add_argument("--rules", help="rules file (default: router.rules_file)")
    rules.add_argument("--calling-ae", default="", help="calling AE title to assume (test)")
    rules.add_argument("--called-ae", default="", help="called AE title to assume (default: ingest.ae_title)")
    rules.add_argument("--json", action="store_true")
    dlq = sub.add_parser("dlq", parents=[common], help="the dead-letter stream: list or replay failed forwards")
    dlq.add_argument("action", choices=["list", "replay"])
    dlq.add_argument("--target", help="only entries of this target (_quarantine: quarantined instances)")
    dlq.add_argument("--study", help="only entries of this StudyInstanceUID")
    dlq.add_argument("--seq", type=int, action="append", help="only this DLQ sequence number (repeatable)")
    dlq.add_argument("--to", help="replay: send to this target instead of the original one")
    dlq.add_argument("--json", action="store_true")


def cmd_router(config: Config, args: argparse.Namespace) -> int:
    from services.router.rules import RulesError
    from services.router.service import serve
    from services.router.targets import TargetsUnusable

    def reload() -> Config:
        over = {"data_dir": args.data_dir} if getattr(args, "data_dir", None) else {}
        return load_config(args.config, over)

    try:
        asyncio.run(serve(config, args.metrics_port, reload=reload, config_path=args.config))
    except (RulesError, OSError) as exc:
        print(f"dicomflow router: invalid rules:\n{exc}", file=sys.stderr)
        return 2
    except TargetsUnusable as exc:
        print(f"dicomflow router: cannot send to configured targets:\n{exc}", file=sys.stderr)
        return 2
    return 0


def _dicom_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def _read_part10(path: Path):
    """(data set bytes, transfer syntax) of a Part-10 file, exactly as a sender would send them."""
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    meta_len = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return path.read_bytes()[meta_len:], str(ds.file_meta.TransferSyntaxUID)


def dry_run(config: Config, ruleset, path: Path, calling_ae: str, called_ae: str) -> dict:
    """What the router would do with one file (no NATS, no sending): matches, actions, destinations."""
    from services.router.assignment import choose
    from services.router.rules import completion_for, facts_of
    from shared.dicom.tags import read_tags

    data, ts = _read_part10(path)
    tags = read_tags(data, ts)
    matched = ruleset.evaluate(facts_of(tags, calling_ae, called_ae))
    actions = []
    for rule in matched:
        entry: dict = {"rule": rule.name, "line": rule.line, "action": rule.action, "when": rule.when,
                       "then": "stop" if rule.stop else "continue"}
        if rule.action == "forward":
            dests = []
            for dest in rule.to:
                group = config.router.groups.get(dest)
                if group:
                    dests.append({"group": dest, "target": choose(tags.study_uid, group.members),
                                  "note": "first choice with every member up; an assigned study keeps its member"})
                else:
                    dests.append({"target": dest})
            entry["to"] = dests
        actions.append(entry)
    policy = completion_for(matched, config.router.completion)
    return {"file": str(path), "study_uid": tags.study_uid, "sop_uid": tags.sop_uid, "modality": tags.modality,
            "calling_ae": calling_ae, "called_ae": called_ae, "matched": actions,
            "completion": policy.model_dump()}


def cmd_rules(config: Config, args: argparse.Namespace) -> int:
    from services.router.rules import RulesError, RuleSet, load_rules
    from shared.dicom.statuses import Rejection

    path = args.rules or config.router.rules_file
    try:
        ruleset = load_rules(path, [*config.router.targets, *config.router.groups]) if path else RuleSet((), "")
    except RulesError as exc:
        print(f"dicomflow rules: {len(exc.problems)} problem(s):\n{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dicomflow rules: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.action == "check":
        print(f"{path or '(no rules file)'}: {len(ruleset.rules)} rules, valid")
        return 0
    if not args.path:
        print("dicomflow rules test: give a DICOM file or folder", file=sys.stderr)
        return 2
    called = args.called_ae or config.ingest.ae_title
    results = []
    for f in _dicom_files(Path(args.path)):
        try:
            results.append(dry_run(config, ruleset, f, args.calling_ae, called))
        except (Rejection, Exception) as exc:  # not DICOM, or what the ingest would refuse
            results.append({"file": str(f), "error": str(getattr(exc, "reason", exc))})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if "error" in r:
            print(f"{r['file']}: not routable: {r['error']}")
            continue
        print(f"{r['file']}: study {r['study_uid']} {r['modality']} from {r['calling_ae'] or '-'} to {r['called_ae']}")
        if not r["matched"]:
            print("  no rule matches: not forwarded (the study is still tracked for completion)")
        for a in r["matched"]:
            what = a["action"]
            if what == "forward":
                dests = ", ".join(f"{d['group']} -> {d['target']}" if "group" in d else d["target"] for d in a["to"])
                what = f"forward to {dests} {'per instance' if a['when'] == 'instance' else 'on study completion'}"
            print(f"  rule {a['rule']!r} (line {a['line']}): {what}; then {a['then']}")
        c = r["completion"]
        print(f"  completion: quiet {c['quiet_s']}s"
              + (f", required series {c['required_series']}" if c["required_series"] else "")
              + (f", at least {c['min_series']} series" if c["min_series"] else "")
              + (f", forced after {c['force_after_s']}s ({c['force_action']})" if c["force_after_s"] else ""))
    return 0


async def _dlq_entries(nc, args: argparse.Namespace) -> list[dict]:
    from shared.bus.jetstream import JetStreamAPIError, api
    from shared.contract import subjects
    from shared.contract.events import DeadLetter

    filt = subjects.dead_letter_filter(args.target, args.study)
    out, seq = [], 1
    while True:
        try:
            resp = await api(nc, f"STREAM.MSG.GET.{subjects.DLQ_STREAM}", {"seq": seq, "next_by_subj": filt})
        except JetStreamAPIError as exc:
            if exc.err_code in (10037, 10059) or exc.code == 404:
                return out
            raise
        msg = resp["message"]
        seq = int(msg["seq"]) + 1
        if args.seq and int(msg["seq"]) not in args.seq:
            continue
        dl = DeadLetter.model_validate_json(base64.b64decode(msg.get("data") or b""))
        out.append({"seq": int(msg["seq"]), "subject": msg["subject"], "entry": dl})


def _audit_replay(config: Config, args: argparse.Namespace, entries: list[dict]) -> None:
    """The audit record of a replay: which dead-lettered instances went to which target again."""
    from shared.audit.records import dlq_replay

    from .audit_cli import operator, record_command

    replayed = [e for e in entries if "replayed_to" in e]
    target = args.to or ",".join(sorted({e["replayed_to"] for e in replayed})) or "-"
    rows = [{"study_uid": e["entry"].job.study_uid, "sop_class_uid": e["entry"].job.sop_class_uid} for e in replayed]
    record_command(config, dlq_replay(*operator(), target, rows, len(replayed), len(entries) - len(replayed)),
                   "dlq")


def cmd_dlq(config: Config, args: argparse.Namespace) -> int:
    from shared.bus.connection import connect_once, publish_event
    from shared.bus.jetstream import api
    from shared.contract import subjects

    if args.to and args.to not in config.router.targets:
        print(f"dicomflow dlq: --to {args.to!r} is not a configured target", file=sys.stderr)
        return 2

    async def go() -> list[dict]:
        nc = await connect_once(config, "dicomflow-dlq")
        try:
            entries = await _dlq_entries(nc, args)
            if args.action == "list":
                return entries
            js = nc.jetstream()
            done = []
            for e in entries:
                job = e["entry"].job
                target = args.to or job.target
                if target == subjects.QUARANTINE or target not in config.router.targets:
                    e["skipped"] = f"no target to replay to ({target}); use --to"
                    done.append(e)
                    continue
                new = job.model_copy(update={"target": target, "group": job.group if target == job.target else ""})
                await publish_event(js, new, config.nats.publish_timeout_s, msg_id=f"replay:{e['seq']}:{new.msg_id()}")
                await api(nc, f"STREAM.MSG.DELETE.{subjects.DLQ_STREAM}", {"seq": e["seq"]})
                e["replayed_to"] = target
                done.append(e)
            return done
        finally:
            await nc.close()

    try:
        entries = asyncio.run(go())
    except Exception as exc:
        print(f"dicomflow dlq: {exc}", file=sys.stderr)
        return 1
    if args.action == "replay" and entries:
        _audit_replay(config, args, entries)
    rows = [{"seq": e["seq"], "target": e["entry"].job.target, "study_uid": e["entry"].job.study_uid,
             "sop_uid": e["entry"].job.sop_uid, "attempts": e["entry"].attempts, "reason": e["entry"].reason,
             "failed_at": e["entry"].failed_at.isoformat(),
             **({"replayed_to": e["replayed_to"]} if "replayed_to" in e else {}),
             **({"skipped": e["skipped"]} if "skipped" in e else {})} for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("dead-letter stream: nothing matches")
    for r in rows:
        extra = f" -> replayed to {r['replayed_to']}" if "replayed_to" in r else (f" ({r['skipped']})" if "skipped" in r else "")
        print(f"#{r['seq']} {r['target']} study {r['study_uid']} sop {r['sop_uid']} after {r['attempts']} attempts: "
              f"{r['reason']}{extra}")
    return 0
