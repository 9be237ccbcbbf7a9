"""UID validation, subject tokens and the partition function, checked against a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest

from shared.bus.connection import ensure_streams
from shared.bus.jetstream import api
from shared.bus.partitioning import fnv1a_32, partition_of
from shared.config import load_config
from shared.contract import subjects
from shared.contract.uids import InvalidUID, token_uid, uid_token, validate_uid


@pytest.mark.parametrize("bad", [None, "", "1.2.", ".1.2", "1..2", "1.2.3/../x", "1.2.*", "1.2.>", "1 2", "1.2.a",
                                 "1." + "2" * 70, "1.02.3"])
def test_strict_validation_wants_ps3_5_9_1(bad):
    with pytest.raises(InvalidUID) as exc:
        validate_uid(bad, "StudyInstanceUID", strict=True)
    assert "StudyInstanceUID" in str(exc.value)


@pytest.mark.parametrize("bad", [None, "", "1.2.3/../x", "1.2.*", "1.2.>", "1 2", "1.2\t3", "1.2\\3.4", "1.2\x00.3",
                                 "..", "1.2.é", "1." + "2" * 128])
def test_lenient_validation_refuses_only_what_cannot_be_made_safe(bad):
    with pytest.raises(InvalidUID) as exc:
        validate_uid(bad, "StudyInstanceUID")
    assert "StudyInstanceUID" in str(exc.value)


def test_uid_token_round_trip_and_padding():
    uid = "1.2.840.10008.5.1.4.1.1.2"
    assert uid_token(uid) == "1_2_840_10008_5_1_4_1_1_2"
    assert token_uid(uid_token(uid)) == uid
    assert validate_uid("1.2.3\x00") == "1.2.3"  # DICOM pads UIDs with NUL to even length
    with pytest.raises(InvalidUID):
        uid_token("1.2.*")


def test_subjects_never_carry_wildcards():
    assert subjects.instance_in("1.2.3", "1.2.3.4") == "dicom.in.1_2_3.1_2_3_4"
    for bad in ("1.*", "1.>", "1 2"):
        with pytest.raises(InvalidUID):
            subjects.instance_in(bad, "1.2")


def test_fnv1a_known_vectors():
    # Published FNV-1a 32-bit test vectors.
    assert fnv1a_32(b"") == 0x811C9DC5
    assert fnv1a_32(b"a") == 0xE40C292C
    assert fnv1a_32(b"foobar") == 0xBF9CF968


def test_partition_function_matches_the_server(tmp_path, nats_server):
    config = load_config(overrides={"data_dir": str(tmp_path), "nats": {"url": nats_server.url},
                                    "stream": {"partitions": 16}}, environ={})

    async def go():
        nc = await nats.connect(nats_server.url)
        await ensure_streams(nc, config)
        js = nc.jetstream()
        studies = [f"1.2.826.0.1.{i}.{i * 7919}" for i in range(40)]
        for s in studies:
            await js.publish(subjects.instance_in(s, s + ".1"), b"{}")
        info = await api(nc, "STREAM.INFO.DICOM", {"subjects_filter": ">"})
        await nc.close()
        return studies, info["state"]["subjects"]

    studies, stored = asyncio.run(go())
    assert len(stored) == 40
    for s in studies:
        p = partition_of(s, 16)
        assert f"dicom.part.{p}.{uid_token(s)}.{uid_token(s + '.1')}" in stored
    assert len({partition_of(s, 16) for s in studies}) > 8  # spread, not all on one partition


def test_changing_partition_count_is_refused(tmp_path, nats_server):
    async def go():
        nc = await nats.connect(nats_server.url)
        try:
            base = {"data_dir": str(tmp_path), "nats": {"url": nats_server.url}}
            await ensure_streams(nc, load_config(overrides={**base, "stream": {"partitions": 8}}, environ={}))
            await ensure_streams(nc, load_config(overrides={**base, "stream": {"partitions": 8}}, environ={}))
            with pytest.raises(RuntimeError, match="remap in-flight studies"):
                await ensure_streams(nc, load_config(overrides={**base, "stream": {"partitions": 16}}, environ={}))
        finally:
            await nc.close()

    asyncio.run(go())
