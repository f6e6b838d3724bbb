"""resumen_csv.sh against audit logs with every RFC 4180 hard case."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest
from guarantees import CSV_COLUMNS as COLUMNS

SCRIPT = Path(__file__).resolve().parent.parent / "resumen_csv.sh"
# A quoted message whose second line looks like a whole audit row: a parser
# that splits records at line breaks counts an extra study on 2024-01-01.
FAKE_ROW_MESSAGE = (
    "copy cut short\n2024-01-01T00:00:00+00:00,r9,s9,1.9,P9,,20200101,"
    "StudyDate,9,1,1,999999,zip,migrated,1.0,fake"
)
HARD_ROWS = [
    ("2025-06-25T03:00:05+00:00", "migrated", "1000", 'ok, "quoted", two\nlines'),
    ("2025-06-25T03:01:00+00:00", "transferred", "500", "kept on Main, --no-delete"),
    ("2025-06-18T03:00:01+00:00", "deleted", "2048", "CRLF line\r\nbreak"),
    ("2025-06-18T03:02:00+00:00", "incomplete", "4096", FAKE_ROW_MESSAGE),
    ("2025-06-18T03:03:00+00:00", "failed", "", '\'=HYPERLINK("x")'),
    ("2025-06-11T03:00:00+00:00", "skipped", "0", "younger than 180 days"),
    ("2025-06-11T03:00:01+00:00", "dry_run", "7777", "would migrate"),
    ("2025-06-11T03:00:02+00:00", "migrated", "3145728", "Muñoz^José, ß, 日本"),
]
ENGLISH_REPORT = """\
Total studies processed      : 8
Transferred                  : 3
Verified and deleted         : 3
Backup incomplete            : 1
Failed                       : 1
Skipped                      : 1
Dry run                      : 1
Freed on Main                : 3148776 bytes (3.0 MiB)

Statistics by date:
2025-06-25 - 2 studies
2025-06-18 - 3 studies
2025-06-11 - 3 studies
"""
SPANISH_REPORT = """\
Total de estudios procesados : 8
Estudios transferidos        : 3
Verificados y eliminados     : 3
Backup incompleto            : 1
Fallidos                     : 1
Omitidos                     : 1
Simulados (dry run)          : 1
Espacio liberado en Main     : 3148776 bytes (3.0 MiB)

Estadísticas por fecha:
2025-06-25 - 2 estudios
2025-06-18 - 3 estudios
2025-06-11 - 3 estudios
"""
EMPTY_LOG_REPORT = """\
Total studies processed      : 0
Transferred                  : 0
Verified and deleted         : 0
Backup incomplete            : 0
Failed                       : 0
Skipped                      : 0
Dry run                      : 0
Freed on Main                : 0 bytes (0 B)

Statistics by date:
(no records)
"""


def write_log(path: Path, rows, columns=COLUMNS) -> Path:
    """Write audit rows (timestamp, status, size_bytes, message) with csv."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for number, (timestamp, status, size, message) in enumerate(rows):
            row = dict.fromkeys(columns, "")
            row.update(
                timestamp=timestamp,
                run_id="run,1",
                study_id=f"study-{number}",
                patient_id=f'PAT "{number}", Ñandú',
                status=status,
                size_bytes=size,
                transfer="zip",
                message=message,
            )
            writer.writerow({key: row[key] for key in columns})
    return path


def summarize(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run resumen_csv.sh with LANG=C.UTF-8 unless `env` overrides it."""
    full_env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("ROTATE_LOG_CSV", "LC_ALL", "LANGUAGE")
    }
    full_env["LANG"] = "C.UTF-8"
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture
def hard_log(tmp_path) -> Path:
    return write_log(tmp_path / "log_migracion.csv", HARD_ROWS)


def test_summary_english_counts(hard_log):
    result = summarize(hard_log)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ENGLISH_REPORT


def test_summary_spanish_flag(hard_log):
    result = summarize("--lang", "es", hard_log)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SPANISH_REPORT


def test_summary_spanish_from_lang(hard_log):
    result = summarize(hard_log, env={"LANG": "es_ES.UTF-8"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == SPANISH_REPORT


def test_summary_flag_overrides_lang(hard_log):
    result = summarize("--lang=en", hard_log, env={"LANG": "es_AR.UTF-8"})
    assert result.stdout == ENGLISH_REPORT


@pytest.mark.parametrize("lang", ["en", "es"])
def test_summary_c_locale(hard_log, lang):
    expected = ENGLISH_REPORT if lang == "en" else SPANISH_REPORT
    result = summarize("--lang", lang, hard_log, env={"LC_ALL": "C", "LANG": "C"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


def test_summary_columns_found_by_name(tmp_path):
    shuffled = list(reversed(COLUMNS)) + ["extra column"]
    path = write_log(tmp_path / "shuffled.csv", HARD_ROWS, columns=shuffled)
    result = summarize(path)
    assert result.stdout == ENGLISH_REPORT


def test_summary_utf8_bom(tmp_path, hard_log):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + hard_log.read_bytes())
    result = summarize(path)
    assert result.stdout == ENGLISH_REPORT


def test_summary_default_from_env(hard_log, tmp_path):
    result = summarize(env={"ROTATE_LOG_CSV": str(hard_log)}, cwd=tmp_path / "..")
    assert result.stdout == ENGLISH_REPORT


def test_summary_default_in_cwd(hard_log, tmp_path):
    result = summarize(cwd=tmp_path)
    assert result.stdout == ENGLISH_REPORT


def test_summary_path_with_spaces(tmp_path):
    path = write_log(tmp_path / "audit log $HOME #1.csv", HARD_ROWS)
    result = summarize(path)
    assert result.stdout == ENGLISH_REPORT


def test_summary_header_only(tmp_path):
    path = write_log(tmp_path / "header.csv", [])
    result = summarize(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EMPTY_LOG_REPORT


def test_summary_header_only_spanish(tmp_path):
    path = write_log(tmp_path / "header.csv", [])
    result = summarize("--lang", "es", path)
    assert "Total de estudios procesados : 0\n" in result.stdout
    assert result.stdout.endswith("Estadísticas por fecha:\n(sin registros)\n")


def test_summary_human_sizes(tmp_path):
    rows = [
        ("2025-01-01T00:00:00Z", "migrated", "512", ""),
        ("2025-01-02T00:00:00Z", "deleted", str(5 * 1024**3), ""),
        ("2025-01-03T00:00:00Z", "failed", "999999999", "not counted"),
    ]
    result = summarize(write_log(tmp_path / "sizes.csv", rows))
    expected = f"Freed on Main                : {512 + 5 * 1024**3} bytes (5.0 GiB)\n"
    assert expected in result.stdout


def test_summary_unknown_timestamp(tmp_path):
    rows = [("", "migrated", "1", ""), ("garbage", "failed", "", "")]
    result = summarize(write_log(tmp_path / "dates.csv", rows))
    assert result.stdout.endswith("Statistics by date:\nunknown - 2 studies\n")


def test_summary_unknown_status_counted(tmp_path):
    rows = [("2025-01-01T00:00:00Z", "exploded", "1", "")]
    result = summarize(write_log(tmp_path / "status.csv", rows))
    assert "Total studies processed      : 1\n" in result.stdout
    assert "Other status                 : 1\n" in result.stdout


def assert_one_line_error(result, *fragments):
    """Check exit status 1, no stdout and a one-line message with `fragments`."""
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_summary_missing_file(tmp_path):
    path = tmp_path / "absent.csv"
    result = summarize(path)
    assert_one_line_error(result, "not found", str(path), "ROTATE_LOG_CSV")


def test_summary_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    assert_one_line_error(summarize(path), "empty", str(path))


def test_summary_blank_header(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text("\n\n", encoding="utf-8")
    assert_one_line_error(summarize(path), "no header row")


def test_summary_missing_status_column(tmp_path):
    columns = [name for name in COLUMNS if name != "status"]
    path = tmp_path / "no-status.csv"
    path.write_text(",".join(columns) + "\n", encoding="utf-8")
    assert_one_line_error(summarize(path), "missing column(s) status", str(path))


def test_summary_short_record(tmp_path, hard_log):
    path = tmp_path / "short.csv"
    path.write_text(hard_log.read_text("utf-8") + "2025-06-01,x,y\n", "utf-8")
    assert_one_line_error(summarize(path), "has 3 fields, the header has 16")


def test_summary_torn_last_row_warns(tmp_path, hard_log):
    # A run killed while appending leaves its row cut short, without a line end.
    path = tmp_path / "torn.csv"
    path.write_text(
        hard_log.read_text("utf-8") + "2025-06-01T03:00:00+00:00,r", "utf-8"
    )
    result = summarize(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ENGLISH_REPORT
    assert "is cut short" in result.stderr
    assert "not counted; the next run removes it" in result.stderr


def test_summary_whole_unterminated_row_counted(tmp_path, hard_log):
    # csv.DictWriter ends each row with \r\n.
    path = tmp_path / "no-final-line-end.csv"
    path.write_text(hard_log.read_text("utf-8").removesuffix("\r\n"), "utf-8")
    result = summarize(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ENGLISH_REPORT
    assert result.stderr == ""


def test_summary_unterminated_header(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text(",".join(COLUMNS), "utf-8")
    result = summarize(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EMPTY_LOG_REPORT


def test_summary_unterminated_quote(tmp_path, hard_log):
    path = tmp_path / "cut.csv"
    path.write_text(hard_log.read_text("utf-8") + '2025-06-01,"open\n', "utf-8")
    assert_one_line_error(summarize(path), "invalid CSV")


def test_summary_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(",".join(COLUMNS).encode() + b"\n" + "Muñoz".encode("latin-1"))
    assert_one_line_error(summarize(path), "not valid UTF-8")


def test_summary_invalid_size(tmp_path):
    rows = [("2025-01-01T00:00:00Z", "migrated", "12kB", "")]
    path = write_log(tmp_path / "size.csv", rows)
    assert_one_line_error(summarize(path), "invalid size_bytes '12kB'")


def test_summary_invalid_lang(hard_log):
    result = summarize("--lang", "fr", hard_log)
    assert result.returncode == 2
    assert "invalid --lang 'fr'" in result.stderr
