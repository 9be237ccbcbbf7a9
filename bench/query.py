"""Catalogue and QIDO-RS/metadata latency at scale, and dicomflow against Orthanc 1.10 + DICOMweb on a subset.

A synthetic catalogue (``--instances``, 50 per study: 5 series x 10 instances; realistic names, some
non-ASCII, ~8 years of dates, CT/MR/CR/US with an SR series now and then, accession numbers,
descriptions) plus one study with a 2,000-instance series is loaded through the store's own path:
pydicom data sets encoded, ``json_model`` -> ``entry_from_model`` -> ``SqlCatalogue.record_batch`` in
batches of 256, into each backend (a SQLite file; PostgreSQL from ``tests/pg_cluster.PgCluster``).
The load rate printed is the store's catalogue write rate.

Then, per backend, through the real HTTP service (a ``dicomflow web`` subprocess; the client is this
process): p50/p95 of a study search by PatientName prefix, by StudyDate range + ModalitiesInStudy, by
AccessionNumber; the series of one study; the instances of the 2,000-instance series; that series'
metadata; and the catalogue call alone for the three study searches.

The first ``--subset`` instances (and the big series) are also written as Part-10 files, sent with
``storescu`` into a fresh Orthanc (Debian 1.10 + libOrthancDicomWeb, default configuration), and
loaded into a second catalogue of each backend: the same queries run against both, plus a QIDO
throughput phase (``--clients`` threads for ``--seconds``), and the ratios are reported.
A fixed set of requests is first sent to both, and any request on which they return different numbers of
results is logged and counted (``disagreements_with_orthanc``): a ratio over different answers means nothing.

As root it re-runs itself in a private network namespace (Orthanc cannot bind to loopback only).
The last line is one JSON object.

    .venv/bin/python bench/query.py [--instances 1000000] [--subset 50000] [--backends sqlite,postgresql]
                                    [--skip-orthanc] [--queries 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from pydicom import dcmwrite  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from bench._support import ORTHANC_PLUGIN, ensure_netns, log, orthanc_config, stop_group  # noqa: E402
from dicomflow.natsserver import free_port, wait_port  # noqa: E402
from shared.catalogue.entry import InstanceFacts, entry_from_model  # noqa: E402
from shared.catalogue.open import open_catalogue  # noqa: E402
from shared.catalogue.query import STUDY, parse_qido  # noqa: E402
from shared.dicom.json_model import json_model  # noqa: E402

TENANT = "default"  # the anonymous tenant on loopback: the client sends no credentials
BATCH = 256
PER_SERIES, SERIES_PER_STUDY = 10, 5
BIG_SERIES = 2000
FAMILY = ["Smith", "Müller", "García", "Nguyễn", "Kowalski", "Øberg", "Johnson", "Dubois", "Rossi", "Yılmaz",
          "Schmidt", "Fernández", "Brown", "Novák", "Jensen", "Lefèvre", "Williams", "Papadopoulos", "Taylor",
          "Ångström", "Martin", "Silva", "Wilson", "Kim", "Anderson", "Moreau", "Thomas", "Jackson", "White",
          "Harris", "Clark", "Lewis", "Walker", "Hall", "Allen", "Young", "King", "Wright", "Scott", "Green"]
GIVEN = ["John", "Mary", "Jürgen", "Ana", "Minh", "Zofia", "Åsa", "Pierre", "Giulia", "Emre", "Anna", "José",
         "Liam", "Eva", "Lars", "Chloé", "Noah", "Eleni", "Olivia", "Björn"]
MODALITIES = {"CT": ("1.2.840.10008.5.1.4.1.1.2", ["CHEST", "HEAD", "ABDOMEN"], "CT {} with contrast"),
              "MR": ("1.2.840.10008.5.1.4.1.1.4", ["BRAIN", "KNEE", "SPINE"], "MR {} T1/T2"),
              "CR": ("1.2.840.10008.5.1.4.1.1.1", ["CHEST", "HAND"], "XR {} 2 views"),
              "US": ("1.2.840.10008.5.1.4.1.1.6.1", ["ABDOMEN", "PELVIS"], "US {}")}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"
# Orthanc 1.10's DICOMweb plugin does not percent-decode QIDO values: "PatientName=Mor%2A" or "M%C3%BCl*" match
# nothing (measured), so "*" and "^" go unescaped and the name searches use the names' ASCII prefixes.
QUERY_SAFE = "*^"
ASCII_PREFIXES = sorted({name[:3] for name in FAMILY if name[:3].isascii()})
DAY0 = np.datetime64("2018-01-01")
DAYS = 8 * 365




# -- the synthetic data set ----------------------------------------------------------------------

def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.10.1234.77." + ".".join(str(p) for p in parts)


def study_facts(index: int) -> dict:
    """The patient/study attributes of study ``index`` (deterministic)."""
    rng = random.Random(index)
    modality = rng.choice(list(MODALITIES))
    day = DAY0 + np.timedelta64(rng.randrange(DAYS), "D")
    pid = f"P{rng.randrange(index // 3 + 1):07d}"  # some patients have several studies
    # A patient's name, sex and birth date follow from the patient, not the study: Orthanc keeps one name per
    # PatientID (the first stored), so a PatientID under two names would make the two servers' answers differ.
    person = random.Random(f"patient-{pid}")
    return {"index": index, "uid": uid(index), "modality": modality, "body": rng.choice(MODALITIES[modality][1]),
            "name": f"{person.choice(FAMILY)}^{person.choice(GIVEN)}", "pid": pid,
            "birth": f"19{person.randrange(30, 100):02d}{person.randrange(1, 13):02d}{person.randrange(1, 29):02d}",
            "date": str(day).replace("-", ""), "time": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}00",
            "accession": f"A{index:09d}", "sex": person.choice("MF"), "sr": rng.random() < 0.2}


def instance(facts: dict, series: int, number: int, modality: str | None = None) -> Dataset:
    """One instance of a study (tiny pixels: the catalogue keeps no bulk data, Orthanc stores the file)."""
    modality = modality or ("SR" if facts["sr"] and series == SERIES_PER_STUDY else facts["modality"])
    ds = Dataset()
    sop_class = SR_CLASS if modality == "SR" else MODALITIES[modality][0]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid(facts["index"], series, number)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = facts["uid"]
    ds.SeriesInstanceUID = uid(facts["index"], series)
    ds.StudyDate, ds.StudyTime, ds.SeriesDate = facts["date"], facts["time"], facts["date"]
    ds.AccessionNumber = facts["accession"]
    ds.Modality = modality
    ds.InstitutionName = "General Hospital"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StudyDescription = MODALITIES[facts["modality"]][2].format(facts["body"])
    ds.SeriesDescription = "Report" if modality == "SR" else f"{facts['body']} series {series}"
    ds.PatientName, ds.PatientID, ds.PatientSex = facts["name"], facts["pid"], facts["sex"]
    ds.PatientBirthDate = facts["birth"]
    ds.StudyID = str(facts["index"] % 100000)
    ds.BodyPartExamined = facts["body"]
    ds.SeriesNumber, ds.InstanceNumber = series, number
    if modality != "SR":
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.ImagePositionPatient = [0, 0, number * 1.25]
        ds.PixelData = bytes(32)
    return ds


def generate(instances: int, subset: int):
    """Batches of (dataset, in_subset): the big-series study first, then the studies of 50 instances."""
    big = study_facts(0)
    big["sr"] = False
    batch: list[tuple[Dataset, bool]] = []
    for n in range(1, BIG_SERIES + 1):
        batch.append((instance(big, 1, n, "CT"), True))
        if len(batch) == BATCH:
            yield batch
            batch = []
    produced = 0
    index = 1
    while produced < instances:
        facts = study_facts(index)
        for s in range(1, SERIES_PER_STUDY + 1):
            for n in range(1, PER_SERIES + 1):
                batch.append((instance(facts, s, n), produced < subset))
                produced += 1
                if len(batch) == BATCH:
                    yield batch
                    batch = []
        index += 1
    if batch:
        yield batch


def encode(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def entry(ds: Dataset, raw: bytes):
    facts = InstanceFacts(tenant=TENANT, transfer_syntax_uid=ExplicitVRLittleEndian, digest=f"d{ds.SOPInstanceUID}",
                          size=len(raw), policy="default", placements=("local",), calling_ae="BENCH",
                          received_at="2026-12-02T10:00:00+00:00", stored_at="2026-12-02T10:00:01+00:00")
    return entry_from_model(json_model(raw, ExplicitVRLittleEndian), facts)


# -- servers -------------------------------------------------------------------------------------

class Process:
    def __init__(self, argv: list[str], logfile: Path, **kw):
        self.proc = subprocess.Popen(argv, stdout=open(logfile, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, **kw)

    def stop(self) -> None:
        stop_group(self.proc)


def start_web(url: str, work: Path) -> tuple[Process, int]:
    """``dicomflow web`` over the catalogue at ``url``; returns it and its port."""
    port = free_port()
    cfg = work / f"web-{port}.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(work), "catalogue": {"url": url},
                                   "web": {"max_results": 5000}, "telemetry": {"log_level": "WARNING"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMFLOW")}
    proc = Process([sys.executable, "-m", "dicomflow", "--config", str(cfg), "web", "--web-port", str(port),
                    "--metrics-port", "0"], work / "web.log", cwd=REPO, env=env)
    wait_port("127.0.0.1", port, 60)
    return proc, port


def start_orthanc(work: Path) -> tuple[Process, int, int]:
    http_port, dicom_port = free_port(), free_port()
    conf = orthanc_config(work, http_port, dicom_port)
    proc = Process(["Orthanc", conf], work / "orthanc.log",
                   env={**os.environ, "TCP_NODELAY": "1"})
    wait_port("127.0.0.1", http_port, 60)
    wait_port("127.0.0.1", dicom_port, 60)
    return proc, http_port, dicom_port


# -- measuring -----------------------------------------------------------------------------------

def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Client:
    """Keep-alive HTTP GETs; raises on anything but 200."""

    def __init__(self, port: int, prefix: str = "/dicom-web"):
        self.port, self.prefix = port, prefix
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def get(self, path: str) -> bytes:
        self.conn.request("GET", self.prefix + path, headers={"Accept": "application/dicom+json"})
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:300]!r}")
        return body


def query_paths(studies: int, rng: random.Random) -> dict:
    """Per query kind, a function giving the next request path (random parameters over ``studies``)."""
    big = study_facts(0)

    def by_name():
        return "/studies?" + urllib.parse.urlencode({"PatientName": rng.choice(ASCII_PREFIXES) + "*", "limit": "101"},
                                                    safe=QUERY_SAFE)

    def by_date():
        day = DAY0 + np.timedelta64(rng.randrange(DAYS - 31), "D")
        low = str(day).replace("-", "")
        high = str(day + np.timedelta64(30, "D")).replace("-", "")
        return "/studies?" + urllib.parse.urlencode({"StudyDate": f"{low}-{high}",
                                                     "ModalitiesInStudy": rng.choice(list(MODALITIES)),
                                                     "limit": "101"}, safe=QUERY_SAFE)

    def by_accession():
        return "/studies?AccessionNumber=" + study_facts(rng.randrange(1, studies + 1))["accession"]

    def series_of_study():
        return f"/studies/{uid(rng.randrange(1, studies + 1))}/series"

    return {"study_by_name": by_name, "study_by_date_modality": by_date, "study_by_accession": by_accession,
            "series_of_study": series_of_study,
            "instances_of_2000_series": lambda: f"/studies/{big['uid']}/series/{uid(0, 1)}/instances",
            "series_metadata_2000": lambda: f"/studies/{big['uid']}/series/{uid(0, 1)}/metadata"}


def latencies(port: int, studies: int, queries: int, budget_s: float, seed: int = 7) -> dict:
    """p50/p95 ms per query kind, each kind ``queries`` times or until ``budget_s`` (at least 5)."""
    client = Client(port)
    out = {}
    for kind, next_path in query_paths(studies, random.Random(seed)).items():
        client.get(next_path())  # warm: connection, plan caches
        samples: list[float] = []
        started = time.monotonic()
        while len(samples) < queries and (len(samples) < 5 or time.monotonic() - started < budget_s):
            path = next_path()
            t0 = time.perf_counter()
            client.get(path)
            samples.append((time.perf_counter() - t0) * 1000)
        out[kind] = {"p50": round(pct(samples, 50), 2), "p95": round(pct(samples, 95), 2), "n": len(samples)}
    return out


def agreement_paths(studies: int) -> list[str]:
    """A fixed set of requests whose answers dicomflow and Orthanc must agree on (in number of results)."""
    paths = query_paths(studies, random.Random(99))
    return [paths[kind]() for kind in ("study_by_name", "study_by_date_modality", "study_by_accession",
                                       "series_of_study") for _ in range(5)] + [paths["instances_of_2000_series"]()]


def result_counts(port: int, paths: list[str]) -> list[int]:
    """How many results each request returns."""
    client = Client(port)
    return [len(json.loads(client.get(path))) for path in paths]


def throughput(port: int, studies: int, clients: int, seconds: float) -> float:
    """QIDO requests/s with ``clients`` threads issuing the three study searches and series-of-study in turn."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        paths = query_paths(studies, random.Random(100 + i))
        kinds = [paths[k] for k in ("study_by_name", "study_by_date_modality", "study_by_accession",
                                    "series_of_study")]
        client = Client(port)
        while time.monotonic() < stop:
            client.get(kinds[done[i] % len(kinds)]())
            done[i] += 1
    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(sum(done) / (time.monotonic() - t0), 1)


def catalogue_alone(catalogue, studies: int, queries: int) -> dict:
    """p50/p95 ms of the catalogue's search for the study queries, without HTTP."""
    paths = query_paths(studies, random.Random(11))
    out = {}
    for kind in ("study_by_name", "study_by_date_modality", "study_by_accession"):
        samples = []
        for _ in range(queries):
            params = urllib.parse.parse_qsl(paths[kind]().split("?", 1)[1])
            t0 = time.perf_counter()
            catalogue.search(parse_qido(STUDY, params), TENANT, 5000, "http://x/dicom-web")
            samples.append((time.perf_counter() - t0) * 1000)
        out[kind] = {"p50": round(pct(samples, 50), 2), "p95": round(pct(samples, 95), 2)}
    return out


# -- the run -------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1_000_000, help="instances in the large catalogue "
                    "(50 per study), besides the 2,000-instance series")
    ap.add_argument("--subset", type=int, default=50_000, help="instances (first studies) also loaded into "
                    "Orthanc and a catalogue of their own, besides the 2,000-instance series")
    ap.add_argument("--backends", default="sqlite,postgresql", help="catalogue backends, comma-separated")
    ap.add_argument("--skip-orthanc", action="store_true", help="no Orthanc comparison (and no subset)")
    ap.add_argument("--queries", type=int, default=200, help="requests per query kind")
    ap.add_argument("--budget", type=float, default=20.0, help="at most this many seconds per query kind "
                    "(after 5 requests)")
    ap.add_argument("--clients", type=int, default=4, help="client threads in the throughput phase")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each throughput phase")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - {"sqlite", "postgresql"}:
        ap.error(f"--backends: unknown {sorted(unknown)}")
    subset = 0 if args.skip_orthanc else min(args.subset, args.instances)
    if subset and not Path(ORTHANC_PLUGIN).exists():
        ap.error(f"{ORTHANC_PLUGIN} is missing: run scripts/debs.sh orthanc orthanc-dicomweb as root, "
                 "or pass --skip-orthanc")
    ensure_netns("Orthanc binds every interface")
    work = Path(tempfile.mkdtemp(prefix="dicomflow-bench-query-"))
    if os.geteuid() == 0:
        os.chmod(work, 0o755)
    procs: list[Process] = []
    pg = None
    catalogues: dict[str, object] = {}
    try:
        urls: dict[str, str] = {}
        if "postgresql" in backends:
            from tests.pg_cluster import PgCluster
            pg = PgCluster().start()
            urls["postgresql"] = pg.dsn
            if subset:
                urls["postgresql-subset"] = pg.new_database("subset")
        if "sqlite" in backends:
            urls["sqlite"] = f"sqlite:///{work}/full.sqlite"
            if subset:
                urls["sqlite-subset"] = f"sqlite:///{work}/subset.sqlite"
        catalogues = {name: open_catalogue(url, work) for name, url in urls.items()}
        files = work / "part10"
        files.mkdir()
        write_s = {name: 0.0 for name in catalogues}
        counts = {name: 0 for name in catalogues}
        t_load = time.monotonic()
        for i, batch in enumerate(generate(args.instances, subset)):
            encoded = [(ds, encode(ds), sub) for ds, sub in batch]
            entries = [entry(ds, raw) for ds, raw, _ in encoded]
            part = [e for e, (_, _, sub) in zip(entries, encoded, strict=True) if sub]
            for ds, _, sub in encoded:
                if sub:
                    dcmwrite(files / f"{ds.SOPInstanceUID}.dcm", ds, enforce_file_format=True)
            for name, cat in catalogues.items():
                chosen = part if name.endswith("-subset") else entries
                if not chosen:
                    continue
                t0 = time.perf_counter()
                cat.record_batch(chosen)
                write_s[name] += time.perf_counter() - t0
                counts[name] += len(chosen)
            if i % 100 == 0:
                log(f"batch {i}: {max(counts.values())} instances loaded ({time.monotonic() - t_load:.0f} s)")
        load = {name: {"instances": counts[name], "seconds": round(write_s[name], 1),
                       "instances_per_s": round(counts[name] / write_s[name], 1) if write_s[name] else None}
                for name in catalogues}
        log(f"load done in {time.monotonic() - t_load:.0f} s: {json.dumps(load)}")
        studies = args.instances // (PER_SERIES * SERIES_PER_STUDY)
        sub_studies = subset // (PER_SERIES * SERIES_PER_STUDY)
        results: dict[str, dict] = {}
        rates: dict[str, float] = {}
        alone: dict[str, dict] = {}
        agreement: dict[str, int] = {}
        checks: list[str] = []
        expected_counts: list[int] = []
        if subset:
            orthanc, http_port, dicom_port = start_orthanc(work / "orthanc")
            procs.append(orthanc)
            t0 = time.monotonic()
            res = subprocess.run(["storescu", "-aec", "ORTHANC", "+sd", "127.0.0.1", str(dicom_port), str(files)],
                                 env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"storescu exited {res.returncode}: {res.stderr[-2000:]}")
            stats = json.loads(Client(http_port, "").get("/statistics"))
            expected = subset + BIG_SERIES
            if stats["CountInstances"] != expected:
                raise RuntimeError(f"Orthanc holds {stats['CountInstances']} of {expected} instances")
            load["orthanc"] = {"instances": expected, "seconds": round(time.monotonic() - t0, 1),
                               "instances_per_s": round(expected / (time.monotonic() - t0), 1)}
            log(f"Orthanc loaded: {load['orthanc']}")
            checks = agreement_paths(sub_studies)
            expected_counts = result_counts(http_port, checks)
            results["orthanc"] = latencies(http_port, sub_studies, args.queries, args.budget)
            rates["orthanc"] = throughput(http_port, sub_studies, args.clients, args.seconds)
            orthanc.stop()
        for name, url in urls.items():
            web, port = start_web(url, work)
            procs.append(web)
            n = sub_studies if name.endswith("-subset") else studies
            results[name] = latencies(port, n, args.queries, args.budget)
            if name.endswith("-subset"):
                # the same answers as Orthanc's, or the comparison means nothing
                got = result_counts(port, checks)
                agreement[name] = sum(a != b for a, b in zip(got, expected_counts, strict=True))
                for path, a, b in zip(checks, got, expected_counts, strict=True):
                    if a != b:
                        log(f"{name} and Orthanc disagree on {path}: {a} and {b} results")
                rates[name] = throughput(port, n, args.clients, args.seconds)
            else:
                alone[name] = catalogue_alone(catalogues[name], n, args.queries)
            web.stop()
    finally:
        for proc in procs:
            proc.stop()
        for cat in catalogues.values():
            cat.close()
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)

    kinds = list(next(iter(results.values())))
    print(f"\n{'p50/p95 ms':<26} " + " ".join(f"{name:>20}" for name in results))
    for kind in kinds:
        print(f"{kind:<26} " + " ".join(f"{r[kind]['p50']:>9.1f}/{r[kind]['p95']:<10.1f}" for r in results.values()))
    for name, rows in alone.items():
        print(f"catalogue alone ({name}): " + ", ".join(f"{k} {v['p50']}/{v['p95']} ms" for k, v in rows.items()))
    print(f"QIDO throughput (req/s, {args.clients} clients): " + ", ".join(f"{k} {v}" for k, v in rates.items()))
    print("load (catalogue write rate): " + ", ".join(f"{k} {v['instances_per_s']} inst/s ({v['instances']} in "
                                                      f"{v['seconds']} s)" for k, v in load.items()))
    study_kinds = ("study_by_name", "study_by_date_modality", "study_by_accession")
    out: dict = {"instances": args.instances + BIG_SERIES, "subset": subset + BIG_SERIES if subset else 0,
                 "cpus": os.cpu_count(), "load": load, "latency_ms": results, "catalogue_alone_ms": alone,
                 "qido_req_per_s": rates, "disagreements_with_orthanc": agreement}
    for backend in ("postgresql", "sqlite"):
        if backend in results:
            out[f"study_search_p95_ms_{backend}"] = max(results[backend][k]["p95"] for k in study_kinds)
    for backend in backends:
        out[f"series_metadata_p95_ms_{backend}"] = results[backend]["series_metadata_2000"]["p95"]
    # the slower backend's: the goal holds for both or not at all
    out["series_metadata_p95_ms"] = max(out[f"series_metadata_p95_ms_{b}"] for b in backends) if backends else None
    if "orthanc" in results:
        o = results["orthanc"]
        for backend in backends:
            r = results[f"{backend}-subset"]
            out[f"qido_vs_orthanc_ratio_{backend}"] = round(rates[f"{backend}-subset"] / rates["orthanc"], 2)
            out[f"series_metadata_vs_orthanc_ratio_{backend}"] = round(
                o["series_metadata_2000"]["p95"] / r["series_metadata_2000"]["p95"], 2)
        out["qido_vs_orthanc_ratio"] = min(out[f"qido_vs_orthanc_ratio_{b}"] for b in backends)
        out["series_metadata_vs_orthanc_ratio"] = min(out[f"series_metadata_vs_orthanc_ratio_{b}"] for b in backends)
    else:
        out["qido_vs_orthanc_ratio"] = out["series_metadata_vs_orthanc_ratio"] = None
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
