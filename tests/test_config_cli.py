"""Configuration errors and precedence, through the CLI."""

from __future__ import annotations

import socket

import pytest
from dicom_studies import write_study

EXIT_CONFIG = 2


class Tripwire:
    """A loopback TCP listener that never responds and counts connection attempts.

    The kernel completes connections into the listen backlog without
    accept(), so any attempt by the tool shows up here.
    """

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.socket.setblocking(False)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def connections(self) -> int:
        count = 0
        while True:
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                return count
            connection.close()
            count += 1

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def tripwire():
    listener = Tripwire()
    yield listener
    listener.close()


def problem_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# Each case: (environment changes, CLI arguments, name the message must contain).
# "{tripwire}" in a value becomes the tripwire's port.
BAD_CONFIGURATIONS = {
    "main_url_missing": ({"ORTHANC_MAIN_URL": None}, [], "ORTHANC_MAIN_URL"),
    "main_url_empty": ({"ORTHANC_MAIN_URL": ""}, [], "ORTHANC_MAIN_URL"),
    "backup_url_missing": ({"ORTHANC_BACKUP_URL": None}, [], "ORTHANC_BACKUP_URL"),
    "main_url_no_scheme": (
        {"ORTHANC_MAIN_URL": "127.0.0.1:{tripwire}"},
        [],
        "ORTHANC_MAIN_URL",
    ),
    "backup_url_no_scheme": (
        {"ORTHANC_BACKUP_URL": "127.0.0.1:{tripwire}"},
        [],
        "ORTHANC_BACKUP_URL",
    ),
    "days_text": ({"ROTATE_DAYS": "abc"}, [], "ROTATE_DAYS"),
    "days_negative": ({"ROTATE_DAYS": "-5"}, [], "ROTATE_DAYS"),
    "days_zero": ({"ROTATE_DAYS": "0"}, [], "ROTATE_DAYS"),
    "days_flag_zero": ({}, ["--days", "0"], "--days"),
    "days_flag_text": ({}, ["--days", "abc"], "--days"),
}


@pytest.mark.parametrize(
    ("env_changes", "args", "name"),
    BAD_CONFIGURATIONS.values(),
    ids=BAD_CONFIGURATIONS,
)
def test_bad_config_exit_2(run_rotate, tripwire, log_csv, env_changes, args, name):
    env = {
        "ORTHANC_MAIN_URL": tripwire.url,
        "ORTHANC_BACKUP_URL": tripwire.url,
        # A wrongly started run fails within seconds instead of hanging on
        # the tripwire, which accepts connections but never responds.
        "ROTATE_CONNECT_TIMEOUT": "2",
        "ROTATE_READ_TIMEOUT": "2",
        "ROTATE_RETRIES": "0",
    }
    for key, value in env_changes.items():
        env[key] = None if value is None else value.format(tripwire=tripwire.port)

    result = run_rotate(*args, env=env, timeout=60)

    lines = problem_lines(result.stderr)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert len(lines) == 1, result.stderr
    assert name in lines[0]
    assert "Traceback" not in result.stderr
    assert tripwire.connections() == 0
    assert not log_csv.exists()


def test_env_file_supplies_urls(main, backup, tmp_path, run_rotate, log_csv):
    study = write_study(tmp_path / "dicom")
    for path in study.paths:
        main.upload(path)
    main.wait_stable()
    (tmp_path / ".env").write_text(
        f"ORTHANC_MAIN_URL={main.url}\nORTHANC_BACKUP_URL={backup.url}\n"
    )

    result = run_rotate(env={"ORTHANC_MAIN_URL": None, "ORTHANC_BACKUP_URL": None})

    assert result.returncode == 0, result.stderr
    assert main.study_ids() == []
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)


@pytest.mark.parametrize(
    ("env_file_days", "env_days", "args", "migrated"),
    [
        ("1", None, [], True),
        ("1", "30000", [], False),
        ("1", "30000", ["--days", "1"], True),
    ],
    ids=["env_file", "variable_over_env_file", "flag_over_variable"],
)
def test_days_precedence(
    main, backup, tmp_path, run_rotate, env_file_days, env_days, args, migrated
):
    # StudyDate 20200101 is old for ROTATE_DAYS=1 and recent for 30000.
    study = write_study(tmp_path / "dicom", study_date="20200101")
    for path in study.paths:
        main.upload(path)
    main.wait_stable()
    (tmp_path / ".env").write_text(f"ROTATE_DAYS={env_file_days}\n")

    result = run_rotate(*args, env={"ROTATE_DAYS": env_days})

    assert result.returncode == 0, result.stderr
    assert (main.study_ids() == []) is migrated
