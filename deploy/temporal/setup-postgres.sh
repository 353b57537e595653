#!/bin/sh
# Creates (or upgrades) Temporal's two PostgreSQL databases. Runs in the temporalio/admin-tools image on
# every `docker compose up`; temporal-sql-tool's create and setup-schema are no-ops when already done.
set -eu

: "${POSTGRES_SEEDS:?POSTGRES_SEEDS must name the PostgreSQL host}"
: "${POSTGRES_USER:?POSTGRES_USER must be set}"
: "${SQL_PASSWORD:?SQL_PASSWORD must be set}"
DB_PORT=${DB_PORT:-5432}
SCHEMA_DIR=/etc/temporal/schema/postgresql/v12

sql_tool() {
  temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -p "$DB_PORT" -u "$POSTGRES_USER" "$@"
}

for db in temporal temporal_visibility; do
  case "$db" in
    temporal) schema="$SCHEMA_DIR/temporal/versioned" ;;
    *) schema="$SCHEMA_DIR/visibility/versioned" ;;
  esac
  echo "setting up database $db"
  sql_tool --db "$db" create
  sql_tool --db "$db" setup-schema -v 0.0
  sql_tool --db "$db" update-schema -d "$schema"
done
echo "PostgreSQL schema is up to date"
