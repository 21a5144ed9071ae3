#!/usr/bin/env bash
# The production topology on one machine, over loopback (docs/deploy.md): PostgreSQL (the database
# of both servers), an S3-compatible object store (moto; MLflow's artifacts, the DVC remote, a batch
# source), the Prefect server and the MLflow tracking server.
#
#   bash scripts/topology.sh up DIR     start everything, state and logs in DIR; writes DIR/env
#   bash scripts/topology.sh down DIR   stop everything `up` started (safe to run twice)
#   set -a; . DIR/env; set +a           point the clients (nas, prefect, mlflow, dvc) at it
#
# Needs PostgreSQL's server binaries (Debian: apt-get install postgresql) and this project's venv
# (.venv, or PYTHON_BIN's folder). Ports are free ones picked at start; UI=1 keeps Prefect's UI on.
set -euo pipefail
cmd=${1:?usage: topology.sh up|down DIR}
dir=$(mkdir -p "${2:?usage: topology.sh up|down DIR}" && cd "$2" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${PYTHON_BIN:-$here/.venv/bin}

pg_bin() {  # the folder of PostgreSQL's server binaries (Debian keeps them out of PATH)
  local p; p=$(command -v pg_ctl 2>/dev/null || true)
  [ -n "$p" ] && { dirname "$(readlink -f "$p")"; return; }
  p=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$p" ] || { echo "no PostgreSQL server binaries: apt-get install postgresql" >&2; exit 2; }
  echo "$p"
}
as_pg() {  # PostgreSQL refuses to run as root: run it as the postgres user there
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
free_port() { "$bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for NAME URL LOG
  for _ in $(seq 240); do
    curl -sf -o /dev/null "$2" && return 0
    sleep 0.5
  done
  echo "$1 did not answer at $2 within 120 s; its log ($3):" >&2; tail -20 "$3" >&2; exit 1
}

down() {
  [ -f "$dir/pids" ] && while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$dir/pids"
  if [ -f "$dir/pgdata" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$(cat "$dir/pgdata")/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$(cat "$dir/pgdata")"
  fi
  rm -f "$dir/pids" "$dir/pgdata"
}

up() {
  [ -f "$dir/pids" ] && { echo "$dir already runs a topology: topology.sh down $dir first" >&2; exit 2; }
  export PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
  export AWS_ACCESS_KEY_ID=nas-loopback AWS_SECRET_ACCESS_KEY=nas-loopback AWS_DEFAULT_REGION=us-east-1
  local pg s3 pf ml pgdir; pg=$(free_port); s3=$(free_port); pf=$(free_port); ml=$(free_port)
  # PostgreSQL's folder is its own: the postgres user must reach it (a pytest tmp dir is 0700 root).
  pgdir=$(mktemp -d /tmp/nas-pg.XXXXXX); echo "$pgdir" > "$dir/pgdata"
  [ "$(id -u)" = 0 ] && chown postgres "$pgdir"
  as_pg "$(pg_bin)/initdb" -D "$pgdir/data" -A trust -U nas -E UTF8 --no-sync > "$dir/postgres-init.log"
  as_pg "$(pg_bin)/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w \
    -o "-p $pg -k $pgdir -c listen_addresses=127.0.0.1" start > /dev/null
  for db in prefect mlflow; do psql -q -h 127.0.0.1 -p "$pg" -U nas -d postgres -c "create database $db"; done

  "$bin/moto_server" -H 127.0.0.1 -p "$s3" > "$dir/s3.log" 2>&1 & echo $! >> "$dir/pids"
  wait_for "the S3 store" "http://127.0.0.1:$s3/" "$dir/s3.log"
  "$bin/python" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$s3').create_bucket(Bucket='nas')"

  PREFECT_HOME="$dir/prefect-server" PREFECT_UI_ENABLED=${UI:-0} \
  PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://nas@127.0.0.1:$pg/prefect" \
    "$bin/prefect" server start --host 127.0.0.1 --port "$pf" > "$dir/prefect-server.log" 2>&1 &
  echo $! >> "$dir/pids"
  MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$s3" \
    "$bin/mlflow" server --backend-store-uri "postgresql://nas@127.0.0.1:$pg/mlflow" \
    --artifacts-destination s3://nas/mlflow-artifacts --host 127.0.0.1 --port "$ml" --workers 1 \
    > "$dir/mlflow-server.log" 2>&1 & echo $! >> "$dir/pids"
  wait_for "the Prefect server" "http://127.0.0.1:$pf/api/health" "$dir/prefect-server.log"
  wait_for "the MLflow server" "http://127.0.0.1:$ml/health" "$dir/mlflow-server.log"
  cat > "$dir/env" <<EOF
PREFECT_API_URL=http://127.0.0.1:$pf/api
MLFLOW_TRACKING_URI=http://127.0.0.1:$ml
NAS_S3_ENDPOINT=http://127.0.0.1:$s3
AWS_ENDPOINT_URL=http://127.0.0.1:$s3
AWS_ACCESS_KEY_ID=nas-loopback
AWS_SECRET_ACCESS_KEY=nas-loopback
AWS_DEFAULT_REGION=us-east-1
NAS_POSTGRES=postgresql://nas@127.0.0.1:$pg
EOF
  echo "topology up in $dir: Prefect http://127.0.0.1:$pf, MLflow http://127.0.0.1:$ml, S3 http://127.0.0.1:$s3," \
       "PostgreSQL 127.0.0.1:$pg (databases prefect, mlflow)"
}

case "$cmd" in
  up) trap 'down' ERR; up ;;
  down) down ;;
  *) echo "usage: topology.sh up|down DIR" >&2; exit 2 ;;
esac
