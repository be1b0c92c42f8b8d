//! The broker and its connections.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use switchyard_core::{
    Capabilities, Client, Error, KeyOrdering, Message, Result, SubscribeOptions,
    driver::{Broker, Lifecycle, Publisher, Receiver, ReceiverCore, ReceiverHandle, Subscriber},
};

use crate::{
    config::{DEFAULT_MAX_PAYLOAD, MemoryBuilder, MemoryUrl},
    queue::SharedQueue,
    receiver::ReceiverShared,
};

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
                life: Lifecycle::new(),
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

impl MemoryBuilder {
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
    let MemoryUrl { name, max_payload } = MemoryUrl::parse(url)?;
    let broker = MemoryBroker::named_with(&name, max_payload.unwrap_or(DEFAULT_MAX_PAYLOAD));
    if let Some(limit) = max_payload
        && broker.core.max_payload != limit
    {
        return Err(Error::InvalidUrl {
            url: switchyard_core::redact_url(url),
            reason: format!(
                "memory broker {name:?} already exists with max_payload={}",
                broker.core.max_payload
            ),
        });
    }
    Ok(broker.client())
}

#[derive(Debug)]
struct ConnState {
    life: Lifecycle<ReceiverShared>,
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
        self.conn.life.check_open()
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
        if let Some((last, rest)) = queues.split_last() {
            for q in rest {
                q.push_many(
                    messages
                        .iter()
                        .zip(&results)
                        .filter(|(_, r)| r.is_ok())
                        .map(|(m, _)| m.clone()),
                );
            }
            last.push_many(
                messages
                    .into_iter()
                    .zip(&results)
                    .filter_map(|(m, r)| r.is_ok().then_some(m)),
            );
        }
        results
    }

    async fn close(&self) -> Result<()> {
        self.conn.life.cancel();
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
            core: ReceiverCore::new(self.conn.life.child_token(), ()),
            requeued: AtomicBool::new(false),
            buffer: Mutex::new(VecDeque::new()),
        });
        self.conn.life.adopt(&shared);
        Ok(Box::new(ReceiverHandle::new(shared)))
    }

    async fn close(&self) -> Result<()> {
        for r in self.conn.life.close() {
            r.hand_back();
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
