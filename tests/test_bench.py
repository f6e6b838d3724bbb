"""Run bench/bench.py on a tiny data set so the benchmark keeps working."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPECTED_ROWS = [
    "| anchor |",
    "| naive |",
    "| rotate_studies.py --transfer zip |",
    "| rotate_studies.py --transfer instances |",
    "| rotate_studies.py --transfer instances --workers 1 |",
    "| rotate_studies.py --transfer instances --workers 2 |",
    "| rotate_studies.py --transfer zip --workers 1 |",
    "| rotate_studies.py --transfer zip --workers 2 |",
]


def test_bench_tiny_prints_table():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench.py"), "--tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| method | data | transfer | wall s | × anchor |" in result.stdout
    for row in EXPECTED_ROWS:
        assert row in result.stdout, f"row {row!r} missing from:\n{result.stdout}"


def test_copy_clients_tiny_prints_table():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "copy_clients.py"),
            "--instances", "3", "--instance-kib", "16", "--repeats", "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for client in ("requests", "urllib3", "http.client", "rotate_studies.py"):
        assert f"| {client} |" in result.stdout, result.stdout
