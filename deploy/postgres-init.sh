#!/bin/sh
# Run once by the postgres image on an empty data directory (deploy/compose.yaml): the
# databases openfga and scopegate, each owned by a login role of the same name, with the
# passwords of deploy/.env. scripts/cluster creates the same two on its local server.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v openfga_pw="$OPENFGA_DB_PASSWORD" -v scopegate_pw="$SCOPEGATE_DB_PASSWORD" <<'SQL'
CREATE ROLE openfga LOGIN PASSWORD :'openfga_pw';
CREATE DATABASE openfga OWNER openfga;
CREATE ROLE scopegate LOGIN PASSWORD :'scopegate_pw';
CREATE DATABASE scopegate OWNER scopegate;
SQL
