"""The ``dicomflow`` command: run the embedded default, run one service, or inspect what is stored."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from shared.config import Config, ConfigError, describe, load_config
from shared.telemetry import setup_logging

from .audit_cli import add_parser as add_audit_parser
from .audit_cli import cmd_audit
from .deletion_cli import add_parsers as add_deletion_parsers
from .deletion_cli import cmd_delete, cmd_retention
from .events_cli import add_parser as add_events_parser
from .events_cli import cmd_events
from .routing_cli import add_parsers as add_router_parsers
from .routing_cli import cmd_dlq, cmd_router, cmd_rules


def _common(default) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default=default, help="YAML configuration file (default: $DICOMFLOW_CONFIG)")
    p.add_argument("--data-dir", default=default, help="data directory (default: ./var or $DICOMFLOW_DATA_DIR)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (--config/--data-dir go before or after the subcommand)."""
    # SUPPRESS in the subcommands, so a value given before the subcommand is not reset to None.
    common = _common(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(prog="dicomflow", description=__doc__, parents=[_common(None)])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="everything on this machine: NATS, ingest, store")
    run.add_argument("--dicom-port", type=int, help="DICOM port (default 11112)")
    run.add_argument("--ae-title", help="AE title (default DICOMFLOW)")
    run.add_argument("--host", help="address the SCP binds to (default 127.0.0.1)")
    run.add_argument("--web-port", type=int, help="DICOMweb HTTP port (default 8043; 0: no DICOMweb service)")
    run.add_argument("--web-replicas", type=int, help="DICOMweb processes sharing the port (default web.replicas, 1)")

    ing = sub.add_parser("ingest", parents=[common], help="the DICOM receiver (ingest.workers processes)")
    ing.add_argument("--dicom-port", type=int)
    ing.add_argument("--ae-title")
    ing.add_argument("--host")
    ing.add_argument("--metrics-port", type=int)
    ing.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ing.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)

    st = sub.add_parser("store", parents=[common], help="one store worker (a consumer group member)")
    st.add_argument("--metrics-port", type=int)
    rel = sub.add_parser("releaser", parents=[common],
                         help="remove staged objects (claim-checks) once every consumer is done with them")
    rel.add_argument("--metrics-port", type=int)
    rel.add_argument("--once", action="store_true", help="one sweep, then print what it saw and released")
    rel.add_argument("--json", action="store_true", help="with --once: as JSON")
    web = sub.add_parser("web", parents=[common], help="the DICOMweb HTTP service (QIDO-RS, metadata): stateless")
    web.add_argument("--web-port", type=int, help="port (default web.port)")
    web.add_argument("--metrics-port", type=int)
    web.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)  # from `dicomflow run`
    add_router_parsers(sub, common)
    add_deletion_parsers(sub, common)
    asc = sub.add_parser("autoscaler", parents=[common], help="scale the store/router groups from JetStream lag")
    asc.add_argument("--metrics-port", type=int)
    asc.add_argument("--dry-run", action="store_true", help="decide and report, change nothing")
    asc.add_argument("--once", action="store_true", help="one round of decisions, printed; implies --dry-run for "
                                                         "the local actuator (its workers live only with it)")
    asc.add_argument("--json", action="store_true", help="with --once: the decisions as JSON")
    asc.add_argument("--worker-metrics-base", type=int, default=0,
                     help="local actuator: worker N serves /metrics on this port + N (0: none)")

    studies = sub.add_parser("studies", parents=[common], help="list stored studies, newest first, optionally filtered")
    studies.add_argument("--tenant", help="only this tenant's studies (default: every tenant)")
    studies.add_argument("--patient", help="PatientName (wildcards * ?, case-insensitive) or PatientID")
    studies.add_argument("--date", help="StudyDate: YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end open)")
    studies.add_argument("--modality", help="a modality in the study (CT, MR, ...; several as CT\\MR)")
    studies.add_argument("--accession", help="AccessionNumber (wildcards allowed)")
    studies.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    studies.add_argument("--json", action="store_true")
    one = sub.add_parser("study", parents=[common], help="one study: series, instance counts, placements, routing")
    one.add_argument("uid", help="StudyInstanceUID")
    one.add_argument("--tenant", help="the study of this tenant (default: every tenant's study with that UID)")
    one.add_argument("--json", action="store_true")
    exp = sub.add_parser("export", parents=[common], help="write a stored study's instances as Part-10 files")
    exp.add_argument("--study", required=True, help="StudyInstanceUID")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--tenant", help="the study of this tenant (two tenants may use one StudyInstanceUID)")
    exp.add_argument("--json", action="store_true")
    add_audit_parser(sub, common)
    add_events_parser(sub, common)
    status = sub.add_parser("status", parents=[common], help="stream, partitions, consumers, lag")
    status.add_argument("--json", action="store_true")
    aa = sub.add_parser("asyncapi", parents=[common], help="the AsyncAPI document of every NATS subject")
    aa.add_argument("--json", action="store_true", help="(the document is JSON)")
    pol = sub.add_parser("policies", parents=[common], help="placement policies")
    pol.add_argument("action", choices=["check"], help="check: probe every backend the policies use (write/read/remove)")
    pol.add_argument("--json", action="store_true")
    rei = sub.add_parser("reindex", parents=[common], help="rebuild the catalogue from the study index objects of the backends (Ceph omaps, filesystem index files; store stopped)")
    rei.add_argument("--out", help="write the rebuilt catalogue to this SQLite file instead of the configured catalogue")
    rei.add_argument("--backend", action="append", help="only this backend (repeatable; default: every backend that keeps study indexes)")
    rei.add_argument("--json", action="store_true")
    sub.add_parser("nats-permissions", parents=[common],
                   help="the nats-server authorization block: one user per service, only the subjects it needs")
    key = sub.add_parser("apikey", parents=[common], help="a new random API key and the SHA-256 the configuration keeps")
    key.add_argument("--json", action="store_true")
    cfg = sub.add_parser("config", parents=[common], help="configuration")
    cfg.add_argument("action", choices=["show", "reference"], help="show: effective config; reference: every setting")
    cfg.add_argument("--json", action="store_true")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    over: dict = {}
    if getattr(args, "data_dir", None):
        over["data_dir"] = args.data_dir
    ingest = {}
    if getattr(args, "dicom_port", None):
        ingest["port"] = args.dicom_port
    if getattr(args, "ae_title", None):
        ingest["ae_title"] = args.ae_title
    if getattr(args, "host", None):
        ingest["host"] = args.host
    if getattr(args, "single", False):
        ingest["workers"] = 1
    if ingest:
        over["ingest"] = ingest
    web = {}
    if getattr(args, "web_port", None) is not None:
        web["port"] = args.web_port
    if getattr(args, "web_replicas", None) is not None:
        web["replicas"] = args.web_replicas
    if web:
        over["web"] = web
    return over


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dicomflow`` console script."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"dicomflow: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.telemetry.log_level)
    from shared.bus.nats_auth import Refused

    try:
        return COMMANDS[args.command](config, args)
    except Refused as exc:  # a configuration error found at start-up: no restart or retry would fix it
        print(f"dicomflow {args.command}: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from .embedded import run

    return run(config, args.config)


def cmd_ingest(config: Config, args: argparse.Namespace) -> int:
    from services.ingest.service import self_command, serve, supervise

    if args.single or config.ingest.workers == 1:
        serve(config, args.metrics_port, listen_fd=args.listen_fd)
        return 0
    argv = self_command(*(["--config", args.config] if args.config else []), "ingest")
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    for flag, value in (("--dicom-port", args.dicom_port), ("--ae-title", args.ae_title), ("--host", args.host)):
        if value:
            argv += [flag, str(value)]
    return supervise(config, argv, args.metrics_port)


def cmd_store(config: Config, args: argparse.Namespace) -> int:
    from services.store.service import serve
    from shared.lifecycle import tune_allocator

    tune_allocator()
    asyncio.run(serve(config, args.metrics_port))
    return 0


def cmd_releaser(config: Config, args: argparse.Namespace) -> int:
    from services.releaser.service import run_once, serve

    if not args.once:
        asyncio.run(serve(config, args.metrics_port))
        return 0
    report = asyncio.run(run_once(config))
    if report is None:
        print("dicomflow releaser: the streams changed under every read; nothing released, try again",
              file=sys.stderr)
        return 1
    r = report.as_dict()
    if args.json:
        print(json.dumps(r))
    elif r["blocked"]:
        print(f"nothing released: {r['blocked']}; {r['objects']} objects ({r['bytes']} bytes) staged")
    else:
        held = ", ".join(f"{k} {v}" for k, v in r["held"].items()) or "none"
        print(f"released {r['released']} objects ({r['released_bytes']} bytes); {r['objects']} objects "
              f"({r['bytes']} bytes) stay staged (kept: {held})")
    return 0


def cmd_web(config: Config, args: argparse.Namespace) -> int:
    from dicomflow.web import serve

    asyncio.run(serve(config, metrics_port=args.metrics_port, listen_fd=args.listen_fd))
    return 0


def cmd_autoscaler(config: Config, args: argparse.Namespace) -> int:
    from services.autoscaler.service import DryRun, serve

    cfg = config.autoscaler
    if cfg.actuator == "kubernetes":
        from services.autoscaler.kubernetes_scale import KubernetesScale

        actuator = KubernetesScale(cfg)
        dry = args.dry_run or cfg.dry_run
    else:
        import os

        from services.autoscaler.local_workers import LocalWorkers, dicomflow_command

        dry = args.dry_run or cfg.dry_run or args.once
        drain = {g: p.drain_timeout_s for g, p in cfg.groups.items()}
        actuator = LocalWorkers(dicomflow_command(args.config, args.worker_metrics_base), dict(os.environ),
                                drain_timeout_s=lambda g: drain.get(g, 120.0))
    if dry:
        # Local dry run: start from what `dicomflow run` would run without the autoscaler.
        initial = {"store": config.store.workers} if cfg.actuator == "local" else None
        actuator = DryRun(actuator if cfg.actuator == "kubernetes" else None, initial)
    decisions = asyncio.run(serve(config, actuator, args.metrics_port, once=args.once))
    if args.once:
        for d in decisions:
            print(json.dumps(d.as_dict()) if args.json else d.explain())
    return 0


def _catalogue(config: Config):
    from shared.catalogue.open import open_catalogue

    return open_catalogue(config.catalogue.url, config.data_path())


def _study_filters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The QIDO matching keys the ``studies`` flags stand for (the same matching as QIDO-RS and C-FIND)."""
    params = []
    if args.patient:  # a name (wildcards allowed) or, with digits and no '^', an ID
        key = "PatientID" if any(c.isdigit() for c in args.patient) and "^" not in args.patient else "PatientName"
        params.append((key, args.patient))
    for key, value in (("StudyDate", args.date), ("ModalitiesInStudy", args.modality),
                       ("AccessionNumber", args.accession)):
        if value:
            params.append((key, value))
    return params


def cmd_studies(config: Config, args: argparse.Namespace) -> int:
    from shared.catalogue.query import STUDY, QueryError, parse_qido

    try:
        query = parse_qido(STUDY, _study_filters(args))
    except QueryError as exc:
        print(f"dicomflow studies: {exc}", file=sys.stderr)
        return 2
    catalogue = _catalogue(config)
    try:
        studies = catalogue.summaries(query, args.tenant, args.limit)
    finally:
        catalogue.close()
    if args.json:
        print(json.dumps(studies, indent=2, ensure_ascii=False))
        return 0
    if not studies:
        print("no stored studies" + (" match" if query.matches else ""))
        return 0
    print(f"{'StudyInstanceUID':64}  {'tenant':10}  {'date':8}  {'mod':7}  {'series':>6}  {'inst':>6}  {'MiB':>8}  patient")
    for s in studies:
        patient = s["patient_name"] or s["patient_id"] or ""
        print(f"{s['study_uid']:64}  {s['tenant'][:10]:10}  {s['study_date'] or '':8}  {'/'.join(s['modalities'])[:7]:7}"
              f"  {s['series']:6d}  {s['instances']:6d}  {s['bytes'] / 2**20:8.1f}  {patient}")
    return 0


def cmd_study(config: Config, args: argparse.Namespace) -> int:
    from shared.catalogue.query import STUDY, parse_qido
    from shared.contract.uids import InvalidUID, validate_uid

    try:
        uid = validate_uid(args.uid, "StudyInstanceUID")
    except InvalidUID as exc:
        print(f"dicomflow study: {exc}", file=sys.stderr)
        return 2
    catalogue = _catalogue(config)
    try:
        [*found] = catalogue.summaries(parse_qido(STUDY, [("StudyInstanceUID", uid)]), args.tenant, 10)
        series = catalogue.series_of(args.tenant, uid)
        instances = catalogue.instances(args.tenant, uid)
    finally:
        catalogue.close()
    if not found:
        print(f"dicomflow study: {uid} is not stored" + (f" for tenant {args.tenant}" if args.tenant else ""),
              file=sys.stderr)
        return 1
    placements = sorted({p for i in instances for p in i["placements"]})
    routing = _routing_state(config, uid)
    report = {"studies": found, "series": series, "placements": placements,
              "policies": sorted({i["policy"] for i in instances}), "routing": routing}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    for s in found:
        print(f"study {s['study_uid']}  tenant {s['tenant'] or '-'}  patient {s['patient_name'] or '-'} "
              f"({s['patient_id'] or '-'})  date {s['study_date'] or '-'}  accession {s['accession_number'] or '-'}")
        print(f"  {s['series']} series, {s['instances']} instances, {s['bytes'] / 2**20:.1f} MiB, "
              f"modalities {'/'.join(s['modalities']) or '-'}")
    for se in series:
        print(f"  series {se['series_number'] if se['series_number'] is not None else '-':>4}  {se['modality'] or '-':4}"
              f"  {se['n_instances']:6d} inst  {se['series_uid']}  {se['series_description'] or ''}")
    print(f"  placements: {', '.join(placements)} (policy {', '.join(report['policies'])})")
    print(f"  routing: {routing if isinstance(routing, str) else json.dumps(routing)}")
    return 0


def _routing_state(config: Config, study_uid: str) -> dict | str:
    """The router's state of a study (its KV entry), or why there is none to show."""
    if not config.router.rules_file:
        return "no routing rules configured"
    from services.router.state import open_state
    from shared.bus.connection import Unreachable, connect_once

    async def go():
        nc = await connect_once(config, "dicomflow-study")
        try:
            book, _, _ = await open_state(nc, config.router.study_ttl_days, config.stream.replicas)
            state, _ = await book.get(study_uid)
            return state.model_dump(mode="json") if state is not None else "not routed (no state)"
        finally:
            await nc.close()
    try:
        return asyncio.run(go())
    except Unreachable as exc:
        return f"unknown: {exc}"


def cmd_export(config: Config, args: argparse.Namespace) -> int:
    from shared.contract.uids import InvalidUID, validate_uid
    from shared.storage.objectstore import Backends

    from .export import export_study

    try:
        study = validate_uid(args.study, "StudyInstanceUID")
    except InvalidUID as exc:
        print(f"dicomflow export: {exc}", file=sys.stderr)
        return 2
    catalogue = _catalogue(config)
    try:
        rows = catalogue.instances(args.tenant, study)
    finally:
        catalogue.close()
    if not rows:
        print(f"dicomflow export: study {study} is not stored", file=sys.stderr)
        return 1
    from shared.audit.records import export

    from .audit_cli import operator, record_command

    backends = Backends(config)
    written: list[Path] = []
    try:
        written = export_study(backends, rows, Path(args.out))
    except Exception as exc:
        record_command(config, export(*operator(), str(Path(args.out).resolve()), rows, 0, f"{type(exc).__name__}: "
                                      f"{exc}"), "export")
        raise
    finally:
        backends.close()
    record_command(config, export(*operator(), str(Path(args.out).resolve()), rows, len(written)), "export")
    if args.json:
        print(json.dumps({"study_uid": study, "files": [str(p) for p in written]}))
    else:
        print(f"{len(written)} instances written to {args.out}")
    return 0


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from shared.bus.connection import Unreachable, connect_once

    from .status import collect, format_text

    async def go() -> dict:
        nc = await connect_once(config, "dicomflow-status")
        try:
            return await collect(nc, config)
        finally:
            await nc.close()

    try:
        st = asyncio.run(go())
    except Unreachable as exc:
        print(f"dicomflow status: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"dicomflow status: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(format_text(st))
    return 0


def cmd_config(config: Config, args: argparse.Namespace) -> int:
    if args.action == "show":
        data = config.model_dump()
        print(json.dumps(data, indent=2) if args.json else __import__("yaml").safe_dump(data, sort_keys=False))
        return 0
    rows = describe(Config)
    if args.json:
        print(json.dumps([{"key": k, "default": d, "description": doc} for k, d, doc in rows], indent=2))
        return 0
    print("| setting | default | meaning |\n|---|---|---|")
    for key, default, doc in rows:
        print(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return 0


def cmd_asyncapi(config: Config, args: argparse.Namespace) -> int:
    from shared.contract.asyncapi import asyncapi

    from . import __version__

    print(asyncapi(config.nats_servers(), __version__, config.stream))
    return 0


def cmd_policies(config: Config, args: argparse.Namespace) -> int:
    from services.store.policy_check import check

    report = check(config)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    for name, b in report["backends"].items():
        print(f"backend {name:16} {'OK  ' if b['ok'] else 'FAIL'} {b['target']}: {b['detail']}")
    for name, p in report["policies"].items():
        print(f"policy  {name:16} {'OK  ' if p['ok'] else 'FAIL'} -> {', '.join(p['placements'])}")
    for inst, i in report["institutions"].items():
        print(f"institution {inst!r} -> {i['policy']}")
    d = report["default_policy"]
    print(f"default policy: {d['policy'] or 'none (unknown institutions are rejected)'}")
    return 0 if report["ok"] else 1


def cmd_nats_permissions(config: Config, args: argparse.Namespace) -> int:
    from shared.bus.permissions import authorization_block

    print(authorization_block(config), end="")
    return 0


def cmd_apikey(config: Config, args: argparse.Namespace) -> int:
    import secrets

    from shared.tenancy import api_key_hash

    key = secrets.token_urlsafe(32)
    if args.json:
        print(json.dumps({"key": key, "sha256": api_key_hash(key)}))
    else:
        print(f"key:    {key}\nsha256: {api_key_hash(key)}\n(give the key to its user; put the sha256 under "
              f"access.tenants.<tenant>.api_keys_sha256 or access.admin_api_keys_sha256)")
    return 0


def cmd_reindex(config: Config, args: argparse.Namespace) -> int:
    from services.store.reindex import rebuild

    counts = rebuild(config, Path(args.out) if args.out else None, args.backend)
    print(json.dumps(counts) if args.json else
          f"{counts['instances']} instances of {counts['studies']} studies catalogued into {counts['catalogue']}")
    return 0


COMMANDS = {"asyncapi": cmd_asyncapi, "run": cmd_run, "ingest": cmd_ingest, "store": cmd_store, "router": cmd_router,
            "releaser": cmd_releaser,
            "autoscaler": cmd_autoscaler, "web": cmd_web, "studies": cmd_studies, "study": cmd_study,
            "export": cmd_export, "status": cmd_status, "config": cmd_config, "policies": cmd_policies,
            "reindex": cmd_reindex, "rules": cmd_rules, "dlq": cmd_dlq, "apikey": cmd_apikey,
            "nats-permissions": cmd_nats_permissions, "audit": cmd_audit,
            "events": cmd_events, "delete": cmd_delete, "retention": cmd_retention}
