//! The AMQP backend: publisher, subscriber, receivers and ackers.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt, stream::FuturesOrdered};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
        BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use switchyard_core::{
    Acker, Broker, Capabilities, Client, Error, KeyOrdering, Message, Publisher, RawDelivery,
    Receiver, Result, SubscribeOptions, Subscriber,
    driver::{ReceiverSet, SlowStart},
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    RabbitConfig,
    book::{Acked, Book, Key, Wire},
    codec, names,
};

/// Bytes of `max_message_size` kept for properties and headers: the payload
/// limit switchyard reports is the configured size minus this.
const HEADER_RESERVE: usize = 64 * 1024;
/// First pause after a consumer failed to (re)open; doubles up to
/// [`MAX_REOPEN_PAUSE`].
const REOPEN_PAUSE: Duration = Duration::from_millis(200);
const MAX_REOPEN_PAUSE: Duration = Duration::from_secs(5);
/// How long delayed nacks go into one wait queue before the next one takes
/// over (the configured `queue_expires` when shorter; see
/// [`RabbitBroker::declare_wait_queue`]).
const WAIT_QUEUE_LEASE: Duration = Duration::from_secs(3600);

/// The AMQP reply code of a protocol error (403 access refused, 404 not
/// found, 406 precondition failed, …).
fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        ErrorKind::ProtocolError(a) => Some(a.get_id()),
        _ => None,
    }
}

fn amqp_error(what: &str, e: lapin::Error) -> Error {
    match reply_code(&e) {
        // Access refused, precondition failed, not allowed: retrying the
        // same request cannot succeed.
        Some(403 | 406 | 530) => Error::broker(format!("{what}: {e}"), false, Some(Box::new(e))),
        Some(_) => Error::broker(format!("{what}: {e}"), true, Some(Box::new(e))),
        None if e.is_io_error() => Error::connection(format!("{what}: {e}"), e),
        None => Error::broker(format!("{what}: {e}"), true, Some(Box::new(e))),
    }
}

/// Whether `e` carries the broker's 404 (`NOT_FOUND`) reply.
fn is_not_found(e: &Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<lapin::Error>())
        .is_some_and(|e| reply_code(e) == Some(404))
}

async fn bounded<T>(
    what: &'static str,
    after: Duration,
    f: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, f).await {
        Ok(r) => r.map_err(|e| amqp_error(what, e)),
        Err(_) => Err(Error::Timeout {
            operation: what,
            after,
        }),
    }
}

struct Inner {
    config: RabbitConfig,
    /// The index in `config.uris` of the host last connected to.
    host: std::sync::atomic::AtomicUsize,
    /// The current connection; replaced when it is lost.
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The confirm-mode channel every publish goes through.
    publish_channel: Mutex<Option<Channel>>,
    /// Serialises (re)creating the publish channel.
    publish_channel_init: tokio::sync::Mutex<()>,
    /// Exchanges and queues known to be declared.
    declared: Mutex<HashSet<String>>,
    /// Wait queues declared by this client, and when.
    wait_queues: Mutex<HashMap<String, Instant>>,
    closed: CancellationToken,
    receivers: ReceiverSet<ReceiverShared>,
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
    inner: Arc<Inner>,
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", &self.inner.config)
            .field("closed", &self.inner.closed.is_cancelled())
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
                closed: CancellationToken::new(),
                receivers: ReceiverSet::new(),
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
                source: Some(Box::new(e)),
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

    async fn channel(&self) -> Result<Channel> {
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
        if self.inner.closed.is_cancelled() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn is_declared(&self, name: &str) -> bool {
        self.inner
            .declared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    fn set_declared(&self, name: &str, declared: bool) {
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
    async fn declare_subscription(&self, topic: &str, subscription: &str) -> Result<String> {
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
    async fn publish_delayed(
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
            Err(e) => return messages.iter().map(|_| Err(e.replicate())).collect(),
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
        self.inner.closed.cancel();
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
            book: Mutex::new(Book::default()),
            flush_every: (options.prefetch_limit() / 4).max(1),
            wake: Notify::new(),
            cancel: self.inner.closed.child_token(),
        });
        let shared = Arc::new(ReceiverShared {
            broker: self.clone(),
            topic: topic.to_owned(),
            subscription: options.name().to_owned(),
            queue,
            prefetch: u16::try_from(options.prefetch_limit()).unwrap_or(u16::MAX),
            ack_timeout: options.ack_timeout_value(),
            generation: AtomicU64::new(0),
            state: tokio::sync::Mutex::new(ConsumeState {
                consumer: None,
                channel: None,
                get: None,
                starting: None,
                outside: None,
                pause: REOPEN_PAUSE,
                gone: None,
            }),
            inflight: Arc::clone(&inflight),
            slow: SlowStart::new(),
        });
        // Open the consumer now, so errors surface here rather than on the
        // first receive.
        {
            let mut state = shared.state.lock().await;
            shared.open(&mut state).await?;
        }
        tokio::spawn(reap(inflight));
        self.inner.receivers.insert(&shared);
        Ok(Box::new(RabbitReceiver { shared }))
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        for r in self.inner.receivers.take_live() {
            r.shutdown().await;
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
}

/// How often a receiver taking one delivery at a time ([`SlowStart`])
/// looks whether the one it handed out was settled.
const SLOW_SETTLE_POLL: Duration = Duration::from_millis(5);

/// How long an ack may wait to be coalesced with the next ones.
const ACK_FLUSH_DELAY: Duration = Duration::from_millis(5);

impl Wire for Arc<Channel> {
    fn connected(&self) -> bool {
        self.status().connected()
    }

    /// Queues the ack on the channel, in order with anything sent later (a
    /// close included), without waiting for the I/O loop to write it.
    fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
        match self
            .basic_ack(tag, BasicAckOptions { multiple })
            .now_or_never()
        {
            Some(Err(e)) => Err(amqp_error("ack", e)),
            Some(Ok(())) | None => Ok(()),
        }
    }

    fn reject(&self, tag: u64) -> Result<()> {
        match self
            .basic_reject(tag, BasicRejectOptions { requeue: true })
            .now_or_never()
        {
            Some(Err(e)) => Err(amqp_error("nack", e)),
            Some(Ok(())) | None => Ok(()),
        }
    }
}

/// Deliveries a receiver handed out and that are not settled, and acks
/// waiting to be coalesced. Every settlement frame is queued under the
/// book's lock (see [`book`](crate::book)).
struct Inflight {
    book: Mutex<Book<Arc<Channel>>>,
    /// Acks at or above this many are sent at once.
    flush_every: usize,
    /// Wakes the reaper when its next deadline may have moved earlier.
    wake: Notify,
    cancel: CancellationToken,
}

impl Inflight {
    /// Whether everything handed out is settled and its acks are sent.
    fn is_settled(&self) -> bool {
        self.book().is_settled()
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book<Arc<Channel>>> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, key: Key, deadline: Instant, channel: &Arc<Channel>) {
        let was_empty = self.book().insert(key, deadline, channel);
        if was_empty {
            self.wake.notify_one();
        }
    }

    fn contains(&self, key: Key) -> bool {
        self.book().contains(key)
    }

    fn unsettled(&self) -> usize {
        self.book().unsettled()
    }

    fn ack(&self, key: Key) -> Acked {
        let (acked, newly_due) = {
            let mut book = self.book();
            let had_deadline = book.has_flush_deadline();
            let acked = book.ack(key, self.flush_every, Instant::now() + ACK_FLUSH_DELAY);
            (acked, !had_deadline && book.has_flush_deadline())
        };
        // Only the ack that sets the flush deadline wakes the reaper; the
        // ones coalesced with it add nothing to wait for.
        if newly_due {
            self.wake.notify_one();
        }
        acked
    }

    /// Sends every ack recorded so far.
    fn flush(&self) {
        let _ = self.book().flush();
    }
}

/// Returns deliveries whose lease expired to the queue (`basic.reject`
/// with requeue, which counts as a delivery attempt), as JetStream's ack
/// wait and SQS's visibility timeout do (AMQP itself only returns them when
/// the channel closes); and sends coalesced acks that waited
/// [`ACK_FLUSH_DELAY`].
async fn reap(inflight: Arc<Inflight>) {
    loop {
        let next = inflight.book().next_due();
        match next {
            None => tokio::select! {
                () = inflight.wake.notified() => {}
                () = inflight.cancel.cancelled() => return,
            },
            Some(at) if at > Instant::now() => tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = inflight.wake.notified() => {}
                () = inflight.cancel.cancelled() => return,
            },
            Some(_) => {
                // A frame refused by a closing channel: the broker returns
                // its deliveries itself.
                let _ = inflight.book().reap(Instant::now());
            }
        }
    }
}

struct ConsumeState {
    consumer: Option<lapin::Consumer>,
    channel: Option<Arc<Channel>>,
    /// The `basic.get` in flight while [`SlowStart`] holds the receiver to
    /// one delivery at a time.
    get: Option<tokio::task::JoinHandle<Result<Option<lapin::message::BasicGetMessage>>>>,
    /// The `basic.consume` in flight.
    starting: Option<tokio::task::JoinHandle<Result<lapin::Consumer>>>,
    /// The last delivery taken by `basic.get`: the broker's prefetch does
    /// not count it, so once consuming, until it is settled, the receiver
    /// hands out no more than the prefetch itself.
    outside: Option<Key>,
    /// Pause before the next reopen attempt after a failure.
    pause: Duration,
    /// Set once the queue was found deleted under the receiver: every
    /// receive returns it (the receiver does not quietly recreate an empty
    /// queue in its place).
    gone: Option<Error>,
}

struct ReceiverShared {
    broker: RabbitBroker,
    topic: String,
    subscription: String,
    queue: String,
    prefetch: u16,
    ack_timeout: Duration,
    /// Bumped each time the consumer is reopened on a new channel.
    generation: AtomicU64,
    state: tokio::sync::Mutex<ConsumeState>,
    inflight: Arc<Inflight>,
    /// One delivery at a time (`basic.get`, no consumer yet) until a first
    /// delivery or an empty queue shows that the head of the queue is not
    /// what crashed the last consumer.
    slow: SlowStart,
}

impl fmt::Debug for ReceiverShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverShared")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("closed", &self.inflight.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl ReceiverShared {
    fn cancel(&self) -> &CancellationToken {
        &self.inflight.cancel
    }

    /// Opens a channel with `basic.qos` = prefetch and starts consuming.
    async fn open(&self, state: &mut ConsumeState) -> Result<()> {
        let broker = &self.broker;
        let bound = broker.inner.config.request_timeout;
        // Re-declare when the queue was deleted behind our back (a consume
        // on a missing queue fails with 404 and forgets the declaration).
        broker
            .declare_subscription(&self.topic, &self.subscription)
            .await?;
        let channel = broker.channel().await?;
        bounded(
            "setting the prefetch (basic.qos)",
            bound,
            channel.basic_qos(self.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let channel = Arc::new(channel);
        if let Some(stale) = state.get.take() {
            stale.abort();
        }
        if let Some(stale) = state.starting.take() {
            stale.abort();
        }
        state.outside = None;
        self.generation.fetch_add(1, Ordering::Relaxed);
        state.channel = Some(Arc::clone(&channel));
        if self.slow.is_open() {
            self.consume(state, &channel).await?;
        }
        state.pause = REOPEN_PAUSE;
        Ok(())
    }

    /// Starts the channel's consumer (the broker then pushes up to the
    /// prefetch).
    async fn consume(&self, state: &mut ConsumeState, channel: &Arc<Channel>) -> Result<()> {
        // In a task kept in the state, so a cancelled `recv` loses nothing:
        // a consumer started on the broker but dropped here would hold its
        // deliveries unseen until the channel closes.
        let start = state.starting.get_or_insert_with(|| {
            let (channel, queue) = (Arc::clone(channel), self.queue.clone());
            let bound = self.broker.inner.config.request_timeout;
            tokio::spawn(async move {
                bounded(
                    "starting to consume",
                    bound,
                    channel.basic_consume(
                        queue.as_str().into(),
                        ShortString::from(""),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await
            })
        });
        let started = start.await.unwrap_or_else(|e| {
            Err(Error::broker(
                format!("basic.consume task: {e}"),
                true,
                None,
            ))
        });
        state.starting = None;
        match started {
            Ok(consumer) => {
                state.consumer = Some(consumer);
                Ok(())
            }
            Err(e) => {
                self.broker.set_declared(&self.queue, false);
                state.channel = None;
                // Declared on this connection and gone now: deleted under
                // the receiver (a lost connection clears the declarations,
                // and a reopen declares again before it consumes).
                if is_not_found(&e)
                    && let Some(gone) = self.mark_gone(state).await
                {
                    return Err(gone);
                }
                Err(e)
            }
        }
    }

    /// One delivery while [`SlowStart`] holds the receiver to one at a time:
    /// once everything handed out is settled (and its ack sent), a
    /// `basic.get`. A first delivery, or an empty queue, opens the receiver:
    /// it starts consuming with the whole prefetch (`None` then: receive
    /// from the consumer).
    async fn get_one(self: &Arc<Self>, state: &mut ConsumeState) -> Option<Result<RawDelivery>> {
        let channel = state.channel.clone()?;
        while !self.inflight.is_settled() {
            self.inflight.flush();
            tokio::select! {
                () = tokio::time::sleep(SLOW_SETTLE_POLL) => {}
                () = self.cancel().cancelled() => return None,
            }
        }
        // In a task kept in the state, so a cancelled `recv` loses nothing:
        // the next one takes up the same `basic.get`.
        let get = state.get.get_or_insert_with(|| {
            let (channel, queue) = (Arc::clone(&channel), self.queue.clone());
            let bound = self.broker.inner.config.request_timeout;
            tokio::spawn(async move {
                bounded(
                    "fetching one message (basic.get)",
                    bound,
                    channel.basic_get(queue.as_str().into(), BasicGetOptions::default()),
                )
                .await
            })
        });
        let got = tokio::select! {
            got = get => got.unwrap_or_else(|e| Err(Error::broker(format!("basic.get task: {e}"), true, None))),
            () = self.cancel().cancelled() => return None,
        };
        state.get = None;
        match got {
            Ok(Some(message)) => {
                let key = (
                    self.generation.load(Ordering::Relaxed),
                    message.delivery.delivery_tag,
                );
                state.outside = Some(key);
                self.deliver(Some(&channel), message.delivery)
            }
            Ok(None) => {
                self.slow.open();
                None
            }
            Err(e) => {
                state.channel = None;
                if is_not_found(&e)
                    && let Some(gone) = self.mark_gone(state).await
                {
                    return Some(Err(gone));
                }
                Some(Err(e))
            }
        }
    }

    /// [`Error::NotFound`] when the broker confirms the receiver's queue is
    /// gone ([`queue_gone`](Self::queue_gone)); every later receive then
    /// returns it too.
    async fn mark_gone(&self, state: &mut ConsumeState) -> Option<Error> {
        let gone = self.queue_gone().await?;
        state.gone = Some(gone.replicate());
        Some(gone)
    }

    /// [`Error::NotFound`] when the broker says the receiver's queue does
    /// not exist (a passive declare answers 404), `None` when it exists or
    /// the broker cannot tell now (unreachable: a reopen will find out).
    async fn queue_gone(&self) -> Option<Error> {
        let channel = self.broker.channel().await.ok()?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let checked = tokio::time::timeout(
            self.broker.inner.config.request_timeout,
            channel.queue_declare(self.queue.as_str().into(), passive, FieldTable::default()),
        )
        .await
        .ok()?;
        match checked {
            Ok(_) => {
                let _ = channel.close(200, "checked".into()).await;
                None
            }
            Err(e) if reply_code(&e) == Some(404) => {
                // The broker closed the channel; the declaration is stale.
                self.broker.set_declared(&self.queue, false);
                Some(Error::not_found(
                    "queue",
                    self.queue.clone(),
                    format!("the subscription's queue was deleted: {e}"),
                    Some(Box::new(e)),
                ))
            }
            Err(_) => None,
        }
    }

    /// Stops consuming: closing the channel returns every unsettled
    /// delivery to the queue. Never waits for the state lock: a cancelled
    /// `recv` may hold it.
    async fn shutdown(&self) {
        self.cancel().cancel();
        // Acks recorded before the close go out before it.
        {
            let mut book = self.inflight.book();
            let _ = book.flush();
            book.clear();
        }
        let taken = self
            .state
            .try_lock()
            .ok()
            .map(|mut s| (s.consumer.take(), s.channel.take()));
        if let Some((consumer, Some(channel))) = taken {
            drop(consumer);
            if channel.status().connected() {
                let _ = tokio::time::timeout(
                    self.broker.inner.config.request_timeout,
                    channel.close(200, "closed".into()),
                )
                .await;
            }
        }
    }

    fn deliver(
        self: &Arc<Self>,
        channel: Option<&Arc<Channel>>,
        delivery: lapin::message::Delivery,
    ) -> Option<Result<RawDelivery>> {
        let Some(channel) = channel else {
            // Cannot happen: a consumer exists only with its channel.
            return Some(Err(Error::broker("delivery without a channel", true, None)));
        };
        let lapin::message::Delivery {
            delivery_tag,
            properties,
            data,
            ..
        } = delivery;
        let payload = bytes::Bytes::from(data);
        let generation = self.generation.load(Ordering::Relaxed);
        let (message, attempt) =
            codec::decode(&properties, payload.clone(), switchyard_core::new_id);
        self.slow.handed_out(attempt);
        let key = (generation, delivery_tag);
        self.inflight
            .insert(key, Instant::now() + self.ack_timeout, channel);
        Some(Ok(RawDelivery {
            message,
            attempt,
            acker: Box::new(RabbitAcker {
                shared: Arc::clone(self),
                key,
                channel: Arc::clone(channel),
                attempt,
                properties,
                payload,
            }),
        }))
    }
}

#[derive(Debug)]
struct RabbitReceiver {
    shared: Arc<ReceiverShared>,
}

#[async_trait]
impl Receiver for RabbitReceiver {
    /// The next delivery from the channel's consumer; the broker never sends
    /// more than the prefetch (`basic.qos`) unsettled. When the channel or
    /// the connection is lost, the consumer is reopened (with a growing
    /// pause between failed attempts, whose errors are returned).
    ///
    /// Cancel safe: the consumer is a channel of deliveries kept in the
    /// receiver's state.
    async fn recv(&self) -> Option<Result<RawDelivery>> {
        let s = &self.shared;
        let mut state = match s.state.try_lock() {
            Ok(state) => state,
            Err(_) => tokio::select! {
                st = s.state.lock() => st,
                () = s.cancel().cancelled() => return None,
            },
        };
        loop {
            if s.cancel().is_cancelled() {
                return None;
            }
            if let Some(gone) = &state.gone {
                return Some(Err(gone.replicate()));
            }
            if state.consumer.is_none()
                && let Some(channel) = state.channel.clone()
            {
                // Open, but not consuming yet: one at a time, or start now.
                if !s.slow.is_open()
                    && let Some(got) = s.get_one(&mut state).await
                {
                    return Some(got);
                }
                if s.slow.is_open() && state.channel.is_some() {
                    if let Err(e) = s.consume(&mut state, &channel).await {
                        return Some(Err(e));
                    }
                }
                continue;
            }
            if let Some(key) = state.outside {
                if !s.inflight.contains(key) {
                    state.outside = None;
                } else if s.inflight.unsettled() >= usize::from(s.prefetch) {
                    // Full: wait for a settlement before taking the next.
                    s.inflight.flush();
                    tokio::select! {
                        () = tokio::time::sleep(SLOW_SETTLE_POLL) => {}
                        () = s.cancel().cancelled() => return None,
                    }
                    continue;
                }
            }
            let Some(consumer) = state.consumer.as_mut() else {
                let pause = state.pause;
                if let Err(e) = s.open(&mut state).await {
                    state.pause = (pause * 2).min(MAX_REOPEN_PAUSE);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = s.cancel().cancelled() => return None,
                    }
                    return Some(Err(e));
                }
                continue;
            };
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    // About to wait for the broker: send the acks it may be
                    // waiting for first.
                    s.inflight.flush();
                    tokio::select! {
                        next = consumer.next() => next,
                        () = s.cancel().cancelled() => return None,
                    }
                }
            };
            match next {
                Some(Ok(delivery)) => return s.deliver(state.channel.as_ref(), delivery),
                // The channel or connection ended, or the broker cancelled
                // the consumer: reopen — unless the broker cancelled it
                // because its queue was deleted (the connection still up).
                Some(Err(_)) | None => {
                    let cancelled = state
                        .channel
                        .as_ref()
                        .is_some_and(|c| c.status().connected());
                    state.consumer = None;
                    state.channel = None;
                    if cancelled && let Some(gone) = s.mark_gone(&mut state).await {
                        return Some(Err(gone));
                    }
                }
            }
        }
    }

    fn try_recv(&self) -> Option<Result<RawDelivery>> {
        let s = &self.shared;
        if s.cancel().is_cancelled() {
            return None;
        }
        let mut state = s.state.try_lock().ok()?;
        // Counting against the prefetch itself: `recv`'s work.
        if state.outside.is_some() {
            return None;
        }
        match state.consumer.as_mut()?.next().now_or_never()? {
            Some(Ok(delivery)) => s.deliver(state.channel.as_ref(), delivery),
            // Leave reopening to `recv`.
            Some(Err(_)) | None => {
                state.consumer = None;
                state.channel = None;
                None
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.shared.shutdown().await;
        Ok(())
    }
}

impl Drop for RabbitReceiver {
    fn drop(&mut self) {
        // A dropped consumer: stop the reaper; dropping the channel closes
        // it, which returns its unsettled deliveries to the queue.
        self.shared.cancel().cancel();
        self.shared.inflight.flush();
        if let Ok(mut state) = self.shared.state.try_lock() {
            state.consumer = None;
            state.channel = None;
        }
    }
}

struct RabbitAcker {
    shared: Arc<ReceiverShared>,
    key: Key,
    channel: Arc<Channel>,
    attempt: u32,
    /// Kept to republish the delivery into a wait queue on a delayed nack.
    properties: BasicProperties,
    payload: bytes::Bytes,
}

impl fmt::Debug for RabbitAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitAcker")
            .field("delivery_tag", &self.key.1)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl RabbitAcker {
    fn check_open(&self) -> Result<()> {
        if self.shared.cancel().is_cancelled() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn lost(&self, what: &str) -> Error {
        Error::Connection {
            message: format!("{what}: the channel closed first; the broker redelivers the message"),
            source: None,
        }
    }

    /// Returns the delivery to the queue (`basic.reject` with requeue),
    /// once: a delivery whose ack timeout expired was returned already
    /// (settling it again is a no-op, as on other brokers; an AMQP
    /// settlement of an unknown tag would close the channel), and one whose
    /// channel is gone was returned by the broker.
    fn reject(&self) -> Result<()> {
        let connected = self.channel.status().connected();
        match self.shared.inflight.book().reject(self.key)? {
            true if !connected => Err(self.lost("nack")),
            _ => Ok(()),
        }
    }

    /// Acks once (see [`reject`](Self::reject)), coalesced with the
    /// receiver's other acks: sent with the next ones as one `multiple` ack
    /// when a quarter of the prefetch is acked, before the receiver waits
    /// for the broker, on close, or within [`ACK_FLUSH_DELAY`].
    fn ack_once(&self, what: &str) -> Result<()> {
        match self.shared.inflight.ack(self.key) {
            Acked::Late => Ok(()),
            Acked::Deferred if !self.channel.status().connected() => Err(self.lost(what)),
            Acked::Deferred => Ok(()),
            Acked::Sent(result) => result,
        }
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    /// `Ok` once the ack is recorded; it reaches the broker within
    /// milliseconds, coalesced with others (AMQP does not confirm acks
    /// either way). A lost connection or a crash before then shows up as a
    /// redelivery, never as loss.
    async fn ack(&self) -> Result<()> {
        self.check_open()?;
        self.ack_once("ack")
    }

    /// Without a delay: `basic.reject` with requeue (the quorum queue counts
    /// the attempt). With one: a copy carrying the attempts so far is
    /// published (confirmed) to a wait queue whose TTL is the delay rounded
    /// up to two significant digits, which dead-letters it back to the
    /// subscription's queue; then the original is acked.
    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.check_open()?;
        match delay.filter(|d| !d.is_zero()) {
            None => self.reject(),
            Some(delay) => {
                if !self.shared.inflight.contains(self.key) {
                    // Expired and returned already: it comes back anyway.
                    return Ok(());
                }
                let props = codec::with_attempts(&self.properties, self.attempt);
                self.shared
                    .broker
                    .publish_delayed(&self.shared.queue, delay, &self.payload, props)
                    .await?;
                self.ack_once("ack after a delayed nack")
            }
        }
    }

    /// Moves the receiver's deadline for the delivery to an ack timeout
    /// from now (one already returned is not revived). RabbitMQ's own
    /// `consumer_timeout` (30 minutes by default) still bounds how long a
    /// channel may hold an unacked delivery.
    async fn extend(&self) -> Result<()> {
        self.check_open()?;
        let deadline = Instant::now() + self.shared.ack_timeout;
        self.shared.inflight.book().extend(self.key, deadline);
        Ok(())
    }
}
