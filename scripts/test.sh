#!/usr/bin/env bash
# The README's test command: starts the local brokers and databases the
# suites need (scripts/brokers.sh; reuses any already running), then runs every test of
# the workspace with all features, real brokers included.
#
# Broker suites read SWITCHYARD_*_URL; with SWITCHYARD_REQUIRE_BROKERS=1 (CI)
# a missing broker fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/brokers.sh
source scripts/brokers.sh
brokers_start
# Stop, on exit, only the brokers this run started (by PID).
if [ -n "${SY_STARTED_BROKERS:-}" ]; then
    # shellcheck disable=SC2064 # the list is fixed now, on purpose
    trap "brokers_stop $SY_STARTED_BROKERS" EXIT
fi

cargo test --workspace --all-features "$@"

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
