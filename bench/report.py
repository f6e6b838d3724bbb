"""Format benchmark measurements as Markdown and describe the machine they ran on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


@dataclass
class Measurement:
    """One timed run of a copy method over one data set."""

    method: str
    dataset: str
    payload_bytes: int
    wall_s: float
    peak_rss_kib: int
    client_cpu_s: float
    orthanc_cpu_s: float
    transfer: str

    @property
    def throughput_mib_s(self) -> float:
        return self.payload_bytes / MIB / self.wall_s


@dataclass
class Machine:
    """Facts about the host, collected before the benchmark servers start."""

    cpu_model: str
    cpu_count: int
    memory_gib: float
    python_version: str
    orthanc_version: str
    tool_revision: str
    load_before: tuple[float, float, float]
    other_orthanc_processes: int

    @property
    def is_shared(self) -> bool:
        return self.load_before[0] >= 0.5 or self.other_orthanc_processes > 0


def describe_machine(python: Path, tool: Path) -> Machine:
    """Collect CPU, memory, versions and the load left by other jobs."""
    return Machine(
        cpu_model=read_cpu_model(),
        cpu_count=os.cpu_count() or 0,
        memory_gib=read_memory_kib() / MIB,
        python_version=run_text([str(python), "--version"]).removeprefix("Python "),
        orthanc_version="",
        tool_revision=describe_tool(python, tool),
        load_before=os.getloadavg(),
        other_orthanc_processes=count_processes("Orthanc"),
    )


def describe_tool(python: Path, tool: Path) -> str:
    """Return the tool's last commit, whether it has local changes, and --workers."""
    if not tool.exists():
        return "not present"
    git = ["git", "-C", str(tool.parent)]
    commit = run_text([*git, "log", "-1", "--format=%h", "--", tool.name])
    changed = subprocess.run(
        [*git, "diff", "--quiet", "HEAD", "--", tool.name], check=False
    ).returncode
    state = "with uncommitted changes" if changed else "unchanged since then"
    help_text = run_text([str(python), str(tool), "--help"])
    # Match the option's own help entry, which starts a line, not the usage line.
    pattern = r"^\s+--workers N\s.*?\(default (\d+)\)"
    workers = re.search(pattern, help_text, re.MULTILINE | re.DOTALL)
    default = workers.group(1) if workers else "unknown"
    return f"last committed in {commit}, {state}; default --workers {default}"


def read_cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def read_memory_kib() -> int:
    text = Path("/proc/meminfo").read_text()
    match = re.search(r"^MemTotal:\s+(\d+) kB$", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def count_processes(name: str) -> int:
    """Count running processes whose executable name is `name`."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                count += 1
        except OSError:
            continue
    return count


def run_text(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return (result.stdout or result.stderr).strip()


def format_table(rows: list[Measurement], anchor_wall_s: float | None) -> str:
    """Render measurements as a Markdown table, with wall time relative to anchor."""
    lines = [
        "| method | data | transfer | wall s | × anchor | MiB/s "
        "| client peak RSS MiB | client CPU s | Orthanc CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = f"{row.wall_s / anchor_wall_s:.2f}" if anchor_wall_s else "–"
        lines.append(
            f"| {row.method} | {row.dataset} | {row.transfer} | {row.wall_s:.1f} "
            f"| {ratio} | {row.throughput_mib_s:.1f} | {row.peak_rss_kib / 1024:.0f} "
            f"| {row.client_cpu_s:.1f} | {row.orthanc_cpu_s:.1f} |"
        )
    return "\n".join(lines)


def format_machine(machine: Machine) -> str:
    load = ", ".join(f"{value:.2f}" for value in machine.load_before)
    lines = [
        f"- CPU: {machine.cpu_model}, {machine.cpu_count} logical CPUs (nproc)",
        f"- Memory: {machine.memory_gib:.1f} GiB",
        f"- Orthanc: {machine.orthanc_version} (Debian package)",
        f"- Python: {machine.python_version}",
        f"- rotate_studies.py: {machine.tool_revision}",
        f"- Load average (1, 5, 15 min) before the benchmark servers started: {load}",
        f"- Other Orthanc processes running at the start: "
        f"{machine.other_orthanc_processes}",
    ]
    if machine.is_shared:
        lines.append(
            "- The machine was shared with other jobs during the run, so wall times "
            "carry noise from them. Compare ratios rather than absolute seconds."
        )
    return "\n".join(lines)


def format_document(
    *, command: str, date: str, machine: Machine, sections: list[tuple[str, str]]
) -> str:
    """Assemble docs/benchmarks.md from the machine facts and the result tables."""
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `bench/bench.py` on {date}.",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "## Machine",
        "",
        format_machine(machine),
        "",
        "## What each row measures",
        "",
        METHOD_NOTES,
    ]
    for title, table in sections:
        parts += ["", f"## {title}", "", table]
    return "\n".join(parts) + "\n"


METHOD_NOTES = """\
Every run starts from the same state: Main contains every study of the data set and
Backup is empty. Loading the studies is not timed. After each run the benchmark
checks that every SOPInstanceUID is on Backup and none is left on Main, and
aborts otherwise.

- `anchor`: Orthanc's own transfer, `POST /peers/backup/store` of each study
  (synchronous; Orthanc sends one `POST /instances` per instance to its peer),
  then `POST /tools/bulk-delete` of the study's instances on Main. Orthanc does
  no verification here, so this is the speed to compare against.
- `naive`: for each study, download `GET /studies/{id}/archive` fully into
  memory with requests, `POST` it to Backup's `/instances`, then
  `DELETE /studies/{id}` on Main. No verification either.
- `rotate_studies.py --transfer ...`: the full rotation (transfer, verify every
  SOPInstanceUID on Backup, delete from Main, write the CSV row).
- One big study: the zip row passes `--zip-max-mb` at twice the study size,
  because a study just over 1024 MiB would otherwise go instance by instance.

Columns: `transfer` is the value of the CSV column `transfer` for the tool (the
method itself for the baselines). `wall s` includes the client's interpreter
start. `client peak RSS` and `client CPU s` (user + system) come from
`/usr/bin/time -v` around the client process. `Orthanc CPU s` is the CPU time
that both Orthanc processes used during the run, from /proc/PID/stat.
`MiB/s` is the size of the DICOM files divided by the wall time."""
