"""Guards that keep the tool from deleting what it must not, against real Orthanc.

Covers the run lock, Main and Backup being one server, credentials, idle and
grace periods, verification modes, retries, the audit CSV and invalid input.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from dicom_studies import write_study
from faultproxy import FaultProxy, closed_port
from guarantees import (
    CSV_COLUMNS,
    FAST_FAILURE_ENV,
    TOOL,
    assert_csv_well_formed,
    assert_main_untouched,
    assert_migrated,
    csv_records,
    rows_for,
    start_rotate,
    upload_study,
)

USERNAME = "rotate"
# Characters that break naive URL userinfo, .env and shell quoting.
PASSWORD = "p:a#s\"s'w0rd"
WRONG_PASSWORD = "wr:ng#\"pa'ss"
NOBODY_UID = 65534


def _secret_forms(password: str) -> list[str]:
    """Return the password as it could leak: plain and inside a Basic header."""
    basic = base64.b64encode(f"{USERNAME}:{password}".encode()).decode()
    return [password, basic]


def _assert_no_secret(result, log_csv: Path, password: str) -> None:
    csv_text = log_csv.read_text() if log_csv.exists() else ""
    for secret in _secret_forms(password):
        assert secret not in result.stdout
        assert secret not in result.stderr
        assert secret not in csv_text


def _dotenv_quote(value: str) -> str:
    """Quote a value for python-dotenv, which unescapes \\\\ and \\" inside "..."."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _backup_is_empty(backup) -> bool:
    return backup.study_ids() == []


@contextlib.contextmanager
def _authentication(server, username: str = USERNAME, password: str = PASSWORD):
    """Restart `server` with HTTP Basic authentication for one user.

    The conftest reset restarts it without authentication for the next test.
    """
    # Orthanc compares the UTF-8 bytes of the credentials.
    server.session.auth = (username.encode(), password.encode())
    try:
        server.restart(
            config={
                "AuthenticationEnabled": True,
                "RegisteredUsers": {username: password},
            }
        )
        yield
    finally:
        server.session.auth = None


# Run lock


def test_lock_held_exits_3(main, backup, run_rotate, tmp_path, log_csv):
    study = upload_study(main, tmp_path / "study")
    lock_path = tmp_path / "rotate.lock"

    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_rotate()

    assert result.returncode == 3, result.stderr
    assert str(lock_path) in result.stderr
    assert_main_untouched(main, study)
    assert _backup_is_empty(backup)
    assert not log_csv.exists() or len(csv_records(log_csv)) <= 1


def test_lock_released_after_sigkill(main, backup, rotate_env, run_rotate, tmp_path):
    study = upload_study(main, tmp_path / "study")
    with FaultProxy(backup.url) as proxy:
        rule = proxy.add_rule("POST", r"^/instances/?$", delay=60)
        process = start_rotate(
            rotate_env, tmp_path, extra_env={"ORTHANC_BACKUP_URL": proxy.url}
        )
        try:
            proxy.wait_until(lambda: rule.seen >= 1, timeout=30)
        finally:
            process.kill()
            process.wait(timeout=10)

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    assert_migrated(main, backup, study)


# Main and Backup must be different servers


def _same_server_urls(main) -> dict[str, str]:
    return {
        "identical": main.url,
        "trailing_slash": main.url + "/",
        "localhost": f"http://localhost:{main.port}",
        "upper_case_host": f"http://LOCALHOST:{main.port}",
        "upper_case_scheme": f"HTTP://127.0.0.1:{main.port}",
    }


@pytest.mark.parametrize(
    "variant",
    [
        "identical",
        "trailing_slash",
        "localhost",
        "upper_case_host",
        "upper_case_scheme",
    ],
)
def test_same_server_exits_2(main, backup, run_rotate, tmp_path, variant):
    study = upload_study(main, tmp_path / "study")
    backup_url = _same_server_urls(main)[variant]

    result = run_rotate(env={"ORTHANC_BACKUP_URL": backup_url})

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert_main_untouched(main, study)


@pytest.mark.parametrize(
    "variant",
    [
        "identical",
        "trailing_slash",
        "localhost",
        "upper_case_host",
        "upper_case_scheme",
    ],
)
def test_same_server_empty_main_exits_2(main, backup, run_rotate, variant):
    # An empty Orthanc has no change log to compare, so only the URL can tell.
    backup_url = _same_server_urls(main)[variant]

    result = run_rotate(env={"ORTHANC_BACKUP_URL": backup_url})

    assert result.returncode == 2, result.stderr


def test_same_server_behind_proxy_exits_2(main, backup, run_rotate, tmp_path):
    # Another port, same Orthanc: only what the server reports distinguishes them.
    study = upload_study(main, tmp_path / "study")
    with FaultProxy(main.url) as proxy:
        result = run_rotate(env={"ORTHANC_BACKUP_URL": proxy.url})

    assert result.returncode == 2, result.stderr
    assert_main_untouched(main, study)


def test_same_busy_server_behind_proxies_exits_2(main, backup, run_rotate, tmp_path):
    # A busy PACS stores instances all the time, so two reads of its change
    # log, one per URL, can return different newest changes.
    study = upload_study(main, tmp_path / "study")
    today = time.strftime("%Y%m%d")
    arrivals = iter(
        write_study(tmp_path / f"arrival{index}", patient_id="BUSY", study_date=today)
        for index in range(20)
    )

    def store_new_instance(method: str, target: str) -> None:
        main.upload(next(arrivals).paths[0])

    with FaultProxy(main.url) as main_proxy, FaultProxy(main.url) as backup_proxy:
        for proxy in (main_proxy, backup_proxy):
            proxy.add_rule("GET", r"^/changes", before_forward=store_new_instance)
        urls = {
            "ORTHANC_MAIN_URL": main_proxy.url,
            "ORTHANC_BACKUP_URL": backup_proxy.url,
        }
        result = run_rotate(env=urls)

    assert result.returncode == 2, result.stderr
    assert_main_untouched(main, study)


# Credentials


@pytest.mark.parametrize("server_name", ["main", "backup"])
def test_wrong_password_exits_2(
    main, backup, run_rotate, tmp_path, log_csv, server_name
):
    study = upload_study(main, tmp_path / "study")
    server = main if server_name == "main" else backup
    prefix = f"ORTHANC_{server_name.upper()}"

    with _authentication(server):
        result = run_rotate(
            env={f"{prefix}_USERNAME": USERNAME, f"{prefix}_PASSWORD": WRONG_PASSWORD}
        )
        assert_main_untouched(main, study)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    blamed = [
        line
        for line in result.stderr.splitlines()
        if server_name in line.lower() or server.url in line
    ]
    assert blamed, f"stderr does not name {server_name}: {result.stderr}"
    _assert_no_secret(result, log_csv, WRONG_PASSWORD)
    _assert_no_secret(result, log_csv, PASSWORD)


@pytest.mark.parametrize("server_name", ["main", "backup"])
def test_password_from_dotenv_works(
    main, backup, run_rotate, tmp_path, log_csv, server_name
):
    study = upload_study(main, tmp_path / "study")
    server = main if server_name == "main" else backup
    prefix = f"ORTHANC_{server_name.upper()}"
    (tmp_path / ".env").write_text(
        f"{prefix}_USERNAME={USERNAME}\n{prefix}_PASSWORD={_dotenv_quote(PASSWORD)}\n"
    )

    with _authentication(server):
        result = run_rotate()
        assert_migrated(main, backup, study)

    assert result.returncode == 0, result.stderr
    _assert_no_secret(result, log_csv, PASSWORD)


@pytest.mark.parametrize("transfer", ["zip", "instances"])
@pytest.mark.parametrize("server_name", ["main", "backup"])
def test_non_ascii_credentials_work(
    main, backup, run_rotate, tmp_path, log_csv, server_name, transfer
):
    # "ñ" is Latin-1 and "€" is not: both must reach Orthanc as UTF-8.
    username, password = "médico", "contraseña-€"
    study = upload_study(main, tmp_path / "study")
    server = main if server_name == "main" else backup
    prefix = f"ORTHANC_{server_name.upper()}"
    env = {f"{prefix}_USERNAME": username, f"{prefix}_PASSWORD": password}

    with _authentication(server, username, password):
        result = run_rotate("--transfer", transfer, env=env)
        assert_migrated(main, backup, study)

    assert result.returncode == 0, result.stderr
    assert password not in result.stderr + result.stdout + log_csv.read_text()


# Proxy settings of the environment


def test_proxy_variables_are_ignored(main, backup, run_rotate, tmp_path):
    study = upload_study(main, tmp_path / "study", instances=3)
    with closed_port() as port:
        nowhere = f"http://127.0.0.1:{port}"
        env = {
            name: nowhere
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy")
        }
        env.update({"NO_PROXY": None, "no_proxy": None})
        result = run_rotate("--transfer", "instances", env=env)

    assert result.returncode == 0, result.stderr
    assert_migrated(main, backup, study)


# Modes that must not change Main

READ_ONLY_POSTS = ("/tools/lookup", "/tools/find")


@pytest.mark.parametrize("flag", ["--dry-run", "--no-delete"])
def test_mode_sends_no_deletion(main, backup, run_rotate, tmp_path, flag):
    study = upload_study(main, tmp_path / "study")

    with FaultProxy(main.url) as main_proxy, FaultProxy(backup.url) as backup_proxy:
        urls = {
            "ORTHANC_MAIN_URL": main_proxy.url,
            "ORTHANC_BACKUP_URL": backup_proxy.url,
        }
        result = run_rotate(flag, env=urls)

    assert result.returncode == 0, result.stderr
    assert_main_untouched(main, study)
    assert main_proxy.count("DELETE") == 0
    assert main_proxy.count("POST", r"^/tools/bulk-delete") == 0
    assert backup_proxy.count("DELETE") == 0
    if flag == "--dry-run":
        writes = [
            record
            for record in backup_proxy.requests
            if record.method != "GET" and not record.target.startswith(READ_ONLY_POSTS)
        ]
        assert writes == []


# Idle time, grace period and verification


def test_recent_study_skipped(main, backup, run_rotate, tmp_path, read_log, log_csv):
    study = upload_study(main, tmp_path / "study", study_date="20200101")

    result = run_rotate(env={"ROTATE_MIN_IDLE_MINUTES": "60"})

    assert result.returncode == 0, result.stderr
    assert_main_untouched(main, study)
    assert _backup_is_empty(backup)
    rows = rows_for(read_log(log_csv), study)
    assert [row["status"] for row in rows] == ["skipped"]
    assert rows[0]["message"]


def test_restarted_main_still_idle_skipped(
    main, backup, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study", study_date="20200101")
    main.restart()
    studies = main.get_json("/studies", expand="")
    assert all(entry["IsStable"] for entry in studies)

    result = run_rotate(env={"ROTATE_MIN_IDLE_MINUTES": "60"})

    assert result.returncode == 0, result.stderr
    assert_main_untouched(main, study)
    assert _backup_is_empty(backup)
    statuses = [row["status"] for row in rows_for(read_log(log_csv), study)]
    assert statuses == ["skipped"]


def _upload_altered_copy(backup, path: Path) -> None:
    """Store on Backup a copy of `path` with the same UIDs but other bytes."""
    dataset = pydicom.dcmread(path)
    dataset.StudyDescription = "altered copy on Backup"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    backup.upload(buffer.getvalue())


def test_md5_verify_rejects_altered_copy(
    main, backup, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study")
    _upload_altered_copy(backup, study.paths[0])

    result = run_rotate("--verify", "md5")

    assert result.returncode == 1, result.stderr
    assert_main_untouched(main, study)
    statuses = [row["status"] for row in rows_for(read_log(log_csv), study)]
    assert statuses == ["incomplete"]


@pytest.mark.parametrize("server_name", ["Main", "Backup"])
def test_md5_verify_server_without_md5(
    main, backup, run_rotate, tmp_path, read_log, log_csv, server_name
):
    server = main if server_name == "Main" else backup
    server.restart(config={"StoreMD5ForAttachments": False})
    study = upload_study(main, tmp_path / "study")

    result = run_rotate("--verify", "md5")

    assert result.returncode == 1, result.stderr
    assert_main_untouched(main, study)
    row = rows_for(read_log(log_csv), study)[-1]
    assert row["status"] == "failed"
    assert row["message"].startswith(f"{server_name}: GET ")
    assert "no MD5 stored with this file" in row["message"]
    assert "use --verify sop" in row["message"]


def test_sop_verify_accepts_altered_copy(
    main, backup, run_rotate, tmp_path, read_log, log_csv
):
    # Documented trade-off: sop verification checks presence, not content.
    study = upload_study(main, tmp_path / "study")
    _upload_altered_copy(backup, study.paths[0])

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    assert_migrated(main, backup, study)


def test_grace_days_keeps_fresh_copy(
    main, backup, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study")

    result = run_rotate("--grace-days", "3")

    assert result.returncode == 0, result.stderr
    assert_main_untouched(main, study)
    on_backup = backup.sop_uids(study.study_instance_uid)
    assert on_backup == set(study.sop_instance_uids)
    statuses = [row["status"] for row in rows_for(read_log(log_csv), study)]
    assert statuses == ["transferred"]


def test_grace_days_deletes_aged_copy(
    main, backup, run_rotate, tmp_path, read_log, log_csv
):
    study = upload_study(main, tmp_path / "study")
    backup.upload_aged(study.paths, days_ago=5)

    result = run_rotate("--grace-days", "3")

    assert result.returncode == 0, result.stderr
    assert_migrated(main, backup, study)
    statuses = [row["status"] for row in rows_for(read_log(log_csv), study)]
    assert statuses in (["migrated"], ["deleted"])


@pytest.mark.parametrize(
    ("server_name", "method", "path"),
    [
        ("backup", "POST", r"^/tools/lookup"),
        ("main", "GET", r"^/studies/[^/]+/archive"),
        ("main", "POST", r"^/tools/bulk-delete"),
    ],
)
def test_retry_after_503_succeeds(
    main, backup, run_rotate, tmp_path, server_name, method, path
):
    study = upload_study(main, tmp_path / "study")
    server = main if server_name == "main" else backup

    with FaultProxy(server.url) as proxy:
        rule = proxy.add_rule(method, path, status=503, count=1)
        variable = f"ORTHANC_{server_name.upper()}_URL"
        result = run_rotate(env={variable: proxy.url, "ROTATE_RETRIES": "3"})

    assert result.returncode == 0, result.stderr
    assert rule.applied == 1
    assert rule.seen >= 2
    assert_migrated(main, backup, study)
    retry_lines = [
        line
        for line in result.stderr.splitlines()
        if "retr" in line.lower() and "503" in line
    ]
    assert retry_lines, f"no retry logged: {result.stderr}"


# Audit CSV


FORMULA_PATIENT_IDS = ['=HYPERLINK("http://127.0.0.1/x","y")', "+1", "-2", "@x"]


def test_csv_formula_cells_quoted(main, backup, run_rotate, tmp_path, log_csv):
    studies = [
        upload_study(
            main,
            tmp_path / f"study{index}",
            patient_id=patient_id,
            accession_number="=1+2",
        )
        for index, patient_id in enumerate(FORMULA_PATIENT_IDS)
    ]

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    assert_csv_well_formed(log_csv)
    records = csv_records(log_csv)
    for record in records[1:]:
        for cell in record:
            assert not cell.startswith(("=", "+", "-", "@")), record
    rows = [dict(zip(CSV_COLUMNS, record, strict=True)) for record in records[1:]]
    for study, patient_id in zip(studies, FORMULA_PATIENT_IDS, strict=True):
        (row,) = rows_for(rows, study)
        assert row["patient_id"] == "'" + patient_id
        assert row["accession_number"] == "'=1+2"


TORN_TAILS = {
    "plain": "2024-01-01T00:00:00+00:00,run0,abc",
    "open_quote": '2024-01-01T00:00:00+00:00,run0,abc,"1.2.3',
}


@pytest.mark.parametrize("tail", sorted(TORN_TAILS))
def test_torn_csv_line_appends_cleanly(
    main, backup, run_rotate, tmp_path, read_log, log_csv, tail
):
    study = upload_study(main, tmp_path / "study")
    log_csv.write_text(",".join(CSV_COLUMNS) + "\n" + TORN_TAILS[tail])

    result = run_rotate()

    assert result.returncode == 0, result.stderr
    records = csv_records(log_csv)
    assert records[0] == CSV_COLUMNS
    assert records.count(CSV_COLUMNS) == 1
    assert records[-1][CSV_COLUMNS.index("study_instance_uid")] == (
        study.study_instance_uid
    )
    assert len(records[-1]) == len(CSV_COLUMNS)
    statuses = [row["status"] for row in rows_for(read_log(log_csv), study)]
    assert statuses == ["migrated"]


# Invalid input: exit 2, one message naming the value, nothing sent


@pytest.fixture
def recording_proxies(main, backup):
    with FaultProxy(main.url) as main_proxy, FaultProxy(backup.url) as backup_proxy:
        yield main_proxy, backup_proxy


def _assert_rejected(result, expected_name: str, proxies) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    naming = [line for line in result.stderr.splitlines() if expected_name in line]
    assert naming, f"no stderr line names {expected_name!r}: {result.stderr}"
    for proxy in proxies:
        assert proxy.requests == [], f"requests sent: {proxy.requests}"


def _invalid_settings(tmp_path: Path) -> dict[str, tuple[dict, list[str], str]]:
    """Return case name -> (environment, arguments, text stderr must contain)."""
    not_a_directory = tmp_path / "plain-file"
    not_a_directory.write_text("")
    malformed_env = tmp_path / "malformed.env"
    malformed_env.write_text('ORTHANC_MAIN_PASSWORD="unterminated:#quote\n')
    missing_csv = tmp_path / "missing-dir" / "log.csv"
    csv_under_file = not_a_directory / "log.csv"
    return {
        "days_negative": ({"ROTATE_DAYS": "-5"}, [], "ROTATE_DAYS"),
        "days_text": ({"ROTATE_DAYS": "abc"}, [], "ROTATE_DAYS"),
        "days_zero": ({"ROTATE_DAYS": "0"}, [], "ROTATE_DAYS"),
        "flag_days_negative": ({}, ["--days", "-5"], "--days"),
        "url_without_scheme": (
            {"ORTHANC_MAIN_URL": "127.0.0.1:8042"},
            [],
            "ORTHANC_MAIN_URL",
        ),
        "missing_env_file": (
            {},
            ["--env-file", str(tmp_path / "nope.env")],
            "nope.env",
        ),
        "malformed_env_file": ({}, ["--env-file", str(malformed_env)], "malformed.env"),
        "csv_dir_missing": ({"ROTATE_LOG_CSV": str(missing_csv)}, [], str(missing_csv)),
        "csv_under_file": (
            {"ROTATE_LOG_CSV": str(csv_under_file)},
            [],
            str(csv_under_file),
        ),
    }


INVALID_CASES = [
    "days_negative",
    "days_text",
    "days_zero",
    "flag_days_negative",
    "url_without_scheme",
    "missing_env_file",
    "malformed_env_file",
    "csv_dir_missing",
    "csv_under_file",
]


@pytest.mark.parametrize("case", INVALID_CASES)
def test_invalid_setting_exits_2(run_rotate, tmp_path, recording_proxies, case):
    env, args, expected_name = _invalid_settings(tmp_path)[case]
    main_proxy, backup_proxy = recording_proxies
    urls = {"ORTHANC_MAIN_URL": main_proxy.url, "ORTHANC_BACKUP_URL": backup_proxy.url}

    result = run_rotate(*args, env={**urls, **env})

    _assert_rejected(result, expected_name, recording_proxies)
    assert "unterminated" not in result.stderr


def _run_as_nobody(command: list[str], env: dict, cwd: Path):
    """Run `command` as uid 65534, because root reads files with mode 000."""
    if os.geteuid() != 0:
        return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("reading a mode-000 file fails only for non-root; no setpriv")
    prefix = [setpriv, f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}"]
    probe = subprocess.run(
        [*prefix, "--clear-groups", sys.executable, "-c", "import requests, dotenv"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY_UID} cannot run {sys.executable}: {probe.stderr}")
    return subprocess.run(
        [*prefix, "--clear-groups", *command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreadable_env_file_exits_2(rotate_env, recording_proxies):
    main_proxy, backup_proxy = recording_proxies
    # pytest's tmp_path is private to root, so uid 65534 gets its own directory.
    workdir = Path(tempfile.mkdtemp(prefix="rotate-nobody-"))
    try:
        workdir.chmod(0o777)
        env_file = workdir / ".env"
        env_file.write_text(f"ORTHANC_MAIN_PASSWORD={_dotenv_quote(PASSWORD)}\n")
        env_file.chmod(0o000)
        env = {
            **rotate_env,
            "ORTHANC_MAIN_URL": main_proxy.url,
            "ORTHANC_BACKUP_URL": backup_proxy.url,
            "ROTATE_LOG_CSV": str(workdir / "log.csv"),
            "ROTATE_LOCK_FILE": str(workdir / "rotate.lock"),
        }
        command = [sys.executable, str(TOOL), "--env-file", str(env_file)]

        result = _run_as_nobody(command, env, workdir)
    finally:
        shutil.rmtree(workdir)

    _assert_rejected(result, str(env_file), recording_proxies)
    assert PASSWORD not in result.stderr


def test_fast_failure_env_is_valid(run_rotate, main, backup):
    # The short timeouts the fault tests rely on must be accepted as valid.
    result = run_rotate("--check", env=FAST_FAILURE_ENV)

    assert result.returncode == 0, result.stderr
