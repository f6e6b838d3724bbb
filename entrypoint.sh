#!/usr/bin/env bash
# Container entrypoint for pacs-rotate. It prints the settings with secrets
# masked and checks both Orthanc servers with "rotate_studies.py --check".
# Then it writes the environment for the cron job, optionally runs the
# rotation once, installs the cron schedule and runs cron. SIGTERM and SIGINT
# are forwarded to cron and to a running job.
#
# Every path can be overridden through the environment, so the same script
# runs on a host in a temporary directory:
#   APP_DIR        directory of rotate_studies.py and these scripts (default:
#                  this script's directory)
#   LOG_DIR        audit log directory (default: $APP_DIR/logs)
#   RUN_DIR        runtime files: job.env, started, job.<pid>.pid
#                  (default: /run/pacs-rotate)
#   CRON_D         cron's drop-in directory (default: /etc/cron.d)
#   CRON_FILE      installed schedule file (default: $CRON_D/pacs-rotate)
#   CRON_TEMPLATE  schedule template (default: $APP_DIR/cronjob)
#   CRON_SCHEDULE  five cron fields or @weekly etc. (default: "0 3 * * 1")
#   RUN_ON_START   1 to run the rotation once before cron starts (default: 0)
#   JOB_USER       unprivileged user that runs the tool (default: pacsrotate)
#   JOB_STDOUT, JOB_STDERR  where job output goes (default: this process's
#                  stdout and stderr through /proc/<pid>/fd/1 and 2)
#   JOB_STOP_TIMEOUT  seconds to wait for a job after SIGTERM (default: 8)
set -Eeuo pipefail

readonly PROG=entrypoint.sh
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

export APP_DIR=${APP_DIR:-$SCRIPT_DIR}
export LOG_DIR=${LOG_DIR:-$APP_DIR/logs}
export ROTATE_LOG_CSV=${ROTATE_LOG_CSV:-$LOG_DIR/log_migracion.csv}
export RUN_DIR=${RUN_DIR:-/run/pacs-rotate}
export JOB_USER=${JOB_USER:-pacsrotate}
export JOB_STATUS_FILE=${JOB_STATUS_FILE:-$LOG_DIR/last_run.status}
# NOTE: a job reopens these paths with O_APPEND. When this script's stdout is
# a regular file opened without O_APPEND, its own writes can overwrite job
# output. Docker gives PID 1 a pipe or a terminal, where this cannot happen.
export JOB_STDOUT=${JOB_STDOUT:-/proc/$$/fd/1}
export JOB_STDERR=${JOB_STDERR:-/proc/$$/fd/2}
CRON_D=${CRON_D:-/etc/cron.d}
CRON_FILE=${CRON_FILE:-$CRON_D/pacs-rotate}
CRON_TEMPLATE=${CRON_TEMPLATE:-$APP_DIR/cronjob}
CRON_SCHEDULE=${CRON_SCHEDULE:-0 3 * * 1}
RUN_ON_START=${RUN_ON_START:-0}
JOB_STOP_TIMEOUT=${JOB_STOP_TIMEOUT:-8}
readonly ENV_FILE=$RUN_DIR/job.env
readonly JOB_SCRIPT=$APP_DIR/run_rotation.sh

CRON_PID=""
CRON_FILE_INSTALLED=0

# Print a timestamped message on stdout.
log() {
    printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" "$*"
}

# Print a timestamped error on stderr and exit with status ${2:-1}.
die() {
    printf '%s %s: error: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" "$1" >&2
    exit "${2:-1}"
}

trap 'die "command failed on line $LINENO: $BASH_COMMAND"' ERR

# Succeed when RUN_ON_START requests a run at start. Reject unknown values.
run_on_start_enabled() {
    case ${RUN_ON_START,,} in
        1 | true | yes | on) return 0 ;;
        0 | false | no | off | "") return 1 ;;
        *) die "invalid RUN_ON_START '$RUN_ON_START'; use 1 or 0" 2 ;;
    esac
}

# Reject settings that would break the cron file or the job before anything
# is written.
validate_settings() {
    local field='[0-9A-Za-z*/,-]+'
    if [[ ! $CRON_SCHEDULE =~ ^@(yearly|annually|monthly|weekly|daily|midnight|hourly)$ &&
        ! $CRON_SCHEDULE =~ ^[[:space:]]*$field([[:space:]]+$field){4}[[:space:]]*$ ]]; then
        die "invalid CRON_SCHEDULE '$CRON_SCHEDULE'; use five cron fields such as '0 3 * * 1' or @weekly" 2
    fi
    if [[ ! $JOB_STOP_TIMEOUT =~ ^[0-9]+$ ]]; then
        die "invalid JOB_STOP_TIMEOUT '$JOB_STOP_TIMEOUT'; use a number of seconds" 2
    fi
    run_on_start_enabled || true
    [[ $(id -u) -eq 0 ]] || die "must run as root because cron needs root; run the container without --user" 2
    id -u "$JOB_USER" >/dev/null 2>&1 ||
        die "JOB_USER '$JOB_USER' does not exist; create the user or set JOB_USER to an existing one" 2
    [[ -r $APP_DIR/rotate_studies.py ]] ||
        die "$APP_DIR/rotate_studies.py not found; set APP_DIR to the directory that contains it" 2
    [[ -x $JOB_SCRIPT ]] || die "$JOB_SCRIPT not found or not executable" 2
    [[ -r $CRON_TEMPLATE ]] || die "cron template $CRON_TEMPLATE not found; set CRON_TEMPLATE" 2
    local path
    for path in "$JOB_SCRIPT" "$ENV_FILE"; do
        if [[ $path == *[\'%]* || $path == *$'\n'* ]]; then
            die "path '$path' contains a quote, % or newline, which a cron command line cannot carry; choose another APP_DIR or RUN_DIR" 2
        fi
    done
}

# Print VALUE of variable NAME with secrets masked: variables whose name
# contains PASSWORD, SECRET or TOKEN show only whether they are set, and a
# password inside a URL (scheme://user:password@host) becomes ***.
masked_value() {
    local name=$1 value=$2
    case ${name^^} in
        *PASSWORD* | *SECRET* | *TOKEN*)
            if [[ -n $value ]]; then printf '(set)'; else printf '(empty)'; fi
            return
            ;;
    esac
    if [[ $value =~ ^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@(.*)$ ]]; then
        value="${BASH_REMATCH[1]}:***@${BASH_REMATCH[2]}"
    fi
    printf '%s' "$value"
}

# Print the container settings and every ORTHANC_* and ROTATE_* variable.
print_settings() {
    local name
    log "settings (passwords are not shown):"
    for name in APP_DIR LOG_DIR RUN_DIR CRON_FILE CRON_SCHEDULE RUN_ON_START JOB_USER \
        JOB_STATUS_FILE JOB_STDOUT JOB_STDERR TZ; do
        if [[ -v $name ]]; then
            log "  $name=$(masked_value "$name" "${!name}")"
        else
            log "  $name is not set"
        fi
    done
    while IFS= read -r name; do
        log "  $name=$(masked_value "$name" "${!name}")"
    done < <(compgen -e | grep -E '^(ORTHANC|ROTATE)_' | sort)
}

# Create LOG_DIR and RUN_DIR. LOG_DIR and its files go to JOB_USER, as the
# official postgres image does with its data directory, because a host
# directory mounted as a volume is usually owned by root.
prepare_directories() {
    mkdir -p -- "$LOG_DIR"
    if [[ $JOB_USER != root ]]; then
        if [[ -n $(find "$LOG_DIR" -maxdepth 1 ! -user "$JOB_USER" -print -quit) ]]; then
            log "changing the owner of $LOG_DIR and its files to $JOB_USER"
            find "$LOG_DIR" -maxdepth 1 ! -user "$JOB_USER" -exec chown "$JOB_USER:" {} +
        fi
        setpriv --reuid="$JOB_USER" --regid="$(id -g "$JOB_USER")" --init-groups \
            test -w "$LOG_DIR" -a -x "$LOG_DIR" ||
            die "$JOB_USER cannot write to $LOG_DIR; make the volume writable for uid $(id -u "$JOB_USER")"
    fi
    mkdir -p -- "$RUN_DIR"
    chmod 0700 "$RUN_DIR"
    rm -f -- "$RUN_DIR"/job.*.pid "$RUN_DIR"/job.*.pid.tmp "$RUN_DIR/stopping"
}

# Write every exported variable to ENV_FILE as "export NAME=VALUE" lines,
# quoted by printf %q, so that values with spaces, quotes, $, # or newlines
# reach the job unchanged. Cron starts jobs with an almost empty environment.
# The file is root-owned with mode 0600: run_rotation.sh reads it as root
# before it drops to JOB_USER, so JOB_USER can neither read nor change it.
write_env_file() {
    local name tmp
    tmp=$(mktemp "$RUN_DIR/job.env.XXXXXX")
    while IFS= read -r name; do
        case $name in
            _ | PWD | OLDPWD | SHLVL | SHELLOPTS | BASHOPTS | BASH_* | EUID | PPID | UID) continue ;;
        esac
        printf 'export %s=%q\n' "$name" "${!name}"
    done < <(compgen -e) >"$tmp"
    chmod 0600 "$tmp"
    mv -f -- "$tmp" "$ENV_FILE"
}

# Run "rotate_studies.py --check" as JOB_USER and exit when it fails.
check_configuration() {
    local status=0
    log "checking the configuration: rotate_studies.py --check"
    "$JOB_SCRIPT" --env-file "$ENV_FILE" --check || status=$?
    if ((status != 0)); then
        die "rotate_studies.py --check failed with exit status $status; fix the settings or server access reported above and restart the container" "$status"
    fi
}

# Run the rotation once in the background and wait for it, so that SIGTERM
# still reaches the trap while it runs.
run_once_now() {
    local status=0 job_pid
    log "RUN_ON_START is set: running the rotation once before cron starts"
    "$JOB_SCRIPT" --env-file "$ENV_FILE" &
    job_pid=$!
    wait_for_child "$job_pid" || status=$?
    log "the run at start ended with exit status $status"
}

# Quote $1 for /bin/sh inside single quotes. validate_settings has rejected
# quotes and % already, because cron turns % into a newline.
sh_quote() {
    printf "'%s'" "$1"
}

# Fill in the cron template and install it atomically as CRON_FILE.
install_cron_file() {
    local template command tmp
    template=$(<"$CRON_TEMPLATE")
    command="$(sh_quote "$JOB_SCRIPT") --env-file $(sh_quote "$ENV_FILE")"
    template=${template//@SCHEDULE@/"$CRON_SCHEDULE"}
    template=${template//@COMMAND@/"$command"}
    mkdir -p -- "$CRON_D"
    tmp=$(mktemp "$CRON_D/.pacs-rotate.XXXXXX")
    printf '%s\n' "$template" >"$tmp"
    chmod 0644 "$tmp"
    mv -f -- "$tmp" "$CRON_FILE"
    CRON_FILE_INSTALLED=1
    log "installed $CRON_FILE: '$CRON_SCHEDULE' root $command"
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

# shellcheck disable=SC2317 # Called from the signal trap.
# Wait up to JOB_STOP_TIMEOUT seconds for the processes $@ to end, then kill
# the ones left.
wait_or_kill() {
    local deadline=$((SECONDS + JOB_STOP_TIMEOUT)) pid alive
    while true; do
        alive=()
        for pid in "$@"; do
            if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
        done
        ((${#alive[@]} > 0)) || return 0
        if ((SECONDS >= deadline)); then
            log "killing processes still running after ${JOB_STOP_TIMEOUT}s: ${alive[*]}"
            kill -KILL "${alive[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.2
    done
}

# shellcheck disable=SC2317 # Called from the signal trap.
# Send SIGTERM to cron and to every running job after signal $1, wait for
# them, and exit 0. Cron does not pass signals on to its jobs, so each
# run_rotation.sh writes its own pid and the tool's to RUN_DIR/job.<pid>.pid
# and forwards SIGTERM to the tool. SIGTERM is sent even after SIGINT
# because a job started in the background here ignores SIGINT.
stop_all() {
    local signal=$1 signalled=() waited=() file wrapper_pid tool_pid
    trap '' TERM INT
    log "received SIG$signal: stopping cron and any running job"
    if [[ -n $CRON_PID ]]; then signalled+=("$CRON_PID"); fi
    # A job that registers after this marker exists finds it and starts nothing.
    : >"$RUN_DIR/stopping"
    for file in "$RUN_DIR"/job.*.pid; do
        [[ -e $file ]] || continue
        wrapper_pid="" tool_pid=""
        { read -r wrapper_pid && read -r tool_pid; } <"$file" || true
        if [[ ${wrapper_pid:-} =~ ^[0-9]+$ ]]; then signalled+=("$wrapper_pid"); fi
        if [[ ${tool_pid:-} =~ ^[0-9]+$ ]]; then waited+=("$tool_pid"); fi
    done
    if ((${#signalled[@]} > 0)); then
        kill -TERM "${signalled[@]}" 2>/dev/null || true
        wait_or_kill "${signalled[@]}" "${waited[@]}"
    fi
    log "stopped"
    exit 0
}

# shellcheck disable=SC2317 # Called from the EXIT trap.
# Remove the cron schedule and the environment file, which contains passwords.
cleanup() {
    if ((CRON_FILE_INSTALLED)); then rm -f -- "$CRON_FILE"; fi
    rm -f -- "$ENV_FILE"
}

main() {
    local status=0
    validate_settings
    trap cleanup EXIT
    trap 'stop_all TERM' TERM
    trap 'stop_all INT' INT
    print_settings
    prepare_directories
    write_env_file
    check_configuration
    date +%s >"$RUN_DIR/started"
    if run_on_start_enabled; then
        run_once_now
    fi
    install_cron_file
    cron -f &
    CRON_PID=$!
    log "cron started (pid $CRON_PID); the next run follows CRON_SCHEDULE '$CRON_SCHEDULE'"
    wait_for_child "$CRON_PID" || status=$?
    die "cron exited unexpectedly with status $status; stopping the container" 1
}

main "$@"
