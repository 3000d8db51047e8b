#!/usr/bin/env bash
# PostgreSQL set-up for pgbridge, run as a superuser. Idempotent: run it again after changing
# the table list or the password.
#
# Creates or updates:
#   - the least-privilege login role the bridge connects as (REPLICATION, CONNECT on the
#     database, USAGE on the schemas, SELECT on their tables now and in future, nothing else),
#   - the publication the bridge streams (FOR ALL TABLES, or only BRIDGE_TABLES),
# and checks that wal_level is logical.
#
# Connection (psql's own variables win, then the bridge's): PGHOST/PG_HOST, PGPORT/PG_PORT,
# PGUSER/PG_USER (a superuser), PGPASSWORD/PG_PASSWORD, PGDATABASE/PG_DB.
# Settings:
#   BRIDGE_PG_USER       role to create              (default bridge_reader)
#   BRIDGE_PG_PASSWORD   its password                (required)
#   BRIDGE_PUBLICATION   publication name            (default cdc_pub)
#   BRIDGE_TABLES        comma list of tables, e.g. "users,orders,sales.invoices";
#                        empty: FOR ALL TABLES       (default empty)
#   BRIDGE_SCHEMAS       schemas to grant SELECT on  (default public)
#   BRIDGE_OUTBOX_TABLES comma list of outbox tables, added to the publication when it lists
#                        tables (FOR ALL TABLES has them already)  (default empty)
#
# Also usable as /docker-entrypoint-initdb.d/init.sh in the official postgres image.
set -euo pipefail

export PGHOST="${PGHOST:-${PG_HOST:-}}"
export PGPORT="${PGPORT:-${PG_PORT:-5432}}"
export PGUSER="${PGUSER:-${PG_USER:-${POSTGRES_USER:-postgres}}}"
export PGDATABASE="${PGDATABASE:-${PG_DB:-${POSTGRES_DB:-postgres}}}"
if [ -z "${PGPASSWORD:-}" ] && [ -n "${PG_PASSWORD:-}" ]; then export PGPASSWORD="$PG_PASSWORD"; fi
[ -n "$PGHOST" ] || unset PGHOST # empty: the local socket

bridge_user="${BRIDGE_PG_USER:-bridge_reader}"
bridge_password="${BRIDGE_PG_PASSWORD:-}"
publication="${BRIDGE_PUBLICATION:-cdc_pub}"
tables="${BRIDGE_TABLES:-}"
schemas="${BRIDGE_SCHEMAS:-public}"
outbox_tables="${BRIDGE_OUTBOX_TABLES:-}"
# The outbox tables must be published too; the bridge publishes them as events, not changes.
if [ -n "$tables" ] && [ -n "$outbox_tables" ]; then tables="$tables,$outbox_tables"; fi

if [ -z "$bridge_password" ]; then
    echo "init.sh: set BRIDGE_PG_PASSWORD to the password of the '$bridge_user' role" >&2
    exit 2
fi

psql -X -q -v ON_ERROR_STOP=1 \
    -v bridge_user="$bridge_user" -v bridge_password="$bridge_password" \
    -v publication="$publication" -v tables="$tables" -v schemas="$schemas" <<'SQL'
SELECT current_setting('wal_level') <> 'logical' AS wal_level_wrong \gset
\if :wal_level_wrong
\echo 'init.sh: wal_level is not logical. Run: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL.'
\endif

-- The bridge's role: replication plus read access, no ownership, no writes.
SELECT format('CREATE ROLE %I LOGIN REPLICATION PASSWORD %L', :'bridge_user', :'bridge_password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'bridge_user') \gexec
SELECT format('ALTER ROLE %I LOGIN REPLICATION PASSWORD %L', :'bridge_user', :'bridge_password') \gexec
SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'bridge_user') \gexec
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', trim(s), :'bridge_user'),
       format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', trim(s), :'bridge_user'),
       format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT ON TABLES TO %I', trim(s), :'bridge_user')
  FROM unnest(string_to_array(:'schemas', ',')) AS s \gexec

-- The publication: every table, or the listed ones (each checked to exist via regclass).
SELECT format('CREATE PUBLICATION %I FOR ALL TABLES', :'publication')
 WHERE :'tables' = '' AND NOT EXISTS (SELECT FROM pg_publication WHERE pubname = :'publication') \gexec
SELECT format('CREATE PUBLICATION %I FOR TABLE %s', :'publication',
              (SELECT string_agg(trim(t)::regclass::text, ', ') FROM unnest(string_to_array(:'tables', ',')) AS t))
 WHERE :'tables' <> '' AND NOT EXISTS (SELECT FROM pg_publication WHERE pubname = :'publication') \gexec
SELECT format('ALTER PUBLICATION %I ADD TABLE %s', :'publication', trim(t)::regclass::text)
  FROM unnest(string_to_array(:'tables', ',')) AS t
 WHERE :'tables' <> ''
   AND NOT EXISTS (SELECT FROM pg_publication_tables pt
                    WHERE pt.pubname = :'publication'
                      AND format('%I.%I', pt.schemaname, pt.tablename)::regclass = trim(t)::regclass) \gexec

-- UPDATE and DELETE fail on published tables without a replica identity: say which.
\pset tuples_only on
\pset format unaligned
SELECT format('init.sh: warning: %I.%I has no primary key or replica identity; UPDATE/DELETE on it will fail. '
              'Add a primary key or run ALTER TABLE %I.%I REPLICA IDENTITY FULL.',
              pt.schemaname, pt.tablename, pt.schemaname, pt.tablename) AS warning
  FROM pg_publication_tables pt
  JOIN pg_class c ON c.oid = format('%I.%I', pt.schemaname, pt.tablename)::regclass
 WHERE pt.pubname = :'publication'
   AND (c.relreplident = 'n'
        OR (c.relreplident = 'd' AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)));
SQL
echo "init.sh: role '$bridge_user' and publication '$publication' are ready in database '$PGDATABASE'"
