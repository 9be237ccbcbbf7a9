"""The configuration file: validation with clear errors, environment overrides, the reference."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, describe, load_config


def test_defaults_are_the_embedded_default():
    c = load_config(environ={})
    assert c.ingest.port == 11112 and c.ingest.ae_title == "DICOMFLOW" and c.ingest.host == "127.0.0.1"
    assert c.stream.partitions == 64 and c.data_dir == "var"
    assert c.storage.policies["default"].placements == ["local"]


def test_yaml_then_env_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  port: 2000\n  ae_title: FROMFILE\nstream:\n  partitions: 8\n")
    c = load_config(path, environ={"DICOMFLOW__INGEST__PORT": "3000", "DICOMFLOW_DATA_DIR": "/srv/df",
                                   "DICOMFLOW__INGEST__ALLOWED_CALLING_AES": "[CT1, MR2]"})
    assert (c.ingest.port, c.ingest.ae_title, c.stream.partitions) == (3000, "FROMFILE", 8)
    assert c.data_dir == "/srv/df" and c.ingest.allowed_calling_aes == ["CT1", "MR2"]
    c = load_config(path, {"ingest": {"port": 4000}}, environ={"DICOMFLOW__INGEST__PORT": "3000"})
    assert c.ingest.port == 4000


@pytest.mark.parametrize("text,needle", [
    ("ingest:\n  prot: 1\n", "ingest.prot"),
    ("stream:\n  partitions: 0\n", "stream.partitions"),
    ("storage:\n  policies:\n    p: {placements: [nowhere]}\n", "unknown backend 'nowhere'"),
    ("storage:\n  institutions: {CT1: missing}\n", "unknown policy 'missing'"),
    ("ingest: [1, 2\n", "invalid YAML"),
    ("- a\n", "top level must be a mapping"),
])
def test_invalid_config_names_the_field_and_reason(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert needle in str(exc.value)


def test_every_setting_is_documented():
    rows = describe()
    assert len(rows) > 30
    undocumented = [key for key, _, doc in rows if not doc.strip()]
    assert undocumented == []


def test_configuration_reference_document_is_current():
    from dicomflow.docs import render
    from tests.helpers import REPO

    assert (REPO / "docs" / "configuration.md").read_text() == render(), \
        "docs/configuration.md is stale: run `.venv/bin/python -m dicomflow.docs > docs/configuration.md`"
