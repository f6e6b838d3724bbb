"""Copy every study from Main to Backup without rotate_studies.py, for comparison.

Methods:
  anchor  Orthanc's own peer transfer: POST /peers/{peer}/store of each study
          (synchronous), then POST /tools/bulk-delete of its instances on Main.
  naive   Download each study's ZIP archive fully into memory, POST it to
          Backup's /instances, then DELETE the study on Main.

bench/bench.py runs this file as a subprocess under /usr/bin/time -v so that its
wall time and peak RSS are measured the same way as those of the tool.
"""

import argparse
import sys

import requests

TIMEOUT = (10, 3600)


def copy_with_peer_store(main: requests.Session, main_url: str, peer: str) -> None:
    for study_id in main.get(f"{main_url}/studies", timeout=TIMEOUT).json():
        response = main.post(
            f"{main_url}/peers/{peer}/store",
            json={"Resources": [study_id], "Synchronous": True},
            timeout=TIMEOUT,
        )
        response.raise_for_status()
        instances = main.get(
            f"{main_url}/studies/{study_id}/instances", timeout=TIMEOUT
        ).json()
        response = main.post(
            f"{main_url}/tools/bulk-delete",
            json={"Resources": [instance["ID"] for instance in instances]},
            timeout=TIMEOUT,
        )
        response.raise_for_status()


def copy_with_zip_in_memory(
    main: requests.Session, main_url: str, backup: requests.Session, backup_url: str
) -> None:
    for study_id in main.get(f"{main_url}/studies", timeout=TIMEOUT).json():
        response = main.get(f"{main_url}/studies/{study_id}/archive", timeout=TIMEOUT)
        response.raise_for_status()
        archive = response.content
        response = backup.post(f"{backup_url}/instances", data=archive, timeout=TIMEOUT)
        response.raise_for_status()
        check_upload_statuses(response.json(), study_id)
        response = main.delete(f"{main_url}/studies/{study_id}", timeout=TIMEOUT)
        response.raise_for_status()


def check_upload_statuses(results: list[dict], study_id: str) -> None:
    """Raise RuntimeError when Backup did not store every file of the archive."""
    accepted = ("Success", "AlreadyStored")
    rejected = [result for result in results if result.get("Status") not in accepted]
    if rejected:
        raise RuntimeError(
            f"Backup rejected {len(rejected)} files of study {study_id}: {rejected[0]}"
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["anchor", "naive"])
    parser.add_argument("--main-url", required=True)
    parser.add_argument("--backup-url", required=True)
    parser.add_argument(
        "--peer", default="backup", help="name of Backup in Main's OrthancPeers"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    main_session = requests.Session()
    if args.method == "anchor":
        copy_with_peer_store(main_session, args.main_url, args.peer)
    else:
        copy_with_zip_in_memory(
            main_session, args.main_url, requests.Session(), args.backup_url
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
