//! Pieces the broker benchmarks share: the switchyard side of each
//! measurement and the bookkeeping of rounds, so every backend's benchmark
//! (and the command line's `switchyard bench`) measures switchyard the same
//! way next to its raw client. Its API is not stable.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use switchyard_bench::{Rounds, rate};
//! let mut rounds = Rounds::default();
//! let ms = Duration::from_millis;
//! rounds.push(1, 1000, [ms(10), ms(10), ms(5), ms(5)]);
//! rounds.push(2, 1000, [ms(10), ms(20), ms(5), ms(10)]); // one odd round
//! rounds.push(3, 1000, [ms(20), ms(20), ms(10), ms(10)]); // a slow spell
//! // The ratios (switchyard over raw) are 1, 0.5 and 1: the median is 1.
//! assert_eq!(rounds.median_ratios(), [1.0, 1.0]);
//! assert_eq!(rate(1000, Duration::from_secs(1)), 1000.0);
//! ```

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt as _, stream::FuturesUnordered};
use switchyard_core::{Bytes, Client, Error, Message, Result, SubscribeOptions};

pub mod scaling;

/// Size of the messages the benchmarks move.
pub const SIZE: usize = 256;

/// A positive integer from the environment, or `default`.
#[must_use]
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// A broker benchmark's `main`: the broker's URL from the environment
/// variable `url_var` (without it, says so and returns), the message count
/// from `SY_BENCH_MESSAGES` (else `default_n`), then `bench(url, n)` on a
/// two-thread runtime, within `bound`.
///
/// # Panics
///
/// When the benchmark outlasts `bound` (or panics itself).
pub fn main_with<F, Fut>(url_var: &str, default_n: usize, bound: Duration, bench: F)
where
    F: FnOnce(String, usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Ok(url) = std::env::var(url_var) else {
        println!(
            "{url_var} is not set: benchmark skipped (`scripts/brokers.sh start` starts the brokers)"
        );
        return;
    };
    let n = env_usize("SY_BENCH_MESSAGES", default_n);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        tokio::time::timeout(bound, bench(url, n))
            .await
            .expect("benchmark exceeded its time bound");
    });
}

/// Messages per second (a zero duration counts as one nanosecond).
#[must_use]
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Publishes `n` messages of [`SIZE`] bytes through `publish_batch` (10,000
/// at a time, which the backend pipelines with its window); returns the
/// wall time.
///
/// # Panics
///
/// When a publish fails: a benchmark has no use for partial figures.
pub async fn publish(client: &Client, topic: &str, n: usize) -> Duration {
    let payload = Bytes::from(vec![0xab; SIZE]);
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(10_000);
        let batch: Vec<Message> = (0..k).map(|_| Message::new(payload.clone())).collect();
        for r in client.publish_batch(topic, batch).await {
            r.expect("switchyard publish");
        }
        left -= k;
    }
    start.elapsed()
}

/// Publishes `n` messages of `size` bytes with at most `window` single
/// `publish` calls awaiting their confirmation at once (what a service
/// publishing concurrently does); returns the wall time.
///
/// # Errors
///
/// The first publish that fails.
pub async fn publish_windowed(
    client: &Client,
    topic: &str,
    n: usize,
    size: usize,
    window: usize,
) -> Result<Duration> {
    let payload = Bytes::from(vec![0xab; size]);
    let start = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for _ in 0..n {
        if in_flight.len() >= window.max(1) {
            if let Some(r) = in_flight.next().await {
                r?;
            }
        }
        in_flight.push(client.publish(topic, Message::new(payload.clone())));
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    Ok(start.elapsed())
}

/// Receives and acks `n` messages on a new subscription handle, one at a
/// time; returns the wall time from the first delivery (subscribing and
/// waiting for the first message are not consuming) to the last ack.
///
/// # Panics
///
/// When a receive or an ack fails or nothing arrives for 60 s: a benchmark
/// has no use for partial figures.
pub async fn consume(client: &Client, topic: &str, opts: SubscribeOptions, n: usize) -> Duration {
    try_consume(client, topic, opts, n)
        .await
        .expect("switchyard consume")
}

/// [`consume`] returning errors instead of panicking (a receive that waits
/// 60 s is an [`Error::Timeout`]).
///
/// # Errors
///
/// The first failed subscribe, receive, ack or close, or a stall.
pub async fn try_consume(
    client: &Client,
    topic: &str,
    opts: SubscribeOptions,
    n: usize,
) -> Result<Duration> {
    let mut sub = client.subscribe(topic, opts).await?;
    let mut start = None;
    for _ in 0..n {
        let d = tokio::time::timeout(STALL, sub.recv())
            .await
            .map_err(|_| stalled())??;
        start.get_or_insert_with(Instant::now);
        d.ack().await?;
    }
    let elapsed = start.map_or(Duration::ZERO, |s| s.elapsed());
    sub.close().await?;
    Ok(elapsed)
}

/// Receives and acks `n` messages with `consumers` handles on the same
/// subscription at once (each its own task, as services scale out), each
/// handle with up to `acks` acks awaiting confirmation while it receives on
/// (1: each ack awaited before the next receive); returns the wall time
/// from the first delivery, whichever handle got it, to the `n`-th
/// confirmed ack.
///
/// # Errors
///
/// The first failed subscribe, receive, ack or close, or a stall.
pub async fn consume_shared(
    client: &Client,
    topic: &str,
    opts: SubscribeOptions,
    n: usize,
    consumers: usize,
    acks: usize,
) -> Result<Duration> {
    let tally = scaling::Tally::new(n);
    let mut tasks = Vec::new();
    for _ in 0..consumers.max(1) {
        let mut sub = client.subscribe(topic, opts.clone()).await?;
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            'run: loop {
                while pending.len() >= acks.max(1) {
                    if let Some(r) = pending.next().await {
                        r?;
                        if tally.add(1) {
                            break 'run;
                        }
                    }
                }
                tokio::select! {
                    biased;
                    Some(r) = pending.next(), if !pending.is_empty() => {
                        r?;
                        if tally.add(1) {
                            break;
                        }
                    }
                    d = tokio::time::timeout(STALL, sub.recv()) => {
                        let d = d.map_err(|_| stalled())??;
                        tally.started();
                        pending.push(d.ack());
                    }
                    () = tally.finished() => break,
                }
            }
            // What is still out (another handle counted the n-th).
            while let Some(r) = pending.next().await {
                r?;
                tally.add(1);
            }
            sub.close().await
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::broker(format!("a consumer task failed: {e}"), false, None))??;
    }
    Ok(tally.span().unwrap_or_default())
}

/// How long a benchmark waits for a message before calling it a stall.
const STALL: Duration = Duration::from_secs(60);

fn stalled() -> Error {
    Error::Timeout {
        operation: "waiting for the next benchmark message",
        after: STALL,
    }
}

/// End-to-end latencies: from just before `publish` was called to the
/// consumer holding the delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct Latencies {
    /// Messages measured.
    pub count: usize,
    /// The rate they were published at, messages per second.
    pub rate: f64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

impl Latencies {
    /// The percentiles of `samples` (nanoseconds), published at `rate`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchyard_bench::Latencies;
    /// let l = Latencies::from_samples((1..=100).map(|ms| ms * 1_000_000).collect(), 10.0);
    /// assert_eq!(l.p50, Duration::from_millis(51));
    /// assert_eq!(l.p99, Duration::from_millis(100));
    /// assert_eq!(l.max, Duration::from_millis(100));
    /// ```
    #[must_use]
    pub fn from_samples(mut samples: Vec<u64>, rate: f64) -> Self {
        samples.sort_unstable();
        let at = |q: usize| {
            let i = (samples.len() * q / 100).min(samples.len().saturating_sub(1));
            Duration::from_nanos(samples.get(i).copied().unwrap_or(0))
        };
        Self {
            count: samples.len(),
            rate,
            p50: at(50),
            p99: at(99),
            max: Duration::from_nanos(samples.last().copied().unwrap_or(0)),
        }
    }
}

/// Nanoseconds since the Unix epoch: the stamp latency payloads carry.
fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Publishes `n` messages of `size` bytes (at least 8: the first 8 carry the
/// send time) at a fixed `rate` per second, each with a single `publish`,
/// while a subscription receives and acks them; returns the end-to-end
/// latencies. The publisher keeps its schedule whatever the confirmations
/// take (publishes overlap). One warm-up message makes the trip first and
/// is not counted.
///
/// # Errors
///
/// The first failed subscribe, publish, receive, ack or close, or a stall.
pub async fn latency(
    client: &Client,
    topic: &str,
    opts: SubscribeOptions,
    n: usize,
    size: usize,
    rate: f64,
) -> Result<Latencies> {
    let mut sub = client.subscribe(topic, opts).await?;
    // Steady state only: one message must make the whole trip first (a
    // Kafka group member can take seconds to get its partitions).
    client
        .publish(topic, Message::new(vec![0_u8; size.max(8)]))
        .await?;
    let warm = tokio::time::timeout(STALL, sub.recv())
        .await
        .map_err(|_| stalled())??;
    warm.ack().await?;
    let consumer = async {
        let mut samples = Vec::with_capacity(n);
        while samples.len() < n {
            let d = tokio::time::timeout(STALL, sub.recv())
                .await
                .map_err(|_| stalled())??;
            let now = now_nanos();
            let mut stamp = [0_u8; 8];
            let payload = d.message().payload();
            let k = payload.len().min(8);
            stamp[..k].copy_from_slice(&payload[..k]);
            samples.push(now.saturating_sub(u64::from_le_bytes(stamp)));
            d.ack().await?;
        }
        Ok::<_, Error>(samples)
    };
    let producer = async {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut in_flight = FuturesUnordered::new();
        for _ in 0..n {
            loop {
                tokio::select! {
                    biased;
                    Some(r) = in_flight.next(), if !in_flight.is_empty() => r?,
                    _ = tick.tick() => break,
                }
            }
            let mut payload = vec![0xab; size.max(8)];
            payload[..8].copy_from_slice(&now_nanos().to_le_bytes());
            in_flight.push(client.publish(topic, Message::new(payload)));
        }
        while let Some(r) = in_flight.next().await {
            r?;
        }
        Ok::<_, Error>(())
    };
    let (samples, published) = tokio::join!(consumer, producer);
    published?;
    let samples = samples?;
    sub.close().await?;
    Ok(Latencies::from_samples(samples, rate))
}

/// Prints one row of the results table (`| backend | measure | switchyard |
/// other | ratio |`), the lines `scripts/bench.sh` collects.
pub fn row(backend: &str, measure: &str, switchyard: f64, other: &str, value: f64) {
    ratio_row(
        backend,
        measure,
        switchyard,
        other,
        value,
        switchyard / value,
    );
}

/// [`row`] with its ratio given (the median of the rounds' ratios, which
/// need not be the quotient of the mean rates).
fn ratio_row(backend: &str, measure: &str, switchyard: f64, other: &str, value: f64, ratio: f64) {
    println!("| {backend} | {measure} | {switchyard:.0} | {other} | {value:.0} | {ratio:.2} |");
}

/// The median of `values` (`NaN` when there are none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => f64::midpoint(values[n / 2 - 1], values[n / 2]),
    }
}

/// Prints the latency row of the results table.
pub fn latency_row(backend: &str, l: &Latencies) {
    println!(
        "| {backend} | latency p50 / p99 at {:.0} msg/s | {:.2} / {:.2} ms (max {:.1}) | | | |",
        l.rate,
        l.p50.as_secs_f64() * 1e3,
        l.p99.as_secs_f64() * 1e3,
        l.max.as_secs_f64() * 1e3,
    );
}

/// Rates of rounds of (raw publish, switchyard publish, raw consume+ack,
/// switchyard consume+ack), printed as they come and averaged at the end.
#[derive(Debug, Default)]
pub struct Rounds {
    rates: Vec<[f64; 4]>,
}

impl Rounds {
    /// Records and prints round `round`: the wall times of `n` messages,
    /// in the order raw publish, switchyard publish, raw consume,
    /// switchyard consume.
    pub fn push(&mut self, round: usize, n: usize, times: [Duration; 4]) {
        let r = times.map(|d| rate(n, d));
        println!(
            "round {round}: publish raw {:>9.0} msg/s  switchyard {:>9.0} msg/s  ratio {:.2}",
            r[0],
            r[1],
            r[1] / r[0]
        );
        println!(
            "round {round}: consume+ack raw {:>9.0} msg/s  switchyard {:>9.0} msg/s  ratio {:.2}",
            r[2],
            r[3],
            r[3] / r[2]
        );
        self.rates.push(r);
    }

    /// Mean rates over the rounds, in the order of [`Rounds::push`].
    #[must_use]
    pub fn mean(&self) -> [f64; 4] {
        let k = self.rates.len().max(1) as f64;
        let mut sum = [0.0; 4];
        for r in &self.rates {
            for (s, x) in sum.iter_mut().zip(r) {
                *s += x;
            }
        }
        sum.map(|s| s / k)
    }

    /// The medians of the rounds' ratios (switchyard over raw), publish and
    /// consume+ack. A round measures both clients back to back, so a slow
    /// spell of the machine moves both of its figures rather than the
    /// ratio, and the median leaves out one odd round.
    #[must_use]
    pub fn median_ratios(&self) -> [f64; 2] {
        [
            median(self.rates.iter().map(|r| r[1] / r[0]).collect()),
            median(self.rates.iter().map(|r| r[3] / r[2]).collect()),
        ]
    }

    /// Prints the means as two rows of the results table, with the median
    /// ratios: publish against `raw_publish`, consume+ack against
    /// `raw_consume` (the raw client and how it was configured).
    pub fn print_rows(&self, backend: &str, raw_publish: &str, raw_consume: &str) {
        let [rp, sp, rc, sc] = self.mean();
        let [publish, consume] = self.median_ratios();
        ratio_row(backend, "publish (msg/s)", sp, raw_publish, rp, publish);
        ratio_row(backend, "consume+ack (msg/s)", sc, raw_consume, rc, consume);
    }

    /// Prints the means, the ratio of the means and the median ratio.
    pub fn print_mean(&self, raw: &str) {
        let [rp, sp, rc, sc] = self.mean();
        let [publish, consume] = self.median_ratios();
        println!(
            "mean: publish {raw} {rp:.0} / switchyard {sp:.0} (ratio {:.2}, median of rounds {publish:.2}); consume+ack {raw} {rc:.0} / switchyard {sc:.0} (ratio {:.2}, median of rounds {consume:.2})",
            sp / rp,
            sc / rc
        );
    }
}

/// Rates of rounds of another client (omniqueue) doing (publish,
/// consume+ack) next to switchyard, printed as they come and compared with
/// switchyard's means at the end.
#[derive(Debug, Default)]
pub struct Others {
    rates: Vec<(f64, f64)>,
}

impl Others {
    /// Records and prints round `round` of the client `name`: the wall
    /// times of `n` messages published and consumed.
    pub fn push(
        &mut self,
        round: usize,
        name: &str,
        n: usize,
        publish: Duration,
        consume: Duration,
    ) {
        let (p, c) = (rate(n, publish), rate(n, consume));
        println!("round {round}: {name} publish {p:>9.0} msg/s  consume+ack {c:>9.0} msg/s");
        self.rates.push((p, c));
    }

    /// Prints the mean rates as rows of the results table, next to
    /// switchyard's means in `switchyard`: publish against
    /// `publish_label`, consume+ack against `consume_label`.
    pub fn print_rows(
        &self,
        backend: &str,
        switchyard: &Rounds,
        publish_label: &str,
        consume_label: &str,
    ) {
        let k = self.rates.len().max(1) as f64;
        let (p, c) = self
            .rates
            .iter()
            .fold((0.0, 0.0), |(p, c), r| (p + r.0, c + r.1));
        let [_, sp, _, sc] = switchyard.mean();
        row(backend, "publish (msg/s)", sp, publish_label, p / k);
        row(backend, "consume+ack (msg/s)", sc, consume_label, c / k);
    }
}
