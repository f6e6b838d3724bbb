"""Checks of the test helpers themselves, so a broken fixture fails here first."""

from datetime import UTC, datetime, timedelta

import pydicom
from dicom_studies import pydicom_sample_files, write_study


def test_write_study_valid_dicom(tmp_path):
    study = write_study(tmp_path, instances=4, series=2, pixel_bytes=1001)
    dataset = pydicom.dcmread(study.paths[0])
    assert len(study.paths) == 4
    assert dataset.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len(dataset.PixelData) == 1002
    assert dataset.Rows * dataset.Columns == 1002


def test_write_study_absent_date(tmp_path):
    study = write_study(tmp_path, study_date=None, instances=1)
    assert "StudyDate" not in pydicom.dcmread(study.paths[0])


def test_upload_non_ascii_name(main, tmp_path):
    study = write_study(tmp_path, patient_name="Müller^Jürgen", instances=2)
    for path in study.paths:
        main.upload(path)
    stored = main.get_json("/patients", expand="")[0]["MainDicomTags"]
    assert stored["PatientName"] == "Müller^Jürgen"
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)


def test_upload_aged_last_update(main, tmp_path):
    study = write_study(tmp_path, instances=1)
    main.upload_aged(study.paths, 400)
    last_update = main.get_json(f"/studies/{main.study_ids()[0]}")["LastUpdate"]
    age = datetime.now(UTC) - datetime.strptime(last_update, "%Y%m%dT%H%M%S").replace(
        tzinfo=UTC
    )
    assert timedelta(days=399) < age < timedelta(days=401)


def test_wait_stable_after_upload(main, tmp_path):
    for path in write_study(tmp_path, instances=1).paths:
        main.upload(path)
    main.wait_stable()
    assert all(s["IsStable"] for s in main.get_json("/studies", expand=""))


def test_pydicom_samples_all_stored(main):
    files = pydicom_sample_files()
    assert len(files) > 40
    for path in files:
        main.upload(path)
    assert len(main.study_ids()) > 10


def test_sop_uids_skips_vanished_study(main, tmp_path, monkeypatch):
    study = write_study(tmp_path, instances=2)
    for path in study.paths:
        main.upload(path)
    found = main.study_ids_for_uid(study.study_instance_uid)
    # Main returns 404 for a study that a running deletion removed after the lookup.
    vanished = "00000000-00000000-00000000-00000000-00000000"
    monkeypatch.setattr(main, "study_ids_for_uid", lambda uid: [vanished, *found])
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    assert len(main.instance_ids(study.study_instance_uid)) == 2
