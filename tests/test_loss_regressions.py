"""Cases that once lost an instance or mishandled the configuration.

Each came from running the tool the way an administrator or a hostile
tester would, and each checks a behaviour that the README promises.
"""

from __future__ import annotations

import io
import threading
import time

import pydicom
from dicom_studies import PIXEL_DATA_TAG_BYTES, write_study
from faultproxy import FaultProxy
from pydicom.uid import generate_uid

OLD_DATE = "20170101"


def instance_keys(server) -> set[tuple[str, str, str]]:
    """(SeriesInstanceUID, SOPInstanceUID, MD5) for every instance on `server`."""
    keys = set()
    for item in server.get_json("/instances", expand=""):
        tags = server.get_json(f"/instances/{item['ID']}/simplified-tags")
        md5 = server.get_bytes(f"/instances/{item['ID']}/attachments/dicom/md5")
        keys.add((tags["SeriesInstanceUID"], tags["SOPInstanceUID"], md5.decode()))
    return keys


def moved_to_other_series(path, series_uid: str) -> bytes:
    """Return the file at `path` re-filed under another series, same SOPInstanceUID."""
    dataset = pydicom.dcmread(path)
    dataset.SeriesInstanceUID = series_uid
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_sop_in_other_series_not_copy(main, backup, tmp_path, run_rotate):
    """Backup stores SOPInstanceUID X in series A, and Main stores X in series A and B.

    Orthanc stores the two as different instances. Counting Main's series-B
    file as present on Backup deletes the only copy of it.
    """
    study = write_study(tmp_path / "dicom", study_date=OLD_DATE, instances=1)
    other_series = moved_to_other_series(study.paths[0], generate_uid())
    main.upload(study.paths[0])
    main.upload(other_series)
    main.wait_stable()
    backup.upload(study.paths[0])
    before = instance_keys(main) | instance_keys(backup)

    result = run_rotate()

    assert "Traceback" not in result.stderr
    after = instance_keys(main) | instance_keys(backup)
    assert before - after == set(), "an instance exists on neither server"


def test_forwarder_with_empty_change_log(main, tmp_path, run_rotate):
    """The Backup URL reaches Main through another port, and Main's change log is empty.

    `DELETE /changes` is a normal Orthanc call. With an empty log the change-log
    fingerprint cannot tell, so the stored-file check has to.
    """
    study = write_study(tmp_path / "dicom", study_date=OLD_DATE, instances=3)
    main.upload_stable(study.paths)
    main.delete("/changes")

    with FaultProxy(main.url) as proxy:
        result = run_rotate(env={"ORTHANC_BACKUP_URL": proxy.url})

    assert result.returncode == 2, result.stdout + result.stderr
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)


def test_forwarder_while_main_receives(main, tmp_path, run_rotate):
    """The two `/changes?last` reads race with instances arriving on Main."""
    study = write_study(tmp_path / "old", study_date=OLD_DATE, instances=3)
    main.upload_stable(study.paths)
    live = write_study(tmp_path / "live", study_date=None, instances=300)
    done = threading.Event()

    def receive() -> None:
        for path in live.paths:
            if done.is_set():
                return
            main.upload(path)

    receiver = threading.Thread(target=receive, daemon=True)
    with FaultProxy(main.url) as proxy:
        receiver.start()
        try:
            codes = [
                run_rotate("--check", env={"ORTHANC_BACKUP_URL": proxy.url}).returncode
                for _ in range(20)
            ]
        finally:
            done.set()
            receiver.join()

    assert codes == [2] * 20, f"guard missed: exit statuses {codes}"


def test_full_backup_recycles_nothing(main, backup, tmp_path, run_rotate):
    """Orthanc 1.10 with MaximumStorageSize deletes its oldest patients to
    make room. Studies already deleted from Main must not vanish from Backup
    during the same run."""
    backup.restart(config={"MaximumStorageSize": 1})
    loaded = set()
    for index in range(6):
        study = write_study(
            tmp_path / f"s{index}",
            study_date=OLD_DATE,
            patient_id=f"FULL{index}",
            instances=3,
            pixel_bytes=100_000,
        )
        for path in study.paths:
            main.upload(path)
        loaded |= set(study.sop_instance_uids)
    main.wait_stable()

    run_rotate("--workers", "1")

    present = set()
    for server in (main, backup):
        for item in server.get_json("/instances", expand=""):
            present.add(item["MainDicomTags"]["SOPInstanceUID"])
    assert loaded - present == set(), "instances exist on neither server"


def test_lock_file_same_as_csv(tmp_path, run_rotate, log_csv):
    header = "timestamp,run_id,study_id\r\n"
    log_csv.write_text(header + "2025-01-01T00:00:00+00:00,abc,x\r\n")
    before = log_csv.read_bytes()

    result = run_rotate("--dry-run", env={"ROTATE_LOCK_FILE": str(log_csv)})

    assert result.returncode == 2
    assert "ROTATE_LOCK_FILE" in result.stderr
    assert log_csv.read_bytes() == before


def test_foreign_csv_left_untouched(tmp_path, run_rotate):
    foreign = tmp_path / "report.csv"
    foreign.write_bytes(b"name,amount\r\nalice,10\r\nbob,20")
    before = foreign.read_bytes()

    result = run_rotate("--dry-run", env={"ROTATE_LOG_CSV": str(foreign)})

    assert result.returncode == 2
    assert foreign.read_bytes() == before


def test_check_rejects_foreign_csv(tmp_path, run_rotate):
    foreign = tmp_path / "report.csv"
    foreign.write_text("name,amount\nalice,10\n")

    result = run_rotate("--check", env={"ROTATE_LOG_CSV": str(foreign)})

    assert result.returncode == 2
    assert "ROTATE_LOG_CSV" in result.stderr


def test_unknown_env_file_key(main, tmp_path, run_rotate):
    study = write_study(tmp_path / "dicom", study_date=OLD_DATE, instances=2)
    main.upload_stable(study.paths)
    (tmp_path / ".env").write_text("ROTATE_DRYRUN=1\nROTATE_NODELETE=1\n")

    result = run_rotate()

    assert result.returncode == 2
    assert "ROTATE_DRYRUN" in result.stderr
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)


def test_unparseable_url_config_error(run_rotate):
    for url in ("http://127.0.0.1 :8042", "http://127..0.1:8042"):
        result = run_rotate("--check", env={"ORTHANC_MAIN_URL": url})
        assert result.returncode == 2, url
        assert "Traceback" not in result.stderr, url
        assert "ORTHANC_MAIN_URL" in result.stderr, url


def test_huge_numbers_config_error(run_rotate):
    for name in ("ROTATE_READ_TIMEOUT", "ROTATE_MIN_IDLE_MINUTES",
                 "ROTATE_GRACE_DAYS"):  # fmt: skip
        value = "1e300" if name.endswith("TIMEOUT") else "10000000000000"
        started = time.monotonic()
        result = run_rotate("--check", env={name: value})
        assert result.returncode == 2, name
        assert name in result.stderr, name
        assert "Traceback" not in result.stderr, name
        assert time.monotonic() - started < 30


def test_truncated_copy_on_backup_keeps_main(main, backup, tmp_path, run_rotate):
    """Backup contains an instance cut before its PixelData, under the same UIDs.

    The cut file is valid DICOM, so Backup stored it, and Backup answers
    AlreadyStored to the real file. Trusting the SOPInstanceUID alone deletes
    the only copy of the pixels.
    """
    study = write_study(
        tmp_path / "dicom", study_date=OLD_DATE, instances=2, pixel_bytes=20_000
    )
    whole = study.paths[0].read_bytes()
    truncated = whole[: whole.index(PIXEL_DATA_TAG_BYTES)]
    for path in study.paths:
        main.upload(path)
    main.wait_stable()
    backup.upload(truncated)
    before = instance_keys(main) | instance_keys(backup)

    result = run_rotate("--transfer", "instances")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    after = instance_keys(main) | instance_keys(backup)
    assert before - after == set(), "an instance exists on neither server"
    assert main.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
