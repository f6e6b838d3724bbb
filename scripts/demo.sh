#!/usr/bin/env bash
# Install what the demo needs, then rotate real DICOM studies between two
# throwaway Orthanc servers on 127.0.0.1 (see scripts/demo.py).
set -Eeuo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/install.sh
source "$repo/scripts/install.sh"

install_debian_packages orthanc
install_python_venv "$repo/.venv" "$repo/requirements.txt" "$repo/requirements-test.txt"
exec "$repo/.venv/bin/python" "$repo/scripts/demo.py" "$@"
