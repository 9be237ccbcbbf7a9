"""Who asks, for which tenant: the pure access decisions."""

from __future__ import annotations

from shared.config import AccessConfig
from shared.tenancy import (
    Principal,
    anonymous,
    api_key_hash,
    principal_of_api_key,
    principal_of_claims,
    tenant_of_ae,
    tenant_of_instance,
)

ACCESS = AccessConfig.model_validate({
    "tenants": {"north": {"aes": ["CT_N", "MR_N"], "api_keys_sha256": [api_key_hash("north-key")]},
                "south": {"aes": ["CT_S"]}},
    "gateways": {"GATEWAY": {"North Hospital": "north", "South Clinic": "south"}},
    "admin_api_keys_sha256": [api_key_hash("admin-key")],
    "default_tenant": "default", "anonymous_tenant": None})


def test_the_calling_ae_picks_the_tenant_and_institution_name_only_through_a_gateway():
    assert tenant_of_ae(ACCESS, "CT_N ") == "north"
    assert tenant_of_ae(ACCESS, "OTHER") == "default"
    assert tenant_of_ae(ACCESS.model_copy(update={"default_tenant": None}), "OTHER") is None
    # a modality cannot claim another institution by its data set
    assert tenant_of_instance(ACCESS, "CT_S", "North Hospital") == "south"
    assert tenant_of_instance(ACCESS, "GATEWAY", "North Hospital") == "north"
    assert tenant_of_instance(ACCESS, "GATEWAY", "South Clinic") == "south"
    assert tenant_of_instance(ACCESS, "GATEWAY", "Elsewhere") == "default"  # unmapped: the AE's own tenant


def test_api_keys_jwt_claims_and_anonymous():
    assert principal_of_api_key(ACCESS, "north-key") == Principal("apikey:north", "north")
    admin = principal_of_api_key(ACCESS, "admin-key")
    assert admin.admin and admin.scope is None
    assert principal_of_api_key(ACCESS, "guess") is None
    assert principal_of_claims(ACCESS, {"sub": "u", "tenant": "south"}).scope == "south"
    assert principal_of_claims(ACCESS, {"sub": "u", "tenant": ["south"]}).scope == "south"
    assert principal_of_claims(ACCESS, {"sub": "u", "tenant": "nowhere"}) is None
    assert principal_of_claims(ACCESS, {"sub": "u", "realm_access": {"roles": ["dicomflow-admin"]}}).admin
    assert anonymous(ACCESS) is None
    assert anonymous(ACCESS.model_copy(update={"anonymous_tenant": "default"})).scope == "default"


def test_an_ae_in_two_tenants_is_a_configuration_error():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="listed by tenants"):
        AccessConfig.model_validate({"tenants": {"a": {"aes": ["X"]}, "b": {"aes": ["X"]}}})
    with pytest.raises(ValidationError, match="SHA-256"):
        AccessConfig.model_validate({"tenants": {"a": {"api_keys_sha256": ["plain-key"]}}})


def test_dicomflow_apikey_prints_a_key_and_the_hash_the_configuration_keeps():
    import json
    import subprocess
    import sys

    from tests.helpers import REPO

    res = subprocess.run([sys.executable, "-m", "dicomflow", "apikey", "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    assert len(made["key"]) >= 40 and api_key_hash(made["key"]) == made["sha256"]
    access = AccessConfig.model_validate({"tenants": {"t": {"api_keys_sha256": [made["sha256"]]}}})
    assert principal_of_api_key(access, made["key"]).scope == "t"
