//! switchyard-nats vs raw async-nats, same server, same run, same window:
//! confirmed publish (PubAcks in flight) and consume+ack of 256-byte messages.
//!
//! `SWITCHYARD_NATS_URL=nats://127.0.0.1:4222 cargo bench -p switchyard-nats`
//! (`SY_BENCH_MESSAGES`, default 100,000; `SY_BENCH_WINDOW`, default 256).
//! Streams use file storage and interest retention in both cases, and are
//! deleted afterwards. The raw publisher sends each message with an id
//! header (a UUIDv7, as switchyard does) and the raw consumer takes it out:
//! the same work, not less.

use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    stream::{self, RetentionPolicy},
};
use futures_util::{StreamExt, stream::FuturesOrdered};
use switchyard_bench::{self as bench, Rounds, SIZE, env_usize, rate};
use switchyard_core::{Bytes, Client, SubscribeOptions};
use switchyard_nats::{NatsBroker, NatsConfig};

const BOUND: Duration = Duration::from_secs(300);

/// CPU time (user + system) this process has used, from /proc/self/stat.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Runs `f`, returning its wall time and the CPU time used meanwhile.
async fn timed<F: std::future::Future<Output = Duration>>(f: F) -> (Duration, Duration) {
    let before = cpu();
    let wall = f.await;
    (wall, cpu().saturating_sub(before))
}

/// The raw messages' id header (not `Nats-Msg-Id`, which would add the
/// server's de-duplication; switchyard does not use it either).
const RAW_ID: &str = "id";

async fn raw_publish(js: &jetstream::Context, subject: &str, n: usize, window: usize) -> Duration {
    let payload = Bytes::from(vec![0xab; SIZE]);
    let start = Instant::now();
    let mut in_flight = FuturesOrdered::new();
    for _ in 0..n {
        if in_flight.len() >= window {
            in_flight.next().await.unwrap();
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(RAW_ID, switchyard_core::new_id().as_str());
        let ack = js
            .publish_with_headers(subject.to_owned(), headers, payload.clone())
            .await
            .unwrap();
        in_flight.push_back(async move { ack.await.unwrap() });
    }
    while in_flight.next().await.is_some() {}
    start.elapsed()
}

async fn raw_consume(
    consumer: &jetstream::consumer::PullConsumer,
    n: usize,
    window: usize,
) -> Duration {
    let start = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(window)
        .messages()
        .await
        .unwrap();
    for _ in 0..n {
        let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .expect("raw consume stalled")
            .unwrap()
            .unwrap();
        // Its id, taken out as an owned value (as switchyard's `Message` has it).
        let id: Option<String> = m
            .headers
            .as_ref()
            .and_then(|h| h.get(RAW_ID))
            .map(|v| v.as_str().to_owned());
        assert!(id.is_some(), "a raw message without its id header");
        m.ack().await.unwrap();
    }
    start.elapsed()
}

async fn raw_consume_after_publish(
    js: &jetstream::Context,
    subject: &str,
    consumer: &jetstream::consumer::PullConsumer,
    n: usize,
    window: usize,
    batch: usize,
) -> f64 {
    raw_publish(js, subject, n, window).await;
    rate(n, raw_consume(consumer, n, batch).await)
}

async fn run(url: String, n: usize) {
    let url = url.as_str();
    let window = env_usize("SY_BENCH_WINDOW", 256);
    let broker = NatsBroker::connect(
        NatsConfig::from_url(url)
            .unwrap()
            .with_publish_window(window),
    )
    .await
    .unwrap();
    let js = broker.jetstream().clone();
    let client = Client::new(broker.clone());
    let run_id = &switchyard_core::new_id()[24..];

    // Raw: a stream and durable consumer configured as switchyard configures its own.
    let raw_stream = format!("bench-raw-{run_id}");
    let raw_subject = format!("bench.raw.{run_id}");
    let stream = js
        .get_or_create_stream(stream::Config {
            name: raw_stream.clone(),
            subjects: vec![raw_subject.clone()],
            retention: RetentionPolicy::Interest,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::New,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();

    let topic = format!("bench.switchyard.{run_id}");
    let opts = SubscribeOptions::new("bench").with_prefetch(window);
    client.ensure_subscription(&topic, &opts).await.unwrap();

    println!("NATS JetStream at {url}: {n} messages of {SIZE} B, window {window}");
    let mut rounds = Rounds::default();
    let mut cpu_figures = Vec::new();
    for round in 1..=4 {
        // Alternate who goes first: the second publisher writes into a store
        // that already holds the first one's unconsumed messages.
        let (raw_p, sy_p, raw_c, sy_c);
        if round % 2 == 1 {
            raw_p = timed(raw_publish(&js, &raw_subject, n, window)).await;
            sy_p = timed(bench::publish(&client, &topic, n)).await;
            raw_c = timed(raw_consume(&consumer, n, window)).await;
            sy_c = timed(bench::consume(&client, &topic, opts.clone(), n)).await;
        } else {
            sy_p = timed(bench::publish(&client, &topic, n)).await;
            raw_p = timed(raw_publish(&js, &raw_subject, n, window)).await;
            sy_c = timed(bench::consume(&client, &topic, opts.clone(), n)).await;
            raw_c = timed(raw_consume(&consumer, n, window)).await;
        }
        rounds.push(round, n, [raw_p.0, sy_p.0, raw_c.0, sy_c.0]);
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        cpu_figures.push((us(raw_p.1), us(sy_p.1), us(raw_c.1), us(sy_c.1)));
    }
    let k = cpu_figures.len() as f64;
    let (a, b, c, d) = cpu_figures.iter().fold((0.0, 0.0, 0.0, 0.0), |x, f| {
        (x.0 + f.0, x.1 + f.1, x.2 + f.2, x.3 + f.3)
    });
    println!(
        "client CPU per message: publish raw {:.2} µs / switchyard {:.2} µs; consume+ack raw {:.2} µs / switchyard {:.2} µs",
        a / k,
        b / k,
        c / k,
        d / k
    );
    // The same publishes, as single `publish` calls with 256 in flight.
    let before = cpu();
    let windowed = bench::publish_windowed(&client, &topic, n, SIZE, window)
        .await
        .unwrap();
    let windowed_cpu = cpu().saturating_sub(before);
    println!(
        "switchyard publish, single calls with {window} in flight: {:.0} msg/s ({:.2} µs CPU per message)",
        rate(n, windowed),
        windowed_cpu.as_secs_f64() * 1e6 / n as f64
    );
    bench::consume(&client, &topic, opts.clone(), n).await;

    // The raw pull stream keeps up to 1.5x its batch requested; with a batch
    // of window / 1.5 it has at most `window` outstanding, as switchyard.
    let same = window * 2 / 3;
    let raw_same = raw_consume_after_publish(&js, &raw_subject, &consumer, n, window, same).await;
    println!(
        "raw consume+ack with batch {same} (at most {window} outstanding, like switchyard): {:.0} msg/s",
        raw_same
    );
    rounds.print_mean("raw async-nats");
    let latency = bench::latency(&client, &topic, opts.clone(), 5_000, SIZE, 1_000.0)
        .await
        .unwrap();
    rounds.print_rows(
        "NATS JetStream",
        "async-nats, PubAcks in flight",
        "async-nats, pull stream",
    );
    bench::latency_row("NATS JetStream", &latency);

    let _ = js.delete_stream(&raw_stream).await;
    let _ = js.delete_stream(broker.stream_name(&topic)).await;
    let _ = js
        .delete_stream(broker.stream_name(&opts.dead_letter_topic_for(&topic)))
        .await;
    client.close().await.unwrap();
}

fn main() {
    bench::main_with("SWITCHYARD_NATS_URL", 100_000, BOUND, run);
}
