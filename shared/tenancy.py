"""Who is asking, and for which tenant: the access decisions, as plain functions over the configuration.

A tenant is an institution. Its identity comes from who sends or asks, never from a data set alone:
the calling AE title for DIMSE, credentials for HTTP (an API key, stored only as its SHA-256, or a
bearer JWT whose signature the HTTP service has checked). InstitutionName picks the tenant only for
an AE configured as a trusted gateway. Administrators see every tenant.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from shared.config import AccessConfig


@dataclass(frozen=True)
class Principal:
    """The caller: one tenant, or an administrator (``tenant`` None: every tenant)."""

    name: str  # for logs and audit: "apikey:<tenant>", "jwt:<subject>", "anonymous"
    tenant: str | None
    admin: bool = False

    @property
    def scope(self) -> str | None:
        """The tenant a query is confined to; None for an administrator."""
        return None if self.admin else self.tenant


def tenant_of_ae(access: AccessConfig, calling_ae: str) -> str | None:
    """The tenant whose AE list holds ``calling_ae``, else the default tenant (None: refuse the AE)."""
    ae = calling_ae.strip()
    for name, tenant in access.tenants.items():
        if ae in tenant.aes:
            return name
    return access.default_tenant


def tenant_of_instance(access: AccessConfig, calling_ae: str, institution_name: str) -> str | None:
    """The tenant of an instance sent by ``calling_ae``: the AE's, or for a trusted gateway the one its
    mapping gives the data set's InstitutionName (an unmapped name falls back to the AE's tenant)."""
    gateway = access.gateways.get(calling_ae.strip())
    if gateway:
        mapped = gateway.get(institution_name.strip())
        if mapped:
            return mapped
    return tenant_of_ae(access, calling_ae)


def certificate_may_act_as(access: AccessConfig, common_name: str, calling_ae: str) -> bool:
    """Whether a peer whose verified client certificate names ``common_name`` may associate as ``calling_ae``:
    the name is the AE title itself, or it is among the tls_subjects of the tenant whose AEs include it."""
    ae = calling_ae.strip()
    if common_name == ae:
        return True
    return any(ae in tenant.aes and common_name in tenant.tls_subjects for tenant in access.tenants.values())


def api_key_hash(key: str) -> str:
    """The SHA-256 hex digest the configuration keeps instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def principal_of_api_key(access: AccessConfig, key: str) -> Principal | None:
    """The principal an API key acts as; None for a key nobody has."""
    digest = api_key_hash(key)
    # compare_digest: the time taken does not tell an attacker how much of a digest matched
    if any(hmac.compare_digest(digest, d) for d in access.admin_api_keys_sha256):
        return Principal("apikey:admin", None, admin=True)
    for name, tenant in access.tenants.items():
        if any(hmac.compare_digest(digest, d) for d in tenant.api_keys_sha256):
            return Principal(f"apikey:{name}", name)
    return None


def _claim(claims: dict[str, Any], path: str) -> Any:
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def principal_of_claims(access: AccessConfig, claims: dict[str, Any]) -> Principal | None:
    """The principal of a verified JWT's claims: an administrator by role, else the tenant its claim
    names, if that tenant is configured (a token naming an unknown tenant is refused: None)."""
    jwt = access.jwt
    subject = str(claims.get("sub", "?"))
    roles = _claim(claims, jwt.roles_claim)
    if isinstance(roles, list) and jwt.admin_role in roles:
        return Principal(f"jwt:{subject}", None, admin=True)
    tenant = _claim(claims, jwt.tenant_claim)
    if isinstance(tenant, list) and len(tenant) == 1:
        tenant = tenant[0]
    if isinstance(tenant, str) and tenant in access.tenants:
        return Principal(f"jwt:{subject}", tenant)
    return None


def anonymous(access: AccessConfig) -> Principal | None:
    """The principal of a request without credentials; None where every request must bring some."""
    if access.anonymous_tenant is None:
        return None
    return Principal("anonymous", access.anonymous_tenant)
