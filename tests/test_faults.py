"""Fault injection against two real Orthanc servers.

Each test breaks the network, a server or the tool itself at a chosen point.
It then checks the deletion guarantee: every instance is still on Main or on
Backup and nothing unverified left Main. A later clean run must complete the work.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from dicom_studies import PIXEL_DATA_TAG_BYTES, write_study
from faultproxy import FaultProxy, closed_port
from guarantees import (
    FAST_FAILURE_ENV,
    assert_backup_bytes_equal,
    assert_csv_well_formed,
    assert_main_untouched,
    assert_migrated,
    background_output,
    last_row,
    missing_instances,
    rows_for,
    start_rotate,
    upload_studies,
    upload_study,
)

UNFINISHED = {"incomplete", "failed"}
# Long enough that the test, not the proxy, decides when the held request ends.
HOLD_S = 60
KILL_WAIT_S = 30


def _status(read_log, log_csv, study) -> str:
    return last_row(read_log(log_csv), study)["status"]


def _add_deletion_rules(proxy: FaultProxy, **fault) -> list:
    """Apply `fault` to every request that can delete from Main."""
    return [
        proxy.add_rule("DELETE", "", **fault),
        proxy.add_rule("POST", r"^/tools/bulk-delete", **fault),
    ]


# Backup unreachable or failing


def test_backup_down_fails_every_study(main, run_rotate, tmp_path, read_log, log_csv):
    studies = [
        upload_study(main, tmp_path / f"study{index}", patient_id=f"DOWN{index}")
        for index in range(2)
    ]
    with closed_port() as port:
        closed_url = f"http://127.0.0.1:{port}"
        result = run_rotate(env={"ORTHANC_BACKUP_URL": closed_url, **FAST_FAILURE_ENV})

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for study in studies:
        assert_main_untouched(main, study)
        assert _status(read_log, log_csv, study) == "failed"
        study_lines = [
            line
            for line in result.stderr.splitlines()
            if study.study_instance_uid in line
            or main.study_ids_for_uid(study.study_instance_uid)[0] in line
        ]
        assert study_lines, f"no stderr line names {study.study_instance_uid}"


@pytest.mark.parametrize("transfer", ["zip", "instances"])
def test_backup_500_keeps_unverified(
    main, backup, backup_proxy, run_rotate, tmp_path, read_log, log_csv, transfer
):
    study = upload_study(main, tmp_path / "study", instances=3)
    # One ZIP upload carries the whole study, so every upload fails. One upload
    # per instance: the first passes and every later one, retries included,
    # fails, which leaves the study partly on Backup.
    skip = 0 if transfer == "zip" else 1
    rule = backup_proxy.add_rule("POST", r"^/instances/?$", status=500, skip=skip)
    env = {"ORTHANC_BACKUP_URL": backup_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", transfer, env=env)

    assert result.returncode == 1, result.stderr
    assert rule.applied >= 1
    assert missing_instances(main, backup, study) == set()
    assert _status(read_log, log_csv, study) in UNFINISHED
    on_backup = backup.sop_uids(study.study_instance_uid)
    kept = main.sop_uids(study.study_instance_uid)
    assert set(study.sop_instance_uids) - on_backup <= kept

    backup_proxy.clear_rules()
    second = run_rotate("--transfer", transfer, env=env)

    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)
    assert_backup_bytes_equal(backup, study)


@pytest.mark.parametrize("transfer", ["zip", "instances"])
def test_backup_reset_midupload(
    main, backup, backup_proxy, run_rotate, tmp_path, read_log, log_csv, transfer
):
    study = upload_study(main, tmp_path / "study", instances=3, pixel_bytes=20_000)
    rule = backup_proxy.add_rule("POST", r"^/instances/?$", reset_request_after=3000)
    env = {"ORTHANC_BACKUP_URL": backup_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", transfer, env=env)

    assert result.returncode == 1, result.stderr
    assert rule.applied >= 1
    assert "Traceback" not in result.stderr
    assert_main_untouched(main, study)
    assert _status(read_log, log_csv, study) in UNFINISHED

    backup_proxy.clear_rules()
    second = run_rotate("--transfer", transfer, env=env)

    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)


@pytest.mark.parametrize("transfer", ["zip", "instances"])
@pytest.mark.parametrize(
    "body", [b"<html>proxy error page</html>", b'[1, "Success"]'], ids=["html", "list"]
)
def test_backup_unreadable_upload_response(
    main, backup, backup_proxy, run_rotate, tmp_path, read_log, log_csv, transfer, body
):
    # HTTP 200 with a body that is not Orthanc's, and nothing stored.
    study = upload_study(main, tmp_path / "study", instances=3)
    rule = backup_proxy.add_rule("POST", r"^/instances/?$", status=200, body=body)
    env = {"ORTHANC_BACKUP_URL": backup_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", transfer, env=env)

    assert result.returncode == 1, result.stderr
    assert rule.applied >= 1
    assert "Traceback" not in result.stderr
    assert_main_untouched(main, study)
    assert _status(read_log, log_csv, study) == "incomplete"
    message = last_row(read_log(log_csv), study)["message"]
    assert "unreadable response" in message


# Main's download cut short


def test_archive_cut_keeps_study(
    main, backup, main_proxy, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study", instances=3, pixel_bytes=20_000)
    study_id = main.study_ids_for_uid(study.study_instance_uid)[0]
    archive_size = len(main.get_bytes(f"/studies/{study_id}/archive"))
    # Orthanc sends the archive without Content-Length, so a clean close after
    # half the bytes is indistinguishable from the end of the stream.
    rule = main_proxy.add_rule(
        "GET", r"^/studies/[^/]+/archive", cut_response_after=archive_size // 2
    )
    env = {"ORTHANC_MAIN_URL": main_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", "zip", env=env)

    assert rule.applied >= 1, "the tool never downloaded /studies/{id}/archive"
    assert result.returncode == 1, result.stderr
    assert_main_untouched(main, study)
    assert _status(read_log, log_csv, study) in UNFINISHED

    main_proxy.clear_rules()
    second = run_rotate("--transfer", "zip", env=env)

    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)
    assert_backup_bytes_equal(backup, study)


def test_instance_download_cut_keeps_instance(
    main, backup, main_proxy, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study", instances=3, pixel_bytes=20_000)
    first_path = study.paths[0]
    first_sop = study.sop_instance_uids[0]
    first_id = main.post_json("/tools/lookup", first_sop)[0]["ID"]
    # Cut exactly before the PixelData element: what arrives is a well-formed
    # DICOM file without pixels, which only Content-Length reveals as short.
    pixel_data_offset = first_path.read_bytes().index(PIXEL_DATA_TAG_BYTES)
    rule = main_proxy.add_rule(
        "GET", rf"^/instances/{first_id}/file", cut_response_after=pixel_data_offset
    )
    env = {"ORTHANC_MAIN_URL": main_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", "instances", env=env)

    assert rule.applied >= 1, "the tool never downloaded /instances/{id}/file"
    assert result.returncode == 1, result.stderr
    assert first_sop in main.sop_uids(study.study_instance_uid)
    assert missing_instances(main, backup, study) == set()
    assert _status(read_log, log_csv, study) in UNFINISHED

    main_proxy.clear_rules()
    second = run_rotate("--transfer", "instances", env=env)

    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)
    assert_backup_bytes_equal(backup, study)


def test_archive_reset_keeps_study(
    main, backup, main_proxy, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study", instances=3, pixel_bytes=200_000)
    rule = main_proxy.add_rule(
        "GET", r"^/studies/[^/]+/archive", reset_response_after=100_000
    )
    env = {"ORTHANC_MAIN_URL": main_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", "zip", env=env)

    assert rule.applied >= 1, "the tool never downloaded /studies/{id}/archive"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert_main_untouched(main, study)
    assert _status(read_log, log_csv, study) == "failed"


def test_large_instance_cut_keeps_instance(
    main, backup, main_proxy, run_rotate, tmp_path, read_log, log_csv
):
    # Files above 4 MiB are streamed in blocks instead of read in one piece.
    study = upload_study(main, tmp_path / "study", instances=2, pixel_bytes=5_000_000)
    rule = main_proxy.add_rule(
        "GET", r"^/instances/[^/]+/file", count=1, cut_response_after=2_000_000
    )
    env = {"ORTHANC_MAIN_URL": main_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", "instances", env=env)

    assert rule.applied == 1, "the tool never downloaded /instances/{id}/file"
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert_main_untouched(main, study)
    assert _status(read_log, log_csv, study) in UNFINISHED


def test_backup_hang_times_out(main, backup, backup_proxy, run_rotate, tmp_path):
    study = upload_study(main, tmp_path / "study")
    backup_proxy.add_rule(None, "", delay=HOLD_S)
    env = {
        "ORTHANC_BACKUP_URL": backup_proxy.url,
        **FAST_FAILURE_ENV,
        "ROTATE_READ_TIMEOUT": "2",
    }
    started = time.monotonic()

    result = run_rotate(env=env, timeout=KILL_WAIT_S)

    assert time.monotonic() - started < KILL_WAIT_S
    assert result.returncode == 1, result.stderr
    assert_main_untouched(main, study)


# Orthanc killed mid-run


def test_backup_killed_during_upload(
    main, backup, backup_proxy, rotate_env, run_rotate, tmp_path, log_csv
):
    study = upload_study(main, tmp_path / "study", instances=3, pixel_bytes=200_000)
    rule = backup_proxy.add_rule("POST", r"^/instances/?$", chunk_delay=0.2)
    env = {"ORTHANC_BACKUP_URL": backup_proxy.url, **FAST_FAILURE_ENV}
    process = start_rotate(rotate_env, tmp_path, extra_env=env)
    try:
        backup_proxy.wait_until(lambda: rule.seen >= 1, timeout=KILL_WAIT_S)
        time.sleep(0.5)
        backup.kill()
        returncode = process.wait(timeout=KILL_WAIT_S)
    finally:
        process.kill()
    backup.start()

    assert returncode == 1, background_output(tmp_path)[1]
    assert_main_untouched(main, study)
    backup_proxy.clear_rules()
    second = run_rotate(env=env)
    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)
    assert_csv_well_formed(log_csv)


def test_main_killed_during_deletion(
    main, backup, rotate_env, run_rotate, tmp_path, log_csv
):
    study = upload_study(main, tmp_path / "study", instances=3)
    with FaultProxy(main.url) as proxy:
        rules = _add_deletion_rules(proxy, response_delay=HOLD_S)
        env = {"ORTHANC_MAIN_URL": proxy.url, **FAST_FAILURE_ENV}
        process = start_rotate(rotate_env, tmp_path, extra_env=env)
        try:
            proxy.wait_until(lambda: sum(r.forwarded for r in rules) >= 1, KILL_WAIT_S)
            main.kill()
        finally:
            proxy.stop()
            returncode = process.wait(timeout=KILL_WAIT_S)
            process.kill()
    main.start()

    assert returncode == 1, background_output(tmp_path)[1]
    assert missing_instances(main, backup, study) == set()
    second = run_rotate()
    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)
    assert_csv_well_formed(log_csv)


def test_bulk_delete_failing_midway_reported(
    main, backup, main_proxy, run_rotate, tmp_path, read_log, log_csv
):
    # 201 instances take two /tools/bulk-delete batches of at most 200.
    study = upload_study(main, tmp_path / "study", instances=201, pixel_bytes=64)
    rule = main_proxy.add_rule("POST", r"^/tools/bulk-delete", status=500, skip=1)
    env = {"ORTHANC_MAIN_URL": main_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", "instances", env=env)

    assert rule.applied == 1
    assert result.returncode == 1, result.stderr
    assert missing_instances(main, backup, study) == set()
    assert len(main.sop_uids(study.study_instance_uid)) == 1
    row = last_row(read_log(log_csv), study)
    assert row["status"] == "failed"
    assert "failed after 200 of 201 verified instances" in row["message"]
    assert "kept on Main" not in row["message"]


@pytest.mark.parametrize("transfer", ["zip", "instances"])
def test_upload_401_midrun_ends_run(
    main, backup, backup_proxy, run_rotate, tmp_path, read_log, log_csv, transfer
):
    # Three old studies; Backup rejects the first upload's credentials.
    studies = upload_studies(main, tmp_path, 3, "AUTH")
    backup_proxy.add_rule("POST", r"^/instances/?$", status=401)
    env = {"ORTHANC_BACKUP_URL": backup_proxy.url, **FAST_FAILURE_ENV}

    result = run_rotate("--transfer", transfer, "--workers", "1", env=env)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "ORTHANC_BACKUP_PASSWORD" in result.stderr
    for study in studies:
        assert_main_untouched(main, study)
    rows = read_log(log_csv)
    assert [row["status"] for row in rows] == ["failed"]
    assert rows[0]["study_instance_uid"] == studies[0].study_instance_uid
    assert "2 old studies left for the next run" in result.stdout


# The tool killed or stopped mid-run


def _kill_when(process: subprocess.Popen, proxy: FaultProxy, predicate) -> None:
    try:
        proxy.wait_until(predicate, timeout=KILL_WAIT_S)
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("hold", ["before_upload", "before_reply"])
def test_sigkill_during_transfer(
    main, backup, rotate_env, run_rotate, tmp_path, log_csv, hold
):
    study = upload_study(main, tmp_path / "study", instances=3, pixel_bytes=20_000)
    with FaultProxy(backup.url) as proxy:
        # before_upload: Backup receives nothing. before_reply: Backup stored
        # the upload but the tool never learns it. Waiting for Backup's response
        # keeps Backup from still storing during the checks and the second run.
        if hold == "before_upload":
            rule = proxy.add_rule("POST", r"^/instances/?$", delay=HOLD_S)
            reached = lambda: rule.seen >= 1  # noqa: E731
        else:
            rule = proxy.add_rule("POST", r"^/instances/?$", response_delay=HOLD_S)
            reached = lambda: rule.upstream_responded >= 1  # noqa: E731
        process = start_rotate(
            rotate_env,
            tmp_path,
            extra_env={"ORTHANC_BACKUP_URL": proxy.url, "ROTATE_READ_TIMEOUT": "120"},
        )
        _kill_when(process, proxy, reached)

    assert missing_instances(main, backup, study) == set()
    assert_main_untouched(main, study)
    if log_csv.exists():
        assert_csv_well_formed(log_csv)

    second = run_rotate()

    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)
    assert_backup_bytes_equal(backup, study)
    assert_csv_well_formed(log_csv)


def test_sigkill_during_deletion(
    main, backup, rotate_env, run_rotate, tmp_path, log_csv
):
    study = upload_study(main, tmp_path / "study", instances=3)
    with FaultProxy(main.url) as proxy:
        # Main performs the first deletion, the tool is killed before the reply.
        # Killing only once Main responded keeps Main from still deleting
        # during the checks and the second run.
        rules = _add_deletion_rules(proxy, response_delay=HOLD_S)
        process = start_rotate(
            rotate_env,
            tmp_path,
            extra_env={"ORTHANC_MAIN_URL": proxy.url, "ROTATE_READ_TIMEOUT": "120"},
        )
        _kill_when(
            process, proxy, lambda: sum(r.upstream_responded for r in rules) >= 1
        )

    assert missing_instances(main, backup, study) == set()
    if log_csv.exists():
        assert_csv_well_formed(log_csv)

    second = run_rotate()

    assert second.returncode == 0, second.stderr
    assert_migrated(main, backup, study)
    assert_csv_well_formed(log_csv)


def test_sigterm_finishes_current_study(
    main, backup, rotate_env, tmp_path, read_log, log_csv
):
    studies = upload_studies(main, tmp_path, 3, "TERM")
    with FaultProxy(backup.url) as proxy:
        rule = proxy.add_rule("POST", r"^/instances/?$", delay=2)
        process = start_rotate(
            rotate_env,
            tmp_path,
            extra_env={
                "ORTHANC_BACKUP_URL": proxy.url,
                "ROTATE_READ_TIMEOUT": "30",
                "ROTATE_WORKERS": "1",
            },
        )
        proxy.wait_until(lambda: rule.seen >= 1, timeout=KILL_WAIT_S)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            returncode = process.wait(timeout=KILL_WAIT_S)
        finally:
            process.kill()
    elapsed = time.monotonic() - started
    stdout, stderr = background_output(tmp_path)

    # 143 = 128 + SIGTERM, the documented status of a run stopped by SIGTERM.
    assert returncode == 143, stderr
    assert elapsed < KILL_WAIT_S
    assert "Traceback" not in stderr
    assert_csv_well_formed(log_csv)
    rows = read_log(log_csv)
    finished = [study for study in studies if rows_for(rows, study)]
    assert len(finished) == 1, f"rows for {len(finished)} studies: {rows}"
    for study in studies:
        assert missing_instances(main, backup, study) == set()
        if study in finished:
            continue
        assert_main_untouched(main, study)
        assert backup.sop_uids(study.study_instance_uid) == set()
    current = finished[0]
    if rows_for(rows, current)[-1]["status"] in ("migrated", "deleted"):
        assert_migrated(main, backup, current)
    else:
        assert_main_untouched(main, current)


# Main or Backup changes under the tool


def test_instance_arriving_at_deletion_kept(
    main, backup, main_proxy, run_rotate, tmp_path
):
    study = upload_study(main, tmp_path / "study", instances=3, patient_id="LATE")
    late = write_study(
        tmp_path / "late",
        study_instance_uid=study.study_instance_uid,
        patient_id="LATE",
        instances=1,
    )
    uploaded = []

    def store_late_instance(method: str, target: str) -> None:
        if not uploaded:
            uploaded.append(main.upload(late.paths[0]))

    _add_deletion_rules(main_proxy, before_forward=store_late_instance)

    result = run_rotate(env={"ORTHANC_MAIN_URL": main_proxy.url})

    assert uploaded, "the tool sent no deletion request to Main"
    assert main_proxy.errors == []
    late_sop = late.sop_instance_uids[0]
    on_main = main.sop_uids(study.study_instance_uid)
    on_backup = backup.sop_uids(study.study_instance_uid)
    assert late_sop in on_main | on_backup, result.stderr
    assert missing_instances(main, backup, study) == set()


def test_backup_lua_filter_keeps_main(
    main, backup, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study", instances=3)
    rejected_sop = study.sop_instance_uids[1]
    script = tmp_path / "filter.lua"
    # For an instance this filter rejects, Orthanc 1.10.1 returns HTTP 200 to
    # POST /instances with "Status": "FilteredOut" and an ID it never stored.
    script.write_text(
        "function ReceivedInstanceFilter(dicom, origin, info)\n"
        f"  return dicom.SOPInstanceUID ~= '{rejected_sop}'\n"
        "end\n"
    )
    backup.restart(config={"LuaScripts": [str(script)]})

    result = run_rotate(env=FAST_FAILURE_ENV)

    assert result.returncode == 1, result.stderr
    assert rejected_sop not in backup.sop_uids(study.study_instance_uid)
    assert_main_untouched(main, study)
    assert _status(read_log, log_csv, study) in UNFINISHED


def test_backup_storage_full_keeps_main(
    main, backup, run_rotate, tmp_path, read_log, log_csv
):
    # Orthanc 1.10.1 has no MaximumStorageMode (new in 1.11.2), so it recycles
    # the oldest patient when full. A protected patient cannot be recycled,
    # so uploads beyond 1 MB fail with HTTP 500 "The file storage is full".
    backup.restart(config={"MaximumStorageSize": 1})
    filler = upload_study(
        backup,
        tmp_path / "filler",
        patient_id="FILLER",
        instances=1,
        pixel_bytes=600_000,
    )
    filler_patient = backup.get_json("/patients")[0]
    backup.session.put(
        f"{backup.url}/patients/{filler_patient}/protected", data="1", timeout=10
    ).raise_for_status()
    study = upload_study(main, tmp_path / "study", instances=3, pixel_bytes=300_000)

    result = run_rotate(env=FAST_FAILURE_ENV)

    assert result.returncode == 1, result.stderr
    assert_main_untouched(main, study)
    assert _status(read_log, log_csv, study) in UNFINISHED
    assert backup.sop_uids(filler.study_instance_uid) == set(filler.sop_instance_uids)
