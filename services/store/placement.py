"""Which placement policy an instance follows. Pure: configuration and tags in, policy name out."""

from __future__ import annotations

from shared.config import StorageConfig


def choose_policy(storage: StorageConfig, calling_ae: str, institution_name: str) -> str | None:
    """The policy for an instance: by calling AE title, else by InstitutionName, else the default.

    None means "no policy": the configuration rejects unknown institutions.
    """
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
