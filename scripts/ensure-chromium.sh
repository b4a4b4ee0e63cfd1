#!/usr/bin/env bash
# Make sure Debian's Chromium is there for the browser test of chatd's web page
# (tests/e2e/test_page.py drives /usr/bin/chromium with Playwright; no browser is downloaded).
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
echo "Chromium not found at /usr/bin/chromium; installing Debian's chromium package" >&2
source "$(dirname "$0")/apt-install.sh"
apt_install chromium
