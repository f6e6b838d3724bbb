"""Transfer methods, budgets and run output, on two real Orthanc servers."""

from __future__ import annotations

import datetime as dt
import os
import pty
import subprocess
import sys

import pytest
from conftest import TOOL
from dicom_studies import write_study
from faultproxy import FaultProxy

OLD_DATE = "20150101"


def load(server, studies):
    server.upload_stable(path for study in studies for path in study.paths)


def old_studies(tmp_path, count, **kwargs):
    return [
        write_study(
            tmp_path / f"study{index}",
            study_date=OLD_DATE,
            patient_id=f"PAT{index}",
            **kwargs,
        )
        for index in range(count)
    ]


def test_instances_mode_migrates(main, backup, tmp_path, run_rotate, read_log, log_csv):
    studies = old_studies(tmp_path, 2, instances=6, series=2)
    load(main, studies)
    result = run_rotate("--transfer", "instances", "--workers", "3")
    assert result.returncode == 0, result.stderr
    rows = read_log(log_csv)
    assert [row["status"] for row in rows] == ["migrated", "migrated"]
    assert {row["transfer"] for row in rows} == {"instances"}
    for study in studies:
        assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    assert main.study_ids() == []


def test_instances_mode_copies_identical_bytes(main, backup, tmp_path, run_rotate):
    (study,) = old_studies(tmp_path, 1, instances=2, pixel_bytes=300_000)
    load(main, [study])
    originals = {path.read_bytes() for path in study.paths}
    assert run_rotate("--transfer", "instances").returncode == 0
    copies = {
        backup.get_bytes(f"/instances/{instance_id}/file")
        for instance_id in backup.instance_ids(study.study_instance_uid)
    }
    assert copies == originals


@pytest.mark.parametrize("compressed", ["main", "backup"])
def test_compressed_storage_migrates(main, backup, tmp_path, run_rotate, compressed):
    # Orthanc reports the uncompressed FileSize, which the verification
    # compares between the servers.
    server = main if compressed == "main" else backup
    server.restart(config={"StorageCompression": True})
    (study,) = old_studies(tmp_path, 1, instances=3, pixel_bytes=50_000)
    load(main, [study])

    result = run_rotate("--transfer", "instances")

    assert result.returncode == 0, result.stderr
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    assert main.study_ids() == []


def test_zip_mode_switches_to_instances_for_large_study(
    main, tmp_path, run_rotate, read_log, log_csv
):
    large = write_study(
        tmp_path / "large", study_date=OLD_DATE, patient_id="LARGE",
        instances=3, pixel_bytes=500_000,
    )  # fmt: skip
    small = write_study(tmp_path / "small", study_date=OLD_DATE, patient_id="SMALL")
    load(main, [large, small])
    result = run_rotate("--transfer", "zip", "--zip-max-mb", "1")
    assert result.returncode == 0, result.stderr
    by_patient = {row["patient_id"]: row for row in read_log(log_csv)}
    assert by_patient["LARGE"]["transfer"] == "instances"
    assert by_patient["SMALL"]["transfer"] == "zip"
    assert by_patient["LARGE"]["status"] == "migrated"


def partial_study(main, backup, tmp_path):
    """A 10-instance study on Main whose first 9 instances Backup holds."""
    (study,) = old_studies(tmp_path, 1, instances=10, pixel_bytes=50_000)
    load(main, [study])
    for path in study.paths[:9]:
        backup.upload(path)
    return study


def test_zip_mode_sends_only_missing(main, backup, tmp_path, run_rotate, read_log):
    study = partial_study(main, backup, tmp_path)
    result = run_rotate("--transfer", "zip")
    assert result.returncode == 0, result.stderr
    one_instance = study.paths[9].stat().st_size
    assert f"Copied {one_instance / 1000:.1f} KB" in result.stdout
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    assert main.study_ids() == []


def test_instances_mode_sends_only_missing(
    main, backup, tmp_path, run_rotate, read_log, log_csv
):
    study = partial_study(main, backup, tmp_path)
    result = run_rotate("--transfer", "instances")
    assert result.returncode == 0, result.stderr
    one_instance = study.paths[9].stat().st_size
    assert f"Copied {one_instance / 1000:.1f} KB" in result.stdout
    (row,) = read_log(log_csv)
    assert row["status"] == "migrated"


def test_max_gigabytes_stops_new_studies(main, tmp_path, run_rotate, read_log, log_csv):
    load(main, old_studies(tmp_path, 3, instances=2, pixel_bytes=20_000))
    # The first study copies about 40 kB, more than 0.00001 GB (10 kB).
    result = run_rotate("--max-gigabytes", "0.00001", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert len(read_log(log_csv)) == 1
    assert "2 old studies left for the next run" in result.stdout
    assert "--max-gigabytes" in result.stdout
    assert len(main.study_ids()) == 2


def test_max_studies_then_next_run(main, tmp_path, run_rotate, read_log, log_csv):
    load(main, old_studies(tmp_path, 3))
    first = run_rotate("--max-studies", "2")
    assert "1 old studies left for the next run" in first.stdout
    assert len(main.study_ids()) == 1
    second = run_rotate("--max-studies", "2")
    assert second.returncode == 0, second.stderr
    assert "left for the next run" not in second.stdout
    assert main.study_ids() == []
    assert len(read_log(log_csv)) == 3


def test_until_in_future_runs_all(main, tmp_path, run_rotate, read_log, log_csv):
    load(main, old_studies(tmp_path, 2))
    later = (dt.datetime.now() + dt.timedelta(hours=2)).strftime("%H:%M")
    result = run_rotate("--until", later)
    assert result.returncode == 0, result.stderr
    assert len(read_log(log_csv)) == 2


def test_summary_counts_statuses(main, backup, tmp_path, run_rotate):
    studies = old_studies(tmp_path, 2)
    load(main, studies)
    for path in studies[1].paths:
        backup.upload(path)
    result = run_rotate()
    assert "Rows written: 2 (migrated 1, deleted 1)." in result.stdout
    assert "freed" in result.stdout


def test_log_lines_without_terminal(main, tmp_path, run_rotate):
    load(main, old_studies(tmp_path, 1))
    result = run_rotate()
    assert "[1/1]" in result.stderr
    assert "\r" not in result.stderr


def test_progress_line_on_terminal(main, tmp_path, rotate_env):
    load(main, old_studies(tmp_path, 2))
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, str(TOOL)],
        cwd=tmp_path,
        env=rotate_env,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    output = read_terminal(controller)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert "\r" in output
    assert "2/2 studies" in output
    assert "Rows written: 2" in stdout


def read_terminal(controller: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(controller, 4096)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    return b"".join(chunks).decode("utf-8", "replace")


def test_planning_skips_recent_studies(main, tmp_path, run_rotate, read_log, log_csv):
    """Planning reads study records in pages: a recent study costs no request."""
    recent = (dt.date.today() - dt.timedelta(days=3)).strftime("%Y%m%d")
    for index in range(120):
        study = write_study(
            tmp_path / f"recent{index}", study_date=recent, patient_id=f"R{index}",
            instances=1, pixel_bytes=16,
        )  # fmt: skip
        main.upload(study.paths[0])
    load(main, old_studies(tmp_path, 2))
    recent_ids = set(main.study_ids()) - set(old_study_ids(main))
    with FaultProxy(main.url) as proxy:
        result = run_rotate(env={"ORTHANC_MAIN_URL": proxy.url})
        targets = [record.target for record in proxy.requests]
    assert result.returncode == 0, result.stderr
    assert len(read_log(log_csv)) == 2
    assert not [t for t in targets if any(i in t for i in recent_ids)]
    assert proxy.count("GET", r"^/studies\?") == 1


def old_study_ids(server) -> list[str]:
    return [
        study["ID"]
        for study in server.get_json("/studies", expand="")
        if study["MainDicomTags"].get("StudyDate") == OLD_DATE
    ]
