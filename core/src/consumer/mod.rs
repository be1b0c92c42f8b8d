//! The consumer runtime: run a handler per delivery with bounded concurrency,
//! optional per-key serialisation, retries with backoff through the broker,
//! dead letters, and graceful shutdown.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::Duration,
};

use futures_util::FutureExt;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::{BoxError, Delivery, Message, Retry, Subscription, error::Result};

mod dedup;
pub use dedup::{Claim, Dedup, DedupStore, MemoryDedupStore};

/// Why a handler failed, which decides what happens to the message.
#[derive(Debug)]
pub enum HandlerError {
    /// Worth retrying: the message is nacked with the next backoff delay,
    /// and dead-lettered once its attempts are used up.
    Transient(BoxError),
    /// Never going to work: the message is dead-lettered at once.
    Permanent(BoxError),
}

impl HandlerError {
    /// A transient failure.
    pub fn transient(e: impl Into<BoxError>) -> Self {
        HandlerError::Transient(e.into())
    }

    /// A permanent failure.
    pub fn permanent(e: impl Into<BoxError>) -> Self {
        HandlerError::Permanent(e.into())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Transient(e) => write!(f, "transient: {e}"),
            HandlerError::Permanent(e) => write!(f, "permanent: {e}"),
        }
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandlerError::Transient(e) | HandlerError::Permanent(e) => {
                Some(e.as_ref() as &(dyn std::error::Error + 'static))
            }
        }
    }
}

/// A switchyard error inside a handler (a follow-up publish that failed,
/// say) is transient, so `?` works there: it says something about the
/// broker or the client, not that the message can never be handled, and a
/// healthy message must not be dead-lettered at once for it. Use
/// [`HandlerError::permanent`] for what the message itself makes hopeless.
///
/// ```
/// use switchyard_core::{Client, Message, consumer::HandlerError};
///
/// async fn handle(client: &Client, order: &Message) -> Result<(), HandlerError> {
///     client.publish("orders.billed", Message::new(order.payload().clone())).await?;
///     Ok(())
/// }
///
/// let e: HandlerError = switchyard_core::Error::Closed.into();
/// assert!(matches!(e, HandlerError::Transient(_)));
/// assert!(std::error::Error::source(&e).is_some());
/// ```
impl From<crate::Error> for HandlerError {
    fn from(e: crate::Error) -> Self {
        HandlerError::Transient(Box::new(e))
    }
}

/// What a handler sees of a delivery.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    /// The message.
    pub message: Message,
    /// The delivery attempt (1 on first delivery).
    pub attempt: u32,
    /// The subscription's attempt limit.
    pub max_attempts: u32,
    /// The topic.
    pub topic: String,
    /// The subscription.
    pub subscription: String,
}

/// Exponential backoff with jitter for transient failures: attempt `n`
/// waits `min(max, initial × multiplier^(n-1))`, scaled by a random factor
/// in `[1 - jitter, 1 + jitter]` (and never above `max`).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::consumer::Backoff;
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).with_jitter(0.0);
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(3), Duration::from_millis(400));
/// assert_eq!(b.delay(30), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
}

impl Default for Backoff {
    /// 1 s doubling up to 5 min, ±20 % jitter.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl Backoff {
    /// Doubling from `initial` up to `max`, ±20 % jitter.
    #[must_use]
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    /// Growth per attempt (default 2).
    #[must_use]
    pub fn with_multiplier(mut self, m: f64) -> Self {
        self.multiplier = m.max(1.0);
        self
    }

    /// Relative jitter, 0 to 1 (default 0.2).
    #[must_use]
    pub fn with_jitter(mut self, j: f64) -> Self {
        self.jitter = j.clamp(0.0, 1.0);
        self
    }

    /// The delay before retrying after failed attempt `attempt` (1-based).
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        let capped = base.min(self.max.as_secs_f64());
        let factor = if self.jitter > 0.0 {
            1.0 + self.jitter * (2.0 * unit_random() - 1.0)
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * factor).clamp(0.0, self.max.as_secs_f64()))
    }
}

/// A random number in `[0, 1)` from the UUIDv7 generator's randomness.
fn unit_random() -> f64 {
    let bits = uuid::Uuid::now_v7().as_u128() as u64;
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Deliveries received.
    pub received: u64,
    /// Acked after the handler succeeded.
    pub acked: u64,
    /// Nacked for a retry.
    pub retried: u64,
    /// Dead-lettered (permanent failure or attempts used up).
    pub dead_lettered: u64,
    /// Handler panics (counted as transient failures too).
    pub panicked: u64,
    /// Settlements that failed (the broker will redeliver).
    pub settle_errors: u64,
    /// Left unsettled at shutdown (the broker will redeliver).
    pub abandoned: u64,
}

/// Runs a handler for each delivery of a subscription.
///
/// - at most [`concurrency`](Consumer::with_concurrency) handlers run at once;
/// - with [`per_key`](Consumer::with_per_key), messages with the same key are
///   handled one at a time, in arrival order, while other keys run in
///   parallel;
/// - `Ok` acks; a transient error (or a panic) nacks with the next
///   [`Backoff`] delay, held by the broker, until the subscription's
///   `max_attempts`, then dead-letters with the last error as the reason; a
///   permanent error dead-letters at once;
/// - **leases**: it keeps the lease of every delivery it holds — running in
///   a handler, or queued behind its key or the concurrency limit — by
///   extending it every third of the ack timeout
///   ([`Delivery::extend`]), so a handler may run longer than the ack
///   timeout and a busy key never makes the broker take back (and count an
///   attempt for) what waits behind it; it holds at most the subscription's
///   prefetch;
/// - when `shutdown` completes it stops fetching, lets running handlers finish
///   within the [`shutdown_timeout`](Consumer::with_shutdown_timeout) and settles
///   them, and closes the subscription, which hands the rest back unsettled
///   at once (queued, prefetched, or still running at the deadline), so
///   another consumer gets them next — nothing is dead-lettered because of
///   shutdown. Where the broker counts every return
///   ([`Capabilities::returns_count_attempts`](crate::Capabilities)), each
///   delivery handed back costs one attempt, bounded by the prefetch.
///
/// # Examples
///
/// ```
/// use switchyard_core::{Client, SubscribeOptions};
/// use switchyard_core::consumer::{Consumer, HandlerError};
///
/// async fn serve(client: Client, stop: tokio::sync::oneshot::Receiver<()>) -> switchyard_core::Result<()> {
///     let sub = client.subscribe("orders", SubscribeOptions::new("billing")).await?;
///     let report = Consumer::new()
///         .with_concurrency(16)
///         .with_per_key(true)
///         .run(sub, |ctx| async move {
///             if ctx.message.payload().is_empty() {
///                 return Err(HandlerError::permanent("empty order"));
///             }
///             Ok(())
///         }, async { let _ = stop.await; })
///         .await?;
///     println!("{report:?}");
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Consumer {
    concurrency: usize,
    per_key: bool,
    backoff: Backoff,
    shutdown_timeout: Duration,
}

impl Default for Consumer {
    fn default() -> Self {
        Self::new()
    }
}

struct Done {
    key: Option<String>,
    report: Report,
}

impl Consumer {
    /// 8 handlers at once, no per-key serialisation, [`Backoff::default`],
    /// 30 s to finish at shutdown.
    #[must_use]
    pub fn new() -> Self {
        Self {
            concurrency: 8,
            per_key: false,
            backoff: Backoff::default(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    /// Handlers running at once (default 8, at least 1).
    #[must_use]
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Handle messages with the same key one at a time, in order (default off).
    #[must_use]
    pub fn with_per_key(mut self, yes: bool) -> Self {
        self.per_key = yes;
        self
    }

    /// Retry delays for transient failures (default [`Backoff::default`]).
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long running handlers may finish after shutdown (default 30 s).
    #[must_use]
    pub fn with_shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// Runs until `shutdown` completes or the subscription ends.
    ///
    /// # Errors
    ///
    /// The subscription's receive errors other than transient ones (which
    /// are retried after a short pause and logged at `warn`), e.g.
    /// [`Error::NotFound`](crate::Error::NotFound) when the subscription's
    /// queue, stream or topic was deleted under it; else an error closing
    /// the subscription.
    ///
    /// # Cancel safety
    ///
    /// Not graceful: dropping the future aborts running handlers, and their
    /// deliveries and everything prefetched go back to the subscription
    /// (when the dropped subscription hands them back, or after the ack
    /// timeout), to be delivered again. Pass a `shutdown` future instead to
    /// let handlers finish.
    pub async fn run<H, F>(
        self,
        mut sub: Subscription,
        handler: H,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Report>
    where
        H: Fn(HandlerContext) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let mut tasks: JoinSet<Done> = JoinSet::new();
        // Received, not started: waiting for a free handler slot, in arrival
        // order (with the key they hold, under `per_key`).
        let mut ready: VecDeque<(Delivery, Option<String>)> = VecDeque::new();
        // Deliveries waiting for their key to be free, by key. A key is busy
        // while it has an entry here (its delivery runs or waits in `ready`).
        let mut waiting: HashMap<String, VecDeque<Delivery>> = HashMap::new();
        let mut report = Report::default();
        let mut result = Ok(());
        let mut failing = crate::driver::FailureStreak::default();
        // The runtime holds at most the subscription's prefetch (the backend
        // bounds it too) and keeps the lease of every delivery it holds.
        let prefetch = sub.prefetch();
        let every = sub.lease_interval();
        let mut leases = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);

        loop {
            while tasks.len() < self.concurrency
                && let Some((delivery, key)) = ready.pop_front()
            {
                self.spawn(&mut tasks, &handler, delivery, key);
            }
            let queued = ready.len() + waiting.values().map(VecDeque::len).sum::<usize>();
            let room = tasks.len() + queued < prefetch;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Some(key) = self.finish(done, &mut report)
                        && let Some(next) = pop_waiting(&mut waiting, &key)
                    {
                        ready.push_back((next, Some(key)));
                    }
                }
                _ = leases.tick(), if queued > 0 => {
                    // Queued deliveries keep their lease: the broker must not
                    // take back (and count an attempt for) what waits here.
                    let held = ready.iter().map(|(d, _)| d).chain(waiting.values().flatten());
                    extend_all(held).await;
                }
                got = sub.recv(), if room => match got {
                    Ok(delivery) => {
                        failing.recovered();
                        report.received += 1;
                        match self.key_of(&delivery) {
                            // The key is busy: wait for its handler to finish.
                            Some(k) => match waiting.entry(k) {
                                Entry::Occupied(mut q) => q.get_mut().push_back(delivery),
                                Entry::Vacant(v) => {
                                    let key = v.key().clone();
                                    v.insert(VecDeque::new());
                                    ready.push_back((delivery, Some(key)));
                                }
                            },
                            None => ready.push_back((delivery, None)),
                        }
                    }
                    Err(crate::Error::Closed) => break,
                    Err(e) if e.is_retryable() => {
                        // Transient (a reconnect under way): try again, never
                        // silently.
                        if failing.failed() {
                            tracing::warn!(
                                topic = sub.topic(),
                                subscription = sub.name(),
                                error = %e,
                                "receiving failed; retrying"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }

        // Shutdown: stop fetching; queued deliveries go back unsettled.
        report.abandoned +=
            (ready.len() + waiting.values().map(VecDeque::len).sum::<usize>()) as u64;
        ready.clear();
        waiting.clear();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        while !tasks.is_empty() {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(done)) => {
                    self.finish(done, &mut report);
                }
                Ok(None) => break,
                Err(_) => {
                    // Still running at the deadline: abandon unsettled.
                    report.abandoned += tasks.len() as u64;
                    tasks.shutdown().await;
                }
            }
        }
        // A receive error that ended the run is what the caller needs to
        // see; a close failing after it (its resource gone) says less.
        let closed = sub.close().await;
        result?;
        closed.map(|()| report)
    }

    fn key_of(&self, d: &Delivery) -> Option<String> {
        if self.per_key {
            d.message().key().map(str::to_owned)
        } else {
            None
        }
    }

    fn finish(
        &self,
        done: std::result::Result<Done, tokio::task::JoinError>,
        report: &mut Report,
    ) -> Option<String> {
        match done {
            Ok(done) => {
                add(report, &done.report);
                done.key
            }
            // Aborted at shutdown; a panic is caught inside the task.
            Err(_) => None,
        }
    }

    fn spawn<H, F>(
        &self,
        tasks: &mut JoinSet<Done>,
        handler: &Arc<H>,
        delivery: Delivery,
        key: Option<String>,
    ) where
        H: Fn(HandlerContext) -> F + Send + Sync + 'static,
        F: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::clone(handler);
        let backoff = self.backoff;
        tasks.spawn(async move {
            let mut report = Report::default();
            let ctx = HandlerContext {
                message: delivery.message().clone(),
                attempt: delivery.attempt(),
                max_attempts: delivery.max_attempts(),
                topic: delivery.topic().to_owned(),
                subscription: delivery.subscription().to_owned(),
            };
            // One span per delivery, with OpenTelemetry's messaging attribute
            // names, around the handler and the settlement.
            let span = tracing::info_span!(
                "process",
                otel.kind = "consumer",
                messaging.operation = "process",
                messaging.destination.name = %ctx.topic,
                messaging.consumer.group.name = %ctx.subscription,
                messaging.message.id = %ctx.message.id(),
                messaging.delivery.attempt = ctx.attempt,
                outcome = tracing::field::Empty,
            );
            crate::telemetry::set_parent(&span, &ctx.message);
            crate::telemetry::received(&ctx.topic, &ctx.subscription);
            let started = std::time::Instant::now();
            let work = AssertUnwindSafe(handler(ctx).instrument(span.clone())).catch_unwind();
            let outcome = match leased(&delivery, work).await {
                Ok(r) => r,
                Err(panic) => {
                    report.panicked += 1;
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "handler panicked".into());
                    Err(HandlerError::transient(format!("handler panicked: {what}")))
                }
            };
            let handler_time = started.elapsed();
            // Settling consumes the delivery; keep what the metrics need
            // (nothing without the `metrics` feature).
            let labels = crate::telemetry::Labels::of(&delivery);
            let attempt = delivery.attempt();
            let (outcome, settled) = match outcome {
                Ok(()) => {
                    report.acked += 1;
                    ("acked", delivery.ack().await)
                }
                Err(HandlerError::Permanent(e)) => {
                    report.dead_lettered += 1;
                    let reason = format!("permanent failure: {e}");
                    ("dead-lettered", delivery.dead_letter(reason).await)
                }
                // `nack` would dead-letter too; this keeps the error as reason.
                Err(HandlerError::Transient(e)) if delivery.is_last_attempt() => {
                    report.dead_lettered += 1;
                    let reason = format!(
                        "max attempts ({}) exhausted; last error: {e}",
                        delivery.max_attempts()
                    );
                    ("dead-lettered", delivery.dead_letter(reason).await)
                }
                Err(HandlerError::Transient(_)) => {
                    report.retried += 1;
                    let retry = Retry::after(backoff.delay(attempt));
                    ("retried", delivery.nack(retry).await)
                }
            };
            span.record("outcome", outcome);
            crate::telemetry::settled(&labels, outcome, handler_time);
            if let Err(e) = &settled {
                report.settle_errors += 1;
                tracing::warn!(parent: &span, error = %e, "settling the delivery failed; it will be redelivered");
            }
            Done { key, report }
        });
    }
}

/// Runs `work` while keeping `delivery`'s lease (every
/// [`lease_interval`](Delivery::lease_interval)), so a handler may run longer
/// than the ack timeout without the broker taking the delivery back.
async fn leased<F: Future>(delivery: &Delivery, work: F) -> F::Output {
    let every = delivery.lease_interval();
    let keep = async {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            extend_all(std::iter::once(delivery)).await;
        }
    };
    tokio::select! {
        biased;
        out = work => out,
        () = keep => unreachable!("the lease loop never ends"),
    }
}

/// Extends the leases of `held`, all at once; a failure is logged (the next
/// round tries again; past the ack timeout the broker redelivers).
async fn extend_all<'a>(held: impl Iterator<Item = &'a Delivery>) {
    let results =
        futures_util::future::join_all(held.map(|d| async move { (d.extend().await, d) })).await;
    for (r, d) in results {
        if let Err(e) = r {
            tracing::debug!(error = %e, id = %d.message().id(), "extending a delivery's lease failed");
        }
    }
}

fn pop_waiting(waiting: &mut HashMap<String, VecDeque<Delivery>>, key: &str) -> Option<Delivery> {
    let queue = waiting.get_mut(key)?;
    match queue.pop_front() {
        Some(d) => Some(d),
        None => {
            // The key is free again.
            waiting.remove(key);
            None
        }
    }
}

fn add(total: &mut Report, r: &Report) {
    total.received += r.received;
    total.acked += r.acked;
    total.retried += r.retried;
    total.dead_lettered += r.dead_lettered;
    total.panicked += r.panicked;
    total.settle_errors += r.settle_errors;
    total.abandoned += r.abandoned;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 1..20 {
            let d = b.delay(attempt);
            assert!(d <= Duration::from_secs(1), "{d:?}");
        }
        let d = b.delay(1).as_secs_f64();
        assert!((0.08..=0.12).contains(&d), "{d}");
        let flat = b.with_jitter(0.0);
        assert_eq!(flat.delay(2), Duration::from_millis(200));
        assert_eq!(flat.delay(10), Duration::from_secs(1));
    }
}
