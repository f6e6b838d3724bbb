#!/usr/bin/env bash
# Docker HEALTHCHECK for pacs-rotate. Prints one line and exits 0 (healthy)
# or 1 (unhealthy). Unhealthy when the last run recorded in JOB_STATUS_FILE
# exited non-zero, or when no run has ended within
# ROTATE_HEALTH_MAX_AGE_HOURS (default 192 h, 8 days: a weekly schedule plus
# one day for a long run). The age counts from the later of the last run's
# end and the container start, so a restarted container is healthy until one
# interval has passed without a run.
set -Eeuo pipefail

LOG_DIR=${LOG_DIR:-${APP_DIR:-/app}/logs}
JOB_STATUS_FILE=${JOB_STATUS_FILE:-$LOG_DIR/last_run.status}
RUN_DIR=${RUN_DIR:-/run/pacs-rotate}
MAX_AGE_HOURS=${ROTATE_HEALTH_MAX_AGE_HOURS:-192}

# Print a verdict and exit: $1 is 0 for healthy, 1 for unhealthy.
report() {
    if (($1 == 0)); then printf 'healthy: %s\n' "$2"; else printf 'unhealthy: %s\n' "$2"; fi
    exit "$1"
}

# Print the value of KEY from the key=value status file $2, or nothing. The
# file is parsed, not sourced, because it sits on a host volume.
status_value() {
    local key value
    while IFS='=' read -r key value; do
        if [[ $key == "$1" ]]; then
            printf '%s' "$value"
            return
        fi
    done <"$2"
}

main() {
    local now started=0 finished=0 exit_status reference age_hours
    [[ $MAX_AGE_HOURS =~ ^[1-9][0-9]*$ ]] ||
        report 1 "invalid ROTATE_HEALTH_MAX_AGE_HOURS '$MAX_AGE_HOURS'; use a whole number of hours"
    now=$(date +%s)
    if [[ -r $RUN_DIR/started ]]; then started=$(<"$RUN_DIR/started"); fi
    [[ $started =~ ^[0-9]+$ ]] || started=0

    if [[ -e $JOB_STATUS_FILE ]]; then
        exit_status=$(status_value exit_status "$JOB_STATUS_FILE")
        finished=$(status_value finished_epoch "$JOB_STATUS_FILE")
        if [[ ! $exit_status =~ ^[0-9]+$ || ! $finished =~ ^[0-9]+$ ]]; then
            report 1 "$JOB_STATUS_FILE is unreadable or incomplete; the next run rewrites it"
        fi
        if ((exit_status != 0)); then
            report 1 "the last run, finished at $(date -u -d "@$finished" +%Y-%m-%dT%H:%M:%SZ), exited with status $exit_status; see docker logs"
        fi
    elif ((started == 0)); then
        report 1 "no run recorded and $RUN_DIR/started is missing; entrypoint.sh has not finished starting"
    fi

    reference=$((finished > started ? finished : started))
    age_hours=$(((now - reference) / 3600))
    if ((now - reference > MAX_AGE_HOURS * 3600)); then
        if ((finished == 0)); then
            report 1 "no run has ended in the ${age_hours} h since the container started (limit ${MAX_AGE_HOURS} h); check CRON_SCHEDULE"
        fi
        report 1 "no run has ended in the last ${age_hours} h (limit ${MAX_AGE_HOURS} h); check CRON_SCHEDULE and docker logs"
    fi
    if ((finished == 0)); then
        report 0 "no run yet; the container started ${age_hours} h ago (limit ${MAX_AGE_HOURS} h)"
    fi
    report 0 "the last run finished at $(date -u -d "@$finished" +%Y-%m-%dT%H:%M:%SZ) with status 0"
}

main "$@"
