"""Synthetic studies for tests, benchmarks and a first try: valid CT/MR instances written with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

_ROOT = "1.2.826.0.1.3680043.10.1234."  # a test root; every generated UID is under it


def new_uid() -> str:
    """A fresh UID under the synthetic root."""
    return generate_uid(prefix=_ROOT)


def ct_instance(study_uid: str, series_uid: str, number: int, rows: int = 64, cols: int = 64,
                institution: str = "General Hospital", patient_id: str = "PAT001", series_description: str = "AXIAL",
                seed: int | None = None) -> Dataset:
    """One CT image instance with smooth noise as pixels (compressible, like a real image)."""
    rng = np.random.default_rng(seed if seed is not None else number)
    pixels = (rng.normal(1000, 50, (rows, cols)).cumsum(axis=1) % 4096).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.InstitutionName = institution
    ds.BodyPartExamined = "HEAD"
    ds.SeriesDescription = series_description
    ds.StudyDescription = "Synthetic CT"
    ds.AccessionNumber = "ACC" + study_uid[-8:]
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.StudyDate = "20261123"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def write_study(folder: Path, instances: int, rows: int = 64, cols: int = 64, series: int = 1,
                study_uid: str | None = None, **kw) -> tuple[str, list[Path]]:
    """Write a study of ``instances`` Part-10 files into ``folder``; returns (StudyInstanceUID, paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or new_uid()
    series_uids = [new_uid() for _ in range(series)]
    paths = []
    for i in range(instances):
        ds = ct_instance(study_uid, series_uids[i % series], i + 1, rows, cols, **kw)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths
