"""Attacks an administrator new to the tool makes by accident.

Odd DICOM that real archives contain, rotated in both transfer modes, and a
server URL that returns a web page instead of Orthanc's JSON. Every instance
must end on Main or Backup, and every failure must be a one-line error with
the documented exit status.
"""

from __future__ import annotations

import pydicom
import pytest
from dicom_studies import Study, pydicom_sample_files, write_study
from guarantees import assert_csv_well_formed
from pydicom.uid import generate_uid

# Days since upload: past the default ROTATE_DAYS of 180, so a study whose
# StudyDate is unusable is old by its LastUpdate.
AGED_DAYS = 400
OLD_DATE = "20190101"
LOGIN_PAGE = b"<html><body>Sign in to continue</body></html>"
HTML = "text/html; charset=utf-8"


def instance_ids(server) -> set[str]:
    return set(server.get_json("/instances"))


def without_pixel_data(paths) -> None:
    """Rewrite each DICOM file at `paths` without its PixelData element."""
    for path in paths:
        dataset = pydicom.dcmread(path)
        del dataset.PixelData
        dataset.save_as(path, enforce_file_format=True)


def write_odd_studies(directory) -> dict[str, Study]:
    """Write studies with an unusual identity or date, keyed by PatientID.

    Two patients share one StudyInstanceUID (a corrected identity), and the
    StudyDates are in the future, all zeros, the 19000101 placeholder, padded
    with spaces or split by spaces. One study has no PixelData at all.
    """
    shared_uid = generate_uid()
    options_by_patient = {
        "SHARED-A": {"study_instance_uid": shared_uid, "study_date": OLD_DATE},
        "SHARED-B": {"study_instance_uid": shared_uid, "study_date": OLD_DATE},
        "FUTURE": {"study_date": "29990101"},
        "=ZEROS": {"study_date": "00000000"},
        "NO-PIXELS": {"study_date": "19000101"},
        "Ñúñez-山田": {"study_date": f" {OLD_DATE} "},
        "SPACED": {"study_date": "2019 01 01"},
    }
    studies = {
        patient_id: write_study(
            directory / str(index), patient_id=patient_id, **options
        )
        for index, (patient_id, options) in enumerate(options_by_patient.items())
    }
    without_pixel_data(studies["NO-PIXELS"].paths)
    return studies


@pytest.mark.parametrize("transfer", ["zip", "instances"])
def test_odd_studies_all_migrated(
    main, backup, tmp_path, run_rotate, log_csv, read_log, transfer
):
    studies = write_odd_studies(tmp_path / "dicom")
    main.upload_aged([p for study in studies.values() for p in study.paths], AGED_DAYS)
    main.wait_stable()
    before = instance_ids(main)

    result = run_rotate("--transfer", transfer)

    assert result.returncode == 0, result.stderr
    assert before - instance_ids(backup) == set()
    assert instance_ids(main) == set()
    assert_csv_well_formed(log_csv)
    rows = read_log(log_csv)
    assert len(rows) == len(studies)
    assert {row["status"] for row in rows} == {"migrated"}


def test_samples_instances_md5(main, backup, run_rotate, log_csv, read_log):
    main.upload_aged(pydicom_sample_files(), AGED_DAYS)
    before = instance_ids(main)
    files = {i: main.get_bytes(f"/instances/{i}/file") for i in sorted(before)}

    result = run_rotate("--transfer", "instances", "--verify", "md5", timeout=300)

    assert result.returncode == 0, result.stderr
    assert instance_ids(main) == set()
    assert {row["status"] for row in read_log(log_csv)} == {"migrated"}
    for instance_id, content in files.items():
        assert backup.get_bytes(f"/instances/{instance_id}/file") == content


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (LOGIN_PAGE, "GET /system returned text/html; charset=utf-8, not JSON"),
        (b'{"status": "ok"}', "GET /system returned JSON without ApiVersion"),
    ],
)
@pytest.mark.parametrize("mode", [["--check"], []])
def test_not_orthanc_url_exit_2(main_proxy, run_rotate, log_csv, body, reason, mode):
    content_type = HTML if body == LOGIN_PAGE else "application/json"
    main_proxy.add_rule(status=200, body=body, content_type=content_type)

    result = run_rotate(*mode, env={"ORTHANC_MAIN_URL": main_proxy.url})

    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert f"ORTHANC_MAIN_URL={main_proxy.url}: {reason}" in result.stderr
    assert not log_csv.exists()


def test_lookup_login_page_row_failed(
    main, backup_proxy, tmp_path, run_rotate, log_csv, read_log
):
    study = write_study(tmp_path / "dicom", study_date=OLD_DATE)
    main.upload_stable(study.paths)
    backup_proxy.add_rule(
        "POST", r"^/tools/lookup", status=200, body=LOGIN_PAGE, content_type=HTML
    )

    result = run_rotate(env={"ORTHANC_BACKUP_URL": backup_proxy.url})

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    row = read_log(log_csv)[-1]
    assert row["status"] == "failed"
    assert "/tools/lookup failed: the response is not JSON" in row["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "reason"),
    [
        (LOGIN_PAGE, HTML, "the response is not JSON (text/html"),
        (b"{}", "application/json", "the response is a JSON object, not the array"),
    ],
)
def test_run_bad_study_listing(
    main, backup, main_proxy, tmp_path, run_rotate, body, content_type, reason
):
    study = write_study(tmp_path / "dicom", study_date=OLD_DATE)
    main.upload_stable(study.paths)
    main_proxy.add_rule(
        "GET", r"^/studies\?", status=200, body=body, content_type=content_type
    )

    result = run_rotate(env={"ORTHANC_MAIN_URL": main_proxy.url})

    assert instance_ids(main) == set(main.instance_ids(study.study_instance_uid))
    assert "Traceback" not in result.stderr
    assert result.returncode == 1, result.stderr
    assert reason in result.stderr
