#!/usr/bin/env bash
# Run rotate_studies.py once as JOB_USER with the environment that
# entrypoint.sh saved, send its output to the container log, and record the
# end time and exit status in JOB_STATUS_FILE for healthcheck.sh.
#
# Usage: run_rotation.sh [--env-file PATH] [--check] [--no-redirect] [--] [TOOL ARGS...]
#   --env-file PATH  environment written by entrypoint.sh
#                    (default: $RUN_DIR/job.env, RUN_DIR default /run/pacs-rotate)
#   --check          run "rotate_studies.py --check" only: output stays on this
#                    command's stdout and stderr, and no status is recorded
#   --no-redirect    keep output on this command's stdout and stderr instead of
#                    JOB_STDOUT and JOB_STDERR
# Other arguments go to rotate_studies.py, for example --dry-run.
#
# Cron starts this script as root (see cronjob). It opens JOB_STDOUT and
# JOB_STDERR, which default to /proc/1/fd/1 and /proc/1/fd/2 in the container,
# while it is still root, because only root may open another user's process
# file descriptors. Then it runs the tool as JOB_USER. The exit status is the
# tool's: 0 ok, 1 a study failed or a server was unreachable, 2 invalid
# configuration, 3 another run holds the lock.
set -Eeuo pipefail

readonly PROG=run_rotation.sh
PID_FILE=""

# Print a timestamped message on stdout.
log() {
    printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" "$*"
}

# Print a timestamped error on stderr and exit 2.
die() {
    printf '%s %s: error: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" "$1" >&2
    exit 2
}

# Replace this process with "$@" run as JOB_USER, keeping the environment but
# HOME, USER and LOGNAME. setpriv opens no PAM session, which containers often
# cannot do. Without root, or with JOB_USER=root, the command runs as is.
exec_as_job_user() {
    local home
    if [[ $(id -u) -ne 0 || $JOB_USER == root ]]; then
        exec "$@"
    fi
    home=$(getent passwd "$JOB_USER" | cut -d: -f6)
    exec env HOME="${home:-/}" USER="$JOB_USER" LOGNAME="$JOB_USER" \
        setpriv --reuid="$JOB_USER" --regid="$(id -g "$JOB_USER")" --init-groups \
        --no-new-privs -- "$@"
}

# Load ENV_FILE, written by entrypoint.sh with printf %q quoting.
load_env_file() {
    if [[ ! -e $ENV_FILE ]]; then
        die "environment file $ENV_FILE not found; entrypoint.sh writes it at container start, or pass --env-file"
    fi
    [[ -r $ENV_FILE ]] || die "cannot read $ENV_FILE as $(id -un); run this script as root"
    # shellcheck source=/dev/null
    source "$ENV_FILE"
    APP_DIR=${APP_DIR:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)}
    LOG_DIR=${LOG_DIR:-$APP_DIR/logs}
    JOB_USER=${JOB_USER:-pacsrotate}
    JOB_PYTHON=${JOB_PYTHON:-python3}
    JOB_STATUS_FILE=${JOB_STATUS_FILE:-$LOG_DIR/last_run.status}
    JOB_STDOUT=${JOB_STDOUT:-}
    JOB_STDERR=${JOB_STDERR:-}
}

# Write the status file atomically: a reader sees the old or the new file.
# $1 start epoch, $2 end epoch, $3 exit status.
write_status() {
    local tmp
    tmp=$(mktemp "$JOB_STATUS_FILE.XXXXXX")
    {
        printf 'started_at=%s\n' "$(date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ)"
        printf 'finished_at=%s\n' "$(date -u -d "@$2" +%Y-%m-%dT%H:%M:%SZ)"
        printf 'finished_epoch=%s\n' "$2"
        printf 'exit_status=%s\n' "$3"
    } >"$tmp"
    chmod 0644 "$tmp"
    mv -f -- "$tmp" "$JOB_STATUS_FILE"
}

# Wait for child $1 and return its exit status. A trapped signal interrupts
# "wait" with a status above 128 while the child still runs; wait again then.
wait_for_child() {
    local status
    while true; do
        status=0
        wait "$1" || status=$?
        if ((status > 128)) && kill -0 "$1" 2>/dev/null; then
            continue
        fi
        return "$status"
    done
}

# Write this job's pid file in RUN_DIR, then return 1 if the container is
# stopping. entrypoint.sh creates RUN_DIR/stopping before it reads the pid
# files, so a stopping container either signals this job or this job finds the
# marker and exits without starting the tool.
register_job() {
    local run_dir=${RUN_DIR:-/run/pacs-rotate}
    [[ -d $run_dir ]] || return 0
    PID_FILE=$run_dir/job.$$.pid
    trap 'rm -f -- "$PID_FILE" "$PID_FILE.tmp"' EXIT
    write_pid_file "$$"
    [[ ! -e $run_dir/stopping ]]
}

# Replace PID_FILE's content with the pids $@, one per line, in one rename,
# so that entrypoint.sh never reads half a file.
write_pid_file() {
    [[ -n $PID_FILE ]] || return 0
    printf '%s\n' "$@" >"$PID_FILE.tmp"
    mv -f -- "$PID_FILE.tmp" "$PID_FILE"
}

# Run the tool as JOB_USER, forward SIGTERM and SIGINT to it, record the
# outcome, and exit with the tool's status.
run_rotation() {
    local started finished status=0 tool_pid stop_signal=""
    # Until the tool runs, a stop signal is only remembered.
    trap 'stop_signal=TERM' TERM
    trap 'stop_signal=INT' INT
    register_job || stop_signal=${stop_signal:-TERM}
    if [[ -n $stop_signal ]]; then
        log "the container is stopping (SIG$stop_signal); rotate_studies.py was not started"
        exit $((128 + $(kill -l "$stop_signal")))
    fi
    started=$(date +%s)
    log "starting rotate_studies.py as $JOB_USER (audit log: ${ROTATE_LOG_CSV:-default})"
    exec_as_job_user "$JOB_PYTHON" "$APP_DIR/rotate_studies.py" "$@" &
    tool_pid=$!
    trap 'kill -TERM "$tool_pid" 2>/dev/null || true' TERM
    trap 'kill -INT "$tool_pid" 2>/dev/null || true' INT
    # entrypoint.sh sends SIGTERM to the first pid on container stop and
    # kills both when they outlive JOB_STOP_TIMEOUT.
    write_pid_file "$$" "$tool_pid"
    if [[ -n $stop_signal ]]; then
        kill -"$stop_signal" "$tool_pid" 2>/dev/null || true
    fi
    wait_for_child "$tool_pid" || status=$?
    finished=$(date +%s)
    write_status "$started" "$finished" "$status"
    log "rotate_studies.py exited with status $status after $((finished - started))s"
    exit "$status"
}

main() {
    local check=0 redirect=1
    ENV_FILE=${RUN_DIR:-/run/pacs-rotate}/job.env
    while (($# > 0)); do
        case $1 in
            --env-file)
                (($# >= 2)) || die "--env-file needs a path"
                ENV_FILE=$2
                shift 2
                ;;
            --check) check=1; shift ;;
            --no-redirect) redirect=0; shift ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    load_env_file
    cd -- "$APP_DIR"
    if ((check)); then
        exec_as_job_user "$JOB_PYTHON" "$APP_DIR/rotate_studies.py" --check "$@"
    fi
    if ((redirect)); then
        if [[ -n $JOB_STDOUT ]]; then exec >>"$JOB_STDOUT"; fi
        if [[ -n $JOB_STDERR ]]; then exec 2>>"$JOB_STDERR"; fi
    fi
    run_rotation "$@"
}

main "$@"
