//! `switchyard bench`: throughput and latency through switchyard against
//! one broker, measured the way `scripts/bench.sh` measures it next to the
//! raw clients (see BENCHMARKS.md).

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use switchyard::{Client, SubscribeOptions};
use switchyard_bench::{self as bench, Latencies};

/// The subscription `bench` reads through.
const SUBSCRIPTION: &str = "bench";

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Broker URL (memory://, nats://, amqp://, kafka://, sqs://).
    url: String,
    /// Messages to move.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    messages: u64,
    /// Payload size in bytes (latency mode uses at least 8: the send time).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=16_777_216))]
    size: u64,
    /// Publishes awaiting their confirmation at once, and the
    /// subscription's prefetch (which a backend may cap: RabbitMQ at 65,535).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    window: u64,
    /// What to measure. `both` publishes, then consumes what it published;
    /// `consume` alone reads `--topic` (filled by an earlier `--mode publish`).
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// Messages per second published in latency mode.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Topic to use (default: a new `bench.<id>`).
    #[arg(long)]
    topic: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Confirmed publish throughput.
    Publish,
    /// Receive+ack throughput of `--topic`'s `bench` subscription.
    Consume,
    /// Publish, then consume the same messages.
    Both,
    /// End-to-end latency at `--rate` messages per second.
    Latency,
}

/// Runs the benchmark and prints its figures.
pub(crate) async fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if a.mode == Mode::Consume && a.topic.is_none() {
        bail!(
            "--mode consume reads messages an earlier run left: give the --topic that `--mode publish` printed"
        );
    }
    if !(a.rate.is_finite() && a.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let n = usize::try_from(a.messages).context("--messages")?;
    let size = usize::try_from(a.size).context("--size")?;
    let window = usize::try_from(a.window).context("--window")?;
    let topic = a
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench.{}", &switchyard::new_id()[24..]));
    let client = crate::connect(&a.url).await?;
    let result = measure(&client, &a, &topic, n, size, window).await;
    let closed = client.close().await;
    let figures = result?;
    closed.context("closing the connection")?;
    if a.json {
        println!("{}", figures.to_json(&a, &topic, n));
    } else {
        figures.print(&topic, n, size, window);
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Figures {
    publish: Option<Duration>,
    consume: Option<Duration>,
    latency: Option<Latencies>,
}

async fn measure(
    client: &Client,
    a: &BenchArgs,
    topic: &str,
    n: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<Figures> {
    let opts = SubscribeOptions::new(SUBSCRIPTION).with_prefetch(window);
    let mut figures = Figures::default();
    if a.mode == Mode::Latency {
        figures.latency = Some(
            bench::latency(client, topic, opts, n, size, a.rate)
                .await
                .with_context(|| format!("measuring latency on {topic}"))?,
        );
        return Ok(figures);
    }
    if a.mode != Mode::Consume {
        // Kept for the consume that follows (now or in a later run).
        client
            .ensure_subscription(topic, &opts)
            .await
            .with_context(|| format!("creating {topic}'s subscription {SUBSCRIPTION}"))?;
        figures.publish = Some(
            bench::publish_windowed(client, topic, n, size, window)
                .await
                .with_context(|| format!("publishing to {topic}"))?,
        );
    }
    if a.mode != Mode::Publish {
        figures.consume = Some(
            bench::try_consume(client, topic, opts, n)
                .await
                .with_context(|| format!("consuming {topic}"))?,
        );
    }
    Ok(figures)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Figures {
    fn print(&self, topic: &str, n: usize, size: usize, window: usize) {
        println!("topic {topic}: {n} messages of {size} B, window {window}");
        if let Some(d) = self.publish {
            println!(
                "publish      {:>10.0} msg/s  ({:.2} s, confirmed)",
                bench::rate(n, d),
                d.as_secs_f64()
            );
        }
        if let Some(d) = self.consume {
            println!(
                "consume+ack  {:>10.0} msg/s  ({:.2} s from the first delivery)",
                bench::rate(n, d),
                d.as_secs_f64()
            );
        }
        if let Some(l) = &self.latency {
            println!(
                "latency at {:.0} msg/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} messages)",
                l.rate,
                ms(l.p50),
                ms(l.p99),
                ms(l.max),
                l.count
            );
        }
    }

    fn to_json(&self, a: &BenchArgs, topic: &str, n: usize) -> serde_json::Value {
        let rate = |d: Duration| serde_json::json!({ "seconds": d.as_secs_f64(), "msg_per_sec": bench::rate(n, d) });
        serde_json::json!({
            "url": switchyard::redact_url(&a.url),
            "topic": topic,
            "messages": a.messages,
            "size": a.size,
            "window": a.window,
            "publish": self.publish.map(rate),
            "consume": self.consume.map(rate),
            "latency": self.latency.as_ref().map(|l| serde_json::json!({
                "rate": l.rate,
                "count": l.count,
                "p50_ms": ms(l.p50),
                "p99_ms": ms(l.p99),
                "max_ms": ms(l.max),
            })),
        })
    }
}
