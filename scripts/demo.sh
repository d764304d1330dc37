#!/usr/bin/env bash
# `make demo`: the offline wildfire scenario, run by the project's Airflow DAGs.
#   scripts/demo.sh run     # start the upstream replay + sensor fleet, (re)start Airflow pointed at it, drive
#   scripts/demo.sh stop    # stop the replay + fleet (Airflow is stopped by `make stop`)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO="$ROOT/.local/demo"
PORT="${DEMO_UPSTREAM_PORT:-8765}"
UP="http://127.0.0.1:$PORT"
mkdir -p "$DEMO"

# The source Connections (firms/nws/purpleair_default) are pointed at the local replay in the metastore by
# scripts/airflow.sh start (WILDFIRE_CONN_UPSTREAM); polling is faster than production so minutes show a day.
export WILDFIRE_CONN_UPSTREAM="$UP"
export WILDFIRE__SOURCES__NASA_FIRMS__INGESTION__POLLING_INTERVAL_SECONDS=15
export WILDFIRE__SOURCES__NWS_ALERTS__INGESTION__POLLING_INTERVAL_SECONDS=5
export WILDFIRE__SOURCES__NWS_OBSERVATIONS__INGESTION__POLLING_INTERVAL_SECONDS=30
export WILDFIRE__SOURCES__PURPLEAIR__INGESTION__POLLING_INTERVAL_SECONDS=30
export WILDFIRE__STORAGE__BATCH_SIZE=2000
source "$ROOT/scripts/airflow_env.sh"

stop_serve() {
  if [ -f "$DEMO/serve.pid" ]; then
    kill -TERM "$(cat "$DEMO/serve.pid")" 2>/dev/null || true
    rm -f "$DEMO/serve.pid"
  fi
}

case "${1:-run}" in
  stop) stop_serve; exit 0 ;;
  run) ;;
  *) echo "usage: $0 run|stop" >&2; exit 2 ;;
esac

stop_serve
echo "[demo] starting the upstream replay and the sensor fleet on $UP"
setsid nohup "$ROOT/.venv/bin/python" -m wildfire.demo.serve --port "$PORT" >"$DEMO/serve.log" 2>&1 </dev/null &
echo $! >"$DEMO/serve.pid"
for _ in $(seq 1 50); do curl -fsS "$UP/_demo/stats" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "$UP/_demo/stats" >/dev/null || { cat "$DEMO/serve.log"; echo "[demo] the replay did not start"; exit 1; }

echo "[demo] (re)starting Airflow with its Connections pointed at the replay"
bash "$ROOT/scripts/airflow.sh" stop >/dev/null 2>&1 || true
bash "$ROOT/scripts/airflow.sh" start
exec "$ROOT/.venv/bin/python" -m wildfire.demo.run --minutes "${DEMO_MINUTES:-4}" --upstream "$UP"
