#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the queue tests and print its SQLAlchemy URL.
# It listens on a Unix socket only and lives in a temporary folder (the URL's host) that holds
# its data/ and log; .ci/pg_ctl stops and starts it again. CI's machine is discarded after.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
bin="/usr/lib/postgresql/$(ls /usr/lib/postgresql | sort -n | tail -n 1)/bin"
dir=$(mktemp -d)
chown postgres "$dir"
# PostgreSQL refuses to run as root.
su postgres -s /bin/sh -c "'$bin/initdb' -D '$dir/data' -A trust -U postgres" >/dev/null
# In the config rather than on pg_ctl's command line, so a plain `pg_ctl start` brings it back.
cat >>"$dir/data/postgresql.conf" <<CONF
port = 55432
listen_addresses = ''
unix_socket_directories = '$dir'
CONF
su postgres -s /bin/sh -c "'$bin/pg_ctl' -D '$dir/data' -l '$dir/log' -w start" >/dev/null
echo "postgresql+psycopg://postgres@/postgres?host=$dir&port=55432"
