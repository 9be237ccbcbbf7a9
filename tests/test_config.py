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


@pytest.mark.parametrize("text,needle", [
    ("storage:\n  backends:\n    local:\n      path: objects\n      pool: p\n",
     "c.yaml:5: storage.backends.local.pool: a setting of kind rados, not of kind fs"),
    ("storage:\n  backends:\n    local: {kind: rados, pool: p, path: objects}\n",
     "c.yaml:3: storage.backends.local.path: a setting of kind fs, not of kind rados"),
    ("storage:\n  backends:\n    local: {kind: s3}\n",
     "c.yaml:3: storage.backends.local: Input tag 's3' found using 'kind' does not match any of the expected tags: 'fs', 'rados'"),
    ("router:\n  targets:\n    pacs:\n      host: h\n      url: 'http://x'\n      headers: {A: b}\n",
     "c.yaml:5: router.targets.pacs.url: a setting of kind dicomweb, not of kind dicom\n"
     "  {path}:6: router.targets.pacs.headers: a setting of kind dicomweb, not of kind dicom"),
    ("router:\n  targets:\n    web: {kind: dicomweb, url: 'http://x', ae_title: X}\n",
     "c.yaml:3: router.targets.web.ae_title: a setting of kind dicom, not of kind dicomweb"),
    ("router:\n  targets:\n    web: {kind: dicomweb}\n", "c.yaml:3: router.targets.web.url: Field required"),
    ("router:\n  targets:\n    pacs:\n      port: 0\n", "c.yaml:4: router.targets.pacs.port: Input should be greater"),
])
def test_a_setting_of_another_kind_is_refused_naming_that_kind(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    assert needle.format(path=path) in str(exc.value)


def test_a_value_from_the_environment_is_not_blamed_on_a_line_of_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("ingest:\n  port: 2000\nstorage:\n  backends:\n    local: {path: objects}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={"DICOMFLOW__INGEST__PORT": "x", "DICOMFLOW__STORAGE__BACKENDS__LOCAL__POOL": "p"})
    assert "\n  ingest.port: Input should be a valid integer" in str(exc.value)
    assert "\n  storage.backends.local.pool: a setting of kind rados, not of kind fs" in str(exc.value)


def test_entries_without_kind_keep_the_old_default_kind_and_env_overrides_pick_a_kind(tmp_path):
    from shared.config import DicomTargetConfig, FsBackendConfig, RadosBackendConfig

    path = tmp_path / "c.yaml"
    path.write_text("storage:\n  backends:\n    local: {path: /srv/objects}\nrouter:\n  targets:\n    pacs: {port: 11112}\n")
    c = load_config(path, environ={"DICOMFLOW__STORAGE__BACKENDS__CEPH": "{kind: rados, pool: p}",
                                   "DICOMFLOW__STORAGE__BACKENDS__LOCAL__WAL_MAX_OBJECT_BYTES": "0"})
    local, ceph, pacs = c.storage.backends["local"], c.storage.backends["ceph"], c.router.targets["pacs"]
    assert isinstance(local, FsBackendConfig) and (local.path, local.wal_max_object_bytes) == ("/srv/objects", 0)
    assert isinstance(ceph, RadosBackendConfig) and ceph.pool == "p"
    assert isinstance(pacs, DicomTargetConfig) and pacs.port == 11112
    assert isinstance(load_config(environ={}).storage.backends["local"], FsBackendConfig)
