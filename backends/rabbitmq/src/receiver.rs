//! The AMQP backend's receivers and ackers: consuming within the
//! prefetch, coalesced acks, rejecting what outlived its ack timeout,
//! reopening after a lost channel.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, BasicRejectOptions,
        QueueDeclareOptions,
    },
    types::{FieldTable, ShortString},
};
use switchyard_core::{
    Error, Result,
    driver::{Acker, RawDelivery, ReceiverCore, SharedReceiver, SlowStart},
};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    book::{Acked, Book, Key, Wire},
    broker::*,
    codec,
    error::{amqp_error, bounded, is_not_found, reply_code},
};

/// How often a receiver taking one delivery at a time ([`SlowStart`])
/// looks whether the one it handed out was settled.
const SLOW_SETTLE_POLL: Duration = Duration::from_millis(5);

/// How long an ack may wait to be coalesced with the next ones.
pub(crate) const ACK_FLUSH_DELAY: Duration = Duration::from_millis(5);

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
pub(crate) struct Inflight {
    pub(crate) book: Mutex<Book<Arc<Channel>>>,
    /// Wakes the reaper when its next deadline may have moved earlier.
    pub(crate) wake: Notify,
    pub(crate) cancel: CancellationToken,
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
        let acked = self.book().ack(key, Instant::now());
        // Only the ack that sets the flush deadline wakes the reaper; the
        // ones coalesced with it add nothing to wait for.
        if matches!(acked, Acked::Deferred(Some(_))) {
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
pub(crate) async fn reap(inflight: Arc<Inflight>) {
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

pub(crate) struct ConsumeState {
    pub(crate) consumer: Option<lapin::Consumer>,
    pub(crate) channel: Option<Arc<Channel>>,
    /// The `basic.get` in flight while [`SlowStart`] holds the receiver to
    /// one delivery at a time.
    pub(crate) get:
        Option<tokio::task::JoinHandle<Result<Option<lapin::message::BasicGetMessage>>>>,
    /// The `basic.consume` in flight.
    pub(crate) starting: Option<tokio::task::JoinHandle<Result<lapin::Consumer>>>,
    /// The last delivery taken by `basic.get`: the broker's prefetch does
    /// not count it, so once consuming, until it is settled, the receiver
    /// hands out no more than the prefetch itself.
    pub(crate) outside: Option<Key>,
    /// Pause before the next reopen attempt after a failure.
    pub(crate) pause: Duration,
    /// Set once the queue was found deleted under the receiver: every
    /// receive returns it (the receiver does not quietly recreate an empty
    /// queue in its place).
    pub(crate) gone: Option<Error>,
}

pub(crate) struct ReceiverShared {
    pub(crate) broker: RabbitBroker,
    pub(crate) topic: String,
    pub(crate) subscription: String,
    pub(crate) queue: String,
    pub(crate) prefetch: u16,
    pub(crate) ack_timeout: Duration,
    /// Bumped each time the consumer is reopened on a new channel.
    pub(crate) generation: AtomicU64,
    /// The closing token (the reaper's too) and the consuming state.
    pub(crate) core: ReceiverCore<ConsumeState>,
    pub(crate) inflight: Arc<Inflight>,
    /// One delivery at a time (`basic.get`, no consumer yet) until a first
    /// delivery or an empty queue shows that the head of the queue is not
    /// what crashed the last consumer.
    pub(crate) slow: SlowStart,
}

impl fmt::Debug for ReceiverShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverShared")
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl ReceiverShared {
    /// Opens a channel with `basic.qos` = prefetch and starts consuming.
    pub(crate) async fn open(&self, state: &mut ConsumeState) -> Result<()> {
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
            if !self.core.pause(SLOW_SETTLE_POLL).await {
                return None;
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
        let got = self
            .core
            .until_closed(get)
            .await?
            .unwrap_or_else(|e| Err(Error::broker(format!("basic.get task: {e}"), true, None)));
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
        state.gone = Some(gone.clone());
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
    pub(crate) async fn hand_back(&self) {
        self.core.close();
        // Acks recorded before the close go out before it.
        {
            let mut book = self.inflight.book();
            let _ = book.flush();
            book.clear();
        }
        let taken = self
            .core
            .try_state()
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

#[async_trait]
impl SharedReceiver for ReceiverShared {
    /// The next delivery from the channel's consumer; the broker never sends
    /// more than the prefetch (`basic.qos`) unsettled. When the channel or
    /// the connection is lost, the consumer is reopened (with a growing
    /// pause between failed attempts, whose errors are returned).
    ///
    /// Cancel safe: the consumer is a channel of deliveries kept in the
    /// receiver's state.
    async fn recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = this;
        let mut state = s.core.enter().await?;
        while !s.core.is_closed() {
            if let Some(gone) = &state.gone {
                return Some(Err(gone.clone()));
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
                    if !s.core.pause(SLOW_SETTLE_POLL).await {
                        return None;
                    }
                    continue;
                }
            }
            let Some(consumer) = state.consumer.as_mut() else {
                let pause = state.pause;
                let mut reconnected = s.broker.inner.reconnects.subscribe();
                if let Err(e) = s.open(&mut state).await {
                    state.pause = (pause * 2).min(MAX_REOPEN_PAUSE);
                    // Until the next attempt, or until another caller (a
                    // publish, another receiver) has connected again.
                    let wait = async {
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            Ok(()) = reconnected.changed() => {}
                        }
                    };
                    s.core.until_closed(wait).await?;
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
                    s.core.until_closed(consumer.next()).await?
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
        None
    }

    fn try_recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = this;
        let mut state = s.core.try_enter()?;
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

    async fn shutdown(&self) -> Result<()> {
        self.hand_back().await;
        Ok(())
    }

    /// Stops the reaper; dropping the channel closes it, which returns its
    /// unsettled deliveries to the queue.
    fn dropped(&self) {
        self.core.close();
        self.inflight.flush();
        if let Some(mut state) = self.core.try_state() {
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
        self.shared.core.check_open()
    }

    fn record_ack(&self) -> Result<()> {
        self.check_open()?;
        self.ack_once("ack")
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
            Acked::Deferred(_) if !self.channel.status().connected() => Err(self.lost(what)),
            Acked::Deferred(_) => Ok(()),
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
        self.record_ack()
    }

    /// Recording the ack does not wait: done in place.
    fn ack_now(&self) -> Option<Result<()>> {
        Some(self.record_ack())
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
