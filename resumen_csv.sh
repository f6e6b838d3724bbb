#!/usr/bin/env bash
# Summarize the pacs-rotate audit log (log_migracion.csv): studies per status,
# bytes freed on Main and studies per run date, newest date first.
#
# Usage: resumen_csv.sh [--lang es|en] [CSV]
# CSV defaults to $ROTATE_LOG_CSV, else log_migracion.csv. Labels are Spanish
# with --lang es or when LANG starts with "es", English otherwise.
# Exit status: 0 on success, 1 when the CSV is missing, empty or malformed,
# 2 on invalid usage.
set -Eeuo pipefail

readonly PROG=${0##*/}

# The CSV is parsed by Python's csv module because audit messages may contain
# commas, doubled quotes and line breaks inside quoted fields (RFC 4180).
# mawk, the awk of Debian slim images, has no FPAT, and a record that spans
# lines needs a quote-tracking state machine. python3 is in the image anyway
# because rotate_studies.py needs it. The file is read as UTF-8 whatever the
# locale, so LC_ALL=C gives the same result. The program prints tab-separated
# "key value" lines that the shell turns into labels.
# shellcheck disable=SC2016 # The Python program is literal text.
readonly COUNT_PROGRAM='
import csv, re, sys

path = sys.argv[1]
REQUIRED = ("timestamp", "status", "size_bytes")
STATUSES = ("migrated", "deleted", "transferred", "incomplete", "failed",
            "skipped", "dry_run")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

def fail(message):
    sys.exit(f"resumen_csv.sh: {path}: {message}")

def human_size(size):
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"

counts = dict.fromkeys(STATUSES, 0)
totals = {"total": 0, "other": 0, "freed": 0}
dates = {}
torn = []

def terminated_lines(handle):
    """Yield each line that ends with a line break; keep an unterminated one aside."""
    for line in handle:
        if line.endswith(("\n", "\r")):
            yield line
        else:
            torn.append(line)

def count_row(row, column, line):
    totals["total"] += 1
    status = row[column["status"]].strip()
    if status in counts:
        counts[status] += 1
    else:
        totals["other"] += 1
    if status in ("migrated", "deleted"):
        size = row[column["size_bytes"]].strip() or "0"
        if not size.isdigit():
            fail(f"invalid size_bytes {size!r} in the record ending on"
                 f" line {line}; expected a byte count")
        totals["freed"] += int(size)
    match = DATE.match(row[column["timestamp"]].strip())
    day = match.group(0) if match else "unknown"
    dates[day] = dates.get(day, 0) + 1

def count_torn_line(header, column, line):
    """Count the unterminated last line if it is a whole row, else warn.

    A run killed while appending leaves its row cut short without a line
    break, and the next run removes that line before it writes.
    """
    try:
        rows = list(csv.reader(torn, strict=True))
    except csv.Error:
        rows = []
    if len(rows) == 1 and len(rows[0]) == len(header):
        count_row(rows[0], column, line)
        return
    print(f"resumen_csv.sh: {path}: warning: line {line} is cut short (a run was"
          " stopped while writing it) and is not counted; the next run"
          " removes it", file=sys.stderr)

try:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(terminated_lines(handle), strict=True)
        header = next(reader, None)
        if header is None and torn:
            header = next(csv.reader(torn, strict=True), None)
            torn.clear()
        if not header or not any(cell.strip() for cell in header):
            fail("no header row; expected the columns " + ", ".join(REQUIRED))
        missing = [name for name in REQUIRED if name not in header]
        if missing:
            fail("missing column(s) " + ", ".join(missing)
                 + "; header is: " + ",".join(header))
        column = {name: header.index(name) for name in REQUIRED}
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                fail(f"record ending on line {reader.line_num} has {len(row)}"
                     f" fields, the header has {len(header)}")
            count_row(row, column, reader.line_num)
        if torn:
            count_torn_line(header, column, reader.line_num + 1)
except OSError as error:
    fail(f"cannot read the file ({error.strerror})")
except UnicodeDecodeError as error:
    fail(f"not valid UTF-8 ({error.reason} at byte {error.start})")
except csv.Error as error:
    fail(f"invalid CSV near line {reader.line_num}: {error}")

total, other, freed = totals["total"], totals["other"], totals["freed"]
transferred = counts["migrated"] + counts["transferred"]
deleted = counts["migrated"] + counts["deleted"]
print(f"total\t{total}")
print(f"transferred\t{transferred}")
print(f"deleted\t{deleted}")
for status in ("incomplete", "failed", "skipped", "dry_run"):
    print(f"{status}\t{counts[status]}")
print(f"other\t{other}")
print(f"freed\t{freed}\t{human_size(freed)}")
for day in sorted(dates, reverse=True):
    print(f"date\t{day}\t{dates[day]}")
'

# Print the usage text.
usage() {
    printf 'Usage: %s [--lang es|en] [CSV]\n' "$PROG"
    printf 'Summarize a pacs-rotate audit log. CSV defaults to the value of\n'
    printf 'ROTATE_LOG_CSV, else log_migracion.csv in the current directory.\n'
}

# Print a usage error with the fix and exit 2.
usage_error() {
    printf '%s: %s\n' "$PROG" "$1" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

# Set the LABEL_* variables for language $1 (es or en).
set_labels() {
    if [[ $1 == es ]]; then
        LABEL_TOTAL='Total de estudios procesados :'
        LABEL_TRANSFERRED='Estudios transferidos        :'
        LABEL_DELETED='Verificados y eliminados     :'
        LABEL_INCOMPLETE='Backup incompleto            :'
        LABEL_FAILED='Fallidos                     :'
        LABEL_SKIPPED='Omitidos                     :'
        LABEL_DRY_RUN='Simulados (dry run)          :'
        LABEL_OTHER='Con otro estado              :'
        LABEL_FREED='Espacio liberado en Main     :'
        LABEL_BYTES='bytes'
        LABEL_BY_DATE='Estadísticas por fecha:'
        LABEL_STUDIES='estudios'
        LABEL_NO_DATES='(sin registros)'
    else
        LABEL_TOTAL='Total studies processed      :'
        LABEL_TRANSFERRED='Transferred                  :'
        LABEL_DELETED='Verified and deleted         :'
        LABEL_INCOMPLETE='Backup incomplete            :'
        LABEL_FAILED='Failed                       :'
        LABEL_SKIPPED='Skipped                      :'
        LABEL_DRY_RUN='Dry run                      :'
        LABEL_OTHER='Other status                 :'
        LABEL_FREED='Freed on Main                :'
        LABEL_BYTES='bytes'
        LABEL_BY_DATE='Statistics by date:'
        LABEL_STUDIES='studies'
        LABEL_NO_DATES='(no records)'
    fi
}

# Turn the "key<TAB>value" lines of COUNT_PROGRAM on stdin into the report.
print_report() {
    local key value human dates=0
    while IFS=$'\t' read -r key value human; do
        case $key in
            total) printf '%s %s\n' "$LABEL_TOTAL" "$value" ;;
            transferred) printf '%s %s\n' "$LABEL_TRANSFERRED" "$value" ;;
            deleted) printf '%s %s\n' "$LABEL_DELETED" "$value" ;;
            incomplete) printf '%s %s\n' "$LABEL_INCOMPLETE" "$value" ;;
            failed) printf '%s %s\n' "$LABEL_FAILED" "$value" ;;
            skipped) printf '%s %s\n' "$LABEL_SKIPPED" "$value" ;;
            dry_run) printf '%s %s\n' "$LABEL_DRY_RUN" "$value" ;;
            other)
                if ((value > 0)); then
                    printf '%s %s\n' "$LABEL_OTHER" "$value"
                fi
                ;;
            freed)
                printf '%s %s %s (%s)\n' "$LABEL_FREED" "$value" "$LABEL_BYTES" "$human"
                printf '\n%s\n' "$LABEL_BY_DATE"
                ;;
            date)
                printf '%s - %s %s\n' "$value" "$human" "$LABEL_STUDIES"
                dates=$((dates + 1))
                ;;
        esac
    done
    if ((dates == 0)); then
        printf '%s\n' "$LABEL_NO_DATES"
    fi
}

main() {
    local lang csv="" counts
    if [[ ${LANG:-} == es* ]]; then lang=es; else lang=en; fi
    while (($# > 0)); do
        case $1 in
            -h | --help) usage; return 0 ;;
            --lang)
                (($# >= 2)) || usage_error "--lang needs a value: es or en"
                lang=$2
                shift 2
                ;;
            --lang=*) lang=${1#--lang=}; shift ;;
            --) shift; break ;;
            -*) usage_error "unknown option $1" ;;
            *) break ;;
        esac
    done
    (($# <= 1)) || usage_error "expected at most one CSV path, got $#"
    [[ $lang == es || $lang == en ]] || usage_error "invalid --lang '$lang'; use es or en"
    csv=${1:-${ROTATE_LOG_CSV:-log_migracion.csv}}

    if [[ ! -e $csv ]]; then
        printf '%s: audit log not found: %s (pass the CSV path or set ROTATE_LOG_CSV)\n' \
            "$PROG" "$csv" >&2
        return 1
    fi
    if [[ ! -s $csv ]]; then
        printf '%s: audit log is empty: %s (no run has written to it yet)\n' "$PROG" "$csv" >&2
        return 1
    fi
    counts=$(python3 -c "$COUNT_PROGRAM" "$csv") || return 1
    set_labels "$lang"
    print_report <<<"$counts"
}

main "$@"
