#!/usr/bin/env bash
# The README's test command: starts the local brokers and databases the
# suites need (scripts/brokers.sh; reuses any already running) and a
# container engine with broker images (scripts/containers.sh), then runs
# every test of the workspace with all features, real brokers included, and
# beside it the brokers' suites a second time against containers.
#
# Broker suites read SWITCHYARD_*_URL; with SWITCHYARD_REQUIRE_BROKERS=1 (CI)
# a missing broker fails the run instead of skipping. SWITCHYARD_CONTAINERS=0
# leaves the container runs out (they are on by default).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/brokers.sh
source scripts/brokers.sh
brokers_start
containers="${SWITCHYARD_CONTAINERS:-1}"
if [ "$containers" = 1 ]; then
    # shellcheck source=scripts/containers.sh
    source scripts/containers.sh
    containers_start
fi
lane_pid=""
cleanup() {
    # Stop only what this run started (by PID), and its containers.
    if [ -n "$lane_pid" ] && kill -0 "$lane_pid" 2>/dev/null; then
        pkill -P "$lane_pid" 2>/dev/null || true
        kill "$lane_pid" 2>/dev/null || true
    fi
    if [ "$containers" = 1 ]; then
        containers_remove_all || true
        [ -z "${SY_STARTED_CONTAINER_SERVICE:-}" ] || containers_stop
    fi
    [ -z "${SY_STARTED_BROKERS:-}" ] || brokers_stop $SY_STARTED_BROKERS
}
trap cleanup EXIT

# Build every test binary first, then run two lanes at once (the suites
# mostly wait on their brokers): the workspace's tests against the local
# brokers, and — from the same binaries, without the brokers' URLs — the
# broker suites again against containers. The container suites used to run
# after the main run (~22 min more); beside it they share the machine with
# it, which is what a consumer busy past its ack timeout looks like: the
# cases for exactly that (prefetched_deliveries_keep_their_lease) pass.
# The container lane runs one case at a time: beside the main run, two at
# a time loaded the machine enough that cases which pass alone failed there.
# The cluster cases start clusters of broker processes of their own, not
# containers: they run once, after both lanes (below).
# The SQS suites run against moto through scripts/moto_server.py, which
# makes moto's ReceiveMessage atomic as SQS's is: check that it does.
if [ -n "${SWITCHYARD_SQS_URL:-}" ]; then
    python3 scripts/check_moto.py
fi
cargo test --workspace --all-features --no-run "$@"
lane_log=""
if [ "$containers" = 1 ]; then
    bins="$(cargo test --workspace --all-features --no-run --message-format=json-render-diagnostics "$@" |
        python3 -c 'import json, os, sys
order = ["switchyard-sqs", "switchyard-testing", "switchyard-nats", "switchyard-rabbitmq", "switchyard-kafka"]
found = []
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable") or m["target"]["kind"] != ["test"]:
        continue
    name = m["package_id"].split("#")[-1].split("@")[0].split("/")[-1]
    if name in order:
        found.append((order.index(name), os.path.dirname(m["manifest_path"]), m["executable"]))
for _, where, exe in sorted(found):
    print(where, exe)')"
    lane_log="$(mktemp -t switchyard-containers.XXXXXX)"
    (
        set -e
        while read -r dir bin; do
            echo "==> against containers: $dir ($(basename "$bin"))"
            (cd "$dir" && env -u SWITCHYARD_NATS_URL -u SWITCHYARD_RABBITMQ_URL -u SWITCHYARD_KAFKA_URL \
                -u SWITCHYARD_SQS_URL SWITCHYARD_CONTAINERS=1 SWITCHYARD_REQUIRE_CONTAINERS=1 \
                "$bin" --test-threads=1 --skip cluster_)
        done <<<"$bins"
    ) >"$lane_log" 2>&1 &
    lane_pid=$!
    echo "==> the container suites run beside the main run (pid $lane_pid, output after it)"
fi

main_status=0
cargo test --workspace --all-features "$@" -- --skip cluster_ || main_status=$?

if [ -n "$lane_pid" ]; then
    lane_status=0
    wait "$lane_pid" || lane_status=$?
    echo
    echo "==> the container suites (exit $lane_status):"
    cat "$lane_log"
    rm -f "$lane_log"
    if [ "$lane_status" != 0 ]; then
        echo "the container suites failed" >&2
        exit "$lane_status"
    fi
fi
if [ "$main_status" != 0 ]; then
    echo "the main run failed" >&2
    exit "$main_status"
fi

# The cluster cases (three broker processes each, started by the cases)
# run once both lanes are done, alone: they load the machine more than any
# other case, and the lanes' timing cases should not share it with them.
echo "==> the cluster cases"
cargo test -p switchyard-nats -p switchyard-rabbitmq --all-features --test it "$@" -- cluster_

# The examples must keep running: on the memory broker, NATS, RabbitMQ, SQS and Kafka.
echo "==> examples"
cargo run -q --example quickstart >/dev/null
cargo run -q --example order_pipeline >/dev/null
if [ -n "${SWITCHYARD_NATS_URL:-}" ]; then
    cargo run -q --features nats --example quickstart -- "$SWITCHYARD_NATS_URL" >/dev/null
    cargo run -q --features nats --example order_pipeline -- "$SWITCHYARD_NATS_URL" >/dev/null
fi
if [ -n "${SWITCHYARD_RABBITMQ_URL:-}" ]; then
    cargo run -q --features rabbitmq --example quickstart -- "$SWITCHYARD_RABBITMQ_URL" >/dev/null
    cargo run -q --features rabbitmq --example order_pipeline -- "$SWITCHYARD_RABBITMQ_URL" >/dev/null
fi
if [ -n "${SWITCHYARD_SQS_URL:-}" ]; then
    # Fan-out mode: the order pipeline has two subscriptions on one topic.
    cargo run -q --features sqs --example quickstart -- "$SWITCHYARD_SQS_URL&mode=fanout" >/dev/null
    cargo run -q --features sqs --example order_pipeline -- "$SWITCHYARD_SQS_URL&mode=fanout" >/dev/null
fi
if [ -n "${SWITCHYARD_KAFKA_URL:-}" ]; then
    cargo run -q --features kafka --example quickstart -- "$SWITCHYARD_KAFKA_URL" >/dev/null
    cargo run -q --features kafka --example order_pipeline -- "$SWITCHYARD_KAFKA_URL" >/dev/null
fi
# The outbox example (PostgreSQL and Redis from scripts/brokers.sh) on every broker.
outbox_example() { cargo run -q -p switchyard-outbox --all-features --example order_service -- "$@" >/dev/null; }
outbox_example memory://orders
[ -z "${SWITCHYARD_NATS_URL:-}" ] || outbox_example "$SWITCHYARD_NATS_URL"
[ -z "${SWITCHYARD_RABBITMQ_URL:-}" ] || outbox_example "$SWITCHYARD_RABBITMQ_URL"
[ -z "${SWITCHYARD_SQS_URL:-}" ] || outbox_example "$SWITCHYARD_SQS_URL"
[ -z "${SWITCHYARD_KAFKA_URL:-}" ] || outbox_example "$SWITCHYARD_KAFKA_URL"
echo "examples ran: quickstart, order_pipeline, order_service (outbox)"
