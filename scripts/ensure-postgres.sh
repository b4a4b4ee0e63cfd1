#!/usr/bin/env bash
# Make sure PostgreSQL's server binaries (initdb, pg_ctl) are there for chatd's embedded
# database; install Debian's `postgresql` package when they are not and we can.
set -euo pipefail

have_server_binaries() {
    if [ -n "${CHATD_PG_BIN:-}" ]; then
        [ -x "$CHATD_PG_BIN/initdb" ] && [ -x "$CHATD_PG_BIN/pg_ctl" ]
        return
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && return 0
    done
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1
}

if have_server_binaries; then
    exit 0
fi
if [ -n "${CHATD_PG_BIN:-}" ]; then
    echo "CHATD_PG_BIN=$CHATD_PG_BIN holds no initdb and pg_ctl: point it at PostgreSQL's bin directory" >&2
    exit 1
fi
echo "PostgreSQL server binaries not found; installing Debian's postgresql package" >&2
source "$(dirname "$0")/apt-install.sh"
apt_install postgresql
