"""`dicomflow reindex` from the filesystem store alone: its per-study index files (torn tails, last entry wins),
and a catalogue rebuilt with every tenant, transfer syntax and calling AE after the original is lost."""

from __future__ import annotations

import json

import pytest

from dicomflow.synthetic import write_study
from shared.storage.fs_study_index import FileStudyIndex, decode_records, encode_records
from tests.helpers import wait_for


def test_index_files_keep_the_last_value_and_survive_a_torn_tail(tmp_path):
    index = FileStudyIndex(tmp_path / "index")
    assert index.omap_set_many([("dicomflow.study.1.2", {"a": b"1", "b": b"2"}),
                                ("dicomflow.study.1.3", {"c": b"3"})]) == [None, None]
    assert index.omap_set_many([("dicomflow.study.1.2", {"a": b"one"})]) == [None]
    assert index.omap_get("dicomflow.study.1.2") == {"a": b"one", "b": b"2"}
    assert sorted(index.object_names("dicomflow.study.")) == ["dicomflow.study.1.2", "dicomflow.study.1.3"]
    assert index.omap_get("dicomflow.study.9.9") == {}
    path = tmp_path / "index" / "dicomflow.study.1.3"
    whole = path.read_bytes()
    path.write_bytes(whole + encode_records({"d": b"4"})[:-3])  # a crash inside the last append
    assert index.omap_get("dicomflow.study.1.3") == {"c": b"3"}
    flipped = bytearray(whole)
    flipped[-6] ^= 0xFF
    assert decode_records(bytes(flipped)) == {}  # a record that fails its CRC is not taken
    [err] = index.omap_set_many([("../escape", {"x": b"y"})])
    assert isinstance(err, ValueError) and not (tmp_path / "escape").exists()
    with pytest.raises(ValueError):
        index.omap_get("/etc/passwd")


def test_reindex_rebuilds_the_catalogue_from_the_filesystem_store(stack_factory, tmp_path):
    stack = stack_factory(access={"default_tenant": None,
                                  "tenants": {"a": {"aes": ["CT_A"]}, "b": {"aes": ["CT_B"]}}})
    study_a, _ = write_study(tmp_path / "a", 4, series=2)
    assert stack.storescu(tmp_path / "a", calling_ae="CT_A").returncode == 0
    assert stack.storescu(tmp_path / "a", calling_ae="CT_B").returncode == 0  # the same UIDs, another tenant
    study_b, _ = write_study(tmp_path / "b", 3)
    assert stack.storescu(tmp_path / "b", calling_ae="CT_B").returncode == 0
    wait_for(lambda: sum(s["instances"] for s in stack.studies()) == 11, 60, what="11 instances catalogued")
    before = stack.studies()
    instances_before = json.loads(stack.cli("study", study_a, "--tenant", "b", "--json").stdout)
    assert instances_before["studies"][0]["instances"] == 4 and len(instances_before["series"]) == 2
    stack.stop()

    catalogue = stack.data_dir / "catalogue.sqlite"
    for suffix in ("", "-wal", "-shm"):
        catalogue.with_name(catalogue.name + suffix).unlink(missing_ok=True)
    res = stack.cli("reindex", "--json")
    counts = json.loads(res.stdout)
    assert counts["instances"] == 11 and counts["studies"] == 2, counts

    def key(rows):
        return sorted((s["tenant"], s["study_uid"], s["instances"], s["series"]) for s in rows)
    assert key(stack.studies()) == key(before)
    assert json.loads(stack.cli("study", study_a, "--tenant", "b", "--json").stdout) == instances_before
