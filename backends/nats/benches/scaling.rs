//! How consume throughput grows with consumers and payload size: 1, 2, 4
//! and 8 consumers on one subscription, 1 KiB and 64 KiB payloads,
//! switchyard next to raw async-nats on the same server in the same run.
//!
//! `SWITCHYARD_NATS_URL=nats://127.0.0.1:4222 cargo bench -p switchyard-nats --bench scaling`
//! (`SY_BENCH_MESSAGES`: messages of 1 KiB per measurement, default 100,000;
//! a tenth of that of 64 KiB). Writes `scaling-nats.csv` to `$SY_BENCH_OUT`
//! (default `target/bench`), which `scripts/plot_scaling.py` draws.
//!
//! Each measurement publishes the messages once, through switchyard, to a
//! topic with two subscriptions (two durable pull consumers on the topic's
//! stream): one is consumed by switchyard handles, the other by raw
//! async-nats pull streams on that durable consumer, each asking for
//! batches of the prefetch and at most 4 MiB (switchyard's default byte
//! bound: without one, 8 consumers of 64 KiB messages on one connection
//! outgrow the server's `max_pending` and are dropped as slow consumers),
//! taking each message's id header out as an
//! owned value and acking it (as the throughput benchmark's raw consumer).
//! The clock runs from the first delivery to the last ack. Each point is
//! the mean of two measurements, each client going first once.

use std::time::Duration;

use futures_util::StreamExt;
use switchyard_bench::{
    self as bench,
    scaling::{self, CONSUMERS, PREFETCH, Table, Tally},
};
use switchyard_core::{Client, SubscribeOptions, driver::support::ID_HEADER};
use switchyard_nats::{
    NatsBroker, NatsConfig,
    async_nats::jetstream::{self, consumer::PullConsumer},
};

const BOUND: Duration = Duration::from_secs(1_200);
/// The bytes a pull request may ask for: switchyard's default
/// (`NatsConfig::with_pull_bytes`), so that 8 consumers of 64 KiB messages
/// on one connection stay within the server's `max_pending`.
const PULL_BYTES: usize = 4 << 20;

/// Raw async-nats: `consumers` pull streams on the durable `consumer`;
/// from the first delivery to the `n`-th ack.
async fn raw_consume(consumer: &PullConsumer, n: usize, consumers: usize) -> Duration {
    let tally = Tally::new(n);
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(PREFETCH)
            .max_bytes_per_batch(PULL_BYTES)
            .messages()
            .await
            .unwrap();
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    m = tokio::time::timeout(Duration::from_secs(60), messages.next()) => {
                        m.expect("raw consume stalled").unwrap().unwrap()
                    }
                    () = tally.finished() => break,
                };
                tally.started();
                let id: Option<String> = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(ID_HEADER))
                    .map(|v| v.as_str().to_owned());
                assert!(id.is_some(), "a message without its id header");
                m.ack().await.unwrap();
                if tally.add(1) {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally.span().expect("a delivery")
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let broker = NatsBroker::connect(
        NatsConfig::from_url(url)
            .unwrap()
            .with_publish_window(PREFETCH),
    )
    .await
    .unwrap();
    let js: jetstream::Context = broker.jetstream().clone();
    let client = Client::new(broker.clone());
    let run_id = &switchyard_core::new_id()[24..];
    println!(
        "NATS JetStream at {}: consumers {CONSUMERS:?}, prefetch {PREFETCH} each",
        switchyard_core::redact_url(url)
    );
    let mut table = Table::new("NATS", "async-nats");
    for (size, count) in scaling::sizes(n) {
        for consumers in CONSUMERS {
            let topic = format!("bench.scaling.{run_id}.{size}.{consumers}");
            let sy_opts = SubscribeOptions::new("sy").with_prefetch(PREFETCH);
            let raw_opts = SubscribeOptions::new("raw").with_prefetch(PREFETCH);
            client.ensure_subscription(&topic, &sy_opts).await.unwrap();
            client.ensure_subscription(&topic, &raw_opts).await.unwrap();
            let raw: PullConsumer = js
                .get_stream(broker.stream_name(&topic))
                .await
                .unwrap()
                .get_consumer(&broker.consumer_name("raw"))
                .await
                .unwrap();
            let (client, topic, raw) = (&client, &topic, &raw);
            table
                .point(
                    size,
                    count,
                    consumers,
                    async || {
                        bench::publish_windowed(client, topic, count, size, PREFETCH)
                            .await
                            .unwrap();
                    },
                    async || raw_consume(raw, count, consumers).await,
                    async || {
                        bench::consume_shared(client, topic, sy_opts.clone(), count, consumers, 1)
                            .await
                            .unwrap()
                    },
                )
                .await;
            let _ = js.delete_stream(broker.stream_name(topic)).await;
            for opts in [&sy_opts, &raw_opts] {
                let dlq = opts.dead_letter_topic_for(topic);
                let _ = js.delete_stream(broker.stream_name(&dlq)).await;
            }
        }
    }
    table.write("nats").unwrap();
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_NATS_URL", 100_000, BOUND, run);
}
