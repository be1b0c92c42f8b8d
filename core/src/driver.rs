//! The backend contract: what a broker backend implements.
//!
//! Applications use [`Client`](crate::Client); backends implement the four
//! small object-safe traits here ([`Publisher`], [`Subscriber`], [`Receiver`],
//! [`Acker`]) and get everything else — validation, dead-lettering, the
//! `max_attempts` rules, redrive, the `Stream` of deliveries — from core,
//! written once for every broker.
//!
//! # Contract
//!
//! Every rule below is checked by `switchyard-conformance`; a backend is done
//! when it passes the whole suite.
//!
//! - Names and header keys reaching a backend are already valid under the
//!   portable rules ([`validate_name`](crate::validate_name)); the backend maps
//!   them onto its broker's narrower rules deterministically and without
//!   collisions.
//! - **Publish is confirmed**: [`Publisher::publish`] returns `Ok` only after
//!   the broker durably accepted the message. [`Publisher::publish_batch`]
//!   pipelines and reports per message, in input order.
//! - **Fidelity**: id, key, every header and the payload round-trip
//!   byte-exact; encoding broker quirks is the backend's job.
//! - [`Receiver::recv`] is cancel safe and respects the prefetch limit: a
//!   receiver never has more than `prefetch` deliveries handed out and not
//!   yet settled.
//! - [`RawDelivery::attempt`] is the broker's durable delivery count (1 on
//!   first delivery), surviving consumer restarts.
//! - A settled delivery ([`Acker::ack`]) is never delivered again to that
//!   subscription. [`Acker::nack`] with a delay is not redelivered before the
//!   delay. A delivery whose acker is dropped unsettled is redelivered after
//!   the ack timeout at the latest.
//! - After [`Receiver::close`], `recv` returns `None` and the receiver's
//!   unsettled deliveries go back to the subscription.
//! - **Leases**: the ack timeout of a delivery runs from when `recv` handed
//!   it out, and [`Acker::extend`] restarts it; a delivery is taken back
//!   only when its holder let the ack timeout pass without extending it, or
//!   is gone. Deliveries a receiver buffered and has not handed out are the
//!   backend's to keep alive (or to not hold at all).
//!
//! # Who retries, who may call concurrently, who bounds time
//!
//! As go-cloud's `driver` packages do, each method's docs say which of
//! these it owes; the rules in general:
//!
//! - **Retries.** Core never retries a backend call, and neither does
//!   [`Client`](crate::Client): a failed call returns its error, and the
//!   caller — the application, or the consumer runtime for receives —
//!   retries when [`Error::is_retryable`](crate::Error::is_retryable) says
//!   so. A backend retries only inside the bound of one call (its native
//!   client reconnecting, an SDK's retry of a throttled request), and marks
//!   every error it returns retryable or not truthfully: a connection lost
//!   or a timeout is retryable; refused credentials, a deleted resource or
//!   bad input is not.
//! - **Concurrency.** [`Publisher`], [`Subscriber`] and [`Broker`] are
//!   called concurrently from any number of tasks (a `Client` is cloned
//!   freely). A [`Receiver`]'s `recv` and `try_recv` are called by one task
//!   at a time (its [`Subscription`](crate::Subscription)), but a `recv`
//!   may be dropped at any await and `close` may come while one is parked.
//!   An [`Acker`] gets at most one settlement (`ack`, `nack`, or the `ack`
//!   after a dead-letter publish), never concurrently with its own
//!   `extend`; ackers of different deliveries are used concurrently.
//! - **Time.** Every call that talks to the broker is bounded by the
//!   backend's configured timeouts (connect, request) and fails with a
//!   retryable error when they pass; no call waits for the broker for
//!   ever. The one wait that is not bounded is `recv` waiting for a message
//!   to arrive — it is cancel safe, and it must still return a retryable
//!   error or resume by itself when the connection is lost, never stall
//!   silently.

pub mod support;

use std::{fmt, time::Duration};

use async_trait::async_trait;

use crate::{Capabilities, Message, SubscribeOptions, error::Result};

/// Publishes messages to topics (backend side).
///
/// Applications call [`Client::publish`](crate::Client::publish), which
/// validates before it calls this.
#[async_trait]
pub trait Publisher: Send + Sync + fmt::Debug {
    /// Publishes one message and waits for the broker's confirmation.
    ///
    /// Creates the topic when the broker needs topics created. Publishing
    /// never requires a subscription to exist. Called concurrently; bounded
    /// by the request timeout; a failure whose outcome is unknown (no
    /// confirm before the connection dropped) is retryable, and the caller's
    /// retry may duplicate the message (consumers de-duplicate by id).
    ///
    /// # Errors
    ///
    /// [`Error::PayloadTooLarge`](crate::Error::PayloadTooLarge) before
    /// sending anything when the encoded message is over the broker's limit;
    /// [`Error::Closed`](crate::Error::Closed) after close; connection and
    /// broker errors otherwise.
    async fn publish(&self, topic: &str, message: Message) -> Result<()>;

    /// Publishes many messages, pipelining confirmations; one result per
    /// message, in input order.
    ///
    /// The default runs [`Publisher::publish`] for all messages concurrently;
    /// backends with a native batch or a windowed pipeline override it.
    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        futures_util::future::join_all(messages.into_iter().map(|m| self.publish(topic, m))).await
    }

    /// Flushes what was accepted and refuses further publishes with
    /// [`Error::Closed`](crate::Error::Closed). Idempotent.
    ///
    /// # Errors
    ///
    /// When the flush fails.
    async fn close(&self) -> Result<()>;
}

/// Creates subscriptions and opens receivers on them (backend side).
#[async_trait]
pub trait Subscriber: Send + Sync + fmt::Debug {
    /// Makes sure `topic` exists, where the broker has topics to create.
    ///
    /// # Errors
    ///
    /// Connection and broker errors.
    async fn ensure_topic(&self, topic: &str) -> Result<()>;

    /// Makes sure the subscription `options.name()` on `topic` exists, so every
    /// message published from now on is kept for it.
    ///
    /// # Errors
    ///
    /// Connection and broker errors.
    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()>;

    /// Opens a consumer on the subscription (creating it when missing).
    ///
    /// # Errors
    ///
    /// Connection and broker errors; [`Error::Closed`](crate::Error::Closed)
    /// after close.
    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>>;

    /// Closes every receiver opened through this handle. Idempotent.
    ///
    /// # Errors
    ///
    /// When the broker connection fails to close cleanly.
    async fn close(&self) -> Result<()>;
}

/// A backend: publisher, subscriber and its capabilities.
pub trait Broker: Publisher + Subscriber {
    /// What the backend can do.
    fn capabilities(&self) -> Capabilities;

    /// The backend itself, for [`Client::backend`](crate::Client::backend)
    /// (the escape hatch to the native client, go-cloud's `As`): a backend
    /// returns `Some(self)`. The default, `None`, keeps a wrapper (a test
    /// double, a decorator) opaque.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// One consumer attached to a subscription (backend side).
#[async_trait]
pub trait Receiver: Send + Sync + fmt::Debug {
    /// The next delivery, waiting for one; `None` once closed.
    ///
    /// Waits as long as no message arrives; while the connection is lost it
    /// returns retryable errors (the caller pauses and calls again) or keeps
    /// waiting and resumes by itself once it is back — never stays silent
    /// with messages waiting on the broker.
    ///
    /// # Cancel safety
    ///
    /// Must be cancel safe: dropping the future before it completes loses no
    /// delivery.
    async fn recv(&self) -> Option<Result<RawDelivery>>;

    /// A delivery that is already available, without waiting; `None` when
    /// there is none right now (or the backend does not say). The hot path of
    /// [`Subscription`](crate::Subscription): it saves a boxed future per
    /// message. Must not block, and must respect prefetch like `recv`.
    fn try_recv(&self) -> Option<Result<RawDelivery>> {
        None
    }

    /// Stops fetching; deliveries this receiver handed out and that are not
    /// settled go back to the subscription; a pending `recv` returns `None`.
    /// Idempotent.
    ///
    /// # Errors
    ///
    /// When the broker fails to close the consumer cleanly.
    async fn close(&self) -> Result<()>;
}

/// Settles one delivery (backend side). Called at most once per delivery by
/// core; ackers of different deliveries are called concurrently. Every
/// method is bounded by the request timeout.
#[async_trait]
pub trait Acker: Send + Sync + fmt::Debug {
    /// Settles the delivery for good.
    ///
    /// Where the broker confirms acks (SQS `DeleteMessage`), `Ok` means it
    /// recorded it. Where the protocol does not (AMQP `basic.ack`, a NATS
    /// `+ACK`), `Ok` means the backend took the ack: it is sent within
    /// milliseconds (a backend may coalesce several, as AMQP's `multiple`
    /// flag allows) and always before the receiver closes; an ack lost with
    /// the connection or a crash shows up as a redelivery (at-least-once),
    /// never as loss.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`](crate::Error::Closed) when the receiver was closed;
    /// connection and broker errors.
    async fn ack(&self) -> Result<()>;

    /// Returns the delivery for redelivery with attempt + 1, not before
    /// `delay` where one is given.
    ///
    /// # Errors
    ///
    /// As for [`Acker::ack`].
    async fn nack(&self, delay: Option<Duration>) -> Result<()>;

    /// Keeps the delivery's lease: restarts its ack timeout, so the broker
    /// does not take it back for another ack timeout from now (NATS
    /// progress ack, SQS `ChangeMessageVisibility`, the backend's own
    /// deadline elsewhere). Called any number of times before the
    /// delivery is settled; the consumer runtime calls it every third of
    /// the ack timeout for every delivery it holds.
    ///
    /// A delivery whose ack timeout already passed is not revived: the
    /// broker redelivers it, and `Ok` may still be returned where the broker
    /// does not say (settling it later is then a no-op, as for a late ack).
    ///
    /// # Errors
    ///
    /// [`Error::Closed`](crate::Error::Closed) when the receiver was closed;
    /// connection and broker errors (retryable: the next extension may
    /// succeed).
    async fn extend(&self) -> Result<()>;
}

/// A message as a backend receives it, before core wraps it into a
/// [`Delivery`](crate::Delivery).
pub struct RawDelivery {
    /// The message.
    pub message: Message,
    /// The broker's delivery count: 1 on first delivery.
    pub attempt: u32,
    /// Settles this delivery.
    pub acker: Box<dyn Acker>,
}

impl fmt::Debug for RawDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawDelivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Weak handles on the receivers a connection opened, so closing the
/// connection can close them (a helper for backend authors).
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use switchyard_core::driver::ReceiverSet;
/// let set = ReceiverSet::new();
/// let r = Arc::new(7);
/// set.insert(&r);
/// assert_eq!(set.take_live().len(), 1);
/// assert!(set.take_live().is_empty());
/// ```
pub struct ReceiverSet<T> {
    inner: std::sync::Mutex<Vec<std::sync::Weak<T>>>,
}

impl<T> ReceiverSet<T> {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self {
            inner: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Remembers `receiver` (weakly), forgetting receivers already dropped.
    pub fn insert(&self, receiver: &std::sync::Arc<T>) {
        let mut v = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(std::sync::Arc::downgrade(receiver));
    }

    /// Takes every receiver still alive, emptying the set.
    #[must_use]
    pub fn take_live(&self) -> Vec<std::sync::Arc<T>> {
        let v = std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()));
        v.iter().filter_map(std::sync::Weak::upgrade).collect()
    }
}

impl<T> Default for ReceiverSet<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for ReceiverSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.inner.lock().map(|v| v.len()).unwrap_or(0);
        f.debug_struct("ReceiverSet").field("len", &n).finish()
    }
}

/// What a receiver handed out and has not seen settled, so that `close` can
/// hand it back at once (a helper for backend authors whose broker returns
/// unsettled deliveries only after the ack timeout, e.g. by their NATS reply
/// subject or SQS receipt handle).
///
/// # Examples
///
/// ```
/// use switchyard_core::driver::Outstanding;
/// let out = Outstanding::new();
/// let a = out.insert("receipt-a");
/// let _b = out.insert("receipt-b");
/// assert_eq!(out.settle(a), Some("receipt-a"));
/// assert_eq!(out.take_all(), vec!["receipt-b"]);
/// assert!(out.take_all().is_empty());
/// ```
pub struct Outstanding<T> {
    inner: std::sync::Mutex<OutstandingInner<T>>,
}

struct OutstandingInner<T> {
    next: u64,
    held: std::collections::HashMap<u64, T>,
}

impl<T> Outstanding<T> {
    /// Nothing outstanding.
    #[must_use]
    pub fn new() -> Self {
        Self {
            inner: std::sync::Mutex::new(OutstandingInner {
                next: 0,
                held: std::collections::HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutstandingInner<T>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a delivery handed out; the ticket settles it.
    pub fn insert(&self, handle: T) -> u64 {
        let mut inner = self.lock();
        let ticket = inner.next;
        inner.next += 1;
        inner.held.insert(ticket, handle);
        ticket
    }

    /// Forgets a settled delivery; `None` when it was already taken.
    pub fn settle(&self, ticket: u64) -> Option<T> {
        self.lock().held.remove(&ticket)
    }

    /// Changes one entry in place; `None` when it was already taken.
    ///
    /// ```
    /// use switchyard_core::driver::Outstanding;
    /// let out = Outstanding::new();
    /// let a = out.insert(1);
    /// assert_eq!(out.update(a, |n| { *n += 1; *n }), Some(2));
    /// out.settle(a);
    /// assert_eq!(out.update(a, |n| *n), None);
    /// ```
    pub fn update<R>(&self, ticket: u64, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        self.lock().held.get_mut(&ticket).map(f)
    }

    /// What `f` picks from the entries, with their tickets, in no order
    /// (e.g. the leases that need renewing).
    pub fn select<R>(&self, mut f: impl FnMut(u64, &T) -> Option<R>) -> Vec<R> {
        self.lock()
            .held
            .iter()
            .filter_map(|(t, h)| f(*t, h))
            .collect()
    }

    /// Takes everything still outstanding (at close), oldest first.
    pub fn take_all(&self) -> Vec<T> {
        let mut held: Vec<(u64, T)> = self.lock().held.drain().collect();
        held.sort_unstable_by_key(|(ticket, _)| *ticket);
        held.into_iter().map(|(_, h)| h).collect()
    }

    /// How many deliveries are outstanding.
    pub fn len(&self) -> usize {
        self.lock().held.len()
    }

    /// Whether nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Default for Outstanding<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Outstanding<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outstanding")
            .field("len", &self.len())
            .finish()
    }
}

/// Crash-loop isolation for receivers on brokers that count every return
/// ([`Capabilities::returns_count_attempts`](crate::Capabilities)): a
/// receiver asks its broker for one delivery at a time from when it starts
/// until it hands out a first delivery (attempt 1), and only then for its
/// whole prefetch.
///
/// A consumer process that crashes on a message hands back everything it
/// held, and each return counts an attempt; restarted, it is given the
/// same head of the queue again. Taken one at a time, the redelivered head
/// is the only delivery a crash can cost an attempt: the message that
/// crashes its consumer reaches `max_attempts` and is dead-lettered alone,
/// instead of taking the deliveries prefetched with it along. The price is
/// that after a restart the redeliveries at the head (at most what the
/// stopped consumer held) are handled one by one.
///
/// # Examples
///
/// ```
/// use switchyard_core::driver::SlowStart;
/// let start = SlowStart::new();
/// assert_eq!(start.allowance(64), 1);
/// start.handed_out(3); // a redelivery: maybe what crashed the last consumer
/// assert_eq!(start.allowance(64), 1);
/// start.handed_out(1); // a first delivery: the head is behind us
/// assert_eq!(start.allowance(64), 64);
/// ```
#[derive(Debug, Default)]
pub struct SlowStart {
    open: std::sync::atomic::AtomicBool,
    opened: tokio::sync::Notify,
}

impl SlowStart {
    /// A receiver that just started: one delivery at a time.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a delivery handed out with this attempt number.
    pub fn handed_out(&self, attempt: u32) {
        if attempt <= 1 {
            self.open();
        }
    }

    /// Opens without a first delivery: the receiver found its queue empty,
    /// so nothing redelivered waits at its head.
    pub fn open(&self) {
        if !self.open.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.opened.notify_waiters();
        }
    }

    /// Completes once the receiver is open (at once if it is).
    pub async fn opened(&self) {
        let notified = self.opened.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_open() {
            return;
        }
        notified.await;
    }

    /// Whether the receiver may hold its whole prefetch.
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many deliveries the receiver may hold now (ask the broker for,
    /// counting those it holds): `prefetch` once open, else 1.
    #[must_use]
    pub fn allowance(&self, prefetch: usize) -> usize {
        if self.is_open() { prefetch } else { 1 }
    }
}

/// When to report a streak of transient failures in a retry loop: the
/// first failure of a streak, then at most one every
/// [`FailureStreak::EVERY`], so a loop that retries is never silent and
/// never floods the log.
///
/// ```
/// use switchyard_core::driver::FailureStreak;
/// let mut streak = FailureStreak::default();
/// assert!(streak.failed()); // the first: report it
/// assert!(!streak.failed()); // the same streak, too soon
/// streak.recovered();
/// assert!(streak.failed()); // a new streak
/// ```
#[derive(Debug, Default)]
pub struct FailureStreak {
    reported: Option<tokio::time::Instant>,
}

impl FailureStreak {
    /// The least time between two reports of one streak.
    pub const EVERY: Duration = Duration::from_secs(30);

    /// Records a failure; `true` when it should be reported.
    pub fn failed(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let report = self.reported.is_none_or(|at| now >= at + Self::EVERY);
        if report {
            self.reported = Some(now);
        }
        report
    }

    /// Ends the streak (a success).
    pub fn recovered(&mut self) {
        self.reported = None;
    }
}
