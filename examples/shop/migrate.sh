#!/bin/sh
# Runs migrations/$CUTOVER_VERSION-$1.sql (expand or contract) against the shop's database, when
# the release has one. cutover runs it at the right moment; see ../../README.md, "Database schema
# changes in phases".
set -eu
file="migrations/$CUTOVER_VERSION-$1.sql"
if [ ! -f "$file" ]; then
  echo "$file: nothing to run"
  exit 0
fi
psql "${SHOP_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}" -v ON_ERROR_STOP=1 -q -f "$file"
echo "$file: ran"
