"""The tool's decisions as pure functions, tested without a server."""

from __future__ import annotations

import csv
import datetime as dt
import io
import threading
from pathlib import Path

import pytest

import rotate_studies as rs

TODAY = dt.date(2026, 12, 4)
NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
RECENT_UPDATE = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("20150101", dt.date(2015, 1, 1)),
        ("2015.01.01", dt.date(2015, 1, 1)),
        (" 20150101 ", dt.date(2015, 1, 1)),
        ("19000102", dt.date(1900, 1, 2)),
        ("20261204", TODAY),
        ("", None),
        (None, None),
        ("2019-01-01", None),
        ("00000000", None),
        ("19000101", None),
        ("18991231", None),
        ("20261205", None),
        ("20190230", None),
        ("2019011", None),
        ("201901011", None),
        ("2019.1.01", None),
        ("abcdefgh", None),
    ],
)
def test_parse_study_date(raw, expected):
    assert rs.parse_study_date(raw, TODAY) == expected


def test_reference_date_uses_valid_study_date():
    assert rs.reference_date("20150101", RECENT_UPDATE, TODAY) == (
        dt.date(2015, 1, 1),
        "StudyDate",
    )


@pytest.mark.parametrize("raw", ["", None, "2019-01-01", "19000101", "20300101"])
def test_reference_date_falls_back_to_last_update(raw):
    reference, source = rs.reference_date(raw, RECENT_UPDATE, TODAY)
    assert source == "LastUpdate"
    assert reference == RECENT_UPDATE.astimezone().date()


def test_parse_last_update_is_utc():
    parsed = rs.parse_last_update("20261204T155358")
    assert parsed == dt.datetime(2026, 12, 4, 15, 53, 58, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("age", "days", "expected"),
    [(181, 180, True), (180, 180, False), (179, 180, False), (2, 1, True)],
)
def test_is_old_needs_more_than_days(age, days, expected):
    reference = TODAY - dt.timedelta(days=age)
    assert rs.is_old(reference, TODAY, days) is expected


def study_record(study_id, study_date, last_update="20261201T100000", stable=True):
    tags = {"StudyInstanceUID": f"1.2.{study_id}", "AccessionNumber": "A1"}
    if study_date is not None:
        tags["StudyDate"] = study_date
    return {
        "ID": study_id,
        "IsStable": stable,
        "LastUpdate": last_update,
        "MainDicomTags": tags,
        "PatientMainDicomTags": {"PatientID": "P1"},
    }


def test_select_old_studies_sorts_oldest_first():
    records = [
        study_record("b", "20160101"),
        study_record("a", "20150101"),
        study_record("recent", "20261101"),
        study_record("empty-recent", ""),
        study_record("empty-old", "", last_update="20200101T000000"),
    ]
    selected = rs.select_old_studies(records, TODAY, 180)
    assert [c.study_id for c in selected] == ["a", "b", "empty-old"]


def test_select_old_studies_reports_date_source():
    records = [study_record("x", None, last_update="20200101T000000")]
    (candidate,) = rs.select_old_studies(records, TODAY, 180)
    assert candidate.date_source == "LastUpdate"
    assert candidate.study_date == ""
    assert candidate.age_days == (TODAY - dt.date(2020, 1, 1)).days


def candidate(last_update=NOW - dt.timedelta(days=2), stable=True) -> rs.Candidate:
    return rs.Candidate(
        study_id="s",
        study_instance_uid="1.2.3",
        patient_id="P",
        accession_number="",
        study_date="20150101",
        date_source="StudyDate",
        reference_date=dt.date(2015, 1, 1),
        age_days=4000,
        last_update=last_update,
        is_stable=stable,
    )


def test_hold_back_unstable_study():
    reason = rs.hold_back_reason(candidate(stable=False), NOW, 60)
    assert "not stable" in reason


def test_hold_back_recently_changed_study():
    recent = candidate(last_update=NOW - dt.timedelta(minutes=10))
    reason = rs.hold_back_reason(recent, NOW, 60)
    assert "10 min ago" in reason


def test_hold_back_none_for_idle_stable_study():
    assert rs.hold_back_reason(candidate(), NOW, 60) is None


def instance(number: int, size: int = 100) -> rs.MainInstance:
    return rs.MainInstance(f"main-{number}", f"1.2.3.{number}", size)


def test_missing_instances_by_orthanc_id():
    copy = rs.BackupCopy(frozenset({"main-1", "main-3"}), None)
    missing = rs.missing_instances([instance(1), instance(2), instance(3)], copy)
    assert [i.instance_id for i in missing] == ["main-2"]


def test_verified_instances_excludes_missing_and_mismatched():
    copy = rs.BackupCopy(frozenset({"main-1", "main-2"}), None)
    instances = [instance(1), instance(2), instance(3)]
    verified = rs.verified_instances(instances, copy, [instance(2)])
    assert [i.instance_id for i in verified] == ["main-1"]


def test_size_mismatches_finds_shorter_copy():
    copy = rs.BackupCopy(
        frozenset({"main-1", "main-2"}), None, file_sizes={"main-1": 100, "main-2": 40}
    )
    mismatched = rs.size_mismatches([instance(1), instance(2)], copy)
    assert [i.instance_id for i in mismatched] == ["main-2"]


def test_size_mismatches_ignores_unknown_sizes():
    # Size 0 on Main and no FileSize on Backup mean "unknown", not "different".
    copy = rs.BackupCopy(frozenset({"main-1", "main-2"}), None, file_sizes={})
    instances = [instance(1), instance(2, size=0)]
    assert rs.size_mismatches(instances, copy) == []


def test_grace_remaining_while_backup_copy_is_young():
    copy = rs.BackupCopy(frozenset(), NOW - dt.timedelta(days=1))
    assert rs.grace_remaining(copy, 3, NOW) == dt.timedelta(days=2)


def test_grace_remaining_none_after_grace():
    copy = rs.BackupCopy(frozenset(), NOW - dt.timedelta(days=4))
    assert rs.grace_remaining(copy, 3, NOW) is None


def test_grace_remaining_none_without_grace():
    copy = rs.BackupCopy(frozenset(), NOW)
    assert rs.grace_remaining(copy, 0, NOW) is None


def settings(**overrides) -> rs.Settings:
    base = rs.Settings(
        main=rs.ServerConfig("Main", "http://127.0.0.1:8042"),
        backup=rs.ServerConfig("Backup", "http://127.0.0.1:8043"),
    )
    return rs.Settings(**{**base.__dict__, **overrides})


def test_choose_transfer_zip_for_small_study():
    assert rs.choose_transfer(settings(zip_max_mb=1), 1024 * 1024) == "zip"


def test_choose_transfer_instances_for_large_study():
    assert rs.choose_transfer(settings(zip_max_mb=1), 1024 * 1024 + 1) == "instances"


def test_choose_transfer_instances_mode():
    assert rs.choose_transfer(settings(transfer="instances"), 1) == "instances"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=HYPERLINK(1)", "'=HYPERLINK(1)"),
        ("+1", "'+1"),
        ("-2", "'-2"),
        ("@x", "'@x"),
        ("a=b", "a=b"),
        ("line\nbreak", "line break"),
        ("a\u2028b\x85c\r\nd", "a b c d"),
        (None, ""),
        (12, "12"),
    ],
)
def test_safe_cell(value, expected):
    assert rs.safe_cell(value) == expected


def test_format_row_round_trips_quotes_and_commas():
    values = {"patient_id": 'Müller, "Hans"', "message": "a,b"}
    row = next(csv.reader(io.StringIO(rs.format_row(values))))
    assert len(row) == len(rs.CSV_COLUMNS)
    assert row[rs.CSV_COLUMNS.index("patient_id")] == 'Müller, "Hans"'


@pytest.mark.parametrize(
    ("main_url", "backup_url"),
    [
        ("http://127.0.0.1:8042", "http://localhost:8042"),
        ("http://127.0.0.1:8042", "http://127.0.0.1:8042/"),
        ("http://LOCALHOST:8042", "http://localhost:8042"),
        ("http://127.0.0.1:80", "http://127.0.0.1"),
        ("http://127.0.0.1:8042", "http://[::ffff:127.0.0.1]:8042"),
        ("http://127.0.0.1:8042", "http://[::1]:8042"),
        ("http://127.0.0.1:8042/orthanc", "http://127.0.0.1:8042/./orthanc/"),
        ("http://127.0.0.1:8042/orthanc", "http://127.0.0.1:8042/pacs/../orthanc"),
        ("http://127.0.0.1:8042", "http://127.0.0.1:8042/."),
    ],
)
def test_same_server_by_address(main_url, backup_url):
    main = rs.ServerConfig("Main", main_url.rstrip("/"))
    backup = rs.ServerConfig("Backup", backup_url.rstrip("/"))
    assert rs.same_server_reason(main, backup) is not None


def test_same_server_by_newest_change():
    main = rs.ServerConfig("Main", "http://127.0.0.1:8042")
    backup = rs.ServerConfig("Backup", "http://127.0.0.2:8042")
    change = {"Seq": 7, "ID": "x", "Date": "20261204T100000"}
    assert rs.same_server_reason(main, backup, change, dict(change)) is not None


def test_different_servers_pass_guard():
    main = rs.ServerConfig("Main", "http://127.0.0.1:8042")
    backup = rs.ServerConfig("Backup", "http://127.0.0.1:8043")
    assert rs.same_server_reason(main, backup, {"Seq": 1}, {"Seq": 2}) is None


def test_empty_servers_pass_guard():
    main = rs.ServerConfig("Main", "http://127.0.0.1:8042")
    backup = rs.ServerConfig("Backup", "http://127.0.0.1:8043")
    assert rs.same_server_reason(main, backup, {}, {}) is None


def test_budget_max_studies():
    budget = rs.Budget(max_studies=2, max_bytes=None, deadline=None, started=2)
    assert budget.exhausted(dt.datetime.now()) == "--max-studies 2"


def test_budget_max_bytes():
    budget = rs.Budget(None, max_bytes=1e9, deadline=None, copied_bytes=10**9)
    assert budget.exhausted(dt.datetime.now()) == "--max-gigabytes 1"


def test_budget_deadline():
    deadline = dt.datetime(2026, 12, 4, 6, 0)
    budget = rs.Budget(None, None, deadline)
    assert budget.exhausted(deadline) == "--until 06:00"
    assert budget.exhausted(deadline - dt.timedelta(seconds=1)) is None


def test_run_deadline_rolls_to_next_day():
    start = dt.datetime(2026, 12, 4, 23, 0)
    deadline = rs.run_deadline(dt.time(6, 0), start)
    assert deadline == dt.datetime(2026, 12, 5, 6, 0)


def test_run_deadline_same_day():
    start = dt.datetime(2026, 12, 4, 1, 0)
    assert rs.run_deadline(dt.time(6, 0), start) == dt.datetime(2026, 12, 4, 6, 0)


BASE_ENV = {
    "ORTHANC_MAIN_URL": "http://127.0.0.1:8042",
    "ORTHANC_BACKUP_URL": "http://127.0.0.1:8043",
}


def test_settings_flag_beats_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = rs.load_settings(["--days", "30"], {**BASE_ENV, "ROTATE_DAYS": "90"})
    assert loaded.days == 30


def test_settings_environment_beats_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("ROTATE_DAYS=60\n")
    loaded = rs.load_settings([], {**BASE_ENV, "ROTATE_DAYS": "90"})
    assert loaded.days == 90


def test_settings_env_file_beats_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("ROTATE_DAYS=60\n")
    assert rs.load_settings([], BASE_ENV).days == 60


def test_settings_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = rs.load_settings([], BASE_ENV)
    assert loaded.days == 180
    assert loaded.log_csv == Path("log_migracion.csv")
    assert loaded.lock_file == Path("log_migracion.csv.lock")
    assert loaded.transfer == "zip"
    assert loaded.verify == "sop"


def test_settings_password_with_special_characters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    password = "p:a#s's\"w"
    env_text = "ORTHANC_MAIN_USERNAME=admin\nORTHANC_MAIN_PASSWORD='p:a#s\\'s\"w'\n"
    Path(".env").write_text(env_text)
    loaded = rs.load_settings([], BASE_ENV)
    assert loaded.main.password == password


def test_settings_report_every_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"ORTHANC_MAIN_URL": "127.0.0.1:8042", "ROTATE_DAYS": "0"}
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings(["--workers", "x"], env)
    text = str(raised.value)
    assert "ORTHANC_MAIN_URL='127.0.0.1:8042'" in text
    assert "ORTHANC_BACKUP_URL is missing" in text
    assert "ROTATE_DAYS='0'" in text
    assert "--workers='x'" in text


def test_settings_hide_password_in_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**BASE_ENV, "ORTHANC_MAIN_PASSWORD": "s3cret"}
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings([], env)
    assert "s3cret" not in str(raised.value)


def test_settings_reject_credentials_in_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**BASE_ENV, "ORTHANC_MAIN_URL": "http://user:pw@127.0.0.1:8042"}
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings([], env)
    assert "must not contain credentials" in str(raised.value)


def test_audit_log_writes_header_once(tmp_path):
    path = tmp_path / "log.csv"
    for _ in range(2):
        log = rs.AuditLog(path)
        log.append({"status": "migrated"})
        log.close()
    rows = list(csv.reader(path.open(encoding="utf-8", newline="")))
    assert rows[0] == list(rs.CSV_COLUMNS)
    assert len(rows) == 3


def test_audit_log_removes_torn_last_row(tmp_path):
    path = tmp_path / "log.csv"
    log = rs.AuditLog(path)
    log.append({"status": "migrated"})
    log.close()
    with path.open("a", encoding="utf-8") as stream:
        stream.write('2026-12-04T00:00:00+00:00,abc,"unterminated')
    log = rs.AuditLog(path)
    log.append({"status": "deleted"})
    log.close()
    rows = list(csv.DictReader(path.open(encoding="utf-8", newline="")))
    assert [row["status"] for row in rows] == ["migrated", "deleted"]


def test_log_file_problems_foreign_header(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("a,b,c\n1,2,3\n")
    assert rs.log_file_problems(path)


def test_log_file_problems_accepts_torn_header(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("timestamp,run_id,stu")
    assert rs.log_file_problems(path) == []


def test_audit_log_rewrites_torn_header(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("timestamp,run_id,stu")
    rs.AuditLog(path).close()
    assert path.read_bytes() == (",".join(rs.CSV_COLUMNS) + "\r\n").encode()


def test_shared_files_detects_one_storage():
    main_instance = rs.MainInstance("m1", "1.2.3.1", 10, file_uuid="uuid-1")
    copy = rs.BackupCopy(frozenset({"m1"}), None, file_uuids=frozenset({"uuid-1"}))
    assert rs.shared_files([main_instance], copy) == [main_instance]


def test_shared_files_empty_for_separate_storage():
    main_instance = rs.MainInstance("m1", "1.2.3.1", 10, file_uuid="uuid-1")
    copy = rs.BackupCopy(frozenset({"m1"}), None, file_uuids=frozenset({"uuid-2"}))
    assert rs.shared_files([main_instance], copy) == []


def test_env_file_problems_unparsable_line():
    text = "A=1\n\nB='unclosed\nC=3\n"
    problems = rs.env_file_problems(text, ".env")
    assert len(problems) == 1
    assert problems[0].startswith(".env: line 3 is not NAME=value")


def test_env_file_problems_repeated_name():
    text = "ROTATE_DRY_RUN=1\n# comment\nROTATE_DAYS=30\n\nROTATE_DRY_RUN=0\n"
    problems = rs.env_file_problems(text, ".env")
    assert problems == [
        ".env: line 5 sets ROTATE_DRY_RUN again (first on line 1); "
        "keep one of the two lines"
    ]


def test_settings_reject_unparsable_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text('ORTHANC_MAIN_PASSWORD="unclosed\n')
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings([], BASE_ENV)
    assert ".env: line 1 is not NAME=value" in str(raised.value)


def test_settings_keep_dollar_in_env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text(
        "ORTHANC_MAIN_USERNAME=u\nORTHANC_MAIN_PASSWORD=a${HOME}b\n"
    )
    assert rs.load_settings([], BASE_ENV).main.password == "a${HOME}b"


def test_settings_hide_password_in_url_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**BASE_ENV, "ORTHANC_BACKUP_URL": "http://admin:s3cret@127.0.0.1:8043"}
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings([], env)
    assert "s3cret" not in str(raised.value)
    assert "http://admin:***@127.0.0.1:8043" in str(raised.value)


def judge(instances, copy, mismatched=(), *, copied=True, stopping=False, **options):
    return rs.judge_copy(
        instances,
        copy,
        list(mismatched),
        settings(**options),
        copied=copied,
        stopping=stopping,
        now=NOW,
    )


COMPLETE_COPY = rs.BackupCopy(frozenset({"main-1", "main-2"}), NOW)
TWO_INSTANCES = [instance(1), instance(2)]


def test_judge_complete_copy_deletes_verified():
    verdict = judge(TWO_INSTANCES, COMPLETE_COPY)
    assert verdict.status == "migrated"
    assert verdict.delete == TWO_INSTANCES


def test_judge_already_on_backup_is_deleted_status():
    assert judge(TWO_INSTANCES, COMPLETE_COPY, copied=False).status == "deleted"


def test_judge_missing_instance_keeps_all():
    partial = rs.BackupCopy(frozenset({"main-1"}), NOW)
    verdict = judge(TWO_INSTANCES, partial)
    assert verdict.status == "incomplete"
    assert verdict.delete == []
    assert "lacks 1 of 2" in verdict.message


def test_judge_md5_mismatch_keeps_all():
    verdict = judge(TWO_INSTANCES, COMPLETE_COPY, [instance(2)], verify="md5")
    assert verdict.status == "incomplete"
    assert verdict.delete == []


def test_judge_size_mismatch_keeps_all():
    shorter = rs.BackupCopy(
        frozenset({"main-1", "main-2"}), NOW, file_sizes={"main-1": 100, "main-2": 40}
    )
    verdict = judge(TWO_INSTANCES, shorter)
    assert verdict.status == "incomplete"
    assert verdict.delete == []
    assert "100 bytes on Main, 40 on Backup" in verdict.message


def test_judge_no_delete_keeps_all():
    verdict = judge(TWO_INSTANCES, COMPLETE_COPY, no_delete=True)
    assert verdict.status == "transferred"
    assert verdict.delete == []


def test_judge_grace_period_keeps_all():
    verdict = judge(TWO_INSTANCES, COMPLETE_COPY, grace_days=3)
    assert verdict.status == "transferred"
    assert verdict.delete == []
    assert "grace period of 3 days" in verdict.message


def test_judge_grace_period_without_copy_is_skipped():
    verdict = judge(TWO_INSTANCES, COMPLETE_COPY, copied=False, grace_days=3)
    assert verdict.status == "skipped"


def test_judge_stop_request_keeps_all():
    verdict = judge(TWO_INSTANCES, COMPLETE_COPY, stopping=True)
    assert verdict.status == "transferred"
    assert verdict.delete == []


def test_judge_stop_during_copy_is_skipped():
    partial = rs.BackupCopy(frozenset({"main-1"}), NOW)
    assert judge(TWO_INSTANCES, partial, stopping=True).status == "skipped"


def test_judge_other_patient_copy_does_not_count():
    # read_backup_copy leaves Backup studies under another PatientID out of
    # `instances`, so such a copy looks missing here.
    other = rs.BackupCopy(
        frozenset(), None, total_instances=2, other_patient_ids=("P9",)
    )
    assert judge(TWO_INSTANCES, other).status == "incomplete"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ROTATE_GRACE_DAYS", "10000000000"),
        ("ROTATE_MIN_IDLE_MINUTES", "100000000000000"),
        ("ROTATE_READ_TIMEOUT", "1e300"),
        ("ROTATE_WORKERS", "0"),
        ("ROTATE_RETRIES", "11"),
    ],
)
def test_settings_reject_out_of_range(tmp_path, monkeypatch, name, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings([], {**BASE_ENV, name: value})
    assert f"{name}={value!r}" in str(raised.value)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::1", "orthanc-main", "orthanc_main", "pacs.example.org", "a1.b2"],
)
def test_valid_host(host):
    assert rs.is_valid_host(host)


@pytest.mark.parametrize(
    "host", ["127.0.0.1 ", "127..0.1", "-bad.org", "b\u200bad", "a b.org", ""]
)
def test_invalid_host(host):
    assert not rs.is_valid_host(host)


def test_settings_reject_unknown_env_file_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("ROTATE_DRYRUN=1\nrotate_days=34\n")
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings([], BASE_ENV)
    text = str(raised.value)
    assert (
        "ROTATE_DRYRUN is not a setting of this tool; did you mean ROTATE_DRY_RUN?"
        in text
    )
    assert "rotate_days is not a setting" in text


def test_settings_reject_unknown_environment_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rs.ConfigError) as raised:
        rs.load_settings([], {**BASE_ENV, "ROTATE_NODELETE": "1"})
    assert "did you mean ROTATE_NO_DELETE?" in str(raised.value)


def test_settings_accept_container_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {**BASE_ENV, "ROTATE_HEALTH_MAX_AGE_HOURS": "30", "ORTHANC__NAME": "x"}
    assert rs.load_settings([], env).days == 180


def test_unchanged_instances_drops_rewritten_file():
    verified = [
        rs.MainInstance("m1", "1.2.3.1", 10, file_uuid="f1"),
        rs.MainInstance("m2", "1.2.3.2", 10, file_uuid="f2"),
        rs.MainInstance("m3", "1.2.3.3", 10, file_uuid="f3"),
    ]
    current = [
        rs.MainInstance("m1", "1.2.3.1", 10, file_uuid="f1"),
        rs.MainInstance("m2", "1.2.3.2", 12, file_uuid="f2-new"),
    ]
    kept = rs.unchanged_instances(verified, current)
    assert [i.instance_id for i in kept] == ["m1"]


def test_audit_log_completes_row_missing_newline(tmp_path):
    path = tmp_path / "log.csv"
    log = rs.AuditLog(path)
    log.append({"status": "migrated"})
    log.close()
    path.write_bytes(path.read_bytes()[:-1])  # drop the final \n of the row
    rs.AuditLog(path).close()
    rows = list(csv.DictReader(path.open(encoding="utf-8", newline="")))
    assert [row["status"] for row in rows] == ["migrated"]


def test_same_file_through_hard_link(tmp_path):
    original = tmp_path / "log.csv"
    original.write_text("")
    link = tmp_path / "rotate.lock"
    link.hardlink_to(original)
    assert rs.same_file(original, link)


def test_audit_log_notices_deleted_file(tmp_path):
    path = tmp_path / "log.csv"
    log = rs.AuditLog(path)
    path.unlink()
    with pytest.raises(rs.AuditLogError):
        log.ensure_writable()
    log.close()


# Streamed downloads checked against Main's FileSize


class FakeDownload:
    """A response with the attributes StreamedBody reads: headers and raw."""

    def __init__(self, body: bytes, content_length: int | None = None):
        self.headers = {}
        if content_length is not None:
            self.headers["Content-Length"] = str(content_length)
        self.raw = io.BytesIO(body)


def stream_all(body: rs.StreamedBody) -> list[bytes]:
    chunks = []
    while chunk := body.read(1000):
        chunks.append(chunk)
    return chunks


def test_streamed_body_exact_length_passes():
    body = rs.StreamedBody(FakeDownload(b"x" * 2500), threading.Event(), 2500)
    assert b"".join(stream_all(body)) == b"x" * 2500


def test_streamed_body_shorter_than_file_raises():
    body = rs.StreamedBody(FakeDownload(b"x" * 2400), threading.Event(), 2500)
    with pytest.raises(rs.DownloadFailed, match="ended after 2400 of 2500"):
        stream_all(body)


def test_streamed_body_longer_than_file_stops_early():
    # Without a Content-Length, a longer download must fail before the bytes
    # handed to the upload reach the file size, which would complete it.
    handed = []
    body = rs.StreamedBody(FakeDownload(b"x" * 2600), threading.Event(), 2500)
    with pytest.raises(rs.DownloadFailed):
        while chunk := body.read(1000):
            handed.append(chunk)
    assert sum(map(len, handed)) < 2500


def test_streamed_body_content_length_disagrees():
    with pytest.raises(rs.DownloadFailed, match="Content-Length 2400"):
        rs.StreamedBody(FakeDownload(b"x" * 2400, 2400), threading.Event(), 2500)


@pytest.mark.parametrize(
    ("missing", "total", "no_delete", "expected"),
    [
        (
            1,
            1,
            False,
            "would copy 1 of 1 instance to Backup, verify, delete 1 instance",
        ),
        (
            0,
            1,
            False,
            "Backup holds all 1 instance; would verify and delete 1 instance",
        ),
        (
            2,
            3,
            False,
            "would copy 2 of 3 instances to Backup, verify, delete 3 instances",
        ),
        (0, 3, True, "Backup holds all 3 instances; would verify and keep it on Main"),
    ],
)
def test_describe_plan_counts(missing, total, no_delete, expected):
    plan = rs.describe_plan(missing, total, settings(no_delete=no_delete))
    assert plan.startswith(expected)
