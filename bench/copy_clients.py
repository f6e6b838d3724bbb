"""Compare the client CPU of HTTP libraries copying instance files.

Instances mode copies each file with two requests, GET /instances/{id}/file
from Main and POST /instances to Backup, so the client's work per request
decides how much CPU is left to the two Orthanc servers. This script starts
two throwaway Orthanc servers on 127.0.0.1, loads one study into Main, and
copies it to an empty Backup with each client in turn, 4 threads each:

- `requests`: a requests.Session, as the tool copied files before;
- `requests, no environment`: the same with trust_env off, which skips the
  proxy and netrc lookups requests makes on every call;
- `urllib3`: a urllib3 connection pool, the library under requests;
- `http.client`: one standard-library connection per thread and server;
- `rotate_studies.py`: the tool's own copy_instance.

Every client sends Accept-Encoding: identity. It prints one Markdown table
with wall time, client CPU (user + system of this process) and Orthanc CPU.

Run from the repository root:
    .venv/bin/python bench/copy_clients.py [--instances 300] [--instance-kib 512]
        [--repeats 2]
"""

from __future__ import annotations

import argparse
import http.client
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rotate_studies  # noqa: E402
from bench import Servers, orthanc_cpu_s  # noqa: E402  (bench/bench.py)
from tests.dicom_studies import write_study  # noqa: E402
from tests.orthanc import OrthancServer, stop_all  # noqa: E402

THREADS = 4
IDENTITY = {"Accept-Encoding": "identity"}
DICOM = {"Content-Type": "application/dicom"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--instance-kib", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    return parser.parse_args(argv)


# Copy functions: each returns a function that copies one instance by ID.


def requests_copier(main_url: str, backup_url: str, trust_env: bool = True):
    session = requests.Session()
    session.trust_env = trust_env
    session.headers.update(IDENTITY)

    def copy(instance_id: str) -> None:
        response = session.get(f"{main_url}/instances/{instance_id}/file")
        response.raise_for_status()
        stored = session.post(
            f"{backup_url}/instances", data=response.content, headers=DICOM
        )
        stored.raise_for_status()

    return copy


def urllib3_copier(main_url: str, backup_url: str):
    pools = urllib3.PoolManager(maxsize=THREADS * 2, retries=False)

    def copy(instance_id: str) -> None:
        response = pools.request(
            "GET", f"{main_url}/instances/{instance_id}/file", headers=IDENTITY
        )
        stored = pools.request(
            "POST", f"{backup_url}/instances", body=response.data, headers=DICOM
        )
        if response.status != 200 or stored.status != 200:
            raise RuntimeError(
                f"copy failed: GET returned HTTP {response.status}, "
                f"POST returned HTTP {stored.status}"
            )

    return copy


def http_client_copier(main_url: str, backup_url: str):
    local = threading.local()

    def connection(url: str) -> http.client.HTTPConnection:
        if not hasattr(local, url):
            parts = urlsplit(url)
            setattr(local, url, http.client.HTTPConnection(parts.hostname, parts.port))
        return getattr(local, url)

    def copy(instance_id: str) -> None:
        main, backup = connection(main_url), connection(backup_url)
        main.request("GET", f"/instances/{instance_id}/file", headers=IDENTITY)
        response = main.getresponse()
        data = response.read()
        backup.request("POST", "/instances", body=data, headers=DICOM)
        stored = backup.getresponse()
        stored.read()
        if response.status != 200 or stored.status != 200:
            raise RuntimeError(
                f"copy failed: GET returned HTTP {response.status}, "
                f"POST returned HTTP {stored.status}"
            )

    return copy


def tool_copier(main_url: str, backup_url: str, directory: Path):
    env_file = directory / "empty.env"
    env_file.touch()
    settings = rotate_studies.load_settings(
        [
            "--env-file", str(env_file),
            "--main-url", main_url,
            "--backup-url", backup_url,
            "--log-csv", str(directory / "log.csv"),
        ],
        {},
    )  # fmt: skip
    main = rotate_studies.OrthancClient(settings.main, settings)
    backup = rotate_studies.OrthancClient(settings.backup, settings)
    stop = threading.Event()

    def copy(instance_id: str) -> None:
        instance = rotate_studies.MainInstance(instance_id, "", 0)
        rotate_studies.copy_instance(main, backup, instance, stop)

    return copy


# Measurement


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(copy, instance_ids: list[str], servers) -> tuple[float, float, float]:
    """Copy every instance with THREADS threads; return wall, client, Orthanc s."""
    servers.backup.wipe()
    orthanc_before, client_before = orthanc_cpu_s(servers), client_cpu_s()
    started = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(copy, instance_ids))
    wall = time.perf_counter() - started
    client = client_cpu_s() - client_before
    orthanc = orthanc_cpu_s(servers) - orthanc_before
    copied = len(servers.backup.get_json("/instances"))
    if copied != len(instance_ids):
        raise RuntimeError(
            f"copy incomplete: {copied} of {len(instance_ids)} instances on Backup"
        )
    return wall, client, orthanc


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacs-rotate-copy-") as temp:
        root = Path(temp)
        study = write_study(
            root / "study",
            instances=args.instances,
            pixel_bytes=args.instance_kib * 1024,
        )
        servers = Servers(OrthancServer(root, "main"), OrthancServer(root, "backup"))
        try:
            servers.main.start()
            servers.backup.start()
            for path in study.paths:
                servers.main.upload(path)
            instance_ids = servers.main.get_json("/instances")
            main_url, backup_url = servers.main.url, servers.backup.url
            copiers = {
                "requests": requests_copier(main_url, backup_url),
                "requests, no environment": requests_copier(
                    main_url, backup_url, trust_env=False
                ),
                "urllib3": urllib3_copier(main_url, backup_url),
                "http.client": http_client_copier(main_url, backup_url),
                "rotate_studies.py": tool_copier(main_url, backup_url, root),
            }
            print(
                f"{len(instance_ids)} files of {args.instance_kib} KiB, "
                f"{THREADS} threads\n"
            )
            print("| client | wall s | client CPU s | Orthanc CPU s |")
            print("|---|---:|---:|---:|")
            for _ in range(args.repeats):
                for name, copy in copiers.items():
                    wall, client, orthanc = measure(copy, instance_ids, servers)
                    print(f"| {name} | {wall:.2f} | {client:.2f} | {orthanc:.2f} |")
        finally:
            stop_all([servers.main, servers.backup])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
