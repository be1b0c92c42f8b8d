//! The JetStream backend's publisher and subscriber: connecting, streams,
//! consumers, publishing.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::PublishErrorKind,
    message::PublishMessage,
    stream::{self, RetentionPolicy},
};
use async_trait::async_trait;
use futures_util::{StreamExt, stream::FuturesOrdered};
use switchyard_core::{
    Capabilities, Client, Error, KeyOrdering, Message, Result, SubscribeOptions,
    driver::{
        Broker, Lifecycle, Publisher, Receiver, ReceiverCore, ReceiverHandle, SlowStart, Subscriber,
    },
};
use tokio::{sync::Semaphore, time::Instant};

use crate::{
    NatsConfig, codec,
    error::{connect_error, js_error},
    names::token,
    receiver::{PullState, ReceiverShared, keep_leases},
};

/// Bytes of the server's `max_payload` kept for headers: the payload limit
/// switchyard reports is the server's minus this.
const HEADER_RESERVE: usize = 16 * 1024;
/// Longest a pull request waits on the server before it is renewed, by
/// default ([`NatsConfig::with_pull_expiry`](crate::NatsConfig::with_pull_expiry)). Long,
/// so that requests seldom expire: nats-server before 2.10.14
/// (nats-io/nats-server#5305) mishandles a redelivery that falls due while
/// the only requests waiting have expired but are not yet swept — it steps
/// its stream cursor back, sends the message before it again as delivery 1,
/// and counts the redelivery it never sent. A closing receiver does not wait
/// for its requests to expire: see [`PULL_HEARTBEAT`].
pub(crate) const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// The idle heartbeat each pull request asks for: the server says "100 Idle
/// Heartbeat" on a request's reply subject whenever it sent nothing there
/// for this long. So a receiver with requests open that hears nothing for
/// [`STALLED`] has lost them (a server restart drops requests without a
/// word). And the server's delivery loop
/// wakes for these heartbeats, sweeping requests whose reply subject lost
/// its subscriber: so a closing receiver's requests are gone within one
/// heartbeat after its inbox is unsubscribed (`ReceiverShared::hand_back`).
pub(crate) const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a closing receiver waits for its state: a receive being
/// cancelled gives it up at once, one parked and never polled again never
/// does.
pub(crate) const STATE_WAIT: Duration = Duration::from_millis(200);
/// Added to the server's timings (a request's expiry, its heartbeat) for
/// scheduling and the way there.
pub(crate) const EXPIRY_MARGIN: Duration = Duration::from_millis(500);
/// Silence on the inbox, with pull requests open, after which they are
/// presumed lost: five missed heartbeats ([`PULL_HEARTBEAT`]).
pub(crate) const STALLED: Duration = Duration::from_secs(5);
/// Pause after a failed pull before the next one.
pub(crate) const PULL_RETRY: Duration = Duration::from_millis(500);

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
    life: Lifecycle<ReceiverShared>,
    /// Set while the server refuses the credentials on reconnect.
    refused: Arc<Refused>,
    /// How many times the connection dropped and came back (see
    /// `NatsBroker::confirm` and the receivers' pull requests).
    link: Arc<tokio::sync::watch::Sender<Link>>,
}

/// What the client reported of its connection since it connected.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    /// How many times the connection dropped.
    pub(crate) drops: u64,
    /// How many times it came back after a drop.
    pub(crate) returns: u64,
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
            .field("life", &self.inner.life)
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
pub(crate) struct Refused {
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
    pub(crate) fn error(&self) -> Option<Error> {
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

/// Keeps `refused` up to date from the client's connection events, and
/// counts the connection's drops and returns in `link`.
fn watch_connection(
    options: async_nats::ConnectOptions,
    refused: &Arc<Refused>,
    link: &Arc<tokio::sync::watch::Sender<Link>>,
) -> async_nats::ConnectOptions {
    let refused = Arc::clone(refused);
    let link = Arc::clone(link);
    options.event_callback(move |event| {
        let refused = Arc::clone(&refused);
        let link = Arc::clone(&link);
        async move {
            let said = match event {
                async_nats::Event::Disconnected => {
                    link.send_modify(|l| l.drops += 1);
                    return;
                }
                async_nats::Event::Connected => {
                    // The first connection is not a return.
                    link.send_if_modified(|l| {
                        let back = l.drops > l.returns;
                        if back {
                            l.returns = l.drops;
                        }
                        back
                    });
                    None
                }
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
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| Error::Credentials {
                    message: format!("reading NATS credentials file {}: {e}", path.display()),
                    source: Some(std::sync::Arc::new(e)),
                })?;
        }
        if config.retain_server_order {
            options = options.retain_servers_order();
        }
        let refused = Arc::<Refused>::default();
        let link = Arc::new(tokio::sync::watch::Sender::new(Link::default()));
        options = watch_connection(options, &refused, &link);
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
                life: Lifecycle::new(),
                refused,
                link,
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
        self.inner.life.check_open()?;
        self.inner.refused.error().map_or(Ok(()), Err)
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

    pub(crate) fn forget_stream(&self, topic: &str) {
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

    /// Sends one publish; the returned future resolves on the PubAck. With
    /// it, how many times the connection had dropped before the send.
    async fn send(
        &self,
        subject: &str,
        message: &Message,
    ) -> Result<(jetstream::context::PublishAckFuture, u64)> {
        let headers = self.prepare(message)?;
        let drops = self.inner.link.borrow().drops;
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
            .map(|ack| (ack, drops))
            .map_err(|e| js_error("sending publish", e, true))
    }

    /// Waits for a publish's PubAck. When the connection drops after the
    /// publish was sent, the PubAck (if the server sent one) went with it:
    /// rather than wait out the request timeout, the publish fails at once
    /// with a retryable [`Error::Connection`], and the caller's retry goes
    /// out as soon as the client has reconnected. (The message may have been
    /// stored: a retry may store it twice, as after a timeout.)
    async fn confirm(
        &self,
        topic: &str,
        (ack, drops): (jetstream::context::PublishAckFuture, u64),
    ) -> Result<()> {
        let mut dropped = self.inner.link.subscribe();
        let dropped = async move {
            if dropped.wait_for(|l| l.drops != drops).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let acked = tokio::select! {
            biased;
            acked = ack => acked,
            () = dropped => {
                return Err(Error::Connection {
                    message: "the connection to the NATS server dropped before the publish \
                              was acknowledged (it may have been stored)"
                        .into(),
                    source: None,
                });
            }
        };
        match acked {
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
            ack_wait: options.ack_timeout(),
            // Unlimited: switchyard dead-letters after max_attempts itself.
            max_deliver: -1,
            deliver_policy: DeliverPolicy::New,
            max_ack_pending: self
                .inner
                .config
                .max_ack_pending
                .max(options.prefetch() as i64),
            ..Default::default()
        }
    }

    pub(crate) async fn consumer(
        &self,
        topic: &str,
        options: &SubscribeOptions,
    ) -> Result<PullConsumer> {
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
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        let t = match self.topic(topic).await {
            Ok(t) => t,
            Err(e) => return messages.iter().map(|_| Err(e.clone())).collect(),
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
        if self.inner.life.is_closed() {
            return Ok(());
        }
        self.inner.life.cancel();
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
            permits: Arc::new(Semaphore::new(options.prefetch())),
            prefetch: options.prefetch(),
            stream_name: self.stream_name(topic),
            consumer_name: info.name.clone(),
            refused: Arc::clone(&self.inner.refused),
            // A memory-storage stream and its consumers do not survive a
            // server restart: such a receiver creates them again.
            recreate: (self.inner.config.storage == stream::StorageType::Memory)
                .then(|| (self.clone(), topic.to_owned(), options.clone())),
            next_subject,
            inbox_subject,
            core: ReceiverCore::new(
                self.inner.life.child_token(),
                PullState {
                    inbox,
                    reserved: Vec::new(),
                    requests: HashMap::new(),
                    prune_at: crate::receiver::PRUNE_AT,
                    next_request: 0,
                    stall: Box::pin(tokio::time::sleep(STALLED)),
                    last_activity: Instant::now(),
                    link: self.inner.link.subscribe(),
                    returns: self.inner.link.borrow().returns,
                    suspect: false,
                    gone: None,
                    pulled: std::collections::VecDeque::new(),
                    oversize: false,
                },
            ),
            js: self.inner.js.clone(),
            client: self.inner.client.clone(),
            request_timeout: self.inner.config.request_timeout,
            outstanding: Arc::default(),
            slow: SlowStart::new(),
            ack_wait: options.ack_timeout(),
            pull_expiry: self.inner.config.pull_expiry,
            pull_bytes: self.inner.config.pull_bytes,
            max_message: self.inner.server_max_payload.saturating_add(HEADER_RESERVE),
        });
        tokio::spawn(keep_leases(Arc::downgrade(&shared)));
        self.inner.life.adopt(&shared);
        Ok(Box::new(ReceiverHandle::new(shared)))
    }

    async fn close(&self) -> Result<()> {
        for r in self.inner.life.close() {
            r.hand_back().await;
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

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
