"""Show a rotation on two throwaway Orthanc servers, with real DICOM files.

Main receives the sample files that ship with pydicom (StudyDates from 1997
to 2019, a few empty or malformed) plus three studies written here: one from
last week, one without a StudyDate and one with a malformed StudyDate. The
rotation moves the old studies to Backup and keeps the recent ones, then
the CSV log and its summary are printed. Both servers and their storage are
removed at the end.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from dicom_studies import pydicom_sample_files, write_study  # noqa: E402
from orthanc import OrthancServer  # noqa: E402


def load_main(main: OrthancServer, work: Path) -> None:
    for path in pydicom_sample_files():
        main.upload(path)
    last_week = (dt.date.today() - dt.timedelta(days=7)).strftime("%Y%m%d")
    extra = [
        write_study(work / "recent", study_date=last_week, patient_id="RECENT"),
        write_study(work / "no-date", study_date=None, patient_id="NODATE"),
        write_study(work / "bad-date", study_date="2019-01-01", patient_id="BADDATE"),
    ]
    for study in extra:
        for path in study.paths:
            main.upload(path)
    main.wait_stable()


def count(server: OrthancServer) -> str:
    stats = server.get_json("/statistics")
    studies, instances = stats["CountStudies"], stats["CountInstances"]
    return f"{plural(studies, 'study', 'studies')}, {plural(instances, 'instance')}"


def plural(number: int, singular: str, several: str = "") -> str:
    return f"{number} {singular if number == 1 else several or singular + 's'}"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pacs-rotate-demo-") as temp:
        work = Path(temp)
        servers = OrthancServer(work, "main"), OrthancServer(work, "backup")
        try:
            for server in servers:
                server.start()
            main_server, backup_server = servers
            load_main(main_server, work)
            print(f"Before: Main {count(main_server)}; Backup {count(backup_server)}")
            log_csv = work / "log_migracion.csv"
            env = dict(
                os.environ,
                ORTHANC_MAIN_URL=main_server.url,
                ORTHANC_BACKUP_URL=backup_server.url,
                ROTATE_LOG_CSV=str(log_csv),
                # The demo loads its studies a second ago.
                ROTATE_MIN_IDLE_MINUTES="0",
            )
            command = [sys.executable, str(REPO / "rotate_studies.py"), "--days", "180"]
            print("$ " + " ".join(command[1:]), flush=True)
            status = subprocess.run(command, env=env, cwd=work).returncode
            print(f"Exit status: {status}")
            print(f"After: Main {count(main_server)}; Backup {count(backup_server)}")
            print(f"\n{log_csv.name}:\n{log_csv.read_text(encoding='utf-8')}")
            subprocess.run(["bash", str(REPO / "resumen_csv.sh"), str(log_csv)])
            return status
        finally:
            for server in servers:
                server.stop()


if __name__ == "__main__":
    sys.exit(main())
