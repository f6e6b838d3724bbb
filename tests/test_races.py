"""Races with other clients of Main and Backup that could lose an instance.

FaultProxy adds only latency, or a change made by another client at a
chosen moment.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil

import pydicom
from dicom_studies import write_study
from faultproxy import FaultProxy


def instance_keys(server) -> set[tuple[str, str, str, str]]:
    """(PatientID, Study, Series, SOP) of every instance on `server`."""
    keys = set()
    for instance_id in server.get_json("/instances"):
        tags = server.get_json(f"/instances/{instance_id}/simplified-tags")
        keys.add(
            (
                tags.get("PatientID", ""),
                tags["StudyInstanceUID"],
                tags["SeriesInstanceUID"],
                tags["SOPInstanceUID"],
            )
        )
    return keys


def test_protect_after_patient_recreated(main, backup, run_rotate, tmp_path):
    """Backup recycles a verified patient, then re-creates it, before the PUT.

    Three studies run in parallel: A1 (P1), B (P9), A2 (P1). Backup keeps one
    patient and recycles the oldest unprotected one (README, "Facts about
    Orthanc"). A1 is verified, B's copy recycles P1, A2's copy re-creates P1,
    and only then does A1's PUT /protected reach Backup. It succeeds, so A1
    is deleted from Main although Backup no longer holds it.
    """
    backup.restart(config={"MaximumPatientCount": 1})
    a1 = write_study(tmp_path / "a1", patient_id="P1", study_date="20200101")
    b = write_study(tmp_path / "b", patient_id="P9", study_date="20200102")
    a2 = write_study(tmp_path / "a2", patient_id="P1", study_date="20200103")
    main.upload_stable(a1.paths + b.paths + a2.paths)
    before = instance_keys(main)
    study_b = main.study_ids_for_uid(b.study_instance_uid)[0]
    study_a2 = main.study_ids_for_uid(a2.study_instance_uid)[0]

    with FaultProxy(main.url) as main_proxy, FaultProxy(backup.url) as backup_proxy:
        main_proxy.add_rule("GET", study_b + "/archive", delay=0.7)
        main_proxy.add_rule("GET", study_a2 + "/archive", delay=1.5)
        uploads = backup_proxy.add_rule("POST", r"^/instances$")

        def after_three_uploads(_method, _target):
            backup_proxy.wait_until(lambda: uploads.responded >= 3, timeout=20)

        backup_proxy.add_rule("PUT", r"/protected$", before_forward=after_three_uploads)
        run_rotate(
            "--workers", "3",
            env={"ORTHANC_MAIN_URL": main_proxy.url,
                 "ORTHANC_BACKUP_URL": backup_proxy.url},
        )  # fmt: skip

    assert before <= instance_keys(main) | instance_keys(backup)


def test_overwrite_after_md5_check(main, backup, run_rotate, tmp_path):
    """A corrected file replaces an instance on Main after the MD5 check.

    Main has OverwriteInstances, so the new file keeps the instance's ID. It
    arrives while Backup protects the patient, after the MD5 comparison and
    before the deletion, and it must stay on Main.
    """
    main.restart(config={"OverwriteInstances": True})
    study = write_study(tmp_path / "s", study_date="20200101", instances=2)
    main.upload_stable(study.paths)
    dataset = pydicom.dcmread(study.paths[0])
    dataset.PixelData = os.urandom(len(dataset.PixelData))
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    corrected = buffer.getvalue()

    with FaultProxy(backup.url) as proxy:
        proxy.add_rule(
            "PUT", r"/protected$", count=1,
            before_forward=lambda _m, _t: main.upload(corrected),
        )  # fmt: skip
        result = run_rotate("--verify", "md5", env={"ORTHANC_BACKUP_URL": proxy.url})

    stored = set()
    for server in (main, backup):
        for instance_id in server.get_json("/instances"):
            path = f"/instances/{instance_id}/attachments/dicom/md5"
            stored.add(server.get_bytes(path).decode())
    assert hashlib.md5(corrected).hexdigest() in stored
    assert "1 instances changed or vanished on Main" in result.stderr


def test_log_folder_removed_mid_run(main, backup, run_rotate, tmp_path, read_log):
    """Rows written to a deleted CSV reach no file: the run must not exit 0."""
    study = write_study(tmp_path / "s", study_date="20200101")
    main.upload_stable(study.paths)
    folder = tmp_path / "logs"
    folder.mkdir()
    log_path = folder / "log.csv"

    with FaultProxy(main.url) as proxy:
        proxy.add_rule(
            "POST", r"^/tools/bulk-delete", count=1,
            before_forward=lambda _m, _t: shutil.rmtree(folder),
        )  # fmt: skip
        result = run_rotate(
            env={"ORTHANC_MAIN_URL": proxy.url, "ROTATE_LOG_CSV": log_path}
        )

    assert main.get_json("/instances") == []
    assert result.returncode != 0
