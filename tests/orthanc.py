"""Start and drive throwaway Orthanc servers for the end-to-end tests."""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ORTHANC_BINARY = "/usr/sbin/Orthanc"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 15
LOG_TAIL_LINES = 40
PORT_ATTEMPTS = 3
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this ran."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PortInUseError(RuntimeError):
    """Another process listens on the port chosen for an Orthanc test server."""


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child when pytest exits, even if pytest is killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def libfaketime_path() -> Path:
    """Locate the multithread-safe libfaketime from Debian's faketime package."""
    matches = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
    if not matches:
        raise RuntimeError(
            "libfaketimeMT.so.1 not found under /usr/lib/*/faketime: "
            "install it with `apt-get install faketime`"
        )
    return matches[0]


def base_config(name: str, port: int, directory: Path) -> dict:
    """Build the Orthanc configuration shared by every test server."""
    return {
        "Name": name,
        "HttpPort": port,
        "DicomServerEnabled": False,
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "storage"),
        # Orthanc 1.10.1 has no option for the HTTP bind address, so it
        # listens on every interface. Rejecting remote clients keeps the
        # servers reachable from 127.0.0.1 only.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "StableAge": 1,
        "SaveJobs": False,
    }


class OrthancServer:
    """One Orthanc process with its own port, storage and log in `root/name`."""

    def __init__(self, root: Path, name: str, config: dict | None = None):
        self.name = name
        self.directory = Path(root) / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = self.directory / "config.json"
        self.log_path = self.directory / "orthanc.log"
        self.overrides: dict = dict(config or {})
        self.faketime: str | None = None
        # A random suffix in Orthanc's Name identifies this server in /system.
        self.orthanc_name = f"{name}-{secrets.token_hex(4)}"
        self.started_once = False
        self.process: subprocess.Popen | None = None
        self.log_file = None
        self.session = requests.Session()
        # Proxy variables from the environment must never route test traffic.
        self.session.trust_env = False

    # Process control

    def start(self, faketime: str | None = None) -> None:
        """Start Orthanc and wait until GET /system returns this server's Name.

        `faketime` is a libfaketime FAKETIME value such as "-400d", which
        shifts the clock Orthanc uses for LastUpdate. Only the first start
        moves to a new port when the chosen one is taken, so `url` never
        changes across restarts.
        """
        if self.is_running():
            raise RuntimeError(f"Orthanc {self.name} is already running")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                self._launch(faketime)
                self.started_once = True
                return
            except PortInUseError:
                self.kill()
                if self.started_once or attempt == PORT_ATTEMPTS:
                    raise
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop Orthanc with SIGTERM, its clean shutdown, and wait for it to exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Stop Orthanc with SIGKILL, as a process crash would."""
        self._end(signal.SIGKILL)

    def restart(self, config: dict | None = None, faketime: str | None = None) -> None:
        """Restart with `config` replacing the previous overrides (None keeps them)."""
        self.stop()
        if config is not None:
            self.overrides = dict(config)
        self.start(faketime=faketime)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_path.exists():
            return "(no log written)"
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _command(self) -> list[str]:
        return [ORTHANC_BINARY, str(self.config_path)]

    def _environment(self, faketime: str | None) -> dict:
        """Preload libfaketime directly instead of running the `faketime` wrapper.

        The wrapper forks Orthanc as a child and exits on SIGTERM without
        forwarding it, which would leave Orthanc holding the port.
        """
        env = dict(os.environ)
        if faketime is None:
            return env
        env["LD_PRELOAD"] = str(libfaketime_path())
        env["FAKETIME"] = faketime
        # A clock offset of hundreds of days applied to CLOCK_MONOTONIC
        # would break the timers Orthanc uses for StableAge and HTTP.
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        return env

    def _open_log(self):
        """Open the log for appending, so every restart keeps earlier output."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _end
        log.write(f"\n==== start {time.strftime('%H:%M:%S')} ====\n".encode())
        log.flush()
        return log

    def _launch(self, faketime: str | None) -> None:
        config = base_config(self.orthanc_name, self.port, self.directory)
        config.update(self.overrides)
        self.config_path.write_text(json.dumps(config, indent=2))
        self.faketime = faketime
        self.log_file = self._open_log()
        self.process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=self._environment(faketime),
            preexec_fn=_die_with_parent,
        )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                reason = f"exited with {self.process.returncode}"
                if "already in use" in self.log_tail():
                    self._raise_start_failure(reason, PortInUseError)
                self._raise_start_failure(reason)
            try:
                response = self.session.get(self.url + "/system", timeout=1)
            except requests.RequestException:
                response = None
            if response is not None and response.ok:
                # Another process on this port must never be mistaken for
                # this server, because wipe() would delete its data.
                name = response.json().get("Name")
                if name == self.orthanc_name:
                    return
                reason = f"found another server named {name!r} on its port"
                self._raise_start_failure(reason, PortInUseError)
            time.sleep(0.1)
        self.kill()
        reason = f"did not respond to GET /system within {START_TIMEOUT_S} s"
        self._raise_start_failure(reason)

    def _raise_start_failure(self, reason: str, error=RuntimeError) -> None:
        raise error(
            f"Orthanc {self.name} on port {self.port} {reason}. "
            f"Log {self.log_path} ends with:\n{self.log_tail()}"
        )

    def _end(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        # An open keep-alive connection delays Orthanc's HTTP server shutdown.
        self.session.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.log_file.close()

    # REST helpers

    def get_json(self, path: str, **params):
        response = self.session.get(self.url + path, params=params, timeout=60)
        _raise_for_status(response)
        return response.json()

    def post_json(self, path: str, body):
        """POST `body` as JSON, or as raw text when it is a str or bytes."""
        if isinstance(body, (str, bytes)):
            response = self.session.post(self.url + path, data=body, timeout=120)
        else:
            response = self.session.post(self.url + path, json=body, timeout=120)
        _raise_for_status(response)
        return response.json() if response.content else None

    def delete(self, path: str) -> None:
        _raise_for_status(self.session.delete(self.url + path, timeout=60))

    def get_bytes(self, path: str) -> bytes:
        response = self.session.get(self.url + path, timeout=120)
        _raise_for_status(response)
        return response.content

    # Content helpers

    def upload(self, path_or_bytes) -> dict:
        """POST one DICOM file (path or bytes) to /instances and return Orthanc's JSON.

        A ZIP body returns a list with one entry per file. Every entry must
        have Status Success or AlreadyStored.
        """
        if isinstance(path_or_bytes, (bytes, bytearray)):
            body = bytes(path_or_bytes)
        else:
            body = Path(path_or_bytes).read_bytes()
        response = self.session.post(self.url + "/instances", data=body, timeout=120)
        _raise_for_status(response)
        result = response.json()
        entries = result if isinstance(result, list) else [result]
        for entry in entries:
            status = entry.get("Status")
            assert status in ("Success", "AlreadyStored"), (
                f"Orthanc {self.name} rejected an upload: {entry}"
            )
        return result

    def upload_aged(self, paths, days_ago: int) -> None:
        """Upload `paths` so their LastUpdate is `days_ago` days in the past.

        Restarts Orthanc under faketime for the upload, then restarts it with
        the real clock and the current overrides. Both restarts use SIGKILL
        because a SIGTERM shutdown takes over 2 s. Orthanc commits each
        stored instance to its SQLite index before it sends the upload response, so
        killing the process loses nothing.
        """
        self.kill()
        self.start(faketime=f"-{days_ago}d")
        try:
            for path in paths:
                self.upload(path)
        finally:
            self.kill()
            self.start()

    def study_ids(self) -> list[str]:
        return self.get_json("/studies")

    def study_ids_for_uid(self, study_instance_uid: str) -> list[str]:
        """Return the ID of every Orthanc study whose StudyInstanceUID matches."""
        matches = self.post_json("/tools/lookup", study_instance_uid)
        return [match["ID"] for match in matches if match["Type"] == "Study"]

    def sop_uids(self, study_instance_uid: str) -> set[str]:
        """Return the SOPInstanceUIDs stored under every study with that UID."""
        return {
            instance["MainDicomTags"]["SOPInstanceUID"]
            for instance in self._study_instances(study_instance_uid)
        }

    def instance_ids(self, study_instance_uid: str) -> list[str]:
        return [
            instance["ID"] for instance in self._study_instances(study_instance_uid)
        ]

    def _study_instances(self, study_instance_uid: str) -> list[dict]:
        """List the instances of every study with that UID.

        A deletion still running on the server can remove a study between the
        lookup and its listing, so a study that returns 404 adds no instances.
        """
        instances = []
        for study_id in self.study_ids_for_uid(study_instance_uid):
            response = self.session.get(
                f"{self.url}/studies/{study_id}/instances", timeout=60
            )
            if response.status_code == 404:
                continue
            _raise_for_status(response)
            instances += response.json()
        return instances

    def upload_stable(self, paths) -> None:
        """Upload every file in `paths`, then wait until every study is stable.

        The tool holds back studies that Main reports as not stable.
        """
        for path in paths:
            self.upload(path)
        self.wait_stable()

    def wait_stable(self, timeout: float = 10) -> None:
        """Poll until every study IsStable, or raise TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            studies = self.get_json("/studies", expand="")
            unstable = [s["ID"] for s in studies if not s["IsStable"]]
            if not unstable:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Orthanc {self.name}: studies {unstable} still unstable "
                    f"after {timeout} s"
                )
            time.sleep(0.2)

    def wipe(self) -> None:
        """Delete every patient, so every study and instance goes with them."""
        patients = self.get_json("/patients")
        if patients:
            self.post_json("/tools/bulk-delete", {"Resources": patients})


def stop_all(servers) -> None:
    """Stop several servers in parallel, since each SIGTERM shutdown takes ~2 s."""
    with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
        list(pool.map(OrthancServer.stop, servers))


def _raise_for_status(response: requests.Response) -> None:
    if response.ok:
        return
    raise requests.HTTPError(
        f"{response.request.method} {response.url} returned "
        f"{response.status_code}: {response.text[:500]}",
        response=response,
    )
