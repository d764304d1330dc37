#!/usr/bin/env bash
# Starts, stops and checks the local stack the tests and `make run` use:
#   Apache Kafka 4.x (KRaft, single node) on 127.0.0.1:9092, controller on 127.0.0.1:9093
#     (KAFKA_PORT, KAFKA_CONTROLLER_PORT and KAFKA_DIR override these, so fault tests can run a
#      private broker they may stop without disturbing the shared one)
#   PostgreSQL (Debian package) on 127.0.0.1:5432, database and role `wildfire`
#     (KAFKA_SASL_SSL_PORT adds a SASL_SSL listener, SCRAM-SHA-512 over TLS, on 127.0.0.1:that port: a CA and
#      the broker's keystore are generated with openssl under $KAFKA_DIR/tls unless KAFKA_SSL_KEYSTORE names a
#      PKCS12 keystore (password KAFKA_SSL_KEYSTORE_PASSWORD); KAFKA_AUTHORIZER=1 turns on ACLs (StandardAuthorizer)
#      with KAFKA_SUPER_USERS, default User:ANONYMOUS, the principal of the plaintext and controller listeners.
#      SCRAM users and ACLs are created through the AdminClient. The shared broker stays plaintext.)
#   Mosquitto (Debian package) on 127.0.0.1:1883
#   On request, a 3-node Kafka cluster (`make cluster`, action cluster-up): three KRaft processes, each broker AND
#     controller (static quorum of three voters), brokers on 127.0.0.1:19092-19094, controllers on 19192-19194,
#     data in .local/kafka-cluster/node1..3; internal topics RF 3 / min ISR 2, default.replication.factor 3,
#     min.insync.replicas 2, unclean leader election off. CLUSTER_DIR, CLUSTER_PORTS and CLUSTER_CONTROLLER_PORTS
#     (comma-separated, one per node) override this, so tests can run a private cluster on free ports. Each node
#     has a small heap (CLUSTER_HEAP_OPTS, default -Xms128m -Xmx512m; the single broker: KAFKA_HEAP_OPTS).
#     It runs beside the single broker on 9092, which it never touches.
# Every action is idempotent. All data lives under .local/ (git-ignored).
#
#   scripts/services.sh up|down|status
#   scripts/services.sh kafka-start|kafka-stop|pg-start|pg-stop|mqtt-start|mqtt-stop
#   scripts/services.sh cluster-up|cluster-down|cluster-status|cluster-node-start N|cluster-node-stop N
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
KAFKA_DIR="${KAFKA_DIR:-$LOCAL/kafka}"
KAFKA_LIBS="$LOCAL/kafka/libs"   # shared by every broker instance
PG_DIR="$LOCAL/postgres"
MQTT_DIR="$LOCAL/mosquitto"
PG_BIN="${PG_BIN:-}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
# The port clients are told to reconnect to; differs from KAFKA_PORT only behind a proxy (load tests).
KAFKA_ADVERTISED_PORT="${KAFKA_ADVERTISED_PORT:-$KAFKA_PORT}"
KAFKA_SASL_SSL_PORT="${KAFKA_SASL_SSL_PORT:-}"
KAFKA_SSL_KEYSTORE="${KAFKA_SSL_KEYSTORE:-}"
KAFKA_SSL_KEYSTORE_PASSWORD="${KAFKA_SSL_KEYSTORE_PASSWORD:-}"
KAFKA_AUTHORIZER="${KAFKA_AUTHORIZER:-}"
KAFKA_SUPER_USERS="${KAFKA_SUPER_USERS:-User:ANONYMOUS}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
# Cluster membership of this node (set by the cluster-* actions; empty: a standalone single-node quorum).
KAFKA_NODE_ID="${KAFKA_NODE_ID:-1}"
KAFKA_VOTERS="${KAFKA_VOTERS:-}"          # static quorum, e.g. 1@127.0.0.1:19192,2@127.0.0.1:19193,...
KAFKA_CLUSTER_ID="${KAFKA_CLUSTER_ID:-}"
KAFKA_REPLICATION="${KAFKA_REPLICATION:-1}"   # internal topics' and new topics' default replication factor
KAFKA_EXTRA_PROPS="${KAFKA_EXTRA_PROPS:-}"    # more server.properties lines (tests: shorter timeouts)
CLUSTER_DIR="${CLUSTER_DIR:-$LOCAL/kafka-cluster}"
CLUSTER_PORTS="${CLUSTER_PORTS:-19092,19093,19094}"
CLUSTER_CONTROLLER_PORTS="${CLUSTER_CONTROLLER_PORTS:-19192,19193,19194}"
CLUSTER_HEAP_OPTS="${CLUSTER_HEAP_OPTS:--Xms128m -Xmx512m}"
PG_PORT=5432
MQTT_PORT=1883

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, seconds, name
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    port_open "$1" && return 0
    sleep 0.2
  done
  return 1
}

apt_updated=""
ensure_pkg() {  # command-to-check, debian-package
  command -v "$1" >/dev/null 2>&1 && return 0
  [ -x "$1" ] && return 0
  if [ "$(id -u)" != 0 ]; then
    die "'$1' is missing. Install the Debian package as root: apt-get update && apt-get install -y $2"
  fi
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  log "installing $2"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

# ---------------------------------------------------------------- Kafka
kafka_libs() {
  if [ ! -f "$KAFKA_LIBS/.complete" ]; then
    command -v java >/dev/null || die "java is missing: apt-get install -y openjdk-17-jre-headless"
    command -v mvn >/dev/null || die "mvn is missing: apt-get install -y maven"
    log "fetching Apache Kafka jars from Maven Central (scripts/kafka/pom.xml)"
    rm -rf "$KAFKA_LIBS"
    mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime >&2
    touch "$KAFKA_LIBS/.complete"
  fi
}

kafka_tls() {  # a CA and the broker's PKCS12 keystore (CN/SAN 127.0.0.1, localhost) under $KAFKA_DIR/tls
  local d="$KAFKA_DIR/tls"
  if [ -f "$d/broker.p12" ] && [ -f "$d/keystore.password" ]; then
    KAFKA_SSL_KEYSTORE="$d/broker.p12"; KAFKA_SSL_KEYSTORE_PASSWORD="$(cat "$d/keystore.password")"; return 0
  fi
  ensure_pkg openssl openssl
  mkdir -p "$d" && chmod 700 "$d"
  log "generating a CA and a broker keystore in $d"
  openssl rand -hex 16 >"$d/keystore.password"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=wildfire-test-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$d/broker.key" -out "$d/broker.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$d/san.ext"
  openssl x509 -req -in "$d/broker.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
    -extfile "$d/san.ext" -out "$d/broker.crt" 2>/dev/null
  openssl pkcs12 -export -in "$d/broker.crt" -inkey "$d/broker.key" -certfile "$d/ca.crt" -name broker \
    -passout "file:$d/keystore.password" -out "$d/broker.p12"
  KAFKA_SSL_KEYSTORE="$d/broker.p12"; KAFKA_SSL_KEYSTORE_PASSWORD="$(cat "$d/keystore.password")"
}

kafka_config() {
  mkdir -p "$KAFKA_DIR/data"
  local listeners="PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT"
  local advertised="PLAINTEXT://127.0.0.1:$KAFKA_ADVERTISED_PORT"
  local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  if [ -n "$KAFKA_SASL_SSL_PORT" ]; then
    [ -n "$KAFKA_SSL_KEYSTORE" ] || kafka_tls
    listeners="$listeners,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT"
    advertised="$advertised,SASL_SSL://127.0.0.1:$KAFKA_SASL_SSL_PORT"
    protocols="$protocols,SASL_SSL:SASL_SSL"
  fi
  local quorum="controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT"
  [ -n "$KAFKA_VOTERS" ] && quorum="controller.quorum.voters=$KAFKA_VOTERS"
  local rf="$KAFKA_REPLICATION" min_isr=1
  [ "$rf" -ge 3 ] && min_isr=2
  cat >"$KAFKA_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=$KAFKA_NODE_ID
$quorum
listeners=$listeners
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$protocols
log.dirs=$KAFKA_DIR/data
num.partitions=1
# Topics come from config/stream_config.yaml; a typo'd topic must fail, not appear.
auto.create.topics.enable=false
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$min_isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$min_isr
default.replication.factor=$rf
min.insync.replicas=$min_isr
# Never elect a replica that missed acknowledged writes: a partition without an in-sync replica stays offline.
unclean.leader.election.enable=false
group.initial.rebalance.delay.ms=0
message.max.bytes=2097152
PROPS
  [ -n "$KAFKA_EXTRA_PROPS" ] && printf '%s\n' "$KAFKA_EXTRA_PROPS" | tr ';' '\n' >>"$KAFKA_DIR/server.properties"
  if [ -n "$KAFKA_SASL_SSL_PORT" ]; then
    cat >>"$KAFKA_DIR/server.properties" <<PROPS
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$KAFKA_SSL_KEYSTORE
listener.name.sasl_ssl.ssl.keystore.password=$KAFKA_SSL_KEYSTORE_PASSWORD
PROPS
    chmod 600 "$KAFKA_DIR/server.properties"  # holds the keystore password
  fi
  if [ -n "$KAFKA_AUTHORIZER" ]; then
    cat >>"$KAFKA_DIR/server.properties" <<PROPS
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=$KAFKA_SUPER_USERS
allow.everyone.if.no.acl.found=false
PROPS
  fi
  cat >"$KAFKA_DIR/log4j2.properties" <<PROPS
rootLogger.level=WARN
rootLogger.appenderRef.f.ref=F
appender.f.type=File
appender.f.name=F
appender.f.fileName=$KAFKA_DIR/kafka.log
appender.f.layout.type=PatternLayout
appender.f.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
PROPS
}

kafka_java() {
  # shellcheck disable=SC2086  # KAFKA_HEAP_OPTS holds several options
  java $KAFKA_HEAP_OPTS -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@"
}

kafka_launch() {  # format (first start) and start the JVM; does not wait
  kafka_libs
  kafka_config
  if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
    if [ -n "$KAFKA_VOTERS" ]; then  # a member of a static quorum: the cluster's id, no --standalone
      log "formatting KRaft storage of node $KAFKA_NODE_ID (cluster $KAFKA_CLUSTER_ID)"
      kafka_java kafka.tools.StorageTool format -t "$KAFKA_CLUSTER_ID" -c "$KAFKA_DIR/server.properties" >/dev/null
    else
      local cid
      cid="$(kafka_java kafka.tools.StorageTool random-uuid | tail -n1)"
      log "formatting KRaft storage (cluster $cid)"
      kafka_java kafka.tools.StorageTool format --standalone -t "$cid" \
        -c "$KAFKA_DIR/server.properties" >/dev/null
    fi
  fi
  log "starting kafka node $KAFKA_NODE_ID on 127.0.0.1:$KAFKA_PORT"
  # setsid: own process group, so stopping it never touches the caller.
  # shellcheck disable=SC2086  # KAFKA_HEAP_OPTS holds several options
  setsid nohup java $KAFKA_HEAP_OPTS -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" \
    >"$KAFKA_DIR/stdout.log" 2>&1 </dev/null &
  echo $! >"$KAFKA_DIR/kafka.pid"
}

kafka_start() {
  if port_open "$KAFKA_PORT"; then log "kafka already up on 127.0.0.1:$KAFKA_PORT"; return 0; fi
  kafka_launch
  kafka_await
}

kafka_await() {
  wait_port "$KAFKA_PORT" 90 || { tail -30 "$KAFKA_DIR/stdout.log" "$KAFKA_DIR/kafka.log" >&2 || true; die "kafka did not open 127.0.0.1:$KAFKA_PORT within 90 s (see $KAFKA_DIR/kafka.log)"; }
  kafka_ready 90 || die "kafka opened its port but did not answer metadata requests within 90 s"
  log "kafka up"
}

kafka_ready() {  # a metadata round trip, not just an open port
  local py="$ROOT/.venv/bin/python" i
  [ -x "$py" ] || return 0
  for ((i = 0; i < $1; i++)); do
    KAFKA_PORT="$KAFKA_PORT" "$py" - <<'PY' 2>/dev/null && return 0
from confluent_kafka.admin import AdminClient
import os
md = AdminClient({"bootstrap.servers": "127.0.0.1:" + os.environ["KAFKA_PORT"]}).list_topics(timeout=2)
raise SystemExit(0 if md.brokers else 1)
PY
    sleep 1
  done
  return 1
}

kafka_stop() {
  local pid
  if [ -f "$KAFKA_DIR/kafka.pid" ]; then
    pid="$(cat "$KAFKA_DIR/kafka.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping kafka (pid $pid)"
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$KAFKA_DIR/kafka.pid"
  fi
  pkill -f "kafka.Kafka $KAFKA_DIR/server.properties" 2>/dev/null || true
  for _ in $(seq 1 50); do port_open "$KAFKA_PORT" || break; sleep 0.2; done
}

# ---------------------------------------------------------------- Kafka cluster (3 nodes, static quorum)
cluster_node() {  # N: set this shell's KAFKA_* to node N of the cluster
  local n="$1" ports cports i voters=""
  IFS=, read -r -a ports <<<"$CLUSTER_PORTS"
  IFS=, read -r -a cports <<<"$CLUSTER_CONTROLLER_PORTS"
  [ "${#ports[@]}" = "${#cports[@]}" ] || die "CLUSTER_PORTS and CLUSTER_CONTROLLER_PORTS differ in length"
  { [ "$n" -ge 1 ] && [ "$n" -le "${#ports[@]}" ]; } || die "no node $n in a ${#ports[@]}-node cluster"
  for ((i = 0; i < ${#cports[@]}; i++)); do voters="$voters${voters:+,}$((i + 1))@127.0.0.1:${cports[$i]}"; done
  KAFKA_NODE_ID="$n"; KAFKA_DIR="$CLUSTER_DIR/node$n"
  KAFKA_PORT="${ports[$((n - 1))]}"; KAFKA_CONTROLLER_PORT="${cports[$((n - 1))]}"; KAFKA_ADVERTISED_PORT="$KAFKA_PORT"
  [ "$KAFKA_PORT" = 9092 ] && die "port 9092 is the shared single broker; the cluster needs its own ports"
  KAFKA_VOTERS="$voters"; KAFKA_HEAP_OPTS="$CLUSTER_HEAP_OPTS"
  KAFKA_REPLICATION=$(( ${#ports[@]} < 3 ? ${#ports[@]} : 3 ))
  KAFKA_SASL_SSL_PORT=""; KAFKA_AUTHORIZER=""
  mkdir -p "$CLUSTER_DIR"
  [ -f "$CLUSTER_DIR/cluster.id" ] || { kafka_libs; kafka_java kafka.tools.StorageTool random-uuid | tail -n1 >"$CLUSTER_DIR/cluster.id"; }
  KAFKA_CLUSTER_ID="$(cat "$CLUSTER_DIR/cluster.id")"
  mkdir -p "$KAFKA_DIR"
}

cluster_size() { local p; IFS=, read -r -a p <<<"$CLUSTER_PORTS"; echo "${#p[@]}"; }

cluster_up() {  # every node's JVM first (a node waits for the quorum), then wait for each to answer
  local n size
  size="$(cluster_size)"
  for ((n = 1; n <= size; n++)); do
    ( cluster_node "$n"; port_open "$KAFKA_PORT" && { log "node $n already up on 127.0.0.1:$KAFKA_PORT"; exit 0; }
      kafka_launch )
  done
  for ((n = 1; n <= size; n++)); do ( cluster_node "$n"; kafka_await ); done
  log "kafka cluster up: $(cluster_bootstrap)"
}

cluster_bootstrap() { local p; IFS=, read -r -a p <<<"$CLUSTER_PORTS"; local IFS=,; printf '127.0.0.1:%s' "${p[0]}"
  for x in "${p[@]:1}"; do printf ',127.0.0.1:%s' "$x"; done; echo; }

cluster_down() {
  local n size
  size="$(cluster_size)"
  for ((n = 1; n <= size; n++)); do ( cluster_node "$n"; kafka_stop ) & done
  wait
}

cluster_status() {
  local n size rc=0
  size="$(cluster_size)"
  for ((n = 1; n <= size; n++)); do
    ( cluster_node "$n"; if port_open "$KAFKA_PORT"; then echo "kafka node $n: up (127.0.0.1:$KAFKA_PORT)";
      else echo "kafka node $n: down"; exit 1; fi ) || rc=1
  done
  return $rc
}

# ---------------------------------------------------------------- PostgreSQL
find_pg_bin() {
  if [ -n "$PG_BIN" ]; then return 0; fi
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/pg_ctl" ] && PG_BIN="$d"
  done
  if [ -z "$PG_BIN" ]; then
    ensure_pkg /usr/lib/postgresql/15/bin/pg_ctl postgresql
    for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && PG_BIN="$d"; done
  fi
  [ -n "$PG_BIN" ] || die "PostgreSQL server binaries not found: apt-get install -y postgresql"
}

pg_postgis() {  # the Debian PostGIS package for this server's major version (e.g. postgresql-15-postgis-3)
  local ver
  ver="$(basename "$(dirname "$PG_BIN")")"
  [ -e "/usr/share/postgresql/$ver/extension/postgis.control" ] && return 0
  ensure_pkg "/usr/share/postgresql/$ver/extension/postgis.control" "postgresql-$ver-postgis-3"
}

as_pg() {  # postgres refuses to run as root: use the postgres account then
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/bash -c "cd / && $*"  # cd: the caller's folder may be private to root
  else
    bash -c "$*"
  fi
}

pg_dir_usable() {  # the postgres account must reach the data folder (a clone under /root would not do)
  [ "$(id -u)" != 0 ] && return 0
  mkdir -p "$PG_DIR"
  chown postgres: "$PG_DIR" 2>/dev/null || true
  su postgres -s /bin/bash -c "test -w '$PG_DIR' && test -x '$PG_DIR'" 2>/dev/null
}

pg_start() {
  find_pg_bin
  if ! pg_dir_usable; then
    local fallback="/var/lib/wildfire-postgres/$(printf '%s' "$ROOT" | md5sum | cut -c1-12)"
    log "the postgres account cannot reach $PG_DIR (a parent folder is private); using $fallback"
    PG_DIR="$fallback"
    mkdir -p "$PG_DIR" && chown postgres: "$PG_DIR"
  fi
  if ! [ -f "$PG_DIR/data/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PG_DIR/data"
    mkdir -p "$PG_DIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$PG_DIR"
    as_pg "'$PG_BIN/initdb' -D '$PG_DIR/data' -U postgres --auth=trust -E UTF8 --locale=C.UTF-8" >/dev/null
    cat >>"$PG_DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 100
shared_buffers = 256MB
fsync = on
synchronous_commit = on
CONF
  fi
  if port_open "$PG_PORT"; then
    log "postgres already up on 127.0.0.1:$PG_PORT"
  else
    log "starting postgres on 127.0.0.1:$PG_PORT"
    as_pg "'$PG_BIN/pg_ctl' -D '$PG_DIR/data' -l '$PG_DIR/postgres.log' -w -t 60 start" >/dev/null
  fi
  wait_port "$PG_PORT" 30 || die "postgres did not open 127.0.0.1:$PG_PORT (see $PG_DIR/postgres.log)"
  local psql="$PG_BIN/psql -h 127.0.0.1 -p $PG_PORT -U postgres -v ON_ERROR_STOP=1 -qtA"
  if [ "$($psql -c "select 1 from pg_roles where rolname='wildfire'")" != 1 ]; then
    $psql -c "create role wildfire login password 'wildfire' createdb"
  fi
  if [ "$($psql -c "select 1 from pg_database where datname='wildfire'")" != 1 ]; then
    $psql -c "create database wildfire owner wildfire"
  fi
  # PostGIS: the spatial columns and the detections-inside-alerts query need it. CREATE EXTENSION needs a
  # superuser, so it is created here in template1 (every database made later, test databases included,
  # has it) and in wildfire; the migrations, run as the wildfire role, then find it installed.
  pg_postgis
  local db
  for db in template1 wildfire; do
    $psql -d "$db" -c "create extension if not exists postgis" >/dev/null \
      || log "warning: could not create the postgis extension in $db (spatial queries unavailable)"
  done
  log "postgres up (database wildfire, role wildfire)"
}

pg_stop() {
  find_pg_bin
  if [ ! -f "$PG_DIR/data/postmaster.pid" ]; then
    local fallback="/var/lib/wildfire-postgres/$(printf '%s' "$ROOT" | md5sum | cut -c1-12)"
    [ -f "$fallback/data/postmaster.pid" ] && PG_DIR="$fallback"
  fi
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then
    log "stopping postgres"
    as_pg "'$PG_BIN/pg_ctl' -D '$PG_DIR/data' -m fast -w stop" >/dev/null || true
  fi
}

# ---------------------------------------------------------------- Mosquitto
mqtt_bin() {
  if command -v mosquitto >/dev/null 2>&1; then command -v mosquitto; return; fi
  [ -x /usr/sbin/mosquitto ] && { echo /usr/sbin/mosquitto; return; }
  ensure_pkg /usr/sbin/mosquitto mosquitto
  echo /usr/sbin/mosquitto
}

mqtt_start() {
  if port_open "$MQTT_PORT"; then log "mosquitto already up on 127.0.0.1:$MQTT_PORT"; return 0; fi
  local bin
  bin="$(mqtt_bin)"
  mkdir -p "$MQTT_DIR/data"
  cat >"$MQTT_DIR/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $MQTT_DIR/data/
autosave_interval 1
log_dest file $MQTT_DIR/mosquitto.log
pid_file $MQTT_DIR/mosquitto.pid
max_queued_messages 100000
CONF
  [ "$(id -u)" = 0 ] && echo "user root" >>"$MQTT_DIR/mosquitto.conf"
  log "starting mosquitto on 127.0.0.1:$MQTT_PORT"
  setsid nohup "$bin" -c "$MQTT_DIR/mosquitto.conf" >"$MQTT_DIR/stdout.log" 2>&1 </dev/null &
  wait_port "$MQTT_PORT" 20 || die "mosquitto did not open 127.0.0.1:$MQTT_PORT (see $MQTT_DIR/stdout.log)"
  log "mosquitto up"
}

mqtt_stop() {
  if [ -f "$MQTT_DIR/mosquitto.pid" ]; then
    local pid
    pid="$(cat "$MQTT_DIR/mosquitto.pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$MQTT_DIR/mosquitto.pid"
  fi
  pkill -f "mosquitto -c $MQTT_DIR/mosquitto.conf" 2>/dev/null || true
}

status() {
  local rc=0
  for s in "kafka:$KAFKA_PORT" "postgres:$PG_PORT" "mosquitto:$MQTT_PORT"; do
    if port_open "${s#*:}"; then echo "${s%%:*}: up (127.0.0.1:${s#*:})"; else echo "${s%%:*}: down"; rc=1; fi
  done
  return $rc
}

case "${1:-up}" in
  up) ensure_pkg openssl openssl; pg_start; mqtt_start; kafka_start ;;  # openssl: transport tests make their CAs
  down) kafka_stop; mqtt_stop; pg_stop ;;
  status) status ;;
  kafka-start) kafka_start ;;
  kafka-stop) kafka_stop ;;
  kafka-libs) kafka_libs ;;
  pg-start) pg_start ;;
  pg-stop) pg_stop ;;
  mqtt-start) mqtt_start ;;
  mqtt-stop) mqtt_stop ;;
  cluster-up) cluster_up ;;
  cluster-down) cluster_down ;;
  cluster-status) cluster_status ;;
  cluster-bootstrap) cluster_bootstrap ;;
  cluster-node-start) cluster_node "${2:?node number}"; kafka_start ;;
  cluster-node-stop) cluster_node "${2:?node number}"; kafka_stop ;;
  *) die "unknown action '$1' (up|down|status|kafka-start|kafka-stop|pg-start|pg-stop|mqtt-start|mqtt-stop|cluster-up|cluster-down|cluster-status|cluster-bootstrap|cluster-node-start N|cluster-node-stop N)" ;;
esac
