//! Confirmed publishing without a future per record: librdkafka's delivery
//! callback settles the record's batch (a counter and, on failure, the
//! record's id), and the publisher waits once per batch.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use rdkafka::{
    ClientContext,
    error::KafkaError,
    message::{Headers as _, Message as _},
    producer::{DeliveryResult, ProducerContext, ThreadedProducer},
};
use tokio::sync::Notify;

use crate::{broker::lock, codec};

/// switchyard's producer: librdkafka's threaded producer with
/// [`DeliveryReports`] as its context.
pub type KafkaProducer = ThreadedProducer<DeliveryReports>;

/// The context of switchyard's producer: each record's delivery report
/// settles the batch it was published in.
#[derive(Debug, Default)]
pub struct DeliveryReports {
    _private: (),
}

impl ClientContext for DeliveryReports {}

impl ProducerContext for DeliveryReports {
    type DeliveryOpaque = Arc<Batch>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Self::DeliveryOpaque) {
        match result {
            Ok(_) => batch.settle(None),
            Err((e, record)) => {
                let id = record.headers().and_then(|hs| {
                    hs.iter()
                        .find(|h| h.key == codec::ID)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                batch.settle(Some((id, e.clone())));
            }
        }
    }
}

/// Records of one publish call awaiting their delivery reports (the
/// delivery opaque of switchyard's records).
pub struct Batch {
    /// Records enqueued and not reported yet.
    left: AtomicUsize,
    /// Failed records: their id (from the `sy-id` header) and the error.
    failed: Mutex<Vec<(Option<String>, KafkaError)>>,
    done: Notify,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("left", &self.left.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Batch {
    /// A batch expecting `records` reports.
    pub(crate) fn new(records: usize) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicUsize::new(records),
            failed: Mutex::new(Vec::new()),
            done: Notify::new(),
        })
    }

    /// One record reported (or never enqueued: `None` without a report).
    pub(crate) fn settle(&self, failure: Option<(Option<String>, KafkaError)>) {
        if let Some(f) = failure {
            lock(&self.failed).push(f);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Waits until every record is settled; returns the failures.
    pub(crate) async fn reported(&self) -> Vec<(Option<String>, KafkaError)> {
        loop {
            let done = self.done.notified();
            if self.left.load(Ordering::Acquire) == 0 {
                return std::mem::take(&mut *lock(&self.failed));
            }
            done.await;
        }
    }
}
