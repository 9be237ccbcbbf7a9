"""The one configuration file: a typed, validated model read from YAML, then environment overrides.

Precedence (lowest first): defaults in this module, the YAML file (``--config`` or ``DICOMFLOW_CONFIG``),
environment variables ``DICOMFLOW__SECTION__KEY=value`` (value parsed as YAML, so ``4`` is an int and
``[a, b]`` a list), then command-line flags. ``DICOMFLOW_DATA_DIR`` is a shortcut for ``data_dir``.
Every field's description is the reference documentation (``dicomflow config show`` prints it all).
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from shared.contract.uids import InvalidUID, validate_uid


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SettingsOfOtherKinds(ValueError):
    """Keys of an entry that are settings of other kinds than the entry's; ``strays``: key -> its kind."""

    def __init__(self, kind: str, strays: dict[str, str]):
        self.kind, self.strays = kind, strays
        super().__init__("; ".join(f"{key!r} is a setting of kind {k}" for key, k in strays.items())
                         + f", not of kind {kind}")


@dataclass(frozen=True)
class KindDefault:
    """Metadata of a union of kinds discriminated on ``kind``: the kind of an entry that names none.

    Before the union picks the model of the entry's kind, an entry without ``kind`` gets this one, and a
    key that belongs to another kind is refused naming that kind: the models forbid unknown keys anyway,
    but "extra inputs are not permitted" would not tell that the key is right and the kind is wrong.
    """

    kind: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        models = kind_models(source)

        def check(value: Any) -> Any:
            if not isinstance(value, dict):
                return value
            value = {"kind": self.kind, **value}
            own = next((m for m in models if m.model_fields["kind"].default == value["kind"]), None)
            if own is None:
                return value  # the union names the expected kinds
            strays = {key: other.model_fields["kind"].default for key in value if key not in own.model_fields
                      for other in models if key in other.model_fields}
            if strays:
                raise SettingsOfOtherKinds(value["kind"], strays)
            return value

        return core_schema.no_info_before_validator_function(check, handler(source))


def kind_models(annotation: Any) -> tuple[type[BaseModel], ...]:
    """The models of a union of kinds (``Annotated[A | B, ...]`` or ``A | B``); () for anything else."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    if members and all(isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields for m in members):
        return members
    return ()


class NatsConfig(_Section):
    url: str = Field("", description="NATS server URL(s), comma-separated. Empty: the embedded server of `dicomflow run`.")
    port: int = Field(4222, description="Client port of the embedded nats-server (`dicomflow run`).")
    monitor_port: int = Field(8222, description="HTTP monitoring port of the embedded nats-server (/jsz, /varz); 0 disables.")
    connect_timeout_s: float = Field(5.0, description="Seconds to wait for the first connection.")
    publish_timeout_s: float = Field(5.0, description="Seconds to wait for a JetStream PubAck before answering 0xA700.")
    tls_ca: str = Field("", description="CA certificate file (PEM) the NATS server's certificate must chain to; setting it (or tls_cert, or a tls:// URL) makes every connection TLS 1.2+, the server's certificate and host name verified (without it: against the system's CAs). Never unverified.")
    tls_cert: str = Field("", description="Client certificate (PEM) for a NATS server that verifies its clients (`tls { verify: true }`).")
    tls_key: str = Field("", description="Private key (PEM) of tls_cert.")
    user: str = Field("", description="This process's NATS user (with password). Give each service its own (k8s: a Secret per Deployment, as DICOMFLOW__NATS__USER / DICOMFLOW__NATS__PASSWORD) so the server's permissions confine it (`dicomflow nats-permissions`). A refused credential stops the service at start-up naming this setting.")
    password: str = Field("", description="Password of nats.user.")
    token: str = Field("", description="NATS authorization token (instead of user/password).")
    nkey_seed_file: str = Field("", description="File holding this process's NATS nkey seed (SU...): the server's nonce is signed with it (instead of user/password).")
    creds_file: str = Field("", description="NATS credentials file (user JWT and nkey seed, as `nsc` writes it) for servers in operator mode.")

    @model_validator(mode="after")
    def _one_credential(self) -> NatsConfig:
        given = [n for n in ("user", "token", "nkey_seed_file", "creds_file") if getattr(self, n)]
        if len(given) > 1:
            raise ValueError(f"give one NATS credential, not {' and '.join(given)}")
        if self.password and not self.user:
            raise ValueError("nats.password without nats.user")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("nats.tls_cert and nats.tls_key go together")
        return self


class StreamConfig(_Section):
    name: str = Field("DICOM", description="JetStream stream that holds instance events (subjects dicom.in.*.*).")
    partitions: int = Field(64, ge=1, le=1024, description="Number of partitions. Fixed at stream creation: changing it remaps in-flight studies.")
    replicas: int = Field(1, ge=1, le=5, description="Stream replicas (3 on a NATS cluster).")
    max_age_days: float = Field(7, gt=0, description="How long instance events are kept in the stream.")
    duplicate_window_s: float = Field(600, gt=0, description="Nats-Msg-Id de-duplication window: absorbs a retried publish of one receipt or one stored event. A resend of an instance, however late, is told from a new version by the catalogue and the router, not by this window.")
    events_name: str = Field("DICOM_EVENTS", description="Stream for integration events (dicom.stored.>, dicom.study.>, dicom.forward.>).")
    events_max_age_days: float = Field(30, gt=0, description="How long integration events are kept.")


class MoveDestinationConfig(_Section):
    host: str = Field(..., description="Host of the C-MOVE destination's storage SCP.")
    port: int = Field(..., ge=1, le=65535, description="Its port.")
    tenants: list[str] = Field(default_factory=list, description="Tenants whose studies may be moved there (empty: any caller's own studies).")
    tls: bool = Field(False, description="Open the association to this destination over DICOM TLS (PS3.15 B.1, TLS 1.2+; a storescp +tls).")
    tls_ca: str = Field("", description="with tls, the CA certificate file the destination's certificate must chain to (empty: the system's CAs, /etc/ssl/certs). The certificate is always verified; its host name too unless tls_check_hostname is false.")
    tls_check_hostname: bool = Field(True, description="with tls, check that the destination's certificate names host. False for a destination whose certificate names none of its addresses (dcmtk checks none): the chain is still verified.")
    tls_cert: str = Field("", description="with tls, our client certificate (PEM) for a destination that asks for one; empty: none.")
    tls_key: str = Field("", description="with tls, the private key (PEM) of tls_cert.")

    @model_validator(mode="after")
    def _tls_pair(self) -> MoveDestinationConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if (self.tls_ca or self.tls_cert) and not self.tls:
            raise ValueError("tls_ca, tls_cert and tls_key need tls: true")
        return self


class IngestConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the DICOM SCP binds to. 0.0.0.0 for every interface.")
    port: int = Field(11112, description="DICOM port.")
    ae_title: str = Field("DICOMFLOW", max_length=16, description="Called AE title the SCP answers to.")
    engine: Literal["lean", "pynetdicom"] = Field("lean", description="DICOM protocol engine of the SCP. lean: dicomflow's own upper layer for C-STORE/C-ECHO, one blocking thread per association (pynetdicom's polling threads cost 3-4 ms per instance). pynetdicom: pynetdicom's acceptor, for peers that need negotiation the lean engine does not do (it accepts and ignores user identity, role selection and extended negotiation).")
    workers: int = Field(2, ge=1, le=64, description="Receiver processes sharing the port: each inherits the one listening socket of their supervisor, and a receiver with associations open waits 2 ms per association before accepting, so idle receivers take new associations first. Python receivers scale with processes, not threads: about one per core (the default suits 2 cores).")
    allowed_calling_aes: list[str] = Field(default_factory=list, description="Calling AE titles allowed to associate. Empty: any. Others are rejected at association (reason: calling AE not recognised).")
    max_instance_bytes: int = Field(4 * 1024**3, gt=0, description="Largest instance accepted; larger ones get 0xC003 and are not stored (bytes past the limit are read and dropped, not held).")
    stream_above_bytes: int = Field(256 * 1024, ge=0, description="A data set larger than this is written to the staging backend while its fragments arrive (hashed on the way, the disk's writeback started early) instead of being assembled in memory: the fsync before the answer waits for less, and a receiver holds at most this much of an instance in memory. A streamed instance skips the write-ahead log (it is fsynced with its folder), so keep it at or above the staging backend's wal_max_object_bytes. On a rados staging backend the bytes are gathered in memory either way (its chunks are named after the digest, known only at the last byte); the store streams its copies (store.stream_above_bytes).")
    max_associations: int = Field(32, ge=1, description="Concurrent associations per receiver process.")
    max_pdu: int = Field(131072, ge=0, description="Maximum PDU size we receive (bytes); 128 KiB measured 10-20% faster than 16 KiB.")
    network_timeout_s: float = Field(60, gt=0, description="Idle network timeout of an association.")
    artim_timeout_s: float = Field(10, gt=0, description="The ARTIM timer (PS3.8 9.1.5): a connection whose whole A-ASSOCIATE-RQ has not arrived this long after it opened is closed (a deadline, not an idle timeout, so a peer trickling bytes cannot hold it), and after an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT the receiver waits at most this long for the peer to close. Both engines.")
    max_connections: int = Field(64, ge=1, description="TCP connections a receiver process holds at once, associated or not (each is a thread). One more is answered A-ASSOCIATE-RJ (transient, local limit exceeded) and closed before anything of it is read, so a flood of idle connections costs no thread. Keep it at or above max_associations. Both engines (the pynetdicom engine closes one over the bound without the RJ when TLS is on: its handshake must not run in the accepting thread).")
    tls_cert: str = Field("", description="Server certificate (PEM) of DICOM over TLS (PS3.15 B.1, TLS 1.2+). Set with tls_key: the SCP accepts only TLS connections, on both engines (`storescu +tls`).")
    tls_key: str = Field("", description="Private key (PEM) of tls_cert.")
    tls_ca: str = Field("", description="With TLS: CA certificate file client certificates must chain to. Set: every client must present one (a client without is refused in the handshake), and its subject's common name must be the calling AE title or be listed in the tls_subjects of the tenant that owns the calling AE (else the association is rejected: calling AE not recognised). Empty: no client certificate is asked for.")
    move_destinations: dict[str, MoveDestinationConfig] = Field(default_factory=dict, description="C-MOVE destinations by AE title: where the AE sends the instances a C-MOVE names (an unknown destination is answered 0xA801). The caller's tenant decides which instances; a destination's tenants list limits who may send there.")
    commitment_wait_s: float = Field(60, gt=0, le=86400, description="Storage commitment (Push Model): how long after an N-ACTION the archive waits for the instances it names to be stored in every placement of their policy before it sends the N-EVENT-REPORT with the ones still missing as failures (sent at once when all are committed). The report goes on the N-ACTION's association while it is open, else on a new one to the modality's AE title as listed in ingest.move_destinations. Both engines.")
    private_sop_classes: list[str] | Literal["any"] = Field(default_factory=list, description="Storage SOP classes accepted beyond the standard ones (which are all accepted, retired ones included): a list of private SOP Class UIDs a site's modalities send (e.g. Siemens CSA Non-Image 1.3.12.2.1107.5.9.1), or any: every abstract syntax a modality proposes that is not a known non-storage SOP class is taken as storage (dcmtk storescp --promiscuous, pynetdicom's unrestricted storage service). Both engines accept the same.")
    strict_uids: bool = Field(False, description="Refuse (0xC001) a Study, Series or SOP Instance UID that breaks PS3.5 9.1 (only digits and dots, at most 64 characters, no leading zero in a component). Off: such UIDs are stored, as storescp and Orthanc store them (an anonymiser's hex digests, 65+ characters, 0123 components), and only what no encoding makes safe is refused: / * > \\ and comma (separators and wildcards), whitespace, control and non-ASCII characters, an empty value, no digit or letter, over 128 characters. Either way a UID is encoded injectively wherever it becomes a subject token, a file or object name, a key or a URL.")

    @field_validator("private_sop_classes")
    @classmethod
    def _sop_class_uids(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            return v
        try:
            return [validate_uid(uid, "private_sop_classes entry") for uid in v]
        except InvalidUID as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _tls_pair(self) -> IngestConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("ingest.tls_cert and ingest.tls_key go together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("ingest.tls_ca (client certificates) needs ingest.tls_cert and tls_key (TLS)")
        return self

    def stop_drain_s(self) -> float:
        """How long a receiver may take to stop after SIGTERM: its C-STOREs answered (10 s), then its storage
        commitment reports, each due ``commitment_wait_s`` after its N-ACTION, sent (up to 3 tries, 15 s)."""
        return 10 + self.commitment_wait_s + 15


class FsBackendConfig(_Section):
    """A directory of content-addressed files."""

    kind: Literal["fs"] = Field("fs", description="a directory")
    path: str = Field("objects", description="directory, relative to data_dir unless absolute.")
    wal_max_object_bytes: int = Field(256 * 1024, ge=0, description="objects up to this size are made durable through a write-ahead log (one fdatasync into a pre-zeroed segment, shared by concurrent writers) instead of fsyncing a new file and its folder; their files are synced by a checkpoint later and replayed from the log after a crash. 0 turns the log off.")
    wal_segment_bytes: int = Field(64 * 1024**2, ge=1024**2, le=1024**3, description="size of one write-ahead log segment (pre-zeroed once, then recycled).")
    wal_checkpoint_s: float = Field(5.0, gt=0, description="a segment older than this is checkpointed (its files synced with one syncfs) and recycled.")


class RadosBackendConfig(_Section):
    """A Ceph pool, through librados."""

    kind: Literal["rados"] = Field("rados", description="a Ceph pool through librados")
    ceph_conf: str = Field("", description="path of ceph.conf.")
    ceph_user: str = Field("admin", description="cephx user (without 'client.').")
    keyring: str = Field("", description="keyring path (empty: from ceph.conf).")
    pool: str = Field("", description="pool name.")
    namespace: str = Field("", description="RADOS namespace (empty: default).")
    op_timeout_s: float = Field(30, gt=0, description="rados_osd_op_timeout; a write to an unavailable PG fails after this instead of hanging.")
    aio_window: int = Field(64, ge=1, description="aio operations in flight per backend.")
    aio_window_bytes: int = Field(256 * 1024**2, ge=1024**2, description="bytes of writes in flight per backend "
                                  "(librados holds a copy of each until it completes); one write may exceed it alone.")
    chunk_bytes: int = Field(64 * 1024**2, ge=1024, le=90 * 1024**2, description="objects larger than this are stored as chunks plus a manifest; at most the OSDs' osd_max_write_size (90 MiB by default).")


BackendConfig = Annotated[FsBackendConfig | RadosBackendConfig, Field(discriminator="kind"), KindDefault("fs")]
"""One storage backend: the model of its ``kind``."""


class PolicyConfig(_Section):
    placements: list[str] = Field(..., min_length=1, description="Backends (names from storage.backends) every instance of this policy is written to.")


class StorageConfig(_Section):
    staging: str = Field("local", description="Backend where the ingest writes received bytes (the claim-check).")
    backends: dict[str, BackendConfig] = Field(default_factory=lambda: {"local": FsBackendConfig()}, description="Named object stores.")
    policies: dict[str, PolicyConfig] = Field(default_factory=lambda: {"default": PolicyConfig(placements=["local"])}, description="Placement policies by name.")
    institutions: dict[str, str] = Field(default_factory=dict, description="Calling AE title (or InstitutionName) -> policy name.")
    default_policy: str | None = Field("default", description="Policy for institutions not listed; null rejects them (the store dead-letters the event).")

    @model_validator(mode="after")
    def _references_exist(self) -> StorageConfig:
        if self.staging not in self.backends:
            raise ValueError(f"storage.staging names unknown backend {self.staging!r}")
        for name, pol in self.policies.items():
            for p in pol.placements:
                if p not in self.backends:
                    raise ValueError(f"policy {name!r} names unknown backend {p!r}")
        for inst, pol in self.institutions.items():
            if pol not in self.policies:
                raise ValueError(f"institution {inst!r} maps to unknown policy {pol!r}")
        if self.default_policy is not None and self.default_policy not in self.policies:
            raise ValueError(f"storage.default_policy {self.default_policy!r} is not a policy")
        return self


class GroupConfig(_Section):
    ack_wait_s: float = Field(10, gt=0, description="Seconds before an unacknowledged event is redelivered: after a member is killed, how long the events it held wait for their new owner. A handler that runs longer keeps its events with in-progress acknowledgements every ack_wait_s / 3, so this need not cover the longest batch. The router's is also the ack wait of its forward queues (a target's jobs held by a killed router go out again after it), kept alive the same way while a batch is read and sent.")
    pinned_timeout_s: float = Field(10, gt=0, description="PinnedTTL: a silent owner loses its partition after this. A member that left the membership without unpinning (killed) loses its pins earlier: the partition's new owner takes them two heartbeats after the member's key expired.")
    member_ttl_s: float = Field(3, gt=0, description="Membership heartbeat TTL: a crashed member is forgotten after this.")
    heartbeat_s: float = Field(1, gt=0, description="Seconds between a member's heartbeats (and its reading of the membership); below member_ttl_s.")
    elastic: bool = Field(True, description="Members share the partitions by rendezvous hashing over the live membership; false: every member pulls every partition (the pinned consumers still serialise them).")
    batch: int = Field(64, ge=1, description="Events fetched per pull.")
    linger_s: float = Field(0.02, ge=0, le=5, description="After a pull's first event, seconds to wait for more before handling them: a member keeping up with a slow sender otherwise pays a batch's fixed costs (index commit, publish round trips) per event. 0: handle what has arrived at once.")
    max_ack_pending: int = Field(1024, ge=1, description="Unacknowledged events per partition consumer.")

    @model_validator(mode="after")
    def _heartbeat_below_ttl(self) -> GroupConfig:
        if self.heartbeat_s >= self.member_ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be below member_ttl_s ({self.member_ttl_s})")
        return self


class StoreConfig(_Section):
    workers: int = Field(1, ge=1, description="Store worker processes in `dicomflow run`.")
    group: GroupConfig = Field(default_factory=GroupConfig)
    stream_above_bytes: int = Field(64 * 1024**2, ge=0, description="An instance larger than this is copied to a placement chunk by chunk (read from staging and written into the placement's writer, committed once the whole object matched its digest) instead of read whole and written with the batch: a store worker holds a few MiB of it (a RADOS placement: about one of its chunk_bytes), not the instance. Each placement reads it from staging again.")


class ScalingPolicyConfig(_Section):
    type: Literal["pods", "percent"] = Field(..., description="pods: at most `value` replicas of change per period; percent: at most `value`% of the replicas at the period's start.")
    value: int = Field(..., gt=0, description="Replicas or percent allowed per period.")
    period_s: float = Field(..., gt=0, description="Length of the sliding period, seconds.")


class ScalingRulesConfig(_Section):
    stabilization_s: float = Field(..., ge=0, description="Stabilization window: scale up to the lowest / down to the highest recommendation of this many seconds (Kubernetes HPA behavior).")
    select: Literal["max", "min", "disabled"] = Field("max", description="Which policy limit applies when several do: max (the largest change), min (the smallest), disabled (never scale this way).")
    policies: list[ScalingPolicyConfig] = Field(..., description="Rate limits of change (HPA scaling policies).")


def _default_scale_up() -> ScalingRulesConfig:
    # The Kubernetes HPA defaults: no stabilization, +4 pods or +100% per 15 s, whichever is larger.
    return ScalingRulesConfig(stabilization_s=0, policies=[ScalingPolicyConfig(type="pods", value=4, period_s=15),
                                                           ScalingPolicyConfig(type="percent", value=100, period_s=15)])


def _default_scale_down() -> ScalingRulesConfig:
    # The Kubernetes HPA defaults: 300 s stabilization, down to any count within 15 s.
    return ScalingRulesConfig(stabilization_s=300, policies=[ScalingPolicyConfig(type="percent", value=100, period_s=15)])


class AutoscaleGroupConfig(_Section):
    enabled: bool = Field(True, description="Autoscale this consumer group.")
    target_lag: int = Field(100, gt=0, description="AverageValue target: events of lag (pending + unacknowledged, over all partitions) one replica should carry. Desired = ceil(lag / target_lag).")
    tolerance: float = Field(0.1, ge=0, lt=1, description="No change while lag / (target_lag x replicas) is within 1 +- tolerance (HPA tolerance).")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(8, ge=1, description="Most replicas; never more than the stream's partitions either.")
    scale_up: ScalingRulesConfig = Field(default_factory=_default_scale_up, description="Scale-up behavior (HPA defaults).")
    scale_down: ScalingRulesConfig = Field(default_factory=_default_scale_down, description="Scale-down behavior (HPA defaults).")
    institution_floors: dict[str, int] = Field(default_factory=dict, description="Calling AE title or InstitutionName -> fewest replicas while a study of that institution is in flight.")
    k8s_kind: Literal["deployment", "statefulset"] = Field("deployment", description="kubernetes actuator: kind of the workload whose scale subresource is patched.")
    k8s_name: str = Field("", description="kubernetes actuator: name of the Deployment/StatefulSet (empty: dicomflow-<group>).")
    drain_timeout_s: float = Field(120, gt=0, description="local actuator: seconds a worker gets after SIGTERM to finish, ack and leave the group before it is killed.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleGroupConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


def _default_autoscale_groups() -> dict[str, AutoscaleGroupConfig]:
    # The router is off until its service runs; enabling it is one line of YAML.
    return {"store": AutoscaleGroupConfig(), "router": AutoscaleGroupConfig(enabled=False)}


class AutoscalerConfig(_Section):
    enabled: bool = Field(False, description="`dicomflow run`: the autoscaler (local actuator) owns the store worker processes instead of the fixed store.workers.")
    actuator: Literal["local", "kubernetes"] = Field("local", description="`dicomflow autoscaler`: local starts/stops worker processes on this machine; kubernetes patches the scale subresource of each group's workload.")
    dry_run: bool = Field(False, description="Decide, log and export the decisions, change nothing.")
    interval_s: float = Field(15, gt=0, description="Seconds between decisions (HPA sync period).")
    namespace: str = Field("", description="kubernetes actuator: namespace of the workloads (empty: the pod's own namespace).")
    groups: dict[str, AutoscaleGroupConfig] = Field(default_factory=_default_autoscale_groups, description="Scaling policy per consumer group (store, router).")


_TARGET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_TARGET_TIMEOUT = "Seconds one batch may take before the attempt counts as failed."


class DicomTargetConfig(_Section):
    """A C-STORE SCP."""

    kind: Literal["dicom"] = Field("dicom", description="a C-STORE SCP (sent with dcmtk storescu)")
    host: str = Field("127.0.0.1", description="host of the SCP.")
    port: int = Field(104, ge=1, le=65535, description="port of the SCP.")
    ae_title: str = Field("ANY-SCP", max_length=16, description="called AE title of the SCP.")
    tls: bool = Field(False, description="DICOM over TLS (storescu +tls).")
    tls_ca: str = Field("", description="with tls, the CA certificate file the peer's certificate must chain to (empty: the system's CAs, /etc/ssl/certs).")
    tls_verify: bool = Field(True, description="with tls, verify the peer's certificate (against tls_ca); false accepts any certificate (storescu -ic): an explicit opt-out, logged at start-up.")
    tls_cert: str = Field("", description="with tls, our client certificate (PEM); empty: anonymous TLS.")
    tls_key: str = Field("", description="with tls, our private key (PEM).")
    timeout_s: float = Field(60, gt=0, description=_TARGET_TIMEOUT)


class DicomwebTargetConfig(_Section):
    """A DICOMweb STOW-RS endpoint."""

    kind: Literal["dicomweb"] = Field("dicomweb", description="a STOW-RS endpoint")
    url: str = Field(..., min_length=1, description="base URL of the DICOMweb service; instances are POSTed to URL/studies.")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers (e.g. Authorization).")
    tls_ca: str = Field("", description="for an https:// URL, the CA certificate file the server's certificate must chain to (empty: the system's CAs). The certificate and host name are always verified.")
    timeout_s: float = Field(60, gt=0, description=_TARGET_TIMEOUT)


TargetConfig = Annotated[DicomTargetConfig | DicomwebTargetConfig, Field(discriminator="kind"), KindDefault("dicom")]
"""One forwarding destination: the model of its ``kind``."""


class TargetGroupConfig(_Section):
    members: dict[str, float] = Field(..., min_length=1, description="Target name -> weight (relative share of new studies).")
    on_member_down: Literal["wait", "reassign"] = Field("wait", description="A study whose gateway is down: wait and retry there (never split), or move the whole study to another member.")
    load_bound: float = Field(1.05, description="Bounded loads: a member takes a new study only while its open studies stay within this factor of its weighted share (otherwise the next member in the study's rendezvous order). 0: pure rendezvous.")

    @field_validator("load_bound")
    @classmethod
    def _bound(cls, v: float) -> float:
        if v != 0 and v < 1:
            raise ValueError("load_bound must be 0 (off) or >= 1")
        return v


class CompletionConfig(_Section):
    quiet_s: float = Field(60, gt=0, description="A study is complete this many seconds after its last instance.")
    required_series: list[str] = Field(default_factory=list, description="SeriesDescriptions that must all be present before the study can complete.")
    min_series: int = Field(0, ge=0, description="Number of series that must be present before the study can complete.")
    force_after_s: float = Field(0, ge=0, description="Seconds after the first instance when a study that never met its conditions is forced; 0 never.")
    force_action: Literal["process", "discard", "wait"] = Field("process", description="At force_after_s: process it incomplete, discard it (no on-complete forwards), or keep waiting.")


class ForwardConfig(_Section):
    batch: int = Field(32, ge=1, le=1000, description="Instances sent per association.")
    batch_bytes: int = Field(1024**3, ge=1024**2, description="Bytes of instances sent per association at most: a batch over it goes as several sends one after the other (an instance over it alone), so the spool needs this much disk per target (or one instance's size), not batch x the largest instance.")
    backoff_initial_s: float = Field(1, gt=0, description="First retry delay after a failed send.")
    backoff_max_s: float = Field(300, gt=0, description="Largest retry delay (the delay doubles per attempt up to this).")
    max_attempts: int = Field(20, ge=1, description="Attempts before an instance goes to the dead-letter stream (DICOM_DLQ).")
    probe_interval_s: float = Field(5, gt=0, description="How often each target's port is probed; a refused target gets no new studies.")
    calling_ae: str = Field("DICOMFLOW", max_length=16, description="Calling AE title of forwarded associations.")
    spool_dir: str = Field("", description="Where a router copies the instances it is sending (Part 10 files, removed after each send; a killed router's are removed by the next router to start on the machine). Needs room for forward.batch_bytes (or the largest instance) per target. Empty: dicomflow-forward-<uid> in the system's temporary folder (TMPDIR). Read at start.")


class RouterConfig(_Section):
    rules_file: str = Field("", description="YAML rules file. Empty: no rules (the router only tracks study completion). `dicomflow run` starts a router only when set.")
    targets: dict[str, TargetConfig] = Field(default_factory=dict, description="Destinations by name (letters, digits, - and _).")
    groups: dict[str, TargetGroupConfig] = Field(default_factory=dict, description="Target groups: study-affine load balancing over members by weighted rendezvous hashing.")
    completion: CompletionConfig = Field(default_factory=CompletionConfig)
    forward: ForwardConfig = Field(default_factory=ForwardConfig)
    group: GroupConfig = Field(default_factory=GroupConfig)
    reload_interval_s: float = Field(5, gt=0, description="How often the config and rules files are checked for changes (targets, groups and rules reload without a restart).")
    scan_interval_s: float = Field(0.5, gt=0, description="How often study states are checked for completion.")
    recent_instances: int = Field(512, ge=1, le=4096, description="Instances of a study whose version (SOP UID and digest hashes, 16 bytes each) its state remembers, so a redelivery or a resend forwards nothing and counts nothing. Beyond them (a bigger or a completed study, or a state gone) each arrival is checked against the instance's earlier events in the stream (one lookup).")
    study_ttl_days: float = Field(30, gt=0, description="How long a study's state is kept after its last change.")

    @model_validator(mode="after")
    def _names_and_references(self) -> RouterConfig:
        import re

        for name in [*self.targets, *self.groups]:
            if not re.match(_TARGET_NAME, name):
                raise ValueError(f"target/group name {name!r}: letters, digits, - and _ only")
        for name in self.groups:
            if name in self.targets:
                raise ValueError(f"{name!r} is both a target and a group")
        for gname, group in self.groups.items():
            for member, weight in group.members.items():
                if member not in self.targets:
                    raise ValueError(f"group {gname!r} names unknown target {member!r}")
                if weight <= 0:
                    raise ValueError(f"group {gname!r}: weight of {member!r} must be > 0")
        return self


class ReleaseConfig(_Section):
    enabled: bool = Field(True, description="Remove a staged object (the claim-check) once nothing needs it: every instance event naming its digest is acknowledged by the store and router groups, no forward job or dead letter names it, and it is in a placement. Does nothing while the staging backend is itself a placement of a policy (its objects are stored copies then). `dicomflow run` starts the releaser when it has something to do; elsewhere run `dicomflow releaser`.")
    interval_s: float = Field(5, gt=0, description="Seconds between two sweeps of the staging backend.")
    min_age_s: float = Field(60, gt=0, description="Grace: an object written or touched (a resend of the same bytes) less than this long before a sweep began is kept, so bytes whose event is still being published are never removed. Must exceed nats.publish_timeout_s.")


class SyslogConfig(_Section):
    host: str = Field("", description="Audit repository (syslog server) that receives every audit record as RFC 5424 over TLS (RFC 5425, as IHE ATNA). Empty: audit records are only kept in the DICOM_AUDIT stream.")
    port: int = Field(6514, ge=1, le=65535, description="Its port (6514: syslog over TLS).")
    ca: str = Field("", description="CA certificate file (PEM) the server's certificate must chain to; empty: the system's CAs. The server's name is always verified.")
    server_name: str = Field("", description="Name the server's certificate must carry (empty: host).")
    cert: str = Field("", description="Our client certificate (PEM), for a repository that requires mutual TLS (ATNA does); empty: none.")
    key: str = Field("", description="Its private key (PEM).")
    app_name: str = Field("dicomflow", max_length=48, description="APP-NAME of the syslog messages.")
    timeout_s: float = Field(5.0, gt=0, description="Seconds to connect or send before the record is counted as not forwarded (dicomflow_audit_syslog_total{result=\"failed\"}); after a failure the repository is tried again after 1 s, doubling up to 30 s, and records meanwhile are counted as not forwarded (they stay in DICOM_AUDIT).")


class AuditConfig(_Section):
    enabled: bool = Field(True, description="Record audit messages (PS3.15 A.5: associations with what they stored, queries, retrievals, exports, DLQ replays, authentication failures, service starts) into the DICOM_AUDIT stream. Recording never blocks or fails a DICOM or HTTP request: records beyond `queue` are dropped and counted (dicomflow_audit_records_total{result=\"dropped\"}).")
    max_age_days: float = Field(2192, gt=0, description="How long audit records are kept in the DICOM_AUDIT stream (default 6 years).")
    queue: int = Field(10000, ge=1, description="Audit records a process holds while NATS (or the syslog server) is slow or away; more are dropped and counted.")
    source_id: str = Field("", description="AuditSourceID of our records (empty: dicomflow@<host name>).")
    site_id: str = Field("", description="AuditEnterpriseSiteID (the hospital), empty: none.")
    syslog: SyslogConfig = Field(default_factory=SyslogConfig)


class DeletionConfig(_Section):
    web: bool = Field(True, description="Serve DICOMweb DELETE of a study, series or instance (204 when deleted, 404 when the caller's tenant has nothing there). False: 405 for DELETE, reading stays.")
    rejection_notes: bool = Field(True, description="A stored Key Object Selection Document whose title is a rejection (rejection titles of CID 7010 Key Object Selection Document Title: 113001 Rejected for Quality Reasons, 113037 Rejected for Patient Safety Reasons, 113038 Incorrect Modality Worklist Entry, 113039 Data Retention Policy Expired) deletes the instances it references, of its sender's tenant, as dcm4chee does; the note itself is kept. False: it is stored as any other instance.")
    retention_days: dict[str, float] = Field(default_factory=dict, description="Retention per tenant: tenant -> days a study is kept after its last instance was stored; `dicomflow retention` deletes older studies. A tenant not listed keeps its studies forever.")
    holds: dict[str, list[str]] = Field(default_factory=dict, description="Legal or clinical holds: tenant -> StudyInstanceUIDs that retention never deletes (an explicit delete still can).")
    retention_interval_s: float = Field(3600.0, gt=0, description="Seconds between two passes of `dicomflow retention --every` (the periodic job).")

    @field_validator("retention_days")
    @classmethod
    def _positive_days(cls, v: dict[str, float]) -> dict[str, float]:
        for tenant, days in v.items():
            if days <= 0:
                raise ValueError(f"tenant {tenant!r}: retention of {days} days; leave the tenant out to keep forever")
        return v


class TelemetryConfig(_Section):
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus /metrics endpoint.")
    metrics_port: int = Field(9400, ge=0, description="Port of /metrics; `dicomflow run` gives each process the next free one from here. 0 disables.")
    traces: Literal["none", "otlp", "console"] = Field("none", description="Trace exporter.")
    otlp_endpoint: str = Field("http://127.0.0.1:4318/v1/traces", description="OTLP/HTTP endpoint when traces=otlp.")
    log_level: str = Field("INFO", description="Python log level.")


class TenantConfig(_Section):
    aes: list[str] = Field(default_factory=list, description="Calling AE titles of this institution's modalities and systems: what they store is this tenant's, what they query is confined to it.")
    policy: str | None = Field(None, description="Placement policy of this tenant's instances (a name under storage.policies). Null: storage.institutions by AE title or InstitutionName, else storage.default_policy.")
    tls_subjects: list[str] = Field(default_factory=list, description="Common names of the client certificates (DICOM over TLS with ingest.tls_ca) that may act as this tenant's AEs. A certificate whose name is listed nowhere may act only as the AE title equal to its name.")
    api_keys_sha256: list[str] = Field(default_factory=list, description="SHA-256 (hex) of the API keys that act for this tenant over HTTP (`Authorization: Bearer <key>` or `X-API-Key: <key>`). The keys themselves are never stored: `dicomflow apikey` makes one and prints its hash.")

    @field_validator("api_keys_sha256")
    @classmethod
    def _hex_digests(cls, v: list[str]) -> list[str]:
        for digest in v:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"{digest[:12]!r}... is not a SHA-256 hex digest (64 hex digits)")
        return [d.lower() for d in v]


class JwtConfig(_Section):
    issuer: str = Field("", description="Issuer (iss) of accepted bearer JWTs, e.g. a Keycloak realm URL. Empty: JWTs are not accepted.")
    jwks_url: str = Field("", description="Where the issuer's signing keys are (JWKS), e.g. <realm>/protocol/openid-connect/certs.")
    audience: str = Field("", description="Required audience (aud); empty: not checked.")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], description="Accepted signature algorithms (never 'none').")
    tenant_claim: str = Field("tenant", description="Claim that names the caller's tenant (dotted path for nested claims).")
    roles_claim: str = Field("realm_access.roles", description="Claim that lists the caller's roles (Keycloak: realm_access.roles).")
    admin_role: str = Field("dicomflow-admin", description="Role that makes the caller an administrator (every tenant).")


class AccessConfig(_Section):
    tenants: dict[str, TenantConfig] = Field(default_factory=dict, description="Institutions by tenant name: their AEs, credentials and placement policy. A tenant's data is reachable only by that tenant and administrators.")
    default_tenant: str | None = Field("default", description="Tenant of a calling AE that no tenant lists. Null: such associations are rejected (calling AE not recognised).")
    gateways: dict[str, dict[str, str]] = Field(default_factory=dict, description="Trusted gateways that forward for several institutions: calling AE -> {InstitutionName: tenant}. Only for these AEs does the data set's InstitutionName pick the tenant (an unlisted name: the AE's own tenant, else default_tenant).")
    admin_api_keys_sha256: list[str] = Field(default_factory=list, description="SHA-256 (hex) of API keys that act as administrator (every tenant).")
    anonymous_tenant: str | None = Field("default", description="Tenant of an HTTP request without credentials. The embedded default answers such requests on loopback as the default tenant; set null where the HTTP service is reachable from a network, so that every request needs an API key or a JWT (401 otherwise).")
    jwt: JwtConfig = Field(default_factory=JwtConfig)

    @model_validator(mode="after")
    def _aes_once(self) -> AccessConfig:
        owner: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for ae in tenant.aes:
                if ae in owner and owner[ae] != name:
                    raise ValueError(f"calling AE {ae!r} is listed by tenants {owner[ae]!r} and {name!r}")
                owner[ae] = name
        for digest in self.admin_api_keys_sha256:
            if len(digest) != 64:
                raise ValueError("admin_api_keys_sha256: every entry is a SHA-256 hex digest (64 hex digits)")
        return self


class CatalogueConfig(_Section):
    url: str = Field("", description="The catalogue database. Empty: SQLite at <data_dir>/catalogue.sqlite (the embedded default; one machine). postgresql://user:password@host:port/db for a deployment with more than one store replica or query service: they all share it.")


class WebConfig(_Section):
    host: str = Field("127.0.0.1", description="Address of the DICOMweb HTTP service (QIDO-RS, metadata). 0.0.0.0 for every interface (then set access.anonymous_tenant: null).")
    port: int = Field(8043, ge=0, le=65535, description="Port of the DICOMweb HTTP service; `dicomflow run` starts it there. 0: not started by `dicomflow run`.")
    path_prefix: str = Field("/dicom-web", description="Path under which the DICOMweb resources are served (/dicom-web/studies, ...).")
    public_url: str = Field("", description="Base URL clients reach the service at, for RetrieveURL and BulkDataURI (behind a proxy or an ingress). Empty: taken from each request's Host header.")
    max_results: int = Field(1000, ge=1, description="Most results one query returns; a larger or missing limit is cut to it with a Warning header.")
    max_offset: int = Field(1_000_000, ge=0, description="Largest offset a query may ask for (400 above).")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call the service from a browser (a viewer such as OHIF served elsewhere); '*' for any.")
    threads: int = Field(8, ge=1, le=256, description="Catalogue connections (and threads) per HTTP service process.")
    stow: bool = Field(True, description="Serve STOW-RS (POST /studies) through the same intake as the DICOM SCP: staged, published to NATS and acknowledged before the answer. false: the service is read-only (405 on POST).")
    render_max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest object (data set bytes) the rendered, thumbnail and WADO-URI image resources decode; a larger one is refused with 413 (it would be read whole into memory).")
    tls_cert: str = Field("", description="Server certificate (PEM) for HTTPS. Set with tls_key: the DICOMweb service speaks only HTTPS (TLS 1.2+), and the RetrieveURLs it writes are https://.")
    tls_key: str = Field("", description="Private key (PEM) of tls_cert.")
    replicas: int = Field(1, ge=1, le=64, description="`dicomflow run`: DICOMweb processes sharing the one port (stateless; each has its own /metrics at telemetry.metrics_port + 80 + N). Elsewhere scale the `dicomflow web` deployment instead.")
    drain_s: float = Field(20.0, ge=0, le=3600, description="On SIGTERM a DICOMweb process stops accepting and waits this long for the requests in flight (a long WADO-RS stream) to finish before it cancels them and exits. Keep a deployment's grace period above preStop + this.")

    @model_validator(mode="after")
    def _tls_pair(self) -> WebConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("web.tls_cert and web.tls_key go together")
        return self


class ChangeFeedConfig(_Section):
    max_age_days: float = Field(3650, gt=0, description="How long the change feed (the DICOM_CHANGES stream: every instance stored, replaced or deleted and every study completed or updated, with its sequence) is kept; older entries age out, and a cursor before the first kept sequence starts at it. Keep it at or above the longest time an integration may be away. The feed is filled from the events stream, which needs to keep an event only until it is copied (seconds).")
    max_limit: int = Field(200, ge=1, le=10000, description="Most entries one GET /changefeed page returns (a larger limit is refused with 400, as the Microsoft DICOM service does); the default page is 100 or this, whichever is smaller.")


class Config(_Section):
    data_dir: str = Field("var", description="Where the embedded default keeps NATS data, objects and the index.")
    nats: NatsConfig = Field(default_factory=NatsConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    autoscaler: AutoscalerConfig = Field(default_factory=AutoscalerConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    access: AccessConfig = Field(default_factory=AccessConfig)
    catalogue: CatalogueConfig = Field(default_factory=CatalogueConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    changefeed: ChangeFeedConfig = Field(default_factory=ChangeFeedConfig)
    deletion: DeletionConfig = Field(default_factory=DeletionConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)

    @model_validator(mode="after")
    def _release_grace(self) -> Config:
        if self.release.min_age_s <= self.nats.publish_timeout_s:
            raise ValueError(f"release.min_age_s ({self.release.min_age_s:g}) must exceed nats.publish_timeout_s "
                             f"({self.nats.publish_timeout_s:g}): an event still being published needs its bytes")
        return self

    @field_validator("data_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v:
            raise ValueError("data_dir must not be empty")
        return v

    def data_path(self, *parts: str) -> Path:
        """A path under data_dir (absolute parts are kept as they are)."""
        return Path(self.data_dir).joinpath(*parts)

    def nats_servers(self) -> list[str]:
        """The NATS URLs to connect to."""
        if self.nats.url:
            return [u.strip() for u in self.nats.url.split(",") if u.strip()]
        return [f"nats://127.0.0.1:{self.nats.port}"]


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at ``path`` (section names, then the key) in a configuration tree, making sections."""
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {'.'.join(path)}: {key} is not a section")
    node[path[-1]] = value


def env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """The nested overrides that ``DICOMFLOW__A__B=value`` variables describe."""
    tree: dict[str, Any] = {}
    if environ.get("DICOMFLOW_DATA_DIR"):
        tree["data_dir"] = environ["DICOMFLOW_DATA_DIR"]
    for key, raw in environ.items():
        if key.startswith("DICOMFLOW__"):
            path = [p.lower() for p in key[len("DICOMFLOW__"):].split("__") if p]
            if path:
                set_path(tree, path, yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Read the YAML file (if any), apply environment and explicit overrides, validate.

    Raises :class:`ConfigError` naming the field, its line in the file (when it comes from there) and the reason.
    """
    env = dict(os.environ if environ is None else environ)
    path = path or env.get("DICOMFLOW_CONFIG") or None
    tree: dict[str, Any] = {}
    nodes: yaml.Node | None = None
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text) or {}
            nodes = yaml.compose(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    over = _merge(env_overrides(env), overrides or {})
    tree = _merge(tree, over)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{path or 'configuration'} is invalid:"]
        for err in exc.errors():
            keys = _keys_of(err["loc"], tree)
            cause = err.get("ctx", {}).get("error") if err["type"] == "value_error" else None
            if isinstance(cause, SettingsOfOtherKinds):  # one line per stray key, where it is
                found = [([*keys, key], f"a setting of kind {kind}, not of kind {cause.kind}")
                         for key, kind in cause.strays.items()]
            else:
                found = [(keys, str(cause) if cause is not None else err["msg"])]
            for where, msg in found:
                line = None if _overridden(over, where) else _line_of(nodes, where)
                name = ".".join(map(str, where)) or "(top level)"
                lines.append(f"  {path}:{line}: {name}: {msg}" if line else f"  {name}: {msg}")
        raise ConfigError("\n".join(lines)) from exc


def _kind_tags(model: type[BaseModel] = Config) -> set[str]:
    """Every kind of every union of kinds under ``model``: pydantic puts the kind into an error's location."""
    tags: set[str] = set()
    for field in model.model_fields.values():
        for ann in (field.annotation, _value_of_mapping(field.annotation)):
            tags |= {m.model_fields["kind"].default for m in kind_models(ann)}
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                tags |= _kind_tags(ann)
    return tags


def _keys_of(loc: tuple[int | str, ...], tree: Any) -> list[int | str]:
    """The keys in the configuration of an error's location: ``loc`` without the kind tags."""
    tags, keys, node = _kind_tags(), [], tree
    for part in loc:
        if isinstance(node, dict) and part not in node and part in tags and node.get("kind", part) == part:
            continue
        keys.append(part)
        node = node.get(part) if isinstance(node, dict) else node[part] if isinstance(node, list) and \
            isinstance(part, int) and part < len(node) else None
    return keys


def _overridden(over: dict[str, Any], keys: list[int | str]) -> bool:
    """Whether the value at ``keys`` came from the environment or the flags, not the file."""
    node: Any = over
    for key in keys:
        if not isinstance(node, dict):
            return True
        if key not in node:
            return False
        node = node[key]
    return bool(keys) and not isinstance(node, dict)


def _line_of(node: yaml.Node | None, keys: list[int | str]) -> int | None:
    """The (1-based) line of the deepest of ``keys`` the YAML file has (None for the top level)."""
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)),
                         None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _value_of_mapping(ann: object) -> Any:
    """The value annotation of a ``dict[str, X]`` annotation (also inside ``| None``), else None."""
    for candidate in (ann, *typing.get_args(ann)):
        if typing.get_origin(candidate) is dict:
            return typing.get_args(candidate)[1]
    return None


def _kind_default(ann: Any) -> str:
    return next(m.kind for m in typing.get_args(ann)[1:] if isinstance(m, KindDefault))


def _describe_kinds(ann: Any, prefix: str) -> list[tuple[str, str, str]]:
    """The rows of a union of kinds: ``kind``, the settings every kind has, then each kind's own."""
    models = kind_models(ann)
    kinds = [m.model_fields["kind"].default for m in models]
    rows = [(f"{prefix}kind", _kind_default(ann),
             "; ".join(f"{k}: {m.model_fields['kind'].description}" for k, m in zip(kinds, models, strict=True)) + ".")]
    shared = [n for n in models[0].model_fields if n != "kind" and all(
        n in m.model_fields and m.model_fields[n].description == models[0].model_fields[n].description
        for m in models)]
    rows.extend(r for r in describe(models[0], prefix) if r[0].removeprefix(prefix) in shared)
    for kind, model in zip(kinds, models, strict=True):
        rows.extend((key, default, f"{kind}: {doc}") for key, default, doc in describe(model, prefix)
                    if key.removeprefix(prefix) not in ("kind", *shared))
    return rows


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every setting: the configuration reference.

    A mapping of named sections (``dict[str, Model]``, e.g. storage backends or router targets) is
    listed once itself and then with ``<name>`` standing for each key; an entry that is one of several
    kinds lists its ``kind``, the settings of every kind, then those of each kind, marked with it.
    """
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, key + "."))
            continue
        value = _value_of_mapping(ann)
        sectioned = kind_models(value) or (isinstance(value, type) and issubclass(value, BaseModel))
        if field.is_required():
            shown = "(required)"
        elif sectioned:
            # Each entry is described field by field below; here only which entries exist by default.
            shown = "{" + ", ".join(field.get_default(call_default_factory=True) or {}) + "}"
        else:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump()
            elif isinstance(default, dict):
                default = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in default.items()}
            shown = yaml.safe_dump(default, default_flow_style=True, width=10**6).strip().removesuffix("\n...")
        rows.append((key, shown, field.description or ""))
        if kind_models(value):
            rows.extend(_describe_kinds(value, f"{key}.<name>."))
        elif sectioned:
            rows.extend(describe(value, f"{key}.<name>."))
    return rows
