//! The SQS backend's receivers and ackers: polling within the prefetch,
//! keeping the leases of prefetched copies, batched deletes, visibility
//! changes for nacks.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use aws_sdk_sqs::{
    error::ProvideErrorMetadata,
    types::{
        ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
        MessageSystemAttributeName,
    },
};
use futures_util::StreamExt;
use switchyard_core::{
    Error, Result,
    driver::{
        Acker, FailureStreak, Outstanding, RawDelivery, ReceiverCore, SharedReceiver, SlowStart,
    },
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::{
    broker::*,
    codec::{self},
    error::{failure, sdk_error},
};

/// A received message with the prefetch permit it holds and its ticket in
/// [`Prefetched`].
pub(crate) type Received = (aws_sdk_sqs::types::Message, OwnedSemaphorePermit, u64);

/// The messages a receiver took from the queue and has not handed out yet
/// (by ticket).
///
/// Their visibility timeout runs from the receive, but none of them is an
/// attempt until the application sees it (DESIGN §3.14): [`keep_leases`]
/// extends those whose lease runs low, so a consumer busy with what it holds
/// does not let its prefetch fall back to the queue — where another consumer
/// would take it at a raised receive count while this one still hands out
/// its stale copy.
pub(crate) type Prefetched = Outstanding<Lease>;

/// The lease on one prefetched copy.
pub(crate) struct Lease {
    pub(crate) receipt: String,
    /// When its visibility timeout ends at the latest.
    pub(crate) due: tokio::time::Instant,
    /// Lost: SQS refused to extend it (the copy's visibility lapsed). The
    /// message is back in the queue, so the copy is dropped rather than
    /// handed out.
    pub(crate) lost: bool,
}

pub(crate) struct ReceiverShared {
    pub(crate) sqs: aws_sdk_sqs::Client,
    pub(crate) url: String,
    /// One permit per message this consumer may hold (its prefetch).
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) prefetch: usize,
    /// Visibility timeout (the ack timeout), in seconds.
    pub(crate) visibility: i32,
    /// Long-poll wait, in seconds.
    pub(crate) wait: i32,
    /// Bound on one SQS call.
    pub(crate) request_timeout: Duration,
    /// The closing token and what the pollers received.
    pub(crate) core: ReceiverCore<mpsc::Receiver<Received>>,
    /// Acks, to the receiver's deleter (see [`deleter`]).
    pub(crate) deletes: mpsc::UnboundedSender<Delete>,
    /// Receive calls in flight, over all of the receiver's pollers.
    pub(crate) receiving: AtomicUsize,
    /// Held by the poller gathering room for its next receive: room freed
    /// by a burst of acks goes to one receive of up to 10, not spread over
    /// every poller as receives of two or three.
    pub(crate) gathering: tokio::sync::Mutex<()>,
    /// When the latest of them started.
    pub(crate) receive_started: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Receipt handles of the messages handed out and not settled: `close`
    /// makes them visible again at once, rather than after the visibility
    /// timeout.
    pub(crate) outstanding: Outstanding<String>,
    /// What the pollers received and the receiver has not handed out.
    pub(crate) prefetched: Prefetched,
    /// One message at a time until a first delivery shows that the head of
    /// the queue is not what crashed the last consumer.
    pub(crate) slow: SlowStart,
    /// Set (and the pollers stopped) once SQS says the queue does not
    /// exist: every receive returns it.
    pub(crate) gone: std::sync::OnceLock<Error>,
}

/// One ack waiting for its `DeleteMessageBatch`.
pub(crate) struct Delete {
    pub(crate) receipt: String,
    pub(crate) done: oneshot::Sender<Result<()>>,
}

impl fmt::Debug for ReceiverShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverShared")
            .field("url", &self.url)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl ReceiverShared {
    /// Stops polling and makes everything this receiver holds visible again
    /// at once: the messages it handed out and that are not settled, and
    /// what it received but never handed out.
    ///
    /// Waits for the receives still in flight to end first (a long poll is
    /// never abandoned, see [`poll`]; at most the poll `wait` plus the
    /// request timeout): after `close` this receiver takes nothing more from
    /// the queue — a poll left running would take messages published after
    /// the close (counting a receive for each) only to hand them back.
    /// Stops the pollers and hands back what the receiver holds. Takes at
    /// most the long-poll wait plus one request timeout, however much it
    /// holds and whether or not SQS answers: a receive in flight is waited
    /// for (within that bound), the hand-back gets what is left of it (its
    /// batches at once), and what it could not hand back comes back after
    /// the visibility timeout.
    pub(crate) async fn hand_back(&self) {
        self.core.close();
        let wait = Duration::from_secs(u64::try_from(self.wait).unwrap_or(0));
        let until = tokio::time::Instant::now() + wait + self.request_timeout;
        while self.receiving.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut held = self.outstanding.take_all();
        if let Some(mut rx) = self.core.try_state() {
            rx.close();
            while let Ok((m, _permit, ticket)) = rx.try_recv() {
                self.prefetched.settle(ticket);
                held.extend(m.receipt_handle);
            }
        }
        let _ = tokio::time::timeout_at(until, self.release(held)).await;
    }

    /// Hands out a prefetched copy; `None` when its lease was lost (the
    /// message is back in the queue and comes again by a new receive).
    fn deliver(self: &Arc<Self>, (m, permit, ticket): Received) -> Option<RawDelivery> {
        if self.prefetched.settle(ticket).is_none_or(|l| l.lost) {
            return None;
        }
        let system = m.attributes();
        let attempt = system
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1)
            .max(1);
        let published_at = system
            .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        let attr = |name: &str| {
            m.message_attributes()
                .and_then(|a| a.get(name))
                .and_then(|v| v.string_value())
                .map(str::to_owned)
        };
        let message = codec::decode(
            m.body().unwrap_or_default().to_owned(),
            attr(codec::ID),
            attr(codec::META).as_deref(),
            published_at,
            || m.message_id().unwrap_or_default().to_owned(),
        );
        let receipt = m.receipt_handle().unwrap_or_default().to_owned();
        let ticket = self.outstanding.insert(receipt.clone());
        self.slow.handed_out(attempt);
        Some(RawDelivery {
            message,
            attempt,
            acker: Box::new(SqsAcker {
                shared: Arc::clone(self),
                receipt,
                ticket,
                _permit: permit,
            }),
        })
    }
}

impl ReceiverShared {
    /// Makes messages visible again, ten per `ChangeMessageVisibilityBatch`:
    /// at once, or — while one of this closing receiver's own long polls is
    /// still running (a receive is never abandoned, see [`poll`]) — once it
    /// ended, since that poll would take them (counting a receive) and only
    /// hand them back again.
    async fn release(&self, handles: Vec<String>) {
        if handles.is_empty() {
            return;
        }
        let visibility = self.until_polls_end();
        let calls: Vec<_> = handles
            .chunks(BATCH)
            .map(|chunk| {
                let entries = visibility_entries(chunk.iter().map(String::as_str), visibility);
                // Best effort: what is not released comes back after the
                // visibility timeout anyway.
                self.sqs
                    .change_message_visibility_batch()
                    .queue_url(&self.url)
                    .set_entries(Some(entries))
                    .send()
            })
            .collect();
        // As many in flight as acks get (a large hand-back on a dead network
        // is cut by its caller's deadline).
        let mut calls = futures_util::stream::iter(calls).buffer_unordered(DELETE_WINDOW);
        while calls.next().await.is_some() {}
    }
}

impl ReceiverShared {
    /// The visibility timeout (the ack timeout, in whole seconds).
    fn visibility_duration(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.visibility).unwrap_or(1))
    }

    /// Whole seconds until every receive this receiver has in flight ended
    /// (0 when none is), with a second's margin for the server's view.
    fn until_polls_end(&self) -> i32 {
        if self.receiving.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let started = *self
            .receive_started
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(started) = started else { return 0 };
        let end = started + Duration::from_secs(u64::try_from(self.wait).unwrap_or(0) + 1);
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        i32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).unwrap_or(0)
    }
}

/// What a receiver's consumer holds: its prefetch permits, each held by a
/// message received and not settled (buffered, handed out, or being acked)
/// or by room a receive on its way has taken.
pub(crate) struct Held {
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) prefetch: usize,
}

impl Held {
    fn count(&self) -> usize {
        self.prefetch
            .saturating_sub(self.permits.available_permits())
    }
}

/// Deletes what a receiver's ackers hand it, in `DeleteMessageBatch` calls
/// of up to 10 with [`DELETE_WINDOW`] in flight, and answers each ack with
/// its own entry's result. An ack that finds a free window goes at once
/// when nothing else holds a prefetch permit; while more permits are held
/// than the deletes cover (the rest of a burst, acked one by one, or room a
/// receive on its way took), a partial batch waits up to [`LINGER`] for
/// more. Under load the acks that queue up behind a full window share the
/// next call. Ends when the receiver and all its ackers are gone.
pub(crate) async fn deleter(
    sqs: aws_sdk_sqs::Client,
    url: String,
    mut rx: mpsc::UnboundedReceiver<Delete>,
    held: Held,
) {
    let window = Arc::new(Semaphore::new(DELETE_WINDOW));
    // Entries of the deletes in flight: their permits are still held.
    let deleting = Arc::new(AtomicUsize::new(0));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = Arc::clone(&window).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        let until = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            if let Ok(d) = rx.try_recv() {
                batch.push(d);
                continue;
            }
            let covered = deleting.load(Ordering::SeqCst) + batch.len();
            if held.count() <= covered {
                break;
            }
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(d)) => batch.push(d),
                Ok(None) | Err(_) => break,
            }
        }
        let (sqs, url, deleting) = (sqs.clone(), url.clone(), Arc::clone(&deleting));
        deleting.fetch_add(batch.len(), Ordering::SeqCst);
        tokio::spawn(async move {
            let n = batch.len();
            delete_batch(&sqs, &url, batch).await;
            deleting.fetch_sub(n, Ordering::SeqCst);
            drop(permit);
        });
    }
}

async fn delete_batch(sqs: &aws_sdk_sqs::Client, url: &str, batch: Vec<Delete>) {
    let entries: Vec<DeleteMessageBatchRequestEntry> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(&d.receipt)
                .build()
                .ok()
        })
        .collect();
    let out = sqs
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await;
    let mut results: Vec<Result<()>> = match out {
        Ok(out) => {
            let mut results: Vec<Result<()>> = batch.iter().map(|_| Ok(())).collect();
            for (i, text, retryable) in out
                .failed()
                .iter()
                .filter_map(|f| failure(f.id(), f.code(), f.message(), f.sender_fault()))
            {
                if let Some(r) = results.get_mut(i) {
                    *r = Err(Error::broker(
                        format!("DeleteMessage: {text}"),
                        retryable,
                        None,
                    ));
                }
            }
            results
        }
        Err(e) => {
            let e = sdk_error("DeleteMessageBatch", e);
            batch.iter().map(|_| Err(e.clone())).collect()
        }
    };
    for d in batch.into_iter().rev() {
        let r = results.pop().unwrap_or(Ok(()));
        let _ = d.done.send(r);
    }
}

/// Takes room for a receive: one permit, then more while the consumer still
/// has messages to work on, or another poller's receive is on its way to
/// it: one receive of 10 instead of ten of 1 (each receive is a billed call,
/// and emulators scan the queue on each). A consumer with nothing to work
/// on waits [`BURST`] at most, for the rest of the room its acks free. One
/// poller gathers at a time (`ReceiverShared::gathering`). `None` when the
/// receiver closed.
async fn gather(
    shared: &Arc<ReceiverShared>,
    tx: &mpsc::Sender<Received>,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        p = Arc::clone(&shared.permits).acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return None,
        },
        () = shared.core.token().cancelled() => return None,
    };
    let mut permits = vec![first];
    let target = BATCH.min(shared.prefetch);
    let mut until = tokio::time::Instant::now() + GATHER;
    while permits.len() < target {
        if let Ok(p) = Arc::clone(&shared.permits).try_acquire_owned() {
            permits.push(p);
            continue;
        }
        if tx.capacity() == tx.max_capacity() && shared.receiving.load(Ordering::Acquire) == 0 {
            // The consumer is waiting on nothing: receive now, with the
            // rest of the burst of room its last acks are freeing.
            until = until.min(tokio::time::Instant::now() + BURST);
        }
        tokio::select! {
            p = Arc::clone(&shared.permits).acquire_owned() => match p {
                Ok(p) => permits.push(p),
                Err(_) => return None,
            },
            () = tokio::time::sleep_until(until) => break,
            () = shared.core.token().cancelled() => return None,
        }
    }
    Some(permits)
}

/// One polling loop of a receiver: asks for as many messages as the
/// receiver has free prefetch room (at most 10), holding those permits.
///
/// A receive is never abandoned half-way: SQS would still hand messages to
/// the abandoned request and hide them for the visibility timeout. After the
/// receiver closes, the loop finishes its current receive and makes what it
/// got visible again.
pub(crate) async fn poll(shared: Arc<ReceiverShared>, tx: mpsc::Sender<Received>) {
    let mut failing = FailureStreak::default();
    loop {
        let mut permits = if shared.slow.is_open() {
            // Released before the receive: receives still overlap.
            let gathered = {
                let Some(_turn) = shared.core.until_closed(shared.gathering.lock()).await else {
                    return;
                };
                gather(&shared, &tx).await
            };
            let Some(permits) = gathered else {
                return;
            };
            permits
        } else {
            // One message at a time (see `SlowStart`): wait until nothing
            // is held — all the room is free, which also keeps the other
            // pollers out — and ask for one.
            // (The wait ends too when a first delivery, handed out and
            // still held, opens the receiver.)
            let all = u32::try_from(shared.prefetch).unwrap_or(u32::MAX);
            let wait = Arc::clone(&shared.permits).acquire_many_owned(all);
            let room = tokio::select! {
                p = wait => match p {
                    Ok(p) => Some(p),
                    Err(_) => return,
                },
                () = shared.slow.opened() => None,
                () = shared.core.token().cancelled() => return,
            };
            let Some(mut room) = room else { continue };
            room.split(1).into_iter().collect()
        };
        shared.receiving.fetch_add(1, Ordering::AcqRel);
        let started = tokio::time::Instant::now();
        *shared
            .receive_started
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(started);
        let out = shared
            .sqs
            .receive_message()
            .queue_url(&shared.url)
            .max_number_of_messages(i32::try_from(permits.len()).unwrap_or(1))
            .wait_time_seconds(shared.wait)
            .visibility_timeout(shared.visibility)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names("All")
            .send()
            .await;
        shared.receiving.fetch_sub(1, Ordering::AcqRel);
        let messages = match out {
            Ok(out) => {
                failing.recovered();
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                let code = e.code().unwrap_or_default().to_owned();
                let e = sdk_error("receiving messages", e);
                if code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist") {
                    // Deleted under the receiver: say so, stop polling.
                    let _ = shared.gone.set(Error::not_found(
                        "queue",
                        shared.url.clone(),
                        format!("the subscription's queue was deleted: {e}"),
                        Some(Box::new(e)),
                    ));
                    shared.core.close();
                    return;
                }
                // Transient (the endpoint unreachable, throttling): retry,
                // never silently.
                if failing.failed() {
                    tracing::warn!(queue = %shared.url, error = %e, "receiving failed; retrying");
                }
                if !shared.core.pause(POLL_RETRY).await {
                    return;
                }
                continue;
            }
        };
        if shared.core.is_closed() {
            shared.release(receipts(messages)).await;
            return;
        }
        let empty = messages.is_empty();
        let mut rest = messages.into_iter();
        while let Some(m) = rest.next() {
            let Some(permit) = permits.pop() else {
                shared
                    .release(receipts(std::iter::once(m).chain(rest)))
                    .await;
                break;
            };
            let due = started + shared.visibility_duration();
            let ticket = shared.prefetched.insert(Lease {
                receipt: m.receipt_handle().unwrap_or_default().to_owned(),
                due,
                lost: false,
            });
            if let Err(mpsc::error::SendError((m, _, ticket))) = tx.send((m, permit, ticket)).await
            {
                shared.prefetched.settle(ticket);
                shared
                    .release(receipts(std::iter::once(m).chain(rest)))
                    .await;
                return;
            }
        }
        if empty && shared.wait == 0 {
            // Short polling (see `wait_for`): do not spin on an empty queue.
            if !shared.core.pause(SHORT_POLL_PAUSE).await {
                return;
            }
        }
    }
}

/// Keeps the leases of a receiver's prefetched copies (see [`Prefetched`]):
/// every quarter of the visibility timeout (at least [`KEEP_TICK`]), the
/// copies with less than half of it left get it again, by
/// `ChangeMessageVisibilityBatch` — which SQS does not count as a receive.
/// A copy SQS refuses to extend is marked lost and dropped when its turn
/// comes. Ends when the receiver closes.
pub(crate) async fn keep_leases(shared: Arc<ReceiverShared>) {
    let visibility = shared.visibility_duration();
    let tick = (visibility / 4).max(KEEP_TICK);
    let mut failing = FailureStreak::default();
    loop {
        if !shared.core.pause(tick).await {
            return;
        }
        let by = tokio::time::Instant::now() + visibility / 2;
        let due = shared
            .prefetched
            .select(|t, l| (!l.lost && l.due < by).then(|| (t, l.receipt.clone())));
        let calls: Vec<_> = due
            .chunks(BATCH)
            .map(|chunk| {
                let entries = visibility_entries(
                    chunk.iter().map(|(_, receipt)| receipt.as_str()),
                    shared.visibility,
                );
                let started = tokio::time::Instant::now();
                let call = shared
                    .sqs
                    .change_message_visibility_batch()
                    .queue_url(&shared.url)
                    .set_entries(Some(entries))
                    .send();
                async move { (chunk, started, call.await) }
            })
            .collect();
        let mut calls = futures_util::stream::iter(calls).buffer_unordered(DELETE_WINDOW);
        while let Some((chunk, started, out)) = calls.next().await {
            let out = match out {
                Ok(out) => {
                    failing.recovered();
                    out
                }
                Err(e) => {
                    // Transient, or the receiver is going: the next round
                    // tries again while the leases last.
                    if failing.failed() {
                        let e = sdk_error("ChangeMessageVisibilityBatch", e);
                        tracing::warn!(queue = %shared.url, error = %e, "keeping prefetched leases failed");
                    }
                    continue;
                }
            };
            let mut refused = vec![false; chunk.len()];
            for (i, text, retryable) in out
                .failed()
                .iter()
                .filter_map(|f| failure(f.id(), f.code(), f.message(), f.sender_fault()))
            {
                if let Some(r) = refused.get_mut(i) {
                    if retryable {
                        tracing::debug!(queue = %shared.url, error = %text, "extending a prefetched lease failed");
                    } else {
                        *r = true;
                    }
                }
            }
            for ((ticket, _), refused) in chunk.iter().zip(refused) {
                shared.prefetched.update(*ticket, |l| {
                    if refused {
                        l.lost = true;
                    } else {
                        l.due = started + visibility;
                    }
                });
            }
        }
    }
}

/// One `ChangeMessageVisibilityBatch` entry per receipt handle (ids are the
/// positions), each to `visibility` seconds.
fn visibility_entries<'a>(
    receipts: impl Iterator<Item = &'a str>,
    visibility: i32,
) -> Vec<ChangeMessageVisibilityBatchRequestEntry> {
    receipts
        .enumerate()
        .filter_map(|(i, receipt)| {
            ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(receipt)
                .visibility_timeout(visibility)
                .build()
                .ok()
        })
        .collect()
}

/// The receipt handles of received messages.
fn receipts(messages: impl IntoIterator<Item = aws_sdk_sqs::types::Message>) -> Vec<String> {
    messages
        .into_iter()
        .filter_map(|m| m.receipt_handle)
        .collect()
}

/// The long-poll wait for a visibility timeout: shorter than it, so a
/// receive still running when its receiver goes away ends before anything
/// that receiver held becomes visible again (0 — short polling — for a
/// one-second timeout).
pub(crate) fn wait_for(configured: Duration, visibility: i32) -> i32 {
    let configured = i32::try_from(configured.as_secs()).unwrap_or(20);
    configured.min(visibility - 1).max(0)
}

#[async_trait]
impl SharedReceiver for ReceiverShared {
    /// The next message the receiver's long polls brought in.
    ///
    /// Cancel safe: polls run in background tasks and hand messages over a
    /// channel; a cancelled receive leaves them there.
    async fn recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = this;
        let ended = || s.gone.get().map(|gone| Err(gone.clone()));
        if s.gone.get().is_some() {
            return ended();
        }
        let Some(mut rx) = s.core.enter().await else {
            return ended();
        };
        loop {
            let Some(Some(received)) = s.core.until_closed(rx.recv()).await else {
                return ended();
            };
            if let Some(d) = s.deliver(received) {
                return Some(Ok(d));
            }
        }
    }

    fn try_recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = this;
        let mut rx = s.core.try_enter()?;
        loop {
            if let Some(d) = s.deliver(rx.try_recv().ok()?) {
                return Some(Ok(d));
            }
        }
    }

    async fn shutdown(&self) -> Result<()> {
        self.hand_back().await;
        Ok(())
    }

    /// Stops the pollers; what it held comes back after the visibility
    /// timeout (`close` hands it back at once).
    fn dropped(&self) {
        self.core.close();
    }
}

struct SqsAcker {
    shared: Arc<ReceiverShared>,
    receipt: String,
    /// Where this message is recorded as handed out, until it is settled.
    ticket: u64,
    _permit: OwnedSemaphorePermit,
}

impl fmt::Debug for SqsAcker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsAcker").finish_non_exhaustive()
    }
}

#[async_trait]
impl Acker for SqsAcker {
    /// Deleted through the receiver's batched deletes (`DeleteMessageBatch`,
    /// up to 10 per call); `Ok` once SQS confirmed this message's entry.
    async fn ack(&self) -> Result<()> {
        self.shared.core.check_open()?;
        let (done, result) = oneshot::channel();
        self.shared
            .deletes
            .send(Delete {
                receipt: self.receipt.clone(),
                done,
            })
            .map_err(|_| Error::Closed)?;
        let deleted = result.await.unwrap_or_else(|_| {
            Err(Error::broker(
                "DeleteMessageBatch: the deleter stopped before answering",
                true,
                None,
            ))
        });
        if deleted.is_ok() {
            self.shared.outstanding.settle(self.ticket);
        }
        deleted
    }

    /// `ChangeMessageVisibility` to the delay (whole seconds, rounded up;
    /// 0 without one): SQS holds the message and counts the next receive.
    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.shared.core.check_open()?;
        let secs = delay.map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        let secs = i32::try_from(secs.min(43_200)).unwrap_or(43_200);
        self.shared
            .sqs
            .change_message_visibility()
            .queue_url(&self.shared.url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(secs)
            .send()
            .await
            .map_err(|e| sdk_error("ChangeMessageVisibility", e))?;
        self.shared.outstanding.settle(self.ticket);
        Ok(())
    }

    /// `ChangeMessageVisibility` to the subscription's visibility timeout:
    /// SQS hides the message for that long from now. (It does not count a
    /// receive.)
    async fn extend(&self) -> Result<()> {
        self.shared.core.check_open()?;
        self.shared
            .sqs
            .change_message_visibility()
            .queue_url(&self.shared.url)
            .receipt_handle(&self.receipt)
            .visibility_timeout(self.shared.visibility)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("ChangeMessageVisibility", e))
    }
}
