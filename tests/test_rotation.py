"""End-to-end rotation runs: real Main and Backup Orthanc servers, real CLI."""

from __future__ import annotations

import csv
import datetime as dt
import re

import pytest
from dicom_studies import pydicom_sample_files, write_study
from guarantees import CSV_COLUMNS

OLD_DATE = "20200101"
# Days since upload for studies whose age must come from LastUpdate. It is
# well past the default ROTATE_DAYS of 180.
AGED_DAYS = 400


def days_ago(days: int) -> str:
    return (dt.date.today() - dt.timedelta(days=days)).strftime("%Y%m%d")


def upload(server, paths) -> None:
    for path in paths:
        server.upload(path)


def rows_or_empty(log_csv, read_log) -> list[dict]:
    return read_log(log_csv) if log_csv.exists() else []


def row_for(rows: list[dict], study_instance_uid: str) -> dict:
    matches = [row for row in rows if row["study_instance_uid"] == study_instance_uid]
    assert len(matches) == 1, f"expected one row for {study_instance_uid}: {rows}"
    return matches[0]


def study_uids_on(server) -> set[str]:
    studies = server.get_json("/studies", expand="")
    return {study["MainDicomTags"]["StudyInstanceUID"] for study in studies}


def last_change(server) -> int:
    return server.get_json("/changes", last="")["Last"]


def content_changes_since(server, since: int) -> list[dict]:
    """Return changes after `since` other than Stable* events.

    Orthanc logs StablePatient, StableStudy and StableSeries on its own
    timer, so they can arrive during a run that changes nothing.
    """
    changes = server.get_json("/changes", since=since, limit=10000)["Changes"]
    return [c for c in changes if not c["ChangeType"].startswith("Stable")]


def instance_count(server) -> int:
    return server.get_json("/statistics")["CountInstances"]


def test_old_study_migrated(main, backup, tmp_path, run_rotate, log_csv, read_log):
    study = write_study(tmp_path / "dicom", study_date=OLD_DATE, instances=3)
    main.upload_stable(study.paths)

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    assert main.study_ids() == []
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    rows = read_log(log_csv)
    assert len(rows) == 1
    row = rows[0]
    assert row["study_instance_uid"] == study.study_instance_uid
    assert row["status"] == "migrated"
    assert row["transfer"] == "zip"
    assert row["date_source"] == "StudyDate"
    assert row["study_date"] == OLD_DATE
    # Both counts are taken when the row is written, after the deletion.
    assert row["instances_main"] == "0"
    assert row["instances_backup"] == "3"
    assert "Traceback" not in result.stderr


def test_csv_header_columns(main, backup, tmp_path, run_rotate, log_csv):
    main.upload_stable(write_study(tmp_path / "dicom", instances=1).paths)

    run_rotate()

    with open(log_csv, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == CSV_COLUMNS


def test_recent_study_untouched(main, backup, tmp_path, run_rotate, log_csv, read_log):
    study = write_study(tmp_path / "dicom", study_date=days_ago(10))
    main.upload_stable(study.paths)

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    assert backup.study_ids() == []
    assert rows_or_empty(log_csv, read_log) == []


FALLBACK_DATES = {
    "empty": "",
    "iso_dashes": "2019-01-01",
    "zeros": "00000000",
    "placeholder": "19000101",
    "future": (dt.date.today() + dt.timedelta(days=30)).strftime("%Y%m%d"),
    "absent": None,
}


@pytest.mark.parametrize("study_date", FALLBACK_DATES.values(), ids=FALLBACK_DATES)
def test_unusable_date_uses_last_update(
    main, backup, tmp_path, run_rotate, log_csv, read_log, study_date
):
    recent = write_study(tmp_path / "recent", study_date=study_date, patient_id="R")
    aged = write_study(tmp_path / "aged", study_date=study_date, patient_id="A")
    main.upload_aged(aged.paths, AGED_DAYS)
    main.upload_stable(recent.paths)

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    rows = read_log(log_csv)
    aged_row = row_for(rows, aged.study_instance_uid)
    assert aged_row["date_source"] == "LastUpdate"
    assert aged_row["status"] == "migrated"
    assert int(aged_row["age_days"]) >= AGED_DAYS - 1
    assert backup.sop_uids(aged.study_instance_uid) == set(aged.sop_instance_uids)
    assert main.sop_uids(aged.study_instance_uid) == set()
    assert main.sop_uids(recent.study_instance_uid) == set(recent.sop_instance_uids)
    assert recent.study_instance_uid not in {row["study_instance_uid"] for row in rows}


def test_dotted_date_uses_study_date(
    main, backup, tmp_path, run_rotate, log_csv, read_log
):
    study = write_study(tmp_path / "dicom", study_date="2019.01.01")
    main.upload_stable(study.paths)

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    row = row_for(read_log(log_csv), study.study_instance_uid)
    assert row["date_source"] == "StudyDate"
    assert row["status"] == "migrated"
    assert main.study_ids() == []


def test_complete_on_backup_deleted(
    main, backup, tmp_path, run_rotate, log_csv, read_log
):
    study = write_study(tmp_path / "dicom", instances=3)
    main.upload_stable(study.paths)
    upload(backup, study.paths)

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    row = row_for(read_log(log_csv), study.study_instance_uid)
    assert row["status"] == "deleted"
    assert row["transfer"] == "none"
    assert main.study_ids() == []
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)


def test_partly_on_backup_migrated(
    main, backup, tmp_path, run_rotate, log_csv, read_log
):
    study = write_study(tmp_path / "dicom", instances=4, series=2)
    main.upload_stable(study.paths)
    upload(backup, study.paths[:2])

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    row = row_for(read_log(log_csv), study.study_instance_uid)
    assert row["status"] == "migrated"
    assert row["instances_backup"] == "4"
    assert main.study_ids() == []
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--dry-run"], {}), ([], {"ROTATE_DRY_RUN": "1"})],
    ids=["flag", "variable"],
)
def test_dry_run_changes_nothing(
    main, backup, tmp_path, run_rotate, log_csv, read_log, args, env
):
    studies = [write_study(tmp_path / f"s{i}", patient_id=f"P{i}") for i in range(2)]
    main.upload_stable([path for study in studies for path in study.paths])
    main_before = last_change(main)
    backup_before = last_change(backup)

    result = run_rotate(*args, env=env)

    assert result.returncode == 0, result.stderr
    assert content_changes_since(main, main_before) == []
    assert content_changes_since(backup, backup_before) == []
    assert instance_count(main) == 6
    assert backup.study_ids() == []
    rows = read_log(log_csv)
    assert [row["status"] for row in rows] == ["dry_run", "dry_run"]


def test_no_delete_keeps_main(main, backup, tmp_path, run_rotate, log_csv, read_log):
    study = write_study(tmp_path / "dicom", instances=3)
    main.upload_stable(study.paths)

    result = run_rotate("--no-delete")

    assert result.returncode == 0, result.stderr
    row = row_for(read_log(log_csv), study.study_instance_uid)
    assert row["status"] == "transferred"
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)


def test_second_run_finds_nothing(
    main, backup, tmp_path, run_rotate, log_csv, read_log
):
    recent = write_study(tmp_path / "recent", study_date=days_ago(5), patient_id="R")
    old = write_study(tmp_path / "old", patient_id="O")
    main.upload_stable(recent.paths + old.paths)
    first = run_rotate()
    rows_after_first = read_log(log_csv)

    second = run_rotate()

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert len(rows_after_first) == 1
    assert read_log(log_csv) == rows_after_first
    assert study_uids_on(main) == {recent.study_instance_uid}


def test_limit_find_results_all_migrated(
    main, backup, tmp_path, run_rotate, log_csv, read_log
):
    main.restart(config={"LimitFindResults": 5})
    studies = [
        write_study(tmp_path / f"s{i}", patient_id=f"P{i}", instances=1)
        for i in range(12)
    ]
    main.upload_stable([study.paths[0] for study in studies])

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    rows = read_log(log_csv)
    assert len(rows) == 12
    assert {row["status"] for row in rows} == {"migrated"}
    assert main.study_ids() == []
    assert study_uids_on(backup) == {study.study_instance_uid for study in studies}


def spreadsheet_safe(text: str) -> str:
    """Apply the CSV rule: a cell starting with = + - @ gets a leading quote."""
    if text[:1] in ("=", "+", "-", "@"):
        return "'" + text
    return text


SPECIAL_IDENTIFIERS = {
    "non_ascii": ("Ñandú-Müller-山田", "Ünïcödé-42"),
    "comma_quote": ('ID,"7",x', 'ACC "A",B'),
    "formula": ("=1+2", "@SUM(A1)"),
}


@pytest.mark.parametrize(
    ("patient_id", "accession_number"),
    SPECIAL_IDENTIFIERS.values(),
    ids=SPECIAL_IDENTIFIERS,
)
def test_csv_special_identifiers(
    main, backup, tmp_path, run_rotate, log_csv, patient_id, accession_number
):
    study = write_study(
        tmp_path / "dicom",
        patient_id=patient_id,
        patient_name="Gómez^José Ñúñez^山田",
        accession_number=accession_number,
    )
    main.upload_stable(study.paths)

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    with open(log_csv, newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert len(rows) == 1
    row = dict(zip(header, rows[0], strict=True))
    assert row["patient_id"] == spreadsheet_safe(patient_id)
    assert row["accession_number"] == spreadsheet_safe(accession_number)
    assert row["status"] == "migrated"


def test_pydicom_samples_migrated_intact(
    main, backup, tmp_path, run_rotate, log_csv, read_log
):
    main.upload_aged(pydicom_sample_files(), AGED_DAYS)
    expected = {uid: main.sop_uids(uid) for uid in study_uids_on(main)}
    orthanc_studies = len(main.study_ids())
    # Orthanc derives instance IDs from the patient, study, series and SOP
    # UIDs, so a migrated instance has the same ID on Backup.
    sample_ids = sorted(main.get_json("/instances"))[:6]
    files = {i: main.get_bytes(f"/instances/{i}/file") for i in sample_ids}

    result = run_rotate(timeout=300)

    assert result.returncode == 0, result.stderr
    assert main.study_ids() == []
    rows = read_log(log_csv)
    assert len(rows) == orthanc_studies
    assert {row["status"] for row in rows} == {"migrated"}
    for uid, sop_uids in expected.items():
        assert backup.sop_uids(uid) == sop_uids, uid
    for instance_id, content in files.items():
        assert backup.get_bytes(f"/instances/{instance_id}/file") == content


def test_max_studies_limits_run(main, backup, tmp_path, run_rotate, log_csv, read_log):
    studies = [
        write_study(tmp_path / f"s{i}", patient_id=f"P{i}", instances=1)
        for i in range(5)
    ]
    main.upload_stable([study.paths[0] for study in studies])

    result = run_rotate("--max-studies", "2")

    assert result.returncode == 0, result.stderr
    rows = read_log(log_csv)
    assert len(rows) == 2
    assert {row["status"] for row in rows} == {"migrated"}
    assert len(main.study_ids()) == 3
    assert len(backup.study_ids()) == 2
    assert re.search(r"\b3\b[^\n]*\bleft\b", result.stdout), result.stdout
