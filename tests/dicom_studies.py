"""Write small, valid DICOM studies and list pydicom's sample files for tests."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from pydicom import config
from pydicom.data import data_manager, get_testdata_files
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

MAX_UNSIGNED_SHORT = 65535
STUDY_DATE_TAG = 0x00080020
# Tag (7FE0,0010) PixelData as written in an Explicit VR Little Endian file:
# cutting a file here leaves valid DICOM without its pixels.
PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"


@dataclass
class Study:
    study_instance_uid: str
    sop_instance_uids: list[str]
    paths: list[Path]


def write_study(
    directory,
    *,
    study_date: str | None = "20200101",
    patient_id: str = "PAT1",
    patient_name: str = "Test^Patient",
    accession_number: str = "",
    instances: int = 3,
    series: int = 1,
    pixel_bytes: int = 1024,
    study_instance_uid: str | None = None,
) -> Study:
    """Write one Secondary Capture study as Explicit VR Little Endian files.

    `instances` is the total number of instances, spread round-robin over
    `series` series. `study_date=None` leaves the StudyDate tag out, and any
    other string is written unchanged, so malformed dates reach Orthanc as is.
    Each instance carries `pixel_bytes` random bytes of 8-bit pixel data.
    """
    if instances < series or series < 1:
        raise ValueError(
            f"invalid instances={instances}, series={series}: "
            "instances must be >= series >= 1"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_instance_uid or generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    study = Study(study_uid, [], [])
    for index in range(instances):
        dataset = _study_level(
            study_uid, study_date, patient_id, patient_name, accession_number
        )
        _add_instance_level(dataset, series_uids, index, pixel_bytes)
        path = directory / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        study.sop_instance_uids.append(dataset.SOPInstanceUID)
        study.paths.append(path)
    return study


def _study_level(study_uid, study_date, patient_id, patient_name, accession_number):
    dataset = Dataset()
    # ISO_IR 192 is UTF-8, so non-ASCII patient names survive unchanged.
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = patient_name
    dataset.PatientID = patient_id
    dataset.PatientBirthDate = ""
    dataset.PatientSex = ""
    dataset.StudyInstanceUID = study_uid
    if study_date is not None:
        # Skip pydicom's DA check so malformed dates are written unchanged.
        dataset[STUDY_DATE_TAG] = DataElement(
            STUDY_DATE_TAG, "DA", study_date, validation_mode=config.IGNORE
        )
    dataset.StudyTime = "120000"
    dataset.StudyID = "1"
    dataset.AccessionNumber = accession_number
    dataset.ReferringPhysicianName = ""
    dataset.StudyDescription = "pacs-rotate test study"
    return dataset


def _add_instance_level(dataset, series_uids, index, pixel_bytes):
    series_index = index % len(series_uids)
    dataset.SeriesInstanceUID = series_uids[series_index]
    dataset.SeriesNumber = series_index + 1
    dataset.Modality = "OT"
    dataset.ConversionType = "WSD"
    dataset.InstanceNumber = index + 1
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()

    rows, columns = _image_shape(pixel_bytes)
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows = rows
    dataset.Columns = columns
    dataset.BitsAllocated = 8
    dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = os.urandom(rows * columns)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta


def _image_shape(pixel_bytes: int) -> tuple[int, int]:
    """Return (rows, columns) whose product is `pixel_bytes` rounded up to even.

    DICOM pads odd-length values, and Rows and Columns are 16-bit (US).
    """
    total = max(2, pixel_bytes + pixel_bytes % 2)
    for columns in range(min(total, MAX_UNSIGNED_SHORT), 0, -1):
        if total % columns == 0 and total // columns <= MAX_UNSIGNED_SHORT:
            return total // columns, columns
    raise ValueError(f"pixel_bytes={pixel_bytes} does not fit a 65535 x 65535 image")


def pydicom_sample_files() -> list[Path]:
    """Return the DICOM files shipped with pydicom that Orthanc 1.10.1 stores.

    Only the *.dcm files at the top of the installed package's test_files
    directory are listed, minus ORTHANC_REJECTS. get_testdata_files
    would also try to download pydicom-data files, so that lookup is
    disabled here and the tests never reach the network.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mock.patch.object(
            data_manager, "online_test_file_dummy_paths", return_value={}
        ):
            candidates = get_testdata_files("*.dcm")
    return sorted(
        Path(path) for path in candidates if Path(path).name not in ORTHANC_REJECTS
    )


# Files that Orthanc 1.10.1 rejects on POST /instances, found by uploading
# every *.dcm file of pydicom 3.0.2 once. 400 means DCMTK could not parse the
# file (truncated, no file meta or a broken JPEG stream). 404 "Inexistent tag"
# means a UID that Orthanc indexes is missing.
ORTHANC_REJECTS = frozenset(
    {
        "JPEGLSNearLossless_08.dcm",
        "JPEGLSNearLossless_16.dcm",
        "MR_truncated.dcm",
        "SC_rgb_jls_lossy_line.dcm",
        "SC_rgb_jls_lossy_sample.dcm",
        "SC_rgb_jpeg.dcm",
        "UN_sequence.dcm",
        "empty_charset_LEI.dcm",
        "meta_missing_tsyntax.dcm",
        "nested_priv_SQ.dcm",
        "no_meta.dcm",
        "no_meta_group_length.dcm",
        "priv_SQ.dcm",
        "rtplan_truncated.dcm",
    }
)
