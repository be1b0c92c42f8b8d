//! The broker, its connections, receivers and ackers.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use switchyard_core::{
    Capabilities, Client, Error, KeyOrdering, Message, Result, SubscribeOptions,
    driver::{Acker, Broker, Publisher, RawDelivery, Receiver, ReceiverSet, Subscriber},
};
use tokio_util::sync::CancellationToken;

use crate::queue::{SharedQueue, Take};

/// Default payload limit: 1 MiB (SQS's, the smallest of the brokers).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Deliveries a receiver takes from the queue at once (within its prefetch).
const TAKE_BATCH: usize = 64;

#[derive(Debug, Default)]
struct Topic {
    subscriptions: HashMap<String, SharedQueue>,
}

#[derive(Debug)]
struct Core {
    max_payload: usize,
    topics: Mutex<HashMap<String, Topic>>,
    consumer_ids: AtomicU64,
}

impl Core {
    fn topics(&self) -> std::sync::MutexGuard<'_, HashMap<String, Topic>> {
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queues(&self, topic: &str) -> Vec<SharedQueue> {
        self.topics()
            .get(topic)
            .map(|t| t.subscriptions.values().cloned().collect())
            .unwrap_or_default()
    }

    fn queue(&self, topic: &str, subscription: &str) -> SharedQueue {
        let mut topics = self.topics();
        let t = topics.entry(topic.to_owned()).or_default();
        Arc::clone(t.subscriptions.entry(subscription.to_owned()).or_default())
    }
}

/// An in-process broker. Cheap to clone; clones are the same broker.
///
/// # Examples
///
/// ```
/// use switchyard_memory::MemoryBroker;
/// let broker = MemoryBroker::builder().with_max_payload(64 * 1024).build();
/// let client = broker.client();
/// assert_eq!(client.capabilities().max_payload, 64 * 1024);
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBroker {
    core: Arc<Core>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A new, empty broker with the default 1 MiB payload limit.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Configures a broker.
    #[must_use]
    pub fn builder() -> MemoryBuilder {
        MemoryBuilder {
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }

    /// The process-wide broker called `name`, created on first use. Every
    /// `memory://NAME` URL refers to it.
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self::named_with(name, DEFAULT_MAX_PAYLOAD)
    }

    fn named_with(name: &str, max_payload: usize) -> Self {
        static REGISTRY: OnceLock<Mutex<HashMap<String, MemoryBroker>>> = OnceLock::new();
        let mut registry = REGISTRY
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        registry
            .entry(name.to_owned())
            .or_insert_with(|| Self::builder().with_max_payload(max_payload).build())
            .clone()
    }

    /// A new connection to this broker.
    #[must_use]
    pub fn connect(&self) -> MemoryConnection {
        MemoryConnection {
            core: Arc::clone(&self.core),
            conn: Arc::new(ConnState {
                closed: CancellationToken::new(),
                receivers: ReceiverSet::new(),
            }),
        }
    }

    /// A [`Client`] on a new connection to this broker.
    #[must_use]
    pub fn client(&self) -> Client {
        Client::new(self.connect())
    }

    /// Deletes the subscription `subscription` of `topic` with everything
    /// in it, as an operator deletes a queue on a real broker: its live
    /// consumers' receives return [`Error::NotFound`] from then on, and
    /// messages published meanwhile are not kept for it (ensuring it again
    /// creates a new, empty one). Returns whether it existed.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo() -> switchyard_core::Result<()> {
    /// use switchyard_core::SubscribeOptions;
    /// use switchyard_memory::MemoryBroker;
    ///
    /// let broker = MemoryBroker::new();
    /// let client = broker.client();
    /// let mut sub = client.subscribe("orders", SubscribeOptions::new("billing")).await?;
    /// assert!(broker.delete_subscription("orders", "billing"));
    /// assert!(sub.recv().await.unwrap_err().is_not_found());
    /// # Ok(()) }
    /// ```
    pub fn delete_subscription(&self, topic: &str, subscription: &str) -> bool {
        let removed = self
            .core
            .topics()
            .get_mut(topic)
            .and_then(|t| t.subscriptions.remove(subscription));
        removed.map(|q| q.delete()).is_some()
    }
}

/// Builder for [`MemoryBroker`].
#[derive(Debug, Clone)]
pub struct MemoryBuilder {
    max_payload: usize,
}

impl MemoryBuilder {
    /// Largest accepted payload in bytes (default 1 MiB).
    #[must_use]
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Builds the broker.
    #[must_use]
    pub fn build(self) -> MemoryBroker {
        MemoryBroker {
            core: Arc::new(Core {
                max_payload: self.max_payload,
                topics: Mutex::new(HashMap::new()),
                consumer_ids: AtomicU64::new(1),
            }),
        }
    }
}

/// Opens a client from a `memory://[NAME][?max_payload=BYTES]` URL: the
/// process-wide broker `NAME` (`default` when empty).
///
/// # Errors
///
/// [`Error::InvalidUrl`] when the URL is not a `memory://` URL or has an
/// unknown or malformed parameter.
///
/// # Examples
///
/// ```
/// let client = switchyard_memory::connect("memory://tests").unwrap();
/// assert_eq!(client.capabilities().backend, "memory");
/// ```
pub fn connect(url: &str) -> Result<Client> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: switchyard_core::redact_url(url),
        reason,
    };
    let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if parsed.scheme() != "memory" {
        return Err(invalid(format!(
            "expected memory://, got {}://",
            parsed.scheme()
        )));
    }
    let name = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .unwrap_or("default");
    let mut max_payload = None;
    for (k, v) in parsed.query_pairs() {
        match &*k {
            "max_payload" => {
                max_payload = Some(v.parse::<usize>().map_err(|_| {
                    invalid(format!("max_payload must be a byte count, got {v:?}"))
                })?);
            }
            other => {
                return Err(invalid(format!(
                    "unknown parameter {other:?} (known: max_payload)"
                )));
            }
        }
    }
    let broker = MemoryBroker::named_with(name, max_payload.unwrap_or(DEFAULT_MAX_PAYLOAD));
    if let Some(limit) = max_payload
        && broker.core.max_payload != limit
    {
        return Err(invalid(format!(
            "memory broker {name:?} already exists with max_payload={}",
            broker.core.max_payload
        )));
    }
    Ok(broker.client())
}

#[derive(Debug)]
struct ConnState {
    closed: CancellationToken,
    receivers: ReceiverSet<ReceiverShared>,
}

/// One connection to a [`MemoryBroker`]; implements the backend traits.
/// Closing it closes its receivers, not the broker.
#[derive(Clone, Debug)]
pub struct MemoryConnection {
    core: Arc<Core>,
    conn: Arc<ConnState>,
}

impl MemoryConnection {
    fn check_open(&self) -> Result<()> {
        if self.conn.closed.is_cancelled() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn check_size(&self, message: &Message) -> Result<()> {
        let size = message.payload().len();
        if size > self.core.max_payload {
            return Err(Error::PayloadTooLarge {
                size,
                limit: self.core.max_payload,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for MemoryConnection {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.check_open()?;
        self.check_size(&message)?;
        let queues = self.core.queues(topic);
        if let Some((last, rest)) = queues.split_last() {
            for q in rest {
                q.push(message.clone());
            }
            last.push(message);
        }
        Ok(())
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        if self.check_open().is_err() {
            return messages.iter().map(|_| Err(Error::Closed)).collect();
        }
        let results: Vec<Result<()>> = messages.iter().map(|m| self.check_size(m)).collect();
        let queues = self.core.queues(topic);
        for q in &queues {
            q.push_many(
                messages
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| r.is_ok())
                    .map(|(m, _)| m.clone()),
            );
        }
        results
    }

    async fn close(&self) -> Result<()> {
        self.conn.closed.cancel();
        Ok(())
    }
}

#[async_trait]
impl Subscriber for MemoryConnection {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        self.core.topics().entry(topic.to_owned()).or_default();
        Ok(())
    }

    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open()?;
        self.core.queue(topic, options.name());
        Ok(())
    }

    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
        self.check_open()?;
        let queue = self.core.queue(topic, options.name());
        let shared = Arc::new(ReceiverShared {
            queue,
            name: format!("{topic}/{}", options.name()),
            consumer: self.core.consumer_ids.fetch_add(1, Ordering::Relaxed),
            prefetch: options.prefetch(),
            ack_timeout: options.ack_timeout(),
            closed: self.conn.closed.child_token(),
            requeued: AtomicBool::new(false),
            buffer: Mutex::new(VecDeque::new()),
        });
        self.conn.receivers.insert(&shared);
        Ok(Box::new(MemoryReceiver { shared }))
    }

    async fn close(&self) -> Result<()> {
        self.conn.closed.cancel();
        for r in self.conn.receivers.take_live() {
            r.shutdown();
        }
        Ok(())
    }
}

impl Broker for MemoryConnection {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.core.max_payload)
            .with_backend("memory")
            .with_ordering(KeyOrdering::PerKey)
            .with_native_delay(true)
            .with_fan_out(true)
            .with_competing_consumers(true)
            .with_replay(false)
            .with_persistent(false)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

struct ReceiverShared {
    queue: SharedQueue,
    /// `topic/subscription`, for errors.
    name: String,
    consumer: u64,
    prefetch: usize,
    ack_timeout: Duration,
    closed: CancellationToken,
    requeued: AtomicBool,
    /// Deliveries taken from the queue (so counted against prefetch) but not
    /// yet handed to the application: (tag, message, attempt).
    buffer: Mutex<VecDeque<(u64, Message, u32)>>,
}

impl ReceiverShared {
    fn buffer(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Message, u32)>> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes this consumer: buffered deliveries go back untouched, handed-out
    /// unsettled ones go back for redelivery.
    fn shutdown(&self) {
        self.closed.cancel();
        if self.requeued.swap(true, Ordering::AcqRel) {
            return;
        }
        let tags = self.buffer().drain(..).map(|(t, _, _)| t).collect();
        self.queue.untake(tags);
        self.queue.requeue_consumer(self.consumer);
    }

    /// The next buffered delivery whose ack clock restarts now: the ack
    /// timeout runs from hand-out, not from when it was buffered.
    fn pop_buffered(&self) -> Option<(u64, Message, u32)> {
        loop {
            let d = self.buffer().pop_front()?;
            if self.queue.restamp(d.0, self.ack_timeout) {
                return Some(d);
            }
        }
    }

    fn raw(self: &Arc<Self>, (tag, message, attempt): (u64, Message, u32)) -> RawDelivery {
        RawDelivery {
            message,
            attempt,
            acker: Box::new(MemoryAcker {
                receiver: Arc::clone(self),
                tag,
            }),
        }
    }
}

impl fmt::Debug for ReceiverShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverShared")
            .field("consumer", &self.consumer)
            .field("prefetch", &self.prefetch)
            .field("ack_timeout", &self.ack_timeout)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct MemoryReceiver {
    shared: Arc<ReceiverShared>,
}

#[async_trait]
impl Receiver for MemoryReceiver {
    async fn recv(&self) -> Option<Result<RawDelivery>> {
        let s = &self.shared;
        // Take part in tokio's cooperative budget (as tokio's channels do),
        // so a consumer that always finds work still lets its task yield.
        tokio::task::consume_budget().await;
        loop {
            // Register for wake-ups before looking, so none is missed.
            let changed = s.queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if s.closed.is_cancelled() {
                s.shutdown();
                return None;
            }
            if s.queue.is_deleted() {
                return Some(Err(Error::not_found(
                    "subscription",
                    s.name.clone(),
                    "the subscription was deleted",
                    None,
                )));
            }
            if let Some(d) = s.pop_buffered() {
                return Some(Ok(s.raw(d)));
            }
            let wake = match s
                .queue
                .take(s.consumer, s.prefetch, TAKE_BATCH, s.ack_timeout)
            {
                Take::Got(mut got) => {
                    let first = got.remove(0);
                    s.buffer().extend(got);
                    return Some(Ok(s.raw(first)));
                }
                Take::Wait(wake) => wake,
            };
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut changed => {}
                () = sleep => {}
                () = s.closed.cancelled() => {}
            }
        }
    }

    fn try_recv(&self) -> Option<Result<RawDelivery>> {
        let s = &self.shared;
        if s.closed.is_cancelled() {
            return None;
        }
        s.pop_buffered().map(|d| Ok(s.raw(d)))
    }

    async fn close(&self) -> Result<()> {
        self.shared.shutdown();
        Ok(())
    }
}

impl Drop for MemoryReceiver {
    fn drop(&mut self) {
        // A dropped consumer is a crashed one: its deliveries go back.
        self.shared.shutdown();
    }
}

#[derive(Debug)]
struct MemoryAcker {
    receiver: Arc<ReceiverShared>,
    tag: u64,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        if self.receiver.closed.is_cancelled() {
            return Err(Error::Closed);
        }
        // An unknown tag expired after the ack timeout and was redelivered:
        // at-least-once, so this is not an error (as NATS and SQS behave).
        self.receiver.queue.ack(self.tag);
        Ok(())
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        if self.receiver.closed.is_cancelled() {
            return Err(Error::Closed);
        }
        self.receiver.queue.nack(self.tag, delay);
        Ok(())
    }

    /// Moves the delivery's deadline to an ack timeout from now (a delivery
    /// already expired is not revived).
    async fn extend(&self) -> Result<()> {
        if self.receiver.closed.is_cancelled() {
            return Err(Error::Closed);
        }
        self.receiver
            .queue
            .restamp(self.tag, self.receiver.ack_timeout);
        Ok(())
    }
}
