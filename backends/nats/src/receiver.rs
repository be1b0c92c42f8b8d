//! The JetStream backend's receivers and ackers: pulling within the
//! prefetch, keeping leases, settling, handing back on close.

use std::{collections::HashMap, fmt, pin::Pin, sync::Arc, time::Duration};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use switchyard_core::{
    Error, Result, SubscribeOptions,
    driver::{Acker, Outstanding, RawDelivery, ReceiverCore, SharedReceiver, SlowStart},
};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{EXPIRY_MARGIN, NatsBroker, PULL_HEARTBEAT, PULL_RETRY, Refused, STALLED, STATE_WAIT},
    codec,
    error::js_error,
};

/// The consumer's pulling state, kept across cancelled receives.
pub(crate) struct PullState {
    /// The one inbox every pull request of this consumer replies to: the
    /// server sends in stream order, so one inbox keeps that order even with
    /// several pull requests outstanding.
    pub(crate) inbox: async_nats::Subscriber,
    /// Permits of messages requested but not yet received: as many as the
    /// open requests together may still send. (A delivery does not say
    /// which request it answers — it comes on the stream's subject — so
    /// the count is kept for all of them.)
    pub(crate) reserved: Vec<OwnedSemaphorePermit>,
    /// Pull requests that may be open, by reply subject suffix (a status
    /// about a request comes on its reply subject). One filled ends
    /// without a word, so entries stay until `reserved` runs out, or until
    /// well past their expiry once there are [`prune_at`](Self::prune_at).
    pub(crate) requests: HashMap<u64, Request>,
    /// The size of `requests` at which entries past their expiry go.
    pub(crate) prune_at: usize,
    pub(crate) next_request: u64,
    /// Last time the server said anything on the inbox (or we asked). An
    /// open request is never silent for long: it gets a delivery, an idle
    /// heartbeat ([`PULL_HEARTBEAT`]) or its end.
    pub(crate) last_activity: Instant,
    /// Fires when the server has been silent for [`STALLED`].
    pub(crate) stall: Pin<Box<tokio::time::Sleep>>,
    /// The connection's drops and returns: a return means the open requests
    /// are presumed lost.
    pub(crate) link: tokio::sync::watch::Receiver<crate::broker::Link>,
    /// The returns seen so far.
    pub(crate) returns: u64,
    /// A pull request ended as if the consumer were gone (409 "Consumer
    /// Deleted", 503 no responders, or the server silent for [`STALLED`]):
    /// `recv` asks the server whether it is.
    pub(crate) suspect: bool,
    /// Set once the consumer or its stream was found deleted: every
    /// receive returns it.
    pub(crate) gone: Option<Error>,
    /// Messages taken off the inbox by [`keep_leases`] while no receive
    /// ran, in arrival order, each with when its ack wait last (re)started
    /// at the latest: `recv` takes these first.
    pub(crate) pulled: std::collections::VecDeque<(async_nats::Message, Instant)>,
    /// A request ended with nothing sent because the next message did not
    /// fit its `max_bytes` (a message larger than the server's limit now,
    /// published before it was lowered): the next request asks without a
    /// bound, so it cannot hold up the stream.
    pub(crate) oversize: bool,
}

/// A pull request that may be open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    /// Messages asked for.
    batch: usize,
    /// Bytes asked for at most (0: no bound).
    max_bytes: usize,
    sent: Instant,
}

impl PullState {
    /// Nothing more to come: every request was filled or ended.
    fn forget_ended(&mut self) {
        if self.reserved.is_empty() && !self.requests.is_empty() {
            self.requests.clear();
        }
    }

    /// Forgets the requests sent longer than `live` ago, which have ended
    /// whatever the server said about them, and the room they may still
    /// hold: at most the batches of the requests left can still be sent.
    /// (A request the server ended without a word, its bytes run out
    /// exactly, leaves room held that nothing else gives back while other
    /// requests keep the inbox busy.)
    fn drop_lapsed(&mut self, now: Instant, live: Duration) {
        drop_lapsed(&mut self.requests, &mut self.reserved, now, live);
    }

    /// The next message that already arrived, if any: `Some(None)` when the
    /// inbox ended.
    fn arrived(&mut self) -> Option<Option<async_nats::Message>> {
        match self.pulled.pop_front() {
            Some((m, _)) => Some(Some(m)),
            None => self.inbox.next().now_or_never(),
        }
    }
}

pub(crate) struct ReceiverShared {
    /// The closing token and the pulling state.
    pub(crate) core: ReceiverCore<PullState>,
    /// One permit per delivery this consumer may hold (its prefetch).
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) prefetch: usize,
    pub(crate) stream_name: String,
    pub(crate) consumer_name: String,
    /// The client's credential state ([`Refused`]).
    pub(crate) refused: Arc<Refused>,
    /// With memory storage: how to create the stream and consumer again
    /// when a server restart lost them.
    pub(crate) recreate: Option<(NatsBroker, String, SubscribeOptions)>,
    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`.
    pub(crate) next_subject: String,
    pub(crate) inbox_subject: String,
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    /// Bound on sends to the connection and on flushing.
    pub(crate) request_timeout: Duration,
    /// Reply subjects of the deliveries handed out and not settled: `close`
    /// NAKs them, so they come back at once rather than after the ack wait.
    pub(crate) outstanding: Arc<Outstanding<async_nats::Subject>>,
    /// One message at a time until a first delivery shows that the head of
    /// the stream is not what crashed the last consumer.
    pub(crate) slow: SlowStart,
    /// The consumer's ack wait (the ack timeout).
    pub(crate) ack_wait: Duration,
    /// How long each pull request waits on the server.
    pub(crate) pull_expiry: Duration,
    /// The bytes the receiver's open pull requests ask for together
    /// ([`NatsConfig::with_pull_bytes`](crate::NatsConfig::with_pull_bytes)).
    pub(crate) pull_bytes: usize,
    /// The most a single message can count against a request's `max_bytes`
    /// (the server's payload limit and room for the subject and reply).
    pub(crate) max_message: usize,
}

/// A pull request's `max_bytes` when it asks for `batch` of a receiver's
/// `prefetch` messages: its share of `pull_bytes`, at least `max_message`
/// (so the largest message fits in a request of its own), made prime (the
/// next one up).
///
/// The server ends a request without a word when a message leaves its
/// `max_bytes` at exactly zero, so the messages it did not send go on
/// holding room ([`PullState::reserved`]) until the request's entry lapses
/// ([`PullState::drop_lapsed`]). A prime makes that rarer: no run of
/// messages of one size lands on it (sizes as the server counts them, the
/// ack subject included, differ a little from delivery to delivery, so
/// this lowers the odds rather than ruling it out).
pub(crate) fn request_bytes(
    batch: usize,
    prefetch: usize,
    pull_bytes: usize,
    max_message: usize,
) -> usize {
    let share = pull_bytes.saturating_mul(batch) / prefetch.max(1);
    prime_at_least(share.max(max_message))
}

/// The smallest prime not below `n` (primes are dense: the search is short).
fn prime_at_least(n: usize) -> usize {
    let is_prime = |k: usize| k >= 2 && (2..).take_while(|d| d * d <= k).all(|d| k % d != 0);
    (n..).find(|k| is_prime(*k)).unwrap_or(n)
}

/// [`PullState::drop_lapsed`] on its two fields.
fn drop_lapsed<P>(
    requests: &mut HashMap<u64, Request>,
    reserved: &mut Vec<P>,
    now: Instant,
    live: Duration,
) {
    let before = requests.len();
    requests.retain(|_, r| r.sent + live > now);
    if requests.len() < before {
        let owed: usize = requests.values().map(|r| r.batch).sum();
        reserved.truncate(owed);
    }
}

/// Whether an inbox message is a delivery (not a pull request's status).
fn is_delivery(m: &async_nats::Message) -> bool {
    matches!(m.status.map(|s| s.as_u16()), None | Some(200))
}

/// Entries of [`PullState::requests`] kept before the old ones are pruned.
pub(crate) const PRUNE_AT: usize = 64;
/// How long past its expiry a request's entry is kept.
const PRUNE_AFTER: Duration = Duration::from_secs(5);

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
pub(crate) async fn keep_leases(shared: std::sync::Weak<ReceiverShared>) {
    let (tick, cancel) = match shared.upgrade() {
        Some(s) => ((s.ack_wait / 4).max(KEEP_TICK), s.core.token().clone()),
        None => return,
    };
    let mut last = Instant::now();
    loop {
        if cancel
            .run_until_cancelled(tokio::time::sleep(tick))
            .await
            .is_none()
        {
            return;
        }
        let Some(s) = shared.upgrade() else { return };
        // A receive holding the state reads the inbox itself.
        let Some(mut state) = s.core.try_state() else {
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
    /// but never handed out — NAKed, so they come back within about a second
    /// instead of after the ack wait.
    ///
    /// Open pull requests cannot be withdrawn, and a message NAKed while one
    /// waits on the server may be taken for it. So the inbox is drained first
    /// (`UNSUB` then `PING`: what the server sent before it saw the `UNSUB`
    /// still arrives, then the inbox ends); the server drops requests whose
    /// reply subject has no subscriber when its delivery loop next wakes,
    /// which their idle heartbeats make happen within [`PULL_HEARTBEAT`]. The
    /// NAKs carry a delay that outlasts that (none when no request is open):
    /// a redelivery that finds only such requests is what nats-server before
    /// 2.10.14 mishandles ([`NatsConfig::with_pull_expiry`](crate::NatsConfig::with_pull_expiry)).
    ///
    /// Every step is bounded by the request timeout; a `recv` parked while
    /// holding the state lock is waited for no longer than [`STATE_WAIT`]
    /// (then the inbox stays subscribed, and the NAKs wait until any request
    /// it may have open expired).
    pub(crate) async fn hand_back(&self) {
        self.core.close();
        let mut unseen = Vec::new();
        // Without the state (held by a receive parked and never polled
        // again), the open requests are unknown: assume one was just sent.
        let mut open_until = Some(Instant::now() + self.pull_expiry + EXPIRY_MARGIN);
        let mut unsubscribed = false;
        if let Some(mut state) = self.core.enter_to_close(STATE_WAIT).await {
            state.reserved.clear();
            unseen.extend(
                state
                    .pulled
                    .drain(..)
                    .filter(|(m, _)| is_delivery(m))
                    .filter_map(|(m, _)| m.reply),
            );
            if state.inbox.drain().await.is_ok() {
                unsubscribed = true;
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
            // Gone when they expire, or a heartbeat after the inbox was
            // unsubscribed (which the drain above waited for).
            let swept = Instant::now() + PULL_HEARTBEAT + EXPIRY_MARGIN;
            open_until = state
                .requests
                .drain()
                .map(|(_, r)| r.sent)
                .max()
                .map(|sent| {
                    let expired = sent + self.pull_expiry + EXPIRY_MARGIN;
                    if unsubscribed {
                        expired.min(swept)
                    } else {
                        expired
                    }
                });
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
        tracing::warn!(consumer = %self.consumer_name, error = %gone, "the subscription's consumer is gone");
        let Some((broker, topic, options)) = &self.recreate else {
            state.gone = Some(gone.clone());
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
        let answer = self
            .core
            .until_closed(tokio::time::timeout(self.request_timeout, asked))
            .await?
            .ok()?;
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
        state.drop_lapsed(Instant::now(), self.pull_expiry + PRUNE_AFTER);
        if !self.pull_due(state) {
            return Ok(());
        }
        // A message larger than a bounded request: one request for it alone,
        // without a byte bound (see `PullState::oversize`).
        let oversize = std::mem::take(&mut state.oversize);
        let free = if oversize {
            self.room().min(1)
        } else {
            self.room()
        };
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
        // Bounded in bytes too: see `request_bytes` and
        // `NatsConfig::with_pull_bytes`.
        let max_bytes = if oversize {
            0
        } else {
            request_bytes(got.len(), self.prefetch, self.pull_bytes, self.max_message)
        };
        let body = format!(
            r#"{{"batch":{},"max_bytes":{max_bytes},"expires":{},"idle_heartbeat":{}}}"#,
            got.len(),
            self.pull_expiry.as_nanos(),
            PULL_HEARTBEAT.as_nanos()
        );
        let request = state.next_request;
        let send = self.client.publish_with_reply(
            self.next_subject.clone(),
            format!("{}.{request}", self.inbox_subject),
            body.into(),
        );
        match self
            .core
            .until_closed(tokio::time::timeout(self.request_timeout, send))
            .await
        {
            Some(Ok(sent)) => sent.map_err(|e| js_error("sending pull request", e, true))?,
            Some(Err(_)) => {
                return Err(Error::Timeout {
                    operation: "sending a pull request",
                    after: self.request_timeout,
                });
            }
            None => return Err(Error::Closed),
        }
        state.next_request += 1;
        let now = Instant::now();
        state.requests.insert(
            request,
            Request {
                batch: got.len(),
                max_bytes,
                sent: now,
            },
        );
        state.reserved.extend(got);
        state.last_activity = now;
        if state.requests.len() >= state.prune_at {
            // Ended by now (a status about them comes at their expiry).
            let live = self.pull_expiry + PRUNE_AFTER;
            state.requests.retain(|_, r| r.sent + live > now);
            state.prune_at = (2 * state.requests.len()).max(PRUNE_AT);
        }
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
                let permit = state.reserved.pop().or_else(|| {
                    // More than was asked for: a request presumed lost (the
                    // server silent for `STALLED`) was not. The server
                    // counted this delivery, so it is handed out (an
                    // attempt is a delivery the application saw), over the
                    // prefetch when that is full.
                    tracing::debug!(
                        consumer = %self.consumer_name,
                        "a delivery beyond the open pull requests"
                    );
                    Arc::clone(&self.permits).try_acquire_owned().ok()
                });
                state.forget_ended();
                self.deliver(
                    jetstream::Message {
                        message,
                        context: self.js.clone(),
                    },
                    permit,
                )
            }
            // Idle heartbeat: a request is still open.
            Some(100) => None,
            // Any other status ends that pull request (408 expired, 409
            // limits exceeded or consumer deleted, …): its unfilled room
            // comes back.
            Some(status) => {
                // The server says how many it did not send (a request
                // already forgotten gives nothing back).
                let pending = |name: &str| {
                    message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .and_then(|v| v.as_str().parse::<usize>().ok())
                };
                let ended = request.and_then(|n| state.requests.remove(&n));
                let unfilled = ended.map_or(0, |r| {
                    pending("Nats-Pending-Messages").map_or(r.batch, |n| n.min(r.batch))
                });
                // Nothing sent, for the next message is larger than the
                // whole request: a 409 saying so keeps all its bytes
                // (nats-server 2.9.0-2.9.5 send it without the header).
                if let Some(r) = ended
                    && r.max_bytes > 0
                    && status == 409
                    && message
                        .description
                        .as_deref()
                        .is_some_and(|d| d.contains("MaxBytes"))
                    && pending("Nats-Pending-Bytes").is_none_or(|b| b == r.max_bytes)
                {
                    state.oversize = true;
                }
                let keep = state.reserved.len().saturating_sub(unfilled);
                state.reserved.truncate(keep);
                state.forget_ended();
                let description = message.description.unwrap_or_default();
                tracing::debug!(
                    consumer = %self.consumer_name,
                    status,
                    %description,
                    unfilled,
                    "a pull request ended"
                );
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
        permit: Option<OwnedSemaphorePermit>,
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
                cancel: self.core.token().clone(),
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
            .field("core", &self.core)
            .field("free_permits", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SharedReceiver for ReceiverShared {
    /// Pulls exactly as many messages as the consumer has room for: every
    /// message requested holds one prefetch permit until it is settled, so the
    /// consumer never has more than `prefetch` deliveries outstanding on the
    /// server. Pull requests overlap (a new one whenever a quarter of the room
    /// is free) and all reply to one inbox, which keeps stream order.
    ///
    /// Cancel safe: permits move into the receiver's state only once the pull
    /// request is sent, and the inbox is a channel.
    async fn recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = &**this;
        let mut state = s.core.enter().await?;
        while !s.core.is_closed() {
            if let Some(gone) = &state.gone {
                return Some(Err(gone.clone()));
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
                if !s.core.pause(PULL_RETRY).await {
                    return None;
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
                drop(
                    s.core
                        .until_closed(s.permits.acquire_many(want))
                        .await?
                        .ok()?,
                );
                continue;
            }
            // A pull request whose end the server never reported (lost in a
            // restart) must not hold room forever. The timer lives in the
            // state, so waiting for each message does not re-arm one.
            let PullState {
                inbox,
                stall,
                last_activity,
                link,
                returns,
                ..
            } = &mut *state;
            let message = tokio::select! {
                m = inbox.next() => m,
                // The connection came back after a drop: requests sent
                // before it are presumed lost (a restarted server forgot
                // them), so ask again now rather than after `STALLED`. Were
                // they kept (a short cut, the same server), their extra
                // deliveries are handled as over the prefetch.
                Ok(back) = async { link.wait_for(|l| l.returns != *returns).await.map(|l| l.returns) } => {
                    state.returns = back;
                    tracing::debug!(
                        consumer = %s.consumer_name,
                        requests = state.requests.len(),
                        "the connection came back: asking again"
                    );
                    state.reserved.clear();
                    state.requests.clear();
                    state.suspect = true;
                    state.last_activity = Instant::now();
                    continue;
                }
                () = stall.as_mut() => {
                    let due = *last_activity + STALLED;
                    if Instant::now() >= due {
                        tracing::warn!(
                            consumer = %s.consumer_name,
                            requests = state.requests.len(),
                            reserved = state.reserved.len(),
                            "no word from the server on open pull requests for {STALLED:?}: \
                             presumed lost, asking again"
                        );
                        state.reserved.clear();
                        state.requests.clear();
                        // Lost in a server restart, or the consumer was
                        // deleted (nats-server 2.9 then says nothing): ask.
                        state.suspect = true;
                        state.stall.as_mut().reset(Instant::now() + STALLED);
                    } else {
                        stall.as_mut().reset(due);
                    }
                    continue;
                }
                () = s.core.token().cancelled() => return None,
            };
            let Some(message) = message else {
                // The inbox subscription ended (connection closed).
                return None;
            };
            if let Some(item) = s.handle(&mut state, message) {
                return Some(s.confirm(&mut state, item).await);
            }
        }
        None
    }

    fn try_recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = &**this;
        let mut state = s.core.try_enter()?;
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

    async fn shutdown(&self) -> Result<()> {
        self.hand_back().await;
        Ok(())
    }

    /// Stops pulling; what it held comes back after the ack wait (`close`
    /// hands it back at once).
    fn dropped(&self) {
        self.core.close();
        if let Some(mut state) = self.core.try_state() {
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
    /// `None` for a delivery over the prefetch (see `handle`).
    _permit: Option<OwnedSemaphorePermit>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_share_the_budget_and_fit_the_largest_message() {
        let (mib, max_message) = (1 << 20, (1 << 20) + 16 * 1024);
        // Half the prefetch: about half the budget, the next prime up.
        let half = request_bytes(128, 256, 4 * mib, max_message);
        assert!(half >= 2 * mib && half < 2 * mib + 100, "{half}");
        assert!((2..).take_while(|d| d * d <= half).all(|d| half % d != 0));
        // One message: never under the largest message.
        let one = request_bytes(1, 256, 4 * mib, max_message);
        assert!(one >= max_message && one < max_message + 100, "{one}");
        // No run of equal messages ends a request at exactly zero.
        for size in [1_000, 4_096, 65_536 + 120, 100_003] {
            assert_ne!(half % size, 0, "{size}");
        }
    }

    #[test]
    fn lapsed_requests_give_back_what_they_still_held() {
        // A request for 4 that the server ended without a word after one
        // delivery, and a newer one for 3 still open: 6 units of room held.
        let sent = Instant::now();
        let request = |batch, sent| Request {
            batch,
            max_bytes: 0,
            sent,
        };
        let mut requests = HashMap::from([
            (0, request(4, sent)),
            (1, request(3, sent + Duration::from_secs(20))),
        ]);
        let mut reserved = vec![(); 6];
        let live = Duration::from_secs(35);
        // Before the first lapses, nothing changes.
        drop_lapsed(
            &mut requests,
            &mut reserved,
            sent + Duration::from_secs(30),
            live,
        );
        assert_eq!((requests.len(), reserved.len()), (2, 6));
        // Once it lapsed, at most the open one's 3 can still come.
        drop_lapsed(
            &mut requests,
            &mut reserved,
            sent + Duration::from_secs(36),
            live,
        );
        assert_eq!((requests.len(), reserved.len()), (1, 3));
    }
}
