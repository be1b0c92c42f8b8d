//! How consume throughput grows with consumers and payload size: 1, 2, 4
//! and 8 consumers on one subscription, 1 KiB and 64 KiB payloads,
//! switchyard next to raw rdkafka on the same broker in the same run.
//!
//! `SWITCHYARD_KAFKA_URL=kafka://127.0.0.1:19092 cargo bench -p switchyard-kafka --bench scaling`
//! (`SY_BENCH_MESSAGES`: records of 1 KiB per measurement, default 100,000;
//! a tenth of that of 64 KiB). Writes `scaling-kafka.csv` to `$SY_BENCH_OUT`
//! (default `target/bench`), which `scripts/plot_scaling.py` draws.
//! `scripts/bench.sh` starts the in-memory tansu this is meant for.
//!
//! Topics have 8 partitions (a consumer group spreads a topic's partitions
//! over its members, so 8 is what 8 consumers can share). Each measurement
//! publishes the records once, through switchyard, to a new topic, then
//! both clients read all of it:
//! - switchyard: N handles on one subscription (one consumer group); every
//!   handle has joined before any receives, so the clock (from the first
//!   delivery to the last ack) does not include the group's rebalances;
//! - raw: N `StreamConsumer`s with the partitions assigned to them
//!   statically (`assign`, no rebalance at all: rdkafka at its best), each
//!   taking each record's payload and id out as owned values and storing
//!   its offset (auto-commit), as the throughput benchmark's raw consumer.
//!
//! Each point is the mean of two measurements, each client going first once.

use std::time::Duration;

use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions},
    client::DefaultClientContext,
    consumer::{Consumer, StreamConsumer},
    message::{Headers as _, Message as _},
};
use switchyard_bench::{
    self as bench,
    scaling::{self, CONSUMERS, PREFETCH, Table, Tally},
};
use switchyard_core::{Client, SubscribeOptions, driver::support::ID_HEADER};
use switchyard_kafka::{KafkaBroker, KafkaConfig};

const BOUND: Duration = Duration::from_secs(1_200);
const PARTITIONS: i32 = 8;

fn bootstrap(url: &str) -> String {
    let rest = url.trim_start_matches("kafka://");
    rest.split('?').next().unwrap_or(rest).to_owned()
}

/// The record's payload and id, taken out as owned values.
fn take(m: &rdkafka::message::BorrowedMessage<'_>) -> usize {
    let payload = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let id = m
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == ID_HEADER))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    payload.len() + usize::from(id.is_empty())
}

/// Raw rdkafka: `consumers` consumers of `topic`, partitions assigned
/// round-robin; from the first record to the `n`-th.
async fn raw_consume(
    servers: &str,
    topic: &str,
    group: &str,
    n: usize,
    consumers: usize,
) -> Duration {
    let tally = Tally::new(n);
    let mut tasks = Vec::new();
    for c in 0..consumers {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", servers)
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in (0..PARTITIONS).filter(|p| usize::try_from(*p).unwrap() % consumers == c) {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                {
                    let m = tokio::select! {
                        m = tokio::time::timeout(Duration::from_secs(60), consumer.recv()) => {
                            m.expect("raw consume stalled").unwrap()
                        }
                        () = tally.finished() => break,
                    };
                    tally.started();
                    assert!(take(&m) > 0);
                    consumer.store_offset_from_message(&m).unwrap();
                }
                if tally.add(1) {
                    break;
                }
            }
            tokio::task::spawn_blocking(move || drop(consumer))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tally.span().expect("a record")
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let config = KafkaConfig::from_url(url)
        .unwrap()
        .with_partitions(PARTITIONS);
    let broker = KafkaBroker::connect(config).await.unwrap();
    let client = Client::new(broker.clone());
    let servers = bootstrap(url);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &servers)
        .create()
        .unwrap();
    let run_id = &switchyard_core::new_id()[24..];
    println!(
        "Kafka at {}: {PARTITIONS} partitions, consumers {CONSUMERS:?}, prefetch {PREFETCH} each",
        switchyard_core::redact_url(url)
    );
    let mut table = Table::new("Kafka", "rdkafka");
    // Each measurement has a topic (and a raw group) of its own: the
    // measurement's number and topic.
    let current = std::sync::Mutex::new((0, String::new()));
    let opts = SubscribeOptions::new("sy").with_prefetch(PREFETCH);
    // tansu's memory storage keeps every record: a topic goes once read.
    let delete = async |topic: &str| {
        if !topic.is_empty() {
            let retry = broker.retry_topic(topic, "sy");
            let _ = admin
                .delete_topics(&[topic, retry.as_str()], &AdminOptions::new())
                .await;
        }
    };
    let now = || current.lock().unwrap().clone();
    for (size, count) in scaling::sizes(n) {
        for consumers in CONSUMERS {
            let (client, servers, opts) = (&client, &servers, &opts);
            table
                .point(
                    size,
                    count,
                    consumers,
                    async || {
                        let (m, last) = now();
                        delete(&last).await;
                        let topic = format!("bench.scaling.{run_id}.{}", m + 1);
                        client.ensure_subscription(&topic, opts).await.unwrap();
                        bench::publish_windowed(client, &topic, count, size, 1024)
                            .await
                            .unwrap();
                        *current.lock().unwrap() = (m + 1, topic);
                    },
                    async || {
                        let (m, topic) = now();
                        let group = format!("raw-{run_id}-{m}");
                        raw_consume(servers, &topic, &group, count, consumers).await
                    },
                    async || {
                        bench::consume_shared(client, &now().1, opts.clone(), count, consumers, 1)
                            .await
                            .unwrap()
                    },
                )
                .await;
        }
    }
    delete(&now().1).await;
    table.write("kafka").unwrap();
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_KAFKA_URL", 100_000, BOUND, run);
}
