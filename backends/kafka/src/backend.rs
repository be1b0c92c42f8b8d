//! The Kafka backend: producer, admin client, receivers, ackers.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::{ClientContext, DefaultClientContext},
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::Message as _,
    producer::{FutureProducer, FutureRecord, Producer as _, future_producer::DeliveryFuture},
};
use switchyard_core::{
    Acker, Broker, Capabilities, Client, Error, KeyOrdering, Message, Publisher, RawDelivery,
    Receiver, Result, SubscribeOptions, Subscriber, driver::ReceiverSet,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    KafkaConfig,
    codec::{self, Retry},
    names,
    offsets::Track,
};

/// Bytes of `max_message_bytes` kept for the key, headers and framing: the
/// payload limit switchyard reports is the configured size minus this.
const HEADER_RESERVE: usize = 64 * 1024;
/// Pause between attempts to enqueue while librdkafka's queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);
/// Pause before a failed expiry re-publish is tried again.
const REAP_RETRY: Duration = Duration::from_secs(1);

/// Maps a librdkafka error: transport and timeouts → connection errors;
/// authentication → [`Error::Authentication`]; the rest → broker errors.
fn kafka_error(what: &str, e: KafkaError) -> Error {
    let text = format!("{what}: {e}");
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException,
        ) => Error::connection(text, e),
        Some(
            RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => Error::Authentication {
            message: text,
            source: Some(Box::new(e)),
        },
        code => {
            let retryable = matches!(
                code,
                Some(
                    RDKafkaErrorCode::LeaderNotAvailable
                        | RDKafkaErrorCode::NotLeaderForPartition
                        | RDKafkaErrorCode::UnknownTopicOrPartition
                        | RDKafkaErrorCode::NotEnoughReplicas
                        | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                        | RDKafkaErrorCode::QueueFull
                        | RDKafkaErrorCode::CoordinatorNotAvailable
                        | RDKafkaErrorCode::NotCoordinator
                        | RDKafkaErrorCode::RebalanceInProgress
                )
            );
            Error::broker(text, retryable, Some(Box::new(e)))
        }
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

/// Runs blocking librdkafka work off the async threads, bounded by `bound`.
async fn blocking<T: Send + 'static>(
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

/// Runs a short blocking librdkafka call on an async thread, telling the
/// runtime when it can move other tasks away.
fn block_briefly<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The Kafka backend (see the [crate docs](crate)).
///
/// Cheap to clone; every clone shares the producer and the admin client.
#[derive(Clone)]
pub struct KafkaBroker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    config: KafkaConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist (created or found).
    topics: Mutex<HashSet<String>>,
    /// Groups whose start position was settled (`ensure_subscription`).
    groups: Mutex<HashSet<String>>,
    closed: CancellationToken,
    receivers: ReceiverSet<RecvInner>,
}

impl fmt::Debug for KafkaBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBroker")
            .field("config", &self.inner.config)
            .field("closed", &self.inner.closed.is_cancelled())
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
            .set("message.max.bytes", config.max_message_bytes.to_string());
        for (k, v) in &config.properties {
            producer_config.set(k, v);
        }
        let producer: FutureProducer = producer_config
            .create()
            .map_err(|e| Error::Config(format!("Kafka producer: {e}")))?;
        let admin: AdminClient<DefaultClientContext> = base
            .create()
            .map_err(|e| Error::Config(format!("Kafka admin client: {e}")))?;
        let probe = producer.clone();
        let bound = config.connect_timeout;
        let servers = config.bootstrap.clone();
        blocking("connecting to Kafka", bound + Duration::from_secs(1), move || {
            probe
                .client()
                .fetch_metadata(None, bound)
                .map(drop)
                .map_err(|e| {
                    Error::connection(format!("cannot reach Kafka at {servers} within {bound:?}"), e)
                })
        })
        .await?;
        Ok(Self {
            inner: Arc::new(BrokerInner {
                config,
                producer,
                admin,
                topics: Mutex::new(HashSet::new()),
                groups: Mutex::new(HashSet::new()),
                closed: CancellationToken::new(),
                receivers: ReceiverSet::new(),
            }),
        })
    }

    /// The native producer (an escape hatch; switchyard's records carry the
    /// headers described in the crate docs).
    #[must_use]
    pub fn producer(&self) -> &FutureProducer {
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
        if self.inner.closed.is_cancelled() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }
}

fn base_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap).set(
        "socket.connection.setup.timeout.ms",
        millis(config.connect_timeout),
    );
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
            .map(|t| NewTopic::new(t, c.partitions, TopicReplication::Fixed(c.replication_factor)))
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

    /// Enqueues a record, waiting while librdkafka's queue is full.
    async fn enqueue(
        &self,
        topic: &str,
        message: &Message,
        encoded: codec::Encoded,
    ) -> Result<DeliveryFuture> {
        let mut record = FutureRecord::to(topic)
            .payload(message.payload().as_ref())
            .headers(encoded.headers)
            .timestamp(encoded.timestamp_ms);
        if let Some(k) = message.key() {
            record = record.key(k);
        }
        let deadline = tokio::time::Instant::now() + self.config.publish_timeout;
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
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

    async fn confirmed(f: DeliveryFuture) -> Result<()> {
        match f.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(kafka_error("publish not confirmed", e)),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Publishes a retry record for a nacked or expired delivery (confirmed).
    async fn publish_retry(&self, retry_topic: &str, message: &Message, retry: Retry) -> Result<()> {
        self.ensure_topics(&[retry_topic]).await?;
        let encoded = codec::encode(message, Some(&retry));
        let f = self.enqueue(retry_topic, message, encoded).await?;
        Self::confirmed(f).await
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
        let f = self.inner.enqueue(topic, &message, encoded).await?;
        BrokerInner::confirmed(f).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        if let Err(e) = self.check_open() {
            return messages.iter().map(|_| Err(e.clone_shallow())).collect();
        }
        if let Err(e) = self.inner.ensure_topics(&[topic]).await {
            return messages.iter().map(|_| Err(e.clone_shallow())).collect();
        }
        // Enqueue everything (librdkafka batches and pipelines), then
        // collect the delivery reports in input order.
        let mut pending = Vec::with_capacity(messages.len());
        for m in &messages {
            let queued = match self.prepare(m) {
                Ok(encoded) => self.inner.enqueue(topic, m, encoded).await,
                Err(e) => Err(e),
            };
            pending.push(queued);
        }
        let mut results = Vec::with_capacity(pending.len());
        for p in pending {
            results.push(match p {
                Ok(f) => BrokerInner::confirmed(f).await,
                Err(e) => Err(e),
            });
        }
        results
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        for r in self.inner.receivers.take_live() {
            r.shutdown().await?;
        }
        let producer = self.inner.producer.clone();
        let bound = self.inner.config.publish_timeout;
        blocking("flushing the producer", bound + Duration::from_secs(1), move || {
            producer
                .flush(bound)
                .map_err(|e| kafka_error("flushing the producer", e))
        })
        .await
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

/// Errors are not `Clone` (they keep their source); a batch that fails as a
/// whole reports the same failure for every message.
trait CloneShallow {
    fn clone_shallow(&self) -> Error;
}

impl CloneShallow for Error {
    fn clone_shallow(&self) -> Error {
        match self {
            Error::Closed => Error::Closed,
            Error::Timeout { operation, after } => Error::Timeout {
                operation,
                after: *after,
            },
            Error::Connection { message, .. } => Error::Connection {
                message: message.clone(),
                source: None,
            },
            other => Error::broker(other.to_string(), other.is_retryable(), None),
        }
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
        let inner = RecvInner::open(&self.inner, topic, options)?;
        self.inner.receivers.insert(&inner);
        tokio::spawn(committer(Arc::downgrade(&inner)));
        tokio::spawn(reaper(Arc::downgrade(&inner)));
        Ok(Box::new(KafkaReceiver { inner }))
    }

    async fn close(&self) -> Result<()> {
        for r in self.inner.receivers.take_live() {
            r.shutdown().await?;
        }
        Ok(())
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
}

// ---------------------------------------------------------------------------
// Receiving

/// A partition of the subscription: the topic's (`false`) or the retry
/// topic's (`true`).
type Part = (bool, i32);

/// A record handed out and not settled yet.
struct Handed {
    part: Part,
    epoch: u64,
    offset: i64,
    message: Message,
    attempt: u32,
    deadline: Instant,
    /// Being re-published (nack or expiry): not touched by anyone else.
    busy: bool,
}

/// A retry record waiting for its due time.
struct Held {
    due_ms: i64,
    seq: u64,
    part: Part,
    epoch: u64,
    offset: i64,
    message: Message,
    attempt: u32,
    redeliveries: u32,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due_ms, self.seq) == (other.due_ms, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due_ms, self.seq).cmp(&(other.due_ms, other.seq))
    }
}

#[derive(Default)]
struct State {
    /// Assigned partitions, each with the epoch of its assignment.
    tracks: HashMap<Part, (u64, Track)>,
    next_epoch: u64,
    handed: HashMap<u64, Handed>,
    next_token: u64,
    held: BinaryHeap<Reverse<Held>>,
    next_seq: u64,
    closed: bool,
}

impl State {
    fn is_current(&self, part: Part, epoch: u64) -> bool {
        self.tracks.get(&part).is_some_and(|(e, _)| *e == epoch)
    }

    fn settle(&mut self, part: Part, epoch: u64, offset: i64) {
        if let Some((e, t)) = self.tracks.get_mut(&part)
            && *e == epoch
        {
            t.settle(offset);
        }
    }

    /// The offsets to commit: of dirty partitions, or of all of `parts`.
    fn commit_list(&mut self, names: &Names, only: Option<&[Part]>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (part, (_, track)) in &mut self.tracks {
            let wanted = match only {
                Some(parts) => parts.contains(part),
                None => track.dirty,
            };
            if !wanted {
                continue;
            }
            track.dirty = false;
            if let Some((offset, meta)) = track.commit_point() {
                let mut e = tpl.add_partition(names.of(part.0), part.1);
                if e.set_offset(Offset::Offset(offset)).is_ok() {
                    e.set_metadata(meta);
                }
            }
        }
        tpl
    }
}

/// The two topic names of a subscription.
#[derive(Debug, Clone)]
struct Names {
    topic: String,
    retry: String,
}

impl Names {
    fn of(&self, retry: bool) -> &str {
        if retry { &self.retry } else { &self.topic }
    }

    fn part(&self, topic: &str, partition: i32) -> Option<Part> {
        if topic == self.topic {
            Some((false, partition))
        } else if topic == self.retry {
            Some((true, partition))
        } else {
            None
        }
    }
}

/// What the consumer's callbacks share with the receiver.
struct Shared {
    names: Names,
    state: Mutex<State>,
    request_timeout: Duration,
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        // Commit what is settled, then forget the partitions: deliveries
        // still out are redelivered to the new owner (their acks become
        // no-ops), records held for later are fetched again there.
        let names = &self.shared.names;
        let parts: Vec<Part> = list
            .elements()
            .iter()
            .filter_map(|e| names.part(e.topic(), e.partition()))
            .collect();
        let tpl = {
            let mut st = lock(&self.shared.state);
            let tpl = st.commit_list(names, Some(&parts));
            for p in &parts {
                st.tracks.remove(p);
            }
            let held = std::mem::take(&mut st.held);
            st.held = held.into_iter().filter(|h| !parts.contains(&h.0.part)).collect();
            tpl
        };
        if tpl.count() > 0
            && let Err(e) = consumer.commit(&tpl, CommitMode::Sync)
        {
            tracing::warn!(error = %e, "kafka: commit on revoke failed; settled records may be delivered again");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(list) = rebalance else {
            return;
        };
        let names = &self.shared.names;
        let committed = match consumer.committed_offsets((*list).clone(), self.shared.request_timeout)
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "kafka: reading committed offsets failed; delivery counts restart");
                (*list).clone()
            }
        };
        let mut st = lock(&self.shared.state);
        for e in committed.elements() {
            let Some(part) = names.part(e.topic(), e.partition()) else {
                continue;
            };
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            let epoch = st.next_epoch;
            st.next_epoch += 1;
            st.tracks
                .insert(part, (epoch, Track::new(offset, e.metadata())));
        }
    }
}

type KConsumer = StreamConsumer<Ctx>;

struct RecvInner {
    broker: Weak<BrokerInner>,
    shared: Arc<Shared>,
    consumer: Mutex<Option<Arc<KConsumer>>>,
    /// `topic:subscription`, the tag of this subscription's retry records.
    target: String,
    prefetch: usize,
    ack_timeout: Duration,
    commit_interval: Duration,
    request_timeout: Duration,
    closed: CancellationToken,
    /// Signalled when a handed-out delivery is settled.
    room: Notify,
    /// Signalled when offsets need committing.
    commit: Notify,
    /// One `recv` at a time polls the consumer.
    recv_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for RecvInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaReceiver")
            .field("subscription", &self.target)
            .field("prefetch", &self.prefetch)
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// What became of a fetched record.
enum Admit {
    Skip,
    Held,
    Ready(Held),
}

impl RecvInner {
    fn open(
        broker: &Arc<BrokerInner>,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<Arc<Self>> {
        let names = Names {
            topic: topic.to_owned(),
            retry: names::retry_topic(topic, options.name()),
        };
        let group = names::group(topic, options.name());
        let config = &broker.config;
        let mut cc = base_config(config);
        cc.set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        let shared = Arc::new(Shared {
            names: names.clone(),
            state: Mutex::new(State::default()),
            request_timeout: config.request_timeout,
        });
        let consumer: KConsumer = cc
            .create_with_context(Ctx {
                shared: Arc::clone(&shared),
            })
            .map_err(|e| Error::Config(format!("Kafka consumer: {e}")))?;
        consumer
            .subscribe(&[&names.topic, &names.retry])
            .map_err(|e| kafka_error("subscribing", e))?;
        Ok(Arc::new(Self {
            broker: Arc::downgrade(broker),
            shared,
            consumer: Mutex::new(Some(Arc::new(consumer))),
            target: group,
            prefetch: options.prefetch_limit(),
            ack_timeout: options.ack_timeout_value(),
            commit_interval: config.commit_interval,
            request_timeout: config.request_timeout,
            closed: CancellationToken::new(),
            room: Notify::new(),
            commit: Notify::new(),
            recv_lock: tokio::sync::Mutex::new(()),
        }))
    }

    fn consumer(&self) -> Option<Arc<KConsumer>> {
        lock(&self.consumer).clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    /// Registers a fetched record (under the state lock).
    fn admit(
        &self,
        st: &mut State,
        part: Part,
        offset: i64,
        decoded: codec::Decoded,
    ) -> Admit {
        let Some((epoch, track)) = st.tracks.get_mut(&part) else {
            return Admit::Skip;
        };
        let epoch = *epoch;
        let Some(redeliveries) = track.fetched(offset) else {
            return Admit::Skip;
        };
        let (attempt, due_ms) = if part.0 {
            match decoded.retry {
                Some(r) if r.target == self.target => (r.attempt.max(1), r.due_ms),
                _ => {
                    // Another subscription's retry (a shared retry topic) or
                    // a foreign record: not ours to deliver.
                    track.settle(offset);
                    return Admit::Skip;
                }
            }
        } else {
            (1, 0)
        };
        let seq = st.next_seq;
        st.next_seq += 1;
        let held = Held {
            due_ms,
            seq,
            part,
            epoch,
            offset,
            message: decoded.message,
            attempt,
            redeliveries,
        };
        if due_ms > codec::unix_ms(SystemTime::now()) {
            st.held.push(Reverse(held));
            Admit::Held
        } else {
            Admit::Ready(held)
        }
    }

    /// Hands out an admitted record (under the state lock); returns the
    /// delivery and, for the head of an assignment, the offsets to commit
    /// before handing it out.
    fn hand_out(self: &Arc<Self>, st: &mut State, h: Held) -> (RawDelivery, TopicPartitionList) {
        let mut head = TopicPartitionList::new();
        if let Some((_, track)) = st.tracks.get_mut(&h.part)
            && track.handed(h.offset, h.redeliveries)
        {
            head = st.commit_list(&self.shared.names, Some(&[h.part]));
        }
        let token = st.next_token;
        st.next_token += 1;
        let attempt = h.attempt.saturating_add(h.redeliveries);
        st.handed.insert(
            token,
            Handed {
                part: h.part,
                epoch: h.epoch,
                offset: h.offset,
                message: h.message.clone(),
                attempt,
                deadline: Instant::now() + self.ack_timeout,
                busy: false,
            },
        );
        let delivery = RawDelivery {
            message: h.message,
            attempt,
            acker: Box::new(KafkaAcker {
                inner: Arc::downgrade(self),
                token,
            }),
        };
        (delivery, head)
    }

    /// Commits synchronously (a head's raised delivery count).
    fn commit_now(&self, consumer: &KConsumer, tpl: &TopicPartitionList) {
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = block_briefly(|| consumer.commit(tpl, CommitMode::Sync)) {
            tracing::warn!(error = %e, "kafka: committing a delivery count failed");
        }
    }

    async fn recv(self: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let _one = tokio::select! {
            g = self.recv_lock.lock() => g,
            () = self.closed.cancelled() => return None,
        };
        let consumer = self.consumer()?;
        loop {
            if self.closed.is_cancelled() {
                return None;
            }
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            // Some(due): room for a delivery, the next held record is due
            // then (None inside: nothing held); None: no room.
            let room_and_due = {
                let mut st = self.state();
                if st.handed.len() < self.prefetch {
                    let now_ms = codec::unix_ms(SystemTime::now());
                    let mut ready = None;
                    while let Some(Reverse(h)) = st.held.peek()
                        && h.due_ms <= now_ms
                    {
                        let Some(Reverse(h)) = st.held.pop() else { break };
                        if st.is_current(h.part, h.epoch) {
                            ready = Some(self.hand_out(&mut st, h));
                            break;
                        }
                    }
                    if let Some((d, head)) = ready {
                        drop(st);
                        self.commit_now(&consumer, &head);
                        return Some(Ok(d));
                    }
                    Some(st.held.peek().map(|Reverse(h)| h.due_ms))
                } else {
                    None
                }
            };
            let Some(next_due) = room_and_due else {
                tokio::select! {
                    () = &mut room => continue,
                    () = self.closed.cancelled() => return None,
                }
            };
            let sleep = async {
                match next_due {
                    Some(due) => {
                        let wait = due - codec::unix_ms(SystemTime::now());
                        let wait = Duration::from_millis(u64::try_from(wait.max(1)).unwrap_or(1));
                        tokio::time::sleep(wait).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.closed.cancelled() => return None,
                () = sleep => continue,
                r = consumer.recv() => {
                    let record = match r {
                        Ok(m) => m,
                        Err(KafkaError::MessageConsumptionFatal(code)) => {
                            return Some(Err(kafka_error(
                                "consuming",
                                KafkaError::MessageConsumptionFatal(code),
                            )));
                        }
                        Err(e) => {
                            // Transient (a broker restarting, a topic being
                            // created): librdkafka recovers by itself.
                            tracing::debug!(error = %e, "kafka: consumer error");
                            continue;
                        }
                    };
                    let Some(part) = self.shared.names.part(record.topic(), record.partition()) else {
                        continue;
                    };
                    let offset = record.offset();
                    let decoded = codec::decode(&record, part.0);
                    drop(record);
                    let mut st = self.state();
                    match self.admit(&mut st, part, offset, decoded) {
                        Admit::Skip => {
                            drop(st);
                            self.commit.notify_one();
                        }
                        Admit::Held => {}
                        Admit::Ready(h) => {
                            let (d, head) = self.hand_out(&mut st, h);
                            drop(st);
                            self.commit_now(&consumer, &head);
                            return Some(Ok(d));
                        }
                    }
                }
            }
        }
    }

    /// Settles a handed-out delivery for good.
    fn settle(&self, token: u64) -> Result<()> {
        let mut st = self.state();
        if st.closed {
            return Err(Error::Closed);
        }
        // Gone: expired (re-published by the reaper) or its partition was
        // revoked (the new owner delivers it again). Either way the ack has
        // nothing left to do.
        if let Some(h) = st.handed.remove(&token) {
            st.settle(h.part, h.epoch, h.offset);
            drop(st);
            self.room.notify_one();
            self.commit.notify_one();
        }
        Ok(())
    }

    /// Re-publishes a delivery to the retry topic with the next attempt,
    /// due after `delay`, then settles the original.
    async fn requeue(&self, token: u64, delay: Duration) -> Result<()> {
        let (message, attempt) = {
            let mut st = self.state();
            if st.closed {
                return Err(Error::Closed);
            }
            match st.handed.get_mut(&token) {
                Some(h) if !h.busy => {
                    h.busy = true;
                    (h.message.clone(), h.attempt)
                }
                _ => return Ok(()),
            }
        };
        let result = self.publish_retry(&message, attempt, delay).await;
        match result {
            Ok(()) => {
                let mut st = self.state();
                if let Some(h) = st.handed.remove(&token) {
                    st.settle(h.part, h.epoch, h.offset);
                }
                drop(st);
                self.room.notify_one();
                self.commit.notify_one();
                Ok(())
            }
            Err(e) => {
                if let Some(h) = self.state().handed.get_mut(&token) {
                    h.busy = false;
                }
                Err(e)
            }
        }
    }

    async fn publish_retry(&self, message: &Message, attempt: u32, delay: Duration) -> Result<()> {
        let broker = self.broker.upgrade().ok_or(Error::Closed)?;
        let due = SystemTime::now() + delay;
        let retry = Retry {
            target: self.target.clone(),
            attempt: attempt.saturating_add(1),
            due_ms: codec::unix_ms(due),
        };
        broker
            .publish_retry(&self.shared.names.retry, message, retry)
            .await
    }

    /// Stops fetching, commits what is settled and leaves the group; what is
    /// still out goes to the next owner.
    async fn shutdown(&self) -> Result<()> {
        if self.closed.is_cancelled() {
            return Ok(());
        }
        self.closed.cancel();
        lock(&self.shared.state).closed = true;
        let _no_recv = self.recv_lock.lock().await;
        let Some(consumer) = lock(&self.consumer).take() else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        let bound = self.request_timeout * 3;
        blocking("closing a Kafka consumer", bound, move || {
            let tpl = {
                let mut st = lock(&shared.state);
                let parts: Vec<Part> = st.tracks.keys().copied().collect();
                let tpl = st.commit_list(&shared.names, Some(&parts));
                st.tracks.clear();
                st.held.clear();
                tpl
            };
            let committed = if tpl.count() > 0 {
                consumer
                    .commit(&tpl, CommitMode::Sync)
                    .map_err(|e| kafka_error("committing on close", e))
            } else {
                Ok(())
            };
            close_consumer(consumer);
            committed
        })
        .await
    }
}

/// Drops the last handle on a consumer (which leaves the group), waiting
/// briefly for tasks that still hold a clone.
fn close_consumer(mut consumer: Arc<KConsumer>) {
    for _ in 0..1000 {
        match Arc::try_unwrap(consumer) {
            Ok(c) => {
                drop(c);
                return;
            }
            Err(c) => {
                consumer = c;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl Drop for RecvInner {
    fn drop(&mut self) {
        self.closed.cancel();
        if let Some(consumer) = self
            .consumer
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            // Leaving the group blocks on the network: not on this thread.
            // The revoke callback commits what was settled.
            std::thread::spawn(move || close_consumer(consumer));
        }
    }
}

/// Commits settled offsets shortly after acks, coalescing them.
async fn committer(inner: Weak<RecvInner>) {
    loop {
        let (interval, closed) = {
            let Some(i) = inner.upgrade() else { return };
            let notified = i.commit.notified();
            tokio::pin!(notified);
            let closed = i.closed.clone();
            tokio::select! {
                () = notified => {}
                () = closed.cancelled() => return,
            }
            (i.commit_interval, closed)
        };
        tokio::time::sleep(interval).await;
        if closed.is_cancelled() {
            return;
        }
        let Some(i) = inner.upgrade() else { return };
        let Some(consumer) = i.consumer() else { return };
        let mut st = i.state();
        let tpl = st.commit_list(&i.shared.names, None);
        if tpl.count() > 0 {
            // Under the lock: a revoke's synchronous commit never overtakes it.
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "kafka: commit failed");
            }
        }
    }
}

/// Re-publishes deliveries that outlived the ack timeout (with the next
/// attempt) and settles the originals; a late ack of one is a no-op.
async fn reaper(inner: Weak<RecvInner>) {
    let (tick, closed) = match inner.upgrade() {
        Some(i) => (
            (i.ack_timeout / 10).clamp(Duration::from_millis(5), Duration::from_secs(1)),
            i.closed.clone(),
        ),
        None => return,
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = closed.cancelled() => return,
        }
        let Some(i) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut freed = false;
        {
            let mut st = i.state();
            let stale: Vec<u64> = st
                .handed
                .iter()
                .filter(|(_, h)| !h.busy && h.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            for token in stale {
                let current = {
                    let h = &st.handed[&token];
                    st.is_current(h.part, h.epoch)
                };
                if current {
                    if let Some(h) = st.handed.get_mut(&token) {
                        h.busy = true;
                        expired.push((token, h.message.clone(), h.attempt));
                    }
                } else {
                    // Revoked: the new owner delivers it; free the slot.
                    st.handed.remove(&token);
                    freed = true;
                }
            }
        }
        if freed {
            i.room.notify_one();
        }
        let results = futures_util::future::join_all(
            expired
                .iter()
                .map(|(_, m, attempt)| i.publish_retry(m, *attempt, Duration::ZERO)),
        )
        .await;
        let mut st = i.state();
        for ((token, _, _), r) in expired.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    if let Some(h) = st.handed.remove(&token) {
                        st.settle(h.part, h.epoch, h.offset);
                        freed = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka: re-publishing an expired delivery failed");
                    if let Some(h) = st.handed.get_mut(&token) {
                        h.busy = false;
                        h.deadline = Instant::now() + REAP_RETRY;
                    }
                }
            }
        }
        drop(st);
        if freed {
            i.room.notify_one();
            i.commit.notify_one();
        }
    }
}

/// A consumer on one subscription (see [`Receiver`]).
#[derive(Debug)]
struct KafkaReceiver {
    inner: Arc<RecvInner>,
}

#[async_trait]
impl Receiver for KafkaReceiver {
    async fn recv(&self) -> Option<Result<RawDelivery>> {
        self.inner.recv().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.shutdown().await
    }
}

struct KafkaAcker {
    inner: Weak<RecvInner>,
    token: u64,
}

impl fmt::Debug for KafkaAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaAcker")
            .field("token", &self.token)
            .finish()
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(&self) -> Result<()> {
        self.inner.upgrade().ok_or(Error::Closed)?.settle(self.token)
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        let inner = self.inner.upgrade().ok_or(Error::Closed)?;
        inner
            .requeue(self.token, delay.unwrap_or(Duration::ZERO))
            .await
    }
}
