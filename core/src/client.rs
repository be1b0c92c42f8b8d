//! The portable handle applications use.

use std::{fmt, sync::Arc, time::Duration, time::SystemTime};

use async_trait::async_trait;

use crate::{
    Capabilities, Message, SubscribeOptions, Subscription,
    delivery::SubscriptionContext,
    driver::{Broker, Publisher, Receiver, Subscriber},
    error::{Error, NameKind, Result},
    headers,
    names::validate_name,
    options::DEAD_LETTERS_SUBSCRIPTION,
};

/// A cheap, cloneable handle on one backend: publish, subscribe, redrive.
///
/// `Client` is the portable layer over a backend's [`Broker`]: it checks
/// names, header keys and payload sizes identically for every backend,
/// stamps `published_at`, creates dead-letter subscriptions, and wraps
/// receivers into [`Subscription`]s that apply the dead-letter rules. It
/// implements [`Publisher`] (with the checks in place), so it works wherever
/// something that publishes is asked for ([`PublisherExt`](crate::PublisherExt),
/// the outbox relay); it is not a [`Broker`]: a raw receiver from it would
/// skip the dead-letter rules. The backend underneath is
/// [`broker`](Client::broker), for backend authors and tests.
///
/// Cloning is cheap (an `Arc`); clones share the connection, and
/// [`close`](Client::close) closes it for all of them.
///
/// # Examples
///
/// Any backend's client (from `switchyard::connect(url)` or a backend crate):
///
/// ```
/// use switchyard_core::{Client, Message, Retry, SubscribeOptions};
///
/// async fn run(client: Client) -> switchyard_core::Result<()> {
///     let opts = SubscribeOptions::new("billing");
///     client.ensure_subscription("orders", &opts).await?;
///     client.publish("orders", Message::new("hello").with_key("customer-7")).await?;
///
///     let mut sub = client.subscribe("orders", opts).await?;
///     let delivery = sub.recv().await?;
///     if delivery.attempt() < 3 {
///         delivery.nack(Retry::now()).await?;
///     } else {
///         delivery.ack().await?;
///     }
///     client.close().await
/// }
/// ```
#[derive(Clone)]
pub struct Client {
    broker: Arc<dyn Broker>,
}

impl Client {
    /// Wraps a backend.
    pub fn new(broker: impl Broker + 'static) -> Self {
        Self {
            broker: Arc::new(broker),
        }
    }

    /// Wraps a shared backend.
    #[must_use]
    pub fn from_arc(broker: Arc<dyn Broker>) -> Self {
        Self { broker }
    }

    /// The backend underneath (escape hatch; it skips the portable checks).
    #[must_use]
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The backend underneath as its own type, to reach its native client
    /// (go-cloud's `As`): `None` when the client runs on another backend.
    /// What is done through the native client skips switchyard's checks and
    /// rules.
    ///
    /// With NATS, `client.backend::<switchyard::nats::NatsBroker>()` gives
    /// the broker whose `jetstream()` is async-nats's JetStream context; with
    /// RabbitMQ, `RabbitBroker::connection()` is lapin's connection; with
    /// Kafka and SQS, `producer()` and `sqs_client()`.
    ///
    /// ```
    /// use switchyard_memory::{MemoryBroker, MemoryConnection};
    ///
    /// let client = MemoryBroker::new().client();
    /// assert!(client.backend::<MemoryConnection>().is_some());
    /// // Another backend's type: not this client's.
    /// assert!(client.backend::<std::time::Duration>().is_none());
    /// ```
    #[must_use]
    pub fn backend<B: 'static>(&self) -> Option<&B> {
        self.broker.as_any()?.downcast_ref::<B>()
    }

    /// What the backend can do.
    #[must_use]
    pub fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    fn prepare(&self, topic: &str, message: Message, limit: usize) -> Result<Message> {
        validate_name(NameKind::Topic, topic)?;
        Self::prepare_message(message, limit)
    }

    /// [`prepare`](Self::prepare) for a topic already checked.
    fn prepare_message(message: Message, limit: usize) -> Result<Message> {
        message.validate()?;
        let size = message.payload().len();
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        let message = if message.published_at().is_none() {
            message.with_published_at(SystemTime::now())
        } else {
            message
        };
        Ok(crate::telemetry::inject(message))
    }

    /// Publishes `message` to `topic` and waits for the broker's confirmation.
    ///
    /// Publishing never requires a subscription to exist, but a message
    /// published before any subscription exists may be dropped by the broker
    /// (as RabbitMQ and SNS do): call
    /// [`ensure_subscription`](Client::ensure_subscription) at deploy time.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::InvalidHeader`] and
    /// [`Error::PayloadTooLarge`] before anything is sent; [`Error::Closed`]
    /// after close; connection and broker errors.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes leaves the message published
    /// or not, never half: publish it again with the same id (consumers
    /// de-duplicate by id).
    pub async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        let message = self.prepare(topic, message, self.capabilities().max_payload)?;
        self.broker.publish(topic, message).await
    }

    /// Publishes many messages with pipelined confirmations; one result per
    /// message, in order. Messages that fail the checks are reported without
    /// being sent; the others are still published.
    pub async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        let limit = self.capabilities().max_payload;
        // The topic once for the batch, not once per message.
        if let Err(e) = validate_name(NameKind::Topic, topic) {
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(messages.len());
        let mut valid = Vec::with_capacity(messages.len());
        for message in messages {
            match Self::prepare_message(message, limit) {
                Ok(m) => {
                    valid.push(m);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut sent = if valid.is_empty() {
            Vec::new()
        } else {
            self.broker.publish_batch(topic, valid).await
        }
        .into_iter();
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    sent.next().unwrap_or_else(|| {
                        Err(Error::broker(
                            "backend returned too few results",
                            false,
                            None,
                        ))
                    })
                })
            })
            .collect()
    }

    /// Makes sure `topic` exists.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`]; connection and broker errors.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        validate_name(NameKind::Topic, topic)?;
        self.broker.ensure_topic(topic).await
    }

    /// Creates the subscription ahead of time, so nothing published between
    /// deploy and first consume is lost; also ensures the subscription
    /// `dead-letters` on its dead-letter topic, so dead letters are kept
    /// before anybody reads them.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] or [`Error::Config`] for bad options;
    /// connection and broker errors.
    pub async fn ensure_subscription(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        options.validate(topic)?;
        self.broker.ensure_subscription(topic, options).await?;
        self.ensure_dead_letters(topic, options).await
    }

    /// The `dead-letters` subscription of the dead-letter topic (none for a
    /// `dead-letters` subscription itself, which would recurse).
    async fn ensure_dead_letters(&self, topic: &str, options: &SubscribeOptions) -> Result<()> {
        if options.name() == DEAD_LETTERS_SUBSCRIPTION {
            return Ok(());
        }
        let dlq = options.dead_letter_topic_for(topic);
        self.broker
            .ensure_subscription(&dlq, &SubscribeOptions::dead_letters())
            .await
    }

    /// Attaches a consumer to the subscription (creating it, and its
    /// dead-letter subscription, when missing).
    ///
    /// # Errors
    ///
    /// As for [`Client::ensure_subscription`]; [`Error::Closed`] after close.
    pub async fn subscribe(&self, topic: &str, options: SubscribeOptions) -> Result<Subscription> {
        options.validate(topic)?;
        self.ensure_dead_letters(topic, &options).await?;
        // Opening a receiver creates the subscription when missing (driver
        // contract), so it is not ensured separately.
        let receiver = self.broker.receiver(topic, &options).await?;
        Ok(self.wrap(topic, &options, receiver))
    }

    fn wrap(
        &self,
        topic: &str,
        options: &SubscribeOptions,
        receiver: Box<dyn Receiver>,
    ) -> Subscription {
        let ctx = SubscriptionContext {
            topic: topic.to_owned(),
            subscription: options.name().to_owned(),
            dead_letter_topic: options.dead_letter_topic_for(topic),
            max_attempts: options.max_attempts(),
            ack_timeout: options.ack_timeout(),
            prefetch: options.prefetch(),
            broker: Arc::clone(&self.broker),
        };
        Subscription::new(receiver, Arc::new(ctx))
    }

    /// Moves dead letters of the subscription `options` on `topic` back to the
    /// topic they came from (`sy-original-topic`), without the `sy-*`
    /// dead-letter headers, so they start again at attempt 1.
    ///
    /// Reads the `dead-letters` subscription of the dead-letter topic; stops
    /// after `limit` messages (when given) or when none arrives for `idle`.
    /// Each dead letter is acked only after its re-publish is confirmed.
    /// Returns how many were moved.
    ///
    /// # Errors
    ///
    /// Connection and broker errors; messages moved before the error stay moved.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the move: what was moved stays moved, and
    /// the dead letter in flight is either still in the dead-letter topic,
    /// or both back on its topic and there (acked only after the re-publish
    /// is confirmed), never lost.
    pub async fn redrive(
        &self,
        topic: &str,
        options: &SubscribeOptions,
        limit: Option<usize>,
        idle: Duration,
    ) -> Result<usize> {
        options.validate(topic)?;
        let dlq = options.dead_letter_topic_for(topic);
        let mut sub = self
            .subscribe(&dlq, SubscribeOptions::dead_letters())
            .await?;
        let mut moved = 0;
        while limit.is_none_or(|l| moved < l) {
            let delivery = match tokio::time::timeout(idle, sub.recv()).await {
                Err(_elapsed) => break,
                Ok(d) => d?,
            };
            let mut message = delivery.message().clone();
            let target = message
                .headers()
                .get(headers::ORIGINAL_TOPIC)
                .filter(|t| validate_name(NameKind::Topic, t).is_ok())
                .unwrap_or(topic)
                .to_owned();
            message
                .headers_mut()
                .retain(|k, _| !headers::DEAD_LETTER_HEADERS.contains(&k));
            self.broker.publish(&target, message).await?;
            delivery.ack().await?;
            moved += 1;
        }
        sub.close().await?;
        Ok(moved)
    }

    /// Flushes pending publishes and closes the connection and its
    /// subscriptions. Later calls return [`Error::Closed`]; closing twice is
    /// harmless.
    ///
    /// # Errors
    ///
    /// When flushing or closing fails.
    pub async fn close(&self) -> Result<()> {
        let published = Publisher::close(&*self.broker).await;
        let subscribed = Subscriber::close(&*self.broker).await;
        published.and(subscribed)
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("broker", &self.broker)
            .finish()
    }
}

#[async_trait]
impl Publisher for Client {
    async fn publish(&self, topic: &str, message: Message) -> Result<()> {
        Client::publish(self, topic, message).await
    }

    async fn publish_batch(&self, topic: &str, messages: Vec<Message>) -> Vec<Result<()>> {
        Client::publish_batch(self, topic, messages).await
    }

    async fn close(&self) -> Result<()> {
        Publisher::close(&*self.broker).await
    }
}
