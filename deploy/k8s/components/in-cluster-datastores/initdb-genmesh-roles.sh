#!/bin/sh
# Run by the postgres image's entrypoint once, when it initialises an empty data directory:
# the roles of database-roles.psql, with the server's owner (POSTGRES_USER) as the migrator
# and genmesh_app, the services' role, with POSTGRES_APP_PASSWORD. An existing volume keeps
# what it has: delete the PVC (data-postgres-0) to start over.
set -eu
psql -X --no-password --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v database="$POSTGRES_DB" -v migrator="$POSTGRES_USER" -v app=genmesh_app \
  -v app_password="$POSTGRES_APP_PASSWORD" \
  -f /docker-entrypoint-initdb.d/database-roles.psql
