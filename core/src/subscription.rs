//! A consumer attached to a subscription: a `Stream` of deliveries.

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_core::{Stream, future::BoxFuture};

use crate::{
    Delivery,
    delivery::{SubscriptionContext, dead_letter},
    driver::{RawDelivery, Receiver},
    error::{Error, Result},
};

type Pending = BoxFuture<'static, Option<Result<RawDelivery>>>;

/// One consumer attached to a subscription.
///
/// Receive with [`recv`](Subscription::recv) or use it as a
/// [`Stream`] of `Result<Delivery>`. A message that arrives already past the
/// subscription's `max_attempts` (for example because it crashed its
/// consumers) is dead-lettered here and never reaches the application.
///
/// Dropping a subscription is like a consumer crash: its unsettled deliveries
/// are redelivered. [`close`](Subscription::close) does the same, politely.
pub struct Subscription {
    receiver: Arc<dyn Receiver>,
    ctx: Arc<SubscriptionContext>,
    pending: Option<Pending>,
    closed: bool,
}

impl Subscription {
    pub(crate) fn new(receiver: Box<dyn Receiver>, ctx: Arc<SubscriptionContext>) -> Self {
        Self {
            receiver: Arc::from(receiver),
            ctx,
            pending: None,
            closed: false,
        }
    }

    /// The topic.
    #[must_use]
    pub fn topic(&self) -> &str {
        &self.ctx.topic
    }

    /// The subscription name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.ctx.subscription
    }

    /// The dead-letter topic.
    #[must_use]
    pub fn dead_letter_topic(&self) -> &str {
        &self.ctx.dead_letter_topic
    }

    /// How often the runtime extends the leases it holds.
    pub(crate) fn lease_interval(&self) -> std::time::Duration {
        self.ctx.lease_interval()
    }

    /// The subscription's prefetch limit.
    pub(crate) fn prefetch(&self) -> usize {
        self.ctx.prefetch
    }

    /// Waits for the next delivery.
    ///
    /// # Cancel safety
    ///
    /// This method is cancel safe: if it is used in `tokio::select!` and
    /// another branch wins, no delivery is lost — the receive in progress is
    /// kept and the next call resumes it.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the subscription (or its client) is closed;
    /// connection and broker errors from the backend, after which receiving
    /// may be tried again.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(mut sub: switchyard_core::Subscription) -> switchyard_core::Result<()> {
    /// let delivery = sub.recv().await?;
    /// println!("attempt {}", delivery.attempt());
    /// delivery.ack().await?;
    /// # Ok(()) }
    /// ```
    pub async fn recv(&mut self) -> Result<Delivery> {
        match std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await {
            Some(item) => item,
            None => Err(Error::Closed),
        }
    }

    /// Stops receiving. Unsettled deliveries of this consumer go back to the
    /// subscription for other consumers; settling them afterwards returns
    /// [`Error::Closed`]. Closing twice is harmless.
    ///
    /// # Errors
    ///
    /// When the backend fails to close the consumer cleanly.
    pub async fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.pending = None;
        self.receiver.close().await
    }

    fn next_raw(&self, first: Option<RawDelivery>) -> Pending {
        let receiver = Arc::clone(&self.receiver);
        let ctx = Arc::clone(&self.ctx);
        Box::pin(async move {
            let mut first = first;
            loop {
                let raw = match first.take() {
                    Some(raw) => raw,
                    None => match receiver.recv().await? {
                        Ok(raw) => raw,
                        Err(e) => return Some(Err(e)),
                    },
                };
                if raw.attempt <= ctx.max_attempts {
                    return Some(Ok(raw));
                }
                // Arrived past max_attempts (its consumers crashed or dropped
                // it): dead-letter without showing it to the application.
                let reason = format!(
                    "max attempts ({}) exceeded: delivered {} times without being settled",
                    ctx.max_attempts, raw.attempt
                );
                if let Err(e) = dead_letter(&ctx, raw.message, raw.attempt, raw.acker, reason).await
                {
                    return Some(Err(e));
                }
            }
        })
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.closed {
            return Poll::Ready(None);
        }
        let mut pending = match self.pending.take() {
            Some(p) => p,
            // Hot path: a delivery that already arrived, without a future.
            None => match self.receiver.try_recv() {
                Some(Ok(raw)) if raw.attempt <= self.ctx.max_attempts => {
                    return Poll::Ready(Some(Ok(Delivery::new(raw, Arc::clone(&self.ctx)))));
                }
                Some(Ok(raw)) => self.next_raw(Some(raw)),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.next_raw(None),
            },
        };
        match pending.as_mut().poll(cx) {
            Poll::Pending => {
                self.pending = Some(pending);
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.closed = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(raw))) => {
                Poll::Ready(Some(Ok(Delivery::new(raw, Arc::clone(&self.ctx)))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.ctx.topic)
            .field("name", &self.ctx.subscription)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}
