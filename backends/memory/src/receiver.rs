//! The memory broker's receivers and ackers: taking within the prefetch
//! from a subscription's queue, settling, handing back on close.

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use switchyard_core::{
    Error, Message, Result,
    driver::{Acker, RawDelivery, ReceiverCore, SharedReceiver},
};

use crate::queue::{SharedQueue, Take};

/// Deliveries a receiver takes from the queue at once (within its prefetch).
const TAKE_BATCH: usize = 64;

pub(crate) struct ReceiverShared {
    pub(crate) queue: SharedQueue,
    /// `topic/subscription`, for errors.
    pub(crate) name: String,
    pub(crate) consumer: u64,
    pub(crate) prefetch: usize,
    pub(crate) ack_timeout: Duration,
    /// The closing token (receives are lock-free: the state is the queue).
    pub(crate) core: ReceiverCore<()>,
    pub(crate) requeued: AtomicBool,
    /// Deliveries taken from the queue (so counted against prefetch) but not
    /// yet handed to the application: (tag, message, attempt).
    pub(crate) buffer: Mutex<VecDeque<(u64, Message, u32)>>,
}

impl ReceiverShared {
    fn buffer(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Message, u32)>> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes this consumer: buffered deliveries go back untouched, handed-out
    /// unsettled ones go back for redelivery.
    pub(crate) fn hand_back(&self) {
        self.core.close();
        if self.requeued.swap(true, Ordering::AcqRel) {
            return;
        }
        let tags = self.buffer().drain(..).map(|(t, _, _)| t).collect();
        self.queue.untake(tags);
        self.queue.requeue_consumer(self.consumer);
    }

    /// The next buffered delivery whose ack clock restarts now: the ack
    /// timeout runs from hand-out, not from when it was buffered.
    fn pop_buffered(&self) -> Option<(u64, Message, u32)> {
        loop {
            let d = self.buffer().pop_front()?;
            if self.queue.restamp(d.0, self.ack_timeout) {
                return Some(d);
            }
        }
    }

    fn raw(self: &Arc<Self>, (tag, message, attempt): (u64, Message, u32)) -> RawDelivery {
        RawDelivery {
            message,
            attempt,
            acker: Box::new(MemoryAcker {
                receiver: Arc::clone(self),
                tag,
            }),
        }
    }
}

impl fmt::Debug for ReceiverShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiverShared")
            .field("consumer", &self.consumer)
            .field("prefetch", &self.prefetch)
            .field("ack_timeout", &self.ack_timeout)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl SharedReceiver for ReceiverShared {
    async fn recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = this;
        // Take part in tokio's cooperative budget (as tokio's channels do),
        // so a consumer that always finds work still lets its task yield.
        tokio::task::consume_budget().await;
        loop {
            // Register for wake-ups before looking, so none is missed.
            let changed = s.queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if s.core.is_closed() {
                s.hand_back();
                return None;
            }
            if s.queue.is_deleted() {
                return Some(Err(Error::not_found(
                    "subscription",
                    s.name.clone(),
                    "the subscription was deleted",
                    None,
                )));
            }
            if let Some(d) = s.pop_buffered() {
                return Some(Ok(s.raw(d)));
            }
            let wake = match s
                .queue
                .take(s.consumer, s.prefetch, TAKE_BATCH, s.ack_timeout)
            {
                Take::Got(got) => {
                    let mut got = got.into_iter();
                    let first = got.next().expect("a take hands out at least one");
                    s.buffer().extend(got);
                    return Some(Ok(s.raw(first)));
                }
                Take::Wait(wake) => wake,
            };
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut changed => {}
                () = sleep => {}
                () = s.core.token().cancelled() => {}
            }
        }
    }

    fn try_recv(this: &Arc<Self>) -> Option<Result<RawDelivery>> {
        let s = this;
        if s.core.is_closed() {
            return None;
        }
        s.pop_buffered().map(|d| Ok(s.raw(d)))
    }

    async fn shutdown(&self) -> Result<()> {
        self.hand_back();
        Ok(())
    }

    /// A dropped consumer is a crashed one: its deliveries go back.
    fn dropped(&self) {
        self.hand_back();
    }
}

#[derive(Debug)]
struct MemoryAcker {
    receiver: Arc<ReceiverShared>,
    tag: u64,
}

impl MemoryAcker {
    fn settle(&self) -> Result<()> {
        self.receiver.core.check_open()?;
        // An unknown tag expired after the ack timeout and was redelivered:
        // at-least-once, so this is not an error (as NATS and SQS behave).
        self.receiver.queue.ack(self.tag);
        Ok(())
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(&self) -> Result<()> {
        self.settle()
    }

    fn ack_now(&self) -> Option<Result<()>> {
        Some(self.settle())
    }

    async fn nack(&self, delay: Option<Duration>) -> Result<()> {
        self.receiver.core.check_open()?;
        self.receiver.queue.nack(self.tag, delay);
        Ok(())
    }

    /// Moves the delivery's deadline to an ack timeout from now (a delivery
    /// already expired is not revived).
    async fn extend(&self) -> Result<()> {
        self.receiver.core.check_open()?;
        self.receiver
            .queue
            .restamp(self.tag, self.receiver.ack_timeout);
        Ok(())
    }
}
