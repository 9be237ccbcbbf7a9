"""Which tenant and placement policy an instance follows. Pure: configuration and the event in, names out."""

from __future__ import annotations

from shared.config import AccessConfig, Config, StorageConfig
from shared.contract.events import InstanceReceived
from shared.tenancy import tenant_of_instance


def tenant_of_event(access: AccessConfig, event: InstanceReceived) -> str:
    """The event's tenant: as the ingest set it, or (an event of a version before tenants) derived the
    same way from its calling AE. "" when no tenant takes the AE: reachable by administrators only."""
    return event.tenant or tenant_of_instance(access, event.calling_ae, event.tags.institution_name) or ""


def choose_policy(config: Config, tenant: str, calling_ae: str, institution_name: str) -> str | None:
    """The policy for an instance: its tenant's, else by calling AE title, else by InstitutionName
    (storage.institutions), else the default.

    None means "no policy": the configuration rejects unknown institutions.
    """
    own = config.access.tenants.get(tenant)
    if own is not None and own.policy:
        return own.policy
    storage = config.storage
    by_ae = storage.institutions.get(calling_ae.strip())
    if by_ae:
        return by_ae
    by_name = storage.institutions.get(institution_name.strip()) if institution_name.strip() else None
    if by_name:
        return by_name
    return storage.default_policy


def placements_of(storage: StorageConfig, policy: str) -> list[str]:
    """The backends a policy writes to."""
    return list(storage.policies[policy].placements)
