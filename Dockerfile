# pacs-rotate: runs rotate_studies.py on a cron schedule and writes the audit
# log to the volume /app/logs. See the Docker section of README.md.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APP_DIR=/app \
    LOG_DIR=/app/logs \
    ROTATE_LOG_CSV=/app/logs/log_migracion.csv \
    JOB_USER=pacsrotate \
    CRON_SCHEDULE="0 3 * * 1"

# Debian replaces a package version in place when a point release or security
# update comes out and drops the old one from the archive, so an exact pin
# would break later builds. The base image tag pins the Debian release.
# tzdata lets TZ set the time zone of the schedule. pam_loginuid is disabled
# because a container without CAP_AUDIT_CONTROL cannot write
# /proc/self/loginuid, and cron then refuses to start the job.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cron tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && sed -i 's/^session\s\+required\s\+pam_loginuid\.so/# &/' /etc/pam.d/cron \
    && groupadd --system --gid 10001 pacsrotate \
    && useradd --system --uid 10001 --gid pacsrotate --home-dir /app \
        --no-create-home --shell /usr/sbin/nologin pacsrotate

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir --requirement requirements.txt

COPY rotate_studies.py entrypoint.sh run_rotation.sh healthcheck.sh resumen_csv.sh cronjob ./
RUN chmod 0755 entrypoint.sh run_rotation.sh healthcheck.sh resumen_csv.sh \
    && mkdir -p /app/logs \
    && chown pacsrotate:pacsrotate /app/logs

VOLUME /app/logs

# A weekly job cannot show trouble faster than this; see healthcheck.sh.
HEALTHCHECK --interval=5m --timeout=30s --start-period=2m --retries=1 \
    CMD ["/app/healthcheck.sh"]

# The entrypoint runs as root because cron needs root; the rotation itself
# runs as pacsrotate (run_rotation.sh).
ENTRYPOINT ["/app/entrypoint.sh"]
