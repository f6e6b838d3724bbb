#!/usr/bin/env bash
# Install what the benchmark needs, then run bench/bench.py with the given
# arguments, e.g. `scripts/bench.sh --output docs/benchmarks.md`.
set -Eeuo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/install.sh
source "$repo/scripts/install.sh"

install_debian_packages orthanc time
install_python_venv "$repo/.venv" "$repo/requirements.txt" "$repo/requirements-test.txt"
exec "$repo/.venv/bin/python" "$repo/bench/bench.py" "$@"
