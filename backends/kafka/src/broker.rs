//! The Kafka backend's broker: connecting, the admin client, topics and
//! groups, publishing through the producer.

use std::{
    collections::HashSet,
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer},
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseRecord, Producer as _},
};
use switchyard_core::{
    Capabilities, Client, Error, KeyOrdering, Message, Result, SubscribeOptions,
    driver::{Broker, Lifecycle, Publisher, Receiver, ReceiverHandle, Subscriber},
};

use crate::{
    KafkaConfig,
    codec::{self, Retry},
    error::kafka_error,
    names,
    producer::{Batch, DeliveryReports, KafkaProducer},
    receiver::RecvInner,
};

/// Bytes of `max_message_bytes` kept for the key, headers and framing: the
/// payload limit switchyard reports is the configured size minus this.
const HEADER_RESERVE: usize = 64 * 1024;
/// Pause between attempts to enqueue while librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);
/// How much longer than `publish_timeout` a publish waits for librdkafka's
/// own verdict (its message timeouts are scanned about once a second).
const REPORT_MARGIN: Duration = Duration::from_secs(1);

pub(crate) fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// Runs blocking librdkafka work off the async threads, bounded by `bound`.
pub(crate) async fn blocking<T: Send + 'static>(
    operation: &'static str,
    bound: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(bound, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(Error::broker(
            format!("{operation} failed: {join}"),
            false,
            None,
        )),
        Err(_) => Err(Error::Timeout {
            operation,
            after: bound,
        }),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The Kafka backend (see the [crate docs](crate)).
///
/// Cheap to clone; every clone shares the producer and the admin client.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<BrokerInner>,
}

pub(crate) struct BrokerInner {
    pub(crate) config: KafkaConfig,
    producer: KafkaProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist (created or found).
    topics: Mutex<HashSet<String>>,
    /// Groups whose start position was settled (`ensure_subscription`).
    groups: Mutex<HashSet<String>>,
    pub(crate) life: Lifecycle<RecvInner>,
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", &self.inner.config)
            .field("life", &self.inner.life)
            .finish_non_exhaustive()
    }
}

/// Connects to Kafka at `url` (`kafka://host:port[,host:port…][?…]`, see
/// [`KafkaConfig::from_url`]) and returns a [`Client`].
///
/// # Errors
///
/// [`Error::InvalidUrl`] for a bad URL; [`Error::Connection`] when no
/// bootstrap server answers within the connect timeout.
pub async fn connect(url: &str) -> Result<Client> {
    let config = KafkaConfig::from_url(url)?;
    Ok(Client::new(KafkaBroker::connect(config).await?))
}

impl KafkaBroker {
    /// Creates the producer and admin client and checks that the cluster
    /// answers within the connect timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when librdkafka rejects a property;
    /// [`Error::Connection`] when no bootstrap server answers in time.
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        let base = base_config(&config);
        let mut producer_config = base.clone();
        producer_config
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", millis(config.publish_timeout))
            .set("message.max.bytes", config.max_message_bytes.to_string())
            // A record without a key goes to a random partition, not to the
            // partition librdkafka sticks to for 10 ms: a burst of keyless
            // messages divides among a subscription's consumers, as it does
            // on the other brokers. (Overridable in the URL.)
            .set("sticky.partitioning.linger.ms", "0");
        for (k, v) in &config.properties {
            producer_config.set(k, v);
        }
        let producer: KafkaProducer = producer_config
            .create_with_context(DeliveryReports::default())
            .map_err(|e| Error::Config(format!("Kafka producer: {e}")))?;
        let admin: AdminClient<DefaultClientContext> = base
            .create()
            .map_err(|e| Error::Config(format!("Kafka admin client: {e}")))?;
        let probe = producer.clone();
        let bound = config.connect_timeout;
        let servers = config.bootstrap.clone();
        blocking(
            "connecting to Kafka",
            bound + Duration::from_secs(1),
            move || {
                probe
                    .client()
                    .fetch_metadata(None, bound)
                    .map(drop)
                    .map_err(|e| {
                        Error::connection(
                            format!("cannot reach Kafka at {servers} within {bound:?}"),
                            e,
                        )
                    })
            },
        )
        .await?;
        Ok(Self {
            inner: Arc::new(BrokerInner {
                config,
                producer,
                admin,
                topics: Mutex::new(HashSet::new()),
                groups: Mutex::new(HashSet::new()),
                life: Lifecycle::new(),
            }),
        })
    }

    /// The native producer (an escape hatch for metadata, the in-flight
    /// count or a flush; switchyard's records carry the headers described in
    /// the crate docs and go through [`Publisher::publish`]).
    pub fn producer(&self) -> &KafkaProducer {
        &self.inner.producer
    }

    /// The consumer group of a subscription on `topic`.
    #[must_use]
    pub fn group_id(&self, topic: &str, subscription: &str) -> String {
        names::group(topic, subscription)
    }

    /// The retry topic of a subscription on `topic`.
    #[must_use]
    pub fn retry_topic(&self, topic: &str, subscription: &str) -> String {
        names::retry_topic(topic, subscription)
    }

    fn limit(&self) -> usize {
        self.inner
            .config
            .max_message_bytes
            .saturating_sub(HEADER_RESERVE)
    }

    fn check_open(&self) -> Result<()> {
        self.inner.life.check_open()
    }
}

pub(crate) fn base_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap)
        .set(
            "socket.connection.setup.timeout.ms",
            millis(config.connect_timeout),
        )
        // Every request librdkafka sends (a commit, an offset fetch, a
        // produce) gives up after the request timeout, not its 60 s
        // default: a synchronous commit on a dead link returns in bounded
        // time.
        .set("socket.timeout.ms", millis(config.request_timeout));
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    c
}

impl BrokerInner {
    /// Creates the topics that are not known to exist yet.
    async fn ensure_topics(&self, topics: &[&str]) -> Result<()> {
        let missing: Vec<&str> = {
            let known = lock(&self.topics);
            topics
                .iter()
                .copied()
                .filter(|t| !known.contains(*t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let c = &self.config;
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    c.partitions,
                    TopicReplication::Fixed(c.replication_factor),
                )
            })
            .collect();
        let opts = AdminOptions::new()
            .request_timeout(Some(c.request_timeout))
            .operation_timeout(Some(c.request_timeout));
        let results = tokio::time::timeout(
            c.request_timeout + Duration::from_secs(1),
            self.admin.create_topics(&new, &opts),
        )
        .await
        .map_err(|_| Error::Timeout {
            operation: "creating topics",
            after: c.request_timeout,
        })?
        .map_err(|e| kafka_error("creating topics", e))?;
        let mut known = lock(&self.topics);
        for r in results {
            match r {
                Ok(t) | Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    known.insert(t);
                }
                Err((t, code)) => {
                    return Err(kafka_error(
                        &format!("creating topic {t}"),
                        KafkaError::AdminOp(code),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Enqueues a record of `batch`, waiting while librdkafka's queue is full.
    async fn enqueue(
        &self,
        topic: &str,
        message: &Message,
        encoded: codec::Encoded,
        batch: &Arc<Batch>,
    ) -> Result<()> {
        let mut record = BaseRecord::with_opaque_to(topic, Arc::clone(batch))
            .payload(message.payload().as_ref())
            .headers(encoded.headers)
            .timestamp(encoded.timestamp_ms);
        if let Some(k) = message.key() {
            record = record.key(k);
        }
        let deadline = tokio::time::Instant::now() + self.config.publish_timeout;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Timeout {
                            operation: "enqueueing a publish",
                            after: self.config.publish_timeout,
                        });
                    }
                    record = r;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, _)) => return Err(kafka_error("publish", e)),
            }
        }
    }

    /// Publishes `messages` (with their encodings, or the error that kept
    /// one from being sent) and waits for every delivery report: one result
    /// per message, in order.
    pub(crate) async fn publish_all(
        &self,
        topic: &str,
        messages: Vec<(&Message, Result<codec::Encoded>)>,
    ) -> Vec<Result<()>> {
        let bound = self.config.publish_timeout + REPORT_MARGIN;
        let until = tokio::time::Instant::now() + bound;
        let batch = Batch::new(messages.len());
        let mut results = Vec::with_capacity(messages.len());
        for (message, encoded) in messages {
            let queued = match encoded {
                Ok(encoded) => self.enqueue(topic, message, encoded, &batch).await,
                Err(e) => Err(e),
            };
            if queued.is_err() {
                // Never enqueued: no report will come for it.
                batch.settle(None);
            }
            results.push((message.id(), queued));
        }
        // librdkafka times a message out after `message.timeout.ms` only
        // once its produce request is answered or times out itself; on a
        // blackholed link that is `socket.timeout.ms` later. The caller
        // gets its answer within the publish timeout regardless (a record
        // that still lands later is a duplicate on retry, never a loss).
        let Ok(failed) = tokio::time::timeout_at(until, batch.reported()).await else {
            return results
                .into_iter()
                .map(|(_, queued)| {
                    queued?;
                    Err(Error::Timeout {
                        operation: "publish (waiting for the broker's acknowledgement)",
                        after: bound,
                    })
                })
                .collect();
        };
        results
            .into_iter()
            .map(|(id, queued)| {
                queued?;
                // A failed report names its record by id; records sharing an
                // id share the failure (reported as not confirmed: at worst
                // a confirmed record is published again, never the reverse).
                match failed.iter().find(|(f, _)| f.as_deref() == Some(id)) {
                    Some((_, e)) => Err(kafka_error("publish not confirmed", e.clone())),
                    None => Ok(()),
                }
            })
            .collect()
    }

    /// Publishes a retry record for a nacked or expired delivery (confirmed).
    pub(crate) async fn publish_retry(
        &self,
        retry_topic: &str,
        message: &Message,
        retry: Retry,
    ) -> Result<()> {
        self.ensure_topics(&[retry_topic]).await?;
        let encoded = codec::encode(message, Some(&retry));
        self.publish_all(retry_topic, vec![(message, Ok(encoded))])
            .await
            .pop()
            .unwrap_or(Err(Error::Closed))
    }

    /// Makes a new group start at the current end of `topic`, so it gets
    /// exactly what is published from now on; a group that committed
    /// anything before keeps its position.
    async fn ensure_group(&self, topic: &str, group: &str) -> Result<()> {
        if lock(&self.groups).contains(group) {
            return Ok(());
        }
        let mut config = base_config(&self.config);
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let timeout = self.config.request_timeout;
        let topic_owned = topic.to_owned();
        blocking("creating a consumer group", timeout * 4, move || {
            let consumer: BaseConsumer = config
                .create()
                .map_err(|e| Error::Config(format!("Kafka consumer: {e}")))?;
            let result = start_group_at_end(&consumer, &topic_owned, timeout);
            // Dropping closes the consumer; it never joined, so this is quick.
            drop(consumer);
            result
        })
        .await?;
        lock(&self.groups).insert(group.to_owned());
        Ok(())
    }
}

/// The partitions of `topic`, waiting briefly for a new topic's metadata.
fn partitions(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| kafka_error("reading topic metadata", e))?;
        if let Some(t) = md.topics().iter().find(|t| t.name() == topic)
            && t.error().is_none()
            && !t.partitions().is_empty()
        {
            return Ok(t.partitions().iter().map(|p| p.id()).collect());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                operation: "waiting for topic metadata",
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_group_at_end(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<()> {
    let parts = partitions(consumer, topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for &p in &parts {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| kafka_error("reading committed offsets", e))?;
    if committed
        .elements()
        .iter()
        .any(|e| e.offset() != Offset::Invalid)
    {
        return Ok(());
    }
    let mut start = TopicPartitionList::new();
    for &p in &parts {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| kafka_error("reading high watermarks", e))?;
        start
            .add_partition_offset(topic, p, Offset::Offset(high))
            .map_err(|e| kafka_error("building offsets", e))?;
    }
    match consumer.commit(&start, CommitMode::Sync) {
        Ok(()) => Ok(()),
        // A group with live members (a consumer already attached) exists.
        Err(e)
            if matches!(
                e.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::RebalanceInProgress
                        | RDKafkaErrorCode::UnknownMemberId
                        | RDKafkaErrorCode::IllegalGeneration
                )
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(kafka_error("committing the group's start offsets", e)),
    }
}

#[async_trait]
impl Publisher for KafkaBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.check_open()?;
        let encoded = self.prepare(&message)?;
        self.inner.ensure_topics(&[topic]).await?;
        self.inner
            .publish_all(topic, vec![(&message, Ok(encoded))])
            .await
            .pop()
            .unwrap_or(Err(Error::Closed))
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        if let Err(e) = self.check_open() {
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        if let Err(e) = self.inner.ensure_topics(&[topic]).await {
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        // Enqueue everything (librdkafka batches and pipelines), then wait
        // for the batch's delivery reports.
        let prepared = messages.iter().map(|m| (m, self.prepare(m))).collect();
        self.inner.publish_all(topic, prepared).await
    }

    /// Closes the receivers and flushes the producer, all at once: at most
    /// `publish_timeout + request_timeout` (a receiver's close), also on a
    /// dead network. The first error is returned, after everything closed.
    async fn close(&self) -> Result<()> {
        let receivers = self.inner.life.close();
        let producer = self.inner.producer.clone();
        let bound = self.inner.config.publish_timeout;
        let flush = blocking(
            "flushing the producer",
            bound + Duration::from_secs(1),
            move || {
                producer
                    .flush(bound)
                    .map_err(|e| kafka_error("flushing the producer", e))
            },
        );
        let (closed, flushed) = tokio::join!(
            futures_util::future::join_all(receivers.iter().map(|r| r.hand_back())),
            flush
        );
        closed.into_iter().collect::<Result<Vec<()>>>()?;
        flushed
    }
}

impl KafkaBroker {
    /// Encodes and size-checks a message.
    fn prepare(&self, message: &Message) -> Result<codec::Encoded> {
        let encoded = codec::encode(message, None);
        let payload = message.payload().len();
        let size = payload + (encoded.size - payload).saturating_sub(HEADER_RESERVE);
        let limit = self.limit();
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok(encoded)
    }
}

#[async_trait]
impl Subscriber for KafkaBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        self.inner.ensure_topics(&[topic]).await
    }

    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open()?;
        let retry = names::retry_topic(topic, options.name());
        self.inner.ensure_topics(&[topic, &retry]).await?;
        self.inner
            .ensure_group(topic, &names::group(topic, options.name()))
            .await
    }

    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
        self.ensure_subscription(topic, options).await?;
        let receiver = RecvInner::open(&self.inner, topic, options).await?;
        self.inner.life.adopt(&receiver);
        Ok(Box::new(ReceiverHandle::new(receiver)))
    }

    async fn close(&self) -> Result<()> {
        let receivers = self.inner.life.close();
        futures_util::future::join_all(receivers.iter().map(|r| r.hand_back()))
            .await
            .into_iter()
            .collect()
    }
}

impl Broker for KafkaBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.limit())
            .with_backend("kafka")
            .with_ordering(KeyOrdering::PerKey)
            .with_native_delay(true)
            .with_fan_out(true)
            .with_competing_consumers(true)
            .with_persistent(true)
            .with_min_ack_timeout(Duration::from_millis(10))
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
