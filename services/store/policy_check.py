"""``dicomflow policies check``: validate the placement policies against the live backends.

Each backend is probed the way the store uses it: connect, the pool exists, a small object can be
written, read back (verified) and removed by the configured user. The verdict per policy is pure.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.config import Config, StorageConfig
from shared.storage.objectstore import content_digest, open_backend


@dataclass(frozen=True)
class BackendCheck:
    """The outcome of probing one backend."""

    backend: str
    kind: str
    target: str
    ok: bool
    detail: str


def target_of(name: str, config: Config) -> str:
    """Where a backend points, for the report."""
    b = config.storage.backends[name]
    if b.kind == "rados":
        ns = f"/{b.namespace}" if b.namespace else ""
        return f"client.{b.ceph_user}@{b.ceph_conf or 'ceph.conf'}:{b.pool}{ns}"
    return b.path


def probe(name: str, config: Config) -> BackendCheck:
    """Write, read back and remove a probe object in one backend."""
    cfg = config.storage.backends[name]
    data = f"dicomflow policies check {socket.gethostname()} {os.getpid()} {time.time_ns()}".encode()
    digest = content_digest(data)
    t0 = time.perf_counter()
    try:
        store = open_backend(name, cfg, Path(config.data_dir))
    except Exception as exc:
        return BackendCheck(name, cfg.kind, target_of(name, config), False, f"cannot open: {exc}")
    try:
        store.put(digest, data, {"probe": "policies-check"})
        if store.get(digest) != data:
            raise OSError("probe object read back differently")
        store.remove(digest)
    except Exception as exc:
        return BackendCheck(name, cfg.kind, target_of(name, config), False, f"{type(exc).__name__}: {exc}")
    finally:
        store.close()
    return BackendCheck(name, cfg.kind, target_of(name, config), True,
                        f"write/read/remove ok in {(time.perf_counter() - t0) * 1000:.0f} ms")


def verdict(storage: StorageConfig, checks: dict[str, BackendCheck]) -> dict:
    """Which policies (and so which institutions) can be stored, given the backend checks. Pure."""
    policies = {}
    for name, pol in storage.policies.items():
        failing = [p for p in pol.placements if not checks[p].ok]
        policies[name] = {"placements": list(pol.placements), "ok": not failing, "failing": failing}
    institutions = {inst: {"policy": pol, "ok": policies[pol]["ok"]} for inst, pol in storage.institutions.items()}
    default = storage.default_policy
    used = {storage.staging} | {p for pol in storage.policies.values() for p in pol.placements}
    return {
        "ok": all(checks[b].ok for b in used),
        "staging": {"backend": storage.staging, "ok": checks[storage.staging].ok},
        "backends": {n: asdict(c) for n, c in checks.items()},
        "policies": policies,
        "institutions": institutions,
        "default_policy": {"policy": default, "ok": policies[default]["ok"]} if default else
                          {"policy": None, "ok": True, "note": "unknown institutions are rejected"},
    }


def check(config: Config) -> dict:
    """Probe every backend that staging or a policy uses, then judge the policies."""
    storage = config.storage
    used = [storage.staging] + [p for pol in storage.policies.values() for p in pol.placements]
    checks = {name: probe(name, config) for name in dict.fromkeys(used)}
    return verdict(storage, checks)
