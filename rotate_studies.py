#!/usr/bin/env python3
"""Move old DICOM studies from a main Orthanc server to a backup Orthanc server.

One run goes through these steps, in this order:

1. Read the configuration: command-line flags, then environment variables,
   then a ``.env`` file, then defaults. Every invalid value is reported before
   any request is sent.
2. Take an exclusive lock so that two runs never overlap, and check that Main
   and Backup are two different servers.
3. Plan: page through every study on Main and decide which ones are old. The
   decision is made here, not by Orthanc's ``/tools/find``, because Orthanc
   compares dates as strings and its results can be capped.
4. For each old study, oldest first: compare it with Backup by
   StudyInstanceUID and SOPInstanceUID, copy what Backup lacks, ask Backup
   again, and delete from Main exactly the instances that Backup holds.
5. Append one CSV row per study to the audit log and print a summary.

Nothing is deleted from Main unless Backup, asked after the copy, holds every
instance of the study. When a step fails, the study stays on Main and the CSV
row says why.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import csv
import datetime as dt
import difflib
import errno
import fcntl
import io
import ipaddress
import json
import logging
import math
import os
import posixpath
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dotenv.parser
import requests
import urllib3
from dotenv import dotenv_values

LOG = logging.getLogger("rotate_studies")

CSV_COLUMNS = (
    "timestamp",
    "run_id",
    "study_id",
    "study_instance_uid",
    "patient_id",
    "accession_number",
    "study_date",
    "date_source",
    "age_days",
    "instances_main",
    "instances_backup",
    "size_bytes",
    "transfer",
    "status",
    "duration_s",
    "message",
)

# Row statuses, as written in the CSV's ``status`` column.
MIGRATED = "migrated"  # copied this run, verified, deleted from Main
DELETED = "deleted"  # Backup already held every instance; deleted from Main
TRANSFERRED = "transferred"  # copied and verified, kept on Main
INCOMPLETE = "incomplete"  # Backup still lacks instances; kept on Main
FAILED = "failed"  # an error stopped the study; kept on Main
SKIPPED = "skipped"  # held back for a reason given in the message
DRY_RUN = "dry_run"  # --dry-run: nothing changed

EXIT_OK = 0
EXIT_STUDY_PROBLEM = 1  # a study failed or is incomplete, or a server is down
EXIT_CONFIG = 2  # invalid configuration, rejected credentials, same server
EXIT_LOCKED = 3  # another run holds the lock
EXIT_SIGNAL_BASE = 128  # stopped by a signal: 128 + its number, as shells do

PAGE_SIZE = 1000  # studies per page of GET /studies?expand
DELETE_BATCH = 200  # instance IDs per /tools/bulk-delete request
# Read size while streaming: small enough that a stop request is seen within
# a second on a slow link.
CHUNK_BYTES = 64 * 1024
TAIL_BYTES = 64 * 1024  # longer than any CSV row this tool writes
# Instance files up to this size are copied in one piece; with the default 4
# workers that holds at most 16 MiB in memory.
SMALL_FILE_BYTES = 4 * 1024 * 1024
RETRY_STATUSES = frozenset({502, 503, 504})
# Exceptions that requests and urllib3 raise when a connection fails, times
# out or breaks off.
NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
)
USER_AGENT = "pacs-rotate/1.0"
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean"}
# Orthanc writes empty or placeholder dates for studies whose real date is
# unknown; 19000101 is the usual placeholder, so only later dates count.
EARLIEST_STUDY_DATE = dt.date(1900, 1, 2)
# Characters that make a spreadsheet read a cell as a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# Every character that str.splitlines() treats as a line end: none is
# written into a cell, so that each row stays one line for any reader.
LINE_BREAKS = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class ConfigError(Exception):
    """Invalid or missing configuration; carries every problem found."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class OrthancError(Exception):
    """A request to an Orthanc server failed; the message names server and URL."""

    def __init__(self, server: str, method: str, url: str, detail: str, status=None):
        super().__init__(f"{server}: {method} {url} failed: {detail}")
        self.server = server
        self.status = status


class OrthancUnreachable(OrthancError):
    """The server sent no response: connection refused, reset or timed out."""


class OrthancNotJSON(OrthancError):
    """A 2xx response whose body is not JSON."""

    def __init__(self, server: str, method: str, url: str, content_type: str):
        super().__init__(
            server, method, url,
            f"the response is not JSON ({content_type}); check that the URL "
            "is the Orthanc REST API",
        )  # fmt: skip
        self.content_type = content_type


class OrthancAuthError(OrthancError):
    """The server rejected the credentials (HTTP 401 or 403)."""


class SameServerError(Exception):
    """Main and Backup turned out to store the same files: one server."""


class AuditLogError(Exception):
    """The CSV log could not be written; the run stops before deleting more."""


class StopRequested(Exception):
    """The run is stopping (a signal, or an error that ends the run) mid-copy."""


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    name: str  # "Main" or "Backup", used in every message
    url: str  # without a trailing slash
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None


@dataclass(frozen=True)
class Settings:
    main: ServerConfig
    backup: ServerConfig
    days: int = 180
    log_csv: Path = Path("log_migracion.csv")
    lock_file: Path = Path("log_migracion.csv.lock")
    dry_run: bool = False
    no_delete: bool = False
    max_studies: int | None = None
    min_idle_minutes: int = 60
    grace_days: int = 0
    verify: str = "sop"
    transfer: str = "zip"
    workers: int = 4
    zip_max_mb: int = 1024
    max_gigabytes: float | None = None
    until: dt.time | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    retries: int = 3
    check: bool = False


def parse_int(minimum: int, maximum: int) -> Callable[[str], int]:
    expected = f"must be a whole number from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(expected) from None
        if not minimum <= value <= maximum:
            raise ValueError(expected)
        return value

    return parse


def parse_positive_float(maximum: float) -> Callable[[str], float]:
    expected = f"must be a number greater than 0 and at most {maximum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(expected) from None
        if not math.isfinite(value) or not 0 < value <= maximum:
            raise ValueError(expected)
        return value

    return parse


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false (1/0, yes/no)")


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return value

    return parse


def parse_clock_time(text: str) -> dt.time:
    try:
        return dt.datetime.strptime(text.strip(), "%H:%M").time()
    except ValueError:
        raise ValueError("must be a local time as HH:MM, for example 06:30") from None


def parse_url(text: str) -> str:
    """Check an Orthanc base URL and return it without a trailing slash."""
    value = text.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be a full URL with http:// or https://, "
            "for example http://127.0.0.1:8042"
        )
    if parts.username or parts.password:
        raise ValueError(
            "must not contain credentials; set the _USERNAME and _PASSWORD "
            "variables instead"
        )
    if parts.query or parts.fragment:
        raise ValueError("must not contain a query (?) or a fragment (#)")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("has an invalid port number") from None
    if not is_valid_host(parts.hostname):
        raise ValueError(f"has an invalid host name {parts.hostname!r}")
    return value.rstrip("/")


def is_valid_host(host: str) -> bool:
    """Accept an IP address or a host name of letters, digits, hyphens and underscores.

    Docker Compose resolves service names such as orthanc_main, which DNS
    rules for host names would forbid.
    """
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return all(
        label and len(label) <= 63
        and label.replace("-", "").replace("_", "").isalnum()
        and label.isascii() and not label.startswith("-")
        for label in labels
    )  # fmt: skip


def parse_text(text: str) -> str:
    return text


def parse_path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must not be empty")
    return Path(text)


@dataclass(frozen=True)
class Option:
    """One setting: where it can come from and how its text is checked."""

    dest: str
    env: str | None
    flag: str | None
    parse: Callable[[str], object]
    help: str
    is_switch: bool = False
    metavar: str | None = None


OPTIONS = (
    Option("main_url", "ORTHANC_MAIN_URL", "--main-url", parse_url,
           "Main Orthanc base URL (required)", metavar="URL"),
    Option("main_username", "ORTHANC_MAIN_USERNAME", None, parse_text, ""),
    Option("main_password", "ORTHANC_MAIN_PASSWORD", None, parse_text, ""),
    Option("main_ca_bundle", "ORTHANC_MAIN_CA_BUNDLE", None, parse_path, ""),
    Option("backup_url", "ORTHANC_BACKUP_URL", "--backup-url", parse_url,
           "Backup Orthanc base URL (required)", metavar="URL"),
    Option("backup_username", "ORTHANC_BACKUP_USERNAME", None, parse_text, ""),
    Option("backup_password", "ORTHANC_BACKUP_PASSWORD", None, parse_text, ""),
    Option("backup_ca_bundle", "ORTHANC_BACKUP_CA_BUNDLE", None, parse_path, ""),
    Option("days", "ROTATE_DAYS", "--days", parse_int(1, 36500),
           "move studies older than N days (default 180)", metavar="N"),
    Option("log_csv", "ROTATE_LOG_CSV", "--log-csv", parse_path,
           "CSV audit log to append to (default log_migracion.csv)", metavar="PATH"),
    Option("lock_file", "ROTATE_LOCK_FILE", "--lock-file", parse_path,
           "lock file that keeps two runs apart (default: CSV path + .lock)",
           metavar="PATH"),
    Option("dry_run", "ROTATE_DRY_RUN", "--dry-run", parse_bool,
           "report what would happen; change nothing on either server",
           is_switch=True),
    Option("no_delete", "ROTATE_NO_DELETE", "--no-delete", parse_bool,
           "copy and verify, but keep everything on Main", is_switch=True),
    Option("max_studies", "ROTATE_MAX_STUDIES", "--max-studies", parse_int(1, 10**9),
           "start at most N studies this run", metavar="N"),
    Option("min_idle_minutes", "ROTATE_MIN_IDLE_MINUTES", "--min-idle-minutes",
           parse_int(0, 5_256_000),
           "skip studies that received an instance in the last N minutes "
           "(default 60)", metavar="N"),
    Option("grace_days", "ROTATE_GRACE_DAYS", "--grace-days", parse_int(0, 36500),
           "keep a verified study on Main until Backup has held it N days "
           "(default 0)", metavar="N"),
    Option("verify", "ROTATE_VERIFY", "--verify", parse_choice("sop", "md5"),
           "sop: every instance is on Backup under the same UIDs and "
           "PatientID, with the same file size (default); md5: also the same "
           "file MD5", metavar="{sop,md5}"),
    Option("transfer", "ROTATE_TRANSFER", "--transfer",
           parse_choice("zip", "instances"),
           "zip: stream each study's archive (default); instances: copy "
           "instance files in parallel", metavar="{zip,instances}"),
    Option("workers", "ROTATE_WORKERS", "--workers", parse_int(1, 64),
           "studies copied at once in zip mode, and instance files copied at "
           "once in both modes (default 4)", metavar="N"),
    Option("zip_max_mb", "ROTATE_ZIP_MAX_MB", "--zip-max-mb", parse_int(1, 10**7),
           "studies larger than this many MB go instance by instance "
           "(default 1024)", metavar="MB"),
    Option("max_gigabytes", "ROTATE_MAX_GIGABYTES", "--max-gigabytes",
           parse_positive_float(10**9),
           "start no new study once this many GB were copied", metavar="GB"),
    Option("until", "ROTATE_UNTIL", "--until", parse_clock_time,
           "start no new study after this local time", metavar="HH:MM"),
    Option("connect_timeout", "ROTATE_CONNECT_TIMEOUT", "--connect-timeout",
           parse_positive_float(86400), "seconds to wait for a connection (default 10)",
           metavar="S"),
    Option("read_timeout", "ROTATE_READ_TIMEOUT", "--read-timeout",
           parse_positive_float(86400),
           "seconds to wait for data from a server (default 300)", metavar="S"),
    Option("retries", "ROTATE_RETRIES", "--retries", parse_int(0, 10),
           "retries of a safe request after a connection error or HTTP "
           "502/503/504 (default 3)", metavar="N"),
    Option("check", None, "--check", parse_bool,
           "check the configuration and both servers, change nothing",
           is_switch=True),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rotate_studies.py",
        description="Move DICOM studies older than N days from a main Orthanc "
        "server to a backup Orthanc server, verify them there, delete them from "
        "Main and log one CSV row per study.",
        epilog="Each flag overrides its environment variable, which overrides "
        "the .env file. Credentials come only from the environment or .env.",
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help="read settings from this file (default: .env when it exists)",
    )
    for option in OPTIONS:
        if option.flag is None:
            continue
        if option.is_switch:
            parser.add_argument(
                option.flag, dest=option.dest, action="store_const", const="1",
                help=option.help,
            )  # fmt: skip
        else:
            parser.add_argument(
                option.flag, dest=option.dest, metavar=option.metavar,
                help=option.help,
            )  # fmt: skip
    return parser


def read_env_file(path_text: str | None) -> dict[str, str]:
    """Read the .env file; a missing default file is fine, a named one is not.

    Values are taken literally: ``$`` in a password is not expanded.
    """
    path = Path(path_text) if path_text else Path(".env")
    if path_text is None and not path.exists():
        return {}
    origin = f"--env-file {path}" if path_text else f"{path}"
    if not path.is_file():
        raise ConfigError([f"{origin}: file not found; create it or fix the path"])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise ConfigError(
            [f"{origin}: cannot be read ({error.strerror}); fix its permissions"]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{origin}: is not UTF-8 text; save it as UTF-8"]) from None
    problems = env_file_problems(text, origin)
    if problems:
        raise ConfigError(problems)
    values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return {key: value for key, value in values.items() if value is not None}


def env_file_problems(text: str, origin: str) -> list[str]:
    """Return a problem for each .env line that cannot be parsed or repeats a name.

    python-dotenv skips a line it cannot parse with a warning that names no
    file, and keeps the last of two lines with one name, so either would
    silently change a setting such as a password or ROTATE_DRY_RUN.
    """
    problems = []
    first_lines: dict[str, int] = {}
    for binding in dotenv.parser.parse_stream(io.StringIO(text)):
        original = binding.original
        blank = len(original.string) - len(original.string.lstrip("\r\n"))
        line = original.line + original.string[:blank].count("\n")
        if binding.error:
            problems.append(
                f"{origin}: line {line} is not NAME=value (an unclosed quote?); "
                "fix or remove it"
            )
        elif binding.key in first_lines:
            problems.append(
                f"{origin}: line {line} sets {binding.key} again (first on line "
                f"{first_lines[binding.key]}); keep one of the two lines"
            )
        elif binding.key is not None:
            first_lines[binding.key] = line
    return problems


def resolve_raw_values(
    args: argparse.Namespace, environ: dict[str, str], env_file: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """Return {dest: (source name, text)} by precedence: flag, env, .env.

    An empty variable counts as unset, as in the .env.example template.
    """
    raw: dict[str, tuple[str, str]] = {}
    for option in OPTIONS:
        flag_value = getattr(args, option.dest, None) if option.flag else None
        if flag_value is not None:
            raw[option.dest] = (option.flag, flag_value)
        elif option.env and environ.get(option.env, "").strip():
            raw[option.dest] = (option.env, environ[option.env])
        elif option.env and env_file.get(option.env, "").strip():
            raw[option.dest] = (option.env, env_file[option.env])
    return raw


def describe_bad_value(option: Option, source: str, text: str, reason: str) -> str:
    if option.dest.endswith("password"):
        shown = "(hidden)"
    elif option.dest.endswith("url"):
        shown = repr(redact_url(text))
    else:
        shown = repr(text)
    return f"{source}={shown}: {reason}"


def redact_url(text: str) -> str:
    """Replace the password in a URL's user:password@ part with ***."""
    scheme, separator, rest = text.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not separator or not at:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def load_settings(argv: list[str], environ: dict[str, str]) -> Settings:
    """Build Settings from flags, environment and .env; raise ConfigError."""
    args = build_parser().parse_args(argv)
    env_file = read_env_file(args.env_file)
    raw = resolve_raw_values(args, environ, env_file)
    values: dict[str, object] = {}
    problems = unknown_setting_problems(environ, env_file, args.env_file)
    for option in OPTIONS:
        if option.dest not in raw:
            continue
        source, text = raw[option.dest]
        try:
            values[option.dest] = option.parse(text)
        except ValueError as error:
            problems.append(describe_bad_value(option, source, text, str(error)))
    for dest, name in (("main_url", "ORTHANC_MAIN_URL"),
                       ("backup_url", "ORTHANC_BACKUP_URL")):  # fmt: skip
        if dest not in raw:
            problems.append(
                f"{name} is missing: set it (or --{dest.replace('_', '-')}) to the "
                "server's base URL, for example http://127.0.0.1:8042"
            )
    problems += check_credentials(values)
    if problems:
        raise ConfigError(problems)
    return settings_from_values(values)


# Variables of the container scripts, read from the same environment.
OTHER_KNOWN_VARIABLES = frozenset({"ROTATE_HEALTH_MAX_AGE_HOURS"})
OWN_PREFIXES = ("ROTATE_", "ORTHANC_MAIN_", "ORTHANC_BACKUP_")


def unknown_setting_problems(
    environ: dict[str, str], env_file: dict[str, str], env_file_path: str | None
) -> list[str]:
    """Report names in this tool's namespace that are no setting, such as typos.

    A misspelt ROTATE_DRY_RUN would otherwise turn a dry run into a real one.
    In the .env file the check ignores letter case, because the file belongs
    to this tool alone. The environment is checked by exact name, because
    other programs may set variables of any case there.
    """
    known = {option.env for option in OPTIONS if option.env} | OTHER_KNOWN_VARIABLES
    origin = f"--env-file {env_file_path}" if env_file_path else ".env"
    found = [
        (name, "environment variable")
        for name in environ
        if name.startswith(OWN_PREFIXES)
    ]
    found += [(name, origin) for name in env_file
              if name.upper().startswith(OWN_PREFIXES)]  # fmt: skip
    problems = []
    for name, source in found:
        if name in known:
            continue
        guess = difflib.get_close_matches(name.upper(), sorted(known), n=1)
        hint = f"; did you mean {guess[0]}?" if guess else "; remove it"
        problems.append(f"{source} {name} is not a setting of this tool{hint}")
    return problems


def check_credentials(values: dict[str, object]) -> list[str]:
    problems = []
    for server in ("main", "backup"):
        has_user = bool(values.get(f"{server}_username"))
        has_password = f"{server}_password" in values
        prefix = f"ORTHANC_{server.upper()}"
        if has_password and not has_user:
            problems.append(f"{prefix}_PASSWORD is set but {prefix}_USERNAME is not")
        if has_user and not has_password:
            problems.append(f"{prefix}_USERNAME is set but {prefix}_PASSWORD is not")
        bundle = values.get(f"{server}_ca_bundle")
        if bundle is not None and not Path(bundle).is_file():
            problems.append(f"{prefix}_CA_BUNDLE={str(bundle)!r}: file not found")
    return problems


def settings_from_values(values: dict[str, object]) -> Settings:
    servers = {}
    for server in ("main", "backup"):
        bundle = values.pop(f"{server}_ca_bundle", None)
        servers[server] = ServerConfig(
            name=server.capitalize(),
            url=values.pop(f"{server}_url"),
            username=values.pop(f"{server}_username", None) or None,
            password=values.pop(f"{server}_password", None),
            ca_bundle=str(bundle) if bundle else None,
        )
    log_csv = values.pop("log_csv", Path("log_migracion.csv"))
    lock_file = values.pop("lock_file", Path(f"{log_csv}.lock"))
    return Settings(
        main=servers["main"],
        backup=servers["backup"],
        log_csv=log_csv,
        lock_file=lock_file,
        **values,
    )


def check_local_paths(settings: Settings) -> list[str]:
    """Check that the CSV and lock file can be written, before any request."""
    problems = []
    for label, path in (("ROTATE_LOG_CSV", settings.log_csv),
                        ("ROTATE_LOCK_FILE", settings.lock_file)):  # fmt: skip
        directory = path.parent if str(path.parent) else Path(".")
        if path.is_dir():
            problems.append(f"{label}={str(path)!r}: is a directory; name a file")
        elif not directory.is_dir():
            problems.append(
                f"{label}={str(path)!r}: folder {str(directory)!r} does not exist; "
                "create it or choose another path"
            )
        elif path.exists() and not path.is_file():
            problems.append(f"{label}={str(path)!r}: is not a regular file")
        elif not os.access(path if path.exists() else directory, os.W_OK):
            problems.append(
                f"{label}={str(path)!r}: not writable by this user; fix the "
                "permissions or choose another path"
            )
    if same_file(settings.log_csv, settings.lock_file):
        problems.append(
            f"ROTATE_LOCK_FILE={str(settings.lock_file)!r}: is the CSV log itself; "
            "choose another path, for example the CSV path plus .lock"
        )
    elif settings.log_csv.is_file():
        problems += log_file_problems(settings.log_csv)
    return problems


def same_file(first: Path, second: Path) -> bool:
    """Return True when two paths name one file, through links too."""
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    return first.resolve() == second.resolve()


def log_file_problems(path: Path) -> list[str]:
    """Check that an existing CSV log starts with this tool's header.

    A file cut short while its header was written is accepted, because
    AuditLog rewrites it.
    """
    with path.open("rb") as stream:
        first = stream.readline(64 * 1024)
    line = first.decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r\n")
    header = ",".join(CSV_COLUMNS)
    complete = first.endswith(b"\n")
    if not first or line == header or (not complete and header.startswith(line)):
        return []
    return [
        f"ROTATE_LOG_CSV={str(path)!r}: the file exists but does not start with "
        "this tool's CSV header; move it aside or choose another path"
    ]


# --------------------------------------------------------------------------
# Orthanc client
# --------------------------------------------------------------------------


class OrthancClient:
    """One Orthanc server, with timeouts and retries.

    The REST API goes through a requests.Session. Instance files and uploads,
    which a copy sends by the thousand, go directly through urllib3, the
    library that requests is built on: requests' own work per call doubled
    the client CPU of a copy (bench/copy_clients.py measures it). Both talk
    to the server directly, with the credentials and CA file of the
    configuration only: proxy variables, ~/.netrc and REQUESTS_CA_BUNDLE are
    not read.

    Only requests that can be repeated without harm are retried: reads, and
    deletions by ID. Uploads stream their body once and are never repeated
    here; the verification that follows every upload decides what happened.
    """

    def __init__(self, config: ServerConfig, settings: Settings):
        self.config = config
        self.name = config.name
        self.timeout = (settings.connect_timeout, settings.read_timeout)
        self.retries = settings.retries
        # DICOM files rarely compress, and gzip costs CPU on both ends.
        self.headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        if config.username:
            self.headers["Authorization"] = basic_authorization(
                config.username, config.password or ""
            )
        ca_file = config.ca_bundle or requests.certs.where()
        connections = max(8, settings.workers * 2)
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers.update(self.headers)
        self.session.verify = ca_file
        adapter = requests.adapters.HTTPAdapter(
            pool_connections=4, pool_maxsize=connections
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.file_pool = file_connection_pool(
            config.url, connections, settings, ca_file
        )
        self.base_path = urllib.parse.urlsplit(config.url).path

    def request(
        self, method: str, path: str, *, retry: bool = True, **kwargs
    ) -> requests.Response:
        """Send one request; raise OrthancError unless the status is 2xx."""
        url = self.config.url + path

        def send() -> requests.Response:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)

        return self._with_retries(method, url, send, retry)

    def _with_retries(self, method: str, url: str, send: Callable, retry: bool):
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(1, attempts + 1):
            try:
                response = send()
            except NETWORK_ERRORS as error:
                if attempt == attempts:
                    raise OrthancUnreachable(
                        self.name, method, url, describe_network_error(error)
                    ) from None
                detail = describe_network_error(error)
            else:
                if response.status_code not in RETRY_STATUSES or attempt == attempts:
                    return self._checked(method, url, response)
                detail = f"HTTP {response.status_code}"
                response.close()
            delay = min(30.0, 0.5 * 2 ** (attempt - 1))
            LOG.warning(
                "%s: %s %s failed (%s); retry %d of %d in %.1f s",
                self.name, method, url, detail, attempt, attempts - 1, delay,
            )  # fmt: skip
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _checked(self, method: str, url: str, response: requests.Response):
        status = response.status_code
        if 200 <= status < 300:
            return response
        detail = f"HTTP {status} {describe_orthanc_error(response)}".strip()
        response.close()
        if status in (401, 403):
            raise OrthancAuthError(self.name, method, url, detail, status)
        raise OrthancError(self.name, method, url, detail, status)

    def request_json(self, method: str, path: str, expected: type, **kwargs):
        """Send one request and return its JSON body, an instance of `expected`.

        A URL that leads to a login page or another web application returns
        HTML with status 200 (OrthancNotJSON), or JSON of another shape.
        """
        url = self.config.url + path
        response = self.request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            content_type = response.headers.get("Content-Type") or "no Content-Type"
            raise OrthancNotJSON(self.name, method, url, content_type) from None
        if not isinstance(body, expected):
            raise OrthancError(
                self.name, method, url,
                f"the response is a JSON {JSON_TYPES.get(type(body), 'value')}, "
                f"not the {JSON_TYPES[expected]} Orthanc returns; check that the "
                "URL is the Orthanc REST API",
            )  # fmt: skip
        return body

    def get_json(self, path: str, expected: type, **params):
        return self.request_json("GET", path, expected, params=params or None)

    def system(self) -> dict:
        """Return GET /system; raise ConfigError if the URL is not an Orthanc server."""
        prefix = f"ORTHANC_{self.name.upper()}_URL={self.config.url}"
        try:
            # Any JSON type, so that a wrong one gets the message below.
            system = self.get_json("/system", object)
        except OrthancNotJSON as error:
            reason = f"returned {error.content_type}, not JSON"
        else:
            if isinstance(system, dict) and "ApiVersion" in system:
                return system
            reason = "returned JSON without ApiVersion"
        raise ConfigError(
            [f"{prefix}: GET /system {reason}, so this is not the Orthanc REST "
             "API; check the URL"]
        )  # fmt: skip

    def last_change(self) -> dict:
        """Return the newest entry of Orthanc's change log (a server fingerprint).

        "Last" is the sequence number of the newest change ever recorded, which
        stays after the log is cleared with DELETE /changes; 0 means none.
        """
        answer = self.get_json("/changes", dict, last="")
        changes = answer.get("Changes") or []
        if not answer.get("Last"):
            return {}
        return {"Last": answer.get("Last"), **(changes[-1] if changes else {})}

    def stored_file_id(self, instance_id: str) -> str | None:
        """Return the FileUuid of an instance's DICOM file, or None if absent."""
        try:
            return self.get_json(f"/instances/{instance_id}", dict).get("FileUuid")
        except OrthancError as error:
            if error.status == 404:
                return None
            raise

    def first_instance(self) -> str | None:
        found = self.get_json("/instances", list, since=0, limit=1)
        return found[0] if found else None

    def studies_page(self, since: int, limit: int) -> list[dict]:
        return self.get_json("/studies", list, expand="", since=since, limit=limit)

    def study_instances(self, study_id: str) -> list[dict]:
        return self.get_json(f"/studies/{study_id}/instances", list)

    def study(self, study_id: str) -> dict:
        return self.get_json(f"/studies/{study_id}", dict)

    def lookup_studies(self, study_instance_uid: str) -> list[str]:
        """Return the Orthanc IDs of every study with this StudyInstanceUID."""
        found = self.request_json(
            "POST", "/tools/lookup", list, data=study_instance_uid
        )
        return [item["ID"] for item in found if item.get("Type") == "Study"]

    def instance_md5(self, instance_id: str) -> str:
        """Return the MD5 the server stored with an instance's DICOM file."""
        path = f"/instances/{instance_id}/attachments/dicom/md5"
        try:
            return self.request("GET", path).text.strip()
        except OrthancError as error:
            # Orthanc returns 404 both for an unknown instance and for a file
            # stored while StoreMD5ForAttachments was false.
            if error.status != 404 or self.stored_file_id(instance_id) is None:
                raise
            raise OrthancError(
                self.name, "GET", self.config.url + path,
                "no MD5 stored with this file (StoreMD5ForAttachments was false "
                "when it was stored); use --verify sop",
            ) from None  # fmt: skip

    def open_stream(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.request(method, path, stream=True, **kwargs)

    def download_file(self, instance_id: str) -> FileResponse:
        """Open an instance's DICOM file as a stream; the caller closes it."""
        path = f"/instances/{instance_id}/file"
        return self._with_retries(
            "GET",
            self.config.url + path,
            lambda: self._send_file_request("GET", path, None, self.headers),
            retry=True,
        )

    def upload(self, body, content_type: str, length: int | None = None) -> list[dict]:
        """POST a DICOM file or a ZIP of them without retrying; one status per file.

        `body` is bytes, a readable stream or an iterator of chunks, and is
        sent chunked unless its length is known.
        """
        headers = {**self.headers, "Content-Type": content_type}
        if length is None and isinstance(body, bytes):
            length = len(body)
        if length is not None:
            headers["Content-Length"] = str(length)
        response = self._with_retries(
            "POST",
            self.config.url + "/instances",
            lambda: self._send_file_request("POST", "/instances", body, headers),
            retry=False,
        )
        with response:
            return upload_statuses(response)

    def _send_file_request(self, method, path, body, headers) -> FileResponse:
        raw = self.file_pool.urlopen(
            method,
            self.base_path + path,
            body=body,
            headers=headers,
            chunked=body is not None and "Content-Length" not in headers,
            preload_content=False,
            enforce_content_length=True,
            redirect=False,
            retries=False,
        )
        return FileResponse(raw)

    def bulk_delete(self, instance_ids: list[str]) -> None:
        self.request("POST", "/tools/bulk-delete", json={"Resources": instance_ids})


def upload_statuses(response) -> list[dict]:
    """Return one status object per file from a POST /instances response.

    Orthanc returns one object for a DICOM file and a list for a ZIP. A body
    that is neither (a proxy's error page, say) or that breaks off counts as
    one file with the status "unreadable response", and the verification
    that follows queries Backup.
    """
    try:
        answer = response.json()
    except (ValueError, *NETWORK_ERRORS):
        answer = None
    answers = answer if isinstance(answer, list) else [answer]
    unreadable = {"Status": "unreadable response"}
    return [item if isinstance(item, dict) else unreadable for item in answers]


def basic_authorization(username: str, password: str) -> str:
    """Return an HTTP Basic header value, UTF-8 encoded as Orthanc expects.

    requests encodes credentials as Latin-1, so Orthanc would reject a
    password such as "contraseña" and requests would fail on one with "€".
    """
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


class SendTimeoutMixin:
    """A urllib3 connection that lets a request body wait as long as a response.

    urllib3 sends a request under the connect timeout, so a Backup that
    stopped reading an upload for longer than that (10 s by default) failed
    it, although the read timeout allows a longer wait for the response.
    """

    def __init__(self, *args, send_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.send_timeout = send_timeout

    def send(self, data) -> None:
        if self.sock is None:
            self.connect()
        self.sock.settimeout(self.send_timeout)
        super().send(data)


class FileHTTPConnection(SendTimeoutMixin, urllib3.connection.HTTPConnection):
    pass


class FileHTTPSConnection(SendTimeoutMixin, urllib3.connection.HTTPSConnection):
    pass


def file_connection_pool(
    url: str, connections: int, settings: Settings, ca_file: str
) -> urllib3.HTTPConnectionPool:
    """Return a pool of keep-alive connections to one server, for files."""
    options: dict = {
        "maxsize": connections,
        "timeout": urllib3.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout
        ),
        "retries": False,
        "blocksize": CHUNK_BYTES,
        "send_timeout": settings.read_timeout,
    }
    https = url.lower().startswith("https:")
    if https:
        options.update(cert_reqs="CERT_REQUIRED", ca_certs=ca_file)
    pool = urllib3.connection_from_url(url, **options)
    pool.ConnectionCls = FileHTTPSConnection if https else FileHTTPConnection
    return pool


class FileResponse:
    """An urllib3 response with the requests.Response attributes this tool uses.

    The retry loop, the error messages and StreamedBody then treat both kinds
    of response alike.
    """

    def __init__(self, raw: urllib3.BaseHTTPResponse):
        self.raw = raw
        self.status_code = raw.status
        self.reason = raw.reason
        self.headers = raw.headers

    def json(self):
        return json.loads(self.raw.data)

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> FileResponse:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def describe_auth_error(error: OrthancAuthError) -> str:
    prefix = f"ORTHANC_{error.server.upper()}"
    return f"{error}. Check {prefix}_USERNAME and {prefix}_PASSWORD"


def describe_network_error(error: Exception) -> str:
    text = str(error)
    # urllib3 wraps a send that timed out in a ProtocolError, so the text counts.
    timeout_types = (requests.Timeout, urllib3.exceptions.TimeoutError)
    if isinstance(error, timeout_types) or "timed out" in text:
        return "timed out"
    if "Connection refused" in text:
        return "connection refused"
    if "reset" in text.lower():
        return "connection reset"
    if "Name or service not known" in text or "NameResolutionError" in text:
        return "host name not found"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "its TLS certificate is not trusted; set ORTHANC_MAIN_CA_BUNDLE or "
            "ORTHANC_BACKUP_CA_BUNDLE to the CA file that signed it"
        )
    return f"connection failed ({type(error).__name__})"


def describe_orthanc_error(response: requests.Response) -> str:
    """Return Orthanc's own explanation from an error response, if it has one."""
    try:
        body = response.json()
    except ValueError:
        return response.reason or ""
    if isinstance(body, dict):
        parts = [body.get("Message"), body.get("Details")]
        return ": ".join(str(part) for part in parts if part)
    return ""


def server_address(url: str) -> tuple[str, int, str]:
    """Return (IP address, port, path) that a URL reaches, to compare servers."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname.lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            host = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)[0][4][0]
        except OSError:
            pass
    else:
        # ::ffff:127.0.0.1 is 127.0.0.1 written as an IPv6 address.
        host = str(getattr(address, "ipv4_mapped", None) or address)
    if host in ("::1", "::", "0.0.0.0") or host.startswith("127."):
        host = "loopback"
    path = posixpath.normpath(parts.path or "/")
    return host, port, path.rstrip("/").lower()


def same_server_reason(
    main: ServerConfig, backup: ServerConfig, main_change=None, backup_change=None
) -> str | None:
    """Return why Main and Backup look like one server, or None if they differ.

    Two URLs are the same server when they reach the same address and port,
    or when both servers report the same newest change (same sequence number,
    resource and second), which two separate databases practically never do.
    """
    if server_address(main.url) == server_address(backup.url):
        return f"{main.url} and {backup.url} reach the same address and port"
    if main_change and main_change == backup_change:
        return (
            f"{main.url} and {backup.url} report the same newest change "
            f"(number {main_change.get('Last')}), so they are one Orthanc database"
        )
    return None


# --------------------------------------------------------------------------
# Which studies are old
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A study on Main with the facts that decide whether it is old."""

    study_id: str
    study_instance_uid: str
    patient_id: str
    accession_number: str
    study_date: str  # the raw tag value; "" when the tag is absent
    date_source: str  # "StudyDate" or "LastUpdate"
    reference_date: dt.date
    age_days: int
    last_update: dt.datetime  # UTC
    is_stable: bool


def parse_study_date(raw: str | None, today: dt.date) -> dt.date | None:
    """Return StudyDate as a date when it is a real, plausible calendar date.

    Accepted forms are DICOM's YYYYMMDD and the legacy YYYY.MM.DD. Empty,
    malformed, placeholder (19000101 or earlier) and future values return
    None, so that the caller falls back to Main's LastUpdate.
    """
    text = (raw or "").strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        value = dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
    if value < EARLIEST_STUDY_DATE or value > today:
        return None
    return value


def parse_last_update(raw: str) -> dt.datetime:
    """Parse Orthanc's LastUpdate (UTC, YYYYMMDDTHHMMSS) into an aware datetime."""
    return dt.datetime.strptime(raw, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)


def reference_date(
    study_date: str | None, last_update: dt.datetime, today: dt.date
) -> tuple[dt.date, str]:
    """Return the date that a study's age counts from, and which field gave it."""
    parsed = parse_study_date(study_date, today)
    if parsed is not None:
        return parsed, "StudyDate"
    return last_update.astimezone().date(), "LastUpdate"


def is_old(reference: dt.date, today: dt.date, days: int) -> bool:
    """Return True when the reference date is more than `days` days before today."""
    return (today - reference).days > days


def candidate_from_study(study: dict, today: dt.date) -> Candidate:
    tags = study.get("MainDicomTags", {})
    patient = study.get("PatientMainDicomTags", {})
    last_update = parse_last_update(study["LastUpdate"])
    reference, source = reference_date(tags.get("StudyDate"), last_update, today)
    return Candidate(
        study_id=study["ID"],
        study_instance_uid=tags.get("StudyInstanceUID", ""),
        patient_id=patient.get("PatientID", ""),
        accession_number=tags.get("AccessionNumber", ""),
        study_date=tags.get("StudyDate", ""),
        date_source=source,
        reference_date=reference,
        age_days=(today - reference).days,
        last_update=last_update,
        is_stable=bool(study.get("IsStable", True)),
    )


def select_old_studies(
    studies: Iterable[dict], today: dt.date, days: int
) -> list[Candidate]:
    """Return the old studies among Orthanc study records, oldest first."""
    candidates = (candidate_from_study(study, today) for study in studies)
    old = [c for c in candidates if is_old(c.reference_date, today, days)]
    return sorted(old, key=oldest_first)


def oldest_first(candidate: Candidate) -> tuple[dt.date, str]:
    return candidate.reference_date, candidate.study_id


def hold_back_reason(
    candidate: Candidate, now: dt.datetime, min_idle_minutes: int
) -> str | None:
    """Return why an old study must wait for a later run, or None."""
    if not candidate.is_stable:
        return "Main reports the study as not stable: it is still receiving instances"
    idle = now - candidate.last_update
    if idle < dt.timedelta(minutes=min_idle_minutes):
        minutes = max(0, int(idle.total_seconds() // 60))
        return (
            f"Main received an instance {minutes} min ago, less than the "
            f"{min_idle_minutes} min idle time (ROTATE_MIN_IDLE_MINUTES)"
        )
    return None


def study_pages(main: OrthancClient) -> Iterator[list[dict]]:
    """Yield every study record on Main, a page at a time.

    GET /studies?expand is used instead of /tools/find because the server's
    LimitFindResults silently caps /tools/find. Paging uses an offset, so the
    whole list is read before anything is deleted.
    """
    since = 0
    while True:
        page = main.studies_page(since, PAGE_SIZE)
        yield page
        if len(page) < PAGE_SIZE:
            return
        since += len(page)


# --------------------------------------------------------------------------
# Is this study complete on Backup
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MainInstance:
    instance_id: str
    sop_instance_uid: str
    size: int
    file_uuid: str = ""  # Orthanc's random ID of the stored file


@dataclass(frozen=True)
class BackupCopy:
    """What Backup holds for one study of Main.

    Backup is searched by StudyInstanceUID, and an instance counts as copied
    when Backup holds one with the same Orthanc ID. Orthanc derives that ID
    from PatientID, StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID,
    so the same SOPInstanceUID in another series, or under another PatientID
    (a corrected patient identity, say), does not count.
    """

    instance_ids: frozenset[str]  # Orthanc IDs, studies with Main's PatientID
    last_update: dt.datetime | None  # newest LastUpdate of those studies
    total_instances: int = 0  # under any PatientID
    other_patient_ids: tuple[str, ...] = ()
    file_uuids: frozenset[str] = frozenset()  # stored-file IDs, any PatientID
    patients: tuple[str, ...] = ()  # Backup's Orthanc IDs of Main's patient
    # FileSize in bytes by Orthanc ID, for the instances in instance_ids.
    file_sizes: dict[str, int] = field(default_factory=dict)


def main_instances_of(main: OrthancClient, study_id: str) -> list[MainInstance]:
    return [
        MainInstance(
            instance_id=item["ID"],
            sop_instance_uid=item.get("MainDicomTags", {}).get("SOPInstanceUID", ""),
            size=int(item.get("FileSize", 0)),
            file_uuid=item.get("FileUuid", ""),
        )
        for item in main.study_instances(study_id)
    ]


def read_backup_copy(
    backup: OrthancClient, study_instance_uid: str, patient_id: str
) -> BackupCopy:
    """Ask Backup which instances it holds for this study of Main."""
    instance_ids: set[str] = set()
    file_uuids: set[str] = set()
    file_sizes: dict[str, int] = {}
    patients: set[str] = set()
    others = []
    newest = None
    total = 0
    for backup_study_id in backup.lookup_studies(study_instance_uid):
        study = backup.study(backup_study_id)
        found = backup.study_instances(backup_study_id)
        total += len(found)
        file_uuids.update(item.get("FileUuid", "") for item in found)
        backup_patient = study.get("PatientMainDicomTags", {}).get("PatientID", "")
        if backup_patient != patient_id:
            others.append(backup_patient)
            continue
        updated = parse_last_update(study["LastUpdate"])
        newest = updated if newest is None else max(newest, updated)
        patients.add(study["ParentPatient"])
        instance_ids.update(item["ID"] for item in found)
        file_sizes.update(
            (item["ID"], int(item["FileSize"])) for item in found if "FileSize" in item
        )
    file_uuids.discard("")
    return BackupCopy(
        frozenset(instance_ids),
        newest,
        total,
        tuple(others),
        frozenset(file_uuids),
        tuple(sorted(patients)),
        file_sizes,
    )


def missing_instances(
    main_instances: list[MainInstance], copy: BackupCopy
) -> list[MainInstance]:
    """Return the instances of Main that Backup does not hold."""
    return [i for i in main_instances if i.instance_id not in copy.instance_ids]


def size_mismatches(
    main_instances: list[MainInstance], copy: BackupCopy
) -> list[MainInstance]:
    """Return the instances whose file on Backup differs in size from Main's.

    A copy cut short on the way can still be a valid DICOM file under the
    same Orthanc ID without its pixel data. Its size differs from Main's.
    """
    return [
        instance
        for instance in main_instances
        if instance.size
        and copy.file_sizes.get(instance.instance_id, instance.size) != instance.size
    ]


def md5_mismatches(
    main: OrthancClient,
    backup: OrthancClient,
    present: list[MainInstance],
    pool: concurrent.futures.Executor,
) -> list[MainInstance]:
    """Return the instances whose stored DICOM file differs between the servers.

    An instance has the same Orthanc ID on both servers (see BackupCopy).
    """

    def differs(instance: MainInstance) -> bool:
        main_md5 = main.instance_md5(instance.instance_id)
        return main_md5 != backup.instance_md5(instance.instance_id)

    flags = list(pool.map(differs, present))
    return [instance for instance, flag in zip(present, flags, strict=True) if flag]


def shared_files(
    main_instances: list[MainInstance], copy: BackupCopy
) -> list[MainInstance]:
    """Return the instances whose stored file Backup lists under the same ID.

    Orthanc names each stored file with a random UUID, so two servers list
    the same FileUuid only when they are one server (or share one storage),
    also when the two URLs look unrelated, for example through a proxy.
    """
    return [i for i in main_instances if i.file_uuid and i.file_uuid in copy.file_uuids]


def verified_instances(
    main_instances: list[MainInstance], copy: BackupCopy, mismatched: list[MainInstance]
) -> list[MainInstance]:
    """Return the Main instances that Backup holds, minus MD5 mismatches."""
    rejected = {instance.instance_id for instance in mismatched}
    return [
        instance
        for instance in main_instances
        if instance.instance_id in copy.instance_ids
        and instance.instance_id not in rejected
    ]


def grace_remaining(
    copy: BackupCopy, grace_days: int, now: dt.datetime
) -> dt.timedelta | None:
    """Return how long Backup must still hold the study before deletion."""
    if grace_days <= 0 or copy.last_update is None:
        return None
    remaining = copy.last_update + dt.timedelta(days=grace_days) - now
    return remaining if remaining > dt.timedelta(0) else None


@dataclass(frozen=True)
class Verdict:
    """Decision for one study once Backup was queried.

    It carries the row's status and message, and exactly the instances that
    may be deleted from Main.
    """

    status: str
    message: str
    delete: list[MainInstance] = field(default_factory=list)


def judge_copy(
    instances: list[MainInstance],
    copy: BackupCopy,
    mismatched: list[MainInstance],
    settings: Settings,
    *,
    copied: bool,
    stopping: bool,
    now: dt.datetime,
) -> Verdict:
    """Decide, from Backup's fresh response, whether the study may leave Main.

    Only a study that Backup contains completely, with the same file sizes
    (and MD5s under --verify md5), yields instances to delete, and those are
    exactly the instances that were verified.
    """
    total = len(instances)
    missing = missing_instances(instances, copy)
    if missing and stopping:
        return Verdict(
            SKIPPED,
            f"the run was asked to stop during the copy; Backup lacks "
            f"{len(missing)} of {total} instances; kept on Main",
        )
    if missing:
        return Verdict(
            INCOMPLETE,
            f"Backup lacks {len(missing)} of {total} instances after the copy; "
            "kept on Main",
        )
    resized = size_mismatches(instances, copy)
    if resized:
        first = resized[0]
        return Verdict(
            INCOMPLETE,
            f"{len(resized)} of {total} instances have a different file size on "
            f"Backup (SOPInstanceUID {first.sop_instance_uid}: {first.size} bytes "
            f"on Main, {copy.file_sizes[first.instance_id]} on Backup); "
            "kept on Main",
        )
    if mismatched:
        return Verdict(
            INCOMPLETE,
            f"{len(mismatched)} of {total} instances have a different MD5 on "
            "Backup; kept on Main",
        )
    verified = verified_instances(instances, copy, mismatched)
    check = "instance UIDs and file size"
    if settings.verify == "md5":
        check = "instance UIDs, file size and MD5"
    done = f"{count_of(len(verified), 'instance')} verified on Backup by {check}"
    kept = TRANSFERRED if copied else SKIPPED
    remaining = grace_remaining(copy, settings.grace_days, now)
    if settings.no_delete:
        return Verdict(kept, f"{done}; kept on Main (--no-delete)")
    if remaining is not None:
        return Verdict(
            kept,
            f"{done}; kept on Main for {format_duration(remaining)} more "
            f"(grace period of {settings.grace_days} days on Backup)",
        )
    if stopping:
        return Verdict(kept, f"{done}; kept on Main because the run was asked to stop")
    deleted = MIGRATED if copied else DELETED
    return Verdict(deleted, done, verified)


# --------------------------------------------------------------------------
# Copy what Backup lacks
# --------------------------------------------------------------------------


@dataclass
class UploadResult:
    """Backup's per-file upload statuses; Backup is queried again to verify."""

    copied_bytes: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    first_error: str = ""

    def add(self, answers: list[dict]) -> None:
        for answer in answers:
            status = str(answer.get("Status", "unknown"))
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def problems(self) -> str:
        bad = {
            k: v
            for k, v in self.statuses.items()
            if k not in ("Success", "AlreadyStored")
        }
        text = ", ".join(f"{count} {status}" for status, count in sorted(bad.items()))
        if self.first_error:
            text += f"; first error: {self.first_error}"
        return text


class DownloadFailed(Exception):
    """A download from Main broke off, or its length differs from the file's."""


class StreamedBody(io.RawIOBase):
    """A download seen as a file, so that it is uploaded as it arrives.

    The upload reads it in blocks, with a Content-Length when the size is
    known and chunked otherwise, so the whole file is never held in memory.
    A download that breaks off, or whose length differs from the expected
    one, raises DownloadFailed, so that a cut file is never sent as whole.
    """

    def __init__(self, response, stop: threading.Event, file_size: int | None = None):
        """`file_size`, Main's FileSize when known, must match what arrives."""
        self.response = response
        self.stop = stop
        self.sent = 0
        length = response.headers.get("Content-Length")
        announced = int(length) if length and length.isdigit() else None
        if file_size and announced is not None and announced != file_size:
            raise DownloadFailed(
                f"Main sent Content-Length {announced} for a file of {file_size} bytes"
            )
        self.expected = announced if announced is not None else file_size or None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise StopRequested()
        size = CHUNK_BYTES if size < 0 else size
        if self.expected is not None and self.expected - self.sent <= size:
            # Ask for one byte more than the rest, so that a longer download
            # is caught before its last block goes out and completes the upload.
            size = self.expected - self.sent + 1
        data = self._read(size)
        self.sent += len(data)
        if not data or (self.expected is not None and self.sent > self.expected):
            self._check_length(self.sent)
        return data

    def read_all(self) -> bytes:
        """Read the whole body in one piece."""
        data = self._read(None)
        self.sent = len(data)
        self._check_length(self.sent)
        return data

    def iter_chunks(self) -> Iterator[bytes]:
        while True:
            data = self.read(CHUNK_BYTES)
            if not data:
                return
            yield data

    def _read(self, size: int | None) -> bytes:
        try:
            return self.response.raw.read(size)
        except NETWORK_ERRORS as error:
            raise DownloadFailed(
                f"download from Main broke off after {self.sent} bytes "
                f"({describe_network_error(error)})"
            ) from None

    def _check_length(self, received: int) -> None:
        if self.expected is not None and received != self.expected:
            raise DownloadFailed(
                f"download from Main ended after {received} of {self.expected} bytes"
            )


def copy_instance(
    main: OrthancClient,
    backup: OrthancClient,
    instance: MainInstance,
    stop: threading.Event,
) -> tuple[list[dict], int]:
    """Stream one instance file from Main to Backup; return Backup's answers."""
    if stop.is_set():
        raise StopRequested()
    with main.download_file(instance.instance_id) as response:
        body = StreamedBody(response, stop, instance.size)
        if body.expected is not None and body.expected <= SMALL_FILE_BYTES:
            # One read and one send cost less CPU than dozens of blocks.
            data = body.read_all()
            return backup.upload(data, "application/dicom"), len(data)
        answers = backup.upload(body, "application/dicom", body.expected)
        return answers, body.sent


def transfer_instances(
    main: OrthancClient,
    backup: OrthancClient,
    missing: list[MainInstance],
    pool: concurrent.futures.Executor,
    stop: threading.Event,
) -> UploadResult:
    """Copy instance files on the run's copy pool; record errors, go on."""
    result = UploadResult()
    errors: list[str] = []
    futures = [
        pool.submit(copy_instance, main, backup, instance, stop) for instance in missing
    ]
    for future in concurrent.futures.as_completed(futures):
        try:
            answers, sent = future.result()
        except StopRequested:
            continue
        except OrthancAuthError:
            # Rejected credentials fail every copy: end the run instead.
            for pending in futures:
                pending.cancel()
            concurrent.futures.wait(futures)
            raise
        except (OrthancError, DownloadFailed) as error:
            errors.append(str(error))
            continue
        result.add(answers)
        result.copied_bytes += sent
    if errors:
        result.statuses["error"] = len(errors)
        result.first_error = errors[0]
        LOG.warning("%d instance copies failed; first: %s", len(errors), errors[0])
    return result


def transfer_zip(
    main: OrthancClient,
    backup: OrthancClient,
    study_id: str,
    missing: list[MainInstance],
    all_missing: bool,
    stop: threading.Event,
) -> UploadResult:
    """Stream a ZIP archive from Main straight into Backup's POST /instances.

    The whole study uses GET /studies/{id}/archive, and a partial copy
    requests an archive of the missing instances only. Neither transcodes.
    """
    if all_missing:
        stream = main.open_stream("GET", f"/studies/{study_id}/archive")
    else:
        request = {"Resources": [i.instance_id for i in missing], "Synchronous": True}
        stream = main.open_stream("POST", "/tools/create-archive", json=request)
    with stream as response:
        body = StreamedBody(response, stop)
        answers = backup.upload(body.iter_chunks(), "application/zip")
        result = UploadResult(copied_bytes=sum(i.size for i in missing))
        result.add(answers)
        return result


# --------------------------------------------------------------------------
# Delete exactly what was verified
# --------------------------------------------------------------------------


def protect_on_backup(backup: OrthancClient, copy: BackupCopy) -> None:
    """Mark the study's patient as protected on Backup before Main deletes it.

    An Orthanc server with MaximumStorageSize or MaximumPatientCount makes
    room by deleting its oldest unprotected patients (Orthanc 1.10 has no
    setting to refuse instead), so a later copy could silently remove a
    study whose only copy is now on Backup. A protected patient is never
    recycled, so a full Backup rejects new uploads with HTTP 500 instead, and
    those studies stay on Main as failed.
    """
    for patient_id in copy.patients:
        backup.request("PUT", f"/patients/{patient_id}/protected", data="1")


class DeletionFailed(Exception):
    """A bulk-delete failed after the instances in `deleted` were deleted."""

    def __init__(self, deleted: list[MainInstance], error: OrthancError):
        super().__init__(str(error))
        self.deleted = deleted
        self.error = error


def delete_verified(main: OrthancClient, verified: list[MainInstance]) -> None:
    """Delete from Main the instances that Backup was asked about and holds.

    Deleting by instance ID, never by study, leaves on Main any instance that
    arrived after the verification. A failed batch raises DeletionFailed
    with the instances of the batches before it.
    """
    for start in range(0, len(verified), DELETE_BATCH):
        batch = verified[start : start + DELETE_BATCH]
        try:
            main.bulk_delete([instance.instance_id for instance in batch])
        except OrthancError as error:
            raise DeletionFailed(verified[:start], error) from error


def delete_unchanged(
    context: RunContext,
    candidate: Candidate,
    verified: list[MainInstance],
    outcome: StudyOutcome,
) -> None:
    """Delete the verified instances whose file on Main is still the one verified.

    With OverwriteInstances, Main may store a new file under the same instance
    ID after the check, and such an instance stays on Main. Nothing is deleted
    when the audit log can no longer be written.
    """
    if context.log is not None:
        context.log.ensure_writable()
    # NOTE: Orthanc 1.10 has no conditional delete, so a file rewritten
    # between this listing and the bulk-delete (milliseconds) is still lost.
    current = instances_still_on_main(context.main, candidate)
    unchanged = unchanged_instances(verified, current)
    try:
        delete_verified(context.main, unchanged)
    except DeletionFailed as failure:
        record_failed_deletion(context, outcome, failure, len(unchanged))
        return
    outcome.freed_bytes = sum(i.size for i in unchanged)
    outcome.message += f"; deleted {len(unchanged)} from Main"
    changed = len(verified) - len(unchanged)
    if changed:
        outcome.message += (
            f"; {changed} instances changed or vanished on Main after the "
            "verification and were not deleted"
        )


def record_failed_deletion(
    context: RunContext, outcome: StudyOutcome, failure: DeletionFailed, total: int
) -> None:
    """Mark the study failed; every instance deleted so far was verified."""
    outcome.status = FAILED
    outcome.freed_bytes = sum(i.size for i in failure.deleted)
    outcome.message += (
        f"; deleting from Main failed after {len(failure.deleted)} of {total} "
        f"verified instances ({failure.error}); the others stay on Main"
    )
    if isinstance(failure.error, OrthancAuthError):
        context.end_run(describe_auth_error(failure.error), EXIT_CONFIG)


def unchanged_instances(
    verified: list[MainInstance], current: list[MainInstance]
) -> list[MainInstance]:
    """Return the verified instances that Main still stores as the same file."""
    current_files = {i.instance_id: i.file_uuid for i in current}
    return [i for i in verified if current_files.get(i.instance_id) == i.file_uuid]


# --------------------------------------------------------------------------
# One study, start to end
# --------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    """The result of one study, written as one CSV row."""

    status: str
    message: str = ""
    transfer: str = "none"
    instances_main: int | str = ""
    instances_backup: int | str = ""
    size_bytes: int | str = ""
    copied_bytes: int = 0
    freed_bytes: int = 0


@dataclass
class RunContext:
    settings: Settings
    main: OrthancClient
    backup: OrthancClient
    stop: threading.Event
    # ROTATE_WORKERS threads for instance copies and MD5 requests, shared by
    # the studies in flight, so that zip mode never runs workers² of them.
    copy_pool: concurrent.futures.Executor
    log: AuditLog | None = None
    # Errors that end the run: (message, exit status).
    fatal_errors: list[tuple[str, int]] = field(default_factory=list)

    def backup_copy(self, candidate: Candidate) -> BackupCopy:
        """Ask Backup, now, which instances it holds for this study of Main."""
        return read_backup_copy(
            self.backup, candidate.study_instance_uid, candidate.patient_id
        )

    def end_run(self, message: str, exit_status: int) -> None:
        """Record an error that stops the run: no new study, no new deletion."""
        self.fatal_errors.append((message, exit_status))
        self.stop.set()


def choose_transfer(settings: Settings, study_bytes: int) -> str:
    """Return "zip" or "instances" for a study of this size."""
    if settings.transfer == "instances":
        return "instances"
    if study_bytes > settings.zip_max_mb * 1024 * 1024:
        return "instances"
    return "zip"


def describe_plan(missing: int, total: int, settings: Settings) -> str:
    action = (
        "keep it on Main (--no-delete)"
        if settings.no_delete
        else f"delete {count_of(total, 'instance')} from Main"
    )
    if missing:
        return (
            f"would copy {missing} of {count_of(total, 'instance')} to Backup, "
            f"verify, {action}"
        )
    return f"Backup holds all {count_of(total, 'instance')}; would verify and {action}"


def rotate_study(context: RunContext, candidate: Candidate) -> StudyOutcome:
    """Compare, copy, verify and delete one study; return its outcome."""
    settings, main = context.settings, context.main
    instances = main_instances_of(main, candidate.study_id)
    if not instances:
        return StudyOutcome(SKIPPED, "the study has no instances left on Main")
    size = sum(i.size for i in instances)
    copy = context.backup_copy(candidate)
    missing = missing_instances(instances, copy)
    outcome = StudyOutcome("", instances_main=len(instances), size_bytes=size)

    if settings.dry_run:
        outcome.status = DRY_RUN
        outcome.instances_backup = copy.total_instances
        outcome.message = describe_plan(len(missing), len(instances), settings)
        return outcome

    upload = None
    if missing:
        outcome.transfer = choose_transfer(settings, size)
        upload = run_transfer(context, candidate, instances, missing, outcome.transfer)
        outcome.copied_bytes = upload.copied_bytes
        copy = context.backup_copy(candidate)
    return decide_after_verification(
        context, candidate, instances, copy, upload, outcome
    )


def run_transfer(context, candidate, instances, missing, method) -> UploadResult:
    if method == "instances":
        return transfer_instances(
            context.main, context.backup, missing, context.copy_pool, context.stop
        )
    return transfer_zip(
        context.main,
        context.backup,
        candidate.study_id,
        missing,
        len(missing) == len(instances),
        context.stop,
    )


def decide_after_verification(
    context: RunContext,
    candidate: Candidate,
    instances: list[MainInstance],
    copy: BackupCopy,
    upload: UploadResult | None,
    outcome: StudyOutcome,
) -> StudyOutcome:
    """Given Backup's fresh answer, delete what is verified or keep the study."""
    outcome = apply_verification(context, candidate, instances, copy, upload, outcome)
    if copy.other_patient_ids:
        outcome.message += (
            "; Backup also holds this StudyInstanceUID under PatientID "
            + ", ".join(repr(other) for other in copy.other_patient_ids)
            + ", which does not count as a copy"
        )
    return outcome


def apply_verification(
    context: RunContext,
    candidate: Candidate,
    instances: list[MainInstance],
    copy: BackupCopy,
    upload: UploadResult | None,
    outcome: StudyOutcome,
) -> StudyOutcome:
    settings = context.settings
    outcome.instances_backup = copy.total_instances
    reject_shared_storage(instances, copy)
    mismatched = []
    if settings.verify == "md5" and not missing_instances(instances, copy):
        mismatched = md5_mismatches(
            context.main, context.backup, instances, context.copy_pool
        )

    def judge(current: BackupCopy) -> Verdict:
        return judge_copy(
            instances,
            current,
            mismatched,
            settings,
            copied=upload is not None,
            stopping=context.stop.is_set(),
            now=now_utc(),
        )

    verdict = judge(copy)
    if verdict.delete:
        # Protect first, then ask Backup once more: a Backup that recycles
        # patients may have dropped this one before it was protected.
        protect_on_backup(context.backup, copy)
        copy = context.backup_copy(candidate)
        reject_shared_storage(instances, copy)
        verdict = judge(copy)
    outcome.status = verdict.status
    outcome.message = verdict.message
    if verdict.status == INCOMPLETE and upload is not None and upload.problems():
        outcome.message += f" (Backup's upload statuses: {upload.problems()})"
    if verdict.delete:
        delete_unchanged(context, candidate, verdict.delete, outcome)
    return outcome


def reject_shared_storage(instances: list[MainInstance], copy: BackupCopy) -> None:
    shared = shared_files(instances, copy)
    if shared:
        raise SameServerError(
            f"Main and Backup list the same stored file {shared[0].file_uuid} "
            f"for instance {shared[0].instance_id}, so they are one server or "
            "share one storage; point ORTHANC_BACKUP_URL at the backup server"
        )


def finish_counts(context: RunContext, candidate: Candidate, outcome: StudyOutcome):
    """Fill in the counts as they are when the row is written, as far as known.

    Backup is not asked again after a failure, so that a server that is down
    costs one timeout per study, not two.
    """
    try:
        instances = instances_still_on_main(context.main, candidate)
        outcome.instances_main = len(instances)
        if outcome.size_bytes == "":
            outcome.size_bytes = sum(i.size for i in instances)
        if outcome.instances_backup == "" and outcome.status != FAILED:
            copy = context.backup_copy(candidate)
            outcome.instances_backup = copy.total_instances
    except Exception as error:  # the counts are best effort; the row matters
        LOG.warning(
            "could not count the instances of %s: %s", candidate.study_id, error
        )


def instances_still_on_main(
    main: OrthancClient, candidate: Candidate
) -> list[MainInstance]:
    try:
        return main_instances_of(main, candidate.study_id)
    except OrthancError as error:
        if error.status == 404:  # the last instance was deleted, so was the study
            return []
        raise


def process_candidate(context: RunContext, candidate: Candidate) -> StudyOutcome:
    """Run one study and turn every error into its row."""
    outcome = study_outcome(context, candidate)
    if outcome.status != DRY_RUN:
        finish_counts(context, candidate, outcome)
    return outcome


def study_outcome(context: RunContext, candidate: Candidate) -> StudyOutcome:
    reason = hold_back_reason(candidate, now_utc(), context.settings.min_idle_minutes)
    if reason is not None:
        return StudyOutcome(SKIPPED, reason)
    try:
        return rotate_study(context, candidate)
    except OrthancAuthError as error:
        context.end_run(describe_auth_error(error), EXIT_CONFIG)
        return StudyOutcome(FAILED, f"{error}; kept on Main")
    except SameServerError as error:
        context.end_run(str(error), EXIT_CONFIG)
        return StudyOutcome(FAILED, f"{error}; kept on Main")
    except AuditLogError as error:
        context.end_run(str(error), EXIT_STUDY_PROBLEM)
        return StudyOutcome(FAILED, f"{error}; kept on Main")
    except OrthancError as error:
        if error.status == 404 and error.server == "Main":
            return StudyOutcome(SKIPPED, f"the study is no longer on Main ({error})")
        return StudyOutcome(FAILED, f"{error}; kept on Main")
    except StopRequested:
        return StudyOutcome(
            SKIPPED, "the run was asked to stop during the copy; kept on Main"
        )
    except DownloadFailed as error:
        return StudyOutcome(FAILED, f"{error}; kept on Main")
    except requests.RequestException as error:
        return StudyOutcome(
            FAILED, f"transfer failed: {describe_network_error(error)}; kept on Main"
        )
    except Exception as error:  # every study gets its row, whatever went wrong
        LOG.exception("unexpected error in study %s", candidate.study_id)
        return StudyOutcome(
            FAILED,
            f"unexpected error ({type(error).__name__}: {error}); only instances "
            "verified on Backup were deleted; see the log",
        )


# --------------------------------------------------------------------------
# CSV audit log
# --------------------------------------------------------------------------


def safe_cell(value: object) -> str:
    """Return a cell that a spreadsheet shows as text, on a single line."""
    text = "" if value is None else str(value)
    text = LINE_BREAKS.sub(" ", text)
    if text.startswith(FORMULA_PREFIXES):
        text = "'" + text
    return text


def format_row(values: dict[str, object]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(
        [safe_cell(values.get(column, "")) for column in CSV_COLUMNS]
    )
    return buffer.getvalue()


class AuditLog:
    """The append-only CSV log: one physical line per row, fsynced as written.

    Every cell is kept on one line, so a row cut short by a killed process is
    the file's incomplete last line. Opening the log removes such a line and
    logs what it contained, so that later rows and readers stay aligned.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(
                [f"ROTATE_LOG_CSV={str(path)!r}: cannot be opened ({error.strerror})"]
            ) from None
        self._repair_torn_tail()
        if os.fstat(self.fd).st_size == 0:
            self._write(format_row(dict(zip(CSV_COLUMNS, CSV_COLUMNS, strict=True))))

    def _repair_torn_tail(self) -> None:
        """Cut the file back to its last complete line.

        The header was checked by log_file_problems before the run, so only
        the tail is read, however long the log has grown.
        """
        size = os.fstat(self.fd).st_size
        with open(self.path, "rb") as stream:
            stream.seek(max(0, size - TAIL_BYTES))
            tail = stream.read()
        if not tail or tail.endswith(b"\n"):
            return
        if tail.endswith(b"\r"):  # a whole row that lacks only its final \n
            self._write("\n")
            return
        newline = tail.rfind(b"\n")
        if newline < 0 and size > TAIL_BYTES:
            raise ConfigError(
                [f"ROTATE_LOG_CSV={str(self.path)!r}: its last line is longer than "
                 "any row of this tool; move the file aside"]
            )  # fmt: skip
        keep = size - len(tail) + newline + 1
        LOG.warning(
            "%s ended with an incomplete row, probably from a killed run; "
            "removed it: %r",
            self.path, tail[newline + 1 :][:300].decode("utf-8", "replace"),
        )  # fmt: skip
        os.ftruncate(self.fd, keep)

    def _write(self, line: str) -> None:
        data = line.encode("utf-8")
        try:
            while data:
                written = os.write(self.fd, data)
                data = data[written:]
            os.fsync(self.fd)
        except OSError as error:
            raise AuditLogError(
                f"cannot write the CSV log {self.path}: {error.strerror}"
            ) from None
        self.ensure_writable()

    def ensure_writable(self) -> None:
        """Raise AuditLogError when the log file was deleted or moved away."""
        if os.fstat(self.fd).st_nlink == 0:
            raise AuditLogError(f"the CSV log {self.path} was deleted during the run")

    def append(self, values: dict[str, object]) -> None:
        with self.lock:
            self._write(format_row(values))

    def close(self) -> None:
        os.close(self.fd)


def csv_values(
    run_id: str, candidate: Candidate, outcome: StudyOutcome, seconds: float
) -> dict[str, object]:
    return {
        "timestamp": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_id": run_id,
        "study_id": candidate.study_id,
        "study_instance_uid": candidate.study_instance_uid,
        "patient_id": candidate.patient_id,
        "accession_number": candidate.accession_number,
        "study_date": candidate.study_date,
        "date_source": candidate.date_source,
        "age_days": candidate.age_days,
        "instances_main": outcome.instances_main,
        "instances_backup": outcome.instances_backup,
        "size_bytes": outcome.size_bytes,
        "transfer": outcome.transfer,
        "status": outcome.status,
        "duration_s": f"{seconds:.1f}",
        "message": outcome.message,
    }


# --------------------------------------------------------------------------
# The run: lock, preflight, budgets, progress and summary
# --------------------------------------------------------------------------


def new_run_id() -> str:
    """Return the ID that every CSV row of one run shares."""
    return uuid.uuid4().hex[:12]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def format_duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 86400:
        return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def count_of(count: int, noun: str) -> str:
    """Return "1 instance" or "2 instances": the count and the noun in agreement."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.2f} TB"


def acquire_lock(path: Path) -> int:
    """Take the run lock; the kernel releases it when the process ends, however."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return -1
        raise
    content = os.pread(fd, 64, 0).strip()
    if not content or content.isdigit():  # never overwrite a file of others
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def run_deadline(until: dt.time | None, start: dt.datetime) -> dt.datetime | None:
    """Return the next moment at local time `until`, from the run's start."""
    if until is None:
        return None
    deadline = start.replace(
        hour=until.hour, minute=until.minute, second=0, microsecond=0
    )
    if deadline <= start:
        deadline += dt.timedelta(days=1)
    return deadline


@dataclass
class Budget:
    """Limits on how much one run starts; the rest waits for the next run."""

    max_studies: int | None
    max_bytes: float | None
    deadline: dt.datetime | None
    started: int = 0
    copied_bytes: int = 0

    def exhausted(self, now: dt.datetime) -> str | None:
        """Return the name of the limit that stops new studies, or None."""
        if self.max_studies is not None and self.started >= self.max_studies:
            return f"--max-studies {self.max_studies}"
        if self.max_bytes is not None and self.copied_bytes >= self.max_bytes:
            return f"--max-gigabytes {self.max_bytes / 1e9:g}"
        if self.deadline is not None and now >= self.deadline:
            return f"--until {self.deadline:%H:%M}"
        return None


class Progress:
    """Progress on a terminal as one rewritten line; under cron, a line per study."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.done = 0
        self.bytes = 0
        self.start = time.monotonic()
        self.stream = stream
        self.live = stream.isatty()

    def study_done(self, candidate: Candidate, outcome: StudyOutcome) -> None:
        self.done += 1
        self.bytes += outcome.copied_bytes
        line = (
            f"[{self.done}/{self.total}] {candidate.study_id} "
            f"{outcome.status}: {outcome.message}"
        )
        if outcome.status in (FAILED, INCOMPLETE):
            LOG.error("%s", line)
        elif not self.live:
            LOG.info("%s", line)
        if self.live:
            self.stream.write("\r\033[K" + self.status_line())
            self.stream.flush()

    def status_line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 0.001)
        rate = self.bytes / elapsed
        left = ""
        if self.done:
            remaining = elapsed / self.done * (self.total - self.done)
            left = f", about {format_duration(dt.timedelta(seconds=remaining))} left"
        return (
            f"{self.done}/{self.total} studies, {format_bytes(self.bytes)} copied, "
            f"{format_bytes(rate)}/s{left}"
        )

    def close(self) -> None:
        if self.live and self.done:
            self.stream.write("\n")


@dataclass
class RunSummary:
    counts: dict[str, int] = field(default_factory=dict)
    copied_bytes: int = 0
    freed_bytes: int = 0
    not_started: int = 0
    stopped_by: str | None = None

    def add(self, outcome: StudyOutcome) -> None:
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        self.copied_bytes += outcome.copied_bytes
        self.freed_bytes += outcome.freed_bytes

    def has_problems(self) -> bool:
        return bool(self.counts.get(FAILED) or self.counts.get(INCOMPLETE))

    def text(self, seconds: float, eligible: int) -> str:
        order = (MIGRATED, DELETED, TRANSFERRED, INCOMPLETE, FAILED, SKIPPED, DRY_RUN)
        counts = ", ".join(f"{s} {self.counts[s]}" for s in order if s in self.counts)
        lines = [
            f"Old studies on Main: {eligible}. Rows written: "
            f"{sum(self.counts.values())} ({counts or 'none'}).",
            f"Copied {format_bytes(self.copied_bytes)}, freed "
            f"{format_bytes(self.freed_bytes)} on Main, in {seconds:.1f} s.",
        ]
        if self.not_started:
            lines.append(
                f"{self.not_started} old studies left for the next run "
                f"(stopped by {self.stopped_by})."
            )
        return "\n".join(lines)


def preflight(settings: Settings, main: OrthancClient, backup: OrthancClient):
    """Reach both servers and apply the same-server guard; change nothing.

    Returns (main /system, backup /system or None when Backup is unreachable).
    Raises OrthancUnreachable for Main, OrthancAuthError for either server,
    and ConfigError when both URLs lead to one server.
    """
    main_system = main.system()
    try:
        backup_system = backup.system()
    except OrthancUnreachable:
        backup_system = None
    main_change = main.last_change()
    backup_change = backup.last_change() if backup_system else None
    reason = same_server_reason(
        settings.main, settings.backup, main_change, backup_change
    )
    if reason is None and backup_system:
        reason = shared_storage_reason(main, backup)
    if reason:
        raise ConfigError(
            [
                f"Main and Backup are the same server: {reason}. Verifying "
                "against the same server would pass and deleting would remove "
                "the only copy; point ORTHANC_BACKUP_URL at the backup server"
            ]
        )
    return main_system, backup_system


def shared_storage_reason(main: OrthancClient, backup: OrthancClient) -> str | None:
    """Return why Main and Backup look like one storage, judged by one instance.

    The same instance has the same Orthanc ID on both servers but a random
    FileUuid on each, so an equal FileUuid means one server, also behind a
    proxy and while it receives instances.
    """
    instance_id = main.first_instance()
    if instance_id is None:
        return None
    main_file = main.stored_file_id(instance_id)
    if main_file is None or main_file != backup.stored_file_id(instance_id):
        return None
    return f"both list instance {instance_id} with the same stored file {main_file}"


def plan_run(main: OrthancClient, settings: Settings) -> list[Candidate]:
    """Read every study on Main and return the old ones, oldest first.

    Only the old studies of each page are kept, so that planning over a
    large Main holds one page of study records at a time.
    """
    today = dt.date.today()
    total = 0
    old: list[Candidate] = []
    for page in study_pages(main):
        total += len(page)
        old += select_old_studies(page, today, settings.days)
    LOG.info(
        "Main holds %d studies; %d are older than %d days",
        total, len(old), settings.days,
    )  # fmt: skip
    return sorted(old, key=oldest_first)


class Rotation:
    """One run over the planned studies, with budgets, signals and the log."""

    def __init__(self, context: RunContext, log: AuditLog, candidates: list[Candidate]):
        self.context = context
        self.log = log
        self.candidates = candidates
        self.run_id = new_run_id()
        settings = context.settings
        self.budget = Budget(
            settings.max_studies,
            settings.max_gigabytes * 1e9 if settings.max_gigabytes else None,
            run_deadline(settings.until, dt.datetime.now()),
        )
        self.summary = RunSummary()
        self.progress = Progress(len(candidates))
        self.lock = threading.Lock()

    def parallel_studies(self) -> int:
        """Studies in flight: zip mode overlaps studies, instances mode copies
        the instances of one study in parallel instead."""
        settings = self.context.settings
        return settings.workers if settings.transfer == "zip" else 1

    def run(self) -> RunSummary:
        pending = list(self.candidates)
        in_flight: set[concurrent.futures.Future] = set()
        with concurrent.futures.ThreadPoolExecutor(self.parallel_studies()) as pool:
            while pending or in_flight:
                while pending and len(in_flight) < self.parallel_studies():
                    if self.stop_reason() is not None:
                        break
                    candidate = pending.pop(0)
                    self.budget.started += 1
                    in_flight.add(pool.submit(self.run_one, candidate))
                if not in_flight:
                    break
                done, in_flight = concurrent.futures.wait(
                    in_flight, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    future.result()
        self.summary.not_started = len(pending)
        self.summary.stopped_by = self.stop_reason()
        self.progress.close()
        return self.summary

    def stop_reason(self) -> str | None:
        if self.context.fatal_errors:
            return "an error that ends the run"
        if self.context.stop.is_set():
            return "a stop signal"
        with self.lock:
            return self.budget.exhausted(dt.datetime.now())

    def run_one(self, candidate: Candidate) -> None:
        started = time.monotonic()
        outcome = process_candidate(self.context, candidate)
        seconds = time.monotonic() - started
        values = csv_values(self.run_id, candidate, outcome, seconds)
        try:
            self.log.append(values)
        except AuditLogError as error:
            LOG.error("%s; the row was: %s", error, format_row(values).strip())
            self.context.end_run(str(error), EXIT_STUDY_PROBLEM)
        with self.lock:
            self.budget.copied_bytes += outcome.copied_bytes
            self.summary.add(outcome)
            self.progress.study_done(candidate, outcome)


def fail_every_study(
    log: AuditLog, candidates: list[Candidate], run_id: str, why: str
) -> RunSummary:
    """Write a failed row for every old study when Backup cannot be reached."""
    summary = RunSummary()
    for candidate in candidates:
        outcome = StudyOutcome(FAILED, f"{why}; kept on Main")
        log.append(csv_values(run_id, candidate, outcome, 0.0))
        summary.add(outcome)
        LOG.error("%s failed: %s", candidate.study_id, outcome.message)
    return summary


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def install_signal_handlers(stop: threading.Event, received: list[int]) -> None:
    """Let SIGTERM (docker stop) and SIGINT finish the current study first."""

    def handle(signum, _frame):
        if not stop.is_set():
            LOG.warning(
                "received %s: finishing the current study, starting no new one",
                signal.Signals(signum).name,
            )
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def describe_settings(settings: Settings) -> str:
    mode = (
        "dry run"
        if settings.dry_run
        else ("copy only (--no-delete)" if settings.no_delete else "rotate")
    )
    return (
        f"{mode}: studies older than {settings.days} days from {settings.main.url} "
        f"to {settings.backup.url}, transfer {settings.transfer}, verify "
        f"{settings.verify}, log {settings.log_csv}"
    )


def run_check(settings: Settings) -> int:
    """--check: validate, reach both servers, print what they are."""
    main = OrthancClient(settings.main, settings)
    backup = OrthancClient(settings.backup, settings)
    main_system, backup_system = preflight(settings, main, backup)
    if backup_system is None:
        backup.system()  # raises OrthancUnreachable with the details
    for config, system in ((settings.main, main_system),
                           (settings.backup, backup_system)):  # fmt: skip
        print(
            f"{config.name}: {config.url} is Orthanc {system.get('Version')} "
            f"named {system.get('Name')!r}"
        )
    print("Configuration OK: Main and Backup are two different servers.")
    return EXIT_OK


def run_rotation(settings: Settings, stop: threading.Event) -> int:
    main = OrthancClient(settings.main, settings)
    backup = OrthancClient(settings.backup, settings)
    _, backup_system = preflight(settings, main, backup)
    log = AuditLog(settings.log_csv)
    try:
        started = time.monotonic()
        LOG.info("%s", describe_settings(settings))
        candidates = plan_run(main, settings)
        copy_pool = concurrent.futures.ThreadPoolExecutor(
            settings.workers, thread_name_prefix="copy"
        )
        context = RunContext(settings, main, backup, stop, copy_pool, log)
        if backup_system is None:
            summary = fail_every_study(
                log, candidates, new_run_id(),
                f"Backup {settings.backup.url} is unreachable",
            )  # fmt: skip
        else:
            with copy_pool:
                summary = Rotation(context, log, candidates).run()
        print(summary.text(time.monotonic() - started, len(candidates)))
    finally:
        log.close()
    for message, _ in context.fatal_errors:
        print(f"error: {message}; nothing more was deleted.", file=sys.stderr)
    if context.fatal_errors:
        return max(status for _, status in context.fatal_errors)
    if backup_system is None or summary.has_problems():
        return EXIT_STUDY_PROBLEM
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    try:
        settings = load_settings(
            sys.argv[1:] if argv is None else argv, dict(os.environ)
        )
        problems = check_local_paths(settings)
        if problems:
            raise ConfigError(problems)
    except ConfigError as error:
        return report_config_error(error)

    try:
        if settings.check:
            return run_check(settings)
        return run_locked(settings)
    except ConfigError as error:
        return report_config_error(error)
    except OrthancAuthError as error:
        print(
            f"error: {describe_auth_error(error)}; nothing was deleted.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except OrthancError as error:
        print(f"error: {error}; nothing was deleted.", file=sys.stderr)
        return EXIT_CONFIG if settings.check else EXIT_STUDY_PROBLEM


def report_config_error(error: ConfigError) -> int:
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def run_locked(settings: Settings) -> int:
    lock_fd = acquire_lock(settings.lock_file)
    if lock_fd < 0:
        print(
            f"error: another run holds the lock file {settings.lock_file}; "
            "this run changed nothing. Wait for it to finish.",
            file=sys.stderr,
        )
        return EXIT_LOCKED
    stop = threading.Event()
    received: list[int] = []
    install_signal_handlers(stop, received)
    try:
        status = run_rotation(settings, stop)
    finally:
        os.close(lock_fd)
    if received:
        return EXIT_SIGNAL_BASE + received[0]
    return status


if __name__ == "__main__":
    sys.exit(main())
