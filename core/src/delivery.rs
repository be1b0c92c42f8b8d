//! Deliveries and the dead-letter rules (DESIGN §3.7), written once for every backend.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    Message, Retry,
    driver::{Acker, Broker, RawDelivery},
    error::Result,
    headers,
};

/// What a subscription knows to apply the dead-letter rules.
pub(crate) struct SubscriptionContext {
    pub(crate) topic: String,
    pub(crate) subscription: String,
    pub(crate) dead_letter_topic: String,
    pub(crate) max_attempts: u32,
    pub(crate) ack_timeout: Duration,
    pub(crate) prefetch: usize,
    pub(crate) broker: Arc<dyn Broker>,
}

impl SubscriptionContext {
    /// How often a holder extends a lease: a third of the ack timeout, so
    /// two extensions may fail or run late before the delivery is taken back.
    pub(crate) fn lease_interval(&self) -> Duration {
        (self.ack_timeout / 3).max(Duration::from_millis(1))
    }
}

impl fmt::Debug for SubscriptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionContext")
            .field("topic", &self.topic)
            .field("subscription", &self.subscription)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("max_attempts", &self.max_attempts)
            .field("ack_timeout", &self.ack_timeout)
            .finish_non_exhaustive()
    }
}

/// A received message with its attempt count, to be settled exactly once.
///
/// Settle with [`ack`](Delivery::ack), [`nack`](Delivery::nack) or
/// [`dead_letter`](Delivery::dead_letter); each consumes the delivery. **A
/// delivery dropped unsettled is redelivered** (after the subscription's ack
/// timeout at the latest), with its attempt count increased.
///
/// `Debug` never prints the payload.
pub struct Delivery {
    message: Message,
    attempt: u32,
    acker: Box<dyn Acker>,
    ctx: Arc<SubscriptionContext>,
}

impl Delivery {
    pub(crate) fn new(raw: RawDelivery, ctx: Arc<SubscriptionContext>) -> Self {
        Self {
            message: raw.message,
            attempt: raw.attempt,
            acker: raw.acker,
            ctx,
        }
    }

    /// The message.
    #[must_use]
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The delivery attempt: 1 on first delivery, durable across consumer restarts.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The topic the message was published to.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.ctx.topic
    }

    /// The subscription it was delivered through.
    #[must_use]
    pub fn subscription(&self) -> &str {
        &self.ctx.subscription
    }

    /// The subscription's attempt limit.
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        self.ctx.max_attempts
    }

    /// Whether this is the last attempt the subscription allows: a nack now
    /// dead-letters instead of redelivering.
    #[must_use]
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.ctx.max_attempts
    }

    /// The subscription's dead-letter topic.
    #[must_use]
    pub fn dead_letter_topic(&self) -> &str {
        &self.ctx.dead_letter_topic
    }

    /// Settles the message for good: it is not delivered to this
    /// subscription again, even after a consumer restart.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`](crate::Error::Closed) when the subscription was
    /// closed (the message will be redelivered); connection and broker
    /// errors (the message may be redelivered: at-least-once).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may or may not have acked: a delivery not acked
    /// comes back (after the ack timeout, or when its subscription closes),
    /// as at-least-once delivery allows. The same holds for
    /// [`nack`](Delivery::nack) and [`dead_letter`](Delivery::dead_letter).
    pub async fn ack(self) -> Result<()> {
        match self.acker.ack_now() {
            Some(done) => done,
            None => self.acker.ack().await,
        }
    }

    /// Asks for redelivery with attempt + 1 (not before the [`Retry`] delay).
    ///
    /// When this attempt is the last one allowed (`attempt >= max_attempts`),
    /// the message is dead-lettered instead, with reason
    /// `max attempts (N) exhausted`.
    ///
    /// # Errors
    ///
    /// As for [`Delivery::ack`] and [`Delivery::dead_letter`].
    ///
    /// # Cancel safety
    ///
    /// As for [`ack`](Delivery::ack): dropped before it completes, the
    /// message comes back (after the delay, or after the ack timeout).
    pub async fn nack(self, retry: Retry) -> Result<()> {
        if self.is_last_attempt() {
            let reason = format!("max attempts ({}) exhausted", self.ctx.max_attempts);
            return self.dead_letter(reason).await;
        }
        self.acker.nack(retry.delay()).await
    }

    /// Moves the message to the subscription's dead-letter topic with `reason`.
    ///
    /// The dead letter keeps id, key, payload and headers and gains
    /// `sy-dead-letter-reason`, `sy-original-topic`,
    /// `sy-original-subscription`, `sy-attempts` and `sy-dead-lettered-at`.
    /// It is published and confirmed **before** the original is acked: a
    /// crash in between may duplicate the dead letter, never lose it.
    ///
    /// # Errors
    ///
    /// When publishing the dead letter fails the original is left unsettled
    /// (and is redelivered after the ack timeout); when the ack fails after a
    /// confirmed dead-letter publish, the original may come back and be
    /// dead-lettered again.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it completes, the original comes back; if the dead
    /// letter was already confirmed it may be dead-lettered twice, never
    /// lost.
    pub async fn dead_letter(self, reason: impl Into<String>) -> Result<()> {
        dead_letter(
            &self.ctx,
            self.message,
            self.attempt,
            self.acker,
            reason.into(),
        )
        .await
    }

    /// Keeps this delivery's lease: restarts its ack timeout, so the broker
    /// does not redeliver it for another ack timeout from now. Call it while
    /// work on a delivery takes longer than the ack timeout (the
    /// [`Consumer`](crate::consumer::Consumer) runtime does it for every
    /// delivery it holds, running or queued).
    ///
    /// A delivery whose ack timeout already passed is not revived: the
    /// broker redelivers it, and settling this one is then a no-op.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`](crate::Error::Closed) when the subscription was
    /// closed; connection and broker errors (retryable: the next extension
    /// may succeed).
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(mut sub: switchyard_core::Subscription) -> switchyard_core::Result<()> {
    /// let delivery = sub.recv().await?;
    /// for _step in 0..3 {
    ///     // ... a slow step, shorter than the ack timeout ...
    ///     delivery.extend().await?;
    /// }
    /// delivery.ack().await
    /// # }
    /// ```
    pub async fn extend(&self) -> Result<()> {
        self.acker.extend().await
    }

    /// How often the runtime extends a lease (a third of the ack timeout).
    pub(crate) fn lease_interval(&self) -> Duration {
        self.ctx.lease_interval()
    }

    /// Takes the message out, leaving the delivery unsettled (it will be
    /// redelivered after the ack timeout).
    #[must_use]
    pub fn into_message(self) -> Message {
        self.message
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("attempt", &self.attempt)
            .field("topic", &self.ctx.topic)
            .field("subscription", &self.ctx.subscription)
            .finish_non_exhaustive()
    }
}

/// Builds the dead letter for `message`: same id, key, payload and headers,
/// plus the `sy-*` dead-letter headers.
pub(crate) fn dead_letter_message(
    ctx: &SubscriptionContext,
    mut message: Message,
    attempt: u32,
    reason: String,
) -> Message {
    let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let h = message.headers_mut();
    h.insert(headers::DEAD_LETTER_REASON, reason);
    h.insert(headers::ORIGINAL_TOPIC, ctx.topic.clone());
    h.insert(headers::ORIGINAL_SUBSCRIPTION, ctx.subscription.clone());
    h.insert(headers::ATTEMPTS, attempt.to_string());
    h.insert(headers::DEAD_LETTERED_AT, at);
    message
}

pub(crate) async fn dead_letter(
    ctx: &SubscriptionContext,
    message: Message,
    attempt: u32,
    acker: Box<dyn Acker>,
    reason: String,
) -> Result<()> {
    let dead = dead_letter_message(ctx, message, attempt, reason);
    // Publish-then-ack: if the publish fails the acker is dropped unsettled and
    // the broker redelivers the original.
    ctx.broker.publish(&ctx.dead_letter_topic, dead).await?;
    acker.ack().await
}
