//! switchyard-kafka vs raw rdkafka, same broker, same run: confirmed publish
//! (delivery reports, `acks=all`, idempotence) and consume+commit of
//! 256-byte messages.
//!
//! `SWITCHYARD_KAFKA_URL=kafka://127.0.0.1:9092 cargo bench -p switchyard-kafka`
//! (`SY_BENCH_MESSAGES`, default 50,000; `SY_BENCH_ROUNDS`, default 3).
//!
//! The raw producers are configured as switchyard configures its own and
//! send each record with an id header (a UUIDv7, as switchyard does). The
//! compared one is rdkafka's fastest confirmed publish: a `ThreadedProducer`
//! whose delivery callback counts reports (done when all are confirmed). A
//! `FutureProducer` that enqueues everything, then awaits every delivery
//! future (what switchyard does) is printed too. The raw consumer
//! is a fresh group that takes each record's payload and id out (owned, as
//! any consumer must), stores its offset and lets librdkafka auto-commit
//! (librdkafka's at-least-once pattern);
//! switchyard receives and acks each delivery through its public API.
//! Topics have one partition each, so both sides read one ordered log.
//! Consume time starts at the first record on both sides (joining a group
//! is not consuming).

use std::time::{Duration, Instant};

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use rdkafka::{
    ClientConfig, ClientContext,
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
    message::{Header, OwnedHeaders},
    producer::{
        BaseRecord, DeliveryResult, FutureProducer, FutureRecord, ProducerContext, ThreadedProducer,
    },
    types::RDKafkaErrorCode,
};
use switchyard_bench::{self as bench, Rounds, SIZE, env_usize};
use switchyard_core::{Client, SubscribeOptions, driver::support::ID_HEADER};
use switchyard_kafka::{KafkaBroker, KafkaConfig};

/// The longest the whole benchmark may take.
const BOUND: Duration = Duration::from_secs(1200);

fn bootstrap(url: &str) -> String {
    let rest = url.trim_start_matches("kafka://");
    rest.split('?').next().unwrap_or(rest).to_owned()
}

async fn raw_publish(producer: &FutureProducer, topic: &str, n: usize) -> Duration {
    let payload = vec![0xab_u8; SIZE];
    let start = Instant::now();
    let mut reports = Vec::with_capacity(n);
    for _ in 0..n {
        let id = switchyard_core::new_id();
        let headers = OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some(id.as_bytes()),
        });
        let mut record: FutureRecord<'_, (), [u8]> = FutureRecord::to(topic)
            .payload(&payload[..])
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    reports.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => panic!("raw send: {e}"),
            }
        }
    }
    for f in reports {
        f.await.unwrap().unwrap();
    }
    start.elapsed()
}

/// Delivery reports counted in librdkafka's callback: rdkafka's fastest
/// confirmed publish (no future per record).
#[derive(Default)]
struct Reports {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

struct Counting(Arc<Reports>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, (): ()) {
        match result {
            Ok(_) => self.0.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The same records through a `ThreadedProducer` whose delivery callback
/// counts reports; done when all `n` are confirmed.
async fn raw_publish_threaded(
    producer: &ThreadedProducer<Counting>,
    reports: &Reports,
    topic: &str,
    n: usize,
) -> Duration {
    let payload = vec![0xab_u8; SIZE];
    let base = reports.ok.load(Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..n {
        let id = switchyard_core::new_id();
        let headers = OwnedHeaders::new().insert(Header {
            key: ID_HEADER,
            value: Some(id.as_bytes()),
        });
        let mut record: BaseRecord<'_, (), [u8]> =
            BaseRecord::to(topic).payload(&payload[..]).headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => panic!("raw send: {e}"),
            }
        }
    }
    while reports.ok.load(Ordering::Relaxed) - base < n {
        assert_eq!(
            reports.failed.load(Ordering::Relaxed),
            0,
            "raw delivery failed"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    start.elapsed()
}

/// What any consumer does with a record: takes the payload and the id out
/// (as owned values, so they outlive the borrowed record).
fn take(m: &rdkafka::message::BorrowedMessage<'_>) -> usize {
    use rdkafka::message::{Headers as _, Message as _};
    let payload = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let id = m
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == ID_HEADER))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    payload.len() + usize::from(id.is_empty())
}

async fn raw_consume(servers: &str, topic: &str, group: &str, n: usize) -> Duration {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    // The clock starts at the first record: joining the group is not
    // consuming (switchyard's `subscribe` returns once it joined).
    let first = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("raw consumer never got a record")
        .unwrap();
    let start = Instant::now();
    let mut bytes = take(&first);
    consumer.store_offset_from_message(&first).unwrap();
    drop(first);
    for _ in 1..n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("raw consume stalled")
            .unwrap();
        bytes += take(&m);
        consumer.store_offset_from_message(&m).unwrap();
    }
    assert!(bytes >= n * SIZE);
    let elapsed = start.elapsed();
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .unwrap();
    elapsed
}

fn main() {
    bench::main_with("SWITCHYARD_KAFKA_URL", 50_000, BOUND, run);
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let rounds = env_usize("SY_BENCH_ROUNDS", 3);
    let config = KafkaConfig::from_url(url).unwrap().with_partitions(1);
    let broker = KafkaBroker::connect(config).await.unwrap();
    let client = Client::new(broker.clone());
    let servers = bootstrap(url);
    let mut producer_config = ClientConfig::new();
    producer_config
        .set("bootstrap.servers", &servers)
        .set("acks", "all")
        .set("enable.idempotence", "true");
    let raw: FutureProducer = producer_config.create().unwrap();
    let reports = Arc::new(Reports::default());
    let threaded: ThreadedProducer<Counting> = producer_config
        .create_with_context(Counting(Arc::clone(&reports)))
        .unwrap();
    let run_id = &switchyard_core::new_id()[24..];
    println!("{n} messages of {SIZE} bytes per round, {rounds} rounds, {url}");
    let mut all = Rounds::default();
    for round in 1..=rounds {
        let raw_topic = format!("bench.raw.{run_id}.{round}");
        client.ensure_topic(&raw_topic).await.unwrap();
        let topic = format!("bench.switchyard.{run_id}.{round}");
        let opts = SubscribeOptions::new("bench").with_prefetch(1024);
        client.ensure_subscription(&topic, &opts).await.unwrap();

        let raw_pub = raw_publish_threaded(&threaded, &reports, &raw_topic, n).await;
        let future_pub = raw_publish(&raw, &raw_topic, n).await;
        println!(
            "round {round}: raw FutureProducer (a future per record, all enqueued first) {:.0} msg/s",
            bench::rate(n, future_pub)
        );
        let sy_pub = bench::publish(&client, &topic, n).await;
        let raw_con = raw_consume(&servers, &raw_topic, &format!("raw-{run_id}-{round}"), n).await;
        // The clock starts at the first delivery, as for the raw consumer (a
        // group join is not consuming; tansu's memory build delays joins).
        let sy_con = bench::consume(&client, &topic, opts, n).await;
        all.push(round, n, [raw_pub, sy_pub, raw_con, sy_con]);
    }
    all.print_mean("rdkafka");
    let topic = format!("bench.latency.{run_id}");
    let opts = SubscribeOptions::new("bench");
    client.ensure_subscription(&topic, &opts).await.unwrap();
    let latency = bench::latency(&client, &topic, opts, 5_000, SIZE, 1_000.0)
        .await
        .unwrap();
    all.print_rows(
        "Kafka (tansu)",
        "rdkafka ThreadedProducer, delivery callbacks",
        "rdkafka StreamConsumer, stored offsets",
    );
    bench::latency_row("Kafka (tansu)", &latency);
    client.close().await.unwrap();
}
