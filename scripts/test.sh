#!/usr/bin/env bash
# The README's test command: starts the local brokers and databases the
# suites need (scripts/brokers.sh; reuses any already running) and a
# container engine with broker images (scripts/containers.sh), then runs
# every test of the workspace with all features, real brokers included, and
# the brokers' conformance suites a second time against containers.
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
cleanup() {
    # Stop only what this run started (by PID), and its containers.
    if [ "$containers" = 1 ]; then
        containers_remove_all || true
        [ -z "${SY_STARTED_CONTAINER_SERVICE:-}" ] || containers_stop
    fi
    [ -z "${SY_STARTED_BROKERS:-}" ] || brokers_stop $SY_STARTED_BROKERS
}
trap cleanup EXIT

# The conformance suites against containers run beside the main run: both
# mostly wait on brokers. They run the test binaries cargo built (a second
# cargo would wait for the first's lock), without the brokers' URLs.
container_log="$(mktemp -t switchyard-containers.XXXXXX)"
container_pid=""
if [ "$containers" = 1 ]; then
    # The same build as the main run's (same features), listed as JSON:
    # package directory and test binary of each suite to run here.
    bins="$(cargo test --workspace --all-features --no-run --message-format=json-render-diagnostics "$@" |
        python3 -c 'import json, os, sys
# SQS first: it is the longest, and done before the main run reaches its
# own SQS suite (two moto servers at once on 2 cores slow both).
order = ["switchyard-sqs", "switchyard-nats", "switchyard-rabbitmq", "switchyard-kafka", "switchyard-testing"]
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
    (
        set +e
        status=0
        while read -r dir bin; do
            echo "==> containers: $dir ($(basename "$bin"))"
            (cd "$dir" && env -u SWITCHYARD_NATS_URL -u SWITCHYARD_RABBITMQ_URL -u SWITCHYARD_KAFKA_URL \
                -u SWITCHYARD_SQS_URL SWITCHYARD_CONTAINERS=1 SWITCHYARD_REQUIRE_CONTAINERS=1 \
                "$bin" --test-threads=2) || status=1
        done <<<"$bins"
        exit $status
    ) >"$container_log" 2>&1 &
    container_pid=$!
fi

main_status=0
cargo test --workspace --all-features "$@" || main_status=$?

if [ -n "$container_pid" ]; then
    container_status=0
    wait "$container_pid" || container_status=$?
    echo "==> the conformance suites against containers (log: $container_log)"
    grep -E '^(==>|test result|failures:|    [a-z_:]+$|---- |thread .* panicked)|FAILED|SKIPPED|suite: a container' "$container_log" || true
    if [ "$container_status" != 0 ]; then
        echo "==> container suites FAILED; the end of their log:"
        tail -n 200 "$container_log"
        exit 1
    fi
fi
[ "$main_status" = 0 ] || exit "$main_status"

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
