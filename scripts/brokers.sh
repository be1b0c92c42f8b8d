#!/usr/bin/env bash
# Local brokers for switchyard's tests and benchmarks.
#
#   bash scripts/brokers.sh start [BROKER...]   # install when missing, start when not running
#   bash scripts/brokers.sh stop [BROKER...]    # stop only brokers this script started (by PID)
#   bash scripts/brokers.sh status
#   source scripts/brokers.sh; brokers_start    # same, and exports SWITCHYARD_*_URL
#
# A broker whose port already answers is reused, never started twice.
# Everything binds to 127.0.0.1; every wait is bounded.
# Brokers: nats (JetStream, 127.0.0.1:${SWITCHYARD_NATS_PORT:-4222}),
#          rabbitmq (127.0.0.1:${SWITCHYARD_RABBITMQ_PORT:-5672}, guest/guest),
#          sqs (moto in server mode, SQS and SNS, 127.0.0.1:${SWITCHYARD_SQS_PORT:-4566}),
#          kafka (tansu, an Apache-Kafka-compatible broker, sqlite storage,
#                 127.0.0.1:${SWITCHYARD_KAFKA_PORT:-9092}; installed with cargo when missing),
#          postgres (PostgreSQL, 127.0.0.1:${SWITCHYARD_POSTGRES_PORT:-5432}, database `test`,
#                    trust auth on loopback; for switchyard-outbox),
#          redis (127.0.0.1:${SWITCHYARD_REDIS_PORT:-6379}; for switchyard-outbox's dedup store).

SY_BROKER_DIR="${SWITCHYARD_BROKER_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/switchyard/brokers}"
SY_SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SY_ALL_BROKERS="nats rabbitmq sqs kafka postgres redis"

_sy_log() { echo "[brokers] $*" >&2; }

_sy_port_open() { # host port
    timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

_sy_wait_port() { # name host port seconds
    local deadline=$((SECONDS + $4))
    until _sy_port_open "$2" "$3"; do
        if ((SECONDS >= deadline)); then
            _sy_log "$1 did not open $2:$3 within $4 s"
            return 1
        fi
        sleep 0.2
    done
}

_sy_apt_install() { # package...
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    _sy_log "installing $* (Debian packages)"
    if ! $sudo apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; then
        $sudo apt-get update -qq >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$@" >/dev/null
    fi
}

_sy_started() { # name pid
    mkdir -p "$SY_BROKER_DIR"
    echo "$2" >"$SY_BROKER_DIR/$1.pid"
    SY_STARTED_BROKERS="${SY_STARTED_BROKERS:-} $1"
}

_sy_start_nats() {
    local port="${SWITCHYARD_NATS_PORT:-4222}"
    export SWITCHYARD_NATS_URL="${SWITCHYARD_NATS_URL:-nats://127.0.0.1:$port}"
    if _sy_port_open 127.0.0.1 "$port"; then
        _sy_log "nats: reusing the server on 127.0.0.1:$port"
        return 0
    fi
    local bin
    bin="$(command -v nats-server || true)"
    [ -n "$bin" ] || [ ! -x /usr/sbin/nats-server ] || bin=/usr/sbin/nats-server
    if [ -z "$bin" ]; then
        _sy_apt_install nats-server
        bin="$(command -v nats-server || echo /usr/sbin/nats-server)"
    fi
    mkdir -p "$SY_BROKER_DIR/nats-$port"
    _sy_log "nats: starting $bin with JetStream on 127.0.0.1:$port"
    setsid "$bin" -a 127.0.0.1 -p "$port" -js -sd "$SY_BROKER_DIR/nats-$port" \
        -l "$SY_BROKER_DIR/nats-$port.log" </dev/null >/dev/null 2>&1 &
    _sy_started nats $!
    _sy_wait_port nats 127.0.0.1 "$port" 20
}

_sy_amqp_answers() { # host port: the broker answers an AMQP protocol header
    [ "$(timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" && printf "AMQP\x00\x00\x09\x01" >&3 && head -c 1 <&3' "$1" "$2" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 01 ]
}

_sy_start_rabbitmq() {
    local port="${SWITCHYARD_RABBITMQ_PORT:-5672}"
    export SWITCHYARD_RABBITMQ_URL="${SWITCHYARD_RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:$port/%2f}"
    if _sy_port_open 127.0.0.1 "$port"; then
        if _sy_amqp_answers 127.0.0.1 "$port"; then
            _sy_log "rabbitmq: reusing the broker on 127.0.0.1:$port"
            return 0
        fi
        _sy_log "rabbitmq: 127.0.0.1:$port accepts connections but does not answer AMQP within 5 s"
        return 1
    fi
    # The package's own start script, not the wrapper on the PATH (which
    # switches user and uses the system's config and data directories).
    local bin
    bin="$(ls /usr/lib/rabbitmq/bin/rabbitmq-server 2>/dev/null || true)"
    if [ -z "$bin" ]; then
        _sy_apt_install rabbitmq-server
        bin=/usr/lib/rabbitmq/bin/rabbitmq-server
    fi
    local dir="$SY_BROKER_DIR/rabbitmq-$port"
    mkdir -p "$dir/mnesia" "$dir/log"
    printf 'listeners.tcp.default = 127.0.0.1:%s\n' "$port" >"$dir/rabbitmq.conf"
    echo "[]." >"$dir/enabled_plugins"
    local epmd_before
    epmd_before="$(pgrep -x epmd || true)"
    _sy_log "rabbitmq: starting $bin on 127.0.0.1:$port (data in $dir)"
    (
        export RABBITMQ_NODENAME="sy-rabbit-$port@localhost"
        export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$port"
        export RABBITMQ_DIST_PORT=$((port + 20000)) ERL_EPMD_ADDRESS=127.0.0.1
        export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        export RABBITMQ_CTL_ERL_ARGS="$RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"
        export RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log"
        export RABBITMQ_PID_FILE="$dir/rabbitmq.pid" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
        export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
        setsid "$bin" -detached </dev/null >"$dir/start.log" 2>&1
    ) || { _sy_log "rabbitmq: start failed (see $dir/start.log)"; return 1; }
    # The AMQP port opens only at the end of boot.
    if ! _sy_wait_port rabbitmq 127.0.0.1 "$port" 90; then
        tail -n 20 "$dir/log/"*.log >&2 2>/dev/null || true
        return 1
    fi
    _sy_started rabbitmq "$(cat "$dir/rabbitmq.pid")"
    _sy_amqp_answers 127.0.0.1 "$port" || { _sy_log "rabbitmq: port open but no AMQP answer"; return 1; }
    # epmd is started by the first Erlang node; stop it too only if we did.
    local epmd_after
    epmd_after="$(pgrep -x epmd || true)"
    if [ -z "$epmd_before" ] && [ -n "$epmd_after" ]; then
        _sy_started epmd "$epmd_after"
    fi
}

_sy_sqs_answers() { # port: an SQS ListQueues call answers (moto routes
    # unsigned requests to S3, so the probe carries a SigV4-shaped header)
    timeout 5 python3 - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
req = urllib.request.Request(
    "http://127.0.0.1:%s/" % sys.argv[1],
    data=b"Action=ListQueues&Version=2012-11-05",
    headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "Authorization": "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=0",
    },
)
body = urllib.request.urlopen(req, timeout=4).read()
sys.exit(0 if b"ListQueuesResponse" in body or b"ListQueuesResult" in body else 1)
PY
}

_sy_start_sqs() {
    local port="${SWITCHYARD_SQS_PORT:-4566}"
    export SWITCHYARD_SQS_URL="${SWITCHYARD_SQS_URL:-sqs://?region=us-east-1&endpoint=http://127.0.0.1:$port}"
    # moto accepts any credentials; the backend reads the standard AWS chain.
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
    if _sy_port_open 127.0.0.1 "$port"; then
        if _sy_sqs_answers "$port"; then
            _sy_log "sqs: reusing the endpoint on 127.0.0.1:$port"
            return 0
        fi
        _sy_log "sqs: 127.0.0.1:$port is taken but does not answer SQS"
        return 1
    fi
    if ! python3 -c 'import moto.server' 2>/dev/null; then
        _sy_log "installing moto[server] (PyPI)"
        python3 -m pip install -q 'moto[server]' >/dev/null || return 1
    fi
    mkdir -p "$SY_BROKER_DIR"
    # moto_server.py is moto's server with two fixes for its linear-time
    # clock reads and retention check (see the file); same behaviour.
    _sy_log "sqs: starting moto on 127.0.0.1:$port"
    setsid python3 "$SY_SCRIPT_DIR/moto_server.py" -H 127.0.0.1 -p "$port" \
        </dev/null >"$SY_BROKER_DIR/moto-$port.log" 2>&1 &
    _sy_started sqs $!
    _sy_wait_port sqs 127.0.0.1 "$port" 30 || return 1
    local deadline=$((SECONDS + 20))
    until _sy_sqs_answers "$port"; do
        ((SECONDS < deadline)) || { _sy_log "sqs: moto does not answer"; return 1; }
        sleep 0.2
    done
}

_sy_tansu_ready() { # port
    timeout 10 tansu topic list --broker "tcp://127.0.0.1:$1" >/dev/null 2>&1
}

_sy_start_kafka() {
    local port="${SWITCHYARD_KAFKA_PORT:-9092}"
    # SWITCHYARD_TOOLS_DIR (CI: beside its warm target directory) keeps the
    # tansu binary across fresh machines that share that directory.
    [ -z "${SWITCHYARD_TOOLS_DIR:-}" ] || export PATH="$SWITCHYARD_TOOLS_DIR/bin:$PATH"
    export SWITCHYARD_KAFKA_URL="${SWITCHYARD_KAFKA_URL:-kafka://127.0.0.1:$port}"
    if _sy_port_open 127.0.0.1 "$port"; then
        _sy_log "kafka: reusing the broker on 127.0.0.1:$port"
        # Which implementation answers: the tests check its documented
        # deviations (see backends/kafka/tests/it/specific.rs).
        if command -v ss >/dev/null && ss -ltnp 2>/dev/null | grep ":$port " | grep -q '"tansu"'; then
            export SWITCHYARD_KAFKA_BROKER=tansu
        fi
        return 0
    fi
    # The libsql build is the one with durable storage (see BROKERS.md);
    # its help does not say so, its binary does. Another build is replaced.
    local root=()
    [ -z "${SWITCHYARD_TOOLS_DIR:-}" ] || root=(--root "$SWITCHYARD_TOOLS_DIR")
    if ! command -v tansu >/dev/null || ! grep -q libsql "$(command -v tansu)"; then
        _sy_log "kafka: installing tansu 0.6.0 with libsql storage (cargo install, ~9 min once)"
        cargo install -q tansu@0.6.0 --locked --features libsql "${root[@]}" || return 1
    fi
    local dir="$SY_BROKER_DIR/kafka-$port"
    mkdir -p "$dir"
    _sy_log "kafka: starting tansu on 127.0.0.1:$port (data in $dir)"
    (
        cd "$dir" &&
            exec setsid tansu broker --listener-url "tcp://127.0.0.1:$port" \
                --advertised-listener-url "tcp://127.0.0.1:$port" \
                --storage-engine sqlite://tansu.db </dev/null >"$dir/tansu.log" 2>&1
    ) &
    _sy_started kafka $!
    export SWITCHYARD_KAFKA_BROKER=tansu
    _sy_wait_port kafka 127.0.0.1 "$port" 30 || return 1
    local deadline=$((SECONDS + 30))
    until _sy_tansu_ready "$port"; do
        ((SECONDS < deadline)) || { _sy_log "kafka: tansu does not answer (see $dir/tansu.log)"; return 1; }
        sleep 0.2
    done
}

_sy_pg_answers() { # port: the server accepts a query on database test
    timeout 5 psql -h 127.0.0.1 -p "$1" -U postgres -d test -Atqc 'select 1' >/dev/null 2>&1
}

_sy_start_postgres() {
    local port="${SWITCHYARD_POSTGRES_PORT:-5432}"
    export SWITCHYARD_POSTGRES_URL="${SWITCHYARD_POSTGRES_URL:-postgres://postgres@127.0.0.1:$port/test}"
    if _sy_port_open 127.0.0.1 "$port"; then
        if _sy_pg_answers "$port"; then
            _sy_log "postgres: reusing the server on 127.0.0.1:$port"
            return 0
        fi
        # A server without the test database: create it (trust auth on loopback).
        if timeout 5 psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qc 'create database test' >/dev/null 2>&1 &&
            _sy_pg_answers "$port"; then
            _sy_log "postgres: created database test on 127.0.0.1:$port"
            return 0
        fi
        _sy_log "postgres: 127.0.0.1:$port is open but database test does not answer as user postgres"
        return 1
    fi
    # Debian's server binaries, run by the postgres user on a cluster of our own.
    local bindir
    bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$bindir" ] || [ ! -x "$bindir/postgres" ]; then
        _sy_apt_install postgresql
        bindir="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
    fi
    local dir="$SY_BROKER_DIR/postgres-$port" run=()
    [ "$(id -u)" != 0 ] || run=(runuser -u postgres --)
    mkdir -p "$dir"
    [ "$(id -u)" != 0 ] || chown postgres "$dir"
    if [ ! -s "$dir/data/PG_VERSION" ]; then
        _sy_log "postgres: initdb in $dir/data"
        "${run[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1 ||
            { _sy_log "postgres: initdb failed (see $dir/initdb.log)"; return 1; }
    fi
    _sy_log "postgres: starting $bindir/postgres on 127.0.0.1:$port (data in $dir/data)"
    "${run[@]}" setsid "$bindir/postgres" -D "$dir/data" -h 127.0.0.1 -p "$port" -k "$dir" \
        </dev/null >"$dir/postgres.log" 2>&1 &
    _sy_started postgres $!
    _sy_wait_port postgres 127.0.0.1 "$port" 30 || return 1
    local deadline=$((SECONDS + 20))
    until timeout 5 psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { _sy_log "postgres: does not answer (see $dir/postgres.log)"; return 1; }
        sleep 0.2
    done
    _sy_pg_answers "$port" || psql -h 127.0.0.1 -p "$port" -U postgres -d postgres -qc 'create database test' >/dev/null
}

_sy_start_redis() {
    local port="${SWITCHYARD_REDIS_PORT:-6379}"
    export SWITCHYARD_REDIS_URL="${SWITCHYARD_REDIS_URL:-redis://127.0.0.1:$port}"
    if _sy_port_open 127.0.0.1 "$port"; then
        if [ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
            _sy_log "redis: reusing the server on 127.0.0.1:$port"
            return 0
        fi
        _sy_log "redis: 127.0.0.1:$port is open but does not answer PING"
        return 1
    fi
    command -v redis-server >/dev/null || _sy_apt_install redis-server
    mkdir -p "$SY_BROKER_DIR"
    _sy_log "redis: starting redis-server on 127.0.0.1:$port (nothing kept on disk)"
    setsid redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        </dev/null >"$SY_BROKER_DIR/redis-$port.log" 2>&1 &
    _sy_started redis $!
    _sy_wait_port redis 127.0.0.1 "$port" 20
}

brokers_start() { # [broker...]
    local b
    for b in ${*:-$SY_ALL_BROKERS}; do
        case "$b" in
        nats) _sy_start_nats || return 1 ;;
        rabbitmq) _sy_start_rabbitmq || return 1 ;;
        sqs) _sy_start_sqs || return 1 ;;
        kafka) _sy_start_kafka || return 1 ;;
        postgres) _sy_start_postgres || return 1 ;;
        redis) _sy_start_redis || return 1 ;;
        *) _sy_log "unknown broker $b (known: $SY_ALL_BROKERS)"; return 1 ;;
        esac
    done
}

brokers_stop() { # [broker...]: those (default: every broker this script started)
    local f pid names="${*:-}"
    for f in "$SY_BROKER_DIR"/*.pid; do
        [ -e "$f" ] || continue
        if [ -n "$names" ] && [[ " $names " != *" $(basename "$f" .pid) "* ]]; then
            continue
        fi
        pid="$(cat "$f")"
        if kill -0 "$pid" 2>/dev/null; then
            _sy_log "stopping $(basename "$f" .pid) (pid $pid)"
            kill "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}

brokers_status() {
    local port="${SWITCHYARD_NATS_PORT:-4222}"
    if _sy_port_open 127.0.0.1 "$port"; then echo "nats: up (127.0.0.1:$port)"; else echo "nats: down"; fi
    port="${SWITCHYARD_RABBITMQ_PORT:-5672}"
    if _sy_port_open 127.0.0.1 "$port"; then echo "rabbitmq: up (127.0.0.1:$port)"; else echo "rabbitmq: down"; fi
    port="${SWITCHYARD_SQS_PORT:-4566}"
    if _sy_port_open 127.0.0.1 "$port"; then echo "sqs: up (127.0.0.1:$port)"; else echo "sqs: down"; fi
    port="${SWITCHYARD_KAFKA_PORT:-9092}"
    if _sy_port_open 127.0.0.1 "$port"; then echo "kafka: up (127.0.0.1:$port)"; else echo "kafka: down"; fi
    port="${SWITCHYARD_POSTGRES_PORT:-5432}"
    if _sy_port_open 127.0.0.1 "$port"; then echo "postgres: up (127.0.0.1:$port)"; else echo "postgres: down"; fi
    port="${SWITCHYARD_REDIS_PORT:-6379}"
    if _sy_port_open 127.0.0.1 "$port"; then echo "redis: up (127.0.0.1:$port)"; else echo "redis: down"; fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    cmd="${1:-start}"
    shift || true
    case "$cmd" in
    start) brokers_start "$@"; env | grep '^SWITCHYARD_.*_URL=' || true ;;
    stop) brokers_stop "$@" ;;
    status) brokers_status ;;
    *) echo "usage: $0 start|stop|status [broker...]" >&2; exit 2 ;;
    esac
fi
