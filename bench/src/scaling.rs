//! The scaling runs every backend's `--bench scaling` shares: consume+ack
//! throughput with 1, 2, 4 and 8 consumers on one subscription, for 1 KiB
//! and 64 KiB payloads, switchyard next to a raw client; one CSV per
//! backend, which `scripts/plot_scaling.py` draws.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use switchyard_bench::scaling::{Table, Tally};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let mut table = Table::new("example", "raw");
//! // Each measurement publishes, then times both clients; the point is the
//! // mean of two, each client going first once.
//! let (raw, sy) = table
//!     .point(
//!         1024,
//!         1000,
//!         2,
//!         async || {},
//!         async || Duration::from_millis(10),
//!         async || Duration::from_millis(20),
//!     )
//!     .await;
//! assert_eq!((raw, sy), (100_000.0, 50_000.0));
//! assert!(table.csv().contains("example,1024,2,raw,100000"));
//!
//! // A raw consumer loop counts what it took; the n-th ends every loop.
//! let tally = Tally::new(2);
//! tally.started();
//! assert!(!tally.add(1));
//! assert!(tally.add(1));
//! tally.finished().await;
//! assert!(tally.span().is_some());
//! # });
//! ```

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::rate;

/// How many consumers share the subscription, point by point.
pub const CONSUMERS: [usize; 4] = [1, 2, 4, 8];

/// Each consumer's prefetch (switchyard) or window (raw).
pub const PREFETCH: usize = 256;

/// The payload sizes and message counts for `n` messages of 1 KiB: `n` of
/// 1 KiB, then a tenth as many (at least 100) of 64 KiB.
#[must_use]
pub fn sizes(n: usize) -> [(usize, usize); 2] {
    [(1024, n), (64 * 1024, (n / 10).max(100))]
}

/// The points of one backend's run: printed as they come, kept as CSV.
#[derive(Debug)]
pub struct Table {
    backend: String,
    raw: String,
    csv: String,
    points: usize,
}

impl Table {
    /// An empty table for `backend`, whose raw client is called `raw`.
    #[must_use]
    pub fn new(backend: &str, raw: &str) -> Self {
        Self {
            backend: backend.to_owned(),
            raw: raw.to_owned(),
            csv: String::from("backend,payload_bytes,consumers,client,msg_per_s\n"),
            points: 0,
        }
    }

    /// Measures one point twice, each client going first once (the first
    /// reader shares the broker with whatever the other's copy still
    /// costs it): each time, `publish` publishes `count` messages, then
    /// `raw` and `sy` consume them, returning their wall times. Records the
    /// mean rates; returns them as `(raw, switchyard)`.
    pub async fn point<P, R, S>(
        &mut self,
        size: usize,
        count: usize,
        consumers: usize,
        mut publish: P,
        mut raw: R,
        mut sy: S,
    ) -> (f64, f64)
    where
        P: AsyncFnMut(),
        R: AsyncFnMut() -> Duration,
        S: AsyncFnMut() -> Duration,
    {
        self.points += 1;
        let odd = self.points % 2 == 1;
        let (mut raw_rate, mut sy_rate) = (0.0, 0.0);
        for raw_first in [odd, !odd] {
            publish().await;
            let (r, s) = if raw_first {
                let r = raw().await;
                (r, sy().await)
            } else {
                let s = sy().await;
                (raw().await, s)
            };
            raw_rate += rate(count, r) / 2.0;
            sy_rate += rate(count, s) / 2.0;
        }
        println!(
            "{size:>6} B, {consumers} consumers, {count} messages: {} {raw_rate:>8.0} msg/s  switchyard {sy_rate:>8.0} msg/s  ratio {:.2}",
            self.raw,
            sy_rate / raw_rate
        );
        for (who, v) in [(self.raw.as_str(), raw_rate), ("switchyard", sy_rate)] {
            let _ = writeln!(self.csv, "{},{size},{consumers},{who},{v:.0}", self.backend);
        }
        (raw_rate, sy_rate)
    }

    /// The CSV so far.
    #[must_use]
    pub fn csv(&self) -> &str {
        &self.csv
    }

    /// Writes `scaling-<name>.csv` to `$SY_BENCH_OUT` (default: the
    /// workspace's `target/bench`, where `scripts/plot_scaling.py` looks,
    /// whatever directory cargo runs the benchmark in); returns its path.
    ///
    /// # Errors
    ///
    /// When the directory or the file cannot be written.
    pub fn write(&self, name: &str) -> std::io::Result<PathBuf> {
        let out = std::env::var("SY_BENCH_OUT")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench").into());
        std::fs::create_dir_all(&out)?;
        let path = PathBuf::from(out).join(format!("scaling-{name}.csv"));
        std::fs::write(&path, &self.csv)?;
        println!("wrote {}", path.display());
        Ok(path)
    }
}

/// What the consumers of one measurement share: how many messages they
/// took, when the first arrived, when the `n`-th was counted, and the
/// signal that ends every loop.
#[derive(Debug, Clone)]
pub struct Tally(Arc<TallyInner>);

#[derive(Debug)]
struct TallyInner {
    n: usize,
    count: AtomicUsize,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Tally {
    /// A tally of `n` messages.
    #[must_use]
    pub fn new(n: usize) -> Self {
        Self(Arc::new(TallyInner {
            n,
            count: AtomicUsize::new(0),
            first: Mutex::new(None),
            last: Mutex::new(None),
            done: tokio::sync::watch::channel(false).0,
        }))
    }

    /// A delivery arrived: the clock starts at the first.
    pub fn started(&self) {
        self.0
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
    }

    /// Counts `k` messages done; `true` when they reach `n` (the clock
    /// stops and [`finished`](Self::finished) resolves).
    pub fn add(&self, k: usize) -> bool {
        let before = self.0.count.fetch_add(k, Ordering::SeqCst);
        if before < self.0.n && before + k >= self.0.n {
            *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.0.done.send_replace(true);
        }
        before + k >= self.0.n
    }

    /// Resolves once `n` messages were counted.
    pub async fn finished(&self) {
        let mut rx = self.0.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// From the first delivery to the `n`-th count, once both happened.
    #[must_use]
    pub fn span(&self) -> Option<Duration> {
        let first = *self.0.first.lock().unwrap_or_else(|p| p.into_inner());
        let last = *self.0.last.lock().unwrap_or_else(|p| p.into_inner());
        Some(last? - first?)
    }

    /// From the first delivery to `end` (a raw client whose last acks go
    /// out after the `n`-th count), once a delivery arrived.
    #[must_use]
    pub fn until(&self, end: Instant) -> Option<Duration> {
        let first = *self.0.first.lock().unwrap_or_else(|p| p.into_inner());
        Some(end - first?)
    }
}
