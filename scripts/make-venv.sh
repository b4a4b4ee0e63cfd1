#!/usr/bin/env bash
# Create the project's virtualenv, installing Debian's python3-venv first if it is missing.
set -euo pipefail
python="$1"
venv="$2"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "chatd needs Python 3.11 or newer as '$python': apt-get install python3 (or make PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "chatd needs Python 3.11 or newer; '$python' is $("$python" --version 2>&1): make PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if "$python" -m venv "$venv" 2>/dev/null; then
    exit 0
fi
rm -rf "$venv"
echo "python's venv module is missing; installing Debian's python3-venv" >&2
source "$(dirname "$0")/apt-install.sh"
apt_install python3-venv
"$python" -m venv "$venv"
