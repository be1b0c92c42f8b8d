//! Pieces the broker benchmarks share: the switchyard side of each
//! measurement and the bookkeeping of rounds, so every backend's benchmark
//! measures switchyard the same way next to its raw client.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use switchyard_conformance::bench::{Rounds, rate};
//! let mut rounds = Rounds::default();
//! rounds.push(1, 1000, [Duration::from_millis(10), Duration::from_millis(11),
//!     Duration::from_millis(5), Duration::from_millis(5)]);
//! assert_eq!(rate(1000, Duration::from_secs(1)), 1000.0);
//! ```

use std::time::{Duration, Instant};

use switchyard_core::{Bytes, Client, Message, SubscribeOptions};

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

/// Messages per second.
#[must_use]
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
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

/// Receives and acks `n` messages on a new subscription handle, one at a
/// time; returns the wall time (closing not included).
///
/// # Panics
///
/// When a receive fails or nothing arrives for 30 s.
pub async fn consume(client: &Client, topic: &str, opts: SubscribeOptions, n: usize) -> Duration {
    let mut sub = client.subscribe(topic, opts).await.expect("subscribe");
    let start = Instant::now();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), sub.recv())
            .await
            .expect("switchyard consume stalled")
            .expect("switchyard receive");
        d.ack().await.expect("switchyard ack");
    }
    let elapsed = start.elapsed();
    sub.close().await.expect("close");
    elapsed
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

    /// Prints the means and their ratios.
    pub fn print_mean(&self, raw: &str) {
        let [rp, sp, rc, sc] = self.mean();
        println!(
            "mean: publish {raw} {rp:.0} / switchyard {sp:.0} (ratio {:.2}); consume+ack {raw} {rc:.0} / switchyard {sc:.0} (ratio {:.2})",
            sp / rp,
            sc / rc
        );
    }
}
