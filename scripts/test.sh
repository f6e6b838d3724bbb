#!/usr/bin/env bash
# Run every check of the project: install what is missing, lint, then pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/test_rotation.py -x`.
set -Eeuo pipefail

report_failure() {
    local status=$?
    echo "test.sh: line $1: \"$BASH_COMMAND\" failed with exit status $status" >&2
}
trap 'report_failure $LINENO' ERR

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Tools that tests, linters and benchmarks run: Orthanc servers, faketime
# for old LastUpdate values, cron for the cronjob, the shell linter,
# /usr/bin/time, and openssl for the certificate of the HTTPS tests.
DEBIAN_PACKAGES=(orthanc faketime cron shellcheck time openssl)
VENV_DIR=.venv

# shellcheck source=scripts/install.sh
source scripts/install.sh

shell_scripts() {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files '*.sh'
    else
        find . -name '*.sh' -not -path "./$VENV_DIR/*"
    fi
    # .ci/run is a bash script without the .sh suffix.
    echo .ci/run
}

run_linters() {
    ruff check .
    ruff format --check .
    local scripts
    mapfile -t scripts < <(shell_scripts)
    shellcheck "${scripts[@]}"
    if [[ -f Dockerfile ]]; then
        hadolint Dockerfile
    fi
}

install_debian_packages "${DEBIAN_PACKAGES[@]}"
install_python_venv "$VENV_DIR" requirements.txt requirements-test.txt
PATH="$PWD/$VENV_DIR/bin:$PATH"
export PATH
run_linters
pytest "$@"
