#!/usr/bin/env bash
# Local Airflow: `airflow standalone` (api-server, scheduler, dag-processor, triggerer) with LocalExecutor, its
# metadata in its own PostgreSQL database `airflow` (role `airflow`, created on start), the project's dags/ and
# plugins/, Connections seeded into the metastore (seed_connections), the pools
# wildfire_streaming and wildfire_backfill created (seed_pools).
#   scripts/airflow.sh start   # idempotent; waits for the UI, prints address and admin password
#   scripts/airflow.sh stop    # SIGTERM, up to WILDFIRE_AIRFLOW_STOP_TIMEOUT (60) s for running tasks to end
#                              # (on_kill: the stream worker and the storage consumer flush), then SIGKILL
#   scripts/airflow.sh seed    # metadata database, migrations, Connections and pools only (start runs it first)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/airflow_env.sh"
AIRFLOW="$ROOT/.venv/bin/airflow"
PIDFILE="$AIRFLOW_HOME/standalone.pid"
LOG="$AIRFLOW_HOME/standalone.log"
URL="http://localhost:$AIRFLOW__API__PORT"

log() { printf '[airflow] %s\n' "$*" >&2; }

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  mkdir -p "$AIRFLOW_HOME"
  if running; then log "already running (pid $(cat "$PIDFILE")) at $URL"; return 0; fi
  seed
  # Nothing of this home runs now, so task instances still 'running' are orphans of a stopped Airflow.
  PYTHONPATH="$ROOT/plugins" "$ROOT/.venv/bin/python" -m wildfire.airflow.orphans
  log "starting airflow standalone (log: $LOG)"
  setsid nohup "$AIRFLOW" standalone >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 180); do
    if curl -fsS "$URL/api/v2/monitor/health" >/dev/null 2>&1; then
      pw_file="$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated"
      log "UI up at $URL"
      log "log in as admin with password: $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["admin"])' "$pw_file" 2>/dev/null || echo "see $pw_file")"
      log "operations page: $URL/plugin/wildfire-ops (Browse -> Wildfire operations)   stop everything: make stop"
      return 0
    fi
    running || { tail -40 "$LOG" >&2; log "airflow exited during start-up"; exit 1; }
    sleep 1
  done
  tail -40 "$LOG" >&2
  log "the UI did not answer within 180 s; stopping what started"; stop; exit 1
}

# What Airflow needs in its metadata before it runs: the database itself, its migrations, the Connections and the
# pools. `start` runs it; `seed` runs it alone (the UI tests seed their own AIRFLOW_HOME with it, so the product's
# seeding is what they test).
seed() {
  mkdir -p "$AIRFLOW_HOME"
  [ -x "$AIRFLOW" ] || { log "no .venv: run 'make venv' first"; exit 1; }
  ensure_metadata_db
  log "migrating the metadata database"
  "$AIRFLOW" db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
  seed_connections
  seed_pools
}

# Airflow's own database and role on the local PostgreSQL, idempotently (as scripts/services.sh does for
# `wildfire`); nothing to do for a SQLite URL.
ensure_metadata_db() {
  PYTHONPATH="$ROOT/plugins" "$ROOT/.venv/bin/python" -m wildfire.airflow.metadb ensure \
    || { log "cannot provision the metadata database: is PostgreSQL up (make services)?"; exit 1; }
}

# The project's Connections into the metastore, idempotently: one that exists (a user's edit in the UI) is kept.
# WILDFIRE_CONN_UPSTREAM=URL (make demo) then points firms/nws/purpleair_default at that replay (overwritten).
seed_connections() {
  local file="$AIRFLOW_HOME/connections.seed.json" py="$ROOT/.venv/bin/python" out="$AIRFLOW_HOME/connections-import.log"
  for v in $(compgen -e | grep '^AIRFLOW_CONN_' || true); do
    log "warning: $v is set in the environment and wins over the metastore Connection of that id"
  done
  # WILDFIRE_CONN_RESET=1 puts every Connection back to the seed values (e.g. the live APIs after make demo).
  local overwrite=(); [ "${WILDFIRE_CONN_RESET:-0}" = 1 ] && overwrite=(--overwrite)
  "$py" -m wildfire.airflow.connections write "$file" >"$out"
  "$AIRFLOW" connections import "${overwrite[@]}" "$file" >>"$out" 2>&1 || { rm -f "$file"; tail -20 "$out"; exit 1; }
  log "Connections: $(grep -c '^Imported connection' "$out" || true) seeded, $(grep -c 'already exists' "$out" || true) kept as edited (Admin -> Connections)"
  if [ -n "${WILDFIRE_CONN_UPSTREAM:-}" ]; then
    "$py" -m wildfire.airflow.connections write "$file" --upstream "$WILDFIRE_CONN_UPSTREAM" >>"$out"
    "$AIRFLOW" connections import --overwrite "$file" >>"$out" 2>&1 || { rm -f "$file"; tail -20 "$out"; exit 1; }
    log "Connections: firms_default, nws_default, purpleair_default point at $WILDFIRE_CONN_UPSTREAM"
  fi
  rm -f "$file"  # it holds the keys; the metastore has them now
}

# Pools of wildfire.airflow.pools, idempotently: importing an existing pool sets its slots and description again.
seed_pools() {
  local file="$AIRFLOW_HOME/pools.seed.json" out="$AIRFLOW_HOME/pools-import.log"
  PYTHONPATH="$ROOT/plugins" "$ROOT/.venv/bin/python" -m wildfire.airflow.pools write "$file" >"$out"
  "$AIRFLOW" pools import "$file" >>"$out" 2>&1 || { tail -20 "$out"; exit 1; }
  log "pools: wildfire_streaming, wildfire_backfill (Admin -> Pools)"
}

STOP_TIMEOUT="${WILDFIRE_AIRFLOW_STOP_TIMEOUT:-60}"

# Live (not zombie) processes of the standalone: its process group $1, the pids in $2 (what was there when the
# stop began) and every descendant of those. Task processes run in process groups of their own (the task
# supervisor puts them there), so the group alone would miss them.
live_pids() {
  ps -e -o pid=,ppid=,pgid=,stat= | awk -v g="$1" -v known=" $2 " '
    { pid[NR] = $1; ppid[$1] = $2; pgid[$1] = $3; st[$1] = $4 }
    END {
      for (i = 1; i <= NR; i++) { p = pid[i]; if (pgid[p] == g || index(known, " " p " ")) keep[p] = 1 }
      do { grown = 0; for (i = 1; i <= NR; i++) { p = pid[i]; if (!(p in keep) && (ppid[p] in keep)) { keep[p] = 1; grown = 1 } } } while (grown)
      for (p in keep) if (st[p] !~ /^Z/) print p
    }'
}

# Graceful: SIGTERM to the standalone's process group (api-server, scheduler, dag-processor, triggerer and the
# executor's task supervisors, which pass it on to their task: on_kill, so the stream worker and the storage
# consumer flush), wait up to STOP_TIMEOUT s for every process, task ones included, to end; SIGKILL the rest.
stop() {
  if [ ! -f "$PIDFILE" ]; then log "not running (no $PIDFILE)"; return 0; fi
  local pid pids n left waited=0
  pid="$(cat "$PIDFILE")"
  pids="$(live_pids "$pid" "$pid" | tr '\n' ' ')"
  if [ -z "${pids// /}" ]; then log "not running (stale pid file)"; rm -f "$PIDFILE"; return 0; fi
  n="$(wc -w <<<"$pids")"
  log "stopping airflow: SIGTERM to process group $pid ($n processes); running tasks get up to ${STOP_TIMEOUT} s to end"
  kill -TERM -- "-$pid" 2>/dev/null || true
  while :; do
    left="$(live_pids "$pid" "$pids" | tr '\n' ' ')"
    [ -z "${left// /}" ] && break
    pids="$left"  # only live ones: a pid that ended may be reused by an unrelated process
    if [ "$waited" -ge $((STOP_TIMEOUT * 2)) ]; then
      log "still running after ${STOP_TIMEOUT} s, killed (SIGKILL):"
      ps -o pid=,args= -p "$(echo $left | tr ' ' ',')" 2>/dev/null | cut -c1-160 | sed 's/^/[airflow]   /' >&2 || true
      kill -KILL $left 2>/dev/null || true
      kill -KILL -- "-$pid" 2>/dev/null || true
      rm -f "$PIDFILE"
      log "stopped ($(wc -w <<<"$left") of $n processes killed; task instances they ran are failed at the next start)"
      return 0
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  rm -f "$PIDFILE"
  log "stopped: all $n processes ended on SIGTERM within $(( (waited + 1) / 2 )) s"
}

case "${1:-start}" in
  start) start ;;
  seed) seed ;;
  stop) stop ;;
  status) if running; then echo "airflow: running at $URL"; else echo "airflow: stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status|seed" >&2; exit 2 ;;
esac
