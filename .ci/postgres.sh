#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the queue contract tests and print its SQLAlchemy URL.
# It listens on a Unix socket only and lives in a temporary folder; CI's machine is discarded after.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
bin="/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -n | tail -n 1)/bin"
dir=$(mktemp -d)
chown postgres "$dir"
# PostgreSQL refuses to run as root.
su postgres -s /bin/sh -c "'$bin/initdb' -D '$dir/data' -A trust -U postgres" >/dev/null
su postgres -s /bin/sh -c "'$bin/pg_ctl' -D '$dir/data' -l '$dir/log' -w -o \"-k '$dir' -p 55432 -c listen_addresses=''\" start" >/dev/null
echo "postgresql+psycopg://postgres@/postgres?host=$dir&port=55432"
