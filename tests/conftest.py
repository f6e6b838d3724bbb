"""Fixtures: one Main/Backup Orthanc pair per session and a runner for the CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from orthanc import OrthancServer, stop_all

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOL = REPO_ROOT / "rotate_studies.py"
# Variables the tool reads. Inherited values are dropped so a developer's
# own settings cannot leak into a test run.
TOOL_ENV_PREFIXES = ("ORTHANC_", "ROTATE_")


def csv_rows(path) -> list[dict]:
    """Read the audit CSV at `path` into one dict per row."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _reset(server: OrthancServer) -> None:
    """Bring `server` back to a running, empty state with the base config."""
    if server.overrides or server.faketime is not None or not server.is_running():
        server.kill()
        server.overrides = {}
        server.start()
    server.wipe()


@pytest.fixture(scope="session")
def orthanc_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc")
    servers = (OrthancServer(root, "main"), OrthancServer(root, "backup"))
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        stop_all(servers)


@pytest.fixture
def main(orthanc_pair) -> OrthancServer:
    """Main Orthanc server, running, empty and with the base configuration."""
    _reset(orthanc_pair[0])
    return orthanc_pair[0]


@pytest.fixture
def backup(orthanc_pair) -> OrthancServer:
    """Backup Orthanc server, running, empty and with the base configuration."""
    _reset(orthanc_pair[1])
    return orthanc_pair[1]


@pytest.fixture
def main_proxy(main):
    """A FaultProxy in front of Main; give the tool its url to inject faults."""
    with FaultProxy(main.url) as proxy:
        yield proxy


@pytest.fixture
def backup_proxy(backup):
    """A FaultProxy in front of Backup."""
    with FaultProxy(backup.url) as proxy:
        yield proxy


@pytest.fixture
def log_csv(tmp_path) -> Path:
    """Path of the audit CSV that run_rotate points the tool at."""
    return tmp_path / "log_migracion.csv"


@pytest.fixture
def rotate_env(main, backup, tmp_path, log_csv) -> dict:
    """Environment for the tool: both server URLs, CSV and lock in tmp_path."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(TOOL_ENV_PREFIXES)
    }
    env.update(
        {
            "ORTHANC_MAIN_URL": main.url,
            "ORTHANC_BACKUP_URL": backup.url,
            "ROTATE_LOG_CSV": str(log_csv),
            "ROTATE_LOCK_FILE": str(tmp_path / "rotate.lock"),
            "ROTATE_MIN_IDLE_MINUTES": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def run_rotate(rotate_env, tmp_path):
    """Return a function that runs rotate_studies.py in tmp_path.

    `env` entries override the defaults, and an entry whose value is None
    removes that variable.
    """

    def run(*args, env: dict | None = None, timeout: float = 120):
        full_env = dict(rotate_env)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = str(value)
        return subprocess.run(
            [sys.executable, str(TOOL), *map(str, args)],
            check=False,
            cwd=tmp_path,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def read_log():
    """Return csv_rows, which reads an audit CSV into a list of dicts."""
    return csv_rows
