"""Checks of the deletion guarantee shared by the fault and guard tests.

The guarantee: an instance leaves Main only after Backup confirmed it, so after
any crash, kill, restart or cut download every instance is on Main or Backup.
"""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
from pathlib import Path

from dicom_studies import Study, write_study
from orthanc import OrthancServer

TOOL = Path(__file__).resolve().parent.parent / "rotate_studies.py"

# The audit CSV columns in their documented order, written out here rather
# than imported from the tool so that a change to the tool cannot pass unseen.
CSV_COLUMNS = [
    "timestamp",
    "run_id",
    "study_id",
    "study_instance_uid",
    "patient_id",
    "accession_number",
    "study_date",
    "date_source",
    "age_days",
    "instances_main",
    "instances_backup",
    "size_bytes",
    "transfer",
    "status",
    "duration_s",
    "message",
]

# Short timeouts and one retry keep a failing run within seconds.
FAST_FAILURE_ENV = {
    "ROTATE_CONNECT_TIMEOUT": "2",
    "ROTATE_READ_TIMEOUT": "10",
    "ROTATE_RETRIES": "1",
}


def upload_study(server: OrthancServer, directory: Path, **study_options) -> Study:
    """Write a study with write_study, upload every instance and wait for IsStable."""
    study = write_study(directory, **study_options)
    server.upload_stable(study.paths)
    return study


def last_row(rows: list[dict], study: Study) -> dict:
    """Return the study's newest CSV row; fail when it has none."""
    found = rows_for(rows, study)
    assert found, f"no CSV row for study {study.study_instance_uid}"
    return found[-1]


def upload_studies(
    server: OrthancServer, directory: Path, count: int, patient_prefix: str, **options
) -> list[Study]:
    """Upload `count` studies, each with its own patient, oldest first.

    Their StudyDates are 2019-01-01, 2019-01-02 and so on, so the tool
    processes them in the order of the returned list.
    """
    return [
        upload_study(
            server,
            directory / f"study{index}",
            patient_id=f"{patient_prefix}{index}",
            study_date=f"2019{1 + index // 28:02d}{1 + index % 28:02d}",
            **options,
        )
        for index in range(count)
    ]


def missing_instances(main: OrthancServer, backup: OrthancServer, study: Study):
    """Return the study's SOP Instance UIDs found on neither server."""
    on_main = main.sop_uids(study.study_instance_uid)
    on_backup = backup.sop_uids(study.study_instance_uid)
    return set(study.sop_instance_uids) - on_main - on_backup


def assert_main_untouched(main: OrthancServer, study: Study) -> None:
    on_main = main.sop_uids(study.study_instance_uid)
    assert on_main == set(study.sop_instance_uids), (
        f"study {study.study_instance_uid} lost instances on Main: "
        f"{set(study.sop_instance_uids) - on_main}"
    )


def assert_migrated(main: OrthancServer, backup: OrthancServer, study: Study):
    """Assert the study is gone from Main and complete on Backup."""
    on_backup = backup.sop_uids(study.study_instance_uid)
    assert on_backup == set(study.sop_instance_uids)
    assert main.sop_uids(study.study_instance_uid) == set()


def assert_backup_bytes_equal(backup: OrthancServer, study: Study) -> None:
    """Assert every Backup copy has the bytes of the file that was uploaded."""
    expected = {
        path.stem: hashlib.md5(path.read_bytes()).hexdigest() for path in study.paths
    }
    for instance_id in backup.instance_ids(study.study_instance_uid):
        tags = backup.get_json(f"/instances/{instance_id}/simplified-tags")
        stored = backup.get_bytes(f"/instances/{instance_id}/file")
        sop_uid = tags["SOPInstanceUID"]
        assert hashlib.md5(stored).hexdigest() == expected[sop_uid], sop_uid


def csv_records(path: Path) -> list[list[str]]:
    """Parse the audit CSV with csv.reader, header row included."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def assert_csv_well_formed(path: Path) -> None:
    """Assert the header is CSV_COLUMNS once and every row has 16 fields."""
    records = csv_records(path)
    assert records[0] == CSV_COLUMNS
    for number, record in enumerate(records[1:], start=2):
        assert len(record) == len(CSV_COLUMNS), f"line {number}: {record}"
        assert record != CSV_COLUMNS, f"header repeated at line {number}"


def rows_for(rows: list[dict], study: Study) -> list[dict]:
    return [r for r in rows if r["study_instance_uid"] == study.study_instance_uid]


def start_rotate(
    env: dict, cwd: Path, *args: str, extra_env: dict | None = None
) -> subprocess.Popen:
    """Start rotate_studies.py in the background with output in cwd/*.log files.

    Files instead of pipes keep a chatty run from blocking on a full pipe.
    """
    full_env = {**env, **(extra_env or {})}
    with (
        open(cwd / "rotate-stdout.log", "w") as stdout,
        open(cwd / "rotate-stderr.log", "w") as stderr,
    ):
        return subprocess.Popen(
            [sys.executable, str(TOOL), *args],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )


def background_output(cwd: Path) -> tuple[str, str]:
    """Return (stdout, stderr) written by the last start_rotate in cwd."""
    stdout = (cwd / "rotate-stdout.log").read_text()
    stderr = (cwd / "rotate-stderr.log").read_text()
    return stdout, stderr
