//! `switchyard`: publish, tail, bridge and dead-letter commands over any
//! broker switchyard speaks, addressed by URL as in `switchyard::connect`
//! (`memory://`, `nats://…`, `amqp://…`, `kafka://…`, `sqs://…`).
//!
//! ```text
//! switchyard publish nats://127.0.0.1:4222 orders.created --key customer-7 --header source=cli '{"order":1}'
//! switchyard tail nats://127.0.0.1:4222 orders.created --subscription debug --count 10
//! switchyard bridge --from amqp://guest:guest@127.0.0.1:5672/%2f --topic orders.created \
//!     --subscription migration --to kafka://127.0.0.1:9092 --idle-timeout 30s
//! switchyard dead-letters nats://127.0.0.1:4222 orders.created --subscription billing list
//! switchyard dead-letters nats://127.0.0.1:4222 orders.created --subscription billing redrive
//! switchyard bench nats://127.0.0.1:4222 --messages 50000 --size 256 --window 256 --json
//! ```
//!
//! Results go to standard output (ids, JSON lines, counts), progress and
//! errors to standard error. Exit status: 0 on success, 1 when the work
//! failed, 2 on bad usage.

use std::{
    io::{Read as _, Write as _},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use clap::{Args, Parser, Subcommand};
use futures_util::FutureExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use switchyard::{Client, Delivery, Message, SubscribeOptions, Subscription};

mod bench;

/// How many messages `publish --count` hands to one `publish_batch`.
const PUBLISH_CHUNK: u64 = 1000;

#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
/// Publish, inspect and move messages on Kafka, RabbitMQ, NATS JetStream,
/// SQS or the in-process broker, through one command line.
struct Cli {
    /// No progress display.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish a message (or `--count` of them), confirmed by the broker;
    /// prints each id.
    Publish(PublishArgs),
    /// Print a subscription's messages as JSON lines.
    Tail(TailArgs),
    /// Move messages from a subscription to a topic on another broker (or
    /// another topic); a source message is acked only after the target
    /// confirmed it.
    Bridge(BridgeArgs),
    /// List or redrive the dead letters of a subscription.
    DeadLetters(DeadLettersArgs),
    /// Measure confirmed publish and consume+ack throughput, or end-to-end
    /// latency at a fixed rate, through switchyard.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// Broker URL (memory://, nats://, amqp://, kafka://, sqs://).
    url: String,
    /// Topic to publish to.
    topic: String,
    /// Ordering / partition key.
    #[arg(long)]
    key: Option<String>,
    /// Message id (default: a new UUIDv7); only with a single message.
    #[arg(long)]
    id: Option<String>,
    /// A header `name=value` (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Publish this many copies, each with a new id.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// The payload; `-` reads it from standard input; empty when omitted.
    payload: Option<String>,
}

#[derive(Debug, Args)]
struct TailArgs {
    /// Broker URL.
    url: String,
    /// Topic to read.
    topic: String,
    /// Subscription to read through (created when missing).
    #[arg(long, short)]
    subscription: String,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop when no message arrives for this long (e.g. `10s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Ack each message after printing it (the default).
    #[arg(long, overrides_with = "no_ack")]
    ack: bool,
    /// Leave messages unsettled: they go back to the subscription when tail
    /// ends (brokers that count deliveries count this one). Shows at most
    /// `--count` (or 1000) messages.
    #[arg(long)]
    no_ack: bool,
}

#[derive(Debug, Args)]
struct BridgeArgs {
    /// Source broker URL.
    #[arg(long)]
    from: String,
    /// Source topic.
    #[arg(long)]
    topic: String,
    /// Source subscription (created when missing).
    #[arg(long, short)]
    subscription: String,
    /// Target broker URL.
    #[arg(long)]
    to: String,
    /// Target topic (default: the source topic).
    #[arg(long)]
    to_topic: Option<String>,
    /// Stop after this many messages.
    #[arg(long, conflicts_with = "idle_timeout")]
    count: Option<u64>,
    /// Stop when no message arrives for this long (e.g. `30s`); without it
    /// or `--count`, run until interrupted.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Most messages in flight at once (received, being published).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    window: u64,
}

#[derive(Debug, Args)]
struct DeadLettersArgs {
    /// Broker URL.
    url: String,
    /// The subscription's topic.
    topic: String,
    /// The subscription whose dead letters to read.
    #[arg(long, short)]
    subscription: String,
    /// The subscription's dead-letter topic, if not the default
    /// `<topic>.<subscription>.dlq`.
    #[arg(long)]
    dead_letter_topic: Option<String>,
    #[command(subcommand)]
    action: DeadLetterAction,
}

#[derive(Debug, Subcommand)]
enum DeadLetterAction {
    /// Print dead letters as JSON lines (with their `sy-*` headers), leaving
    /// them in place.
    List {
        /// Stop after this many.
        #[arg(long)]
        count: Option<u64>,
        /// Stop when none arrives for this long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Move dead letters back to the topic they came from (attempts start
    /// again); prints how many moved.
    Redrive {
        /// Move at most this many.
        #[arg(long)]
        count: Option<u64>,
        /// Stop when none arrives for this long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = cli.quiet;
    let result = match cli.command {
        Command::Publish(a) => publish(a, quiet).await,
        Command::Tail(a) => tail(a).await,
        Command::Bridge(a) => bridge(a, quiet).await,
        Command::DeadLetters(a) => dead_letters(a).await,
        Command::Bench(a) => bench::bench(a).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    switchyard::connect(url)
        .await
        .with_context(|| format!("connecting to {}", switchyard::redact_url(url)))
}

fn progress(total: Option<u64>, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} ({per_sec}, {eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} ({per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(what.to_owned());
    bar
}

async fn publish(a: PublishArgs, quiet: bool) -> anyhow::Result<()> {
    if a.id.is_some() && a.count > 1 {
        bail!("--id names one message: it cannot be combined with --count > 1");
    }
    let payload = match a.payload.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the payload from standard input")?;
            buf
        }
        Some(p) => p.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let payload = switchyard::Bytes::from(payload);
    let template = |id: Option<&str>| {
        let mut m = Message::new(payload.clone());
        if let Some(id) = id {
            m = m.with_id(id);
        }
        if let Some(k) = &a.key {
            m = m.with_key(k.clone());
        }
        for (k, v) in &a.headers {
            m = m.with_header(k.clone(), v.clone());
        }
        m
    };
    let client = connect(&a.url).await?;
    let bar = progress((a.count > 1).then_some(a.count), quiet, "publishing");
    let mut out = std::io::stdout();
    let mut published = 0;
    let mut first_error = None;
    while published < a.count && first_error.is_none() {
        let n = (a.count - published).min(PUBLISH_CHUNK);
        let batch: Vec<Message> = (0..n).map(|_| template(a.id.as_deref())).collect();
        let ids: Vec<String> = batch.iter().map(|m| m.id().to_owned()).collect();
        for (id, r) in ids.iter().zip(client.publish_batch(&a.topic, batch).await) {
            match r {
                Ok(()) => {
                    published += 1;
                    writeln!(out, "{id}")?;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        bar.set_position(published);
    }
    out.flush()?;
    bar.finish_and_clear();
    let closed = client.close().await;
    if let Some(e) = first_error {
        return Err(anyhow::Error::new(e).context(format!(
            "publishing to {}: {published} of {} confirmed",
            a.topic, a.count
        )));
    }
    closed.context("closing the connection")?;
    if !quiet && a.count > 1 {
        eprintln!("published {published} messages to {}", a.topic);
    }
    Ok(())
}

/// A delivery as one JSON object: id, key, headers, payload (UTF-8) or
/// payload_base64, attempt, topic, published_at (RFC 3339).
fn json_line(d: &Delivery) -> String {
    let m = d.message();
    let mut o = serde_json::Map::new();
    o.insert("id".into(), m.id().into());
    o.insert(
        "key".into(),
        m.key().map_or(serde_json::Value::Null, Into::into),
    );
    let headers: serde_json::Map<String, serde_json::Value> = m
        .headers()
        .iter()
        .map(|(k, v)| (k.to_owned(), v.into()))
        .collect();
    o.insert("headers".into(), headers.into());
    match std::str::from_utf8(m.payload()) {
        Ok(text) => o.insert("payload".into(), text.into()),
        Err(_) => o.insert("payload_base64".into(), STANDARD.encode(m.payload()).into()),
    };
    o.insert("attempt".into(), d.attempt().into());
    o.insert("topic".into(), d.topic().into());
    if let Some(at) = m.published_at() {
        o.insert(
            "published_at".into(),
            humantime::format_rfc3339_millis(at).to_string().into(),
        );
    }
    serde_json::Value::Object(o).to_string()
}

/// The next delivery, or `None` when `idle` passes without one or the
/// process is interrupted.
async fn next(sub: &mut Subscription, idle: Option<Duration>) -> anyhow::Result<Option<Delivery>> {
    let wait = async {
        match idle {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = sub.recv() => Ok(Some(r.context("receiving")?)),
        () = wait => Ok(None),
        _ = tokio::signal::ctrl_c() => Ok(None),
    }
}

async fn tail(a: TailArgs) -> anyhow::Result<()> {
    // `--ack` and `--no-ack` override each other: the last one given wins.
    let ack = a.ack || !a.no_ack;
    let client = connect(&a.url).await?;
    let mut opts = SubscribeOptions::new(a.subscription.clone());
    if !ack {
        // Unsettled deliveries stay held: room for all that will be shown.
        let room = a.count.unwrap_or(1000);
        opts = opts.with_prefetch(usize::try_from(room).unwrap_or(usize::MAX));
    }
    let mut sub = client
        .subscribe(&a.topic, opts)
        .await
        .with_context(|| format!("subscribing to {} as {}", a.topic, a.subscription))?;
    let mut held = Vec::new();
    let mut shown = 0_u64;
    let mut out = std::io::stdout();
    while a.count.is_none_or(|c| shown < c) {
        let Some(d) = next(&mut sub, a.timeout).await? else {
            break;
        };
        writeln!(out, "{}", json_line(&d))?;
        out.flush()?;
        shown += 1;
        if ack {
            d.ack().await.context("acking")?;
        } else {
            held.push(d);
        }
    }
    // Unacked deliveries go back to the subscription on close.
    drop(held);
    sub.close().await.context("closing the subscription")?;
    client.close().await.context("closing the connection")?;
    Ok(())
}

async fn bridge(a: BridgeArgs, quiet: bool) -> anyhow::Result<()> {
    let to_topic = a.to_topic.clone().unwrap_or_else(|| a.topic.clone());
    if a.from == a.to && to_topic == a.topic {
        bail!("the target is the source: give another --to URL or a --to-topic");
    }
    let source = connect(&a.from).await?;
    let target = connect(&a.to).await?;
    let window = usize::try_from(a.window).unwrap_or(usize::MAX);
    let mut sub = source
        .subscribe(
            &a.topic,
            SubscribeOptions::new(a.subscription.clone()).with_prefetch(window),
        )
        .await
        .with_context(|| format!("subscribing to {} as {}", a.topic, a.subscription))?;
    let bar = progress(a.count, quiet, "bridging");
    let start = Instant::now();
    let mut moved = 0_u64;
    let mut failure = None;
    'outer: while a.count.is_none_or(|c| moved < c) {
        let room = a.count.map_or(window, |c| {
            usize::try_from(c - moved).unwrap_or(usize::MAX).min(window)
        });
        let Some(first) = next(&mut sub, a.idle_timeout).await? else {
            break;
        };
        let mut batch = vec![first];
        // What already arrived joins the batch without waiting (recv is
        // cancel safe, so a receive that is not ready loses nothing).
        while batch.len() < room {
            match sub.recv().now_or_never() {
                Some(Ok(d)) => batch.push(d),
                Some(Err(e)) => {
                    failure = Some(anyhow::Error::new(e).context("receiving"));
                    break;
                }
                None => break,
            }
        }
        let messages: Vec<Message> = batch.iter().map(|d| d.message().clone()).collect();
        let results = target.publish_batch(&to_topic, messages).await;
        let mut acks = Vec::with_capacity(batch.len());
        for (d, r) in batch.into_iter().zip(results) {
            match r {
                Ok(()) => acks.push(d.ack()),
                // Left unsettled: it goes back to the source subscription.
                Err(e) => {
                    if failure.is_none() {
                        failure = Some(
                            anyhow::Error::new(e).context(format!("publishing to {to_topic}")),
                        );
                    }
                }
            }
        }
        for r in futures_util::future::join_all(acks).await {
            match r {
                Ok(()) => moved += 1,
                Err(e) => {
                    // Published but not acked: the source redelivers it and
                    // the target gets a duplicate (same id), never a loss.
                    failure.get_or_insert(anyhow::Error::new(e).context("acking the source"));
                }
            }
        }
        bar.set_position(moved);
        if failure.is_some() {
            break 'outer;
        }
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed();
    let closed_sub = sub.close().await;
    let closed_source = source.close().await;
    let closed_target = target.close().await;
    println!(
        "bridged {moved} messages from {} to {to_topic} in {:.1} s ({:.0} msg/s)",
        a.topic,
        elapsed.as_secs_f64(),
        moved as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    if let Some(e) = failure {
        return Err(e.context(format!(
            "bridge stopped after {moved} messages; the rest stay on the source"
        )));
    }
    closed_sub.context("closing the source subscription")?;
    closed_source.context("closing the source")?;
    closed_target.context("closing the target")?;
    Ok(())
}

async fn dead_letters(a: DeadLettersArgs) -> anyhow::Result<()> {
    let client = connect(&a.url).await?;
    let mut opts = SubscribeOptions::new(a.subscription.clone());
    if let Some(t) = &a.dead_letter_topic {
        opts = opts.with_dead_letter_topic(t.clone());
    }
    opts.validate(&a.topic)?;
    let dlq = opts.dead_letter_topic_for(&a.topic);
    match a.action {
        DeadLetterAction::List { count, timeout } => {
            // Held unsettled while listing, then handed back on close.
            let room = count.unwrap_or(10_000);
            let mut sub = client
                .subscribe(
                    &dlq,
                    SubscribeOptions::dead_letters()
                        .with_prefetch(usize::try_from(room).unwrap_or(usize::MAX)),
                )
                .await
                .with_context(|| format!("reading {dlq}"))?;
            let mut held = Vec::new();
            let mut out = std::io::stdout();
            while count.is_none_or(|c| (held.len() as u64) < c) {
                let Some(d) = next(&mut sub, Some(timeout)).await? else {
                    break;
                };
                writeln!(out, "{}", json_line(&d))?;
                held.push(d);
            }
            out.flush()?;
            drop(held);
            sub.close().await.context("closing the subscription")?;
        }
        DeadLetterAction::Redrive { count, timeout } => {
            let limit = count.map(|c| usize::try_from(c).unwrap_or(usize::MAX));
            let moved = client
                .redrive(&a.topic, &opts, limit, timeout)
                .await
                .with_context(|| format!("redriving {dlq}"))?;
            println!("redrove {moved} dead letters from {dlq} to {}", a.topic);
        }
    }
    client.close().await.context("closing the connection")?;
    Ok(())
}
