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
# for old LastUpdate values, cron for the cronjob, the shell linter and
# /usr/bin/time.
DEBIAN_PACKAGES=(orthanc faketime cron shellcheck time)
VENV_DIR=.venv

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

missing_debian_packages() {
    local package
    for package in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
            echo "$package"
        fi
    done
}

install_debian_packages() {
    local missing
    mapfile -t missing < <(missing_debian_packages "${DEBIAN_PACKAGES[@]}")
    # python3 -m venv needs ensurepip, which Debian ships in python3-venv.
    if ! python3 -c "import ensurepip" 2>/dev/null; then
        missing+=(python3-venv)
    fi
    if [[ ${#missing[@]} -eq 0 ]]; then
        return
    fi
    echo "Installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
}

install_python_packages() {
    if [[ ! -x $VENV_DIR/bin/python ]]; then
        python3 -m venv "$VENV_DIR"
    fi
    "$VENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r requirements.txt -r requirements-test.txt
}

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

install_debian_packages
install_python_packages
PATH="$PWD/$VENV_DIR/bin:$PATH"
export PATH
run_linters
pytest "$@"
