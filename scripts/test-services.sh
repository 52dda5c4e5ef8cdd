#!/usr/bin/env bash
# Starts and stops the throwaway PostgreSQL and Redis servers that keywarden's
# integration tests talk to. CI (.ci/run) uses it, and so can a developer:
#
#   scripts/test-services.sh start          # private PostgreSQL on 55432 + Redis on 56379
#   eval "$(scripts/test-services.sh env)"  # export KEYWARDEN_TEST_* for cargo test
#   scripts/test-services.sh start-cluster  # 3-master Redis Cluster on 27001-27003
#   scripts/test-services.sh status
#   scripts/test-services.sh stop           # stops everything started above
#
# Everything lives under $KEYWARDEN_SERVICES_DIR (default /tmp/keywarden-services):
# the PostgreSQL data directory, sockets, pid files and logs. The servers listen on
# 127.0.0.1 only, on ports chosen not to clash with a system PostgreSQL or Redis.
# The database is for tests only: trust authentication, fsync off, and a fresh
# cluster every time `start` finds it not running.
#
# It needs the Debian packages postgresql and redis-server (.ci/run installs them).
# As root, PostgreSQL is run as the `postgres` OS user because it refuses to run as
# root; as any other user it runs as that user.
set -euo pipefail

SERVICES_DIR=${KEYWARDEN_SERVICES_DIR:-/tmp/keywarden-services}
PG_PORT=${KEYWARDEN_PG_PORT:-55432}
REDIS_PORT=${KEYWARDEN_REDIS_PORT:-56379}
# The cluster starts while the tests run, when many client sockets are open, so
# its ports (and its bus ports, 27101-27103) sit below Linux's ephemeral port
# range (32768-60999): a port in that range can be held at that instant as the
# local end of some test's outgoing connection, and the node then fails to bind
# (seen once in CI, on 57002).
CLUSTER_PORTS=(27001 27002 27003)
CLUSTER_BUS_OFFSET=100

PG_DIR="$SERVICES_DIR/pg"
PG_DATA="$PG_DIR/data"
PG_SOCK="$PG_DIR/sock"
PG_LOG="$PG_DIR/postgres.log"
REDIS_DIR="$SERVICES_DIR/redis"
CLUSTER_DIR="$SERVICES_DIR/redis-cluster"

log() { printf 'test-services: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# The directory holding initdb/pg_ctl/postgres. Debian puts them outside PATH,
# under /usr/lib/postgresql/<major>/bin; take the newest major installed.
pg_bindir() {
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -n 1)
    if [[ -n $dir && -x $dir/pg_ctl ]]; then
        printf '%s\n' "$dir"
    elif command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v pg_ctl)"
    else
        die "no PostgreSQL server binaries found (apt-get install postgresql)"
    fi
}

# Runs a command as the OS user that owns the PostgreSQL cluster.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pg_running() {
    [[ -f $PG_DATA/PG_VERSION ]] && as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

pg_ready() {
    "$(pg_bindir)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres
}

port_in_use() {
    # bash's /dev/tcp needs no extra tools; a refused connection means the port is free.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start_postgres() {
    local bin
    bin=$(pg_bindir)
    if pg_running; then
        log "PostgreSQL already running on 127.0.0.1:$PG_PORT ($PG_DATA)"
        return 0
    fi
    if pg_ready; then
        log "a PostgreSQL not started by this script already answers on 127.0.0.1:$PG_PORT; using it"
        return 0
    fi
    port_in_use "$PG_PORT" && die "port $PG_PORT is taken by something that is not PostgreSQL"

    # A fresh cluster every start: the tests leave databases behind, and a data
    # directory left by a crashed run or an older PostgreSQL must not matter.
    log "initialising PostgreSQL cluster in $PG_DATA ($bin)"
    rm -rf "$PG_DIR"
    mkdir -p "$PG_DATA" "$PG_SOCK"
    chmod 0755 "$SERVICES_DIR"
    chmod 0700 "$PG_DATA"
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no 'postgres' OS user (apt-get install postgresql)"
        chown -R postgres: "$PG_DIR"
    fi
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C --no-sync \
        >"$PG_DIR/initdb.log" 2>&1 || {
        cat "$PG_DIR/initdb.log" >&2
        die "initdb failed"
    }
    cat >>"$PG_DATA/postgresql.conf" <<EOF

# Added by scripts/test-services.sh: a throwaway cluster for tests.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
EOF
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT (log: $PG_LOG)"
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null || {
        tail -n 50 "$PG_LOG" >&2 || true
        die "PostgreSQL did not start"
    }
    local i
    for ((i = 0; i < 60; i++)); do
        if pg_ready; then
            log "PostgreSQL is ready"
            return 0
        fi
        sleep 1
    done
    tail -n 50 "$PG_LOG" >&2 || true
    die "PostgreSQL did not become ready within 60s"
}

stop_postgres() {
    if pg_running; then
        log "stopping PostgreSQL ($PG_DATA)"
        as_pg "$(pg_bindir)/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
    else
        log "PostgreSQL (ours) not running"
    fi
}

redis_ping() {
    [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]
}

wait_redis() {
    local port=$1 logfile=$2 i
    for ((i = 0; i < 100; i++)); do
        redis_ping "$port" && return 0
        sleep 0.1
    done
    tail -n 30 "$logfile" >&2 || true
    die "Redis on port $port did not answer PING within 10s"
}

start_redis() {
    command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
    if redis_ping "$REDIS_PORT"; then
        log "Redis already running on 127.0.0.1:$REDIS_PORT"
        return 0
    fi
    port_in_use "$REDIS_PORT" && die "port $REDIS_PORT is taken by something that is not Redis"
    mkdir -p "$REDIS_DIR"
    log "starting Redis on 127.0.0.1:$REDIS_PORT (log: $REDIS_DIR/redis.log)"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --dir "$REDIS_DIR" \
        --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log"
    wait_redis "$REDIS_PORT" "$REDIS_DIR/redis.log"
    log "Redis is ready"
}

stop_redis_port() {
    local port=$1
    if redis_ping "$port"; then
        log "stopping Redis on 127.0.0.1:$port"
        redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
        local i
        for ((i = 0; i < 100; i++)); do
            port_in_use "$port" || return 0
            sleep 0.1
        done
        log "warning: Redis on port $port still answers after shutdown"
    fi
}

cluster_ok() {
    local port
    for port in "${CLUSTER_PORTS[@]}"; do
        redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null |
            grep -q '^cluster_state:ok' || return 1
    done
}

start_cluster() {
    command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
    if cluster_ok; then
        log "Redis Cluster already running on ports ${CLUSTER_PORTS[*]}"
        return 0
    fi
    # Anything half-made (a node up without a formed cluster) is thrown away so
    # that `--cluster create` starts from empty nodes.
    local port
    for port in "${CLUSTER_PORTS[@]}"; do
        stop_redis_port "$port"
        port_in_use "$port" && die "port $port is taken by something that is not Redis"
        port_in_use "$((port + CLUSTER_BUS_OFFSET))" &&
            die "cluster bus port $((port + CLUSTER_BUS_OFFSET)) is taken"
    done
    rm -rf "$CLUSTER_DIR"
    local nodes=()
    for port in "${CLUSTER_PORTS[@]}"; do
        local dir="$CLUSTER_DIR/$port"
        mkdir -p "$dir"
        log "starting cluster node on 127.0.0.1:$port (log: $dir/redis.log)"
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
            --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
            --cluster-port "$((port + CLUSTER_BUS_OFFSET))" --cluster-node-timeout 5000 \
            --daemonize yes --dir "$dir" \
            --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
        nodes+=("127.0.0.1:$port")
    done
    for port in "${CLUSTER_PORTS[@]}"; do
        wait_redis "$port" "$CLUSTER_DIR/$port/redis.log"
    done
    log "creating cluster of ${nodes[*]}"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
        >"$CLUSTER_DIR/create.log" 2>&1 || {
        cat "$CLUSTER_DIR/create.log" >&2
        die "redis-cli --cluster create failed"
    }
    local i
    for ((i = 0; i < 300; i++)); do
        if cluster_ok; then
            log "Redis Cluster is ready (cluster_state:ok on all nodes)"
            return 0
        fi
        sleep 0.1
    done
    cat "$CLUSTER_DIR/create.log" >&2
    die "Redis Cluster did not reach cluster_state:ok within 30s"
}

stop_cluster() {
    local port
    for port in "${CLUSTER_PORTS[@]}"; do
        stop_redis_port "$port"
    done
}

print_env() {
    printf 'export KEYWARDEN_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:%s/postgres\n' "$PG_PORT"
    printf 'export KEYWARDEN_TEST_REDIS_URL=redis://127.0.0.1:%s/\n' "$REDIS_PORT"
}

status() {
    local rc=0
    if pg_ready; then echo "postgres: up on 127.0.0.1:$PG_PORT"; else
        echo "postgres: down"
        rc=1
    fi
    if redis_ping "$REDIS_PORT"; then echo "redis: up on 127.0.0.1:$REDIS_PORT"; else
        echo "redis: down"
        rc=1
    fi
    if cluster_ok; then echo "redis-cluster: up on ${CLUSTER_PORTS[*]}"; else echo "redis-cluster: down"; fi
    return "$rc"
}

usage() {
    echo "usage: $0 start|stop|env|status|start-cluster|stop-cluster" >&2
    exit 2
}

[[ $# -eq 1 ]] || usage
case $1 in
start)
    mkdir -p "$SERVICES_DIR"
    start_postgres
    start_redis
    ;;
stop)
    stop_cluster
    stop_redis_port "$REDIS_PORT"
    stop_postgres
    ;;
env) print_env ;;
status) status ;;
start-cluster)
    mkdir -p "$SERVICES_DIR"
    start_cluster
    ;;
stop-cluster) stop_cluster ;;
*) usage ;;
esac
