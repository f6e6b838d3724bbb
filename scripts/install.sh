#!/usr/bin/env bash
# Functions that install what the demo and the tests need. Sourced, not run.

# Run a command as root: directly when already root, else through sudo.
as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "error: '$*' needs root; run as root or install sudo" >&2
    return 1
  fi
}

# Install the Debian packages given as arguments, unless all are installed.
install_debian_packages() {
  local missing=() package
  for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed'; then
      missing+=("$package")
    fi
  done
  # python3 -m venv needs ensurepip, which Debian ships in python3-venv.
  if ! python3 -c "import ensurepip" 2>/dev/null; then
    missing+=(python3-venv)
  fi
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "Installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Create the virtual environment $1 when missing, then install the
# requirement files given as the other arguments into it.
install_python_venv() {
  local venv=$1 requirements=() file
  shift
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
  fi
  for file in "$@"; do
    requirements+=(-r "$file")
  done
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}"
}
