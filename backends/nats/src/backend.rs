//! The JetStream backend: publisher, subscriber, receivers and ackers.

use std::{
    collections::HashMap,
    fmt,
    pin::Pin,
    sync::{Arc, Mutex},
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
use futures_util::{FutureExt, StreamExt, stream::FuturesOrdered};
use switchyard_core::{
    Acker, Broker, Capabilities, Client, Error, KeyOrdering, Message, Publisher, RawDelivery,
    Receiver, Result, SubscribeOptions, Subscriber,
    driver::{Outstanding, ReceiverSet, SlowStart},
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{NatsConfig, codec, names::token};

/// Bytes of the server's `max_payload` kept for headers: the payload limit
/// switchyard reports is the server's minus this.
const HEADER_RESERVE: usize = 16 * 1024;
/// Longest a pull request waits on the server before it is renewed. Short,
/// because a closing receiver cannot withdraw its open requests and must
/// delay the NAKs of what it hands back until they expired (see
/// `ReceiverShared::shutdown`).
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long a closing receiver waits for its state: a receive being
/// cancelled gives it up at once, one parked and never polled again never
/// does.
const STATE_WAIT: Duration = Duration::from_millis(200);
/// Added to a pull request's expiry for the server's view of it (it counts
/// from when the request arrived).
const EXPIRY_MARGIN: Duration = Duration::from_millis(250);
/// Silence after which open pull requests are presumed lost (a reconnect
/// drops them without the server reporting their end).
const STALLED: Duration = Duration::from_secs(10);
/// Pause after a failed pull before the next one.
const PULL_RETRY: Duration = Duration::from_millis(500);

/// A topic whose stream is known to exist, with its subject.
struct TopicState {
    stream: stream::Stream,
    subject: String,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsConfig,
    server_max_payload: usize,
    /// Topics whose stream is known to exist.
    streams: Mutex<HashMap<String, Arc<TopicState>>>,
    closed: CancellationToken,
    receivers: ReceiverSet<ReceiverShared>,
    /// Set while the server refuses the credentials on reconnect.
    refused: Arc<Refused>,
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

/// Whether the server refuses this client's credentials on reconnect
/// (async-nats then keeps trying, silently), and what it said; cleared once
/// a connect succeeds. Read on every publish and receive: one atomic load
/// while all is well.
#[derive(Default)]
struct Refused {
    now: std::sync::atomic::AtomicBool,
    said: Mutex<Option<String>>,
}

impl Refused {
    fn set(&self, said: Option<String>) {
        let mut guard = self.said.lock().unwrap_or_else(|p| p.into_inner());
        self.now
            .store(said.is_some(), std::sync::atomic::Ordering::Release);
        *guard = said;
    }

    /// [`Error::Authentication`] while the server refuses the credentials.
    fn error(&self) -> Option<Error> {
        if !self.now.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let said = self
            .said
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some(Error::Authentication {
            message: format!("the NATS server refuses this client's credentials: {said}"),
            source: None,
        })
    }
}

/// Keeps `refused` up to date from the client's connection events.
fn watch_credentials(
    options: async_nats::ConnectOptions,
    refused: &Arc<Refused>,
) -> async_nats::ConnectOptions {
    let refused = Arc::clone(refused);
    options.event_callback(move |event| {
        let refused = Arc::clone(&refused);
        async move {
            let said = match event {
                async_nats::Event::Connected => None,
                async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                    Some("authorization violation".to_owned())
                }
                async_nats::Event::ClientError(async_nats::ClientError::Other(e))
                    if e.contains("authorization violation") || e.contains("signing nonce") =>
                {
                    Some(e)
                }
                _ => return,
            };
            refused.set(said);
        }
    })
}

fn connect_error(e: async_nats::ConnectError, servers: &[String]) -> Error {
    use async_nats::ConnectErrorKind as K;
    let message = format!(
        "connecting to {}: {e}",
        servers
            .iter()
            .map(|s| switchyard_core::redact_url(s))
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
        if config.retain_server_order {
            options = options.retain_servers_order();
        }
        let refused = Arc::<Refused>::default();
        options = watch_credentials(options, &refused);
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
        let server_max_payload = client.server_info().max_payload;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                config,
                server_max_payload,
                streams: Mutex::new(HashMap::new()),
                closed: CancellationToken::new(),
                receivers: ReceiverSet::new(),
                refused,
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
            self.inner.refused.error().map_or(Ok(()), Err)
        }
    }

    /// `e`, or [`Error::Authentication`] when it is a transient failure
    /// while the server refuses the credentials (which waiting will not
    /// mend).
    fn refused_instead(&self, e: Error) -> Error {
        if e.is_retryable() {
            self.inner.refused.error().unwrap_or(e)
        } else {
            e
        }
    }

    async fn stream(&self, topic: &str) -> Result<stream::Stream> {
        Ok(self.topic(topic).await?.stream.clone())
    }

    /// The topic's stream (created when missing) and subject; cached, so the
    /// publish path costs one map lookup.
    async fn topic(&self, topic: &str) -> Result<Arc<TopicState>> {
        if let Some(s) = self
            .inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
        {
            return Ok(Arc::clone(s));
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
            description: Some(format!("switchyard topic {topic}")),
            ..Default::default()
        };
        let s = self
            .inner
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| js_error(&format!("creating stream for topic {topic}"), e, true))?;
        let state = Arc::new(TopicState {
            stream: s,
            subject: self.subject(topic),
        });
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(topic.to_owned(), Arc::clone(&state));
        Ok(state)
    }

    fn forget_stream(&self, topic: &str) {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(topic);
    }

    /// Encodes and size-checks a message.
    fn prepare(&self, message: &Message) -> Result<async_nats::HeaderMap> {
        let (headers, header_bytes) = codec::encode(message)?;
        let limit = self.limit();
        let size = message.payload().len() + header_bytes.saturating_sub(HEADER_RESERVE);
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok(headers)
    }

    /// Sends one publish; the returned future resolves on the PubAck.
    async fn send(
        &self,
        subject: &str,
        message: &Message,
    ) -> Result<jetstream::context::PublishAckFuture> {
        let headers = self.prepare(message)?;
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
                    format!("stream for topic {topic} is gone (it is re-created on retry): {e}"),
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

    fn consumer_config(&self, options: &SubscribeOptions) -> pull::Config {
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
        let config = self.consumer_config(options);
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
        let published = async {
            let t = self.topic(topic).await?;
            let ack = self.send(&t.subject, &message).await?;
            // A stream deleted behind our back is forgotten by `confirm`, and
            // the retryable error makes the caller's retry create it again.
            self.confirm(topic, ack).await
        };
        published.await.map_err(|e| self.refused_instead(e))
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        if let Err(e) = self.check_open() {
            return messages.iter().map(|_| Err(e.replicate())).collect();
        }
        let t = match self.topic(topic).await {
            Ok(t) => t,
            Err(e) => return messages.iter().map(|_| Err(e.replicate())).collect(),
        };
        // Pipeline: keep up to `publish_window` acknowledgements in flight.
        let window = self.inner.config.publish_window;
        let mut results: Vec<Option<Result<()>>> = (0..messages.len()).map(|_| None).collect();
        let mut in_flight = FuturesOrdered::new();
        let subject = &t.subject;
        for (i, message) in messages.iter().enumerate() {
            if in_flight.len() >= window {
                if let Some((j, r)) = in_flight.next().await {
                    results[j] = Some(r);
                }
            }
            match self.send(subject, message).await {
                Ok(ack) => in_flight.push_back(async move { (i, self.confirm(topic, ack).await) }),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        while let Some((j, r)) = in_flight.next().await {
            results[j] = Some(r);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Error::broker("publish result missing", true, None)))
                    .map_err(|e| self.refused_instead(e))
            })
            .collect()
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.is_cancelled() {
            return Ok(());
        }
        self.inner.closed.cancel();
        // Flush what was accepted; bounded, as the server may be unreachable
        // (async-nats holds commands while it reconnects).
        let bound = self.inner.config.request_timeout;
        match tokio::time::timeout(bound, self.inner.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::connection("flushing on close", e)),
            Err(_) => Err(Error::Timeout {
                operation: "flushing on close",
                after: bound,
            }),
        }
    }
}

#[async_trait]
impl Subscriber for NatsBroker {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.check_open()?;
        self.topic(topic).await.map(|_| ())
    }

    async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        self.check_open()?;
        self.consumer(topic, options).await.map(|_| ())
    }

    async fn receiver(&self, topic: &str, options: &SubscribeOptions) -> Result<Box<dyn Receiver>> {
        self.check_open()?;
        let consumer = self.consumer(topic, options).await?;
        let info = consumer.cached_info();
        let next_subject = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            info.stream_name, info.name
        );
        // Each pull request replies to `<inbox>.<n>`; one wildcard
        // subscription receives them all, in the order the server sent them.
        let inbox_subject = self.inner.client.new_inbox();
        let inbox = self
            .inner
            .client
            .subscribe(format!("{inbox_subject}.*"))
            .await
            .map_err(|e| js_error("subscribing to the pull inbox", e, true))?;
        let shared = Arc::new(ReceiverShared {
            cancel: self.inner.closed.child_token(),
            permits: Arc::new(Semaphore::new(options.prefetch_limit())),
            prefetch: options.prefetch_limit(),
            stream_name: self.stream_name(topic),
            consumer_name: info.name.clone(),
            refused: Arc::clone(&self.inner.refused),
            // A memory-storage stream and its consumers do not survive a
            // server restart: such a receiver creates them again.
            recreate: (self.inner.config.storage == stream::StorageType::Memory)
                .then(|| (self.clone(), topic.to_owned(), options.clone())),
            next_subject,
            inbox_subject,
            state: tokio::sync::Mutex::new(PullState {
                inbox,
                reserved: Vec::new(),
                requests: HashMap::new(),
                next_request: 0,
                stall: Box::pin(tokio::time::sleep(STALLED)),
                last_activity: Instant::now(),
                suspect: false,
                gone: None,
                pulled: std::collections::VecDeque::new(),
            }),
            js: self.inner.js.clone(),
            client: self.inner.client.clone(),
            request_timeout: self.inner.config.request_timeout,
            outstanding: Arc::default(),
            slow: SlowStart::new(),
            ack_wait: options.ack_timeout_value(),
        });
        tokio::spawn(keep_leases(Arc::downgrade(&shared)));
        self.inner.receivers.insert(&shared);
        Ok(Box::new(NatsReceiver { shared }))
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        for r in self.inner.receivers.take_live() {
            r.shutdown().await;
        }
        // Sends what is buffered (acks included), then closes the connection.
        let _ = tokio::time::timeout(self.inner.config.request_timeout, self.inner.client.drain())
            .await;
        Ok(())
    }
}

impl Broker for NatsBroker {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.limit())
            .with_backend("nats")
            .with_ordering(KeyOrdering::PerKey)
            .with_native_delay(true)
            .with_returns_count_attempts(true)
            .with_fan_out(true)
            .with_competing_consumers(true)
            .with_replay(false)
            .with_persistent(self.inner.config.storage == stream::StorageType::File)
            .with_min_ack_timeout(Duration::from_millis(100))
    }
}

/// The consumer's pulling state, kept across cancelled receives.
struct PullState {
    /// The one inbox every pull request of this consumer replies to: the
    /// server sends in stream order, so one inbox keeps that order even with
    /// several pull requests outstanding.
    inbox: async_nats::Subscriber,
    /// Permits of messages requested but not yet received.
    reserved: Vec<OwnedSemaphorePermit>,
    /// Open pull requests (reply subject suffix) → messages still to come,
    /// and when the request was sent.
    requests: HashMap<u64, (usize, Instant)>,
    next_request: u64,
    /// Last time the server said anything on the inbox (or we asked).
    last_activity: Instant,
    /// Fires when the server has been silent for [`STALLED`].
    stall: Pin<Box<tokio::time::Sleep>>,
    /// A pull request ended as if the consumer were gone (409 "Consumer
    /// Deleted", 503 no responders, or the server silent for [`STALLED`]):
    /// `recv` asks the server whether it is.
    suspect: bool,
    /// Set once the consumer or its stream was found deleted: every
    /// receive returns it.
    gone: Option<Error>,
    /// Messages taken off the inbox by [`keep_leases`] while no receive
    /// ran, in arrival order, each with when its ack wait last (re)started
    /// at the latest: `recv` takes these first.
    pulled: std::collections::VecDeque<(async_nats::Message, Instant)>,
}

impl PullState {
    /// The next message that already arrived, if any: `Some(None)` when the
    /// inbox ended.
    fn arrived(&mut self) -> Option<Option<async_nats::Message>> {
        match self.pulled.pop_front() {
            Some((m, _)) => Some(Some(m)),
            None => self.inbox.next().now_or_never(),
        }
    }
}

struct ReceiverShared {
    cancel: CancellationToken,
    /// One permit per delivery this consumer may hold (its prefetch).
    permits: Arc<Semaphore>,
    prefetch: usize,
    stream_name: String,
    consumer_name: String,
    /// The client's credential state ([`Refused`]).
    refused: Arc<Refused>,
    /// With memory storage: how to create the stream and consumer again
    /// when a server restart lost them.
    recreate: Option<(NatsBroker, String, SubscribeOptions)>,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    next_subject: String,
    inbox_subject: String,
    state: tokio::sync::Mutex<PullState>,
    js: jetstream::Context,
    client: async_nats::Client,
    /// Bound on sends to the connection and on flushing.
    request_timeout: Duration,
    /// Reply subjects of the deliveries handed out and not settled: `close`
    /// NAKs them, so they come back at once rather than after the ack wait.
    outstanding: Arc<Outstanding<async_nats::Subject>>,
    /// One message at a time until a first delivery shows that the head of
    /// the stream is not what crashed the last consumer.
    slow: SlowStart,
    /// The consumer's ack wait (the ack timeout).
    ack_wait: Duration,
}

/// Whether an inbox message is a delivery (not a pull request's status).
fn is_delivery(m: &async_nats::Message) -> bool {
    matches!(m.status.map(|s| s.as_u16()), None | Some(200))
}

/// Shortest pause between two rounds of [`keep_leases`].
const KEEP_TICK: Duration = Duration::from_millis(250);

/// Keeps the leases of what a receiver pulled and has not handed out: the
/// server's ack wait runs from the moment it sent a message, but none of them
/// is an attempt until the application sees it (DESIGN §3.14). While no
/// receive runs (the application is busy with what it holds), every quarter
/// of the ack wait this takes what arrived off the inbox and sends a
/// progress ack (`+WPI`, which restarts the ack wait and does not count a
/// delivery) for those with less than half of it left — else they would come
/// back to another consumer at a raised count while this one still hands
/// them out. Ends with the receiver.
async fn keep_leases(shared: std::sync::Weak<ReceiverShared>) {
    let (tick, cancel) = match shared.upgrade() {
        Some(s) => ((s.ack_wait / 4).max(KEEP_TICK), s.cancel.clone()),
        None => return,
    };
    let mut last = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = cancel.cancelled() => return,
        }
        let Some(s) = shared.upgrade() else { return };
        // A receive holding the state reads the inbox itself.
        let Ok(mut state) = s.state.try_lock() else {
            last = Instant::now();
            continue;
        };
        // Arrived since the last round at the earliest.
        while let Some(Some(m)) = state.inbox.next().now_or_never() {
            state.pulled.push_back((m, last));
        }
        let now = Instant::now();
        last = now;
        let mut progress = Vec::new();
        for (m, since) in &mut state.pulled {
            if let (true, Some(reply)) = (is_delivery(m), &m.reply)
                && now.saturating_duration_since(*since) >= s.ack_wait / 2
            {
                progress.push(reply.clone());
                *since = now;
            }
        }
        drop(state);
        for reply in progress {
            let send = s.client.publish(reply, bytes::Bytes::from_static(b"+WPI"));
            if tokio::time::timeout(s.request_timeout, send).await.is_err() {
                break;
            }
        }
    }
}

impl ReceiverShared {
    /// Stops pulling and hands back everything this receiver holds: the
    /// deliveries it handed out and that are not settled, and what it pulled
    /// but never handed out — NAKed, so they come back within the pull
    /// expiry ([`PULL_EXPIRES`], 2 s) instead of after the ack wait.
    ///
    /// Open pull requests cannot be withdrawn, and a message NAKed while one
    /// is open goes back to it: to this receiver, which no longer reads
    /// (nats-server 2.9 then also resets the message's delivery count, as
    /// measured). So the inbox is drained first (`UNSUB` then `PING`: what
    /// the server sent before it saw the `UNSUB` still arrives, then the
    /// inbox ends), and the NAKs carry a delay that outlasts the open
    /// requests' expiry (none when no request is open).
    ///
    /// Every step is bounded by the request timeout; a `recv` parked while
    /// holding the state lock is waited for no longer than [`STATE_WAIT`]
    /// (then the inbox is left to the connection and the NAKs wait a whole
    /// pull expiry).
    async fn shutdown(&self) {
        self.cancel.cancel();
        let mut unseen = Vec::new();
        // Without the state (held by a receive parked and never polled
        // again), the open requests are unknown: assume one was just sent.
        let mut open_until = Some(Instant::now() + PULL_EXPIRES + EXPIRY_MARGIN);
        if let Ok(mut state) = tokio::time::timeout(STATE_WAIT, self.state.lock()).await {
            state.reserved.clear();
            unseen.extend(
                state
                    .pulled
                    .drain(..)
                    .filter(|(m, _)| is_delivery(m))
                    .filter_map(|(m, _)| m.reply),
            );
            if state.inbox.drain().await.is_ok() {
                let inbox = &mut state.inbox;
                let _ = tokio::time::timeout(self.request_timeout, async {
                    while let Some(m) = inbox.next().await {
                        if is_delivery(&m)
                            && let Some(reply) = m.reply
                        {
                            unseen.push(reply);
                        }
                    }
                })
                .await;
            }
            open_until = state
                .requests
                .drain()
                .map(|(_, (_, sent))| sent + PULL_EXPIRES + EXPIRY_MARGIN)
                .max();
        }
        let delay = open_until
            .map(|until| until.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero());
        let nak = match delay {
            Some(d) => bytes::Bytes::from(format!(r#"-NAK {{"delay":{}}}"#, d.as_nanos())),
            None => bytes::Bytes::from_static(b"-NAK"),
        };
        let handed_out = self.outstanding.take_all();
        for reply in handed_out.into_iter().chain(unseen) {
            let send = self.client.publish(reply, nak.clone());
            if tokio::time::timeout(self.request_timeout, send)
                .await
                .is_err()
            {
                break;
            }
        }
        // Sends pending acks and the NAKs; bounded, as the server may be
        // unreachable.
        let _ = tokio::time::timeout(self.request_timeout, self.client.flush()).await;
    }

    /// Room for messages to ask for: the free prefetch, or — while
    /// [`SlowStart`] holds the receiver to one at a time — 1 when nothing is
    /// held or requested, else 0.
    fn room(&self) -> usize {
        let held = self.prefetch - self.permits.available_permits();
        self.slow.allowance(self.prefetch).saturating_sub(held)
    }

    /// Whether a pull request is worth sending: half the prefetch is free, or
    /// some room is free and nothing is outstanding.
    fn pull_due(&self, state: &PullState) -> bool {
        let free = self.room();
        free > 0 && (free >= (self.prefetch / 2).max(1) || state.reserved.is_empty())
    }

    /// `item`, or [`Error::NotFound`] in its place when it is an error that
    /// looks like a deleted consumer ([`PullState::suspect`]) and the server
    /// confirms that it is (then every later receive returns it too).
    async fn confirm(
        &self,
        state: &mut PullState,
        item: Result<RawDelivery>,
    ) -> Result<RawDelivery> {
        if item.is_err() && std::mem::take(&mut state.suspect) {
            if let Some(gone) = self.consumer_gone().await {
                return Err(self.lost(state, gone).await);
            }
        }
        item
    }

    /// The consumer or its stream is gone: with memory storage (a server
    /// restart loses both) they are created again and the error is
    /// retryable; otherwise it was deleted, and every later receive
    /// returns `gone`.
    async fn lost(&self, state: &mut PullState, gone: Error) -> Error {
        let Some((broker, topic, options)) = &self.recreate else {
            state.gone = Some(gone.replicate());
            return gone;
        };
        broker.forget_stream(topic);
        state.reserved.clear();
        state.requests.clear();
        match broker.consumer(topic, options).await {
            Ok(_) => Error::broker(
                format!("{gone}; created again (memory storage does not survive a restart)"),
                true,
                None,
            ),
            Err(e) => e,
        }
    }

    /// [`Error::NotFound`] when the server says this receiver's consumer or
    /// its stream does not exist (deleted under it), `None` when it exists
    /// or the server cannot tell now (a reconnect under way: retryable).
    async fn consumer_gone(&self) -> Option<Error> {
        let asked = self
            .js
            .get_consumer_from_stream::<pull::Config, _, _>(&self.consumer_name, &self.stream_name);
        let answer = tokio::select! {
            a = tokio::time::timeout(self.request_timeout, asked) => a.ok()?,
            () = self.cancel.cancelled() => return None,
        };
        let e = answer.err()?;
        let jetstream::stream::ConsumerErrorKind::JetStream(js) = e.kind() else {
            return None;
        };
        let (resource, name) = match js.error_code() {
            jetstream::ErrorCode::STREAM_NOT_FOUND => ("stream", &self.stream_name),
            jetstream::ErrorCode::CONSUMER_NOT_FOUND => ("consumer", &self.consumer_name),
            _ => return None,
        };
        Some(Error::not_found(
            resource,
            name.clone(),
            format!("the subscription's {resource} was deleted: {js}"),
            Some(Box::new(e)),
        ))
    }

    /// Asks the server for as many messages as there is free room, when
    /// [`pull_due`](Self::pull_due).
    async fn top_up(&self, state: &mut PullState) -> Result<()> {
        if !self.pull_due(state) {
            return Ok(());
        }
        let free = self.room();
        let mut got = Vec::with_capacity(free);
        while got.len() < free {
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(p) => got.push(p),
                Err(_) => break,
            }
        }
        if got.is_empty() {
            return Ok(());
        }
        let body = format!(
            r#"{{"batch":{},"expires":{}}}"#,
            got.len(),
            PULL_EXPIRES.as_nanos()
        );
        let request = state.next_request;
        let send = self.client.publish_with_reply(
            self.next_subject.clone(),
            format!("{}.{request}", self.inbox_subject),
            body.into(),
        );
        tokio::select! {
            r = tokio::time::timeout(self.request_timeout, send) => match r {
                Ok(r) => r.map_err(|e| js_error("sending pull request", e, true))?,
                Err(_) => return Err(Error::Timeout { operation: "sending a pull request", after: self.request_timeout }),
            },
            () = self.cancel.cancelled() => return Err(Error::Closed),
        }
        state.next_request += 1;
        state.requests.insert(request, (got.len(), Instant::now()));
        state.reserved.extend(got);
        state.last_activity = Instant::now();
        Ok(())
    }

    /// Handles one message on the inbox: a delivery, or a status about the
    /// pull request it answers.
    fn handle(
        &self,
        state: &mut PullState,
        message: async_nats::Message,
    ) -> Option<Result<RawDelivery>> {
        state.last_activity = Instant::now();
        let request = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        match message.status.map(|s| s.as_u16()) {
            None | Some(200) => {
                if let Some(n) = request
                    && let Some((left, _)) = state.requests.get_mut(&n)
                {
                    *left -= 1;
                    if *left == 0 {
                        state.requests.remove(&n);
                    }
                }
                // More than requested cannot happen; if it does, leave it
                // unsettled (it comes back after the ack wait).
                let permit = state.reserved.pop()?;
                self.deliver(
                    jetstream::Message {
                        message,
                        context: self.js.clone(),
                    },
                    permit,
                )
            }
            // Heartbeat.
            Some(100) => None,
            // Any other status ends that pull request (408 expired, 409
            // limits exceeded or consumer deleted, …): its unfilled room
            // comes back.
            Some(status) => {
                let unfilled = request
                    .and_then(|n| state.requests.remove(&n))
                    .map_or(0, |(left, _)| left);
                let keep = state.reserved.len().saturating_sub(unfilled);
                state.reserved.truncate(keep);
                let description = message.description.unwrap_or_default();
                if status == 503 || (status == 409 && description.contains("Deleted")) {
                    state.suspect = true;
                }
                match status {
                    408 | 404 => None,
                    409 if !description.contains("Deleted") => None,
                    _ => Some(Err(Error::broker(
                        format!("pull request ended with status {status}: {description}"),
                        status != 409,
                        None,
                    ))),
                }
            }
        }
    }

    fn deliver(
        &self,
        msg: jetstream::Message,
        permit: OwnedSemaphorePermit,
    ) -> Option<Result<RawDelivery>> {
        let (attempt, seq, published) = match msg.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(u32::MAX).max(1),
                info.stream_sequence,
                Some(std::time::SystemTime::from(info.published)),
            ),
            Err(_) => (1, 0, None),
        };
        self.slow.handed_out(attempt);
        let ticket = msg
            .message
            .reply
            .clone()
            .map(|reply| self.outstanding.insert(reply));
        let (message, acker) = msg.split();
        let message = codec::decode(message.headers.as_ref(), message.payload, published, || {
            format!("{}:{seq}", self.stream_name)
        });
        Some(Ok(RawDelivery {
            message,
            attempt,
            acker: Box::new(NatsAcker {
                acker,
                cancel: self.cancel.clone(),
                timeout: self.request_timeout,
                outstanding: Arc::clone(&self.outstanding),
                ticket,
                _permit: permit,
            }),
        }))
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

#[derive(Debug)]
struct NatsReceiver {
    shared: Arc<ReceiverShared>,
}

#[async_trait]
impl Receiver for NatsReceiver {
    /// Pulls exactly as many messages as the consumer has room for: every
    /// message requested holds one prefetch permit until it is settled, so the
    /// consumer never has more than `prefetch` deliveries outstanding on the
    /// server. Pull requests overlap (a new one whenever a quarter of the room
    /// is free) and all reply to one inbox, which keeps stream order.
    ///
    /// Cancel safe: permits move into the receiver's state only once the pull
    /// request is sent, and the inbox is a channel.
    async fn recv(&self) -> Option<Result<RawDelivery>> {
        let s = &*self.shared;
        let mut state = match s.state.try_lock() {
            Ok(state) => state,
            Err(_) => tokio::select! {
                st = s.state.lock() => st,
                () = s.cancel.cancelled() => return None,
            },
        };
        loop {
            if s.cancel.is_cancelled() {
                return None;
            }
            if let Some(gone) = &state.gone {
                return Some(Err(gone.replicate()));
            }
            if let Some(refused) = s.refused.error() {
                return Some(Err(refused));
            }
            if state.suspect {
                state.suspect = false;
                if let Some(gone) = s.consumer_gone().await {
                    return Some(Err(s.lost(&mut state, gone).await));
                }
            }
            if let Err(e) = s.top_up(&mut state).await {
                tokio::select! {
                    () = tokio::time::sleep(PULL_RETRY) => {}
                    () = s.cancel.cancelled() => return None,
                }
                return Some(Err(e));
            }
            // Fast path: a message already arrived (no timers, no waiters).
            if let Some(next) = state.arrived() {
                let message = next?;
                if let Some(item) = s.handle(&mut state, message) {
                    return Some(s.confirm(&mut state, item).await);
                }
                continue;
            }
            if state.reserved.is_empty() {
                // Nothing requested because there is no room: wait for some
                // (one at a time: for everything held to be settled).
                let want = if s.slow.is_open() {
                    1
                } else {
                    u32::try_from(s.prefetch).unwrap_or(u32::MAX)
                };
                tokio::select! {
                    p = s.permits.acquire_many(want) => drop(p.ok()?),
                    () = s.cancel.cancelled() => return None,
                }
                continue;
            }
            // A pull request whose end the server never reported (lost in a
            // reconnect) must not hold room forever. The timer lives in the
            // state, so waiting for each message does not re-arm one.
            let PullState {
                inbox,
                stall,
                last_activity,
                ..
            } = &mut *state;
            let message = tokio::select! {
                m = inbox.next() => m,
                () = stall.as_mut() => {
                    let due = *last_activity + STALLED;
                    if Instant::now() >= due {
                        state.reserved.clear();
                        state.requests.clear();
                        // Lost in a reconnect, or the consumer was deleted
                        // (nats-server 2.9 then says nothing): ask.
                        state.suspect = true;
                        state.stall.as_mut().reset(Instant::now() + STALLED);
                    } else {
                        stall.as_mut().reset(due);
                    }
                    continue;
                }
                () = s.cancel.cancelled() => return None,
            };
            let Some(message) = message else {
                // The inbox subscription ended (connection closed).
                return None;
            };
            if let Some(item) = s.handle(&mut state, message) {
                return Some(s.confirm(&mut state, item).await);
            }
        }
    }

    fn try_recv(&self) -> Option<Result<RawDelivery>> {
        let s = &*self.shared;
        if s.cancel.is_cancelled() {
            return None;
        }
        let mut state = s.state.try_lock().ok()?;
        // Only what already arrived. When a pull request is due, leave the
        // call to `recv`, which sends it (keeping requests overlapped).
        if s.pull_due(&state) {
            return None;
        }
        loop {
            let message = state.arrived()??;
            // A suspect error is confirmed by the next `recv`.
            if let Some(item) = s.handle(&mut state, message) {
                return Some(item);
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
        // A dropped consumer: stop pulling; what it held comes back after
        // the ack wait (`close` hands it back at once).
        self.shared.cancel.cancel();
        if let Ok(mut state) = self.shared.state.try_lock() {
            state.reserved.clear();
            state.requests.clear();
        }
    }
}

struct NatsAcker {
    acker: jetstream::message::Acker,
    cancel: CancellationToken,
    /// Bound on handing the ack to the connection (it blocks while the
    /// client is disconnected and its buffer is full).
    timeout: Duration,
    /// Where this delivery is recorded as handed out, until it is settled.
    outstanding: Arc<Outstanding<async_nats::Subject>>,
    ticket: Option<u64>,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for NatsAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsAcker").finish_non_exhaustive()
    }
}

impl NatsAcker {
    async fn send(&self, kind: AckKind, what: &'static str) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Closed);
        }
        let send = self.acker.ack_with(kind);
        tokio::pin!(send);
        // Usually the connection takes it at once: no timer on the hot path.
        let result = match (&mut send).now_or_never() {
            Some(r) => r,
            None => match tokio::time::timeout(self.timeout, send).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::Timeout {
                        operation: what,
                        after: self.timeout,
                    });
                }
            },
        };
        result.map_err(|e| Error::broker(format!("{what}: {e}"), true, Some(e)))
    }

    /// Sends a settlement; once the connection took it, `close` no longer
    /// hands the delivery back.
    async fn settle(&self, kind: AckKind, what: &'static str) -> Result<()> {
        self.send(kind, what).await?;
        if let Some(ticket) = self.ticket {
            self.outstanding.settle(ticket);
        }
        Ok(())
    }
}

/// Acks are sent like RabbitMQ's `basic.ack`: `Ok` means the ack was handed
/// to the connection, which delivers it in order before anything sent later
/// (and `close` flushes it). If the connection drops first, the ack is lost
/// and the message is redelivered: at-least-once, never loss.
#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<()> {
        self.settle(AckKind::Ack, "ack").await
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.settle(AckKind::Nak(delay), "nak").await
    }

    /// A progress ack (`+WPI`): the server restarts the ack wait.
    async fn extend(&self) -> Result<()> {
        self.send(AckKind::Progress, "progress ack").await
    }
}
