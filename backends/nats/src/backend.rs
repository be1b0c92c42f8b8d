//! The JetStream backend: publisher, subscriber, receivers and ackers.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::PublishErrorKind,
    message::PublishMessage,
    stream::{self, RetentionPolicy},
};
use async_trait::async_trait;
use futures_util::{StreamExt, stream::FuturesOrdered};
use switchyard_core::{
    Acker, Broker, Capabilities, Client, Error, KeyOrdering, Message, Publisher, RawDelivery,
    Receiver, Result, SubscribeOptions, Subscriber,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{NatsConfig, codec, config::redact, names::token};

/// Bytes of the server's `max_payload` kept for headers: the payload limit
/// switchyard reports is the server's minus this.
const HEADER_RESERVE: usize = 16 * 1024;
/// Longest a pull request waits on the server before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Pause after a failed pull before the next one.
const PULL_RETRY: Duration = Duration::from_millis(500);

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    server_max_payload: usize,
    /// Topics whose stream is known to exist.
    streams: Mutex<HashMap<String, stream::Stream>>,
    closed: CancellationToken,
    receivers: Mutex<Vec<Weak<ReceiverShared>>>,
}

/// A connection to NATS JetStream implementing switchyard's backend traits.
///
/// Topic → a stream capturing one subject (interest retention: a message is
/// kept until every subscription acked it); subscription → a durable pull
/// consumer with explicit acks. Cheap to clone.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("config", &self.inner.config)
            .field("closed", &self.inner.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// Connects to NATS from a `nats://` URL and returns a [`Client`].
///
/// # Errors
///
/// [`Error::InvalidUrl`] for a malformed URL; [`Error::Connection`] when no
/// server answers within the connect timeout; [`Error::Authentication`] when
/// the server refuses the credentials.
pub async fn connect(url: &str) -> Result<Client> {
    Ok(Client::new(
        NatsBroker::connect(NatsConfig::from_url(url)?).await?,
    ))
}

fn connect_error(e: async_nats::ConnectError, servers: &[String]) -> Error {
    use async_nats::ConnectErrorKind as K;
    let message = format!(
        "connecting to {}: {e}",
        servers
            .iter()
            .map(|s| redact(s))
            .collect::<Vec<_>>()
            .join(",")
    );
    match e.kind() {
        K::AuthorizationViolation | K::Authentication => Error::Authentication {
            message,
            source: Some(Box::new(e)),
        },
        K::TimedOut => Error::Connection {
            message,
            source: Some(Box::new(e)),
        },
        _ => Error::connection(message, e),
    }
}

fn js_error(
    what: &str,
    e: impl std::error::Error + Send + Sync + 'static,
    retryable: bool,
) -> Error {
    Error::broker(format!("{what}: {e}"), retryable, Some(Box::new(e)))
}

impl NatsBroker {
    /// Connects with `config`.
    ///
    /// # Errors
    ///
    /// As for [`connect`].
    pub async fn connect(config: NatsConfig) -> Result<Self> {
        let mut options = async_nats::ConnectOptions::new()
            .name("switchyard")
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.request_timeout))
            .require_tls(config.require_tls);
        if let (Some(u), Some(p)) = (&config.user, &config.password) {
            options = options.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &config.token {
            options = options.token(t.clone());
        }
        if let Some(path) = &config.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                Error::Config(format!(
                    "reading NATS credentials file {}: {e}",
                    path.display()
                ))
            })?;
        }
        let servers: Vec<async_nats::ServerAddr> = config
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::InvalidUrl {
                url: config.servers.join(","),
                reason: format!("bad server address: {e}"),
            })?;
        // Bound the whole connect (DNS, TCP, TLS, handshake), not just TCP.
        let client = tokio::time::timeout(config.connect_timeout, options.connect(servers))
            .await
            .map_err(|_| Error::Connection {
                message: format!(
                    "no NATS server answered within {:?}",
                    config.connect_timeout
                ),
                source: None,
            })?
            .map_err(|e| connect_error(e, &config.servers))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(config.request_timeout)
            .max_ack_inflight(config.publish_window.max(1024))
            .backpressure_on_inflight(true)
            .build(client.clone());
        let server_max_payload =
            usize::try_from(client.server_info().max_payload).unwrap_or(1024 * 1024);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                server_max_payload,
                streams: Mutex::new(HashMap::new()),
                closed: CancellationToken::new(),
                receivers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The native async-nats client (escape hatch).
    #[must_use]
    pub fn nats_client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The native JetStream context (escape hatch).
    #[must_use]
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The JetStream stream name used for `topic`.
    #[must_use]
    pub fn stream_name(&self, topic: &str) -> String {
        format!("{}{}", self.inner.config.stream_prefix, token(topic))
    }

    /// The subject messages of `topic` are published on.
    #[must_use]
    pub fn subject(&self, topic: &str) -> String {
        format!("{}.{}", self.inner.config.subject_prefix, token(topic))
    }

    /// The durable consumer name used for a subscription.
    #[must_use]
    pub fn consumer_name(&self, subscription: &str) -> String {
        token(subscription)
    }

    fn limit(&self) -> usize {
        self.inner.server_max_payload.saturating_sub(HEADER_RESERVE)
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.is_cancelled() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    async fn stream(&self, topic: &str) -> Result<stream::Stream> {
        if let Some(s) = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            return Ok(s.clone());
        }
        let c = &self.inner.config;
        let config = stream::Config {
            name: self.stream_name(topic),
            subjects: vec![self.subject(topic)],
            retention: RetentionPolicy::Interest,
            storage: c.storage,
            max_age: c.max_age,
            max_bytes: c.max_bytes,
            num_replicas: c.replicas,
            duplicate_window: c.duplicate_window,
            description: Some(format!("switchyard topic {topic}")),
            ..Default::default()
        };
        let s = self
            .inner
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| js_error(&format!("creating stream for topic {topic}"), e, true))?;
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), s.clone());
        Ok(s)
    }

    fn forget_stream(&self, topic: &str) {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// Encodes and size-checks a message.
    fn prepare(&self, message: &Message) -> Result<(async_nats::HeaderMap, usize)> {
        let (headers, header_bytes) = codec::encode(message)?;
        let limit = self.limit();
        let size = message.payload().len() + header_bytes.saturating_sub(HEADER_RESERVE);
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok((headers, header_bytes))
    }

    /// Sends one publish; the returned future resolves on the PubAck.
    async fn send(
        &self,
        subject: &str,
        message: &Message,
    ) -> Result<jetstream::context::PublishAckFuture> {
        let (headers, _) = self.prepare(message)?;
        // No Nats-Msg-Id: the message id is not used for JetStream's
        // de-duplication, because an intentional re-publish of the same id
        // (redrive, bridging) must be kept, not dropped as a duplicate.
        let publish = PublishMessage::build()
            .payload(message.payload().clone())
            .headers(headers);
        self.inner
            .js
            .send_publish(subject.to_owned(), publish)
            .await
            .map_err(|e| js_error("sending publish", e, true))
    }

    async fn confirm(&self, topic: &str, ack: jetstream::context::PublishAckFuture) -> Result<()> {
        match ack.await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                self.forget_stream(topic);
                Err(Error::broker(
                    format!("stream for topic {topic} disappeared: {e}"),
                    true,
                    Some(Box::new(e)),
                ))
            }
            Err(e) if e.kind() == PublishErrorKind::TimedOut => Err(Error::Timeout {
                operation: "JetStream publish acknowledgement",
                after: self.inner.config.request_timeout,
            }),
            Err(e) => Err(js_error("publish not acknowledged", e, true)),
        }
    }

    async fn consumer_config(&self, options: &SubscribeOptions) -> pull::Config {
        pull::Config {
            durable_name: Some(self.consumer_name(options.name())),
            description: Some(format!("switchyard subscription {}", options.name())),
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_timeout_value(),
            // Unlimited: switchyard dead-letters after max_attempts itself.
            max_deliver: -1,
            deliver_policy: DeliverPolicy::New,
            max_ack_pending: self
                .inner
                .config
                .max_ack_pending
                .max(options.prefetch_limit() as i64),
            ..Default::default()
        }
    }

    async fn consumer(&self, topic: &str, options: &SubscribeOptions) -> Result<PullConsumer> {
        let stream = self.stream(topic).await?;
        let config = self.consumer_config(options).await;
        let name = self.consumer_name(options.name());
        match stream.get_consumer::<pull::Config>(&name).await {
            Ok(existing) => {
                let c = &existing.cached_info().config;
                if c.ack_wait == config.ack_wait && c.max_ack_pending == config.max_ack_pending {
                    return Ok(existing);
                }
                // Creating a durable with a changed config updates it.
                stream
                    .create_consumer(config)
                    .await
                    .map_err(|e| js_error(&format!("updating consumer {name}"), e, true))
            }
            Err(_) => match stream.create_consumer(config).await {
                Ok(c) => Ok(c),
                Err(e) => {
                    // Created concurrently by another client: use it.
                    stream
                        .get_consumer(&name)
                        .await
                        .map_err(|_| js_error(&format!("creating consumer {name}"), e, true))
                }
            },
        }
    }
}

#[async_trait]
impl Publisher for NatsBroker {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        self.check_open()?;
        self.prepare(&message)?;
        self.stream(topic).await?;
        let ack = self.send(&self.subject(topic), &message).await?;
        match self.confirm(topic, ack).await {
            // The stream was deleted behind our back: create it and retry once.
            Err(Error::Broker { message: m, .. }) if m.contains("disappeared") => {
                self.stream(topic).await?;
                let ack = self.send(&self.subject(topic), &message).await?;
                self.confirm(topic, ack).await
            }
            other => other,
        }
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        if self.check_open().is_err() {
            return messages.iter().map(|_| Err(Error::Closed)).collect();
        }
        if let Err(e) = self.stream(topic).await {
            let text = e.to_string();
            return messages
                .iter()
                .map(|_| Err(Error::broker(text.clone(), e.is_retryable(), None)))
                .collect();
        }
        // Pipeline: keep up to `publish_window` acknowledgements in flight.
        let window = self.inner.config.publish_window;
        let mut results: Vec<Option<Result<()>>> = (0..messages.len()).map(|_| None).collect();
        let mut in_flight = FuturesOrdered::new();
        let subject = self.subject(topic);
        for (i, message) in messages.iter().enumerate() {
            if in_flight.len() >= window {
                if let Some((j, r)) = in_flight.next().await {
                    results[j] = Some(r);
                }
            }
            match self.send(&subject, message).await {
                Ok(ack) => in_flight.push_back(async move { (i, self.confirm(topic, ack).await) }),
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
        if self.inner.closed.is_cancelled() {
            return Ok(());
        }
        self.inner.closed.cancel();
        self.inner
            .client
            .flush()
            .await
            .or_else(|e| {
                if self.inner.client.connection_state() == async_nats::connection::State::Connected
                {
                    Err(e)
                } else {
                    Ok(())
                }
            })
            .map_err(|e| Error::connection("flushing on close", e))
    }
}

#[async_trait]
impl Subscriber for NatsBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        self.stream(topic).await.map(|_| ())
    }

    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open()?;
        self.consumer(topic, options).await.map(|_| ())
    }

    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
        self.check_open()?;
        let consumer = self.consumer(topic, options).await?;
        let shared = Arc::new(ReceiverShared {
            cancel: self.inner.closed.child_token(),
            permits: Arc::new(Semaphore::new(options.prefetch_limit())),
            prefetch: options.prefetch_limit(),
            stream_name: self.stream_name(topic),
            state: tokio::sync::Mutex::new(PullState {
                consumer,
                active: None,
                requesting: None,
            }),
            client: self.inner.client.clone(),
        });
        let mut receivers = self
            .inner
            .receivers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        receivers.retain(|w| w.strong_count() > 0);
        receivers.push(Arc::downgrade(&shared));
        Ok(Box::new(NatsReceiver { shared }))
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        let receivers = std::mem::take(
            &mut *self
                .inner
                .receivers
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for r in receivers.iter().filter_map(Weak::upgrade) {
            r.shutdown().await;
        }
        // Sends what is buffered (acks included), then closes the connection.
        let _ = self.inner.client.drain().await;
        Ok(())
    }
}

impl Broker for NatsBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.limit())
            .with_backend("nats")
            .with_ordering(KeyOrdering::PerKey)
            .with_native_delay(true)
            .with_fan_out(true)
            .with_competing_consumers(true)
            .with_replay(false)
            .with_persistent(self.inner.config.storage == stream::StorageType::File)
            .with_min_ack_timeout(Duration::from_millis(100))
    }
}

type Pulled = (
    std::result::Result<jetstream::Message, async_nats::Error>,
    Option<OwnedSemaphorePermit>,
);
type PullStream = Pin<Box<dyn futures_util::Stream<Item = Pulled> + Send>>;
type PullRequest =
    Pin<Box<dyn Future<Output = std::result::Result<pull::Batch, pull::BatchError>> + Send>>;

/// The consumer's pulling state, kept across cancelled receives.
struct PullState {
    consumer: PullConsumer,
    /// The pull request being served, its messages paired with permits.
    active: Option<PullStream>,
    /// A pull request being sent, with the permits reserved for it.
    requesting: Option<(PullRequest, Vec<OwnedSemaphorePermit>)>,
}

struct ReceiverShared {
    cancel: CancellationToken,
    /// One permit per delivery this consumer may hold (its prefetch).
    permits: Arc<Semaphore>,
    prefetch: usize,
    stream_name: String,
    state: tokio::sync::Mutex<PullState>,
    client: async_nats::Client,
}

impl ReceiverShared {
    /// Stops pulling. Messages pulled but never handed out are dropped
    /// unsettled and come back after the ack wait: NAKing them here races the
    /// pull request this consumer still has open on the server (it cannot be
    /// withdrawn), and nats-server 2.9 then redelivers a NAKed message twice,
    /// the second time with its delivery count reset.
    ///
    /// Never waits for the state lock: a cancelled `recv` may hold it.
    async fn shutdown(&self) {
        self.cancel.cancel();
        if let Ok(mut state) = self.state.try_lock() {
            state.active = None;
            state.requesting = None;
        }
        let _ = self.client.flush().await;
    }

    fn deliver(&self, (next, permit): Pulled) -> Option<Result<RawDelivery>> {
        let msg = match next {
            Ok(m) => m,
            Err(e) => {
                return Some(Err(Error::broker(
                    format!("pulling messages: {e}"),
                    true,
                    Some(e),
                )));
            }
        };
        // More than requested cannot happen; if it does, leave it unsettled.
        let permit = permit?;
        let (attempt, seq, published) = match msg.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(u32::MAX).max(1),
                info.stream_sequence,
                Some(std::time::SystemTime::from(info.published)),
            ),
            Err(_) => (1, 0, None),
        };
        let (message, acker) = msg.split();
        let decoded = codec::decode(message.headers.as_ref(), message.payload, published, || {
            format!("{}:{seq}", self.stream_name)
        });
        let acker = NatsAcker {
            acker,
            cancel: self.cancel.clone(),
            _permit: permit,
        };
        Some(match decoded {
            Ok(message) => Ok(RawDelivery {
                message,
                attempt,
                acker: Box::new(acker),
            }),
            Err(e) => {
                // Undecodable: terminate it rather than loop on it.
                let acker = acker.acker;
                tokio::spawn(async move { acker.ack_with(AckKind::Term).await });
                Err(e)
            }
        })
    }
}

impl fmt::Debug for ReceiverShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverShared")
            .field("stream", &self.stream_name)
            .field("prefetch", &self.prefetch)
            .field("closed", &self.cancel.is_cancelled())
            .field("free_permits", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

/// One pull request's messages, each paired with one of the permits reserved
/// for it; unused permits are released when the request ends.
fn permitted(batch: pull::Batch, permits: Vec<OwnedSemaphorePermit>) -> PullStream {
    Box::pin(futures_util::stream::unfold(
        (batch, permits),
        |(mut batch, mut permits)| async move {
            let next = batch.next().await?;
            let permit = permits.pop();
            Some(((next, permit), (batch, permits)))
        },
    ))
}

#[derive(Debug)]
struct NatsReceiver {
    shared: Arc<ReceiverShared>,
}

#[async_trait]
impl Receiver for NatsReceiver {
    /// Pulls exactly as many messages as the consumer has room for: every
    /// message requested holds one prefetch permit until it is settled, so the
    /// consumer never has more than `prefetch` deliveries outstanding. One
    /// pull request at a time: nats-server spreads messages over concurrent
    /// pull requests, so a second one would break stream (and per-key) order.
    ///
    /// Cancel safe: the request being sent and the request being served live
    /// in the receiver's state, not in this future.
    async fn recv(&self) -> Option<Result<RawDelivery>> {
        let s = &*self.shared;
        let mut state = tokio::select! {
            st = s.state.lock() => st,
            () = s.cancel.cancelled() => return None,
        };
        loop {
            if s.cancel.is_cancelled() {
                return None;
            }
            if let Some(active) = state.active.as_mut() {
                let next = tokio::select! {
                    n = active.next() => n,
                    () = s.cancel.cancelled() => return None,
                };
                match next {
                    Some(pulled) => {
                        if let Some(item) = s.deliver(pulled) {
                            return Some(item);
                        }
                    }
                    // Served or expired: unused permits go back.
                    None => state.active = None,
                }
                continue;
            }
            if state.requesting.is_none() {
                // Wait for room for one, then take all the room there is.
                let first = tokio::select! {
                    p = Arc::clone(&s.permits).acquire_owned() => p.ok()?,
                    () = s.cancel.cancelled() => return None,
                };
                let mut held = vec![first];
                while held.len() < s.prefetch {
                    match Arc::clone(&s.permits).try_acquire_owned() {
                        Ok(p) => held.push(p),
                        Err(_) => break,
                    }
                }
                let consumer = state.consumer.clone();
                let n = held.len();
                let request: PullRequest = Box::pin(async move {
                    consumer
                        .batch()
                        .max_messages(n)
                        .expires(PULL_EXPIRES)
                        .messages()
                        .await
                });
                state.requesting = Some((request, held));
            }
            let result = {
                let (request, _) = state.requesting.as_mut()?;
                tokio::select! {
                    r = request => r,
                    () = s.cancel.cancelled() => return None,
                }
            };
            let (_, held) = state.requesting.take()?;
            match result {
                Ok(batch) => state.active = Some(permitted(batch, held)),
                Err(e) => {
                    drop(held);
                    tokio::select! {
                        () = tokio::time::sleep(PULL_RETRY) => {}
                        () = s.cancel.cancelled() => return None,
                    }
                    return Some(Err(js_error("pulling messages", e, true)));
                }
            }
        }
    }

    async fn close(&self) -> Result<()> {
        self.shared.shutdown().await;
        Ok(())
    }
}

impl Drop for NatsReceiver {
    fn drop(&mut self) {
        // A dropped consumer: stop pulling; what it pulled comes back after
        // the ack wait.
        self.shared.cancel.cancel();
        if let Ok(mut state) = self.shared.state.try_lock() {
            state.active = None;
            state.requesting = None;
        }
    }
}

struct NatsAcker {
    acker: jetstream::message::Acker,
    cancel: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for NatsAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsAcker").finish_non_exhaustive()
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        self.acker
            .ack()
            .await
            .map_err(|e| Error::broker(format!("ack: {e}"), true, Some(e)))
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.acker
            .ack_with(AckKind::Nak(delay))
            .await
            .map_err(|e| Error::broker(format!("nak: {e}"), true, Some(e)))
    }
}
