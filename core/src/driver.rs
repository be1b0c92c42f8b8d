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

/// A receiver's state shared with its background tasks and ackers (behind
/// an `Arc`), which [`ReceiverHandle`] turns into a [`Receiver`] that
/// closes when dropped: the skeleton every backend's receiver has, written
/// once (a helper for backend authors).
///
/// The methods take the `Arc` (`this`), so deliveries can hold on to the
/// receiver.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use switchyard_core::{Result, driver::{RawDelivery, ReceiverCore, ReceiverHandle, SharedReceiver}};
/// use tokio_util::sync::CancellationToken;
///
/// #[derive(Debug)]
/// struct Nothing {
///     core: ReceiverCore<()>,
/// }
///
/// #[async_trait::async_trait]
/// impl SharedReceiver for Nothing {
///     async fn recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
///         let _one = this.core.enter().await?;
///         this.core.until_closed(std::future::pending()).await?
///     }
///     fn try_recv(_: &Arc<Self>) -> Option<Result<RawDelivery>> {
///         None
///     }
///     async fn shutdown(&self) -> Result<()> {
///         self.core.close();
///         Ok(())
///     }
///     fn dropped(&self) {
///         self.core.close();
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use switchyard_core::driver::Receiver;
/// let shared = Arc::new(Nothing { core: ReceiverCore::new(CancellationToken::new(), ()) });
/// let receiver = ReceiverHandle::new(Arc::clone(&shared));
/// receiver.close().await.unwrap();
/// assert!(receiver.recv().await.is_none());
/// drop(receiver);
/// assert!(shared.core.is_closed());
/// # }
/// ```
#[async_trait]
pub trait SharedReceiver: Send + Sync + fmt::Debug + Sized + 'static {
    /// [`Receiver::recv`], with the same rules (cancel safe; `None` once
    /// closed).
    async fn recv(this: &std::sync::Arc<Self>) -> Option<Result<RawDelivery>>;

    /// [`Receiver::try_recv`]: what already arrived, never waiting.
    fn try_recv(this: &std::sync::Arc<Self>) -> Option<Result<RawDelivery>>;

    /// [`Receiver::close`]: stops receiving and hands back what the
    /// receiver holds. Idempotent.
    ///
    /// # Errors
    ///
    /// When the broker fails to close the consumer cleanly.
    async fn shutdown(&self) -> Result<()>;

    /// The receiver was dropped without [`Receiver::close`] (a crashed
    /// consumer): stop receiving now, without waiting; what it held comes
    /// back as the broker returns a crashed consumer's deliveries.
    fn dropped(&self);
}

/// The [`Receiver`] of a backend's [`SharedReceiver`]: closes it when
/// dropped.
#[derive(Debug)]
pub struct ReceiverHandle<T: SharedReceiver>(std::sync::Arc<T>);

impl<T: SharedReceiver> ReceiverHandle<T> {
    /// The receiver of `shared`.
    #[must_use]
    pub fn new(shared: std::sync::Arc<T>) -> Self {
        Self(shared)
    }
}

#[async_trait]
impl<T: SharedReceiver> Receiver for ReceiverHandle<T> {
    async fn recv(&self) -> Option<Result<RawDelivery>> {
        T::recv(&self.0).await
    }

    fn try_recv(&self) -> Option<Result<RawDelivery>> {
        T::try_recv(&self.0)
    }

    async fn close(&self) -> Result<()> {
        self.0.shutdown().await
    }
}

impl<T: SharedReceiver> Drop for ReceiverHandle<T> {
    fn drop(&mut self) {
        self.0.dropped();
    }
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

    /// [`ack`](Acker::ack) without a future, for a backend that settles in
    /// place (its own book, no round trip): `Some` with the result, or
    /// `None` (the default) when the ack must be awaited. Core tries it
    /// first, so a backend's ack need not allocate a future per delivery.
    fn ack_now(&self) -> Option<Result<()>> {
        None
    }

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

/// The life of a broker connection, which every backend keeps the same way:
/// closed once and for good, and the receivers it opened, which close with
/// it (a helper for backend authors).
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use switchyard_core::{Error, driver::Lifecycle};
///
/// let life = Lifecycle::new();
/// assert!(life.check_open().is_ok());
/// let receiver = Arc::new("a receiver's shared state");
/// let stops = life.child_token(); // the receiver stops with the connection
/// life.adopt(&receiver);
/// // `close` marks the connection closed and hands over the live receivers
/// // for the backend to shut down.
/// assert_eq!(life.close().len(), 1);
/// assert!(stops.is_cancelled());
/// assert!(matches!(life.check_open(), Err(Error::Closed)));
/// ```
pub struct Lifecycle<R> {
    closed: tokio_util::sync::CancellationToken,
    receivers: ReceiverSet<R>,
}

impl<R> Lifecycle<R> {
    /// An open connection with no receivers.
    #[must_use]
    pub fn new() -> Self {
        Self {
            closed: tokio_util::sync::CancellationToken::new(),
            receivers: ReceiverSet::new(),
        }
    }

    /// `Err(Error::Closed)` once the connection was closed.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`](crate::Error::Closed) after [`Lifecycle::close`].
    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(crate::Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Whether the connection was closed.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// A token of a receiver's own: cancelled when the receiver closes, and
    /// when the connection does.
    #[must_use]
    pub fn child_token(&self) -> tokio_util::sync::CancellationToken {
        self.closed.child_token()
    }

    /// Remembers an open receiver (weakly), so that closing the connection
    /// closes it.
    pub fn adopt(&self, receiver: &std::sync::Arc<R>) {
        self.receivers.insert(receiver);
    }

    /// Marks the connection closed: new calls fail with `Closed`, and the
    /// receivers' tokens are cancelled; the receivers stay adopted (for
    /// [`Lifecycle::close`] to hand over).
    pub fn cancel(&self) {
        self.closed.cancel();
    }

    /// Marks the connection closed (as [`Lifecycle::cancel`]) and hands
    /// over the receivers still open, which the backend shuts down.
    #[must_use = "the receivers still open are for the caller to shut down"]
    pub fn close(&self) -> Vec<std::sync::Arc<R>> {
        self.closed.cancel();
        self.receivers.take_live()
    }
}

impl<R> Default for Lifecycle<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> fmt::Debug for Lifecycle<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle")
            .field("closed", &self.is_closed())
            .field("receivers", &self.receivers)
            .finish()
    }
}

/// The skeleton every receiver shares (a helper for backend authors): its
/// closing token, and its receive state behind one async lock, so that one
/// receive at a time works on it, `try_recv` never waits for it, a
/// cancelled receive leaves it whole, and every wait ends with the receiver.
///
/// Closing is a one-way switch: after [`ReceiverCore::close`] (or the
/// connection's [`Lifecycle::close`], whose child token the receiver holds),
/// receives end with `None` and settlements fail with
/// [`Error::Closed`](crate::Error::Closed).
///
/// # Examples
///
/// ```
/// use std::{collections::VecDeque, time::Duration};
/// use switchyard_core::driver::ReceiverCore;
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let core = ReceiverCore::new(CancellationToken::new(), VecDeque::from([1, 2]));
/// // A receive: the state for as long as it takes, or `None` once closed.
/// let mut state = core.enter().await.expect("open");
/// assert_eq!(state.pop_front(), Some(1));
/// // Another receive meanwhile does not wait (`try_recv`'s rule).
/// assert!(core.try_enter().is_none());
/// drop(state);
/// core.close();
/// assert!(core.enter().await.is_none());
/// assert!(core.until_closed(std::future::pending::<()>()).await.is_none());
/// assert!(!core.pause(Duration::from_secs(60)).await);
/// # }
/// ```
pub struct ReceiverCore<S> {
    closed: tokio_util::sync::CancellationToken,
    state: tokio::sync::Mutex<S>,
}

impl<S> ReceiverCore<S> {
    /// A receiver that closes with `closed` (usually
    /// [`Lifecycle::child_token`]), with its receive state.
    pub fn new(closed: tokio_util::sync::CancellationToken, state: S) -> Self {
        Self {
            closed,
            state: tokio::sync::Mutex::new(state),
        }
    }

    /// The receiver's closing token (for its background tasks and ackers).
    #[must_use]
    pub fn token(&self) -> &tokio_util::sync::CancellationToken {
        &self.closed
    }

    /// Whether the receiver closed.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Closes the receiver: receives end, waits return.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// `Err(Error::Closed)` once closed: what a settlement after the close
    /// returns.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`](crate::Error::Closed) after the close.
    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(crate::Error::Closed)
        } else {
            Ok(())
        }
    }

    /// The receive state, for one receive: waits for a receive already
    /// holding it; `None` once closed (also while waiting).
    pub async fn enter(&self) -> Option<tokio::sync::MutexGuard<'_, S>> {
        if self.is_closed() {
            return None;
        }
        match self.state.try_lock() {
            Ok(state) => Some(state),
            Err(_) => self.until_closed(self.state.lock()).await,
        }
    }

    /// The receive state without waiting (for `try_recv`): `None` once
    /// closed, or while a receive holds it.
    #[must_use]
    pub fn try_enter(&self) -> Option<tokio::sync::MutexGuard<'_, S>> {
        if self.is_closed() {
            return None;
        }
        self.state.try_lock().ok()
    }

    /// The state for closing: waits at most `bound` for a receive holding
    /// it (a receive ends soon after the close).
    pub async fn enter_to_close(&self, bound: Duration) -> Option<tokio::sync::MutexGuard<'_, S>> {
        tokio::time::timeout(bound, self.state.lock()).await.ok()
    }

    /// The state if no receive holds it (for `Drop`, which cannot wait),
    /// closed or not.
    #[must_use]
    pub fn try_state(&self) -> Option<tokio::sync::MutexGuard<'_, S>> {
        self.state.try_lock().ok()
    }

    /// What `fut` gives, or `None` once the receiver closes first.
    pub async fn until_closed<F: std::future::Future>(&self, fut: F) -> Option<F::Output> {
        self.closed.run_until_cancelled(fut).await
    }

    /// Sleeps for `pause` (between attempts of a failing call); `false`
    /// when the receiver closed first.
    pub async fn pause(&self, pause: Duration) -> bool {
        self.until_closed(tokio::time::sleep(pause)).await.is_some()
    }
}

impl<S> fmt::Debug for ReceiverCore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverCore")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// When to send settlements gathered into one call — acks as one
/// `multiple` `basic.ack`, say — by count and time (a helper for backend
/// authors): at once when `max` are waiting, else `delay` after the first
/// of them. (Where time alone decides, as for Kafka's offset commits, a
/// deadline set by the first settlement is all it takes.)
///
/// It only keeps count and time; the backend keeps what is waiting, and a
/// flusher (its reaper or committer) wakes at [`Coalescer::due`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::driver::{Coalescer, Gathered};
/// use tokio::time::Instant;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let mut acks = Coalescer::new(3, Duration::from_millis(5));
/// let now = Instant::now();
/// // The first sets the deadline the flusher wakes for…
/// assert_eq!(acks.add(1, now), Gathered::First(now + Duration::from_millis(5)));
/// assert_eq!(acks.add(1, now), Gathered::Joined);
/// // …the third fills the batch: send now.
/// assert_eq!(acks.add(1, now), Gathered::Full);
/// assert_eq!(acks.take(), 3);
/// assert_eq!(acks.due(), None);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Coalescer {
    max: usize,
    delay: Duration,
    waiting: usize,
    due: Option<tokio::time::Instant>,
}

/// What [`Coalescer::add`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gathered {
    /// `max` are waiting: send them now (and [`Coalescer::take`]).
    Full,
    /// The first one waiting: send by this instant at the latest (wake the
    /// flusher for it).
    First(tokio::time::Instant),
    /// Joined the ones waiting; the deadline stands.
    Joined,
}

impl Coalescer {
    /// Sends once `max` (at least 1) are waiting, or `delay` after the
    /// first.
    #[must_use]
    pub fn new(max: usize, delay: Duration) -> Self {
        Self {
            max: max.max(1),
            delay,
            waiting: 0,
            due: None,
        }
    }

    /// Records `n` more settlements waiting, at `now`.
    pub fn add(&mut self, n: usize, now: tokio::time::Instant) -> Gathered {
        self.waiting = self.waiting.saturating_add(n);
        if self.waiting >= self.max {
            return Gathered::Full;
        }
        match self.due {
            Some(_) => Gathered::Joined,
            None => {
                let due = now + self.delay;
                self.due = Some(due);
                Gathered::First(due)
            }
        }
    }

    /// When what is waiting must be sent at the latest (`None`: nothing
    /// waits).
    #[must_use]
    pub fn due(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    /// Whether what is waiting must be sent by `now`.
    #[must_use]
    pub fn is_due(&self, now: tokio::time::Instant) -> bool {
        self.waiting >= self.max || self.due.is_some_and(|due| due <= now)
    }

    /// Starts over (what was waiting is being sent); returns how many were.
    pub fn take(&mut self) -> usize {
        self.due = None;
        std::mem::take(&mut self.waiting)
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
