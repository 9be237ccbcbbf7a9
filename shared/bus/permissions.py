"""Least privilege on the bus: which subjects each service's NATS user may publish and subscribe to.

A pure function of the configuration (stream names come from it) that renders the ``authorization``
block of a nats-server configuration (``dicomflow nats-permissions``; compose/nats/ and k8s/ ship its
output, and tests/test_nats_permissions.py holds them to it and runs the services under it). What a
user may not publish is denied: the ingest publishes only ``dicom.in.>`` plus the JetStream API calls
that declare its two streams; a store or router credential cannot inject an instance; the integration
user reads the events stream and nothing else. Passwords are not in the block: each is an environment
variable of the server (``$DICOMFLOW_NATS_<ROLE>_PASSWORD``), filled from a Secret.

Subjects (PS: the JetStream API is ``$JS.API.<verb>.<stream>...``, acknowledgements ``$JS.ACK.<stream>...``,
KV values ``$KV.<bucket>.<key>`` in the stream ``KV_<bucket>``, replies ``_INBOX.>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import Config
from shared.contract import subjects

ROLES = ("ingest", "web", "store", "router", "autoscaler", "releaser", "integration", "admin")
"""The NATS users: one per service (``web`` is the DICOMweb service, which publishes STOW-RS instances),
``integration`` for systems that consume the integration events, and ``admin`` for operators' commands
(``dicomflow status``, ``dlq replay``, ``study``): every subject, no service runs as it."""

_MEMBERSHIP_GROUPS = {"store": "store", "router": "router"}


@dataclass
class Grants:
    """A user's allowed subjects (anything else is denied)."""

    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)

    def add(self, other: Grants) -> Grants:
        for mine, theirs in ((self.publish, other.publish), (self.subscribe, other.subscribe)):
            mine.extend(s for s in theirs if s not in mine)
        return self


def declare(stream: str) -> Grants:
    """Declare (create or update) one stream, as every service does at start-up for its own streams."""
    return Grants(publish=[f"$JS.API.STREAM.{verb}.{stream}" for verb in ("INFO", "CREATE", "UPDATE")])


def consume(stream: str) -> Grants:
    """Create, read and pull its own consumers on ``stream`` and acknowledge what they deliver."""
    return Grants(publish=[f"$JS.API.CONSUMER.*.{stream}", f"$JS.API.CONSUMER.*.{stream}.>",
                           f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>", f"$JS.API.STREAM.INFO.{stream}",
                           f"$JS.ACK.{stream}.>"])


def read_messages(stream: str) -> Grants:
    """Read single messages of ``stream`` by sequence or subject."""
    return Grants(publish=[f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}",
                           f"$JS.API.DIRECT.GET.{stream}.>"])


def bucket(name: str, write: bool = True) -> Grants:
    """A KV bucket: declare it, read and watch its keys, and (``write``) put, delete and purge them."""
    stream = f"KV_{name}"
    grants = consume(stream).add(read_messages(stream))
    if write:
        grants.add(declare(stream)).add(Grants(publish=[f"$KV.{name}.>", f"$JS.API.STREAM.PURGE.{stream}"]))
    return grants


def grants(config: Config) -> dict[str, Grants]:
    """Each role's grants under ``config`` (its stream names)."""
    names = subjects.stream_names(config.stream)
    instances, events = names["instances"], names["events"]
    common = Grants(subscribe=["_INBOX.>"])  # request replies, pull deliveries, the publishers' PubAcks
    # every service records audit messages (shared/audit) into their own stream
    common = common.add(Grants(publish=[f"{subjects.AUDIT_PREFIX}.>"])).add(declare(names["audit"]))
    # every service that declares the events stream declares the change feed it fills (ensure_streams)
    events_and_feed = declare(events).add(declare(names["changes"]))
    intake = Grants(publish=[f"{subjects.IN_PREFIX}.>"]).add(declare(instances)).add(events_and_feed)
    # deletions (DICOMweb DELETE by the web, rejection notes by the store) announce each instance deleted
    deleted = Grants(publish=[f"{subjects.DELETED_PREFIX}.>"])
    out, dlq = names["forward"], names["dlq"]
    return {
        "ingest": Grants().add(common).add(intake),
        # the web reads the change feed (GET /changefeed) with its own ephemeral consumers
        "web": Grants().add(common).add(intake).add(deleted).add(consume(names["changes"]))
        .add(read_messages(names["changes"])),
        "store": Grants(publish=[f"{subjects.STORED_PREFIX}.>", f"{subjects.REJECTED_PREFIX}.>"]).add(common).add(deleted)
        .add(declare(instances)).add(events_and_feed).add(consume(instances)).add(bucket("members_store")),
        "router": Grants(publish=["dicom.study.>", "dicom.forward.>", f"{subjects.OUT_PREFIX}.>",
                                  f"{subjects.DLQ_PREFIX}.>"]).add(common)
        .add(declare(instances)).add(events_and_feed).add(declare(out)).add(declare(dlq))
        .add(consume(instances)).add(consume(out)).add(consume(dlq)).add(read_messages(instances)).add(read_messages(dlq))
        .add(Grants(publish=[f"$JS.API.STREAM.MSG.DELETE.{dlq}"]))
        .add(bucket("members_router")).add(bucket(subjects.STUDIES_BUCKET)).add(bucket(subjects.ASSIGN_BUCKET))
        .add(bucket(subjects.HEALTH_BUCKET)),
        # lag: consumer lists and the partitions' last messages; membership read-only; scaling is not on the bus
        "autoscaler": Grants().add(common).add(declare(instances)).add(events_and_feed)
        .add(Grants(publish=[f"$JS.API.CONSUMER.LIST.{instances}", f"$JS.API.CONSUMER.INFO.{instances}.>",
                             f"$JS.API.STREAM.INFO.{instances}"]))
        .add(read_messages(instances)).add(bucket("members_store", write=False))
        .add(bucket("members_router", write=False)),
        # the staging releaser: the groups' ack floors and the messages that name staged objects (deletions
        # too), read-only
        "releaser": Grants().add(common)
        .add(Grants(publish=[f"$JS.API.CONSUMER.LIST.{instances}", f"$JS.API.STREAM.INFO.{instances}",
                             f"$JS.API.STREAM.INFO.{out}", f"$JS.API.STREAM.INFO.{dlq}",
                             f"$JS.API.STREAM.INFO.{events}"]))
        .add(read_messages(instances)).add(read_messages(out)).add(read_messages(dlq)).add(read_messages(events)),
        # integration: its own consumers on the events stream or the change feed, or a plain subscription to the
        # event subjects
        "admin": Grants(publish=[">"], subscribe=[">"]),
        "integration": Grants(subscribe=[f"{subjects.STORED_PREFIX}.>", f"{subjects.REJECTED_PREFIX}.>",
                                         "dicom.study.>", "dicom.forward.>", f"{subjects.DELETED_PREFIX}.>"])
        .add(Grants(subscribe=["_INBOX.>"]))
        .add(consume(events)).add(consume(names["changes"])).add(read_messages(names["changes"])),
    }


def password_variable(role: str) -> str:
    """The nats-server environment variable holding ``role``'s password."""
    return f"DICOMFLOW_NATS_{role.upper()}_PASSWORD"


def _list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in items) + "]"


def authorization_block(config: Config) -> str:
    """The nats-server ``authorization { users = [...] }`` block: one user per role, named after it, its
    password from the server's environment, its permissions from :func:`grants`."""
    lines = ["# Generated by `dicomflow nats-permissions` (shared/bus/permissions.py): one user per service,",
             "# each allowed only the subjects it needs; passwords from the server's environment.",
             "authorization {", "  users = ["]
    for role, g in grants(config).items():
        lines += [f"    {{user: {role}, password: ${password_variable(role)}, permissions: {{",
                  f"      publish: {{allow: {_list(g.publish)}}}",
                  f"      subscribe: {{allow: {_list(g.subscribe)}}}",
                  "    }}"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"
