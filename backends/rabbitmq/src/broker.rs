//! The AMQP backend's publisher and subscriber: connections, exchanges,
//! queues, wait queues, publishing with confirms.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::{StreamExt, stream::FuturesOrdered};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString},
};
use switchyard_core::{
    Capabilities, Client, Error, KeyOrdering, Message, Result, SubscribeOptions,
    driver::{
        Broker, Lifecycle, Publisher, Receiver, ReceiverCore, ReceiverHandle, SlowStart, Subscriber,
    },
};
use tokio::{sync::Notify, time::Instant};

use crate::{
    RabbitConfig,
    book::Book,
    codec,
    error::{amqp_error, bounded, is_not_found, reply_code},
    names,
    receiver::*,
};

/// Bytes of `max_message_size` kept for properties and headers: the payload
/// limit switchyard reports is the configured size minus this.
const HEADER_RESERVE: usize = 64 * 1024;
/// First pause after a consumer failed to (re)open; doubles up to
/// [`MAX_REOPEN_PAUSE`].
pub(crate) const REOPEN_PAUSE: Duration = Duration::from_millis(200);
pub(crate) const MAX_REOPEN_PAUSE: Duration = Duration::from_secs(5);
/// How long delayed nacks go into one wait queue before the next one takes
/// over (the configured `queue_expires` when shorter; see
/// [`RabbitBroker::declare_wait_queue`]).
const WAIT_QUEUE_LEASE: Duration = Duration::from_secs(3600);

pub(crate) struct Inner {
    pub(crate) config: RabbitConfig,
    /// The index in `config.uris` of the host last connected to.
    pub(crate) host: std::sync::atomic::AtomicUsize,
    /// The current connection; replaced when it is lost.
    pub(crate) connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The confirm-mode channel every publish goes through.
    pub(crate) publish_channel: Mutex<Option<Channel>>,
    /// Serialises (re)creating the publish channel.
    pub(crate) publish_channel_init: tokio::sync::Mutex<()>,
    /// Exchanges and queues known to be declared.
    pub(crate) declared: Mutex<HashSet<String>>,
    /// Wait queues declared by this client, and when.
    pub(crate) wait_queues: Mutex<HashMap<String, Instant>>,
    pub(crate) life: Lifecycle<ReceiverShared>,
    /// How many times a lost connection was replaced: receivers pausing
    /// between attempts to reopen resume at once.
    pub(crate) reconnects: tokio::sync::watch::Sender<u64>,
}

/// A connection to RabbitMQ implementing switchyard's backend traits.
///
/// Topic → a durable fanout exchange; subscription → a durable quorum queue
/// bound to it. Publishes go through one confirm-mode channel; each receiver
/// has its own channel with `basic.qos` set to its prefetch. A lost
/// connection is re-established on the next use, and receivers resume
/// consuming by themselves. Cheap to clone.
#[derive(Clone)]
pub struct RabbitBroker {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", &self.inner.config)
            .field("life", &self.inner.life)
            .finish_non_exhaustive()
    }
}

/// Connects to RabbitMQ from an `amqp://` or `amqps://` URL and returns a
/// [`Client`].
///
/// # Errors
///
/// [`Error::InvalidUrl`] for a malformed URL; [`Error::Connection`] when no
/// broker answers within the connect timeout; [`Error::Authentication`]
/// when the broker refuses the credentials.
pub async fn connect(url: &str) -> Result<Client> {
    Ok(Client::new(
        RabbitBroker::connect(RabbitConfig::from_url(url)?).await?,
    ))
}

impl RabbitBroker {
    /// Connects with `config`.
    ///
    /// # Errors
    ///
    /// As for [`connect`].
    pub async fn connect(config: RabbitConfig) -> Result<Self> {
        let broker = Self {
            inner: Arc::new(Inner {
                config,
                host: std::sync::atomic::AtomicUsize::new(0),
                connection: tokio::sync::Mutex::new(None),
                publish_channel: Mutex::new(None),
                publish_channel_init: tokio::sync::Mutex::new(()),
                declared: Mutex::new(HashSet::new()),
                wait_queues: Mutex::new(HashMap::new()),
                life: Lifecycle::new(),
                reconnects: tokio::sync::watch::Sender::new(0),
            }),
        };
        broker.connection().await?;
        Ok(broker)
    }

    /// The current native lapin connection (escape hatch), reconnecting
    /// when it was lost.
    ///
    /// # Errors
    ///
    /// As for [`connect`].
    pub async fn connection(&self) -> Result<Arc<Connection>> {
        let mut current = self.inner.connection.lock().await;
        if let Some(c) = &*current
            && c.status().connected()
        {
            return Ok(Arc::clone(c));
        }
        let c = Arc::new(self.open_connection(current.is_some()).await?);
        if current.replace(Arc::clone(&c)).is_some() {
            // A new connection after a lost one: the broker may have lost
            // its state (a new node), so declare everything again.
            self.inner
                .declared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.inner.reconnects.send_modify(|n| *n += 1);
        }
        Ok(c)
    }

    /// Connects to the first host that answers, in the order listed: from
    /// the first (the preferred one, if any), or after a lost connection
    /// without a preference from the host after the one lost. A refusal of
    /// the credentials or the vhost ends the round: every node of a cluster
    /// shares them.
    async fn open_connection(&self, after_loss: bool) -> Result<Connection> {
        use std::sync::atomic::Ordering;
        let c = &self.inner.config;
        let n = c.uris.len();
        let start = if after_loss && !c.prefer_first {
            (self.inner.host.load(Ordering::Relaxed) + 1) % n
        } else {
            0
        };
        let mut last = None;
        for i in (start..n).chain(0..start) {
            match self.connect_to(&c.uris[i]).await {
                Ok(conn) => {
                    self.inner.host.store(i, Ordering::Relaxed);
                    return Ok(conn);
                }
                Err(e @ (Error::Authentication { .. } | Error::Config(_))) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(Error::Config("no AMQP host configured".into())))
    }

    async fn connect_to(&self, uri: &str) -> Result<Connection> {
        let c = &self.inner.config;
        let props = ConnectionProperties::default().with_connection_name("switchyard".into());
        let redacted = switchyard_core::redact_url(uri);
        match tokio::time::timeout(c.connect_timeout, Connection::connect(uri, props)).await {
            Err(_) => Err(Error::Connection {
                message: format!(
                    "no AMQP broker answered at {redacted} within {:?}",
                    c.connect_timeout
                ),
                source: None,
            }),
            Ok(Err(e)) if reply_code(&e) == Some(403) => Err(Error::Authentication {
                message: format!("connecting to {redacted}: {e}"),
                source: Some(std::sync::Arc::new(e)),
            }),
            Ok(Err(e)) if reply_code(&e) == Some(530) => Err(Error::Config(format!(
                "connecting to {redacted}: {e} (does the vhost exist, may this user use it?)"
            ))),
            Ok(Err(e)) => Err(Error::connection(
                format!("connecting to {redacted}: {e}"),
                e,
            )),
            Ok(Ok(conn)) => Ok(conn),
        }
    }

    pub(crate) async fn channel(&self) -> Result<Channel> {
        let conn = self.connection().await?;
        bounded(
            "opening a channel",
            self.inner.config.request_timeout,
            conn.create_channel(),
        )
        .await
    }

    /// The exchange used for `topic`.
    #[must_use]
    pub fn exchange_name(&self, topic: &str) -> String {
        names::exchange(topic)
    }

    /// The queue used for a subscription on `topic`.
    #[must_use]
    pub fn queue_name(&self, topic: &str, subscription: &str) -> String {
        names::queue(topic, subscription)
    }

    fn limit(&self) -> usize {
        self.inner
            .config
            .max_message_size
            .saturating_sub(HEADER_RESERVE)
    }

    fn check_open(&self) -> Result<()> {
        self.inner.life.check_open()
    }

    fn is_declared(&self, name: &str) -> bool {
        self.inner
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    pub(crate) fn set_declared(&self, name: &str, declared: bool) {
        let mut set = self
            .inner
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if declared {
            set.insert(name.to_owned());
        } else {
            set.remove(name);
        }
    }

    /// Declares the topic's exchange once (cached).
    async fn declare_topic(&self, topic: &str) -> Result<String> {
        let exchange = names::exchange(topic);
        if self.is_declared(&exchange) {
            return Ok(exchange);
        }
        let channel = self.channel().await?;
        bounded(
            "declaring the topic's exchange",
            self.inner.config.request_timeout,
            channel.exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        let _ = channel.close(200, "declared".into()).await;
        self.set_declared(&exchange, true);
        Ok(exchange)
    }

    /// Declares the subscription's quorum queue and its binding once
    /// (cached); returns the queue name.
    pub(crate) async fn declare_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<String> {
        let queue = names::queue(topic, subscription);
        if self.is_declared(&queue) {
            return Ok(queue);
        }
        let exchange = self.declare_topic(topic).await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.inner.config.delivery_limit)),
        );
        if let Some(after) = self.inner.config.queue_expires {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(i64::try_from(after.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        let channel = self.channel().await?;
        let bound = self.inner.config.request_timeout;
        bounded(
            "declaring the subscription's queue",
            bound,
            channel.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            ),
        )
        .await?;
        bounded(
            "binding the subscription's queue",
            bound,
            channel.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .inspect_err(|e| {
            // The exchange is gone (a broker that lost its state): declare
            // it again next time instead of failing every reopen.
            if is_not_found(e) {
                self.set_declared(&exchange, false);
            }
        })?;
        let _ = channel.close(200, "declared".into()).await;
        self.set_declared(&queue, true);
        Ok(queue)
    }

    /// The lease of a wait queue: how long delayed nacks go into it.
    fn wait_lease(&self) -> Duration {
        let lease = self
            .inner
            .config
            .queue_expires
            .map_or(WAIT_QUEUE_LEASE, |e| e.min(WAIT_QUEUE_LEASE));
        Duration::from_secs(lease.as_secs().max(1))
    }

    /// Declares (once) the wait queue holding a subscription's nacks
    /// delayed by `delay_ms` now: a quorum queue whose messages expire
    /// after `delay_ms` and are dead-lettered back to the subscription's
    /// queue through the default exchange, at least once
    /// (`x-dead-letter-strategy=at-least-once`, which needs
    /// `x-overflow=reject-publish`): a copy stays in the wait queue until
    /// the subscription's queue confirmed it, through a broker restart or
    /// a target that is not up yet. (A classic queue dead-letters at most
    /// once: 1,000 of 1,000 delayed nacks were lost when the broker was
    /// killed while they waited.)
    ///
    /// Wait queues rotate: one takes the delayed nacks of one lease period
    /// (epoch `unix time / lease`, in its name) and is deleted by the
    /// broker `2 × lease + delay` after it was declared (`x-expires`). A
    /// quorum queue's expiry is not renewed by publishes or redeclaration
    /// (RabbitMQ 3.10), so a fixed queue with an expiry would be deleted in
    /// use with its messages; a rotating one outlives its last message by
    /// a whole lease, and an idle subscription leaves no queue behind.
    async fn declare_wait_queue(&self, queue: &str, delay_ms: u64) -> Result<String> {
        let lease = self.wait_lease();
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / lease.as_secs();
        let name = names::wait_queue(queue, delay_ms, lease.as_secs(), epoch);
        let known = self
            .inner
            .wait_queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&name);
        if known {
            return Ok(name);
        }
        let ms =
            |d: Duration| AMQPValue::LongLongInt(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let delay = Duration::from_millis(delay_ms);
        let mut args = FieldTable::default();
        for (key, value) in [
            ("x-queue-type", "quorum"),
            ("x-dead-letter-strategy", "at-least-once"),
            ("x-overflow", "reject-publish"),
            ("x-dead-letter-exchange", ""),
            ("x-dead-letter-routing-key", queue),
        ] {
            args.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
        }
        args.insert("x-message-ttl".into(), ms(delay));
        args.insert("x-expires".into(), ms(delay + 2 * lease));
        let channel = self.channel().await?;
        bounded(
            "declaring a wait queue for a delayed nack",
            self.inner.config.request_timeout,
            channel.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            ),
        )
        .await?;
        let _ = channel.close(200, "declared".into()).await;
        let mut known = self
            .inner
            .wait_queues
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        known.retain(|_, at| at.elapsed() < 2 * lease);
        known.insert(name.clone(), Instant::now());
        Ok(name)
    }

    /// The confirm-mode publish channel, (re)created when missing or closed.
    async fn publish_channel(&self) -> Result<Channel> {
        let cached = || {
            self.inner
                .publish_channel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .filter(|c| c.status().connected())
                .cloned()
        };
        if let Some(c) = cached() {
            return Ok(c);
        }
        let _init = self.inner.publish_channel_init.lock().await;
        if let Some(c) = cached() {
            return Ok(c);
        }
        let channel = self.channel().await?;
        bounded(
            "enabling publisher confirms",
            self.inner.config.request_timeout,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        *self
            .inner
            .publish_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(channel.clone());
        Ok(channel)
    }

    /// Sends one publish; the returned future resolves on the broker's
    /// confirm.
    async fn send(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        props: BasicProperties,
        mandatory: bool,
    ) -> Result<lapin::PublisherConfirm> {
        bounded(
            "sending a publish",
            self.inner.config.request_timeout,
            channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                payload,
                props,
            ),
        )
        .await
    }

    async fn confirm(
        &self,
        channel: &Channel,
        exchange: &str,
        confirm: lapin::PublisherConfirm,
    ) -> Result<()> {
        self.confirm_routed(channel, exchange, confirm)
            .await
            .map(drop)
    }

    /// Waits for the broker's confirm; `Ok(false)` when a `mandatory`
    /// publish was returned unroutable.
    async fn confirm_routed(
        &self,
        channel: &Channel,
        exchange: &str,
        confirm: lapin::PublisherConfirm,
    ) -> Result<bool> {
        let after = self.inner.config.request_timeout;
        match tokio::time::timeout(after, confirm).await {
            Err(_) => Err(Error::Timeout {
                operation: "publisher confirm",
                after,
            }),
            Ok(Ok(Confirmation::Ack(returned))) => Ok(returned.is_none()),
            Ok(Ok(Confirmation::Nack(_))) => {
                self.retire_publish_channel(channel);
                Err(Error::broker(
                    "the broker refused the message (basic.nack)",
                    true,
                    None,
                ))
            }
            Ok(Ok(Confirmation::NotRequested)) => Err(Error::broker(
                "publisher confirms are off on the publish channel",
                true,
                None,
            )),
            Ok(Err(e)) => {
                if reply_code(&e) == Some(404) {
                    // The exchange was deleted behind our back: forget it,
                    // so the caller's retry declares it again.
                    self.set_declared(exchange, false);
                }
                Err(amqp_error("publish not confirmed", e))
            }
        }
    }

    /// Takes `channel` out of use as the publish channel after it got a
    /// `basic.nack`: the next publish opens a fresh one. Publishes in
    /// flight on it still get their confirms; it is closed after the
    /// request timeout.
    ///
    /// A channel can go on refusing every publish to a quorum queue: on
    /// RabbitMQ 3.10 a channel whose first publish to the queue falls
    /// between the loss of the queue's leader node and the election of the
    /// next one keeps addressing the lost node, and the broker nacks each
    /// publish on that channel for as long as the node is down (seen in
    /// the cluster case: 90 s of nacks, every publish refused). A fresh
    /// channel asks the queue's current leader.
    fn retire_publish_channel(&self, channel: &Channel) {
        let mut current = self
            .inner
            .publish_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|c| c.id() == channel.id())
            && let Some(old) = current.take()
        {
            let after = self.inner.config.request_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = old.close(200, "retired after a basic.nack".into()).await;
            });
        }
    }

    /// Encodes and size-checks a message.
    fn prepare(&self, message: &Message) -> Result<BasicProperties> {
        let (props, header_bytes) = codec::encode(message);
        let limit = self.limit();
        let size = message.payload().len() + header_bytes.saturating_sub(HEADER_RESERVE);
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok(props)
    }

    /// Publishes a copy of a delivery to a wait queue (`mandatory`,
    /// confirmed). A wait queue deleted behind this client's back (by an
    /// operator) returns the copy: it is declared again and the copy sent
    /// once more.
    pub(crate) async fn publish_delayed(
        &self,
        queue: &str,
        delay: Duration,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<()> {
        let delay_ms = names::delay_bucket_ms(delay);
        for _ in 0..2 {
            let wait = self.declare_wait_queue(queue, delay_ms).await?;
            let channel = self.publish_channel().await?;
            let confirm = self
                .send(&channel, "", &wait, payload, props.clone(), true)
                .await?;
            if self.confirm_routed(&channel, "", confirm).await? {
                return Ok(());
            }
            self.inner
                .wait_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&wait);
        }
        Err(Error::broker(
            "the wait queue for a delayed nack did not take the message (returned unroutable)",
            true,
            None,
        ))
    }
}

#[async_trait]
impl Publisher for RabbitBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.check_open()?;
        let props = self.prepare(&message)?;
        let exchange = self.declare_topic(topic).await?;
        let channel = self.publish_channel().await?;
        let confirm = self
            .send(&channel, &exchange, "", message.payload(), props, false)
            .await?;
        self.confirm(&channel, &exchange, confirm).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        let setup = async {
            self.check_open()?;
            let exchange = self.declare_topic(topic).await?;
            Ok::<_, Error>((exchange, self.publish_channel().await?))
        };
        let (exchange, channel) = match setup.await {
            Ok(s) => s,
            Err(e) => return messages.iter().map(|_| Err(e.clone())).collect(),
        };
        // Pipeline: keep up to `publish_window` confirms in flight.
        let window = self.inner.config.publish_window;
        let mut results: Vec<Option<Result<()>>> = (0..messages.len()).map(|_| None).collect();
        let mut in_flight = FuturesOrdered::new();
        for (i, message) in messages.iter().enumerate() {
            if in_flight.len() >= window
                && let Some((j, r)) = in_flight.next().await
            {
                results[j] = Some(r);
            }
            let sent = match self.prepare(message) {
                Ok(props) => {
                    self.send(&channel, &exchange, "", message.payload(), props, false)
                        .await
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok(confirm) => {
                    let (exchange, channel) = (&exchange, &channel);
                    in_flight.push_back(async move {
                        (i, self.confirm(channel, exchange, confirm).await)
                    });
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while let Some((j, r)) = in_flight.next().await {
            results[j] = Some(r);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::broker("publish result missing", true, None))))
            .collect()
    }

    async fn close(&self) -> Result<()> {
        // Every accepted publish was confirmed before `publish` returned;
        // closing refuses new ones.
        self.inner.life.cancel();
        Ok(())
    }
}

#[async_trait]
impl Subscriber for RabbitBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        self.declare_topic(topic).await.map(|_| ())
    }

    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open()?;
        self.declare_subscription(topic, options.name())
            .await
            .map(|_| ())
    }

    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
        self.check_open()?;
        let queue = self.declare_subscription(topic, options.name()).await?;
        let inflight = Arc::new(Inflight {
            // Acks go a quarter of the prefetch at a time, or a moment
            // after the first.
            book: Mutex::new(Book::new((options.prefetch() / 4).max(1), ACK_FLUSH_DELAY)),
            wake: Notify::new(),
            cancel: self.inner.life.child_token(),
        });
        let shared = Arc::new(ReceiverShared {
            broker: self.clone(),
            topic: topic.to_owned(),
            subscription: options.name().to_owned(),
            queue,
            prefetch: u16::try_from(options.prefetch()).unwrap_or(u16::MAX),
            ack_timeout: options.ack_timeout(),
            generation: AtomicU64::new(0),
            core: ReceiverCore::new(
                inflight.cancel.clone(),
                ConsumeState {
                    consumer: None,
                    channel: None,
                    get: None,
                    starting: None,
                    outside: None,
                    pause: REOPEN_PAUSE,
                    gone: None,
                },
            ),
            inflight: Arc::clone(&inflight),
            slow: SlowStart::new(),
        });
        // Open the consumer now, so errors surface here rather than on the
        // first receive.
        {
            let mut state = shared.core.enter().await.ok_or(Error::Closed)?;
            shared.open(&mut state).await?;
        }
        tokio::spawn(reap(inflight));
        self.inner.life.adopt(&shared);
        Ok(Box::new(ReceiverHandle::new(shared)))
    }

    async fn close(&self) -> Result<()> {
        for r in self.inner.life.close() {
            r.hand_back().await;
        }
        let conn = self.inner.connection.lock().await.take();
        if let Some(conn) = conn
            && conn.status().connected()
        {
            let _ = tokio::time::timeout(
                self.inner.config.request_timeout,
                conn.close(200, "closed".into()),
            )
            .await;
        }
        Ok(())
    }
}

impl Broker for RabbitBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.limit())
            .with_backend("rabbitmq")
            .with_ordering(KeyOrdering::PerKey)
            .with_native_delay(true)
            .with_returns_count_attempts(true)
            .with_fan_out(true)
            .with_competing_consumers(true)
            .with_replay(false)
            .with_persistent(true)
            .with_min_ack_timeout(Duration::from_millis(100))
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
