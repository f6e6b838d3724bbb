"""Time rotate_studies.py against Orthanc's own peer transfer and a naive copy.

Starts two throwaway Orthanc servers on 127.0.0.1 (Main, with Backup in its
OrthancPeers) and writes synthetic studies with random pixel data. For each
method it reloads Main, empties Backup, runs the method as a subprocess under
/usr/bin/time -v and checks that every SOP instance moved. It prints Markdown
tables, and with --output writes them with a machine description to a file.

Run from the repository root:
    .venv/bin/python bench/bench.py [--studies 10 --instances 100
        --instance-kib 512] [--big-study-mb 1024] [--tiny]
        [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import (  # noqa: E402  (bench/ is sys.path[0] when run as a script)
    Measurement,
    describe_machine,
    format_document,
    format_table,
)

from tests.dicom_studies import Study, write_study  # noqa: E402
from tests.orthanc import OrthancServer  # noqa: E402

TOOL = REPO / "rotate_studies.py"
BASELINES = REPO / "bench" / "baselines.py"
TIME_BINARY = "/usr/bin/time"
PEER_NAME = "backup"
# Far older than the tool's default ROTATE_DAYS of 180, so every study is due.
STUDY_DATE = "20150101"
UPLOAD_THREADS = 4
STABLE_TIMEOUT_S = 120
METHODS = ("anchor", "naive", "zip", "instances", "workers", "zip-workers", "big")


@dataclass
class Dataset:
    """Studies written to disk once and loaded into Main before every run."""

    label: str
    studies: list[Study]

    @property
    def paths(self) -> list[Path]:
        return [path for study in self.studies for path in study.paths]

    @property
    def payload_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.paths)


@dataclass
class Servers:
    main: OrthancServer
    backup: OrthancServer


@dataclass
class ClientRun:
    """A copy method: the command to time and how to read what it did."""

    method: str
    command: list[str]
    env: dict
    run_dir: Path
    csv_path: Path | None = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time rotate_studies.py against Orthanc's peer transfer."
    )
    parser.add_argument("--studies", type=int, default=10, help="number of studies")
    parser.add_argument(
        "--instances", type=int, default=100, help="instances per study"
    )
    parser.add_argument(
        "--instance-kib", type=int, default=512, help="pixel data per instance, KiB"
    )
    parser.add_argument(
        "--big-study-mb",
        type=int,
        default=1024,
        help="size in MiB of the single study used for the peak RSS runs; 0 skips it",
    )
    parser.add_argument(
        "--workers",
        default="1,2,4,8",
        help="comma-separated --workers values to sweep in instances and zip mode",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} to run",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="2 studies x 3 instances x 16 KiB, no big study, workers 1 and 2",
    )
    parser.add_argument("--output", type=Path, help="write the Markdown report here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.studies, args.instances, args.instance_kib = 2, 3, 16
        args.big_study_mb = 0
        args.workers = "1,2"
    args.workers = [int(value) for value in args.workers.split(",")]
    args.methods = args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {','.join(METHODS)}")
    return args


def check_prerequisites(args: argparse.Namespace) -> None:
    if not Path(TIME_BINARY).exists():
        sys.exit(f"{TIME_BINARY} not found: install the Debian package 'time'")
    tool_methods = {"zip", "instances", "workers", "big"} & set(args.methods)
    if tool_methods and not TOOL.exists():
        sys.exit(f"{TOOL} not found: run with --methods anchor,naive")


# Data sets


def write_dataset(
    directory: Path, label: str, studies: int, instances: int, instance_kib: int
) -> Dataset:
    written = []
    for number in range(1, studies + 1):
        written.append(
            write_study(
                directory / f"study-{number:03d}",
                study_date=STUDY_DATE,
                patient_id=f"BENCH{number:03d}",
                patient_name=f"Bench^Patient{number}",
                instances=instances,
                pixel_bytes=instance_kib * 1024,
            )
        )
    return Dataset(label, written)


def write_datasets(directory: Path, args: argparse.Namespace) -> dict[str, Dataset]:
    label = f"{args.studies} × {args.instances} × {args.instance_kib} KiB"
    datasets = {
        "studies": write_dataset(
            directory / "studies",
            label,
            args.studies,
            args.instances,
            args.instance_kib,
        )
    }
    if args.big_study_mb > 0 and "big" in args.methods:
        instances = math.ceil(args.big_study_mb * 1024 / args.instance_kib)
        big_label = f"1 × {instances} × {args.instance_kib} KiB"
        datasets["big"] = write_dataset(
            directory / "big", big_label, 1, instances, args.instance_kib
        )
    return datasets


# Servers and state


def start_servers(root: Path) -> Servers:
    backup = OrthancServer(root, "backup")
    main = OrthancServer(
        root, "main", config={"OrthancPeers": {PEER_NAME: [backup.url + "/"]}}
    )
    backup.start()
    try:
        main.start()
    except Exception:
        backup.stop()
        raise
    return Servers(main, backup)


def stop_servers(servers: Servers) -> None:
    servers.main.stop()
    servers.backup.stop()


def load_main(servers: Servers, dataset: Dataset) -> None:
    """Reset the servers: Main contains only `dataset` and Backup is empty."""
    servers.backup.wipe()
    servers.main.wipe()
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(servers.main.upload, dataset.paths))
    servers.main.wait_stable(timeout=STABLE_TIMEOUT_S)
    if servers.backup.study_ids():
        raise RuntimeError("Backup is not empty after wipe()")


def check_moved(servers: Servers, dataset: Dataset, method: str) -> None:
    """Raise RuntimeError unless every SOP instance is on Backup and none on Main."""
    missing = left = 0
    for study in dataset.studies:
        expected = set(study.sop_instance_uids)
        uid = study.study_instance_uid
        missing += len(expected - servers.backup.sop_uids(uid))
        left += len(servers.main.sop_uids(uid))
    if missing or left:
        raise RuntimeError(
            f"{method} on {dataset.label}: {missing} SOP instances missing on Backup, "
            f"{left} still on Main; the measurement is discarded"
        )


def orthanc_cpu_s(servers: Servers) -> float:
    """Return user + system CPU seconds used so far by both Orthanc processes."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    total = 0
    for server in (servers.main, servers.backup):
        fields = Path(f"/proc/{server.process.pid}/stat").read_text()
        # The command name in parentheses may contain spaces, so split after it.
        # utime and stime are fields 14 and 15 of the whole line (proc(5)).
        after_name = fields.rsplit(")", 1)[1].split()
        total += int(after_name[11]) + int(after_name[12])
    return total / ticks_per_s


# Client runs


def client_env(extra: dict[str, str]) -> dict[str, str]:
    """Return the environment without inherited ORTHANC_/ROTATE_ settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ORTHANC_", "ROTATE_"))
    }
    env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def baseline_run(method: str, servers: Servers, run_dir: Path) -> ClientRun:
    command = [
        sys.executable,
        str(BASELINES),
        method,
        "--main-url",
        servers.main.url,
        "--backup-url",
        servers.backup.url,
        "--peer",
        PEER_NAME,
    ]
    return ClientRun(method, command, client_env({}), run_dir)


def tool_run(
    servers: Servers, run_dir: Path, transfer: str, extra_args: list[str]
) -> ClientRun:
    csv_path = run_dir / "log_migracion.csv"
    env = client_env(
        {
            "ORTHANC_MAIN_URL": servers.main.url,
            "ORTHANC_BACKUP_URL": servers.backup.url,
            "ROTATE_LOG_CSV": str(csv_path),
            "ROTATE_LOCK_FILE": str(run_dir / "rotate.lock"),
            "ROTATE_MIN_IDLE_MINUTES": "0",
        }
    )
    arguments = ["--transfer", transfer, *extra_args]
    method = shlex.join(["rotate_studies.py", *arguments])
    command = [sys.executable, str(TOOL), *arguments]
    return ClientRun(method, command, env, run_dir, csv_path)


def parse_time_report(text: str) -> tuple[int, float]:
    """Return (peak RSS KiB, user + system CPU s) from `/usr/bin/time -v` output."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    if not (rss and user and system):
        raise RuntimeError(f"unexpected {TIME_BINARY} -v output:\n{text}")
    return int(rss.group(1)), float(user.group(1)) + float(system.group(1))


def read_transfers(csv_path: Path) -> str:
    """Return the tool's CSV `transfer` values, raising unless every row migrated."""
    with csv_path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    statuses = {row["status"] for row in rows}
    if statuses != {"migrated"}:
        raise RuntimeError(f"{csv_path}: expected only status migrated, got {statuses}")
    return ",".join(sorted({row["transfer"] for row in rows}))


def measure(servers: Servers, dataset: Dataset, run: ClientRun) -> Measurement:
    """Reload Main, time one client run, and check that every instance moved."""
    load_main(servers, dataset)
    run.run_dir.mkdir(parents=True)
    time_path = run.run_dir / "time.txt"
    command = [TIME_BINARY, "-v", "-o", str(time_path), *run.command]
    print(f"running {run.method} on {dataset.label}", file=sys.stderr, flush=True)
    cpu_before = orthanc_cpu_s(servers)
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=run.run_dir, env=run.env, capture_output=True, text=True
    )
    wall_s = time.perf_counter() - started
    cpu_s = orthanc_cpu_s(servers) - cpu_before
    (run.run_dir / "stderr.txt").write_text(result.stderr)
    if result.returncode != 0:
        raise RuntimeError(
            f"{run.method} exited with {result.returncode}; stderr ends with:\n"
            f"{result.stderr[-3000:]}"
        )
    check_moved(servers, dataset, run.method)
    peak_rss_kib, client_cpu_s = parse_time_report(time_path.read_text())
    transfer = read_transfers(run.csv_path) if run.csv_path else run.method
    return Measurement(
        method=run.method,
        dataset=dataset.label,
        payload_bytes=dataset.payload_bytes,
        wall_s=wall_s,
        peak_rss_kib=peak_rss_kib,
        client_cpu_s=client_cpu_s,
        orthanc_cpu_s=cpu_s,
        transfer=transfer,
    )


# Benchmark plan


def measure_methods(
    servers: Servers, dataset: Dataset, runs_dir: Path, methods: list[str]
) -> list[Measurement]:
    runs = []
    for method in ("anchor", "naive"):
        if method in methods:
            runs.append(baseline_run(method, servers, runs_dir / method))
    for transfer in ("zip", "instances"):
        if transfer in methods:
            runs.append(tool_run(servers, runs_dir / transfer, transfer, []))
    return [measure(servers, dataset, run) for run in runs]


def measure_workers(
    servers: Servers,
    dataset: Dataset,
    runs_dir: Path,
    transfer: str,
    workers: list[int],
) -> list[Measurement]:
    """Time the tool once per --workers value.

    Instances mode copies the instances of one study in parallel, and zip mode
    copies that many studies at once.
    """
    results = []
    for count in workers:
        run_dir = runs_dir / f"{transfer}-workers-{count}"
        run = tool_run(servers, run_dir, transfer, ["--workers", str(count)])
        results.append(measure(servers, dataset, run))
    return results


def measure_big_study(
    servers: Servers, dataset: Dataset, runs_dir: Path, big_study_mb: int
) -> list[Measurement]:
    # A ~1 GiB study can exceed the default --zip-max-mb of 1024 because of the
    # DICOM headers, so raise the limit to make sure the ZIP path is measured.
    zip_limit = str(max(1024, 2 * big_study_mb))
    runs = [
        tool_run(servers, runs_dir / "big-instances", "instances", []),
        tool_run(servers, runs_dir / "big-zip", "zip", ["--zip-max-mb", zip_limit]),
        baseline_run("naive", servers, runs_dir / "big-naive"),
    ]
    return [measure(servers, dataset, run) for run in runs]


def run_benchmark(
    args: argparse.Namespace, work_dir: Path, machine
) -> list[tuple[str, str]]:
    """Run every requested method and return (title, Markdown table) sections."""
    datasets = write_datasets(work_dir / "data", args)
    servers = start_servers(work_dir / "orthanc")
    try:
        machine.orthanc_version = servers.main.get_json("/system")["Version"]
        return measure_all(args, servers, datasets, work_dir / "runs")
    finally:
        stop_servers(servers)


def measure_all(
    args: argparse.Namespace,
    servers: Servers,
    datasets: dict[str, Dataset],
    runs_dir: Path,
) -> list[tuple[str, str]]:
    studies = datasets["studies"]
    methods = measure_methods(servers, studies, runs_dir, args.methods)
    anchor = next((m.wall_s for m in methods if m.method == "anchor"), None)
    sections = [("Methods", format_table(methods, anchor))]
    for method, transfer in (("workers", "instances"), ("zip-workers", "zip")):
        if method in args.methods:
            sweep = measure_workers(servers, studies, runs_dir, transfer, args.workers)
            title = f"Workers sweep, {transfer} mode"
            sections.append((title, format_table(sweep, anchor)))
    if "big" in datasets:
        big = measure_big_study(servers, datasets["big"], runs_dir, args.big_study_mb)
        sections.append(("One big study: peak RSS", format_table(big, None)))
    return sections


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_prerequisites(args)
    machine = describe_machine(Path(sys.executable), TOOL)
    work_dir = Path(tempfile.mkdtemp(prefix="pacs-rotate-bench-"))
    try:
        sections = run_benchmark(args, work_dir, machine)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    for title, table in sections:
        print(f"## {title}\n\n{table}\n")
    if args.output:
        command = shlex.join([".venv/bin/python", "bench/bench.py", *argv])
        now = datetime.datetime.now(datetime.UTC)
        date = now.strftime("%Y-%m-%d %H:%M UTC")
        document = format_document(
            command=command, date=date, machine=machine, sections=sections
        )
        args.output.write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
