"""The container scripts on the host: entrypoint.sh with Debian's cron,
run_rotation.sh, healthcheck.sh and the Dockerfile's file list.

No Docker engine is needed. Every path the scripts use is pointed into a
temporary directory, except the cron schedule of the cron test, which goes
into /etc/cron.d under a unique name because Debian's cron reads only there.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import csv_rows
from dicom_studies import write_study
from faultproxy import closed_port

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "entrypoint.sh"
RUN_ROTATION = REPO / "run_rotation.sh"
HEALTHCHECK = REPO / "healthcheck.sh"
NOBODY = "nobody"
# Characters that break naive quoting: space, both quotes, $, #, backslash,
# %, which cron turns into a newline, and a newline.
TRICKY_VALUE = "p@ss word \"dq\" 'sq' $HOME ${X} #hash \\back %d\nsecond line"
# The audit log name carries the same characters except the newline, so the
# CSV appearing under this exact name proves the job got the exact value.
TRICKY_CSV_NAME = "log \"migración\" 'q' $HOME #1 %d.csv"
STARTUP_TIMEOUT_S = 60
# Cron starts a "* * * * *" job at the next minute boundary, up to 60 s away.
CRON_RUN_TIMEOUT_S = 150
STOP_TIMEOUT_S = 10

requires_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="entrypoint.sh runs cron and setpriv, which need root"
)


class Entrypoint:
    """entrypoint.sh in a new session, with stdout and stderr collected."""

    def __init__(self, env: dict):
        self.process = subprocess.Popen(
            ["bash", str(ENTRYPOINT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.readers = [
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.process.stdout, self.stdout_lines),
                (self.process.stderr, self.stderr_lines),
            )
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:
        for raw in stream:
            lines.append(raw.decode("utf-8", "replace"))

    @property
    def stdout(self) -> str:
        return "".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_for_stdout(self, pattern: str, timeout: float) -> re.Match:
        """Wait until stdout matches the regex `pattern`; fail on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.stdout)
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(
            f"entrypoint.sh output did not match {pattern!r} within {timeout} s "
            f"(exit status {self.process.poll()}).\nstdout:\n{self.stdout}\n"
            f"stderr:\n{self.stderr}"
        )

    def wait(self, timeout: float) -> int:
        status = self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=5)
        return status

    def kill_all(self) -> None:
        """SIGKILL entrypoint.sh's process group and the cron it started."""
        pids = [
            int(pid) for pid in re.findall(r"cron started \(pid (\d+)\)", self.stdout)
        ]
        for kill, target in [(os.killpg, self.process.pid)] + [
            (os.kill, p) for p in pids
        ]:
            try:
                kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def sandbox():
    """A temporary directory that JOB_USER nobody can enter, with a space in it.

    pytest's tmp_path sits below a mode-0700 directory, so it is not used here.
    """
    root = Path(tempfile.mkdtemp(prefix="pacs rotate "))
    root.chmod(0o755)
    for name in ("audit logs", "run", "cron.d", "bin"):
        (root / name).mkdir()
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_as_nobody(command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid", NOBODY, "--regid", "nogroup", "--init-groups", *command],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=60,
    )


@pytest.fixture(scope="session")
def job_identity() -> tuple[str, str, dict]:
    """(JOB_USER, JOB_PYTHON, extra environment) able to run rotate_studies.py.

    The image runs the tool as an unprivileged user. The test venv's python
    often lives below /root, which that user cannot enter, so Debian's
    /usr/bin/python3 with the venv's site-packages on PYTHONPATH is tried
    next. When neither works the job runs as root: the privilege drop itself
    is covered by test_entrypoint_drops_privileges.
    """
    site_packages = sysconfig.get_paths()["purelib"]
    candidates = [
        (sys.executable, {}),
        ("/usr/bin/python3", {"PYTHONPATH": site_packages}),
    ]
    probe = "import requests, dotenv; open(__import__('sys').argv[1]).close()"
    for python, extra in candidates:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}
        command = [python, "-c", probe, str(REPO / "rotate_studies.py")]
        if os.geteuid() == 0 and run_as_nobody(command, env).returncode == 0:
            return NOBODY, python, extra
    return "root", sys.executable, {}


def base_env(sandbox: Path, **settings) -> dict:
    """Environment for entrypoint.sh: host environment without tool settings,
    every path inside `sandbox`, then `settings`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ORTHANC_", "ROTATE_", "JOB_", "CRON_"))
    }
    logs = sandbox / "audit logs"
    env.update(
        {
            "APP_DIR": str(REPO),
            "LOG_DIR": str(logs),
            "RUN_DIR": str(sandbox / "run"),
            "CRON_D": str(sandbox / "cron.d"),
            "ROTATE_LOG_CSV": str(logs / "log_migracion.csv"),
            "ROTATE_MIN_IDLE_MINUTES": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
            "JOB_STOP_TIMEOUT": "5",
        }
    )
    env.update({key: str(value) for key, value in settings.items()})
    return env


def read_env_file_value(env_file: Path, name: str) -> str:
    """Source `env_file` in bash as run_rotation.sh does and return $name."""
    result = subprocess.run(
        ["bash", "-c", 'source "$1" && printf %s "${!2}"', "bash", env_file, name],
        check=True,
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    return result.stdout.decode("utf-8")


def read_status(path: Path) -> dict:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {key: value for key, value in pairs}


def healthcheck(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(HEALTHCHECK)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def wait_for_file(path: Path, timeout: float, entrypoint: Entrypoint) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or entrypoint.process.poll() is not None:
            pytest.fail(
                f"{path} did not appear within {timeout} s.\n"
                f"stdout:\n{entrypoint.stdout}\nstderr:\n{entrypoint.stderr}"
            )
        time.sleep(0.5)


def wait_for_job_pid_file(sandbox: Path, entrypoint: Entrypoint) -> None:
    """Wait until run_rotation.sh wrote RUN_DIR/job.<pid>.pid.

    entrypoint.sh stops only the jobs listed there, and a job started after
    the stop begins starts nothing.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not list((sandbox / "run").glob("job.*.pid")):
        if time.monotonic() > deadline or entrypoint.process.poll() is not None:
            pytest.fail(
                f"no job pid file in {sandbox / 'run'} within {STARTUP_TIMEOUT_S} s."
                f"\nstdout:\n{entrypoint.stdout}\nstderr:\n{entrypoint.stderr}"
            )
        time.sleep(0.1)


def process_running(pid: int, grace: float = 2.0) -> bool:
    """True while process `pid` still runs after `grace` seconds. A zombie
    that awaits its reaper counts as ended."""
    deadline = time.monotonic() + grace
    while True:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
        if "\nState:\tZ" in status:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def other_cron_pids() -> list[str]:
    result = subprocess.run(
        ["pgrep", "-x", "cron"], check=False, capture_output=True, text=True
    )
    return result.stdout.split()


def job_output(stdout: str) -> list[str]:
    """Lines between run_rotation.sh's start and end lines, without its own."""
    start = stdout.index("run_rotation.sh: starting")
    end = stdout.index("run_rotation.sh: rotate_studies.py exited")
    lines = stdout[start:end].splitlines()[1:]
    return [line for line in lines if "run_rotation.sh:" not in line]


@requires_root
def test_entrypoint_cron_minute_run(main, backup, sandbox, tmp_path, job_identity):
    """Slow: waits up to about 70 s for cron's next minute boundary."""
    if other_cron_pids():
        pytest.skip(f"another cron daemon runs (pid {other_cron_pids()})")
    job_user, job_python, extra_env = job_identity
    study = write_study(tmp_path / "study", instances=2)
    main.upload_aged(study.paths, days_ago=400)
    csv_path = sandbox / "audit logs" / TRICKY_CSV_NAME
    cron_file = Path("/etc/cron.d") / f"pacs-rotate-test-{uuid.uuid4().hex}"
    env = base_env(
        sandbox,
        ORTHANC_MAIN_URL=main.url,
        ORTHANC_BACKUP_URL=backup.url,
        ROTATE_LOG_CSV=csv_path,
        CRON_D="/etc/cron.d",
        CRON_FILE=cron_file,
        CRON_SCHEDULE="* * * * *",
        JOB_USER=job_user,
        JOB_PYTHON=job_python,
        PACS_ROTATE_TEST_VALUE=TRICKY_VALUE,
        **extra_env,
    )
    env_file = sandbox / "run" / "job.env"
    status_file = sandbox / "audit logs" / "last_run.status"
    entrypoint = Entrypoint(env)
    try:
        started = entrypoint.wait_for_stdout(
            r"cron started \(pid (\d+)\)", STARTUP_TIMEOUT_S
        )
        cron_pid = int(started.group(1))
        env_mode = env_file.stat().st_mode
        env_owner = env_file.stat().st_uid
        env_value = read_env_file_value(env_file, "PACS_ROTATE_TEST_VALUE")
        env_csv = read_env_file_value(env_file, "ROTATE_LOG_CSV")
        cron_line = cron_file.read_text().splitlines()[-1]
        wait_for_file(status_file, CRON_RUN_TIMEOUT_S, entrypoint)
        entrypoint.wait_for_stdout(r"rotate_studies\.py exited with status", 30)
        health = healthcheck(env)
        stop_started = time.monotonic()
        entrypoint.process.send_signal(signal.SIGTERM)
        exit_status = entrypoint.wait(STOP_TIMEOUT_S)
        stop_seconds = time.monotonic() - stop_started
    finally:
        entrypoint.kill_all()
        cron_file.unlink(missing_ok=True)

    stdout = entrypoint.stdout
    assert stat.S_IMODE(env_mode) == 0o600
    assert env_owner == 0
    assert env_value == TRICKY_VALUE
    assert env_csv == str(csv_path)
    assert cron_line == (
        f"* * * * * root '{RUN_ROTATION}' --env-file '{sandbox}/run/job.env'"
    )
    assert f"starting rotate_studies.py as {job_user} (audit log: {csv_path})" in stdout
    assert "rotate_studies.py exited with status 0" in stdout
    assert job_output(stdout), f"no tool summary on stdout:\n{stdout}"
    assert read_status(status_file)["exit_status"] == "0"
    rows = csv_rows(csv_path)
    assert [row["study_instance_uid"] for row in rows] == [study.study_instance_uid]
    assert rows[0]["status"] == "migrated"
    assert "run_rotation.sh" not in csv_path.read_text(encoding="utf-8")
    assert main.study_ids() == []
    assert backup.sop_uids(study.study_instance_uid) == set(study.sop_instance_uids)
    assert health.returncode == 0, health.stdout
    assert health.stdout.startswith("healthy: the last run finished at")
    assert exit_status == 0
    assert stop_seconds < STOP_TIMEOUT_S
    assert "received SIGTERM" in stdout
    assert not process_running(cron_pid)
    assert not cron_file.exists()
    assert not env_file.exists()


@requires_root
def test_entrypoint_check_failure(backup, sandbox, job_identity):
    job_user, job_python, job_extra_env = job_identity
    backup_address = backup.url.removeprefix("http://")
    with closed_port() as port:
        env = base_env(
            sandbox,
            **job_extra_env,
            JOB_PYTHON=job_python,
            ORTHANC_MAIN_URL=f"http://127.0.0.1:{port}",
            ORTHANC_MAIN_USERNAME="admin",
            ORTHANC_MAIN_PASSWORD=TRICKY_VALUE,
            ORTHANC_BACKUP_URL=f"http://admin:url-secret@{backup_address}",
            ROTATE_RETRIES=0,
            ROTATE_CONNECT_TIMEOUT=2,
            JOB_USER=job_user,
        )
        entrypoint = Entrypoint(env)
        try:
            exit_status = entrypoint.wait(STARTUP_TIMEOUT_S)
        finally:
            entrypoint.kill_all()
    output = entrypoint.stdout + entrypoint.stderr
    assert exit_status != 0
    assert "rotate_studies.py --check failed with exit status" in entrypoint.stderr
    assert f"127.0.0.1:{port}" in output
    assert "ORTHANC_MAIN_PASSWORD=(set)" in entrypoint.stdout
    assert "ORTHANC_BACKUP_URL=http://admin:***@127.0.0.1:" in entrypoint.stdout
    assert "p@ss word" not in output
    assert "url-secret" not in output
    assert "Traceback" not in output
    assert not (sandbox / "cron.d" / "pacs-rotate").exists()
    assert not (sandbox / "run" / "job.env").exists()


def write_fake_tool(sandbox: Path) -> Path:
    """A stand-in for python3 that records who ran it and waits for SIGTERM.

    The TERM trap is set before "fake tool stdout", the line a test waits for
    before it stops the entrypoint, so the signal cannot arrive before it.
    """
    tool = sandbox / "bin" / "fake-python"
    tool.write_text(
        """#!/bin/bash
out="$LOG_DIR/fake-tool"
if [[ " $* " == *" --check "* ]]; then exit 0; fi
if [[ -n ${FAKE_TOOL_IGNORE_TERM:-} ]]; then
    trap '' TERM
else
    trap 'echo TERM >"$out.signal"; kill "${sleeper:-}" 2>/dev/null; exit 143' TERM
fi
id -u >"$out.uid"
echo $$ >"$out.pid"
printf %s "$PACS_ROTATE_TEST_VALUE" >"$out.value"
echo "fake tool stdout"
echo "fake tool stderr" >&2
if [[ -n ${FAKE_TOOL_IGNORE_TERM:-} ]]; then exec sleep 60; fi
sleep 60 &
sleeper=$!
wait "$sleeper"
"""
    )
    tool.chmod(0o755)
    return tool


@requires_root
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_entrypoint_drops_privileges(sandbox, stop_signal):
    """RUN_ON_START runs the job as nobody, and SIGTERM or SIGINT stops it."""
    logs = sandbox / "audit logs"
    env = base_env(
        sandbox,
        ORTHANC_MAIN_URL="http://127.0.0.1:9",
        ORTHANC_BACKUP_URL="http://127.0.0.1:9",
        JOB_USER=NOBODY,
        JOB_PYTHON=write_fake_tool(sandbox),
        RUN_ON_START=1,
        PACS_ROTATE_TEST_VALUE=TRICKY_VALUE,
    )
    entrypoint = Entrypoint(env)
    try:
        entrypoint.wait_for_stdout("fake tool stdout", STARTUP_TIMEOUT_S)
        wait_for_job_pid_file(sandbox, entrypoint)
        stop_started = time.monotonic()
        entrypoint.process.send_signal(stop_signal)
        exit_status = entrypoint.wait(STOP_TIMEOUT_S)
        stop_seconds = time.monotonic() - stop_started
    finally:
        entrypoint.kill_all()
    assert (logs / "fake-tool.uid").read_text().strip() == "65534"
    assert (logs / "fake-tool.value").read_text() == TRICKY_VALUE
    assert (logs / "fake-tool.signal").read_text().strip() == "TERM"
    assert "fake tool stderr" in entrypoint.stderr
    assert read_status(logs / "last_run.status")["exit_status"] == "143"
    assert exit_status == 0
    assert stop_seconds < STOP_TIMEOUT_S
    assert f"received {stop_signal.name}" in entrypoint.stdout
    assert not (sandbox / "cron.d" / "pacs-rotate").exists()
    assert list((sandbox / "run").glob("job.*.pid")) == []
    assert (sandbox / "run" / "stopping").exists()


@requires_root
def test_entrypoint_kills_stuck_job(sandbox):
    """A job that ignores SIGTERM is killed after JOB_STOP_TIMEOUT."""
    env = base_env(
        sandbox,
        ORTHANC_MAIN_URL="http://127.0.0.1:9",
        ORTHANC_BACKUP_URL="http://127.0.0.1:9",
        JOB_USER=NOBODY,
        JOB_PYTHON=write_fake_tool(sandbox),
        JOB_STOP_TIMEOUT=1,
        RUN_ON_START=1,
        FAKE_TOOL_IGNORE_TERM=1,
    )
    entrypoint = Entrypoint(env)
    try:
        entrypoint.wait_for_stdout("fake tool stdout", STARTUP_TIMEOUT_S)
        wait_for_job_pid_file(sandbox, entrypoint)
        tool_pid = int((sandbox / "audit logs" / "fake-tool.pid").read_text())
        entrypoint.process.send_signal(signal.SIGTERM)
        exit_status = entrypoint.wait(STOP_TIMEOUT_S)
        # Checked before kill_all, whose SIGKILL to the process group would
        # also end a job that entrypoint.sh left running.
        tool_survived = process_running(tool_pid)
    finally:
        entrypoint.kill_all()
    assert exit_status == 0
    assert "killing processes still running after 1s" in entrypoint.stdout
    assert not tool_survived


@requires_root
@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("CRON_SCHEDULE", "every monday", "invalid CRON_SCHEDULE 'every monday'"),
        ("CRON_SCHEDULE", "0 3 * *", "invalid CRON_SCHEDULE '0 3 * *'"),
        ("RUN_ON_START", "maybe", "invalid RUN_ON_START 'maybe'"),
        ("JOB_USER", "no-such-user-x", "JOB_USER 'no-such-user-x' does not exist"),
        ("JOB_STOP_TIMEOUT", "soon", "invalid JOB_STOP_TIMEOUT 'soon'"),
    ],
)
def test_entrypoint_invalid_setting(sandbox, setting, value, message):
    env = base_env(sandbox, **{setting: value})
    result = subprocess.run(
        ["bash", str(ENTRYPOINT)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def write_env_file(path: Path, values: dict) -> Path:
    """Write an environment file as entrypoint.sh does, quoting with %q."""
    script = 'for name in "$@"; do printf "export %s=%q\\n" "$name" "${!name}"; done'
    result = subprocess.run(
        ["bash", "-c", script, "bash", *values],
        check=True,
        capture_output=True,
        text=True,
        env={**values, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    path.write_text(result.stdout)
    return path


def run_job_script(*args) -> subprocess.CompletedProcess:
    """Run run_rotation.sh with `args` and PATH as its only variable, as cron does."""
    return subprocess.run(
        ["bash", str(RUN_ROTATION), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        timeout=60,
    )


def test_run_rotation_lock_held(sandbox):
    """A held lock ends the run with status 3, recorded for the health check."""
    logs = sandbox / "audit logs"
    values = base_env(
        sandbox,
        ORTHANC_MAIN_URL="http://127.0.0.1:9",
        ORTHANC_BACKUP_URL="http://127.0.0.1:9",
        ROTATE_LOCK_FILE=logs / "rotate.lock",
        JOB_USER="root",
        JOB_PYTHON=sys.executable,
        JOB_STDOUT=logs / "job stdout.txt",
        JOB_STDERR=logs / "job stderr.txt",
    )
    env_file = write_env_file(sandbox / "run" / "job.env", values)

    with open(logs / "rotate.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_job_script("--env-file", env_file)
    health = healthcheck(values)

    assert result.returncode == 3
    assert result.stdout == ""
    assert "exited with status 3" in (logs / "job stdout.txt").read_text()
    assert "another run holds the lock" in (logs / "job stderr.txt").read_text()
    assert read_status(logs / "last_run.status")["exit_status"] == "3"
    assert not (logs / "log_migracion.csv").exists()
    assert health.returncode == 1
    assert "exited with status 3" in health.stdout


def test_run_rotation_stopping_starts_nothing(sandbox):
    """A job that cron starts while the container stops never runs the tool."""
    logs = sandbox / "audit logs"
    values = base_env(
        sandbox,
        ORTHANC_MAIN_URL="http://127.0.0.1:9",
        ORTHANC_BACKUP_URL="http://127.0.0.1:9",
        JOB_USER="root",
        JOB_PYTHON=write_fake_tool(sandbox),
    )
    env_file = write_env_file(sandbox / "run" / "job.env", values)
    # entrypoint.sh creates this marker before it signals the running jobs.
    (sandbox / "run" / "stopping").touch()

    result = run_job_script("--env-file", env_file, "--no-redirect")

    assert result.returncode == 143, result.stderr
    assert "rotate_studies.py was not started" in result.stdout
    assert not (logs / "fake-tool.pid").exists()
    assert not (logs / "last_run.status").exists()
    assert list((sandbox / "run").glob("job.*")) == [sandbox / "run" / "job.env"]


def test_run_rotation_missing_env_file(sandbox):
    result = run_job_script("--env-file", sandbox / "absent.env")
    assert result.returncode == 2
    assert "environment file" in result.stderr
    assert "absent.env not found" in result.stderr


HOUR = 3600


@pytest.mark.parametrize(
    ("status", "started_ago", "max_age", "healthy", "message"),
    [
        ((0, 1 * HOUR), 2 * HOUR, None, True, "with status 0"),
        ((1, 1 * HOUR), 2 * HOUR, None, False, "exited with status 1"),
        ((0, 200 * HOUR), 300 * HOUR, None, False, "in the last 200 h (limit 192 h)"),
        ((0, 200 * HOUR), 1 * HOUR, None, True, "with status 0"),
        ((0, 2 * HOUR), 3 * HOUR, "1", False, "in the last 2 h (limit 1 h)"),
        (None, 1 * HOUR, None, True, "no run yet"),
        (None, 193 * HOUR, None, False, "since the container started"),
        (None, None, None, False, "has not finished starting"),
        ((0, 1 * HOUR), 1 * HOUR, "0", False, "invalid ROTATE_HEALTH_MAX_AGE_HOURS"),
        ("garbage", 1 * HOUR, None, False, "unreadable or incomplete"),
    ],
)
def test_healthcheck_verdict(sandbox, status, started_ago, max_age, healthy, message):
    now = int(time.time())
    env = base_env(sandbox)
    if max_age is not None:
        env["ROTATE_HEALTH_MAX_AGE_HOURS"] = max_age
    if started_ago is not None:
        (sandbox / "run" / "started").write_text(f"{now - started_ago}\n")
    status_file = sandbox / "audit logs" / "last_run.status"
    if status == "garbage":
        status_file.write_text("exit_status=\n")
    elif status is not None:
        exit_status, finished_ago = status
        status_file.write_text(
            f"finished_epoch={now - finished_ago}\nexit_status={exit_status}\n"
        )
    result = healthcheck(env)
    assert result.returncode == (0 if healthy else 1)
    assert result.stdout.startswith("healthy:" if healthy else "unhealthy:")
    assert message in result.stdout


def dockerfile_copy_sources() -> list[str]:
    """File names of the COPY instructions of the Dockerfile."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        words = line.split()
        if words and words[0] == "COPY":
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    return sources


def test_dockerfile_copies_existing_files():
    sources = dockerfile_copy_sources()
    missing = [name for name in sources if not (REPO / name).is_file()]
    assert "rotate_studies.py" in sources
    assert missing == []


def test_dockerignore_keeps_copied_files():
    kept = {
        line[1:]
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert set(dockerfile_copy_sources()) <= kept


def test_container_scripts_executable():
    for script in (ENTRYPOINT, RUN_ROTATION, HEALTHCHECK, REPO / "resumen_csv.sh"):
        assert os.access(script, os.X_OK), f"{script.name} lacks the execute bit"
